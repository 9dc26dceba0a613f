//! Settings shared by the `tailor` and `stager-api` binaries, read from the environment.
//!
//! Parsing happens once at start-up: a bad or missing value stops the process with a message
//! naming the variable. Secrets (passwords, keys) are held in [`Secret`] so they never appear in
//! `Debug` output or logs.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

use crate::code::Code;

/// A value that must not be printed, wiped from memory when dropped (`secrecy`).
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// What `check-config --probe` found: the configuration itself, or a part that did not answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `setting` names what to look at (`DATABASE_URL`, `TAILOR_INTERNAL_REGISTRY`).
    #[error("{setting}: {detail}")]
    Unanswered {
        setting: &'static str,
        detail: String,
    },
}

/// A configuration problem, naming the setting at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{setting} is required: {hint}")]
    Missing {
        setting: &'static str,
        hint: &'static str,
    },
    #[error("{setting} is invalid: {problem}")]
    Invalid {
        setting: &'static str,
        problem: String,
    },
}

impl ConfigError {
    /// A stable, machine-readable code for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::Missing { .. } => Code::ConfigMissing,
            Self::Invalid { .. } => Code::ConfigInvalid,
        }
    }

    /// The environment variable this error is about.
    pub fn setting(&self) -> &'static str {
        match self {
            Self::Missing { setting, .. } | Self::Invalid { setting, .. } => setting,
        }
    }
}

/// Settings every tailor process needs: where the queue lives and where images go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailorSettings {
    /// `DATABASE_URL`: the PostgreSQL database holding stagings, the queue and the blob index.
    pub database_url: Secret,
    /// `TAILOR_INTERNAL_REGISTRY`: host:port of the internal registry images are copied into.
    pub internal_registry: String,
    /// `TAILOR_INTERNAL_REGISTRY_USER` / `_PASSWORD`: basic credentials for it, if it needs them.
    pub internal_registry_credentials: Option<(String, Secret)>,
    /// `TAILOR_INSECURE_REGISTRIES`: host:port entries spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// `TAILOR_REPO_PREFIX`: repository path under which every app's images land.
    pub repo_prefix: String,
    /// `TAILOR_SOURCE_LOCATIONS`: the OCI layouts (`oci:/DIR`, `s3://BUCKET/PREFIX?endpoint=`)
    /// a staging may name as its image; none by default.
    pub source_locations: crate::staging::location::SourceLocations,
    /// `TAILOR_DEFAULT_REGISTRY`: the registry a reference without a host means.
    pub default_registry: String,
    /// `TAILOR_EGRESS_ALLOW`: exceptions to the egress policy (CIDRs, addresses, names, host:port).
    pub egress_allow: Vec<crate::egress::Rule>,
    /// `TAILOR_EGRESS_DENY`: more destinations tenants may not reach.
    pub egress_deny: Vec<crate::egress::Rule>,
    /// `TAILOR_CA_CERTIFICATES`: PEM certificates trusted besides the system's (read at start-up).
    pub ca_certificates: Vec<u8>,
    /// `TAILOR_STAGING_TIMEOUT`: how long a staging may take, queue time included.
    pub staging_timeout: std::time::Duration,
    /// `TAILOR_DEFAULT_MODE`: `copy` (the default) or `pin`, for a staging whose request names
    /// no mode: whether apps are copied into the internal registry unless they opt out, or
    /// only pinned unless they opt in.
    pub default_mode: crate::staging::Mode,
    /// `TAILOR_REQUEST_TIMEOUT`, `TAILOR_MIN_TRANSFER_RATE`, `TAILOR_MIN_TRANSFER_WINDOW`:
    /// the bounds on what one registry answer may cost.
    pub limits: crate::registry::Limits,
    /// `TAILOR_DATABASE_CONNECTIONS`: this process's pool size (each binary has its default).
    pub database_connections: Option<u32>,
    /// `TAILOR_CALLBACK_TIMEOUT`: one completion callback attempt.
    pub callback_timeout: std::time::Duration,
    /// `TAILOR_CALLBACK_RETRY_FOR`: how long an undelivered callback is retried.
    pub callback_retry_for: std::time::Duration,
}

impl TailorSettings {
    /// Reads the settings from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `lookup`, so tests need not touch the real environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };

