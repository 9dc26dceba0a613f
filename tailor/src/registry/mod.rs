//! A client for one registry's distribution API: authentication (anonymous, basic, the bearer
//! challenge flow with tokens cached per scope), and retries with backoff for connection
//! errors, 408, 429 (honouring `Retry-After`) and 5xx.
//!
//! Built directly on reqwest because the copy engine needs what `oci-client` does not offer:
//! retries, a mount answered with 202, single streaming PUT uploads and cancelling an upload
//! session. `oci-client`'s manifest types are still what manifests are parsed into.

pub mod auth;
pub mod retry;

use std::time::Duration;

use reqwest::header::WWW_AUTHENTICATE;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use tokio::sync::Mutex;

use auth::{AuthState, Challenge, TokenResponse, scope_key};
pub use auth::{Credentials, Scope};
pub use retry::RetryPolicy;

use crate::config::Secret;
use crate::error::{CopyError, Side};

/// Longest an error body is read, to quote it in messages.
const ERROR_BODY_LIMIT: usize = 4096;

/// One registry, as seen from one side of a copy.
pub struct RegistryClient {
    /// The registry's name in references (for messages).
    name: String,
    /// `http(s)://host:port`.
    base_url: String,
    side: Side,
    http: reqwest::Client,
    credentials: Option<Credentials>,
    auth: Mutex<AuthState>,
    retry: RetryPolicy,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .finish()
    }
}

