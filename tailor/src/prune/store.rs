//! The pruner's SQL: reading the candidates and what live stagings share with them, marking and
//! unmarking stagings pruned, the audit trail, the run's summary row, and the figures
//! `/metrics` shows. The rules that decide live in the parent module; every statement here is
//! checked at compile time.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::{Action, PruneReport, Reason};
use crate::reference::ImageReference;

/// A prunable staging, as the database sees it now.
#[derive(Debug, Clone)]
pub(super) struct Candidate {
    pub(super) staging_guid: Uuid,
    pub(super) app_guid: Uuid,
    pub(super) pinned_image: ImageReference,
    /// `<repository>@<digest>`: the manifest revision, whatever host name the pinned
    /// reference was written with (the `pinned_manifest` column).
    pub(super) manifest: String,
    pub(super) reason: Reason,
}

/// The prunable stagings (of one app, or all): see the module docs for the rules. Only copies
/// are: a pinned-only staging has nothing in the internal registry (its reference is
/// upstream's, whose repository path may even spell an internal one's). Their rows
/// are locked until the transaction ends (the statement's end, outside one), so that a
/// reference sync cannot change the verdict between this read and the deletion. One checked
/// statement serves the locked reads and the plain ones (the listing, the dry run), so they
/// cannot drift apart; the price is that a reference sync touching the same rows waits for a
/// plain read too, and in the rare interleaving where each holds a row the other wants,
/// PostgreSQL's deadlock detection fails one of them, which its caller retries (the prune
/// run at its next schedule, the sync by the platform). A candidate's manifest is its
/// `pinned_manifest` (its pinned reference without the registry host).
pub(super) async fn candidates<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    grace: Duration,
    app: Option<Uuid>,
) -> Result<Vec<Candidate>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"WITH newest AS (
               SELECT DISTINCT ON (app_guid) staging_guid FROM stagings
               WHERE state = 'succeeded' AND ($2::uuid IS NULL OR app_guid = $2)
               ORDER BY app_guid, finished_at DESC, created_at DESC)
           SELECT s.staging_guid, s.app_guid, s.pinned_image AS "pinned_image!: ImageReference",
               s.pinned_manifest AS "manifest!",
               CASE WHEN d.app_guid IS NOT NULL THEN 'app_deleted'
                    WHEN s.released_at <= now() - make_interval(secs => $1) THEN 'released'
                    ELSE 'unreferenced' END AS "reason!: Reason"
           FROM stagings s LEFT JOIN deleted_apps d ON d.app_guid = s.app_guid
           WHERE s.state = 'succeeded' AND s.pruned_at IS NULL AND s.mode = 'copy'
             AND ($2::uuid IS NULL OR s.app_guid = $2)
             AND least(s.released_at, s.unreferenced_at) <= now() - make_interval(secs => $1)
             AND (d.app_guid IS NOT NULL OR s.staging_guid NOT IN (SELECT staging_guid FROM newest))
           ORDER BY s.app_guid, s.finished_at
           FOR UPDATE OF s"#,
        grace.as_secs_f64(),
        app,
    )
    .fetch_all(executor)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| Candidate {
            staging_guid: row.staging_guid,
            app_guid: row.app_guid,
            pinned_image: row.pinned_image,
            manifest: row.manifest,
            reason: row.reason,
        })
        .collect())
}

/// Of `candidates`' manifests, those a staging outside `candidates` still uses.
pub(super) async fn shared_with_live<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    candidates: &[Candidate],
) -> Result<HashSet<String>, sqlx::Error> {
    let manifests: Vec<&str> = candidates.iter().map(|c| c.manifest.as_str()).collect();
    let guids: Vec<Uuid> = candidates.iter().map(|c| c.staging_guid).collect();
    let shared = sqlx::query_scalar!(
        r#"SELECT DISTINCT pinned_manifest AS "pinned_manifest!" FROM stagings
           WHERE state = 'succeeded' AND pruned_at IS NULL
             AND pinned_manifest IN (SELECT unnest($1::text[]))
             AND staging_guid NOT IN (SELECT unnest($2::uuid[]))"#,
        &manifests as &[&str],
        &guids,
    )
    .fetch_all(executor)
    .await?;
    Ok(shared.into_iter().collect())
}

