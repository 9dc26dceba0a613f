//! The work queue: stagings claimed with `FOR UPDATE SKIP LOCKED`, held by a lease that a
//! heartbeat extends. A staging whose lease expired (its worker died) is claimable again, so
//! another worker resumes it. Every statement here is short: nothing holds a connection while
//! a copy runs.
//!
//! A staging ends at its deadline whatever happens: a worker races its copy against it, and an
//! overdue staging nobody holds (queued, or left by a dead worker) is claimed like any other,
//! so that its worker records the failure the same way (removing any tag it pushed).

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use super::request::NewStaging;
use super::store::{self, enqueue_callback, notify, read_one, read_returned};
use super::{Staging, StagingState};
use crate::code::Code;
use crate::copy::{CopyReport, Pinned};
use crate::image_config::RunInfo;
use crate::text::store_safe;

/// A staging this worker now holds the lease on.
#[derive(Debug)]
pub struct Claimed {
    pub staging: Staging,
    pub encrypted_credentials: Option<Vec<u8>>,
    /// Time left until the staging's deadline, by the database's clock.
    pub time_left: Duration,
}

/// How long past its deadline a running staging may stay with a worker that still renews its
/// lease but never ends it (stuck recording, say) before another worker takes it to end it.
pub const OVERDUE_GRACE: Duration = Duration::from_secs(300);

/// Claims the oldest claimable staging: queued and due (or overdue), or running with an
/// expired lease (or long overdue). The worker decides what an overdue or worn-out staging
/// comes to.
pub async fn claim(
    pool: &PgPool,
    worker: &str,
    lease: Duration,
) -> Result<Option<Claimed>, sqlx::Error> {
    // A queued staging whose registry is blocked by its rate-limit budget (or being probed)
    // is skipped.
    let row = sqlx::query!(
        r#"WITH next AS (
               SELECT staging_guid FROM stagings q
               WHERE (q.state = 'queued' AND (q.run_after <= now() OR q.deadline_at <= now())
                      AND (q.deadline_at <= now()
                           OR NOT EXISTS (SELECT 1 FROM registry_budgets b
                                          WHERE b.budget_key = q.budget_key
                                            AND (b.blocked_until > now() OR b.probe_until > now()))))
                   OR (q.state = 'running' AND (q.lease_expires_at < now()
                       OR q.deadline_at < now() - make_interval(secs => $3)))
               ORDER BY q.created_at
               FOR UPDATE SKIP LOCKED
               LIMIT 1)
           UPDATE stagings s SET lease_owner = $1,
               lease_expires_at = now() + make_interval(secs => $2), attempts = s.attempts + 1,
               workers_lost = s.workers_lost + CASE WHEN s.state = 'running' THEN 1 ELSE 0 END,
               state = 'running', waiting_for = NULL, bytes_done = 0,
               started_at = coalesce(s.started_at, now()), updated_at = now()
           FROM next WHERE s.staging_guid = next.staging_guid
           RETURNING s.staging_guid, s.encrypted_credentials,
               greatest(extract(epoch FROM s.deadline_at - now()), 0)::float8 AS "time_left!""#,
        worker,
        lease.as_secs_f64(),
        OVERDUE_GRACE.as_secs_f64(),
    )
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let Some(staging) = store::read_one(pool, row.staging_guid).await? else {
        return Ok(None);
    };
    Ok(Some(Claimed {
        staging,
        encrypted_credentials: row.encrypted_credentials,
        time_left: Duration::from_secs_f64(row.time_left),
    }))
}

/// What a heartbeat learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeat {
    /// Still ours; `cancel_requested` if someone asked to stop it.
    Held { cancel_requested: bool },
    /// Another worker took it over (our lease had expired), or it is gone.
    Lost,
}

/// Extends the lease and records progress.
pub async fn heartbeat(
    pool: &PgPool,
    staging_guid: Uuid,
    worker: &str,
    lease: Duration,
    bytes_done: u64,
    bytes_total: Option<u64>,
) -> Result<Heartbeat, sqlx::Error> {
    let row = sqlx::query_scalar!(
        "UPDATE stagings SET lease_expires_at = now() + make_interval(secs => $3), bytes_done = $4, \
         bytes_total = coalesce($5, bytes_total), updated_at = now() \
         WHERE staging_guid = $1 AND lease_owner = $2 AND state = 'running' RETURNING cancel_requested",
        staging_guid,
        worker,
        lease.as_secs_f64(),
        bytes_done as i64,
        bytes_total.map(|b| b as i64),
    )
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some(cancel_requested) => Heartbeat::Held { cancel_requested },
        None => Heartbeat::Lost,
    })
}

