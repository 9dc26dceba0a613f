//! Cluster-wide figures for `/metrics`, read from counters so that a scrape costs the same with
//! a million stagings as with ten.
//!
//! Triggers on `stagings` and `callbacks`, and the success path of [`super::queue::finish`],
//! append small delta rows (appends never wait on each other); [`fold`] moves the deltas into
//! one totals row per figure. A scrape folds, then reads the totals: O(states) work, plus the
//! deltas written since the last fold.

use sqlx::PgPool;

use super::{StagingState, Waiting};

/// Histogram bounds for copy durations, in seconds (the `buckets` array of
/// `staging_success_totals` has one count per bound, in this order).
pub const DURATION_BUCKETS: [f64; 9] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

/// The figures.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub by_state: Vec<(StagingState, i64)>,
    pub bytes_copied: i64,
    pub bytes_mounted: i64,
    pub bytes_skipped: i64,
    /// Cumulative counts of successful copy durations at or under each bound.
    pub duration_buckets: Vec<(f64, i64)>,
    pub duration_count: i64,
    pub duration_sum_seconds: f64,
    pub callbacks_pending: i64,
    /// Queued stagings by what they wait for (`retry`, `rate_limit`, `maintenance`).
    pub waiting: Vec<(Waiting, i64)>,
    /// Registries the fleet is leaving alone now, with the seconds left.
    pub rate_limited: Vec<(String, f64)>,
    /// 429s met per registry, ever.
    pub rate_limited_total: Vec<(String, i64)>,
    /// Failed stagings by error code, ever.
    pub failed_by_code: Vec<(String, i64)>,
    /// Age of the oldest queued staging, in seconds (0 when none is queued).
    pub queue_oldest_seconds: f64,
    /// Age of the oldest callback not yet delivered (nor given up), in seconds.
    pub callback_oldest_pending_seconds: f64,
}

/// Folds the counters' deltas into their totals. Safe to run concurrently: each delta row is
/// deleted (and so counted) by exactly one fold.
pub async fn fold(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "WITH d AS (DELETE FROM staging_state_deltas RETURNING state, delta) \
         INSERT INTO staging_state_totals (state, n) \
         SELECT state, sum(delta) FROM d GROUP BY state ORDER BY state \
         ON CONFLICT (state) DO UPDATE SET n = staging_state_totals.n + excluded.n",
    )
    .execute(pool)
    .await?;
    // Each bucket counts the new durations at or under its bound ($1, in bucket order).
    sqlx::query!(
        "WITH d AS (DELETE FROM staging_success_deltas RETURNING *), \
         s AS (SELECT coalesce(sum(bytes_copied), 0)::bigint AS c, coalesce(sum(bytes_mounted), 0)::bigint AS m, \
                      coalesce(sum(bytes_skipped), 0)::bigint AS k, count(*) AS n, \
                      coalesce(sum(seconds), 0)::float8 AS secs FROM d), \
         per_bucket AS (SELECT ARRAY(SELECT (SELECT count(*) FROM d WHERE d.seconds <= u.bound) \
                                     FROM unnest($1::float8[]) WITH ORDINALITY AS u(bound, i) \
                                     ORDER BY u.i)::bigint[] AS counts) \
         UPDATE staging_success_totals t SET bytes_copied = t.bytes_copied + s.c, \
             bytes_mounted = t.bytes_mounted + s.m, bytes_skipped = t.bytes_skipped + s.k, \
             count = t.count + s.n, seconds_sum = t.seconds_sum + s.secs, \
             buckets = ARRAY(SELECT a + b FROM unnest(t.buckets, per_bucket.counts) \
                             WITH ORDINALITY AS u(a, b, i) ORDER BY i) \
         FROM s, per_bucket WHERE s.n > 0",
        &DURATION_BUCKETS[..],
    )
    .execute(pool)
    .await?;
    sqlx::query!(
        "WITH d AS (DELETE FROM callback_pending_deltas RETURNING delta) \
         UPDATE callback_pending_total SET n = n + (SELECT coalesce(sum(delta), 0) FROM d)",
    )
    .execute(pool)
    .await?;
    sqlx::query!(
        "WITH d AS (DELETE FROM staging_failure_deltas RETURNING code, delta) \
         INSERT INTO staging_failure_totals (code, n) \
         SELECT code, sum(delta) FROM d GROUP BY code ORDER BY code \
         ON CONFLICT (code) DO UPDATE SET n = staging_failure_totals.n + excluded.n",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Folds, then reads every figure.
pub async fn snapshot(pool: &PgPool) -> Result<Snapshot, sqlx::Error> {
    fold(pool).await?;
    let by_state = sqlx::query!(
        r#"SELECT state AS "state: StagingState", n FROM staging_state_totals ORDER BY state"#
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|row| (row.state, row.n))
    .collect();
    let success = sqlx::query!(
        "SELECT bytes_copied, bytes_mounted, bytes_skipped, count, seconds_sum, buckets \
         FROM staging_success_totals",
    )
    .fetch_one(pool)
    .await?;
    let callbacks_pending = sqlx::query_scalar!("SELECT n FROM callback_pending_total")
        .fetch_one(pool)
        .await?;
    let waiting = sqlx::query!(
        r#"SELECT waiting_for AS "waiting_for!: Waiting", count(*) AS "n!" FROM stagings
           WHERE state = 'queued' AND waiting_for IS NOT NULL GROUP BY waiting_for"#,
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|row| (row.waiting_for, row.n))
    .collect();
    // Per registry (an account's block counts for its registry): the longest block.
    let rate_limited = sqlx::query!(
        r#"SELECT split_part(budget_key, '#', 1) AS "registry!",
                  max(extract(epoch FROM blocked_until - now()))::float8 AS "seconds!"
           FROM registry_budgets
           WHERE blocked_until > now() GROUP BY 1 ORDER BY 1 LIMIT 1000"#,
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|row| (row.registry, row.seconds))
    .collect();
    let failed_by_code =
        sqlx::query!("SELECT code, n FROM staging_failure_totals ORDER BY code LIMIT 1000")
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|row| (row.code, row.n))
            .collect();
    // Index minimums: the claim index on queued stagings, the pending-callback index.
    let oldest = sqlx::query!(
        r#"SELECT coalesce(extract(epoch FROM now() - (SELECT min(created_at) FROM stagings
                                                      WHERE state = 'queued')), 0)::float8
                      AS "queue!",
                  coalesce(extract(epoch FROM now() - (SELECT min(created_at) FROM callbacks
                                                      WHERE delivered_at IS NULL AND gave_up_at IS NULL)), 0)::float8
                      AS "callback!""#,
    )
    .fetch_one(pool)
    .await?;
    let rate_limited_total = sqlx::query!(
        r#"SELECT split_part(budget_key, '#', 1) AS "registry!",
                  sum(rate_limited_total)::bigint AS "n!"
           FROM registry_budgets GROUP BY 1 ORDER BY 1 LIMIT 1000"#,
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|row| (row.registry, row.n))
    .collect();
    Ok(Snapshot {
        by_state,
        bytes_copied: success.bytes_copied,
        bytes_mounted: success.bytes_mounted,
        bytes_skipped: success.bytes_skipped,
        duration_buckets: DURATION_BUCKETS
            .iter()
            .copied()
            .zip(success.buckets)
            .collect(),
        duration_count: success.count,
        duration_sum_seconds: success.seconds_sum,
        callbacks_pending,
        waiting,
        rate_limited,
        rate_limited_total,
        failed_by_code,
        queue_oldest_seconds: oldest.queue,
        callback_oldest_pending_seconds: oldest.callback,
    })
}
