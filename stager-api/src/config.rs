//! stager-api's own settings on top of [`tailor::config::TailorSettings`].

use std::net::SocketAddr;

use tailor::config::{ConfigError, Secret, TailorSettings};
use tailor::staging::worker::WorkerSettings;

/// Shortest API token accepted: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, Clone)]
pub struct StagerSettings {
    pub tailor: TailorSettings,
    /// `STAGER_LISTEN`: address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// `STAGER_API_TOKENS`: comma-separated bearer tokens callers must present.
    pub api_tokens: Vec<Secret>,
    /// `STAGER_WORKERS`: workers run inside this process (0: only `tailor work` processes copy).
    pub workers: usize,
    /// `TAILOR_CREDENTIALS_KEY`: encrypts private-image credentials at rest.
    pub credentials_key: Option<tailor::secrets::CredentialsKey>,
    /// `STAGER_TLS_CERT` / `STAGER_TLS_KEY` / `STAGER_TLS_CLIENT_CA`: HTTPS, optionally mutual.
    pub tls: Option<crate::tls::TlsSettings>,
    /// The in-process workers' settings (`TAILOR_LEASE_SECONDS`, `TAILOR_POLL_SECONDS`, ...),
    /// from the same deployment settings; their registries' TLS roots are checked too. Their
    /// egress policy does not yet protect this process's own listener: `serve` sets it to
    /// [`StagerSettings::egress_policy`] once it has bound.
    pub worker: WorkerSettings,
    /// The size of the one pool the API and the in-process workers share
    /// (`TAILOR_DATABASE_CONNECTIONS`, 8 by default).
    pub connections: u32,
}

/// What [`StagerSettings::new`] is made from: the settings read directly, before what they imply
/// is derived and checked.
pub struct Parts {
    pub tailor: TailorSettings,
    pub listen: SocketAddr,
    pub api_tokens: Vec<Secret>,
    pub workers: usize,
    pub credentials_key: Option<tailor::secrets::CredentialsKey>,
    pub tls: Option<crate::tls::TlsSettings>,
}

impl StagerSettings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The egress policy for this process: the deployment's, with its own listener protected.
    pub fn egress_policy(&self, bound: SocketAddr) -> tailor::egress::EgressPolicy {
        self.tailor.egress_policy().protect(
            tailor::egress::Protected::OwnListener,
            &bound.ip().to_string(),
            bound.port(),
        )
    }

    /// Everything `serve` needs, from the variables `lookup` answers: a value that parses
    /// here is one `serve` accepts (`check-config` is this and nothing more).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let parts = Parts {
            tailor: TailorSettings::from_lookup(&lookup)?,
            listen: parse_listen(lookup("STAGER_LISTEN").as_deref())?,
            api_tokens: parse_tokens(lookup("STAGER_API_TOKENS").as_deref())?,
            workers: parse_count("STAGER_WORKERS", lookup("STAGER_WORKERS").as_deref(), 2)?,
            credentials_key: tailor::secrets::CredentialsKey::from_lookup(&lookup)?,
            tls: crate::tls::TlsSettings::from_lookup(&lookup)?,
        };
        Self::new(parts, lookup)
    }

    /// Derives what `parts` imply (the workers' settings, with the tunables `lookup` answers;
    /// the pool's size) and checks it.
    pub fn new(parts: Parts, lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let worker =
            WorkerSettings::from_settings(&parts.tailor, parts.credentials_key.clone(), lookup)?;
        worker.registries()?;
        // One pool for the API and the in-process workers (whose LISTEN connection is one of
        // them): its size does not grow with workers or blob transfers.
        let connections = parts.tailor.database_pool(8, parts.workers > 0)?;
        Ok(Self {
            tailor: parts.tailor,
            listen: parts.listen,
            api_tokens: parts.api_tokens,
            workers: parts.workers,
            credentials_key: parts.credentials_key,
            tls: parts.tls,
            worker,
            connections,
        })
    }
}

/// A count setting such as `STAGER_WORKERS` (0 to 256).
pub fn parse_count(
    setting: &'static str,
    value: Option<&str>,
    default: usize,
) -> Result<usize, ConfigError> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| *n <= 256)
            .ok_or_else(|| ConfigError::Invalid {
                setting,
                problem: format!("{text:?} is not a whole number from 0 to 256"),
            }),
    }
}

/// `STAGER_LISTEN`, defaulting to loopback so nothing is exposed by accident.
pub fn parse_listen(value: Option<&str>) -> Result<SocketAddr, ConfigError> {
    let value = value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .unwrap_or("127.0.0.1:8080");
    value.parse().map_err(|_| ConfigError::Invalid {
        setting: "STAGER_LISTEN",
        problem: format!("{value:?} is not an IP:port address such as 0.0.0.0:8080"),
    })
}

/// `STAGER_API_TOKENS`: at least one token, each at least [`MIN_TOKEN_LEN`] characters.
pub fn parse_tokens(value: Option<&str>) -> Result<Vec<Secret>, ConfigError> {
    let tokens: Vec<&str> = value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if tokens.is_empty() {
        return Err(ConfigError::Missing {
            setting: "STAGER_API_TOKENS",
            hint: "a comma-separated list of bearer tokens, e.g. from `openssl rand -hex 32`",
        });
    }
    if let Some(position) = tokens.iter().position(|t| t.len() < MIN_TOKEN_LEN) {
        return Err(ConfigError::Invalid {
            setting: "STAGER_API_TOKENS",
            // Say which entry without printing it.
            problem: format!(
                "token #{} is shorter than {MIN_TOKEN_LEN} characters",
                position + 1
            ),
        });
    }
    if let Some(bad) = tokens
        .iter()
        .position(|t| !t.chars().all(|c| c.is_ascii_graphic()))
    {
        return Err(ConfigError::Invalid {
            setting: "STAGER_API_TOKENS",
            problem: format!(
                "token #{} contains characters that cannot travel in an HTTP header",
                bad + 1
            ),
        });
    }
    Ok(tokens.into_iter().map(Secret::new).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_defaults_to_loopback() {
        assert_eq!(parse_listen(None).unwrap().to_string(), "127.0.0.1:8080");
        assert_eq!(
            parse_listen(Some("nonsense")).unwrap_err().setting(),
            "STAGER_LISTEN"
        );
    }

    #[test]
    fn tokens_are_required_long_and_never_echoed() {
        assert_eq!(parse_tokens(None).unwrap_err().code(), "CONFIG_MISSING");
        let err = parse_tokens(Some("0123456789abcdef, short-secret")).unwrap_err();
        assert!(err.to_string().contains("#2"), "{err}");
        assert!(!err.to_string().contains("short-secret"), "{err}");
        assert_eq!(
            parse_tokens(Some(" 0123456789abcdef ,fedcba9876543210"))
                .unwrap()
                .len(),
            2
        );
    }
}