/// The lease that keeps the pruner out of the repository an image was pushed to, as the
/// attempt that pushed it holds it.
#[derive(Debug, Clone, Copy)]
pub struct RepositoryLease<'a> {
    pub resource: &'a str,
    pub holder: &'a str,
}

/// How a held staging ends.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// Recorded only while `repository_lease` (the lease keeping the pruner out of the
    /// repository the image was pushed to) is still held by this worker.
    Succeeded {
        report: &'a CopyReport,
        run: &'a RunInfo,
        repository_lease: RepositoryLease<'a>,
    },
    /// A `pin` staging's success: upstream's reference pinned by digest, nothing in the
    /// internal registry (so no repository lease to hold).
    Pinned {
        pinned: &'a Pinned,
    },
    Failed {
        code: Code,
        message: &'a str,
    },
    Cancelled,
}

/// Ends a held running staging as failed or cancelled, with its code and message; returns its
/// GUID, or `None` if this worker no longer holds it.
async fn end_unsuccessful(
    tx: &mut sqlx::PgConnection,
    staging_guid: Uuid,
    worker: &str,
    state: StagingState,
    code: Code,
    message: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    let message = store_safe(message);
    sqlx::query_scalar!(
        "UPDATE stagings SET state = $3, lease_owner = NULL, lease_expires_at = NULL, \
         encrypted_credentials = NULL, waiting_for = NULL, finished_at = now(), updated_at = now(), \
         released_at = CASE WHEN EXISTS (SELECT 1 FROM deleted_apps d \
             WHERE d.app_guid = stagings.app_guid) THEN now() ELSE released_at END, \
         error_code = $4, error_message = $5 \
         WHERE staging_guid = $1 AND lease_owner = $2 AND state = 'running' RETURNING staging_guid",
        staging_guid,
        worker,
        state as StagingState,
        code.as_str(),
        message.as_ref(),
    )
    .fetch_optional(tx)
    .await
}

