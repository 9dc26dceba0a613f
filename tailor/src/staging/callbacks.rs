//! Delivering completion callbacks from the outbox.
//!
//! Each callback is delivered on its own: a deliverer claims due rows for the length of one
//! attempt (a short statement, `FOR UPDATE SKIP LOCKED`, so any number of deliverers share the
//! work), POSTs each in a task of its own with its own timeout, and records each result alone.
//! A slow or dead endpoint therefore holds up only its own callbacks. Every URL is checked
//! against the egress policy (on its resolved addresses) before a connection is made, and
//! POSTed through a client that connects only to the addresses checked
//! ([`crate::egress::PolicedClients`]); redirects are never followed. A failed attempt is tried again after a backoff counted from
//! when it ended; a callback is given up after `TAILOR_CALLBACK_RETRY_FOR` (24 h).

use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::egress::{ClientError, Egress, PolicedClients, Purpose};

/// Most callbacks one process delivers at once.
const IN_FLIGHT: usize = 32;

/// How a deliverer behaves.
#[derive(Debug, Clone)]
pub struct DelivererSettings {
    pub egress: Arc<Egress>,
    /// One attempt's deadline.
    pub timeout: Duration,
    /// How long after it was written a callback is given up.
    pub retry_for: Duration,
    /// How often due callbacks are looked for.
    pub poll: Duration,
}

struct Due {
    id: i64,
    staging_guid: uuid::Uuid,
    url: String,
    payload: serde_json::Value,
    attempts: i32,
}