impl RegistryClient {
    /// `endpoint` is the API host:port; plain HTTP only when `insecure`.
    pub fn new(
        name: &str,
        endpoint: &str,
        insecure: bool,
        side: Side,
        http: reqwest::Client,
        credentials: Option<Credentials>,
        retry: RetryPolicy,
    ) -> Self {
        let scheme = if insecure { "http" } else { "https" };
        Self {
            name: name.to_owned(),
            base_url: format!("{scheme}://{endpoint}"),
            side,
            http,
            credentials,
            auth: Mutex::new(AuthState::default()),
            retry,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// An absolute URL for `path` (which starts with `/v2/`), or `path` itself when absolute
    /// (upload locations may be either).
    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base_url)
        }
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, self.url(path))
    }

    /// Sends a request built by `make` (called again for every try), authenticating for
    /// `scopes` and retrying transient failures. Returns the final response whatever its status,
    /// except that exhausted retries and authentication failures become errors.
    pub async fn send(
        &self,
        scopes: &[Scope],
        make: impl Fn() -> RequestBuilder,
    ) -> Result<Response, CopyError> {
        let mut attempt = 0;
        let mut reauthenticated = false;
        loop {
            let request = self.authorize(make(), scopes).await?;
            match request.send().await {
                Err(error) if attempt + 1 < self.retry.max_attempts && is_transient(&error) => {
                    tracing::debug!(registry = %self.name, attempt, error = %error, "retrying after a transport error");
                }
                Err(error) => return Err(self.transport_error(&error)),
                Ok(response)
                    if response.status() == StatusCode::UNAUTHORIZED && !reauthenticated =>
                {
                    reauthenticated = true;
                    self.handle_challenge(&response, scopes).await?;
                    continue;
                }
                Ok(response)
                    if retry::is_retryable_status(response.status())
                        && attempt + 1 < self.retry.max_attempts =>
                {
                    let wait = match retry::retry_after(response.headers()) {
                        Some(wait) if wait <= self.retry.max_retry_after => wait,
                        Some(_) => return Err(self.status_error(response, "").await),
                        None => self.retry.backoff(attempt),
                    };
                    tracing::info!(registry = %self.name, status = %response.status(), wait_ms = wait.as_millis() as u64, "registry asked us to retry");
                    attempt += 1;
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Ok(response) => return Ok(response),
            }
            tokio::time::sleep(self.retry.backoff(attempt)).await;
            attempt += 1;
        }
    }

    /// Sends a request once, with the authentication already established for `scopes` (for
    /// streaming bodies that cannot be replayed).
    pub async fn send_once(
        &self,
        scopes: &[Scope],
        request: RequestBuilder,
    ) -> Result<Response, CopyError> {
        let request = self.authorize(request, scopes).await?;
        request.send().await.map_err(|e| self.transport_error(&e))
    }

    /// Adds what we know the registry wants: basic credentials, or a bearer token for `scopes`
    /// (fetched now if the registry is known to want one and none is cached).
    async fn authorize(
        &self,
        request: RequestBuilder,
        scopes: &[Scope],
    ) -> Result<RequestBuilder, CopyError> {
        let mut state = self.auth.lock().await;
        match state.challenge.clone() {
            None => Ok(request),
            Some(Challenge::Basic) => Ok(match &self.credentials {
                Some(c) => request.basic_auth(&c.username, Some(c.password.expose())),
                None => request,
            }),
            Some(Challenge::Bearer { realm, service }) => {
                let key = scope_key(scopes);
                if state.token(&key).is_none() {
                    let (token, lifetime) =
                        self.fetch_token(&realm, service.as_deref(), scopes).await?;
                    state.store(key.clone(), token, lifetime);
                }
                let token = state.token(&key).expect("just stored");
                Ok(request.bearer_auth(token.expose()))
            }
        }
    }

    async fn handle_challenge(
        &self,
        response: &Response,
        scopes: &[Scope],
    ) -> Result<(), CopyError> {
        let challenge = response
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(auth::parse_challenge);
        let mut state = self.auth.lock().await;
        match challenge {
            Some(Challenge::Basic) if self.credentials.is_none() => {
                Err(self.unauthorized("credentials are required"))
            }
            Some(Challenge::Basic) if state.challenge == Some(Challenge::Basic) => {
                Err(self.unauthorized("the registry rejected the credentials"))
            }
            Some(challenge @ Challenge::Bearer { .. })
                if state.challenge.as_ref() == Some(&challenge) =>
            {
                // A token we just presented was refused: drop it and fetch one fresh token.
                state.forget(&scope_key(scopes));
                Ok(())
            }
            Some(challenge) => {
                state.challenge = Some(challenge);
                Ok(())
            }
            None => Err(self.unauthorized("the registry answered 401 without a usable challenge")),
        }
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scopes: &[Scope],
    ) -> Result<(Secret, Duration), CopyError> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(service) = service {
            query.push(("service", service.to_owned()));
        }
        for scope in scopes {
            query.push(("scope", scope.as_param()));
        }
        let mut attempt = 0;
        let response = loop {
            let mut request = self.http.get(realm).query(&query);
            if let Some(c) = &self.credentials {
                request = request.basic_auth(&c.username, Some(c.password.expose()));
            }
            match request.send().await {
                Ok(r)
                    if retry::is_retryable_status(r.status())
                        && attempt + 1 < self.retry.max_attempts => {}
                Ok(r) => break r,
                Err(e) if is_transient(&e) && attempt + 1 < self.retry.max_attempts => {}
                Err(e) => return Err(self.transport_error(&e)),
            }
            tokio::time::sleep(self.retry.backoff(attempt)).await;
            attempt += 1;
        };
        match response.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(self.unauthorized("the token service rejected the credentials"));
            }
            StatusCode::TOO_MANY_REQUESTS => {
                return Err(CopyError::RateLimited {
                    registry: self.name.clone(),
                });
            }
            status => {
                return Err(self.unauthorized(&format!("the token service answered {status}")));
            }
        }
        let body: TokenResponse = response.json().await.map_err(|_| {
            self.unauthorized("the token service answered something that is not a token")
        })?;
        let token = body
            .token
            .or(body.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.unauthorized("the token service answered without a token"))?;
        // The distribution spec's default lifetime when none is given.
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(60).max(1));
        Ok((Secret::new(token), lifetime))
    }

    fn unauthorized(&self, detail: &str) -> CopyError {
        match self.side {
            Side::Source => CopyError::Unauthorized {
                registry: self.name.clone(),
                detail: detail.to_owned(),
            },
            Side::Destination => CopyError::InternalRegistry {
                registry: self.name.clone(),
                detail: format!("authentication failed: {detail}"),
            },
        }
    }

    /// Maps a transport failure (no HTTP response) to an error.
    pub fn transport_error(&self, error: &reqwest::Error) -> CopyError {
        let detail = describe_transport_error(error);
        match self.side {
            _ if error.is_timeout() => CopyError::Timeout {
                registry: self.name.clone(),
                detail,
            },
            Side::Source => CopyError::UpstreamUnreachable {
                registry: self.name.clone(),
                detail,
            },
            Side::Destination => CopyError::InternalRegistry {
                registry: self.name.clone(),
                detail,
            },
        }
    }

    /// Maps an unexpected response to an error, quoting the registry's own error message.
    /// `what` names the object for 404s ("manifest library/redis:7").
    pub async fn status_error(&self, response: Response, what: &str) -> CopyError {
        let status = response.status();
        let body = read_limited(response, ERROR_BODY_LIMIT).await;
        let detail = registry_error_message(&body).unwrap_or_else(|| format!("HTTP {status}"));
        let name = self.name.clone();
        match (self.side, status) {
            (Side::Source, StatusCode::NOT_FOUND) => {
                CopyError::ImageNotFound(format!("{what} on {name}: {detail}"))
            }
            (Side::Source, StatusCode::UNAUTHORIZED) => CopyError::Unauthorized {
                registry: name,
                detail,
            },
            (Side::Source, StatusCode::FORBIDDEN) => CopyError::Denied {
                registry: name,
                detail,
            },
            (_, StatusCode::TOO_MANY_REQUESTS) => CopyError::RateLimited { registry: name },
            (Side::Source, s) if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => {
                CopyError::UpstreamUnreachable {
                    registry: name,
                    detail: format!("{what}: {detail}"),
                }
            }
            (Side::Source, _) => CopyError::UpstreamUnreachable {
                registry: name,
                detail: format!("{what}: unexpected {detail}"),
            },
            // Distribution unregisters its write handlers in read-only mode: the garbage
            // collection window (scripts/registry-gc).
            (Side::Destination, StatusCode::METHOD_NOT_ALLOWED) => {
                CopyError::ReadOnly { registry: name }
            }
            (Side::Destination, _) => CopyError::InternalRegistry {
                registry: name,
                detail: format!("{what}: {detail}"),
            },
        }
    }
}

fn is_transient(error: &reqwest::Error) -> bool {
    error.is_connect() || error.is_timeout() || (error.is_request() && !error.is_builder())
}

fn describe_transport_error(error: &reqwest::Error) -> String {
    // reqwest's Display includes the URL, which never carries credentials here; keep the chain
    // of causes short and human.
    let mut text = if error.is_connect() {
        "connection failed".to_owned()
    } else if error.is_timeout() {
        "timed out".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(error);
    if let Some(cause) = source.take() {
        text.push_str(": ");
        text.push_str(&cause.to_string());
    }
    text
}

/// Reads at most `limit` bytes of a body, as text.
pub async fn read_limited(mut response: Response, limit: usize) -> String {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() >= limit {
            body.truncate(limit);
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// The first `errors[].message` of a distribution error body, with its code.
fn registry_error_message(body: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    let first = value.get("errors")?.as_array()?.first()?;
    let code = first.get("code").and_then(|c| c.as_str()).unwrap_or("");
    let message = first.get("message").and_then(|m| m.as_str()).unwrap_or("");
    Some(format!("{code} {message}").trim().to_owned())
}
