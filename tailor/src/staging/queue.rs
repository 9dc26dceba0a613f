//! The work queue: stagings claimed with `FOR UPDATE SKIP LOCKED`, held by a lease that a
//! heartbeat extends. A staging whose lease expired (its worker died) is claimable again, so
//! another worker resumes it; attempts are bounded.

use std::time::Duration;

use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

use super::store::enqueue_callback;
use super::{STAGING_COLUMNS, Staging};
use crate::copy::CopyReport;
use crate::image_config::RunInfo;

/// A staging this worker now holds the lease on.
#[derive(Debug)]
pub struct Claimed {
    pub staging: Staging,
    pub encrypted_credentials: Option<Vec<u8>>,
}

/// The claim statement, built once: it needs [`STAGING_COLUMNS`] qualified with `s.`.
static CLAIM_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let columns: Vec<String> = STAGING_COLUMNS
        .split(", ")
        .map(|c| format!("s.{}", c.trim()))
        .collect();
    format!(
        "WITH next AS ( \
             SELECT staging_guid FROM stagings \
             WHERE ((state = 'queued' AND run_after <= now()) \
                 OR (state = 'running' AND lease_expires_at < now())) \
               AND attempts < $3 \
             ORDER BY created_at \
             FOR UPDATE SKIP LOCKED \
             LIMIT 1) \
         UPDATE stagings s SET state = 'running', lease_owner = $1, \
             lease_expires_at = now() + make_interval(secs => $2), attempts = s.attempts + 1, \
             started_at = coalesce(s.started_at, now()), updated_at = now() \
         FROM next WHERE s.staging_guid = next.staging_guid \
         RETURNING {}, s.encrypted_credentials",
        columns.join(", ")
    )
});

/// Claims the oldest claimable staging: queued and due, or running with an expired lease.
pub async fn claim(
    pool: &PgPool,
    worker: &str,
    lease: Duration,
    max_attempts: i32,
) -> Result<Option<Claimed>, sqlx::Error> {
    fail_exhausted(pool, max_attempts).await?;
    let row = sqlx::query(AssertSqlSafe(CLAIM_SQL.as_str()))
        .bind(worker)
        .bind(lease.as_secs_f64())
        .bind(max_attempts)
        .fetch_optional(pool)
        .await?;
    let Some(row) = row else { return Ok(None) };
    use sqlx::{FromRow, Row};
    Ok(Some(Claimed {
        staging: Staging::from_row(&row)?,
        encrypted_credentials: row.try_get("encrypted_credentials")?,
    }))
}

/// Fails stagings whose worker died on their last allowed attempt.
async fn fail_exhausted(pool: &PgPool, max_attempts: i32) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let exhausted: Vec<Staging> = sqlx::query_as(AssertSqlSafe(format!(
        "UPDATE stagings SET state = 'failed', lease_owner = NULL, lease_expires_at = NULL, \
         encrypted_credentials = NULL, error_code = 'ATTEMPTS_EXHAUSTED', \
         error_message = 'gave up after ' || attempts || ' attempts' || coalesce(': ' || last_error, ''), \
         finished_at = now(), updated_at = now() \
         WHERE state = 'running' AND lease_expires_at < now() AND attempts >= $1 \
         RETURNING {STAGING_COLUMNS}"
    )))
    .bind(max_attempts)
    .fetch_all(&mut *tx)
    .await?;
    for staging in &exhausted {
        enqueue_callback(&mut tx, staging).await?;
    }
    tx.commit().await
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
    let row: Option<(bool,)> = sqlx::query_as(
        "UPDATE stagings SET lease_expires_at = now() + make_interval(secs => $3), bytes_done = $4, \
         bytes_total = coalesce($5, bytes_total), updated_at = now() \
         WHERE staging_guid = $1 AND lease_owner = $2 AND state = 'running' RETURNING cancel_requested",
    )
    .bind(staging_guid)
    .bind(worker)
    .bind(lease.as_secs_f64())
    .bind(bytes_done as i64)
    .bind(bytes_total.map(|b| b as i64))
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some((cancel_requested,)) => Heartbeat::Held { cancel_requested },
        None => Heartbeat::Lost,
    })
}

/// How a held staging ends.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    Succeeded {
        report: &'a CopyReport,
        tagged: &'a str,
        run: &'a RunInfo,
    },
    Failed {
        code: &'a str,
        message: &'a str,
    },
    Cancelled,
}