/// Bytes of the objects that the stagings in `pruned` use and no other image in the registry does.
pub(super) async fn reclaimable_bytes(pool: &PgPool, pruned: &[Uuid]) -> Result<u64, sqlx::Error> {
    // Set-at-a-time (hash joins), not a lookup per object: a run can prune thousands.
    let bytes = sqlx::query_scalar!(
        r#"WITH pruned AS (SELECT DISTINCT unnest($1::uuid[]) AS staging_guid),
         theirs AS (SELECT DISTINCT o.digest, o.size FROM staging_objects o
                    JOIN pruned USING (staging_guid)),
         still_used AS (SELECT DISTINCT o.digest FROM staging_objects o
                        JOIN stagings s USING (staging_guid)
                        WHERE s.state = 'succeeded' AND s.pruned_at IS NULL
                          AND o.digest IN (SELECT digest FROM theirs)
                          AND s.staging_guid NOT IN (SELECT staging_guid FROM pruned))
         SELECT coalesce(sum(size), 0)::bigint AS "bytes!" FROM theirs
         WHERE digest NOT IN (SELECT digest FROM still_used)"#,
        pruned
    )
    .fetch_one(pool)
    .await?;
    Ok(bytes as u64)
}

/// Forgets checkpoints of chunked uploads nobody resumed for a week: distribution purges
/// unfinished upload sessions after that long by default (`storage.maintenance.uploadpurging`),
/// so there is nothing left to resume. Answers how many it forgot.
pub(super) async fn forget_stale_checkpoints(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let deleted =
        sqlx::query!("DELETE FROM blob_uploads WHERE updated_at < now() - interval '7 days'")
            .execute(pool)
            .await?;
    Ok(deleted.rows_affected())
}

/// A real run's summary row, written as it starts.
pub(super) async fn start_run(pool: &PgPool, grace: Duration) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        "INSERT INTO prune_runs (grace_seconds) VALUES ($1) RETURNING id",
        grace.as_secs() as i64
    )
    .fetch_one(pool)
    .await
}

/// Completes the run's summary row.
pub(super) async fn finish_run(
    pool: &PgPool,
    id: i64,
    report: &PruneReport,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE prune_runs SET finished_at = now(), outcome = $2, images_pruned = $3, \
         manifests_deleted = $4, bytes_reclaimable = $5, error = $6 WHERE id = $1",
        id,
        report.outcome.as_str(),
        report.images_pruned as i32,
        report.manifests_deleted as i32,
        report.bytes_reclaimable as i64,
        (!report.errors.is_empty()).then(|| report.errors.join("; "))
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Holds the app's `deleted_apps` row (if any) until `tx` ends: a new staging of the app
/// (which would make it exist again) waits meanwhile.
pub(super) async fn hold_app(
    tx: &mut Transaction<'_, Postgres>,
    app: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT 1 AS deleted FROM deleted_apps WHERE app_guid = $1 FOR SHARE",
        app
    )
    .fetch_optional(&mut **tx)
    .await?;
    Ok(())
}

/// Audit rows saying "deleting", written with the decision; [`record`] turns them into the
/// outcome.
pub(super) async fn audit_intent(
    tx: &mut Transaction<'_, Postgres>,
    run_id: Option<i64>,
    repository: &str,
    stagings: &[&Candidate],
) -> Result<Vec<i64>, sqlx::Error> {
    let guids: Vec<Uuid> = stagings.iter().map(|c| c.staging_guid).collect();
    let apps: Vec<Uuid> = stagings.iter().map(|c| c.app_guid).collect();
    let reasons: Vec<&str> = stagings.iter().map(|c| c.reason.as_str()).collect();
    sqlx::query_scalar!("INSERT INTO prune_audit (run_id, staging_guid, app_guid, repository, manifest_digest, reason, action) \
         SELECT $1, g, a, $2, $3, r, 'deleting' FROM unnest($4::uuid[], $5::uuid[], $6::text[]) AS u(g, a, r) \
         RETURNING id", run_id, repository, pinned_digest(&stagings[0].pinned_image), &guids, &apps, &reasons as &[&str])
    .fetch_all(&mut **tx)
    .await
}

