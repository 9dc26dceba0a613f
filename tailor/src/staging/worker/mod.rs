//! Workers: take stagings from the queue and copy their images into the internal registry.
//!
//! A process runs any number of workers ([`run`]); any number of processes on any number of
//! machines can run against one database, each with a small fixed pool of connections: a
//! worker borrows a connection for one short statement at a time and holds none while it
//! copies. The parts:
//!
//! - this module: the settings, and the claim loop (LISTEN/NOTIFY wake-ups, polling as a
//!   fallback, draining on shutdown);
//! - [`attempt`]: one attempt at one staging, from its claim to its recorded outcome;
//! - [`heartbeat`]: renewing the staging's lease and the worker's other leases, publishing
//!   progress, noticing a cancellation or a lost lease;
//! - [`decide`]: the pure rules that turn an attempt's outcome into the staging's next state.

pub mod attempt;
pub mod decide;
mod heartbeat;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::budget::Budgets;
use super::notify::Hub;
use super::queue;
use crate::config::ConfigError;
use crate::copy::Resumable;
use crate::egress::{Egress, EgressPolicy};
use crate::registry::{Credentials, Registries};
use crate::secrets::CredentialsKey;

/// The default chunk of a resumable upload, in MiB: a killed worker costs at most about this
/// much of a blob read again upstream.
const DEFAULT_UPLOAD_CHUNK_MIB: u64 = 16;
/// Chunk buffers a worker process holds at most (memory: this many chunks); a large blob that
/// finds none free is uploaded in one streaming request, unresumable.
const CHUNK_BUFFERS: usize = 8;

/// How workers behave.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// host:port of the internal registry.
    pub internal_registry: String,
    pub internal_credentials: Option<Credentials>,
    pub insecure_registries: Vec<String>,
    pub repo_prefix: String,
    /// The OCI layouts stagings may read (resolved again by each worker).
    pub source_locations: super::location::SourceLocations,
    pub credentials_key: Option<CredentialsKey>,
    /// Where stagings may reach.
    pub egress: EgressPolicy,
    pub limits: crate::registry::Limits,
    /// PEM certificates trusted besides the system's.
    pub ca_certificates: Vec<u8>,
    /// How long a claim is held without a heartbeat before another worker may take it over.
    pub lease: Duration,
    pub poll_interval: Duration,
    /// Attempts before a staging fails (a guard against stagings that crash their workers;
    /// the deadline is what normally ends retrying).
    pub max_attempts: i32,
    /// The longest backoff between attempts.
    pub max_backoff: Duration,
    /// Parallel blob transfers per staging.
    pub concurrency: usize,
    /// Blobs larger than this go to the internal registry in checkpointed chunks of this many
    /// bytes, so that a later attempt resumes inside them (0: each blob in one request).
    pub upload_chunk: u64,
    pub drain_timeout: Duration,
    /// How long a staging waits before trying again when the internal registry is read-only.
    pub read_only_retry: Duration,
    /// How long a staging waits in-process for the pruner to leave its repository before it
    /// goes back to the queue (30 s; the pruner holds a repository for one run's deletions).
    pub repository_wait: Duration,
    pub callback_timeout: Duration,
    pub callback_retry_for: Duration,
}

impl WorkerSettings {
    pub fn new(internal_registry: &str, repo_prefix: &str) -> Self {
        Self {
            internal_registry: internal_registry.to_owned(),
            internal_credentials: None,
            insecure_registries: Vec::new(),
            repo_prefix: repo_prefix.to_owned(),
            source_locations: Default::default(),
            credentials_key: None,
            egress: EgressPolicy::default(),
            limits: crate::registry::Limits::default(),
            ca_certificates: Vec::new(),
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(5),
            max_attempts: 20,
            max_backoff: Duration::from_secs(300),
            concurrency: crate::copy::DEFAULT_CONCURRENCY,
            upload_chunk: DEFAULT_UPLOAD_CHUNK_MIB << 20,
            drain_timeout: Duration::from_secs(60),
            read_only_retry: Duration::from_secs(15),
            repository_wait: Duration::from_secs(30),
            callback_timeout: Duration::from_secs(10),
            callback_retry_for: Duration::from_secs(24 * 3600),
        }
    }