/// Ends a staging this worker holds, erasing its credentials, and queues its callback in the
/// same transaction. Returns `None` if the lease was lost meanwhile. `db` is the pool, or the
/// connection holding the staging's repository lock (so that the lock provably lasts until
/// the success is committed).
pub async fn finish<'c, A>(
    db: A,
    staging_guid: Uuid,
    worker: &str,
    outcome: Outcome<'_>,
) -> Result<Option<Staging>, sqlx::Error>
where
    A: sqlx::Acquire<'c, Database = sqlx::Postgres>,
{
    let mut tx = db.begin().await?;
    // An app deleted while its staging ran: the staging's image is released as it ends.
    let common = "lease_owner = NULL, lease_expires_at = NULL, encrypted_credentials = NULL, \
                  finished_at = now(), updated_at = now(), \
                  released_at = CASE WHEN EXISTS (SELECT 1 FROM deleted_apps d \
                      WHERE d.app_guid = stagings.app_guid) THEN now() ELSE released_at END";
    let guard = "WHERE staging_guid = $1 AND lease_owner = $2 AND state = 'running'";
    let staging: Option<Staging> = match outcome {
        Outcome::Succeeded { report, tagged, run } => {
            sqlx::query_as(AssertSqlSafe(format!(
                "UPDATE stagings SET state = 'succeeded', {common}, source_digest = $3, pinned_image = $4, \
                 tagged_image = $5, bytes_copied = $6, bytes_mounted = $7, bytes_skipped = $8, blobs_copied = $9, \
                 blobs_mounted = $10, blobs_skipped = $11, start_command = $12, execution_metadata = $13, \
                 bytes_done = $6 + $7 + $8, bytes_total = $6 + $7 + $8, error_code = NULL, error_message = NULL  \
                 {guard} RETURNING {STAGING_COLUMNS}"
            )))
            .bind(staging_guid)
            .bind(worker)
            .bind(&report.source_digest)
            .bind(&report.pinned)
            .bind(tagged)
            .bind(report.bytes_copied as i64)
            .bind(report.bytes_mounted as i64)
            .bind(report.bytes_skipped as i64)
            .bind(report.blobs.copied as i32)
            .bind(report.blobs.mounted as i32)
            .bind(report.blobs.skipped as i32)
            .bind(&run.start_command)
            .bind(&run.execution_metadata)
            .fetch_optional(&mut *tx)
            .await?
        }
        Outcome::Failed { code, message } => {
            sqlx::query_as(AssertSqlSafe(format!(
                "UPDATE stagings SET state = 'failed', {common}, error_code = $3, error_message = $4 \
                 {guard} RETURNING {STAGING_COLUMNS}"
            )))
            .bind(staging_guid)
            .bind(worker)
            .bind(code)
            .bind(message)
            .fetch_optional(&mut *tx)
            .await?
        }
        Outcome::Cancelled => {
            sqlx::query_as(AssertSqlSafe(format!(
                "UPDATE stagings SET state = 'cancelled', {common}, error_code = 'CANCELLED', \
                 error_message = 'cancelled while copying' {guard} RETURNING {STAGING_COLUMNS}"
            )))
            .bind(staging_guid)
            .bind(worker)
            .fetch_optional(&mut *tx)
            .await?
        }
    };
    if let (Some(staging), Outcome::Succeeded { report, .. }) = (&staging, &outcome) {
        record_objects(&mut tx, staging.staging_guid, report).await?;
    }
    if let Some(staging) = &staging {
        enqueue_callback(&mut tx, staging).await?;
    }
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
    sqlx::query(
        "INSERT INTO staging_objects (staging_guid, digest, size) \
         SELECT $1, d, s FROM unnest($2::text[], $3::bigint[]) AS o(d, s) \
         ON CONFLICT DO NOTHING",
    )
    .bind(staging_guid)
    .bind(&digests)
    .bind(&sizes)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Puts a staging back in the queue to be tried again after `delay` (a transient failure);
/// the attempt counts.
pub async fn retry_later(
    pool: &PgPool,
    staging_guid: Uuid,
    worker: &str,
    delay: Duration,
    error: &str,
) -> Result<bool, sqlx::Error> {
    requeue(pool, staging_guid, worker, delay, Some(error), true).await
}

/// Gives a staging back without counting the attempt, to be claimed again after `delay`: a
/// worker draining on shutdown, or an internal registry in a maintenance window.
pub async fn release(
    pool: &PgPool,
    staging_guid: Uuid,
    worker: &str,
    delay: Duration,
    reason: Option<&str>,
) -> Result<bool, sqlx::Error> {
    requeue(pool, staging_guid, worker, delay, reason, false).await
}

/// Hands a staging this worker holds back to the queue; one due at once wakes the workers.
async fn requeue(
    pool: &PgPool,
    staging_guid: Uuid,
    worker: &str,
    delay: Duration,
    reason: Option<&str>,
    attempt_counts: bool,
) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE stagings SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, \
         attempts = CASE WHEN $5 THEN attempts ELSE greatest(attempts - 1, 0) END, \
         run_after = now() + make_interval(secs => $3), \
         last_error = coalesce($4, last_error), updated_at = now() \
         WHERE staging_guid = $1 AND lease_owner = $2 AND state = 'running'",
    )
    .bind(staging_guid)
    .bind(worker)
    .bind(delay.as_secs_f64())
    .bind(reason)
    .bind(attempt_counts)
    .execute(pool)
    .await?;
    if updated.rows_affected() == 1 && delay.is_zero() {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(super::store::NEW_WORK_CHANNEL)
            .bind(staging_guid.to_string())
            .execute(pool)
            .await?;
    }
    Ok(updated.rows_affected() == 1)
}

/// Queued stagings, for metrics.
pub async fn depth(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM stagings WHERE state = 'queued'")
        .fetch_one(pool)
        .await
}
