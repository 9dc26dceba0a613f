//! The reference record: what the platform tells tailor about which images are still in use.
//!
//! Two feeds: releases (`DELETE /stage/{guid}` on a finished staging, see
//! [`super::store::stop`], and [`release_app`] for a deleted app), and the periodic
//! [`sync`] with the complete list of stagings in use, after which every finished staging
//! that is not listed is *unreferenced*. The pruner only ever reads this record.

use sqlx::PgPool;
use uuid::Uuid;

use crate::code::Code;

// Stagings a sync may judge ("settled"). The platform builds its list some time before
// sending it, and records a staging only once its callback arrives: a staging still running,
// finished in the last ten minutes, or with a callback not yet delivered may be in use without
// being listed. The two statements of `sync` that judge stagings spell this out alike.

/// A sync may not unreference more than this share of the images in use without `force`...
const SUSPICIOUS_SHARE: f64 = 0.5;
/// ...once there are at least this many (small deployments churn a large share legitimately).
const SUSPICIOUS_MIN_IN_USE: i64 = 10;

/// Why a reference sync was refused.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(
        "the list would unreference {would_unreference} of the {in_use} images in use; \
         if that is intended, repeat the request with ?force=true"
    )]
    Suspicious { in_use: i64, would_unreference: i64 },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl SyncError {
    pub fn code(&self) -> Code {
        match self {
            Self::Suspicious { .. } => Code::SuspiciousReferenceList,
            Self::Database(error) => crate::db::error_code(error),
        }
    }
}

/// What a sync changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SyncReport {
    /// GUIDs in the list that name a staging tailor knows.
    pub listed: i64,
    /// GUIDs in the list that tailor has never seen (ignored).
    pub unknown: i64,
    /// Stagings that were unreferenced and are referenced again.
    pub rereferenced: i64,
    /// Finished stagings this sync marked unreferenced.
    pub unreferenced: i64,
}

