//! One attempt at one staging, from its claim to its recorded outcome:
//!
//! 1. read the request (reference, platform, the staging's own credentials);
//! 2. ask the fleet's rate-limit budget whether its source registry may be spoken to;
//! 3. take the repository lease (shared: other stagings of the app may copy alongside; the
//!    pruner, which takes it exclusively, may not);
//! 4. copy, raced against the staging's deadline, a cancellation, a lost lease and a drain;
//! 5. [`decide`] what the outcome means, and record it: a failure or a cancellation first
//!    removes the tag the staging may have pushed, so a failed staging leaves no tag behind.
//!
//! The attempt holds its leases under a holder name of its own (the worker's id and a nonce),
//! renewed by the heartbeat from the claim until the outcome is recorded, and all released at
//! the end whatever happened: nothing an attempt took outlives it or is renewed by the next.
//! A panic anywhere in it is caught and recorded as the staging's failure, by the same path.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::FutureExt;
use uuid::Uuid;

use super::Shared;
use super::decide::{Attempt, Circumstances, Next, StopReason, decide};
use super::heartbeat::{Heartbeat, keep_alive};
use crate::code::Code;
use crate::copy::{
    CopyOptions, CopyReport, Pinned, PlatformChoice, Progress, Source, Wanted, copy_from,
};
use crate::error::CopyError;
use crate::image_config::RunInfo;
use crate::platform::Platform;
use crate::registry::{Credentials, Repository};
use crate::staging::Mode;
use crate::staging::budget::Admission;
use crate::staging::lease::{self, Leases};
use crate::staging::ledger::PgLedger;
use crate::staging::location::StagingSource;
use crate::staging::queue::{self, Claimed, Outcome, RepositoryLease};

/// How long a failing staging waits for the other stagings of its app before it removes the
/// tag it pushed (deleting a manifest must not race another staging's push).
const CLEANUP_WAIT: Duration = Duration::from_secs(10);

/// What one attempt needs throughout, the recording of its outcome included.
struct Run<'a> {
    shared: &'a Shared,
    worker: &'a str,
    guid: Uuid,
    app_guid: Uuid,
    /// Attempts so far, this one included.
    attempts: i32,
    /// This attempt's leases (holder `<worker>#<nonce>`).
    leases: Leases,
    repository_lease: String,
    dest: Repository,
}

/// What a successful attempt made: a copy in the internal registry, or a pin of upstream's
/// image.
enum Done {
    Copied(CopyReport),
    Pinned(Pinned),
}

/// Aborts the heartbeat however the attempt ends (a spawned task outlives its handle).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The state the heartbeat and the copy share.
#[derive(Clone, Default)]
struct Beat {
    cancel: tokio_util::sync::CancellationToken,
    stop_reason: Arc<Mutex<Option<StopReason>>>,
    bytes_done: Arc<AtomicU64>,
    bytes_total: Arc<AtomicU64>,
}

