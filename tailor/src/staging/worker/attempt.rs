//! One attempt at one staging, from its claim to its recorded outcome:
//!
//! 1. read the request (reference, platform, the staging's own credentials);
//! 2. ask the fleet's rate-limit budget whether its source registry may be spoken to;
//! 3. take the repository lease (shared: other stagings of the app may copy alongside; the
//!    pruner, which takes it exclusively, may not);
//! 4. copy, raced against the staging's deadline, a cancellation, a lost lease and a drain,
//!    with the heartbeat renewing the leases meanwhile;
//! 5. [`decide`] what the outcome means, and record it: a failure first removes the tag the
//!    attempt may have pushed, so a failed staging leaves no tag behind.
//!
//! A panic anywhere in it is caught and recorded as the staging's failure.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use uuid::Uuid;

use super::Shared;
use super::decide::{Attempt, Circumstances, Next, StopReason, decide};
use super::heartbeat::{Heartbeat, keep_alive};
use crate::copy::{CopyOptions, CopyReport, PlatformChoice, Progress, copy_image};
use crate::error::CopyError;
use crate::image_config::RunInfo;
use crate::platform::Platform;
use crate::reference::ImageReference;
use crate::registry::{Credentials, Repository};
use crate::staging::budget::Admission;
use crate::staging::lease::{self, Leases};
use crate::staging::ledger::PgLedger;
use crate::staging::queue::{self, Claimed, Outcome};

/// How long a staging waits in-process for the pruner to leave its repository.
const REPOSITORY_WAIT: Duration = Duration::from_secs(30);
/// How long a failing staging waits for the other stagings of its app before it removes the
/// tag it pushed (deleting a manifest must not race another staging's push).
const CLEANUP_WAIT: Duration = Duration::from_secs(10);

/// Runs one attempt; a panic is caught and recorded as the staging's failure.
pub(crate) async fn run_one(shared: &Shared, worker: &str, claimed: Claimed) {
    let guid = claimed.staging.staging_guid;
    let attempts = claimed.staging.attempts;
    let outcome = AssertUnwindSafe(attempt(shared, worker, claimed))
        .catch_unwind()
        .await;
    shared.running.lock().expect("not poisoned").remove(&guid);
    if let Err(panic) = outcome {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        tracing::error!(panic = %crate::text::clean(&what, 300), "the worker panicked; the staging is recorded as failed");
        let next = decide(
            Attempt::Panicked(&crate::text::clean(&what, 300)),
            &circumstances(shared, attempts, Duration::ZERO, None),
        );
        if let Next::Fail { code, message } = next {
            let recorded = queue::finish(
                &shared.pool,
                guid,
                worker,
                Outcome::Failed {
                    code,
                    message: &message,
                },
            )
            .await;
            if let Err(error) = recorded {
                tracing::error!(%error, "could not record the failure; its lease will expire");
            }
        }
    }
}

fn circumstances(
    shared: &Shared,
    attempts: i32,
    time_left: Duration,
    last_error: Option<&str>,
) -> Circumstances {
    Circumstances {
        last_error: last_error.map(str::to_owned),
        attempts,
        max_attempts: shared.settings.max_attempts,
        time_left,
        max_backoff: shared.settings.max_backoff,
        read_only_retry: shared.settings.read_only_retry,
        jitter: fastrand::f64(),
    }
}

/// What the request says, parsed again from the record.
struct Prepared {
    src: ImageReference,
    platform: Platform,
    credentials: Option<Credentials>,
}