/// Marks `stagings` pruned (the decision), or not (the deletion failed: the images are still
/// in the registry).
async fn set_pruned(
    tx: &mut Transaction<'_, Postgres>,
    stagings: &[&Candidate],
    pruned: bool,
) -> Result<(), sqlx::Error> {
    let guids: Vec<Uuid> = stagings.iter().map(|c| c.staging_guid).collect();
    sqlx::query!(
        "UPDATE stagings SET pruned_at = CASE WHEN $2 THEN now() END, updated_at = now() \
         WHERE staging_guid = ANY($1)",
        &guids,
        pruned,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Marks `stagings` pruned (the decision; undone by [`unmark_pruned`] if the deletion fails).
pub(super) async fn mark_pruned(
    tx: &mut Transaction<'_, Postgres>,
    stagings: &[&Candidate],
) -> Result<(), sqlx::Error> {
    set_pruned(tx, stagings, true).await
}

/// A deletion failed: the images are still in the registry, so they are not pruned, and the
/// audit rows written for them (`intents`) go.
pub(super) async fn unmark_pruned(
    tx: &mut Transaction<'_, Postgres>,
    stagings: &[&Candidate],
    intents: &[i64],
) -> Result<(), sqlx::Error> {
    set_pruned(tx, stagings, false).await?;
    sqlx::query!("DELETE FROM prune_audit WHERE id = ANY($1)", intents)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Completes the audit rows of a deletion.
pub(super) async fn record(
    tx: &mut Transaction<'_, Postgres>,
    intents: &[i64],
    action: Action,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE prune_audit SET action = $2, pruned_at = now() WHERE id = ANY($1)",
        intents,
        match action {
            Action::AlreadyGone => "already_gone",
            _ => "deleted",
        }
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The manifest digest a candidate is pinned to (`candidates` reads only succeeded stagings,
/// whose pinned reference always has one).
pub(super) fn pinned_digest(pinned_image: &ImageReference) -> &str {
    pinned_image.digest.as_deref().unwrap_or_default()
}

/// Prune figures for `/metrics`, from the runs recorded in the database.
#[derive(Debug, Default, Clone)]
pub struct PruneMetrics {
    pub images_pruned_total: i64,
    pub manifests_deleted_total: i64,
    /// The last finished run's reclaimable bytes.
    pub bytes_reclaimable: i64,
    /// Unix time the last run finished, and its outcome.
    pub last_run: Option<(f64, String)>,
}

pub async fn metrics(pool: &PgPool) -> Result<PruneMetrics, sqlx::Error> {
    let totals = sqlx::query!(
        r#"SELECT coalesce(sum(images_pruned), 0)::bigint AS "images!",
                  coalesce(sum(manifests_deleted), 0)::bigint AS "manifests!"
           FROM prune_runs"#,
    )
    .fetch_one(pool)
    .await?;
    let last = sqlx::query!(
        r#"SELECT extract(epoch FROM finished_at)::float8 AS "finished_at!", outcome AS "outcome!",
                  bytes_reclaimable AS "bytes_reclaimable!"
           FROM prune_runs
           WHERE finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1"#,
    )
    .fetch_optional(pool)
    .await?;
    Ok(PruneMetrics {
        images_pruned_total: totals.images,
        manifests_deleted_total: totals.manifests,
        bytes_reclaimable: last.as_ref().map_or(0, |l| l.bytes_reclaimable),
        last_run: last.map(|l| (l.finished_at, l.outcome)),
    })
}