/// Runs one attempt and records its outcome; a panic is caught and recorded as the staging's
/// failure. Every lease the attempt took is released before it returns.
pub(crate) async fn run_one(shared: &Shared, worker: &str, claimed: Claimed) {
    let staging = &claimed.staging;
    let guid = staging.staging_guid;
    let attempts = staging.attempts;
    let repository = format!("{}/{}", shared.settings.repo_prefix, staging.app_guid);
    let run = Run {
        shared,
        worker,
        guid,
        app_guid: staging.app_guid,
        attempts,
        leases: Leases::new(
            shared.pool.clone(),
            format!("{worker}#{:08x}", fastrand::u32(..)),
            shared.settings.lease,
        ),
        repository_lease: lease::repository(&repository),
        dest: shared
            .registries
            .internal(
                &shared.settings.internal_registry,
                shared.settings.internal_credentials.clone(),
            )
            .repository(&repository),
    };
    let beat = Beat::default();
    shared
        .running
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(guid, beat.cancel.clone());
    let heartbeat = AbortOnDrop(tokio::spawn(keep_alive(Heartbeat {
        pool: shared.pool.clone(),
        guid,
        worker: worker.to_owned(),
        leases: run.leases.clone(),
        lease: shared.settings.lease,
        drain_timeout: shared.settings.drain_timeout,
        shutdown: shared.shutdown.clone(),
        cancel: beat.cancel.clone(),
        stop_reason: beat.stop_reason.clone(),
        bytes_done: beat.bytes_done.clone(),
        bytes_total: beat.bytes_total.clone(),
    })));

    let (next, done) = match AssertUnwindSafe(attempt(&run, &claimed, &beat))
        .catch_unwind()
        .await
    {
        Ok(ended) => ended,
        Err(panic) => {
            let what = crate::text::clean(&panic_message(&*panic), 300);
            tracing::error!(panic = %what, "the worker panicked; the staging is recorded as failed");
            let next = decide(
                Attempt::Panicked(&what),
                &circumstances(shared, attempts, Duration::ZERO, None),
            );
            (next, None)
        }
    };
    let mode = claimed.staging.mode;
    if let Err(panic) = AssertUnwindSafe(run.record(next, done.as_ref(), mode))
        .catch_unwind()
        .await
    {
        tracing::error!(panic = %crate::text::clean(&panic_message(&*panic), 300), "the worker panicked recording the outcome; the staging's lease will expire and it will be retried");
    }
    drop(heartbeat);
    shared
        .running
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&guid);
    if let Err(error) = run.leases.let_go_all().await {
        tracing::warn!(%error, "could not release the attempt's leases; they will expire");
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
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
    src: StagingSource,
    platform: Platform,
    credentials: Option<Credentials>,
}

