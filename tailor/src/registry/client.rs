//! One registry as one party sees it: sending a request with authentication (the 401
//! challenge flow, basic or bearer tokens cached per scope), egress checks on every hop (each
//! hop sent through the client for the addresses its check allowed), redirects followed by
//! hand, the safe retries, deadlines, and the mapping of answers to [`RegistryError`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode, Url};
use tokio::sync::Mutex;

use super::auth::{AuthState, Challenge, Credentials, Scope, TokenResponse, scope_key};
use super::error::RegistryError;
use super::observe::RegistryObserver;
use super::retry::{self, RetryPolicy};
use super::{Limits, Repository};
use crate::config::Secret;
use crate::egress::{ClientError, PolicedClients, find_denial};
use crate::text::{MESSAGE_CHARS, clean};

/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 5;

/// Where a registry is.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// As in references (`docker.io`), for messages and budgets.
    pub name: String,
    /// `host:port` the API is served from.
    pub host: String,
    /// Plain HTTP.
    pub insecure: bool,
}

/// How a registry's requests reach the network.
#[derive(Clone)]
pub(crate) enum Http {
    /// The operator's internal registry: one plain client, no egress policy.
    Trusted(reqwest::Client),
    /// An image source: every destination is checked, and reached through the client built
    /// for the addresses checked.
    Policed(Arc<PolicedClients>),
}

/// One registry, as seen by one party (a staging's source, or tailor's internal registry).
pub struct Registry {
    endpoint: Endpoint,
    base: Url,
    http: Http,
    credentials: Option<Credentials>,
    auth: Mutex<AuthState>,
    limits: Limits,
    retry: RetryPolicy,
    observer: Option<Arc<dyn RegistryObserver>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("name", &self.endpoint.name)
            .field("base", &self.base.as_str())
            .finish()
    }
}

/// What to send; built again for every try.
pub(crate) struct Request<'a> {
    pub method: Method,
    /// `/v2/...` (relative to the registry) or an absolute URL (an upload location).
    pub path: &'a str,
    pub scopes: &'a [Scope],
    pub headers: HeaderMap,
    /// Replayable body.
    pub body: Option<Bytes>,
    /// Total deadline (`None`: only the time to the response's headers is bounded; the body
    /// is governed by the caller, as for blob streams).
    pub total_timeout: bool,
    /// Follow redirects (GET/HEAD of manifests and blobs).
    pub follow_redirects: bool,
}

impl<'a> Request<'a> {
    pub fn new(method: Method, path: &'a str, scopes: &'a [Scope]) -> Self {
        let follow_redirects = matches!(method, Method::GET | Method::HEAD);
        Self {
            method,
            path,
            scopes,
            headers: HeaderMap::new(),
            body: None,
            total_timeout: true,
            follow_redirects,
        }
    }

    pub fn header(mut self, name: reqwest::header::HeaderName, value: &str) -> Self {
        if let Ok(value) = reqwest::header::HeaderValue::from_str(value) {
            self.headers.insert(name, value);
        }
        self
    }

    pub fn body(mut self, body: Bytes) -> Self {
        self.body = Some(body);
        self
    }

    pub fn streaming(mut self) -> Self {
        self.total_timeout = false;
        self
    }

    fn idempotent(&self) -> bool {
        matches!(
            self.method,
            Method::GET | Method::HEAD | Method::PUT | Method::DELETE
        )
    }
}

impl Registry {
    pub(crate) fn new(
        endpoint: Endpoint,
        http: Http,
        credentials: Option<Credentials>,
        limits: Limits,
        retry: RetryPolicy,
        observer: Option<Arc<dyn RegistryObserver>>,
    ) -> Self {
        let scheme = if endpoint.insecure { "http" } else { "https" };
        let base = Url::parse(&format!("{scheme}://{}/", endpoint.host))
            .unwrap_or_else(|_| Url::parse("https://invalid.invalid/").expect("a valid URL"));
        Self {
            endpoint,
            base,
            http,
            credentials,
            auth: Mutex::new(AuthState::default()),
            limits,
            retry,
            observer,
        }
    }

