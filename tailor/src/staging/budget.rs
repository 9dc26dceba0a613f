//! The fleet's rate-limit budget per upstream registry and account.
//!
//! A budget is keyed by the staging's `budget_key`: the registry for anonymous pulls (which a
//! registry counts by the fleet's addresses), `registry#<hash of the account>` for pulls with
//! credentials (which it counts per account), so one tenant's exhausted quota stops only that
//! tenant's stagings.
//!
//! A 429 is shared knowledge: whichever worker meets it records in `registry_budgets` until
//! when the budget is to be left alone (the registry's `Retry-After`, seconds or HTTP date, at
//! most a day, or a minute when it gives none; Docker Hub's `ratelimit-remaining: 0` counts as
//! a 429 coming), and notifies `tailor_budgets`. From then on:
//!
//! - no staging spending that budget is claimed until the block ends (the claim query skips it);
//! - a running copy sends nothing more to it: every request asks [`StagingBudget::admit`],
//!   answered from this process's view of the budgets (kept current by the notifications), and
//!   a refusal sends the staging back to the queue until the block ends;
//! - when the block ends, exactly one worker in the fleet is admitted as the *probe*
//!   ([`Budgets::admit_staging`]); its first answer from the registry either lifts the block
//!   for everyone or renews it. So 50 workers against a rate-limited Docker Hub send about one
//!   request per budget window, not one each.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use sqlx::PgPool;

use crate::registry::RegistryObserver;
use crate::registry::observe::RateLimitHeaders;
use crate::registry::retry::retry_after;

/// The channel a changed budget is announced on (payload: the budget key).
pub const CHANGED_CHANNEL: &str = "tailor_budgets";
/// How long a registry is left alone after a 429 that says nothing of when to come back.
pub const DEFAULT_BLOCK: Duration = Duration::from_secs(60);
/// The longest block recorded, whatever a registry says (a `Retry-After` of years is a
/// misconfiguration or an attack, and the staging's deadline ends it long before).
pub const MAX_BLOCK: Duration = Duration::from_secs(24 * 3600);
/// How long a probe may take before another worker may probe instead.
const PROBE_FOR: Duration = Duration::from_secs(60);

/// What [`Budgets::admit_staging`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Nothing is known against the registry.
    Go,
    /// A block just ended and this staging is the fleet's one probe.
    Probe,
    /// Come back at this time.
    Wait(DateTime<Utc>),
}

/// This process's view of the fleet's budgets, and its writes to them.
pub struct Budgets {
    pool: PgPool,
    /// Budgets nobody may spend, until when (a local clock reading).
    blocked: Mutex<HashMap<String, Instant>>,
}

impl Budgets {
    pub fn new(pool: PgPool) -> Arc<Self> {
        Arc::new(Self {
            pool,
            blocked: Mutex::new(HashMap::new()),
        })
    }

    /// Decides whether a staging spending `budget_key`, claimed by `holder`, may start now.
    pub async fn admit_staging(
        &self,
        budget_key: &str,
        holder: &str,
    ) -> Result<Admission, sqlx::Error> {
        let admitted = sqlx::query!(
            r#"SELECT verdict AS "verdict!", wait_until FROM admit_to_registry($1, $2, $3)"#,
            budget_key,
            holder,
            PROBE_FOR.as_secs_f64(),
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(match (admitted.verdict.as_str(), admitted.wait_until) {
            ("probe", _) => Admission::Probe,
            ("wait", Some(until)) => Admission::Wait(until),
            _ => Admission::Go,
        })
    }

    /// Reloads the blocks from the database (after a notification, or periodically).
    pub async fn refresh(&self) -> Result<(), sqlx::Error> {
        let rows = sqlx::query!(
            r#"SELECT budget_key, extract(epoch FROM blocked_until - now())::float8 AS "seconds!"
               FROM registry_budgets WHERE blocked_until > now()"#,
        )
        .fetch_all(&self.pool)
        .await?;
        let now = Instant::now();
        let mut blocked = self.blocked.lock().unwrap_or_else(PoisonError::into_inner);
        blocked.clear();
        for row in rows {
            let wait = Duration::try_from_secs_f64(row.seconds)
                .unwrap_or_default()
                .min(MAX_BLOCK);
            blocked.insert(row.budget_key, now + wait);
        }
        Ok(())
    }

    /// Keeps the view current until `shutdown`: on every budget notification, and every `poll`.
    pub async fn follow(
        self: Arc<Self>,
        mut changed: tokio::sync::watch::Receiver<u64>,
        poll: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            if let Err(error) = self.refresh().await {
                tracing::debug!(%error, "could not read the rate-limit budgets");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = changed.changed() => {}
                () = tokio::time::sleep(poll) => {}
            }
        }
    }

    fn blocked_for(&self, key: &str) -> Option<Duration> {
        let blocked = self.blocked.lock().unwrap_or_else(PoisonError::into_inner);
        let until = blocked.get(key)?;
        until.checked_duration_since(Instant::now())
    }