fn prepare(shared: &Shared, claimed: &Claimed) -> Result<Prepared, (Code, String)> {
    let staging = &claimed.staging;
    let src = staging.source_image.clone();
    let platform = staging.platform.clone();
    let credentials = match (
        &claimed.encrypted_credentials,
        &shared.settings.credentials_key,
    ) {
        (None, _) => None,
        (Some(sealed), Some(key)) => Some(
            key.decrypt(sealed)
                .map_err(|e| (Code::CredentialsUnavailable, e.to_string()))?,
        ),
        (Some(_), None) => {
            return Err((
                Code::CredentialsUnavailable,
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

/// Works the staging up to the decision of what its attempt means (recorded by the caller),
/// with what it made when it succeeded.
async fn attempt(run: &Run<'_>, claimed: &Claimed, beat: &Beat) -> (Next, Option<Done>) {
    let shared = run.shared;
    let staging = &claimed.staging;
    let deadline = tokio::time::Instant::now() + claimed.time_left;
    let time_left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    let circumstances_now = || {
        circumstances(
            shared,
            staging.attempts,
            time_left(),
            staging.last_error.as_deref(),
        )
    };
    tracing::info!(image = %staging.source_image, attempt = staging.attempts, "staging started");

    // Claimed only to be ended: past its deadline, or worn out by workers that kept vanishing.
    let hopeless = if claimed.time_left.is_zero() {
        Some(Attempt::Stopped(StopReason::Deadline))
    } else if staging.attempts > shared.settings.max_attempts {
        Some(Attempt::WornOut)
    } else {
        None
    };
    if let Some(attempt) = hopeless {
        let next = decide(attempt, &circumstances_now());
        tracing::warn!(?next, "staging ends without a copy");
        return (next, None);
    }

    let prepared = match prepare(shared, claimed) {
        Ok(prepared) => prepared,
        Err((code, message)) => {
            tracing::warn!(%code, %message, "staging failed before copying");
            return (Next::Fail { code, message }, None);
        }
    };

    // A layout has no rate limit: only a registry's image spends a budget.
    let admission = match prepared.src {
        StagingSource::Image(_) => {
            shared
                .budgets
                .admit_staging(&staging.budget_key, run.leases.holder())
                .await
        }
        StagingSource::Layout(_) => Ok(Admission::Go),
    };
    let probing = match admission {
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
            return (
                decide(Attempt::RateLimitWait(wait), &circumstances_now()),
                None,
            );
        }
        Err(error) => {
            tracing::warn!(%error, "rate-limit budget unavailable; going ahead");
            false
        }
    };

    if staging.mode == Mode::Pin {
        let StagingSource::Image(image) = &prepared.src else {
            // NewStaging::parse never makes one; a row written by hand could be.
            let next = Next::Fail {
                code: Code::InvalidMode,
                message: "an OCI layout cannot be pinned".into(),
            };
            return (next, None);
        };
        let repository = upstream(run, staging, image, prepared.credentials, probing);
        let options = CopyOptions {
            cancel: beat.cancel.clone(),
            ..Default::default()
        };
        let pin = crate::copy::pin(&repository, image, &prepared.platform, &options);
        let result = until_deadline(pin, deadline, beat).await;
        let next = decide(attempt_outcome(&result, beat), &circumstances_now());
        return (next, result.ok().map(Done::Pinned));
    }

    if !hold_repository(shared, &run.leases, &run.repository_lease).await {
        return (decide(Attempt::RepositoryBusy, &circumstances_now()), None);
    }

    let (source, wanted) = match &prepared.src {
        StagingSource::Image(image) => {
            let repository = upstream(run, staging, image, prepared.credentials, probing);
            (Source::registry(repository), Wanted::image(image))
        }
        StagingSource::Layout(text) => match open_layout(shared, text).await {
            Ok(opened) => opened,
            Err(error) => {
                tracing::warn!(code = %error.code(), %error, "the staging's layout cannot be read");
                return (decide(Attempt::Failed(&error), &circumstances_now()), None);
            }
        },
    };

    let progress = {
        let (done, total) = (beat.bytes_done.clone(), beat.bytes_total.clone());
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
            run.leases.clone(),
            shared.hub.lease_let_go(),
        )),
        progress: Some(progress),
        cancel: beat.cancel.clone(),
        runnable: Some(prepared.platform.clone()),
        layout_annotations: Default::default(),
        // Signatures, SBOMs and attestations travel with a registry's image.
        referrers: source.repository().is_some(),
        resumable: shared.resumable.clone(),
    };
    let tag = run.guid.to_string();
    let copy = copy_from(&source, &wanted, &run.dest, &tag, &options);
    let result = until_deadline(copy, deadline, beat).await;
    let next = decide(attempt_outcome(&result, beat), &circumstances_now());
    (next, result.ok().map(Done::Copied))
}

/// The staging's repository upstream, reached with its own credentials and its rate-limit
/// budget's observer.
fn upstream(
    run: &Run<'_>,
    staging: &crate::staging::Staging,
    image: &crate::reference::ImageReference,
    credentials: Option<Credentials>,
    probing: bool,
) -> Repository {
    let shared = run.shared;
    let observer = shared
        .budgets
        .for_staging(&staging.budget_key, run.leases.holder(), probing);
    shared
        .registries
        .source(
            &image.registry,
            image.endpoint(),
            credentials,
            Some(observer),
        )
        .repository(&image.repository)
}

/// Runs `work` (a copy or a pin) until it ends or the staging's deadline passes, which
/// cancels it and is recorded as why it stopped.
async fn until_deadline<T>(
    work: impl std::future::Future<Output = Result<T, CopyError>>,
    deadline: tokio::time::Instant,
    beat: &Beat,
) -> Result<T, CopyError> {
    tokio::select! {
        result = work => result,
        () = tokio::time::sleep_until(deadline) => {
            beat.stop_reason
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert(StopReason::Deadline);
            beat.cancel.cancel();
            Err(CopyError::Cancelled)
        }
    }
}

/// What the copy's (or the pin's) result says about the attempt: a cancellation is whatever
/// stopped it (the deadline, a drain, a lost lease), or the tenant's request.
fn attempt_outcome<'r, T>(result: &'r Result<T, CopyError>, beat: &Beat) -> Attempt<'r> {
    let stop = *beat
        .stop_reason
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    match (result, stop) {
        (Ok(_), _) => Attempt::Succeeded,
        (Err(CopyError::Cancelled), Some(reason)) => Attempt::Stopped(reason),
        (Err(CopyError::Cancelled), None) => Attempt::Stopped(StopReason::CancelRequested),
        (Err(error), _) => Attempt::Failed(error),
    }
}