    /// The registry's name in references (for messages).
    pub fn name(&self) -> &str {
        &self.endpoint.name
    }

    /// `host:port` its API is served from.
    pub fn host(&self) -> &str {
        &self.endpoint.host
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Spoken to over plain HTTP.
    pub fn is_insecure(&self) -> bool {
        self.endpoint.insecure
    }

    /// A handle on one repository.
    pub fn repository(self: &Arc<Self>, name: &str) -> Repository {
        Repository::new(self.clone(), name)
    }

    /// `GET /v2/`: whether the registry answers (401 counts: it is up and wants credentials).
    pub async fn ping(&self) -> Result<(), RegistryError> {
        let response = self.send(Request::new(Method::GET, "/v2/", &[])).await?;
        match response.status() {
            s if s.is_success() || s == StatusCode::UNAUTHORIZED => Ok(()),
            _ => Err(self.status_error(response, "the API root /v2/").await),
        }
    }

    /// An absolute URL for `path` (which starts with `/v2/`), or `path` itself when absolute
    /// (upload locations may be either).
    pub(crate) fn url(&self, path: &str) -> Result<Url, RegistryError> {
        self.base
            .join(path)
            .map_err(|e| self.protocol(format!("{:?} is not a usable URL: {e}", clean(path, 200))))
    }

    /// Sends `request`, authenticating for its scopes, checking every destination against the
    /// egress policy, following redirects (to another origin without credentials), and
    /// retrying what is safe. Returns the final response whatever its status.
    pub(crate) async fn send(&self, request: Request<'_>) -> Result<Response, RegistryError> {
        let mut url = self.url(request.path)?;
        let mut redirects = 0;
        let mut tries = 0;
        // With no scopes (the `/v2/` ping) a 401 is an answer, not a challenge to meet.
        let mut reauthenticated = request.scopes.is_empty();
        let mut rate_limit_waits = 0;
        loop {
            let http = self.client_for(&url).await?;
            if let Some(observer) = &self.observer {
                observer.admit(&self.endpoint.name).map_err(|retry_after| {
                    RegistryError::RateLimited {
                        registry: self.endpoint.name.clone(),
                        retry_after: Some(retry_after),
                    }
                })?;
            }
            let same_origin = url.origin() == self.base.origin();
            let mut builder = http
                .request(request.method.clone(), url.clone())
                .headers(request.headers.clone());
            if same_origin {
                builder = self.authorize(builder, request.scopes).await?;
            }
            if let Some(body) = &request.body {
                builder = builder.body(body.clone());
            }
            if request.total_timeout {
                builder = builder.timeout(self.limits.request_timeout);
            }
            let sent = tokio::time::timeout(self.limits.request_timeout, builder.send()).await;
            let no_answer = || RegistryError::Timeout {
                registry: self.endpoint.name.clone(),
                detail: format!(
                    "no answer to {} {} within {}s",
                    request.method,
                    clean(url.path(), 200),
                    self.limits.request_timeout.as_secs()
                ),
            };
            let response = match sent {
                Err(_) => {
                    let error = no_answer();
                    if request.idempotent() && tries + 1 < self.retry.max_attempts {
                        tries += 1;
                        tokio::time::sleep(self.retry.backoff(tries)).await;
                        continue;
                    }
                    return Err(error);
                }
                Ok(Err(error)) => {
                    if worth_retrying(&error)
                        && request.idempotent()
                        && tries + 1 < self.retry.max_attempts
                    {
                        tracing::debug!(registry = %self.endpoint.name, tries, "retrying after a transport error");
                        tries += 1;
                        tokio::time::sleep(self.retry.backoff(tries)).await;
                        continue;
                    }
                    if error.is_timeout() {
                        return Err(no_answer());
                    }
                    return Err(self.transport_error(&error));
                }
                Ok(Ok(response)) => response,
            };
            if let Some(observer) = &self.observer {
                observer.observed(&self.endpoint.name, response.status(), response.headers());
            }
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && same_origin && !reauthenticated {
                reauthenticated = true;
                self.handle_challenge(&response, request.scopes).await?;
                continue;
            }
            if status.is_redirection() && request.follow_redirects {
                if redirects >= MAX_REDIRECTS {
                    return Err(self.protocol(format!(
                        "more than {MAX_REDIRECTS} redirects for {}",
                        request.path
                    )));
                }
                url = self.redirect_target(&url, &response)?;
                redirects += 1;
                continue;
            }
            if status == StatusCode::TOO_MANY_REQUESTS
                && rate_limit_waits < self.retry.rate_limit_waits
                && let Some(wait) = retry::retry_after(response.headers())
                    .or(Some(self.retry.backoff(rate_limit_waits + 1)))
                    .filter(|w| *w <= self.retry.max_retry_after)
            {
                tracing::info!(registry = %self.endpoint.name, wait_s = wait.as_secs(), "rate limited; waiting as asked");
                rate_limit_waits += 1;
                tokio::time::sleep(wait).await;
                continue;
            }
            if retry::is_retryable_status(status)
                && status != StatusCode::TOO_MANY_REQUESTS
                && request.idempotent()
                && tries + 1 < self.retry.max_attempts
            {
                let wait = match retry::retry_after(response.headers()) {
                    // A longer wait is the queue's to schedule, not ours to sleep through.
                    Some(wait) if wait > self.retry.max_delay => return Ok(response),
                    Some(wait) => wait,
                    None => self.retry.backoff(tries + 1),
                };
                tracing::debug!(registry = %self.endpoint.name, %status, tries, "retrying after a server error");
                tries += 1;
                tokio::time::sleep(wait).await;
                continue;
            }
            return Ok(response);
        }
    }

    /// Sends a request whose body is a stream (a blob upload) once, with the authentication
    /// already established for `scopes` by an earlier request of the session. No redirect is
    /// followed and nothing is retried: a stream cannot be replayed.
    pub(crate) async fn send_stream(
        &self,
        method: Method,
        url: Url,
        scopes: &[Scope],
        headers: HeaderMap,
        body: reqwest::Body,
    ) -> Result<Response, RegistryError> {
        let http = self.client_for(&url).await?;
        let mut builder = http.request(method, url.clone()).headers(headers);
        if url.origin() == self.base.origin() {
            builder = self.authorize(builder, scopes).await?;
        }
        builder
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport_error(&e))
    }