    /// Settings for workers of a deployment configured by `settings`, with the tunables
    /// `TAILOR_LEASE_SECONDS` (30), `TAILOR_POLL_SECONDS` (5), `TAILOR_MAX_ATTEMPTS` (20),
    /// `TAILOR_RETRY_MAX_SECONDS` (300), `TAILOR_COPY_CONCURRENCY` (8), `TAILOR_DRAIN_SECONDS`
    /// (60), `TAILOR_READ_ONLY_RETRY_SECONDS` (15) and `TAILOR_UPLOAD_CHUNK_MIB` (16) read
    /// through `lookup`.
    pub fn from_settings(
        settings: &crate::config::TailorSettings,
        credentials_key: Option<CredentialsKey>,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let ranged = |setting: &'static str, default: u64, min: u64, max: u64| match lookup(setting)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
        {
            None => Ok(default),
            Some(text) => text
                .parse::<u64>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| ConfigError::Invalid {
                    setting,
                    problem: format!("{text:?} is not a whole number from {min} to {max}"),
                }),
        };
        let number =
            |setting: &'static str, default: u64, max: u64| ranged(setting, default, 1, max);
        let mut worker = Self::new(&settings.internal_registry, &settings.repo_prefix);
        worker.internal_credentials = settings
            .internal_registry_credentials
            .as_ref()
            .map(|(user, password)| Credentials::new(user.clone(), password.expose()));
        worker.insecure_registries = settings.insecure_registries.clone();
        worker.source_locations = settings.source_locations.clone();
        worker.credentials_key = credentials_key;
        worker.egress = settings.egress_policy();
        worker.limits = settings.limits.clone();
        worker.ca_certificates = settings.ca_certificates.clone();
        worker.callback_timeout = settings.callback_timeout;
        worker.callback_retry_for = settings.callback_retry_for;
        worker.lease = Duration::from_secs(number("TAILOR_LEASE_SECONDS", 30, 3600)?);
        worker.poll_interval = Duration::from_secs(number("TAILOR_POLL_SECONDS", 5, 600)?);
        worker.max_attempts = number("TAILOR_MAX_ATTEMPTS", 20, 1000)? as i32;
        worker.max_backoff = Duration::from_secs(number("TAILOR_RETRY_MAX_SECONDS", 300, 86_400)?);
        worker.concurrency = number("TAILOR_COPY_CONCURRENCY", 8, 64)? as usize;
        // 0: no chunks, no resuming inside a blob.
        worker.upload_chunk =
            ranged("TAILOR_UPLOAD_CHUNK_MIB", DEFAULT_UPLOAD_CHUNK_MIB, 0, 256)? << 20;
        // 0: on shutdown, hand in-flight stagings back at once.
        worker.drain_timeout = Duration::from_secs(ranged("TAILOR_DRAIN_SECONDS", 60, 0, 3600)?);
        worker.read_only_retry =
            Duration::from_secs(number("TAILOR_READ_ONLY_RETRY_SECONDS", 15, 3600)?);
        Ok(worker)
    }

    /// The registries the workers reach, under this egress policy.
    pub fn registries(&self) -> Result<Registries, ConfigError> {
        Registries::new(
            self.insecure_registries.iter().cloned(),
            Egress::new(self.egress.clone()),
            self.limits.clone(),
            &self.ca_certificates,
        )
        .map_err(|e| ConfigError::Invalid {
            setting: "TAILOR_CA_CERTIFICATES",
            problem: e.to_string(),
        })
    }
}

/// What every worker of a process shares.
pub(crate) struct Shared {
    pub pool: PgPool,
    pub settings: WorkerSettings,
    pub shutdown: CancellationToken,
    pub hub: Hub,
    /// Cancellation handles of the stagings running in this process.
    pub running: Mutex<HashMap<Uuid, CancellationToken>>,
    /// One set of HTTP connection pools for every copy this process runs.
    pub registries: Registries,
    pub budgets: Arc<Budgets>,
    /// The process's chunk buffers for resumable uploads (`None`: chunks are off).
    pub resumable: Option<Resumable>,
}

impl Shared {
    fn new(
        pool: PgPool,
        settings: WorkerSettings,
        shutdown: CancellationToken,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            registries: settings.registries()?,
            budgets: Budgets::new(pool.clone()),
            resumable: (settings.upload_chunk > 0)
                .then(|| Resumable::new(settings.upload_chunk, CHUNK_BUFFERS)),
            hub: Hub::new(),
            running: Mutex::new(HashMap::new()),
            pool,
            shutdown,
            settings,
        })
    }
}

