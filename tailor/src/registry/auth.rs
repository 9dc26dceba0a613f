//! Registry authentication: credentials, the `WWW-Authenticate` challenge, and bearer tokens
//! cached per scope until they expire.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::config::Secret;

/// A user name and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, ***)", self.username)
    }
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: Secret::new(password),
        }
    }
}

/// What a registry asked for in its 401 challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` value such as
/// `Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a:pull,push"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, params) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(params);
    let realm = params.get("realm")?.clone();
    Some(Challenge::Bearer {
        realm,
        service: params.get("service").cloned(),
    })
}

/// `key="value", key2=value2` with commas allowed inside quotes.
fn parse_params(input: &str) -> HashMap<String, String> {
    let mut params = HashMap::new();
    let mut rest = input.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        params.insert(key, value.to_owned());
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    params
}

/// One access a request needs: `repository:<name>:<actions>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    pub repository: String,
    pub actions: &'static str,
}

impl Scope {
    pub fn pull(repository: &str) -> Self {
        Self {
            repository: repository.to_owned(),
            actions: "pull",
        }
    }

    pub fn push(repository: &str) -> Self {
        Self {
            repository: repository.to_owned(),
            actions: "pull,push",
        }
    }

    /// Deleting manifests (the pruner).
    pub fn delete(repository: &str) -> Self {
        Self {
            repository: repository.to_owned(),
            actions: "delete",
        }
    }

    pub fn as_param(&self) -> String {
        format!("repository:{}:{}", self.repository, self.actions)
    }
}

/// The key a set of scopes is cached under.
pub fn scope_key(scopes: &[Scope]) -> String {
    let mut params: Vec<String> = scopes.iter().map(Scope::as_param).collect();
    params.sort();
    params.dedup();
    params.join(" ")
}

/// What we have learned about a registry's authentication so far.
#[derive(Debug, Default)]
pub struct AuthState {
    pub challenge: Option<Challenge>,
    tokens: HashMap<String, (Secret, Instant)>,
}

impl AuthState {
    /// A cached token for `key` that is still valid.
    pub fn token(&self, key: &str) -> Option<&Secret> {
        self.tokens
            .get(key)
            .filter(|(_, expires)| Instant::now() < *expires)
            .map(|(token, _)| token)
    }

    /// Caches `token` for `key`, refreshing a little before the registry would reject it.
    pub fn store(&mut self, key: String, token: Secret, lifetime: Duration) {
        let margin = (lifetime / 10).clamp(Duration::from_secs(1), Duration::from_secs(30));
        self.tokens.insert(
            key,
            (token, Instant::now() + lifetime.saturating_sub(margin)),
        );
    }

    pub fn forget(&mut self, key: &str) {
        self.tokens.remove(key);
    }
}

/// The JSON a token service answers with.
#[derive(Debug, serde::Deserialize)]
pub struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
    pub expires_in: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_style_challenges() {
        let header = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/redis:pull,push""#;
        assert_eq!(
            parse_challenge(header),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into())
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge("Bearer service=\"x\""),
            None,
            "a bearer challenge needs a realm"
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
    }

    #[test]
    fn tokens_expire_and_keys_ignore_order() {
        let a = [Scope::push("dst"), Scope::pull("src")];
        let b = [Scope::pull("src"), Scope::push("dst")];
        assert_eq!(scope_key(&a), scope_key(&b));
        let mut state = AuthState::default();
        state.store("k".into(), Secret::new("t"), Duration::from_secs(300));
        assert!(state.token("k").is_some());
        state.store("k".into(), Secret::new("t"), Duration::ZERO);
        assert!(state.token("k").is_none());
    }

    #[test]
    fn credentials_debug_hides_the_password() {
        let debug = format!("{:?}", Credentials::new("user", "hunter2"));
        assert!(!debug.contains("hunter2"));
    }
}