    /// The client to send to `url` with: for a source, after the egress policy's check, the
    /// client that connects only to the addresses checked for `url`'s host and port. A
    /// redirect or realm may not downgrade an HTTPS registry to plain HTTP.
    async fn client_for(&self, url: &Url) -> Result<reqwest::Client, RegistryError> {
        if !self.endpoint.insecure && url.scheme() != "https" {
            return Err(self.protocol(format!(
                "refusing to follow {} to plain HTTP from an HTTPS registry",
                clean(url.as_str(), 200)
            )));
        }
        match &self.http {
            Http::Trusted(client) => Ok(client.clone()),
            Http::Policed(clients) => clients.client_for(url).await.map_err(|e| match e {
                ClientError::Denied(denied) => self.denial(denied),
                setup @ ClientError::Setup { .. } => RegistryError::Unreachable {
                    registry: self.endpoint.name.clone(),
                    detail: setup.to_string(),
                },
            }),
        }
    }

    /// A refusal of the egress policy, or a name that does not resolve (not a refusal: the
    /// registry cannot be reached).
    fn denial(&self, denied: crate::egress::EgressDenied) -> RegistryError {
        match denied.reason {
            crate::egress::DenyReason::Unresolvable { detail } => RegistryError::Unreachable {
                registry: self.endpoint.name.clone(),
                detail: format!("the name {} does not resolve ({detail})", denied.target),
            },
            _ => RegistryError::EgressDenied(denied),
        }
    }