        let database_url = get("DATABASE_URL").ok_or(ConfigError::Missing {
            setting: "DATABASE_URL",
            hint: "a PostgreSQL URL such as postgres://tailor@db.internal:5432/tailor",
        })?;
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(ConfigError::Invalid {
                setting: "DATABASE_URL",
                problem: "must start with postgres:// or postgresql://".into(),
            });
        }

        let internal_registry = get("TAILOR_INTERNAL_REGISTRY").ok_or(ConfigError::Missing {
            setting: "TAILOR_INTERNAL_REGISTRY",
            hint: "the internal registry as host:port, e.g. registry.internal:5000",
        })?;
        parse_host_port("TAILOR_INTERNAL_REGISTRY", &internal_registry)?;

        let internal_registry_credentials = match (
            get("TAILOR_INTERNAL_REGISTRY_USER"),
            get("TAILOR_INTERNAL_REGISTRY_PASSWORD"),
        ) {
            (None, None) => None,
            (Some(user), Some(password)) => Some((user, Secret::new(password))),
            (Some(_), None) => {
                return Err(ConfigError::Missing {
                    setting: "TAILOR_INTERNAL_REGISTRY_PASSWORD",
                    hint: "set together with TAILOR_INTERNAL_REGISTRY_USER",
                });
            }
            (None, Some(_)) => {
                return Err(ConfigError::Missing {
                    setting: "TAILOR_INTERNAL_REGISTRY_USER",
                    hint: "set together with TAILOR_INTERNAL_REGISTRY_PASSWORD",
                });
            }
        };

        let insecure_registries = get("TAILOR_INSECURE_REGISTRIES")
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|entry| !entry.is_empty())
                    .map(|entry| {
                        parse_host_port("TAILOR_INSECURE_REGISTRIES", entry)?;
                        Ok(entry.to_owned())
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();

        let repo_prefix = get("TAILOR_REPO_PREFIX").unwrap_or_else(|| "tailor".to_owned());
        validate_repo_prefix(&repo_prefix)?;
        let source_locations = crate::staging::location::SourceLocations::parse(
            &get("TAILOR_SOURCE_LOCATIONS").unwrap_or_default(),
        )
        .map_err(|problem| ConfigError::Invalid {
            setting: "TAILOR_SOURCE_LOCATIONS",
            problem,
        })?;

        let default_registry =
            get("TAILOR_DEFAULT_REGISTRY").unwrap_or_else(|| "docker.io".to_owned());
        if default_registry.contains('/') || default_registry.contains("://") {
            return Err(ConfigError::Invalid {
                setting: "TAILOR_DEFAULT_REGISTRY",
                problem: format!(
                    "{default_registry:?} must be a host or host:port, without scheme or path"
                ),
            });
        }

        let rules = |setting: &'static str| -> Result<Vec<crate::egress::Rule>, ConfigError> {
            get(setting)
                .map(|list| crate::egress::Rule::parse_list(&list))
                .transpose()
                .map_err(|problem| ConfigError::Invalid { setting, problem })
                .map(Option::unwrap_or_default)
        };
        let egress_allow = rules("TAILOR_EGRESS_ALLOW")?;
        let egress_deny = rules("TAILOR_EGRESS_DENY")?;

        let ca_certificates = match get("TAILOR_CA_CERTIFICATES") {
            None => Vec::new(),
            Some(path) => {
                let pem = std::fs::read(&path).map_err(|e| ConfigError::Invalid {
                    setting: "TAILOR_CA_CERTIFICATES",
                    problem: format!("cannot read {path:?}: {e}"),
                })?;
                if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                    return Err(ConfigError::Invalid {
                        setting: "TAILOR_CA_CERTIFICATES",
                        problem: format!("{path:?} holds no PEM certificate"),
                    });
                }
                pem
            }
        };

        let duration = |setting: &'static str, default: u64, min: u64, max: u64| {
            duration_setting(setting, get(setting).as_deref(), default, min, max)
        };
        let staging_timeout = duration("TAILOR_STAGING_TIMEOUT", 15 * 60, 10, 24 * 3600)?;
        let default_mode = get("TAILOR_DEFAULT_MODE")
            .map(|text| crate::staging::Mode::parse(&text))
            .transpose()
            .map_err(|problem| ConfigError::Invalid {
                setting: "TAILOR_DEFAULT_MODE",
                problem,
            })?
            .unwrap_or_default();
        let mut limits = crate::registry::Limits {
            request_timeout: duration("TAILOR_REQUEST_TIMEOUT", 60, 1, 3600)?,
            ..Default::default()
        };
        limits.floor.window = duration("TAILOR_MIN_TRANSFER_WINDOW", 30, 1, 3600)?;
        if let Some(text) = get("TAILOR_MIN_TRANSFER_RATE") {
            limits.floor.min_bytes_per_second = parse_byte_rate(&text).ok_or_else(|| {
                ConfigError::Invalid {
                    setting: "TAILOR_MIN_TRANSFER_RATE",
                    problem: format!(
                        "{text:?} is not a rate in bytes per second such as 16384, 16KiB or 0 (no floor)"
                    ),
                }
            })?;
        }
        let database_connections = match get("TAILOR_DATABASE_CONNECTIONS") {
            None => None,
            Some(text) => Some(
                text.parse::<u32>()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| ConfigError::Invalid {
                        setting: "TAILOR_DATABASE_CONNECTIONS",
                        problem: format!("{text:?} is not a whole number from 1 to 1000"),
                    })?,
            ),
        };
        let callback_timeout = duration("TAILOR_CALLBACK_TIMEOUT", 10, 1, 600)?;
        let callback_retry_for = duration("TAILOR_CALLBACK_RETRY_FOR", 24 * 3600, 60, 30 * 86_400)?;

        Ok(Self {
            database_url: Secret::new(database_url),
            internal_registry,
            internal_registry_credentials,
            insecure_registries,
            repo_prefix,
            source_locations,
            default_registry,
            egress_allow,
            egress_deny,
            ca_certificates,
            staging_timeout,
            default_mode,
            limits,
            database_connections,
            callback_timeout,
            callback_retry_for,
        })
    }

    /// This process's pool size: `TAILOR_DATABASE_CONNECTIONS`, or the binary's `default`. A
    /// process that runs workers keeps one connection for LISTEN, so it needs at least 2.
    pub fn database_pool(&self, default: u32, runs_workers: bool) -> Result<u32, ConfigError> {
        let size = self.database_connections.unwrap_or(default);
        if runs_workers && size < 2 {
            return Err(ConfigError::Invalid {
                setting: "TAILOR_DATABASE_CONNECTIONS",
                problem: format!(
                    "{size} is too few for a process that runs workers: one connection is kept for LISTEN, so at least 2"
                ),
            });
        }
        Ok(size)
    }

    /// Whether the internal registry is spoken to over plain HTTP.
    pub fn internal_registry_insecure(&self) -> bool {
        self.insecure_registries.contains(&self.internal_registry)
    }

    /// The egress policy for tenants' destinations: the operator's rules, with the internal
    /// registry and the database protected. A process adds its own listeners.
    pub fn egress_policy(&self) -> crate::egress::EgressPolicy {
        let internal_port = if self.internal_registry_insecure() {
            80
        } else {
            443
        };
        crate::egress::EgressPolicy::new(self.egress_allow.clone(), self.egress_deny.clone())
            .protect_host_port(
                crate::egress::Protected::InternalRegistry,
                &self.internal_registry,
                internal_port,
            )
            .protect_database(self.database_url.expose())
    }

    /// `check-config --probe`: the database answers a query and the internal registry its API
    /// root. `answered` is told of each part that answered, in turn ("database", "internal
    /// registry host:port"); the first that does not is the error, naming its setting.
    pub async fn probe(&self, mut answered: impl FnMut(&str)) -> Result<(), ProbeError> {
        let unanswered = |setting, detail| ProbeError::Unanswered { setting, detail };
        let pool = crate::db::connect(self.database_url.expose(), 1)
            .await
            .map_err(|e| unanswered("DATABASE_URL", format!("{e} ({})", e.code())))?;
        sqlx::query_scalar!(r#"SELECT 1 AS "one!""#)
            .fetch_one(&pool)
            .await
            .map_err(|e| {
                unanswered("DATABASE_URL", format!("the database does not answer: {e}"))
            })?;
        answered("database");
        let registries = self.registries(crate::egress::Egress::unrestricted())?;
        let credentials = self
            .internal_registry_credentials
            .as_ref()
            .map(|(user, password)| {
                crate::registry::Credentials::new(user.clone(), password.expose())
            });
        registries
            .internal(&self.internal_registry, credentials)
            .ping()
            .await
            .map_err(|e| unanswered("TAILOR_INTERNAL_REGISTRY", format!("{e} ({})", e.code())))?;
        answered(&format!("internal registry {}", self.internal_registry));
        Ok(())
    }

    /// How this process reaches registries, under `egress`.
    pub fn registries(
        &self,
        egress: std::sync::Arc<crate::egress::Egress>,
    ) -> Result<crate::registry::Registries, ConfigError> {
        crate::registry::Registries::new(
            self.insecure_registries.iter().cloned(),
            egress,
            self.limits.clone(),
            &self.ca_certificates,
        )
        .map_err(|e| ConfigError::Invalid {
            setting: "TAILOR_CA_CERTIFICATES",
            problem: e.to_string(),
        })
    }
}