/// Opens a staging's layout source, resolved against this worker's enabled locations.
async fn open_layout(shared: &Shared, text: &str) -> Result<(Source, Wanted), CopyError> {
    let locations = &shared.settings.source_locations;
    let refused = |refused: crate::staging::location::LocationRefused| {
        CopyError::LocationRefused(refused.to_string())
    };
    let resolved = match locations.resolve(text).map_err(refused)? {
        crate::staging::location::Resolved::Dir { dir, tag } => {
            let locations = locations.clone();
            let dir = tokio::task::spawn_blocking(move || locations.real_dir(&dir))
                .await
                .expect("resolving a directory does not panic")
                .map_err(refused)?;
            crate::staging::location::Resolved::Dir { dir, tag }
        }
        bucket => bucket,
    };
    let (layout, tag) = resolved.open().await.map_err(CopyError::Layout)?;
    let wanted = Wanted::in_layout(&layout, tag.as_deref());
    Ok((Source::layout(layout), wanted))
}

/// Takes the repository lease, waiting a little while the pruner works there.
async fn hold_repository(shared: &Shared, leases: &Leases, resource: &str) -> bool {
    let deadline = tokio::time::Instant::now() + shared.settings.repository_wait;
    let mut released = shared.hub.lease_let_go();
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

impl Run<'_> {
    /// Records what `decide` decided. A failure or a cancellation first removes the tag the
    /// staging may have pushed (in this attempt or an earlier one), whichever path led here.
    async fn record(&self, next: Next, done: Option<&Done>, mode: Mode) {
        let (pool, guid, worker) = (&self.shared.pool, self.guid, self.worker);
        match &next {
            Next::Fail { code, message } => tracing::warn!(%code, %message, "staging failed"),
            Next::Requeue(requeue) => tracing::warn!(
                attempt = self.attempts,
                retry_in_s = requeue.after.as_secs(),
                reason = requeue.last_error.as_deref().unwrap_or("handed back"),
                "staging goes back to the queue"
            ),
            Next::Cancel => tracing::info!("staging cancelled"),
            Next::Abandon => {
                tracing::warn!("lease lost to another worker; abandoning this attempt")
            }
            Next::Succeed => {}
        }
        // A pin pushes nothing, so it has no tag to remove.
        if matches!(next, Next::Fail { .. } | Next::Cancel) && mode == Mode::Copy {
            self.remove_failed_tag().await;
        }
        let recorded = match next {
            Next::Succeed if let Some(Done::Pinned(pinned)) = done => {
                tracing::info!(
                    pinned = %pinned.pinned,
                    "staging succeeded: pinned upstream, nothing copied"
                );
                queue::finish(pool, guid, worker, Outcome::Pinned { pinned })
                    .await
                    .map(|ended| {
                        if ended.is_none() {
                            tracing::warn!("the staging's lease was lost before the pin was recorded; it will be retried");
                        }
                    })
            }
            Next::Succeed => {
                let Some(Done::Copied(report)) = done else {
                    tracing::error!("a success without a copy report; not recorded");
                    return;
                };
                let run = report.run.clone().unwrap_or(RunInfo {
                    start_command: String::new(),
                    execution_metadata: "{}".into(),
                    labels: Default::default(),
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
                    repository_lease: RepositoryLease {
                        resource: &self.repository_lease,
                        holder: self.leases.holder(),
                    },
                };
                match queue::finish(pool, guid, worker, outcome).await {
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
                pool,
                guid,
                worker,
                Outcome::Failed {
                    code,
                    message: &message,
                },
            )
            .await
            .map(|_| ()),
            Next::Cancel => queue::finish(pool, guid, worker, Outcome::Cancelled)
                .await
                .map(|_| ()),
            Next::Requeue(requeue) => queue::requeue(pool, guid, worker, &requeue)
                .await
                .map(|_| ()),
            Next::Abandon => Ok(()),
        };
        if let Err(error) = recorded {
            tracing::error!(%error, "could not record the staging's outcome; its lease will expire and it will be retried");
        }
    }

    /// Removes the tag this staging may have pushed ([`remove_unrecorded_tag`]).
    async fn remove_failed_tag(&self) {
        remove_unrecorded_tag(
            &self.shared.pool,
            &self.leases,
            self.shared.hub.lease_let_go(),
            &self.dest,
            &self.repository_lease,
            &self.guid.to_string(),
            self.app_guid,
        )
        .await;
    }
}

/// Removes `tag` from `dest` (a staging's tag whose success was never recorded: a failed
/// attempt's, or an import's), unless its manifest is a recorded staging's image too (the
/// registry deletes by digest, and with the digest every tag on it). Done with the repository
/// to itself (`resource`, taken exclusively under `leases`, then handed back shared), so no
/// other staging's push of the same manifest can race the deletion; if others keep copying
/// there, the tag stays (and the log says so).
pub(crate) async fn remove_unrecorded_tag(
    pool: &sqlx::PgPool,
    leases: &Leases,
    mut released: tokio::sync::watch::Receiver<u64>,
    dest: &Repository,
    resource: &str,
    tag: &str,
    app_guid: Uuid,
) {
    let head = match dest.head_manifest(tag).await {
        Ok(Some(head)) => head,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(%error, "could not check for a tag to remove");
            return;
        }
    };
    let deadline = tokio::time::Instant::now() + CLEANUP_WAIT;
    loop {
        match leases.acquire(resource, true).await {
            Ok(true) => break,
            Ok(false) if tokio::time::Instant::now() < deadline => {
                tokio::select! {
                    _ = released.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
            Ok(false) => {
                tracing::warn!(digest = %head.digest, "an unrecorded tag stays: other stagings of the app are copying into its repository");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "could not take the repository to remove a tag");
                return;
            }
        }
    }
    let manifest = format!("{}@{}", dest.name(), head.digest);
    let shared_with_live: Result<bool, sqlx::Error> = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM stagings WHERE state = 'succeeded' AND pruned_at IS NULL
           AND pinned_manifest = $1) AS "shared!""#,
        &manifest
    )
    .fetch_one(pool)
    .await;
    match shared_with_live {
        Ok(false) => match dest.delete_manifest(&head.digest).await {
            Ok(_) => {
                tracing::info!(digest = %head.digest, "removed the unrecorded tag");
                // And the referrers copied with it, but nothing a live image is made of.
                let removed = match crate::staging::store::objects_in_use(pool, app_guid).await {
                    Ok(keep) => crate::registry::referrers::remove(dest, &head.digest, &keep)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(error) => Err(error.to_string()),
                };
                if let Err(error) = removed {
                    tracing::warn!(%error, "could not remove the unrecorded tag's referrers");
                }
            }
            Err(error) => tracing::warn!(%error, "could not remove the unrecorded tag"),
        },
        Ok(true) => {
            tracing::info!(digest = %head.digest, "the unrecorded tag stays: its manifest is another staging's image")
        }
        Err(error) => {
            tracing::warn!(%error, "could not check whether the tag's manifest is in use; it stays")
        }
    }
    // Shared again (the holder's leases are all released when it ends).
    if let Err(error) = leases.acquire(resource, false).await {
        tracing::warn!(%error, "could not hand the repository back to other stagings; the lease will expire");
    }
}