    fn redirect_target(&self, from: &Url, response: &Response) -> Result<Url, RegistryError> {
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| self.protocol(format!("{} without a Location", response.status())))?;
        let target = from
            .join(location)
            .map_err(|e| self.protocol(format!("redirect to {:?}: {e}", clean(location, 200))))?;
        if !matches!(target.scheme(), "http" | "https") {
            return Err(self.protocol(format!(
                "redirect to unsupported scheme {:?}",
                clean(target.scheme(), 20)
            )));
        }
        Ok(target)
    }

    /// Adds what we know the registry wants: basic credentials, or a bearer token for
    /// `scopes` (fetched now if the registry is known to want one and none is cached).
    async fn authorize(
        &self,
        builder: reqwest::RequestBuilder,
        scopes: &[Scope],
    ) -> Result<reqwest::RequestBuilder, RegistryError> {
        let mut state = self.auth.lock().await;
        match state.challenge.clone() {
            None => Ok(builder),
            Some(Challenge::Basic) => Ok(match &self.credentials {
                Some(c) => builder.basic_auth(&c.username, Some(c.password.expose())),
                None => builder,
            }),
            Some(Challenge::Bearer { realm, service }) => {
                let key = scope_key(scopes);
                if state.token(&key).is_none() {
                    let (token, lifetime) =
                        self.fetch_token(&realm, service.as_deref(), scopes).await?;
                    state.store(key.clone(), token, lifetime);
                }
                let token = state.token(&key).expect("just stored");
                Ok(builder.bearer_auth(token.expose()))
            }
        }
    }

    async fn handle_challenge(
        &self,
        response: &Response,
        scopes: &[Scope],
    ) -> Result<(), RegistryError> {
        let challenge = response
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(super::auth::parse_challenge);
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
    ) -> Result<(Secret, Duration), RegistryError> {
        let mut url = Url::parse(realm).map_err(|e| {
            self.protocol(format!(
                "token realm {:?} is not a URL: {e}",
                clean(realm, 200)
            ))
        })?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            for scope in scopes {
                query.append_pair("scope", &scope.as_param());
            }
        }
        if !matches!(url.scheme(), "http" | "https") {
            return Err(self.protocol(format!(
                "token realm has unsupported scheme {:?}",
                clean(url.scheme(), 20)
            )));
        }
        // The realm is the registry's choice, so it is checked like any destination, and an
        // HTTPS registry's credentials never travel to a plain-HTTP realm.
        let http = self.client_for(&url).await?;
        let mut tries = 0;
        let response = loop {
            let mut request = http.get(url.clone()).timeout(self.limits.request_timeout);
            if let Some(c) = &self.credentials {
                request = request.basic_auth(&c.username, Some(c.password.expose()));
            }
            match request.send().await {
                Ok(r)
                    if retry::is_retryable_status(r.status())
                        && r.status() != StatusCode::TOO_MANY_REQUESTS
                        && tries + 1 < self.retry.max_attempts => {}
                Ok(r) => break r,
                Err(e) if worth_retrying(&e) && tries + 1 < self.retry.max_attempts => {}
                Err(e) => return Err(self.transport_error(&e)),
            }
            tries += 1;
            tokio::time::sleep(self.retry.backoff(tries)).await;
        };
        if let Some(observer) = &self.observer {
            observer.observed(&self.endpoint.name, response.status(), response.headers());
        }
        match response.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(self.unauthorized("the token service rejected the credentials"));
            }
            StatusCode::TOO_MANY_REQUESTS => {
                return Err(RegistryError::RateLimited {
                    registry: self.endpoint.name.clone(),
                    retry_after: retry::retry_after(response.headers()),
                });
            }
            status => {
                return Err(self.unauthorized(&format!("the token service answered {status}")));
            }
        }
        let body = self
            .read_bounded(
                response,
                self.limits.token_bytes,
                "the token service's answer",
            )
            .await?;
        let body: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
            self.unauthorized("the token service answered something that is not a token")
        })?;
        let token = body
            .token
            .or(body.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.unauthorized("the token service answered without a token"))?;
        // The distribution spec's default lifetime when none is given.
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(60).clamp(1, 24 * 3600));
        Ok((Secret::new(token), lifetime))
    }

    /// Reads a whole body of at most `limit` bytes, refusing a larger one before reading it.
    pub(crate) async fn read_bounded(
        &self,
        mut response: Response,
        limit: u64,
        what: &str,
    ) -> Result<Bytes, RegistryError> {
        let too_large = || RegistryError::TooLarge {
            registry: self.endpoint.name.clone(),
            what: what.to_owned(),
            limit,
        };
        if response.content_length().is_some_and(|l| l > limit) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        let incomplete = |e: reqwest::Error| {
            if e.is_timeout() {
                RegistryError::Timeout {
                    registry: self.endpoint.name.clone(),
                    detail: format!(
                        "{what} did not arrive whole within {}s",
                        self.limits.request_timeout.as_secs()
                    ),
                }
            } else {
                self.transport_error(&e)
            }
        };
        while let Some(chunk) = response.chunk().await.map_err(incomplete)? {
            if body.len() as u64 + chunk.len() as u64 > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(body))
    }

    pub(crate) fn unauthorized(&self, detail: &str) -> RegistryError {
        RegistryError::Unauthorized {
            registry: self.endpoint.name.clone(),
            detail: detail.to_owned(),
        }
    }

    pub(crate) fn protocol(&self, detail: String) -> RegistryError {
        RegistryError::Protocol {
            registry: self.endpoint.name.clone(),
            detail,
        }
    }

    /// Maps a transport failure (no HTTP response) to an error that names its cause.
    pub(crate) fn transport_error(&self, error: &reqwest::Error) -> RegistryError {
        if let Some(denied) = find_denial(error) {
            return self.denial(denied);
        }
        let registry = self.endpoint.name.clone();
        let detail = describe_transport_error(error, self.endpoint.insecure);
        if error.is_timeout() {
            RegistryError::Timeout { registry, detail }
        } else {
            RegistryError::Unreachable { registry, detail }
        }
    }

    /// Maps an unexpected answer to an error, quoting the registry's own (cleaned) error
    /// message. `what` names the object ("manifest library/redis:7").
    pub(crate) async fn status_error(&self, response: Response, what: &str) -> RegistryError {
        let status = response.status();
        let retry_after = retry::retry_after(response.headers());
        let body = self.error_body(response).await;
        let detail = registry_error_message(&body).unwrap_or_else(|| format!("HTTP {status}"));
        let registry = self.endpoint.name.clone();
        match status {
            StatusCode::NOT_FOUND => RegistryError::NotFound {
                registry,
                what: what.to_owned(),
                detail,
            },
            StatusCode::UNAUTHORIZED => RegistryError::Unauthorized { registry, detail },
            StatusCode::FORBIDDEN => RegistryError::Denied { registry, detail },
            // Distribution unregisters its write handlers in read-only mode (the garbage
            // collection window, scripts/registry-gc).
            StatusCode::METHOD_NOT_ALLOWED => RegistryError::ReadOnly { registry },
            StatusCode::TOO_MANY_REQUESTS => RegistryError::RateLimited {
                registry,
                retry_after,
            },
            s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => {
                RegistryError::Unavailable {
                    registry,
                    detail: format!("{what}: {detail}"),
                    retry_after,
                }
            }
            s => RegistryError::Protocol {
                registry,
                detail: format!("{what}: unexpected {s}: {detail}"),
            },
        }
    }

    /// At most `error_body_bytes` of an error body, within a short deadline.
    async fn error_body(&self, mut response: Response) -> Vec<u8> {
        let limit = self.limits.error_body_bytes as usize;
        let mut body = Vec::new();
        let read = async {
            while let Ok(Some(chunk)) = response.chunk().await {
                let room = limit.saturating_sub(body.len());
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if body.len() >= limit {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
        body
    }
}

/// A transport failure in words that say what to check: name resolution, a refused or reset
/// connection, TLS spoken to a plain-HTTP server, an untrusted certificate, a timeout.
/// Whether a request that failed before any answer may succeed if sent again: a refused or
/// broken connection may, a timeout is the caller's to decide (its deadline is spent), and a
/// refusal of the egress policy or a TLS handshake the server failed (an untrusted certificate,
/// a server that does not speak TLS) is the same every time: retrying only delays the error.
fn worth_retrying(error: &reqwest::Error) -> bool {
    !error.is_timeout()
        && (error.is_connect() || error.is_request())
        && find_denial(error).is_none()
        && !is_tls_failure(error)
}

/// Whether `error` is a TLS failure (the handshake or the certificate), not the network's.
fn is_tls_failure(error: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(e) = source {
        // An io::Error's `source()` skips the error it wraps (where rustls puts its own, one
        // or more io::Errors deep), so the wrapped errors are looked into.
        let mut wrapped = Some(e);
        while let Some(w) = wrapped {
            if w.is::<rustls::Error>() {
                return true;
            }
            wrapped = w
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .map(|inner| inner as &(dyn std::error::Error + 'static));
        }
        source = e.source();
    }
    false
}

pub(crate) fn describe_transport_error(error: &reqwest::Error, insecure: bool) -> String {
    let mut chain = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(e) = source {
        chain.push(e.to_string());
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return "connection refused".into(),
                std::io::ErrorKind::ConnectionReset => {
                    return "connection reset by the server".into();
                }
                std::io::ErrorKind::TimedOut => return "timed out".into(),
                _ => {}
            }
        }
        source = e.source();
    }
    let all = chain.join(": ").to_ascii_lowercase();
    let text = if error.is_timeout() {
        "timed out".to_owned()
    } else if all.contains("dns error")
        || all.contains("failed to lookup address")
        || all.contains("name or service not known")
    {
        "the name does not resolve".to_owned()
    } else if all.contains("invalidcontenttype")
        || all.contains("corrupt message")
        || all.contains("wrong version number")
    {
        if insecure {
            "the TLS handshake failed".to_owned()
        } else {
            "the TLS handshake failed: the server does not speak TLS (if it is a plain-HTTP registry, list it in TAILOR_INSECURE_REGISTRIES)".to_owned()
        }
    } else if all.contains("unknownissuer")
        || all.contains("invalid peer certificate")
        || all.contains("certificate")
    {
        "the server's TLS certificate is not trusted (add its CA with TAILOR_CA_CERTIFICATES)"
            .to_owned()
    } else if error.is_connect() {
        "the connection failed".to_owned()
    } else if error.is_body() || error.is_decode() {
        "the connection broke while reading the answer".to_owned()
    } else {
        "the request failed".to_owned()
    };
    match chain.last() {
        Some(cause) if !text.contains("TLS") && !text.contains("resolve") => {
            format!("{text} ({})", clean(cause, 200))
        }
        _ => text,
    }
}

/// The first `errors[].message` of a distribution error body, with its code, cleaned.
fn registry_error_message(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let first = value.get("errors")?.as_array()?.first()?;
    let code = first.get("code").and_then(|c| c.as_str()).unwrap_or("");
    let message = first.get("message").and_then(|m| m.as_str()).unwrap_or("");
    Some(clean(format!("{code} {message}").trim(), MESSAGE_CHARS))
}