/// Applies the platform's complete list of stagings in use. Refuses, unless `force`, a list
/// that would unreference most images in use (one naming no staging tailor knows while any
/// image is in use, or more than half of at least ten), so that a bug upstream cannot wipe the
/// registry. Only settled stagings are judged (see the note at the top of this module).
pub async fn sync(pool: &PgPool, in_use: &[Uuid], force: bool) -> Result<SyncReport, SyncError> {
    let mut tx = pool.begin().await?;
    // One sync at a time: two concurrent lists must not interleave their marks.
    sqlx::query!("SELECT pg_advisory_xact_lock(hashtextextended('tailor-reference-sync', 7))")
        .execute(&mut *tx)
        .await?;
    let counts = sqlx::query!(
        r#"WITH listed AS (SELECT DISTINCT unnest($1::uuid[]) AS staging_guid)
           SELECT count(s.staging_guid) AS "listed!", count(*) - count(s.staging_guid) AS "unknown!"
           FROM listed l LEFT JOIN stagings s USING (staging_guid)"#,
        in_use,
    )
    .fetch_one(&mut *tx)
    .await?;
    let (listed, unknown) = (counts.listed, counts.unknown);
    let judged = sqlx::query!(
        // Set operations (EXCEPT), not a per-row lookup in the list: the planner cannot know
        // the list's length, and a nested-loop guess over 100 000 GUIDs took a minute.
        r#"SELECT (SELECT count(*) FROM stagings
                   WHERE state = 'succeeded' AND pruned_at IS NULL
                     AND released_at IS NULL AND unreferenced_at IS NULL) AS "in_use!",
                  (SELECT count(*) FROM (
                       SELECT s.staging_guid FROM stagings s
                       WHERE s.state = 'succeeded' AND s.pruned_at IS NULL
                         AND s.released_at IS NULL AND s.unreferenced_at IS NULL
                         AND s.finished_at < now() - interval '10 minutes'
                         AND NOT EXISTS (SELECT 1 FROM callbacks c
                                         WHERE c.staging_guid = s.staging_guid AND c.delivered_at IS NULL)
                       EXCEPT SELECT unnest($1::uuid[])) unlisted) AS "would_unreference!""#,
        in_use,
    )
    .fetch_one(&mut *tx)
    .await?;
    let (images_in_use, would_unreference) = (judged.in_use, judged.would_unreference);
    // A list naming none of the stagings tailor knows (empty, or another system's GUIDs) is as
    // suspicious as an empty one.
    let suspicious = would_unreference > 0
        && (listed == 0
            || images_in_use >= SUSPICIOUS_MIN_IN_USE
                && would_unreference as f64 > images_in_use as f64 * SUSPICIOUS_SHARE);
    if suspicious && !force {
        return Err(SyncError::Suspicious {
            in_use: images_in_use,
            would_unreference,
        });
    }
    let rereferenced = sqlx::query!(
        "UPDATE stagings s SET unreferenced_at = NULL, updated_at = now() \
         WHERE s.staging_guid = ANY($1) AND s.unreferenced_at IS NOT NULL",
        in_use,
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let unreferenced = sqlx::query!(
        "UPDATE stagings SET unreferenced_at = now(), updated_at = now() \
         WHERE staging_guid IN ( \
             SELECT s.staging_guid FROM stagings s \
             WHERE s.unreferenced_at IS NULL \
               AND s.state IN ('succeeded', 'failed', 'cancelled') \
               AND s.finished_at < now() - interval '10 minutes' \
               AND NOT EXISTS (SELECT 1 FROM callbacks c \
                               WHERE c.staging_guid = s.staging_guid AND c.delivered_at IS NULL) \
             EXCEPT SELECT unnest($1::uuid[]))",
        in_use,
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(SyncReport {
        listed,
        unknown,
        rereferenced: rereferenced as i64,
        unreferenced: unreferenced as i64,
    })
}

/// What deleting an app did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct AppReleased {
    /// Finished stagings released now (including queued ones this call cancelled).
    pub released: i64,
    /// Queued stagings cancelled, and running ones asked to stop.
    pub cancelled: i64,
}

/// The platform deleted the app: stop its queued and running stagings, release every finished
/// one, and stop protecting its newest image. `None` if tailor never staged the app.
pub async fn release_app(
    pool: &PgPool,
    app_guid: Uuid,
) -> Result<Option<AppReleased>, sqlx::Error> {
    // Recorded first, so that a running staging that ends after this is released as it ends.
    let known = sqlx::query_scalar!(
        r#"WITH known AS (SELECT EXISTS (SELECT 1 FROM stagings WHERE app_guid = $1) AS known),
           recorded AS (INSERT INTO deleted_apps (app_guid) SELECT $1 FROM known WHERE known
                        ON CONFLICT DO NOTHING)
           SELECT known AS "known!" FROM known"#,
        app_guid,
    )
    .fetch_one(pool)
    .await?;
    if !known {
        return Ok(None);
    }
    let active = sqlx::query_scalar!(
        "SELECT staging_guid FROM stagings WHERE app_guid = $1 AND state IN ('queued', 'running')",
        app_guid,
    )
    .fetch_all(pool)
    .await?;
    let mut cancelled = 0;
    for staging_guid in active {
        if matches!(
            super::store::stop(pool, staging_guid).await?,
            super::store::Stopped::Cancelled(_) | super::store::Stopped::CancelRequested(_)
        ) {
            cancelled += 1;
        }
    }
    let released = sqlx::query!(
        "UPDATE stagings SET released_at = now(), updated_at = now() \
         WHERE app_guid = $1 AND released_at IS NULL AND state IN ('succeeded', 'failed', 'cancelled')",
        app_guid,
    )
    .execute(pool)
    .await?
    .rows_affected();
    Ok(Some(AppReleased {
        released: released as i64,
        cancelled,
    }))
}
