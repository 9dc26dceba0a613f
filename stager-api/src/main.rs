//! The `stager-api` binary: configuration in, HTTP server out.

use anyhow::Context;
use clap::{Parser, Subcommand};
use stager_api::config::{StagerSettings, parse_listen};
use stager_api::startup::Application;
use tailor::config::{Secret, TailorSettings};
use tailor::embedded::{EmbeddedPostgres, EmbeddedRegistry, RegistryOptions};
use tailor::secrets::CredentialsKey;
use tailor::staging::worker::WorkerSettings;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "stager-api",
    version,
    about = "HTTP face of tailor: staging requests in, pinned images out"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with configuration from the environment (the default).
    Serve,
    /// Single-node default: starts an ephemeral PostgreSQL and a local internal registry, then
    /// serves. Ctrl-C stops and deletes everything it started.
    Embedded {
        /// Address to listen on.
        #[arg(long, env = "STAGER_LISTEN", default_value = "127.0.0.1:8080")]
        listen: String,
        /// Registry that references without a host refer to.
        #[arg(long, env = "TAILOR_DEFAULT_REGISTRY", default_value = "docker.io")]
        default_registry: String,
    },
    /// Validate the configuration in the environment and exit (0 when valid).
    CheckConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tailor::tls::install_crypto_provider();
    tailor::telemetry::init();
    match Cli::parse().command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let settings = StagerSettings::from_env().map_err(config_error)?;
            serve(settings).await
        }
        Command::Embedded {
            listen,
            default_registry,
        } => embedded(&listen, default_registry).await,
        Command::CheckConfig => {
            let settings = StagerSettings::from_env().map_err(config_error)?;
            // The in-process workers' tunables too: serve would refuse them at start-up.
            let workers = WorkerSettings::from_settings(
                &settings.tailor,
                settings.credentials_key.clone(),
                |n| std::env::var(n).ok(),
            )
            .map_err(config_error)?;
            workers.registries().map_err(config_error)?;
            settings
                .tailor
                .database_pool(8, settings.workers > 0)
                .map_err(config_error)?;
            println!("{}", settings.egress_policy(settings.listen).describe());
            println!("configuration is valid");
            Ok(())
        }
    }
}

fn config_error(error: tailor::config::ConfigError) -> anyhow::Error {
    anyhow::anyhow!("{} ({})", error, error.code())
}

async fn serve(settings: StagerSettings) -> anyhow::Result<()> {
    let mut worker_settings =
        WorkerSettings::from_settings(&settings.tailor, settings.credentials_key.clone(), |name| {
            std::env::var(name).ok()
        })
        .map_err(config_error)?;
    // One pool for the API and the in-process workers (whose LISTEN connection is one of
    // them): its size does not grow with workers or blob transfers.
    let connections = settings
        .tailor
        .database_pool(8, settings.workers > 0)
        .map_err(config_error)?;
    let db = tailor::db::connect(settings.tailor.database_url.expose(), connections)
        .await
        .context("connecting to DATABASE_URL")?;
    tailor::db::migrate(&db)
        .await
        .context("running database migrations")?;

    let shutdown = CancellationToken::new();
    let app = Application::build(&settings, db.clone())
        .with_context(|| format!("binding STAGER_LISTEN={}", settings.listen))?;
    // The workers' destinations may not include this very listener.
    worker_settings.egress = settings.egress_policy(app.addr());
    tracing::info!("{}", worker_settings.egress.describe());
    let workers = if settings.workers > 0 {
        tracing::info!(count = settings.workers, "starting in-process workers");
        Some(tokio::spawn(tailor::staging::worker::run(
            db,
            worker_settings,
            settings.workers,
            shutdown.clone(),
        )))
    } else {
        None
    };

    // One line on stdout, for scripts and tests that start us on port 0; logs go to stderr.
    println!("stager-api listening on {}", app.base_url());
    tracing::info!(addr = %app.addr(), "stager-api listening");
    // Returns after SIGINT/SIGTERM, once in-flight requests are answered.
    let served = app.run_until_stopped().await;
    shutdown.cancel();
    if let Some(workers) = workers {
        tracing::info!("draining workers");
        let _ = workers.await;
    }
    served?;
    tracing::info!("stager-api stopped");
    Ok(())
}

async fn embedded(listen: &str, default_registry: String) -> anyhow::Result<()> {
    let listen = parse_listen(Some(listen)).map_err(config_error)?;
    // Started on this (the main) thread: the children's parent-death signal follows it.
    let postgres = EmbeddedPostgres::start().context("starting the embedded PostgreSQL")?;
    let registry = EmbeddedRegistry::start(RegistryOptions::default())
        .context("starting the embedded registry")?;
    // The operator's tokens if given, else one generated for this run (printed below).
    let configured = std::env::var("STAGER_API_TOKENS")
        .ok()
        .filter(|t| !t.trim().is_empty());
    let token = configured
        .is_none()
        .then(|| uuid::Uuid::new_v4().simple().to_string());
    let api_tokens = match &token {
        Some(token) => vec![Secret::new(token.clone())],
        None => stager_api::config::parse_tokens(configured.as_deref()).map_err(config_error)?,
    };
    // A developer's machine: images come from registries on this host too.
    let mut tailor = TailorSettings::from_lookup(|name| match name {
        "DATABASE_URL" => Some(postgres.url("postgres")),
        "TAILOR_INTERNAL_REGISTRY" => Some(registry.host()),
        "TAILOR_DEFAULT_REGISTRY" => Some(default_registry.clone()),
        _ => std::env::var(name).ok(),
    })
    .map_err(config_error)?;
    tailor.insecure_registries.push(registry.host());
    if tailor.egress_allow.is_empty() {
        tailor.egress_allow =
            tailor::egress::Rule::parse_list("127.0.0.0/8, ::1, localhost").expect("valid rules");
    }
    let settings = StagerSettings {
        tailor,
        listen,
        api_tokens,
        workers: stager_api::config::parse_count(
            "STAGER_WORKERS",
            std::env::var("STAGER_WORKERS").ok().as_deref(),
            2,
        )
        .map_err(config_error)?,
        credentials_key: Some(CredentialsKey::generate()),
        tls: None,
    };
    eprintln!("embedded PostgreSQL:        {}", postgres.url("postgres"));
    eprintln!("embedded internal registry: {}", registry.base_url());
    if let Some(token) = &token {
        eprintln!("API token (generated for this run): {token}");
    }
    eprintln!(
        "egress: loopback allowed (TAILOR_EGRESS_ALLOW={}), as suits a developer's machine; \
         cloud metadata and the internal registry stay refused",
        settings
            .tailor
            .egress_allow
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    eprintln!("Ctrl-C stops everything and deletes its data.");
    let result = serve(settings).await;
    // Explicit order: registry, then database; both delete their temporary directories.
    drop(registry);
    drop(postgres);
    result
}
