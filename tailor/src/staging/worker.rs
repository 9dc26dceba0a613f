//! Workers: take stagings from the queue and copy their images into the internal registry.
//!
//! A process runs any number of workers ([`run`]); any number of processes on any number of
//! machines can run against one database. Workers wake on `LISTEN tailor_stagings` and poll as
//! a fallback; a running staging's lease is extended by a heartbeat, which also notices a
//! cancellation or a lost lease. On shutdown, workers stop claiming, give in-flight copies
//! `drain_timeout` to finish, then cancel them and put them back in the queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::ledger::PgLedger;
use super::queue::{self, Claimed, Heartbeat, Outcome};
use super::store::{CANCEL_CHANNEL, NEW_WORK_CHANNEL};
use crate::copy::{CopyOptions, PlatformChoice, Progress, Registries, copy_image};
use crate::error::{CopyError, Side};
use crate::image_config::{RunInfo, run_info};
use crate::platform::Platform;
use crate::reference::ImageReference;
use crate::registry::{Credentials, RetryPolicy, Scope};
use crate::secrets::CredentialsKey;

/// How workers behave.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// host:port of the internal registry.
    pub internal_registry: String,
    pub internal_credentials: Option<Credentials>,
    pub insecure_registries: Vec<String>,
    pub repo_prefix: String,
    pub credentials_key: Option<CredentialsKey>,
    /// How long a claim is held without a heartbeat before another worker may take it over.
    pub lease: Duration,
    pub poll_interval: Duration,
    pub max_attempts: i32,
    /// Parallel blob transfers per staging.
    pub concurrency: usize,
    pub drain_timeout: Duration,
    /// How long a staging waits before trying again when the internal registry is read-only.
    pub read_only_retry: Duration,
}

impl WorkerSettings {
    pub fn new(internal_registry: &str, repo_prefix: &str) -> Self {
        Self {
            internal_registry: internal_registry.to_owned(),
            internal_credentials: None,
            insecure_registries: Vec::new(),
            repo_prefix: repo_prefix.to_owned(),
            credentials_key: None,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(5),
            max_attempts: 5,
            concurrency: crate::copy::DEFAULT_CONCURRENCY,
            drain_timeout: Duration::from_secs(60),
            read_only_retry: Duration::from_secs(15),
        }
    }
}