    /// Records a block of budget `key` for `wait` (at most [`MAX_BLOCK`], fleet-wide) and
    /// tells everyone.
    fn block(self: &Arc<Self>, key: &str, wait: Duration) {
        let wait = wait.min(MAX_BLOCK);
        if let Some(until) = Instant::now().checked_add(wait) {
            self.blocked
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key.to_owned(), until);
        }
        let this = self.clone();
        let key = key.to_owned();
        tokio::spawn(async move {
            let recorded = sqlx::query!("WITH up AS ( \
                   INSERT INTO registry_budgets (budget_key, blocked_until, rate_limited_total) \
                   VALUES ($1, now() + make_interval(secs => $2), 1) \
                   ON CONFLICT (budget_key) DO UPDATE SET \
                     blocked_until = greatest(registry_budgets.blocked_until, excluded.blocked_until), \
                     probe_holder = NULL, probe_until = NULL, \
                     rate_limited_total = registry_budgets.rate_limited_total + 1, updated_at = now() \
                   RETURNING budget_key) \
                 SELECT pg_notify($3, budget_key) FROM up", &key, wait.as_secs_f64(), CHANGED_CHANNEL)
            .execute(&this.pool)
            .await;
            if let Err(error) = recorded {
                tracing::warn!(%error, budget = %key, "could not record the rate limit; other workers will learn it themselves");
            }
        });
    }

    /// The probe got an ordinary answer: the budget is open to everyone again.
    fn lift(self: &Arc<Self>, key: &str, holder: &str) {
        self.blocked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
        let this = self.clone();
        let (key, holder) = (key.to_owned(), holder.to_owned());
        tokio::spawn(async move {
            let lifted = sqlx::query!(
                "WITH up AS ( \
                   UPDATE registry_budgets SET blocked_until = NULL, probe_holder = NULL, \
                     probe_until = NULL, updated_at = now() \
                   WHERE budget_key = $1 AND probe_holder = $2 AND blocked_until <= now() \
                   RETURNING budget_key) \
                 SELECT pg_notify($3, budget_key) FROM up",
                &key,
                &holder,
                CHANGED_CHANNEL
            )
            .execute(&this.pool)
            .await;
            if let Err(error) = lifted {
                tracing::warn!(%error, budget = %key, "could not lift the rate limit; it lifts when the probe lease expires");
            }
        });
    }

    /// An observer for one staging's source registry, spending budget `key`.
    pub fn for_staging(
        self: &Arc<Self>,
        key: &str,
        holder: &str,
        probing: bool,
    ) -> Arc<StagingBudget> {
        Arc::new(StagingBudget {
            budgets: self.clone(),
            key: key.to_owned(),
            holder: holder.to_owned(),
            probing: AtomicBool::new(probing),
        })
    }
}

/// One staging's side of the budget: it asks before every request to its source and reports
/// every answer. While it is the probe, it is let through the block it is probing.
pub struct StagingBudget {
    budgets: Arc<Budgets>,
    /// The budget spent (the registry the observer is attached to, maybe with an account).
    key: String,
    holder: String,
    probing: AtomicBool,
}

impl RegistryObserver for StagingBudget {
    fn admit(&self, _registry: &str) -> Result<(), Duration> {
        if self.probing.load(Ordering::Relaxed) {
            return Ok(());
        }
        match self.budgets.blocked_for(&self.key) {
            Some(wait) => Err(wait),
            None => Ok(()),
        }
    }

    fn observed(&self, registry: &str, status: StatusCode, headers: &HeaderMap) {
        if status == StatusCode::TOO_MANY_REQUESTS {
            let wait = retry_after(headers)
                .unwrap_or(DEFAULT_BLOCK)
                .clamp(Duration::from_secs(1), MAX_BLOCK);
            tracing::info!(%registry, wait_s = wait.as_secs(), "upstream rate limit: the fleet waits");
            self.probing.store(false, Ordering::Relaxed);
            self.budgets.block(&self.key, wait);
            return;
        }
        if RateLimitHeaders::parse(headers).is_some_and(|h| h.remaining == Some(0)) {
            // The next request would be refused: stop the fleet before it is, this staging
            // (even if it was probing) included.
            self.probing.store(false, Ordering::Relaxed);
            self.budgets.block(&self.key, DEFAULT_BLOCK);
            return;
        }
        // A 5xx says nothing about the rate limit: the probe goes on until a real answer.
        if !status.is_server_error() && self.probing.swap(false, Ordering::Relaxed) {
            tracing::info!(%registry, "rate limit probe answered: the registry is open again");
            self.budgets.lift(&self.key, &self.holder);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Budgets whose database writes go nowhere (logged and dropped): the local view is what
    /// is tested here; the fleet-wide behaviour is in the API and spec tests.
    fn budgets() -> Arc<Budgets> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(10))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("a lazy pool");
        Budgets::new(pool)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, value.parse().unwrap());
        }
        headers
    }

    #[tokio::test]
    async fn a_probe_ends_on_a_real_answer_not_on_a_5xx() {
        let budgets = budgets();
        let other = budgets.for_staging("hub", "w1", false);
        other.observed(
            "hub",
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "30")]),
        );
        assert!(other.admit("hub").is_err(), "blocked for everyone");
        assert!(
            budgets
                .for_staging("hub#alice", "w3", false)
                .admit("hub")
                .is_ok(),
            "another account is not"
        );

        let probe = budgets.for_staging("hub", "w2", true);
        assert!(probe.admit("hub").is_ok(), "the probe is let through");
        probe.observed("hub", StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new());
        assert!(
            probe.admit("hub").is_ok(),
            "a 503 says nothing about the limit: still probing"
        );
        // An answer that says the budget is spent ends the probe like a 429 would.
        probe.observed(
            "hub",
            StatusCode::OK,
            &headers(&[("ratelimit-remaining", "0;w=21600")]),
        );
        assert!(
            probe.admit("hub").is_err(),
            "no longer probing, and blocked"
        );
    }

    #[tokio::test]
    async fn absurd_retry_afters_are_capped() {
        let budgets = budgets();
        let staging = budgets.for_staging("hub", "w1", false);
        staging.observed(
            "hub",
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", &u64::MAX.to_string())]),
        );
        let wait = staging.admit("hub").unwrap_err();
        assert!(
            wait <= MAX_BLOCK && wait > MAX_BLOCK - Duration::from_secs(60),
            "{wait:?}"
        );
    }
}