/// Ends a staging this worker holds, erasing its credentials, and queues its callback in the
/// same transaction. Returns `None` if the staging's lease (or, for a success, the repository
/// lease) was lost meanwhile: then nothing is recorded and the staging will be tried again.
pub async fn finish(
    pool: &PgPool,
    staging_guid: Uuid,
    worker: &str,
    outcome: Outcome<'_>,
) -> Result<Option<Staging>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Every outcome clears the lease and the credentials. An app deleted while its staging ran:
    // the staging's image is released as it ends.
    let ended = match outcome {
        Outcome::Succeeded {
            report,
            run,
            repository_lease,
        } => {
            if !lock_held_lease(&mut tx, repository_lease).await? {
                return Ok(None);
            }
            let start_command = store_safe(&run.start_command);
            let execution_metadata = store_safe(&run.execution_metadata);
            sqlx::query_scalar!(
                "UPDATE stagings SET state = 'succeeded', lease_owner = NULL, lease_expires_at = NULL, \
                 encrypted_credentials = NULL, waiting_for = NULL, finished_at = now(), updated_at = now(), \
                 released_at = CASE WHEN EXISTS (SELECT 1 FROM deleted_apps d \
                     WHERE d.app_guid = stagings.app_guid) THEN now() ELSE released_at END, \
                 source_digest = $3, pinned_image = $4, \
                 tagged_image = $5, bytes_copied = $6, bytes_mounted = $7, bytes_skipped = $8, blobs_copied = $9, \
                 blobs_mounted = $10, blobs_skipped = $11, start_command = $12, execution_metadata = $13, \
                 image_labels = $14, referrers = $15, \
                 bytes_done = $6::bigint + $7::bigint + $8::bigint, bytes_total = $6::bigint + $7::bigint + $8::bigint, error_code = NULL, error_message = NULL \
                 WHERE staging_guid = $1 AND lease_owner = $2 AND state = 'running' RETURNING staging_guid",
                staging_guid,
                worker,
                &report.source_digest,
                &report.pinned,
                &report.tagged,
                report.bytes_copied as i64,
                report.bytes_mounted as i64,
                report.bytes_skipped as i64,
                report.blobs.copied as i32,
                report.blobs.mounted as i32,
                report.blobs.skipped as i32,
                start_command.as_ref(),
                execution_metadata.as_ref(),
                labels_json(run),
                serde_json::to_value(&report.referrers).expect("referrers serialise"),
            )
            .fetch_optional(&mut *tx)
            .await?
        }
        Outcome::Pinned { pinned } => {
            let start_command = store_safe(&pinned.run.start_command);
            let execution_metadata = store_safe(&pinned.run.execution_metadata);
            sqlx::query_scalar!(
                "UPDATE stagings SET state = 'succeeded', lease_owner = NULL, lease_expires_at = NULL, \
                 encrypted_credentials = NULL, waiting_for = NULL, finished_at = now(), updated_at = now(), \
                 released_at = CASE WHEN EXISTS (SELECT 1 FROM deleted_apps d \
                     WHERE d.app_guid = stagings.app_guid) THEN now() ELSE released_at END, \
                 source_digest = $3, pinned_image = $4, tagged_image = NULL, start_command = $5, \
                 execution_metadata = $6, image_labels = $7, bytes_done = 0, bytes_total = 0, \
                 error_code = NULL, error_message = NULL \
                 WHERE staging_guid = $1 AND lease_owner = $2 AND state = 'running' AND mode = 'pin' \
                 RETURNING staging_guid",
                staging_guid,
                worker,
                &pinned.source_digest,
                &pinned.pinned,
                start_command.as_ref(),
                execution_metadata.as_ref(),
                labels_json(&pinned.run),
            )
            .fetch_optional(&mut *tx)
            .await?
        }
        Outcome::Failed { code, message } => {
            end_unsuccessful(
                &mut tx,
                staging_guid,
                worker,
                StagingState::Failed,
                code,
                message,
            )
            .await?
        }
        Outcome::Cancelled => {
            let message = "cancelled while copying";
            end_unsuccessful(
                &mut tx,
                staging_guid,
                worker,
                StagingState::Cancelled,
                Code::Cancelled,
                message,
            )
            .await?
        }
    };
    let staging = read_returned(&mut tx, ended).await?;
    if let (Some(staging), Outcome::Succeeded { report, .. }) = (&staging, &outcome) {
        record_objects(&mut tx, staging.staging_guid, report).await?;
    }
    if let (Some(staging), Outcome::Succeeded { .. } | Outcome::Pinned { .. }) =
        (&staging, &outcome)
    {
        sqlx::query!(
            "INSERT INTO staging_success_deltas (bytes_copied, bytes_mounted, bytes_skipped, seconds) \
             SELECT bytes_copied, bytes_mounted, bytes_skipped, \
                    extract(epoch FROM finished_at - started_at)::float8 \
             FROM stagings WHERE staging_guid = $1",
            staging.staging_guid,
        )
        .execute(&mut *tx)
        .await?;
    }
    if let Some(staging) = &staging {
        enqueue_callback(&mut tx, staging).await?;
    }
    tx.commit().await?;
    Ok(staging)
}

/// The image's labels as stored (`image_labels`, a JSON object), for search.
fn labels_json(run: &RunInfo) -> serde_json::Value {
    serde_json::to_value(&run.labels).expect("a map of strings serialises")
}

/// Whether `lease` is still held, locking its row until `tx` ends: a pruner that would take
/// the repository once the lease expires waits for the commit, and then sees the success (and
/// the image it references) in its own reading of the stagings.
async fn lock_held_lease(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    lease: RepositoryLease<'_>,
) -> Result<bool, sqlx::Error> {
    let held = sqlx::query_scalar!(
        "SELECT 1 AS held FROM leases WHERE resource = $1 AND holder = $2 \
         AND expires_at > clock_timestamp() FOR UPDATE",
        lease.resource,
        lease.holder,
    )
    .fetch_optional(&mut **tx)
    .await?;
    Ok(held.is_some())
}