fn prepare(shared: &Shared, claimed: &Claimed) -> Result<Prepared, (&'static str, String)> {
    let staging = &claimed.staging;
    let src = ImageReference::parse(&staging.source_image)
        .map_err(|e| ("INVALID_REFERENCE", e.to_string()))?;
    let platform =
        Platform::parse(&staging.platform).map_err(|e| ("INVALID_PLATFORM", e.to_string()))?;
    let credentials = match (
        &claimed.encrypted_credentials,
        &shared.settings.credentials_key,
    ) {
        (None, _) => None,
        (Some(sealed), Some(key)) => Some(
            key.decrypt(sealed)
                .map_err(|e| ("CREDENTIALS_UNAVAILABLE", e.to_string()))?,
        ),
        (Some(_), None) => {
            return Err((
                "CREDENTIALS_UNAVAILABLE",
                "this worker has no TAILOR_CREDENTIALS_KEY to decrypt the staging's credentials"
                    .into(),
            ));
        }
    };
    Ok(Prepared {
        src,
        platform,
        credentials,
    })
}

async fn attempt(shared: &Shared, worker: &str, claimed: Claimed) {
    let staging = &claimed.staging;
    let guid = staging.staging_guid;
    let deadline = tokio::time::Instant::now() + claimed.time_left;
    let time_left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    tracing::info!(image = %staging.source_image, attempt = staging.attempts, "staging started");

    let leases = Leases::new(shared.pool.clone(), worker, shared.settings.lease);
    let repository = format!("{}/{}", shared.settings.repo_prefix, staging.app_guid);
    let repository_lease = lease::repository(&repository);
    let dest = shared
        .registries
        .internal(
            &shared.settings.internal_registry,
            shared.settings.internal_credentials.clone(),
        )
        .repository(&repository);

    // Claimed only to be ended: past its deadline, or worn out by workers that kept vanishing.
    let hopeless = if claimed.time_left.is_zero() {
        Some(Attempt::Stopped(StopReason::Deadline))
    } else if staging.attempts > shared.settings.max_attempts {
        Some(Attempt::WornOut)
    } else {
        None
    };
    if let Some(attempt) = hopeless {
        let next = decide(
            attempt,
            &circumstances(
                shared,
                staging.attempts,
                Duration::ZERO,
                staging.last_error.as_deref(),
            ),
        );
        tracing::warn!(?next, "staging ends without a copy");
        remove_failed_tag(shared, &leases, &repository_lease, &dest, guid).await;
        record(shared, worker, guid, next, None).await;
        if let Err(error) = leases.release(&repository_lease).await {
            tracing::warn!(%error, "could not release the repository lease; it will expire");
        }
        return;
    }

    let prepared = match prepare(shared, &claimed) {
        Ok(prepared) => prepared,
        Err((code, message)) => {
            tracing::warn!(code, %message, "staging failed before copying");
            record(shared, worker, guid, Next::Fail { code, message }, None).await;
            return;
        }
    };

    let probing = match shared
        .budgets
        .admit_staging(&staging.source_registry, worker)
        .await
    {
        Ok(Admission::Go) => false,
        Ok(Admission::Probe) => {
            tracing::info!(registry = %staging.source_registry, "probing a rate-limited registry for the fleet");
            true
        }
        Ok(Admission::Wait(until)) => {
            let wait = (until - chrono::Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_secs(1));
            let next = decide(
                Attempt::RateLimitWait(wait),
                &circumstances(
                    shared,
                    staging.attempts,
                    time_left(),
                    staging.last_error.as_deref(),
                ),
            );
            record(shared, worker, guid, next, None).await;
            return;
        }
        Err(error) => {
            tracing::warn!(%error, "rate-limit budget unavailable; going ahead");
            false
        }
    };

    if !hold_repository(shared, &leases, &repository_lease).await {
        let next = decide(
            Attempt::RepositoryBusy,
            &circumstances(
                shared,
                staging.attempts,
                time_left(),
                staging.last_error.as_deref(),
            ),
        );
        record(shared, worker, guid, next, None).await;
        return;
    }

    let registries = &shared.registries;
    let observer = shared.budgets.for_staging(worker, probing);
    let source = registries
        .source(
            &prepared.src.registry,
            prepared.src.endpoint(),
            prepared.credentials,
            Some(observer),
        )
        .repository(&prepared.src.repository);

    let cancel = tokio_util::sync::CancellationToken::new();
    shared
        .running
        .lock()
        .expect("not poisoned")
        .insert(guid, cancel.clone());
    let stop_reason = Arc::new(Mutex::new(None));
    let bytes_done = Arc::new(AtomicU64::new(0));
    let bytes_total = Arc::new(AtomicU64::new(0));
    let heartbeat = tokio::spawn(keep_alive(Heartbeat {
        pool: shared.pool.clone(),
        guid,
        worker: worker.to_owned(),
        leases: leases.clone(),
        lease: shared.settings.lease,
        drain_timeout: shared.settings.drain_timeout,
        shutdown: shared.shutdown.clone(),
        cancel: cancel.clone(),
        stop_reason: stop_reason.clone(),
        bytes_done: bytes_done.clone(),
        bytes_total: bytes_total.clone(),
    }));
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
        platforms: PlatformChoice::One(prepared.platform.clone()),
        concurrency: shared.settings.concurrency,
        ledger: Arc::new(PgLedger::new(
            shared.pool.clone(),
            leases.clone(),
            shared.hub.lease_released(),
        )),
        progress: Some(progress),
        cancel: cancel.clone(),
        runnable: Some(prepared.platform.clone()),
    };
    let tag = guid.to_string();
    let result = tokio::select! {
        result = copy_image(&source, &prepared.src, &dest, &tag, &options) => result,
        () = tokio::time::sleep_until(deadline) => {
            stop_reason.lock().expect("not poisoned").get_or_insert(StopReason::Deadline);
            cancel.cancel();
            Err(CopyError::Cancelled)
        }
    };
    heartbeat.abort();
    let stop = *stop_reason.lock().expect("not poisoned");

    let attempt_outcome = match (&result, stop) {
        (Ok(_), _) => Attempt::Succeeded,
        (Err(CopyError::Cancelled), Some(reason)) => Attempt::Stopped(reason),
        (Err(CopyError::Cancelled), None) => Attempt::Stopped(StopReason::CancelRequested),
        (Err(error), _) => Attempt::Failed(error),
    };
    let next = decide(
        attempt_outcome,
        &circumstances(
            shared,
            staging.attempts,
            time_left(),
            staging.last_error.as_deref(),
        ),
    );
    match &next {
        Next::Fail { code, message } => tracing::warn!(code, %message, "staging failed"),
        Next::Requeue(requeue) => tracing::warn!(
            retry_in_s = requeue.after.as_secs(),
            reason = requeue.last_error.as_deref().unwrap_or("handed back"),
            "staging goes back to the queue"
        ),
        Next::Cancel => tracing::info!("staging cancelled"),
        Next::Abandon => tracing::warn!("lease lost to another worker; abandoning this attempt"),
        Next::Succeed => {}
    }
    if matches!(next, Next::Fail { .. } | Next::Cancel) {
        remove_failed_tag(shared, &leases, &repository_lease, &dest, guid).await;
    }
    let success = result
        .as_ref()
        .ok()
        .map(|report| (report, &repository_lease));
    record(shared, worker, guid, next, success).await;
    if let Err(error) = leases.release(&repository_lease).await {
        tracing::warn!(%error, "could not release the repository lease; it will expire");
    }
}