impl WorkerSettings {
    /// Settings for workers of a deployment configured by `settings`, with the tunables
    /// `TAILOR_LEASE_SECONDS` (30), `TAILOR_POLL_SECONDS` (5), `TAILOR_MAX_ATTEMPTS` (5),
    /// `TAILOR_COPY_CONCURRENCY` (8), `TAILOR_DRAIN_SECONDS` (60) and
    /// `TAILOR_READ_ONLY_RETRY_SECONDS` (15) read through `lookup`.
    pub fn from_settings(
        settings: &crate::config::TailorSettings,
        credentials_key: Option<CredentialsKey>,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, crate::config::ConfigError> {
        let ranged = |setting: &'static str, default: u64, min: u64, max: u64| match lookup(setting)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
        {
            None => Ok(default),
            Some(text) => text
                .parse::<u64>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| crate::config::ConfigError::Invalid {
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
        worker.credentials_key = credentials_key;
        worker.lease = Duration::from_secs(number("TAILOR_LEASE_SECONDS", 30, 3600)?);
        worker.poll_interval = Duration::from_secs(number("TAILOR_POLL_SECONDS", 5, 600)?);
        worker.max_attempts = number("TAILOR_MAX_ATTEMPTS", 5, 100)? as i32;
        worker.concurrency = number("TAILOR_COPY_CONCURRENCY", 8, 64)? as usize;
        // 0: on shutdown, hand in-flight stagings back at once.
        worker.drain_timeout = Duration::from_secs(ranged("TAILOR_DRAIN_SECONDS", 60, 0, 3600)?);
        worker.read_only_retry =
            Duration::from_secs(number("TAILOR_READ_ONLY_RETRY_SECONDS", 15, 3600)?);
        Ok(worker)
    }
}

/// Why a copy was stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    CancelRequested,
    LeaseLost,
    Draining,
}

struct Shared {
    pool: PgPool,
    settings: WorkerSettings,
    shutdown: CancellationToken,
    /// Bumped on every NOTIFY of new work; workers wait for it to change.
    new_work: watch::Receiver<u64>,
    /// Cancellation handles of the stagings running in this process.
    running: Mutex<HashMap<Uuid, CancellationToken>>,
    http: reqwest::Client,
    /// One HTTP connection pool for every copy this process runs, with the internal
    /// registry's credentials; each staging adds its own source credentials to a clone.
    registries: Registries,
}

/// Runs `count` workers and a callback deliverer until `shutdown` is cancelled and every
/// in-flight staging has finished or been released.
pub async fn run(
    pool: PgPool,
    settings: WorkerSettings,
    count: usize,
    shutdown: CancellationToken,
) {
    let (notify_tx, new_work) = watch::channel(0u64);
    let shared = Arc::new(Shared {
        pool: pool.clone(),
        shutdown: shutdown.clone(),
        new_work,
        running: Mutex::new(HashMap::new()),
        http: reqwest::Client::new(),
        registries: base_registries(&settings),
        settings,
    });
    let listener = tokio::spawn(listen(shared.clone(), notify_tx));
    let deliverer = tokio::spawn(super::callbacks::run_deliverer(
        pool,
        shared.http.clone(),
        Duration::from_secs(1),
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
    listener.abort();
    let _ = deliverer.await;
    tracing::info!("workers stopped");
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// Turns NOTIFYs into wake-ups and cancellations; reconnects if the connection drops.
async fn listen(shared: Arc<Shared>, notify_tx: watch::Sender<u64>) {
    loop {
        let mut listener = match PgListener::connect_with(&shared.pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "LISTEN connection failed; polling meanwhile");
                tokio::time::sleep(shared.settings.poll_interval).await;
                continue;
            }
        };
        if let Err(error) = listener
            .listen_all([NEW_WORK_CHANNEL, CANCEL_CHANNEL])
            .await
        {
            tracing::warn!(%error, "LISTEN failed; polling meanwhile");
            tokio::time::sleep(shared.settings.poll_interval).await;
            continue;
        }
        // Anything that happened while we were not listening is found by the next claim.
        notify_tx.send_modify(|v| *v += 1);
        loop {
            match listener.recv().await {
                Ok(notification) if notification.channel() == CANCEL_CHANNEL => {
                    if let Ok(guid) = notification.payload().parse::<Uuid>()
                        && let Some(token) = shared.running.lock().expect("not poisoned").get(&guid)
                    {
                        token.cancel();
                    }
                }
                Ok(_) => notify_tx.send_modify(|v| *v += 1),
                Err(error) => {
                    tracing::warn!(%error, "LISTEN connection lost; reconnecting");
                    break;
                }
            }
        }
    }
}

async fn work(shared: Arc<Shared>, worker_id: String) {
    let mut new_work = shared.new_work.clone();
    while !shared.shutdown.is_cancelled() {
        new_work.borrow_and_update();
        let claimed = queue::claim(
            &shared.pool,
            &worker_id,
            shared.settings.lease,
            shared.settings.max_attempts,
        )
        .await;
        match claimed {
            Ok(Some(claimed)) => {
                let span = tracing::info_span!(
                    "staging",
                    staging_guid = %claimed.staging.staging_guid,
                    app_guid = %claimed.staging.app_guid,
                    worker = %worker_id,
                );
                process(&shared, &worker_id, claimed).instrument(span).await;
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

async fn process(shared: &Shared, worker: &str, claimed: Claimed) {
    let staging = claimed.staging;
    let guid = staging.staging_guid;
    tracing::info!(image = %staging.source_image, attempt = staging.attempts, "staging started");
    let prepared = prepare(
        shared,
        &staging.source_image,
        &staging.platform,
        claimed.encrypted_credentials.as_deref(),
    );
    let (registries, src, platform) = match prepared {
        Ok(prepared) => prepared,
        Err((code, message)) => {
            tracing::warn!(code, %message, "staging failed before copying");
            let outcome = Outcome::Failed {
                code,
                message: &message,
            };
            if let Err(error) = queue::finish(&shared.pool, guid, worker, outcome).await {
                tracing::error!(%error, "could not record the failure");
            }
            return;
        }
    };
    let dst = ImageReference {
        registry: shared.settings.internal_registry.clone(),
        repository: format!("{}/{}", shared.settings.repo_prefix, staging.app_guid),
        tag: Some(guid.to_string()),
        digest: None,
    };

    let cancel = CancellationToken::new();
    shared
        .running
        .lock()
        .expect("not poisoned")
        .insert(guid, cancel.clone());
    let stop_reason = Arc::new(Mutex::new(None));
    let bytes_done = Arc::new(AtomicU64::new(0));
    let bytes_total = Arc::new(AtomicU64::new(0));
    let heartbeat = tokio::spawn(keep_alive(
        shared.pool.clone(),
        guid,
        worker.to_owned(),
        shared.settings.lease,
        shared.settings.drain_timeout,
        shared.shutdown.clone(),
        cancel.clone(),
        stop_reason.clone(),
        bytes_done.clone(),
        bytes_total.clone(),
    ));
    let progress = {
        let (done, total) = (bytes_done.clone(), bytes_total.clone());
        Arc::new(move |event: Progress| match event {
            Progress::Planned { bytes, .. } => total.store(bytes, Ordering::Relaxed),
            Progress::BlobBytes { bytes, .. } => {
                done.fetch_add(bytes, Ordering::Relaxed);
            }
            Progress::BlobFinished { size, outcome, .. }
                if outcome != crate::copy::BlobOutcome::Copied =>
            {
                done.fetch_add(size, Ordering::Relaxed);
            }
            _ => {}
        })
    };
    let options = CopyOptions {
        platforms: PlatformChoice::One(platform),
        concurrency: shared.settings.concurrency,
        ledger: Arc::new(PgLedger::new(shared.pool.clone())),
        progress: Some(progress),
        cancel: cancel.clone(),
    };
    // Held until the outcome is committed, so the pruner never deletes what this copy tags.
    // (Not raced with `cancel`: the wait is one pruner transaction at most.)
    let mut repository_lock =
        crate::prune::locks::hold_repository(&shared.pool, &dst.repository).await;
    let result = match &repository_lock {
        Ok(_) => copy_image(&registries, &src, &dst, &options).await,
        // Transient: the staging is retried once the database answers again.
        Err(error) => Err(CopyError::InternalRegistry {
            registry: dst.registry.clone(),
            detail: format!("could not hold the repository against the pruner: {error}"),
        }),
    };
    let result = match result {
        Ok(report) => {
            match fetch_run_info(&registries, &dst, report.config_digest.as_deref()).await {
                Ok(run) => Ok((report, run)),
                Err(error) => Err(error),
            }
        }
        Err(error) => Err(error),
    };

    heartbeat.abort();
    shared.running.lock().expect("not poisoned").remove(&guid);
    let stop = *stop_reason.lock().expect("not poisoned");

    let recorded = match result {
        Ok((report, run)) => {
            tracing::info!(
                pinned = %report.pinned,
                copied = report.blobs.copied,
                mounted = report.blobs.mounted,
                skipped = report.blobs.skipped,
                bytes_copied = report.bytes_copied,
                "staging succeeded"
            );
            let tagged = report.tagged.clone();
            let outcome = Outcome::Succeeded {
                report: &report,
                tagged: &tagged,
                run: &run,
            };
            // Committed through the repository lock's own connection: if that connection died
            // during the copy (and with it the lock, so the pruner may have deleted what was
            // just tagged), this fails, the lease expires and a retry pushes the image again.
            match repository_lock.as_mut() {
                Ok(lock) => queue::finish(lock.connection(), guid, worker, outcome).await,
                Err(_) => queue::finish(&shared.pool, guid, worker, outcome).await,
            }
            .map(|_| ())
        }
        Err(CopyError::Cancelled) => match stop {
            Some(StopReason::Draining) => {
                tracing::info!("shutting down: staging released back to the queue");
                queue::release(&shared.pool, guid, worker, Duration::ZERO, None)
                    .await
                    .map(|_| ())
            }
            Some(StopReason::LeaseLost) => {
                tracing::warn!("lease lost to another worker; abandoning this attempt");
                Ok(())
            }
            _ => {
                tracing::info!("staging cancelled");
                queue::finish(&shared.pool, guid, worker, Outcome::Cancelled)
                    .await
                    .map(|_| ())
            }
        },
        // A garbage collection window can outlast every retry: wait it out, uncounted.
        Err(error @ CopyError::ReadOnly { .. }) => {
            let delay = shared.settings.read_only_retry;
            tracing::info!(%error, retry_in_ms = delay.as_millis() as u64, "internal registry read-only; staging handed back");
            queue::release(
                &shared.pool,
                guid,
                worker,
                delay,
                Some(&format!("{}: {error}", error.code())),
            )
            .await
            .map(|_| ())
        }
        Err(error) if error.is_transient() && staging.attempts < shared.settings.max_attempts => {
            let delay = RetryPolicy::default()
                .backoff(staging.attempts as u32)
                .max(Duration::from_secs(1));
            tracing::warn!(code = error.code(), %error, retry_in_ms = delay.as_millis() as u64, "staging will be retried");
            queue::retry_later(
                &shared.pool,
                guid,
                worker,
                delay,
                &format!("{}: {error}", error.code()),
            )
            .await
            .map(|_| ())
        }
        Err(error) => {
            tracing::warn!(code = error.code(), %error, "staging failed");
            let message = error.to_string();
            queue::finish(
                &shared.pool,
                guid,
                worker,
                Outcome::Failed {
                    code: error.code(),
                    message: &message,
                },
            )
            .await
            .map(|_| ())
        }
    };
    if let Err(error) = recorded {
        tracing::error!(%error, "could not record the staging's outcome; its lease will expire and it will be retried");
    }
    if let Ok(lock) = repository_lock {
        lock.release().await;
    }
}

type Prepared = (Registries, ImageReference, Platform);

fn base_registries(settings: &WorkerSettings) -> Registries {
    let registries = Registries::new(settings.insecure_registries.iter().cloned());
    match &settings.internal_credentials {
        Some(credentials) => {
            registries.with_credentials(&settings.internal_registry, credentials.clone())
        }
        None => registries,
    }
}

fn prepare(
    shared: &Shared,
    source_image: &str,
    platform: &str,
    sealed: Option<&[u8]>,
) -> Result<Prepared, (&'static str, String)> {
    let src =
        ImageReference::parse(source_image).map_err(|e| ("INVALID_REFERENCE", e.to_string()))?;
    let platform = Platform::parse(platform).map_err(|e| ("INVALID_PLATFORM", e.to_string()))?;
    let mut registries = shared.registries.clone();
    match (sealed, &shared.settings.credentials_key) {
        (None, _) => {}
        (Some(sealed), Some(key)) => {
            let credentials = key
                .decrypt(sealed)
                .map_err(|e| ("CREDENTIALS_UNAVAILABLE", e.to_string()))?;
            registries = registries.with_credentials(&src.registry, credentials);
        }
        (Some(_), None) => {
            return Err((
                "CREDENTIALS_UNAVAILABLE",
                "this worker has no TAILOR_CREDENTIALS_KEY to decrypt the staging's credentials"
                    .into(),
            ));
        }
    }
    Ok((registries, src, platform))
}

/// Reads the copied image's config from the internal registry and derives how to run it.
async fn fetch_run_info(
    registries: &Registries,
    dst: &ImageReference,
    config_digest: Option<&str>,
) -> Result<RunInfo, CopyError> {
    let Some(digest) = config_digest else {
        return Ok(RunInfo {
            start_command: String::new(),
            execution_metadata: "{}".into(),
        });
    };
    let client = registries.client(dst, Side::Destination);
    let path = format!("/v2/{}/blobs/{digest}", dst.repository);
    let response = client
        .send(&[Scope::pull(&dst.repository)], || {
            client.request(Method::GET, &path)
        })
        .await?;
    if !response.status().is_success() {
        return Err(client
            .status_error(response, &format!("config {digest}"))
            .await);
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| client.transport_error(&e))?;
    run_info(&body).map_err(CopyError::ManifestInvalid)
}

/// Extends the lease and publishes progress until aborted; stops the copy when the staging is
/// cancelled, the lease is lost, or a drain outlasts its timeout.
#[allow(clippy::too_many_arguments)]
async fn keep_alive(
    pool: PgPool,
    guid: Uuid,
    worker: String,
    lease: Duration,
    drain_timeout: Duration,
    shutdown: CancellationToken,
    cancel: CancellationToken,
    stop_reason: Arc<Mutex<Option<StopReason>>>,
    bytes_done: Arc<AtomicU64>,
    bytes_total: Arc<AtomicU64>,
) {
    let stop = |reason| {
        stop_reason
            .lock()
            .expect("not poisoned")
            .get_or_insert(reason);
        cancel.cancel();
    };
    // Progress is published every second (GET /stage shows it); the lease needs far less.
    let mut ticker = tokio::time::interval((lease / 3).min(Duration::from_secs(1)));
    ticker.tick().await;
    let mut drain_deadline = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled(), if drain_deadline.is_none() => {
                drain_deadline = Some(tokio::time::Instant::now() + drain_timeout);
            }
            () = async { tokio::time::sleep_until(drain_deadline.expect("set")).await }, if drain_deadline.is_some() => {
                stop(StopReason::Draining);
                return;
            }
        }
        let total = bytes_total.load(Ordering::Relaxed);
        let beat = queue::heartbeat(
            &pool,
            guid,
            &worker,
            lease,
            bytes_done.load(Ordering::Relaxed),
            (total > 0).then_some(total),
        )
        .await;
        match beat {
            Ok(Heartbeat::Held {
                cancel_requested: true,
            }) => {
                stop(StopReason::CancelRequested);
                return;
            }
            Ok(Heartbeat::Held { .. }) => {}
            Ok(Heartbeat::Lost) => {
                stop(StopReason::LeaseLost);
                return;
            }
            Err(error) => tracing::warn!(%error, "heartbeat failed; will retry"),
        }
    }
}