/// Records a staging `tailor import` copied into the internal registry as succeeded, with what
/// its image is made of, in one transaction and only while `repository_lease` is held (as
/// [`finish`] does). `None` if the lease was lost, or if a staging with this GUID appeared
/// meanwhile: then nothing is recorded.
pub async fn record_imported(
    pool: &PgPool,
    new: &NewStaging,
    report: &CopyReport,
    run: &RunInfo,
    repository_lease: RepositoryLease<'_>,
) -> Result<Option<Staging>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if !lock_held_lease(&mut tx, repository_lease).await? {
        return Ok(None);
    }
    let start_command = store_safe(&run.start_command);
    let execution_metadata = store_safe(&run.execution_metadata);
    let inserted = sqlx::query_scalar!(
        "INSERT INTO stagings (staging_guid, app_guid, source_image, platform, request_fingerprint, \
         api, budget_key, state, started_at, finished_at, deadline_at, source_digest, pinned_image, \
         tagged_image, bytes_copied, bytes_mounted, bytes_skipped, blobs_copied, blobs_mounted, \
         blobs_skipped, bytes_done, bytes_total, start_command, execution_metadata, image_labels) \
         VALUES ($1, $2, $3, $4, $5, 'stage', $6, 'succeeded', now(), now(), now(), $7, $8, $9, \
         $10, $11, $12, $13, $14, $15, $10::bigint + $11::bigint + $12::bigint, \
         $10::bigint + $11::bigint + $12::bigint, $16, $17, $18) \
         ON CONFLICT (staging_guid) DO NOTHING RETURNING staging_guid",
        new.staging_guid(),
        new.app_guid(),
        new.image().to_string(),
        new.platform().to_string(),
        &new.fingerprint(),
        new.budget_key(),
        &report.source_digest,
        &report.pinned,
        &report.tagged,
        report.bytes_copied as i64,
        report.bytes_mounted as i64,
        report.bytes_skipped as i64,
        report.blobs.copied as i32,
        report.blobs.mounted as i32,
        report.blobs.skipped as i32,
        start_command.as_ref(),
        execution_metadata.as_ref(),
        labels_json(run),
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(staging_guid) = inserted else {
        return Ok(None);
    };
    // An imported staging means the app is alive here, as a new staging does.
    sqlx::query!(
        "DELETE FROM deleted_apps WHERE app_guid = $1",
        new.app_guid()
    )
    .execute(&mut *tx)
    .await?;
    record_objects(&mut tx, staging_guid, report).await?;
    let staging = read_one(&mut *tx, staging_guid).await?;
    tx.commit().await?;
    Ok(staging)
}

/// Records what the staged image is made of, for the pruner's reclaimable bytes.
async fn record_objects(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    staging_guid: Uuid,
    report: &CopyReport,
) -> Result<(), sqlx::Error> {
    let (digests, sizes): (Vec<&str>, Vec<i64>) = report
        .objects
        .iter()
        .map(|o| (o.digest.as_str(), o.size as i64))
        .unzip();
    sqlx::query!(
        "INSERT INTO staging_objects (staging_guid, digest, size) \
         SELECT $1, d, s FROM unnest($2::text[], $3::bigint[]) AS o(d, s) \
         ON CONFLICT DO NOTHING",
        staging_guid,
        &digests as &[&str],
        &sizes,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub use super::Waiting;

/// How a staging goes back to the queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Requeue {
    pub after: Duration,
    /// Whether the attempt counts against `TAILOR_MAX_ATTEMPTS`.
    pub counts: bool,
    /// What it waits for; `None` when it is merely handed back (a worker shutting down).
    pub waiting: Option<Waiting>,
    /// Shown while it waits (`code: message`).
    pub last_error: Option<String>,
}

/// Hands a staging this worker holds back to the queue; one due at once wakes the workers.
pub async fn requeue(
    pool: &PgPool,
    staging_guid: Uuid,
    worker: &str,
    requeue: &Requeue,
) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query!(
        "UPDATE stagings SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, \
         attempts = CASE WHEN $5 THEN attempts ELSE greatest(attempts - 1, 0) END, \
         run_after = now() + make_interval(secs => $3), waiting_for = $6, \
         last_error = coalesce($4, last_error), updated_at = now() \
         WHERE staging_guid = $1 AND lease_owner = $2 AND state = 'running'",
        staging_guid,
        worker,
        requeue.after.as_secs_f64(),
        requeue
            .last_error
            .as_deref()
            .map(|e| store_safe(e).into_owned()),
        requeue.counts,
        requeue.waiting as Option<Waiting>,
    )
    .execute(pool)
    .await?;
    if updated.rows_affected() == 1 && requeue.after.is_zero() {
        notify(pool, super::store::NEW_WORK_CHANNEL, staging_guid).await?;
    }
    Ok(updated.rows_affected() == 1)
}