/// A duration setting (`90s`, `15m`, `24h`, or plain seconds) within `min..=max` seconds.
pub fn duration_setting(
    setting: &'static str,
    value: Option<&str>,
    default_secs: u64,
    min_secs: u64,
    max_secs: u64,
) -> Result<std::time::Duration, ConfigError> {
    let Some(text) = value.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(std::time::Duration::from_secs(default_secs));
    };
    let parsed = match text.parse::<u64>() {
        Ok(seconds) => Ok(std::time::Duration::from_secs(seconds)),
        Err(_) => crate::prune::duration::parse_duration(text),
    };
    parsed
        .ok()
        .filter(|d| (min_secs..=max_secs).contains(&d.as_secs()))
        .ok_or_else(|| ConfigError::Invalid {
            setting,
            problem: format!(
                "{text:?} is not a duration from {min_secs}s to {max_secs}s (e.g. 90s, 15m, 2h)"
            ),
        })
}

/// `16384`, `16KiB`, `1MiB`, `0`: bytes per second.
fn parse_byte_rate(text: &str) -> Option<u64> {
    let text = text.trim().trim_end_matches("/s");
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, ""),
    };
    let multiplier = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" | "kB" | "KB" => 1024,
        "MiB" | "M" | "MB" => 1024 * 1024,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(multiplier)
}

