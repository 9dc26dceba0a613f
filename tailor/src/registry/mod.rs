//! The OCI distribution API, as one place: every `/v2/` path, status mapping, redirect, token
//! fetch, size limit, deadline and egress check tailor makes lives here, so copy, staging,
//! pruning and health checks get the same guarantees by construction.
//!
//! The shape follows regclient's `scheme` package: a [`Registry`] is one registry as one party
//! sees it (its endpoint, the credentials that party brought, the tokens it was given), and a
//! [`Repository`] handle on it offers the API's operations (`head_blob`, `get_blob`,
//! `mount_blob`, `start_upload`, `get_manifest`, `put_manifest`, `delete_manifest`, `tags`).
//! Failures are [`RegistryError`]s with stable codes.
//!
//! [`Registries`] makes them, and decides the trust: an image *source* is reached through the
//! egress policy ([`crate::egress`]: every hop checked, and sent through a client that connects
//! only to the addresses checked), with only the credentials the staging brought, and its
//! answers are bounded in size, time and throughput ([`Limits`]); the *internal* registry is
//! the operator's own and reached directly with tailor's credentials.
//!
//! Retries here are only the ones that are safe at this level ([`RetryPolicy`]): a connection
//! that failed before any byte was answered, and 5xx/408 on an idempotent request, a few times.
//! A 429 is returned at once (as [`RegistryError::RateLimited`] with its `Retry-After`) for the
//! staging queue to schedule, unless the policy says to wait it out (the CLI's).
//!
//! Built on reqwest rather than `oci-client`, whose client has no retries, treats a declined
//! mount (202) as an error, uploads in fixed 4 MiB chunks and cannot cancel an upload session;
//! `oci-client`'s manifest types are still what manifests are parsed into.

pub mod auth;
mod client;
mod error;
pub mod observe;
pub mod referrers;
mod repository;
pub mod retry;
mod transfer;
mod upload;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

pub use auth::{Credentials, Scope};
pub use client::Registry;
pub use error::RegistryError;
pub use observe::RegistryObserver;
pub use repository::{Deleted, ManifestHead, Mount, Repository};
pub use retry::RetryPolicy;
pub use transfer::{BlobBody, Floor, TransferMeter};
pub use upload::UploadSession;

use crate::egress::{Egress, PolicedClients, Purpose};

/// Bounds on what one registry answer may cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Total deadline of every request that is not a blob stream (manifests, configs, tokens,
    /// HEADs, upload POSTs), and the time a blob stream may take to start answering.
    pub request_timeout: Duration,
    /// Connection establishment.
    pub connect_timeout: Duration,
    /// Slowest a blob transfer may go for a whole [`Floor::window`] before it fails.
    pub floor: Floor,
    /// Largest manifest read (the distribution registry's own limit).
    pub manifest_bytes: u64,
    /// Largest blob read into memory (image configs).
    pub config_bytes: u64,
    /// Largest token service answer.
    pub token_bytes: u64,
    /// Most of an error body read to quote its message.
    pub error_body_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            floor: Floor::default(),
            manifest_bytes: crate::manifest::MAX_MANIFEST_BYTES as u64,
            config_bytes: 4 * 1024 * 1024,
            token_bytes: 256 * 1024,
            error_body_bytes: 16 * 1024,
        }
    }
}

/// How a process reaches registries: the egress policy's clients (one per checked
/// destination) and one plain client for the operator's own internal registry, which hosts
/// speak plain HTTP, the bounds and the retry policy.
#[derive(Clone)]
pub struct Registries {
    policed: Arc<PolicedClients>,
    trusted: reqwest::Client,
    egress: Arc<Egress>,
    insecure: Arc<HashSet<String>>,
    limits: Limits,
    retry: RetryPolicy,
}

impl std::fmt::Debug for Registries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registries")
            .field("insecure", &self.insecure)
            .field("limits", &self.limits)
            .finish()
    }
}

/// Why an HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the HTTP client: {0}")]
pub struct ClientSetupError(String);

