//! TLS for stager-api (rustls), and optional mutual TLS: a client certificate signed by the
//! configured CA authenticates its caller as a bearer token would.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix_web::dev::Extensions;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tailor::config::ConfigError;

/// `STAGER_TLS_CERT`, `STAGER_TLS_KEY` and the optional `STAGER_TLS_CLIENT_CA`.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Marks a connection whose client presented a certificate the CA verified.
#[derive(Debug, Clone, Copy)]
pub struct VerifiedClientCertificate;

impl TlsSettings {
    /// Reads the three settings; none means plain HTTP.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, ConfigError> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let (cert, key, client_ca) = (
            get("STAGER_TLS_CERT"),
            get("STAGER_TLS_KEY"),
            get("STAGER_TLS_CLIENT_CA"),
        );
        let settings = match (cert, key) {
            (None, None) if client_ca.is_some() => {
                return Err(ConfigError::Missing {
                    setting: "STAGER_TLS_CERT",
                    hint: "STAGER_TLS_CLIENT_CA (mutual TLS) needs STAGER_TLS_CERT and STAGER_TLS_KEY",
                });
            }
            (None, None) => return Ok(None),
            (Some(_), None) => {
                return Err(ConfigError::Missing {
                    setting: "STAGER_TLS_KEY",
                    hint: "set together with STAGER_TLS_CERT",
                });
            }
            (None, Some(_)) => {
                return Err(ConfigError::Missing {
                    setting: "STAGER_TLS_CERT",
                    hint: "set together with STAGER_TLS_KEY",
                });
            }
            (Some(cert), Some(key)) => Self {
                cert: cert.into(),
                key: key.into(),
                client_ca: client_ca.map(PathBuf::from),
            },
        };
        // Load everything now so that a bad file stops start-up, naming its setting.
        settings.server_config()?;
        Ok(Some(settings))
    }

    /// The rustls configuration these settings describe.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, ConfigError> {
        tailor::tls::install_crypto_provider();
        let certs = load_certs("STAGER_TLS_CERT", &self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| ConfigError::Invalid {
            setting: "STAGER_TLS_KEY",
            problem: format!("{}: no usable PEM private key ({e})", self.key.display()),
        })?;
        let builder = rustls::ServerConfig::builder();
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in load_certs("STAGER_TLS_CLIENT_CA", path)? {
                    roots.add(cert).map_err(|e| ConfigError::Invalid {
                        setting: "STAGER_TLS_CLIENT_CA",
                        problem: format!("{}: {e}", path.display()),
                    })?;
                }
                // Certificates are optional at the handshake: callers may use a bearer token instead.
                let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| ConfigError::Invalid {
                        setting: "STAGER_TLS_CLIENT_CA",
                        problem: e.to_string(),
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        builder
            .with_single_cert(certs, key)
            .map_err(|e| ConfigError::Invalid {
                setting: "STAGER_TLS_CERT",
                problem: format!("certificate and key do not fit: {e}"),
            })
    }
}

fn load_certs(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ConfigError::Invalid {
            setting,
            problem: format!("{}: {e}", path.display()),
        })?;
    if certs.is_empty() {
        return Err(ConfigError::Invalid {
            setting,
            problem: format!("{}: no PEM certificate in it", path.display()),
        });
    }
    Ok(certs)
}

/// `on_connect` hook: remembers whether the client presented a verified certificate.
pub fn record_client_certificate(connection: &dyn std::any::Any, data: &mut Extensions) {
    if let Some(stream) = connection
        .downcast_ref::<actix_tls::accept::rustls_0_23::TlsStream<actix_web::rt::net::TcpStream>>()
    {
        let (_, session) = stream.get_ref();
        if session
            .peer_certificates()
            .is_some_and(|certs| !certs.is_empty())
        {
            data.insert(VerifiedClientCertificate);
        }
    }
}