/// Runs `count` workers and a callback deliverer until `shutdown` is cancelled and every
/// in-flight staging has finished or been released.
pub async fn run(
    pool: PgPool,
    settings: WorkerSettings,
    count: usize,
    shutdown: CancellationToken,
) {
    let shared = match Shared::new(pool.clone(), settings, shutdown.clone()) {
        Ok(shared) => Arc::new(shared),
        Err(error) => {
            tracing::error!(%error, "workers cannot start");
            return;
        }
    };
    let (hub, budgets) = (shared.hub.clone(), shared.budgets.clone());
    let listener = tokio::spawn(hub.clone().listen(
        pool.clone(),
        shared.settings.poll_interval,
        shutdown.clone(),
    ));
    let budget_view = tokio::spawn(budgets.follow(
        hub.budgets_changed(),
        shared.settings.poll_interval,
        shutdown.clone(),
    ));
    let canceller = tokio::spawn(forward_cancellations(shared.clone()));
    let deliverer = tokio::spawn(super::callbacks::run_deliverer(
        pool,
        super::callbacks::DelivererSettings {
            egress: Egress::new(shared.settings.egress.clone()),
            timeout: shared.settings.callback_timeout,
            retry_for: shared.settings.callback_retry_for,
            poll: Duration::from_secs(1),
        },
        shutdown.clone(),
    ));
    let host = hostname();
    let workers: Vec<_> = (0..count)
        .map(|n| {
            let id = format!(
                "{host}/{}/{n}/{}",
                std::process::id(),
                &Uuid::new_v4().simple().to_string()[..8]
            );
            tokio::spawn(work(shared.clone(), id))
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    canceller.abort();
    let _ = tokio::join!(listener, budget_view, deliverer);
    tracing::info!("workers stopped");
}

/// Claims one staging, if one is ready, and runs one attempt of it to its recorded end (what
/// each of [`run`]'s workers does in a loop): for tests that step the queue by hand. Returns the
/// staging it ran. No callback is delivered and no cancellation is forwarded meanwhile (the
/// attempt's heartbeat still sees a cancellation request).
pub async fn run_one(
    pool: &PgPool,
    settings: &WorkerSettings,
    worker: &str,
) -> Result<Option<Uuid>, RunOneError> {
    let shared = Shared::new(pool.clone(), settings.clone(), CancellationToken::new())?;
    let Some(claimed) = queue::claim(pool, worker, settings.lease).await? else {
        return Ok(None);
    };
    let guid = claimed.staging.staging_guid;
    attempt::run_one(&shared, worker, claimed).await;
    Ok(Some(guid))
}

/// Why [`run_one`] could not run anything.
#[derive(Debug, thiserror::Error)]
pub enum RunOneError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("claiming a staging failed: {0}")]
    Claim(#[from] sqlx::Error),
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// Cancels the local copy of every staging someone asked to cancel.
async fn forward_cancellations(shared: Arc<Shared>) {
    let mut cancels = shared.hub.cancels();
    loop {
        match cancels.recv().await {
            Ok(guid) => {
                if let Some(token) = shared.running.lock().expect("not poisoned").get(&guid) {
                    token.cancel();
                }
            }
            // Missed some: the heartbeat notices cancellations too.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn work(shared: Arc<Shared>, worker_id: String) {
    let mut new_work = shared.hub.new_work();
    while !shared.shutdown.is_cancelled() {
        new_work.borrow_and_update();
        let claimed = queue::claim(&shared.pool, &worker_id, shared.settings.lease).await;
        match claimed {
            Ok(Some(claimed)) => {
                let span = tracing::info_span!(
                    "staging",
                    staging_guid = %claimed.staging.staging_guid,
                    app_guid = %claimed.staging.app_guid,
                    worker = %worker_id,
                );
                attempt::run_one(&shared, &worker_id, claimed)
                    .instrument(span)
                    .await;
                continue;
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, worker = %worker_id, "claiming failed; retrying"),
        }
        tokio::select! {
            () = shared.shutdown.cancelled() => break,
            _ = new_work.changed() => {}
            () = tokio::time::sleep(shared.settings.poll_interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(chunk: Option<&str>) -> Result<WorkerSettings, ConfigError> {
        let lookup = |name: &str| match name {
            "DATABASE_URL" => Some("postgres://u:p@127.0.0.1:5432/db".to_owned()),
            "TAILOR_INTERNAL_REGISTRY" => Some("127.0.0.1:5000".to_owned()),
            "TAILOR_UPLOAD_CHUNK_MIB" => chunk.map(str::to_owned),
            _ => None,
        };
        let tailor = crate::config::TailorSettings::from_lookup(lookup)?;
        WorkerSettings::from_settings(&tailor, None, lookup)
    }

    #[test]
    fn the_upload_chunk_is_16_mib_unless_set_and_0_turns_chunks_off() {
        assert_eq!(settings(None).unwrap().upload_chunk, 16 << 20);
        assert_eq!(settings(Some("32")).unwrap().upload_chunk, 32 << 20);
        assert_eq!(settings(Some("0")).unwrap().upload_chunk, 0);
        for refused in ["257", "-1", "16MiB"] {
            let error = settings(Some(refused)).unwrap_err().to_string();
            assert!(error.contains("TAILOR_UPLOAD_CHUNK_MIB"), "{error}");
        }
    }
}
