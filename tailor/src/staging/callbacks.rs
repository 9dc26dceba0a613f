//! Delivering completion callbacks from the outbox: due rows are claimed with
//! `FOR UPDATE SKIP LOCKED` (so any number of deliverers share the work), POSTed, and either
//! marked delivered or scheduled again with exponential backoff. Rows survive restarts.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Most attempts before a callback is given up (about a day of backoff).
pub const MAX_ATTEMPTS: i32 = 20;
const BATCH: i64 = 16;

#[derive(sqlx::FromRow)]
struct Due {
    id: i64,
    staging_guid: uuid::Uuid,
    url: String,
    payload: serde_json::Value,
    attempts: i32,
}

/// Delivers due callbacks until `shutdown`, waking every `poll`.
pub async fn run_deliverer(
    pool: PgPool,
    http: reqwest::Client,
    poll: Duration,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        match deliver_due(&pool, &http).await {
            Ok(delivered) if delivered > 0 => continue,
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "callback delivery failed; will retry"),
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(poll) => {}
        }
    }
}

/// One pass: delivers what is due; returns how many were attempted.
pub async fn deliver_due(pool: &PgPool, http: &reqwest::Client) -> Result<usize, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let due: Vec<Due> = sqlx::query_as(
        "SELECT id, staging_guid, url, payload, attempts FROM callbacks \
         WHERE delivered_at IS NULL AND next_attempt_at <= now() AND attempts < $1 \
         ORDER BY next_attempt_at FOR UPDATE SKIP LOCKED LIMIT $2",
    )
    .bind(MAX_ATTEMPTS)
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    for callback in &due {
        let outcome = http
            .post(&callback.url)
            .json(&callback.payload)
            .timeout(Duration::from_secs(15))
            .send()
            .await;
        let failure = match outcome {
            Ok(response) if response.status().is_success() => None,
            Ok(response) => Some(format!("callback answered {}", response.status())),
            Err(error) if error.is_timeout() => Some("callback timed out".to_owned()),
            Err(_) => Some("callback unreachable".to_owned()),
        };
        match failure {
            None => {
                sqlx::query("UPDATE callbacks SET delivered_at = now(), attempts = attempts + 1 WHERE id = $1")
                    .bind(callback.id)
                    .execute(&mut *tx)
                    .await?;
                tracing::info!(staging_guid = %callback.staging_guid, "completion callback delivered");
            }
            Some(error) => {
                let delay = backoff(callback.attempts);
                sqlx::query(
                    "UPDATE callbacks SET attempts = attempts + 1, last_error = $2, \
                     next_attempt_at = now() + make_interval(secs => $3) WHERE id = $1",
                )
                .bind(callback.id)
                .bind(&error)
                .bind(delay.as_secs_f64())
                .execute(&mut *tx)
                .await?;
                tracing::warn!(staging_guid = %callback.staging_guid, %error, retry_in_s = delay.as_secs(), "completion callback failed");
            }
        }
    }
    tx.commit().await?;
    Ok(due.len())
}

/// 1 s, 2 s, 4 s ... capped at 10 minutes.
fn backoff(attempts: i32) -> Duration {
    Duration::from_secs(1u64 << attempts.clamp(0, 10) as u64).min(Duration::from_secs(600))
}
