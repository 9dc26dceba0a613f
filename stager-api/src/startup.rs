//! Building and running the HTTP server (zero2prod's `Application`): bind first, so a caller
//! asking for port 0 learns the real port before the server runs.

use std::net::{SocketAddr, TcpListener};

use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use sqlx::PgPool;
use tailor::egress::Egress;
use tailor::registry::Credentials;

use crate::auth::ApiTokens;
use crate::config::StagerSettings;
use crate::state::AppState;

/// Largest request body accepted; a staging request is a few hundred bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A bound, not yet running server.
pub struct Application {
    addr: SocketAddr,
    server: Server,
    https: bool,
}

impl Application {
    /// Binds the listener and prepares the server on an already migrated database.
    pub fn build(settings: &StagerSettings, db: PgPool) -> std::io::Result<Self> {
        Self::build_on(settings, db, TcpListener::bind(settings.listen)?)
    }

    /// Prepares the server on a listener bound earlier (so that a port in use is reported
    /// before anything else is started).
    pub fn build_on(
        settings: &StagerSettings,
        db: PgPool,
        listener: TcpListener,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let egress = Egress::new(settings.egress_policy(addr));
        let registries = settings
            .tailor
            .registries(egress.clone())
            .map_err(std::io::Error::other)?;
        let internal = registries.internal(
            &settings.tailor.internal_registry,
            settings
                .tailor
                .internal_registry_credentials
                .as_ref()
                .map(|(user, password)| Credentials::new(user.clone(), password.expose())),
        );
        let state = web::Data::new(AppState {
            db,
            registries,
            internal,
            egress,
            tailor: settings.tailor.clone(),
            credentials_key: settings.credentials_key.clone(),
            reference_syncs: Arc::new(tokio::sync::Semaphore::new(
                crate::routes::REFERENCE_SYNCS_AT_ONCE,
            )),
        });
        let tokens = web::Data::new(ApiTokens::new(
            settings.api_tokens.iter().map(|t| t.expose()),
        ));
        let server = HttpServer::new(move || {
            App::new()
                .wrap(actix_web::middleware::from_fn(crate::contract::check))
                .wrap(tracing_actix())
                .app_data(state.clone())
                .app_data(tokens.clone())
                .app_data(
                    web::JsonConfig::default()
                        .limit(MAX_BODY_BYTES)
                        .error_handler(crate::error::json_error),
                )
                .configure(crate::routes::configure)
                .default_service(web::to(crate::routes::not_found))
        });
        let server = match &settings.tls {
            Some(tls) => {
                let config = tls.server_config().map_err(std::io::Error::other)?;
                server
                    .on_connect(crate::tls::record_client_certificate)
                    .listen_rustls_0_23(listener, config)?
            }
            None => server.listen(listener)?,
        }
        .run();
        Ok(Self {
            addr,
            server,
            https: settings.tls.is_some(),
        })
    }

    /// The address actually bound (the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http(s)://<addr>`.
    pub fn base_url(&self) -> String {
        format!(
            "{}://{}",
            if self.https { "https" } else { "http" },
            self.addr
        )
    }

    /// Serves until SIGINT/SIGTERM, then drains in-flight requests.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

fn tracing_actix() -> actix_web::middleware::Logger {
    // The access log; it never includes headers, so tokens stay out of it.
    actix_web::middleware::Logger::new("%a \"%r\" %s %b %Dms")
}