/// Takes the repository lease, waiting a little while the pruner works there.
async fn hold_repository(shared: &Shared, leases: &Leases, resource: &str) -> bool {
    let deadline = tokio::time::Instant::now() + REPOSITORY_WAIT;
    let mut released = shared.hub.lease_released();
    loop {
        match leases.acquire(resource, false).await {
            Ok(true) => return true,
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(%error, "could not take the repository lease");
                return false;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::select! {
            _ = released.changed() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Records what `decide` decided.
async fn record(
    shared: &Shared,
    worker: &str,
    guid: Uuid,
    next: Next,
    success: Option<(&CopyReport, &String)>,
) {
    let recorded = match next {
        Next::Succeed => {
            let (report, repository_lease) = success.expect("a success has a report");
            let run = report.run.clone().unwrap_or(RunInfo {
                start_command: String::new(),
                execution_metadata: "{}".into(),
            });
            tracing::info!(
                pinned = %report.pinned,
                copied = report.blobs.copied,
                mounted = report.blobs.mounted,
                skipped = report.blobs.skipped,
                bytes_copied = report.bytes_copied,
                "staging succeeded"
            );
            let outcome = Outcome::Succeeded {
                report,
                run: &run,
                repository_lease,
            };
            match queue::finish(&shared.pool, guid, worker, outcome).await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => {
                    // The pruner may have deleted what was pushed while the lease was lost:
                    // not recorded, the lease expires and a later attempt pushes again.
                    tracing::warn!(
                        "the staging's or its repository's lease was lost before the success was recorded; it will be retried"
                    );
                    Ok(())
                }
                Err(error) => Err(error),
            }
        }
        Next::Fail { code, message } => queue::finish(
            &shared.pool,
            guid,
            worker,
            Outcome::Failed {
                code,
                message: &message,
            },
        )
        .await
        .map(|_| ()),
        Next::Cancel => queue::finish(&shared.pool, guid, worker, Outcome::Cancelled)
            .await
            .map(|_| ()),
        Next::Requeue(requeue) => queue::requeue(&shared.pool, guid, worker, &requeue)
            .await
            .map(|_| ()),
        Next::Abandon => Ok(()),
    };
    if let Err(error) = recorded {
        tracing::error!(%error, "could not record the staging's outcome; its lease will expire and it will be retried");
    }
}

/// Removes the tag this staging may have pushed (in this attempt or an earlier one), unless
/// its manifest is another staging's image too (the registry deletes by digest, and with the
/// digest every tag on it). Done with the repository to itself, so no other staging's push
/// of the same manifest can race the deletion; if others keep copying there, the tag stays
/// (and the log says so).
async fn remove_failed_tag(
    shared: &Shared,
    leases: &Leases,
    repository_lease: &str,
    dest: &Repository,
    guid: Uuid,
) {
    let head = match dest.head_manifest(&guid.to_string()).await {
        Ok(Some(head)) => head,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(%error, "could not check for a tag to remove");
            return;
        }
    };
    let deadline = tokio::time::Instant::now() + CLEANUP_WAIT;
    let mut released = shared.hub.lease_released();
    loop {
        match leases.acquire(repository_lease, true).await {
            Ok(true) => break,
            Ok(false) if tokio::time::Instant::now() < deadline => {
                tokio::select! {
                    _ = released.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
            Ok(false) => {
                tracing::warn!(digest = %head.digest, "a failed staging's tag stays: other stagings of the app are copying into its repository");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "could not take the repository to remove a tag");
                return;
            }
        }
    }
    let manifest = format!("{}@{}", dest.name(), head.digest);
    let shared_with_live: Result<bool, sqlx::Error> = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM stagings WHERE state = 'succeeded' AND pruned_at IS NULL \
         AND substr(pinned_image, strpos(pinned_image, '/') + 1) = $1)",
    )
    .bind(&manifest)
    .fetch_one(&shared.pool)
    .await;
    match shared_with_live {
        Ok(false) => match dest.delete_manifest(&head.digest).await {
            Ok(_) => {
                tracing::info!(digest = %head.digest, "removed the tag the failed staging had pushed")
            }
            Err(error) => tracing::warn!(%error, "could not remove the failed staging's tag"),
        },
        Ok(true) => {
            tracing::info!(digest = %head.digest, "the failed staging's tag stays: its manifest is another staging's image")
        }
        Err(error) => {
            tracing::warn!(%error, "could not check whether the tag's manifest is in use; it stays")
        }
    }
    if let Err(error) = leases.acquire(repository_lease, false).await {
        tracing::warn!(%error, "could not hand the repository back to other stagings; the lease will expire");
    }
}