/// Delivers due callbacks until `shutdown`.
pub async fn run_deliverer(pool: PgPool, settings: DelivererSettings, shutdown: CancellationToken) {
    let clients = match callback_clients(&settings) {
        Ok(clients) => Arc::new(clients),
        Err(error) => {
            tracing::error!(%error, "the callback deliverer cannot start");
            return;
        }
    };
    let mut in_flight = JoinSet::new();
    let mut last_fold = tokio::time::Instant::now();
    while !shutdown.is_cancelled() {
        let room = IN_FLIGHT - in_flight.len();
        if room > 0 {
            match claim_due(&pool, &settings, room).await {
                Ok(due) => {
                    for callback in due {
                        let (pool, clients, settings) =
                            (pool.clone(), clients.clone(), settings.clone());
                        in_flight.spawn(async move {
                            deliver(&pool, &clients, &settings, callback).await
                        });
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "could not look for due callbacks; will retry")
                }
            }
        }
        // Counters are folded here too, so /metrics stays cheap even when nobody scrapes.
        if last_fold.elapsed() > Duration::from_secs(60) {
            last_fold = tokio::time::Instant::now();
            if let Err(error) = super::metrics::fold(&pool).await {
                tracing::debug!(%error, "could not fold the metric counters");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            () = tokio::time::sleep(settings.poll) => {}
        }
    }
    // Deliveries under way finish (each is bounded by its timeout).
    while in_flight.join_next().await.is_some() {}
}

/// The clients callbacks are POSTed with: one per checked destination, each connecting only to
/// the addresses its check allowed, never redirected, never through a proxy.
fn callback_clients(settings: &DelivererSettings) -> Result<PolicedClients, String> {
    let tls = crate::tls::client_config(&[])?;
    let connect_timeout = settings.timeout;
    PolicedClients::new(
        settings.egress.clone(),
        Purpose::Callback,
        Arc::new(move || {
            reqwest::Client::builder()
                .user_agent(concat!("tailor/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(connect_timeout)
                .tls_backend_preconfigured(tls.clone())
        }),
    )
    .map_err(|e| e.to_string())
}

/// Claims up to `limit` due callbacks for the length of one attempt; gives up on the ones
/// past their retry period.
async fn claim_due(
    pool: &PgPool,
    settings: &DelivererSettings,
    limit: usize,
) -> Result<Vec<Due>, sqlx::Error> {
    sqlx::query!(
        "UPDATE callbacks SET gave_up_at = now(), claimed_until = NULL \
         WHERE delivered_at IS NULL AND gave_up_at IS NULL \
           AND created_at < now() - make_interval(secs => $1) \
           AND (claimed_until IS NULL OR claimed_until < now())",
        settings.retry_for.as_secs_f64()
    )
    .execute(pool)
    .await?;
    sqlx::query_as!(
        Due,
        "UPDATE callbacks SET claimed_until = now() + make_interval(secs => $1) \
         WHERE id IN (SELECT id FROM callbacks \
                      WHERE delivered_at IS NULL AND gave_up_at IS NULL AND next_attempt_at <= now() \
                        AND (claimed_until IS NULL OR claimed_until < now()) \
                      ORDER BY next_attempt_at FOR UPDATE SKIP LOCKED LIMIT $2) \
         RETURNING id, staging_guid, url, payload, attempts",
        // Long enough for the attempt; a deliverer that dies mid-attempt frees it after this.
        (settings.timeout + Duration::from_secs(30)).as_secs_f64(),
        limit as i64,
    )
    .fetch_all(pool)
    .await
}

/// One attempt at one callback, and its result recorded.
async fn deliver(pool: &PgPool, clients: &PolicedClients, settings: &DelivererSettings, due: Due) {
    let failure = attempt(clients, settings, &due).await;
    let recorded = match &failure {
        None => sqlx::query!("UPDATE callbacks SET delivered_at = now(), attempts = attempts + 1, claimed_until = NULL \
             WHERE id = $1", due.id)
        .execute(pool)
        .await,
        Some(error) => sqlx::query!("UPDATE callbacks SET attempts = attempts + 1, last_error = $2, claimed_until = NULL, \
             next_attempt_at = now() + make_interval(secs => $3) WHERE id = $1", due.id, error, backoff(due.attempts).as_secs_f64())
        .execute(pool)
        .await,
    };
    match (&failure, recorded) {
        (None, Ok(_)) => {
            tracing::info!(staging_guid = %due.staging_guid, "completion callback delivered")
        }
        (Some(error), Ok(_)) => tracing::warn!(
            staging_guid = %due.staging_guid,
            %error,
            retry_in_s = backoff(due.attempts).as_secs(),
            "completion callback failed"
        ),
        (_, Err(error)) => tracing::warn!(
            staging_guid = %due.staging_guid,
            %error,
            "could not record a callback attempt; it will be tried again"
        ),
    }
}

/// POSTs the payload; `Some(why)` if it was not delivered.
async fn attempt(
    clients: &PolicedClients,
    settings: &DelivererSettings,
    due: &Due,
) -> Option<String> {
    let url = match Url::parse(&due.url) {
        Ok(url) => url,
        Err(_) => return Some("the callback URL is not a URL".into()),
    };
    let http = match clients.client_for(&url).await {
        Ok(http) => http,
        Err(ClientError::Denied(denied)) => {
            return Some(match denied.reason {
                crate::egress::DenyReason::Unresolvable { .. } => {
                    format!("callback unreachable: {denied}")
                }
                _ => format!("{}: {denied}", denied.code()),
            });
        }
        Err(setup @ ClientError::Setup { .. }) => {
            return Some(format!("callback unreachable: {setup}"));
        }
    };
    let sent = http
        .post(url)
        .json(&due.payload)
        .timeout(settings.timeout)
        .send()
        .await;
    match sent {
        Ok(response) if response.status().is_success() => None,
        Ok(response) if response.status().is_redirection() => Some(format!(
            "callback answered {}; redirects are not followed",
            response.status()
        )),
        Ok(response) => Some(format!("callback answered {}", response.status())),
        Err(error) if error.is_timeout() => Some(format!(
            "callback did not answer within {}s",
            settings.timeout.as_secs()
        )),
        Err(error) => match crate::egress::find_denial(&error) {
            Some(denied) => Some(format!("{}: {denied}", denied.code())),
            None => Some("callback unreachable".to_owned()),
        },
    }
}

/// 1 s, 2 s, 4 s ... capped at 10 minutes.
fn backoff(attempts: i32) -> Duration {
    Duration::from_secs(1u64 << attempts.clamp(0, 10) as u64).min(Duration::from_secs(600))
}