impl Registries {
    /// `insecure`: `host:port` entries spoken to over plain HTTP. `extra_roots`: PEM
    /// certificates trusted besides the system's (an internal CA).
    pub fn new(
        insecure: impl IntoIterator<Item = String>,
        egress: Arc<Egress>,
        limits: Limits,
        extra_roots: &[u8],
    ) -> Result<Self, ClientSetupError> {
        crate::tls::install_crypto_provider();
        let roots = if extra_roots.is_empty() {
            Vec::new()
        } else {
            reqwest::Certificate::from_pem_bundle(extra_roots)
                .map_err(|e| ClientSetupError(format!("the CA bundle is not PEM: {e}")))?
        };
        let (connect_timeout, user_agent) = (
            limits.connect_timeout,
            concat!("tailor/", env!("CARGO_PKG_VERSION")),
        );
        let builder = move || {
            reqwest::Client::builder()
                .user_agent(user_agent)
                .connect_timeout(connect_timeout)
                // Redirects are followed by `Registry::send`, which checks each hop.
                .redirect(reqwest::redirect::Policy::none())
                .pool_max_idle_per_host(32)
                .pool_idle_timeout(Duration::from_secs(60))
        };
        // The policed clients are many (one per destination), so the roots are loaded once
        // into a TLS configuration they share.
        let tls = crate::tls::client_config(extra_roots).map_err(ClientSetupError)?;
        let policed = PolicedClients::new(
            egress.clone(),
            Purpose::Source,
            Arc::new(move || builder().tls_backend_preconfigured(tls.clone())),
        )
        .map_err(|e| ClientSetupError(e.to_string()))?;
        let mut trusted = builder();
        if !roots.is_empty() {
            trusted = trusted.tls_certs_merge(roots);
        }
        let trusted = trusted
            .build()
            .map_err(|e| ClientSetupError(e.to_string()))?;
        Ok(Self {
            policed: Arc::new(policed),
            trusted,
            egress,
            insecure: Arc::new(insecure.into_iter().collect()),
            limits,
            retry: RetryPolicy::default(),
        })
    }

    /// No egress policy, default limits: for tests and tools acting with the operator's authority.
    pub fn unrestricted(insecure: impl IntoIterator<Item = String>) -> Self {
        Self::new(insecure, Egress::unrestricted(), Limits::default(), &[])
            .expect("the default HTTP client configuration is valid")
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn egress(&self) -> &Arc<Egress> {
        &self.egress
    }

    /// Whether `registry` (as named in references) is spoken to over plain HTTP.
    pub fn is_insecure(&self, registry: &str, endpoint: &str) -> bool {
        self.insecure.contains(registry) || self.insecure.contains(endpoint)
    }

    /// An image source: reached through the egress policy, with `credentials` (the staging's
    /// own, or none) and nothing else. `name` is the registry as in references, `endpoint` the
    /// host:port its API is served from; `observer` (the fleet's rate-limit budget) is asked
    /// before every request and told every answer.
    pub fn source(
        &self,
        name: &str,
        endpoint: &str,
        credentials: Option<Credentials>,
        observer: Option<Arc<dyn RegistryObserver>>,
    ) -> Arc<Registry> {
        Arc::new(Registry::new(
            client::Endpoint {
                name: name.to_owned(),
                host: endpoint.to_owned(),
                insecure: self.is_insecure(name, endpoint),
            },
            client::Http::Policed(self.policed.clone()),
            credentials,
            self.limits.clone(),
            self.retry.clone(),
            observer,
        ))
    }

    /// The operator's internal registry, with its credentials.
    pub fn internal(&self, host: &str, credentials: Option<Credentials>) -> Arc<Registry> {
        Arc::new(Registry::new(
            client::Endpoint {
                name: host.to_owned(),
                host: host.to_owned(),
                insecure: self.insecure.contains(host),
            },
            client::Http::Trusted(self.trusted.clone()),
            credentials,
            self.limits.clone(),
            self.retry.clone(),
            None,
        ))
    }
}