/// Checks `host:port` (or a bare host) and returns the port if one is given.
pub fn parse_host_port(setting: &'static str, value: &str) -> Result<Option<u16>, ConfigError> {
    let invalid = |problem: String| ConfigError::Invalid { setting, problem };
    if let Some((scheme, rest)) = value.split_once("://") {
        return Err(invalid(format!(
            "{value:?} is a URL; write host:port ({:?}): whether tailor speaks HTTP or HTTPS to a \
             registry is what TAILOR_INSECURE_REGISTRIES says, not a {scheme}:// prefix",
            rest.trim_end_matches('/')
        )));
    }
    if value.contains('/') {
        return Err(invalid(format!(
            "{value:?} must be host:port, without a path"
        )));
    }
    let (host, port) = match value.rsplit_once(':') {
        Some((host, port)) => {
            let port: u16 = port
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid(format!("{value:?} has an invalid port {port:?}")))?;
            (host, Some(port))
        }
        None => (value, None),
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
    if !host_ok {
        return Err(invalid(format!("{value:?} has an invalid host {host:?}")));
    }
    Ok(port)
}

fn validate_repo_prefix(prefix: &str) -> Result<(), ConfigError> {
    // The OCI distribution spec's path component grammar: [a-z0-9]+ with ., _, __, - between.
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.chars().all(|ch| {
                ch.is_ascii_lowercase() || ch.is_ascii_digit() || matches!(ch, '.' | '_' | '-')
            })
            && c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
            && c.ends_with(|ch: char| ch.is_ascii_alphanumeric())
    };
    if prefix.split('/').all(component_ok) {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            setting: "TAILOR_REPO_PREFIX",
            problem: format!(
                "{prefix:?} must be lowercase repository path components ([a-z0-9] with . _ - inside), separated by /"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(pairs: &[(&str, &str)]) -> Result<TailorSettings, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TailorSettings::from_lookup(|name| map.get(name).cloned())
    }

    const BASE: [(&str, &str); 2] = [
        ("DATABASE_URL", "postgres://u:p@127.0.0.1:5432/db"),
        ("TAILOR_INTERNAL_REGISTRY", "127.0.0.1:5000"),
    ];

    #[test]
    fn defaults_apply_when_only_required_settings_are_given() {
        let s = settings(&BASE).unwrap();
        assert_eq!(s.repo_prefix, "tailor");
        assert_eq!(s.default_registry, "docker.io");
        assert!(s.insecure_registries.is_empty());
        assert_eq!(s.internal_registry_credentials, None);
        assert!(s.egress_allow.is_empty());
        assert_eq!(s.staging_timeout, std::time::Duration::from_secs(900));
        assert_eq!(s.default_mode, crate::staging::Mode::Copy);
        assert_eq!(s.limits.floor.min_bytes_per_second, 16 * 1024);
        assert_eq!(s.callback_retry_for, std::time::Duration::from_secs(86_400));
    }

    #[test]
    fn durations_rates_and_egress_rules_are_parsed_and_checked() {
        let mut pairs = BASE.to_vec();
        pairs.extend([
            ("TAILOR_STAGING_TIMEOUT", "30m"),
            ("TAILOR_REQUEST_TIMEOUT", "5"),
            ("TAILOR_MIN_TRANSFER_RATE", "1KiB"),
            ("TAILOR_EGRESS_ALLOW", "10.0.0.0/8, registry.local:5000"),
            ("TAILOR_DEFAULT_MODE", "pin"),
        ]);
        let s = settings(&pairs).unwrap();
        assert_eq!(s.default_mode, crate::staging::Mode::Pin);
        assert_eq!(s.staging_timeout, std::time::Duration::from_secs(1800));
        assert_eq!(s.limits.request_timeout, std::time::Duration::from_secs(5));
        assert_eq!(s.limits.floor.min_bytes_per_second, 1024);
        assert_eq!(s.egress_allow.len(), 2);
        for (setting, value) in [
            ("TAILOR_STAGING_TIMEOUT", "1s"),
            ("TAILOR_MIN_TRANSFER_RATE", "fast"),
            ("TAILOR_EGRESS_ALLOW", "http://x"),
            ("TAILOR_DATABASE_CONNECTIONS", "0"),
            ("TAILOR_DEFAULT_MODE", "mirror"),
            ("TAILOR_CA_CERTIFICATES", "/no/such/file"),
        ] {
            let mut pairs = BASE.to_vec();
            pairs.push((setting, value));
            assert_eq!(
                settings(&pairs).unwrap_err().setting(),
                setting,
                "{setting}={value}"
            );
        }
    }

    #[test]
    fn missing_database_url_names_the_setting() {
        let err = settings(&BASE[1..]).unwrap_err();
        assert_eq!(err.setting(), "DATABASE_URL");
        assert_eq!(err.code(), "CONFIG_MISSING");
    }

    #[test]
    fn insecure_registries_are_split_and_validated() {
        let mut pairs = BASE.to_vec();
        pairs.push((
            "TAILOR_INSECURE_REGISTRIES",
            " 127.0.0.1:5000, localhost:5001 ,",
        ));
        assert_eq!(
            settings(&pairs).unwrap().insecure_registries,
            ["127.0.0.1:5000", "localhost:5001"]
        );

        pairs.pop();
        pairs.push(("TAILOR_INSECURE_REGISTRIES", "http://127.0.0.1:5000"));
        let err = settings(&pairs).unwrap_err();
        assert_eq!(err.setting(), "TAILOR_INSECURE_REGISTRIES");
    }

    #[test]
    fn a_user_without_a_password_is_refused() {
        let mut pairs = BASE.to_vec();
        pairs.push(("TAILOR_INTERNAL_REGISTRY_USER", "tailor"));
        assert_eq!(
            settings(&pairs).unwrap_err().setting(),
            "TAILOR_INTERNAL_REGISTRY_PASSWORD"
        );
    }

    #[test]
    fn bad_ports_and_prefixes_are_refused() {
        for (setting, value) in [
            ("TAILOR_INTERNAL_REGISTRY", "127.0.0.1:99999"),
            ("TAILOR_INTERNAL_REGISTRY", "127.0.0.1:0"),
            ("TAILOR_REPO_PREFIX", "Upper/case"),
            ("TAILOR_REPO_PREFIX", "trailing/"),
        ] {
            let mut pairs: Vec<_> = BASE
                .iter()
                .copied()
                .filter(|(k, _)| *k != setting)
                .collect();
            pairs.push((setting, value));
            assert_eq!(
                settings(&pairs).unwrap_err().setting(),
                setting,
                "{setting}={value}"
            );
        }
    }

    #[test]
    fn secrets_do_not_leak_through_debug() {
        let mut pairs = BASE.to_vec();
        pairs.push(("TAILOR_INTERNAL_REGISTRY_USER", "tailor"));
        pairs.push(("TAILOR_INTERNAL_REGISTRY_PASSWORD", "hunter2"));
        let debug = format!("{:?}", settings(&pairs).unwrap());
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(!debug.contains("u:p@"), "{debug}");
    }
}
