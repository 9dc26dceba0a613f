//! The fleet's rate-limit budget per upstream registry.
//!
//! A 429 is shared knowledge: whichever worker meets it records in `registry_budgets` until
//! when the registry is to be left alone (its `Retry-After`, seconds or HTTP date, or a minute
//! when it gives none; Docker Hub's `ratelimit-remaining: 0` counts as a 429 coming), and
//! notifies `tailor_budgets`. From then on:
//!
//! - no staging for that registry is claimed until the block ends (the claim query skips it);
//! - a running copy sends nothing more to it: every request asks [`StagingBudget::admit`],
//!   answered from this process's view of the budgets (kept current by the notifications), and
//!   a refusal sends the staging back to the queue until the block ends;
//! - when the block ends, exactly one worker in the fleet is admitted as the *probe*
//!   ([`Budgets::admit_staging`]); its first answer from the registry either lifts the block
//!   for everyone or renews it. So 50 workers against a rate-limited Docker Hub send about one
//!   request per budget window, not one each.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use sqlx::PgPool;

use crate::registry::RegistryObserver;
use crate::registry::observe::RateLimitHeaders;
use crate::registry::retry::retry_after;

/// The channel a changed budget is announced on (payload: the registry).
pub const CHANGED_CHANNEL: &str = "tailor_budgets";
/// How long a registry is left alone after a 429 that says nothing of when to come back.
pub const DEFAULT_BLOCK: Duration = Duration::from_secs(60);
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
    /// Registries nobody may send to, until when (a local clock reading).
    blocked: Mutex<HashMap<String, Instant>>,
}

impl Budgets {
    pub fn new(pool: PgPool) -> Arc<Self> {
        Arc::new(Self {
            pool,
            blocked: Mutex::new(HashMap::new()),
        })
    }

    /// Decides whether a staging for `registry`, claimed by `holder`, may start now.
    pub async fn admit_staging(
        &self,
        registry: &str,
        holder: &str,
    ) -> Result<Admission, sqlx::Error> {
        let (verdict, wait_until): (String, Option<DateTime<Utc>>) =
            sqlx::query_as("SELECT verdict, wait_until FROM admit_to_registry($1, $2, $3)")
                .bind(registry)
                .bind(holder)
                .bind(PROBE_FOR.as_secs_f64())
                .fetch_one(&self.pool)
                .await?;
        Ok(match (verdict.as_str(), wait_until) {
            ("probe", _) => Admission::Probe,
            ("wait", Some(until)) => Admission::Wait(until),
            _ => Admission::Go,
        })
    }

    /// Reloads the blocks from the database (after a notification, or periodically).
    pub async fn refresh(&self) -> Result<(), sqlx::Error> {
        let rows: Vec<(String, f64)> = sqlx::query_as(
            "SELECT registry, extract(epoch FROM blocked_until - now())::float8 FROM registry_budgets \
             WHERE blocked_until > now()",
        )
        .fetch_all(&self.pool)
        .await?;
        let now = Instant::now();
        let mut blocked = self.blocked.lock().expect("not poisoned");
        blocked.clear();
        for (registry, seconds) in rows {
            blocked.insert(registry, now + Duration::from_secs_f64(seconds.max(0.0)));
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

    fn blocked_for(&self, registry: &str) -> Option<Duration> {
        let blocked = self.blocked.lock().expect("not poisoned");
        let until = blocked.get(registry)?;
        until.checked_duration_since(Instant::now())
    }

    /// Records a block of `registry` for `wait` (fleet-wide) and tells everyone.
    fn block(self: &Arc<Self>, registry: &str, wait: Duration) {
        self.blocked
            .lock()
            .expect("not poisoned")
            .insert(registry.to_owned(), Instant::now() + wait);
        let this = self.clone();
        let registry = registry.to_owned();
        tokio::spawn(async move {
            let recorded = sqlx::query(
                "WITH up AS ( \
                   INSERT INTO registry_budgets (registry, blocked_until, rate_limited_total) \
                   VALUES ($1, now() + make_interval(secs => $2), 1) \
                   ON CONFLICT (registry) DO UPDATE SET \
                     blocked_until = greatest(registry_budgets.blocked_until, excluded.blocked_until), \
                     probe_holder = NULL, probe_until = NULL, \
                     rate_limited_total = registry_budgets.rate_limited_total + 1, updated_at = now() \
                   RETURNING registry) \
                 SELECT pg_notify($3, registry) FROM up",
            )
            .bind(&registry)
            .bind(wait.as_secs_f64())
            .bind(CHANGED_CHANNEL)
            .execute(&this.pool)
            .await;
            if let Err(error) = recorded {
                tracing::warn!(%error, %registry, "could not record the rate limit; other workers will learn it themselves");
            }
        });
    }

    /// The probe got an ordinary answer: the registry is open to everyone again.
    fn lift(self: &Arc<Self>, registry: &str, holder: &str) {
        self.blocked.lock().expect("not poisoned").remove(registry);
        let this = self.clone();
        let (registry, holder) = (registry.to_owned(), holder.to_owned());
        tokio::spawn(async move {
            let lifted = sqlx::query(
                "WITH up AS ( \
                   UPDATE registry_budgets SET blocked_until = NULL, probe_holder = NULL, \
                     probe_until = NULL, updated_at = now() \
                   WHERE registry = $1 AND probe_holder = $2 AND blocked_until <= now() \
                   RETURNING registry) \
                 SELECT pg_notify($3, registry) FROM up",
            )
            .bind(&registry)
            .bind(&holder)
            .bind(CHANGED_CHANNEL)
            .execute(&this.pool)
            .await;
            if let Err(error) = lifted {
                tracing::warn!(%error, %registry, "could not lift the rate limit; it lifts when the probe lease expires");
            }
        });
    }

    /// An observer for one staging's source registry.
    pub fn for_staging(self: &Arc<Self>, holder: &str, probing: bool) -> Arc<StagingBudget> {
        Arc::new(StagingBudget {
            budgets: self.clone(),
            holder: holder.to_owned(),
            probing: AtomicBool::new(probing),
        })
    }
}

/// One staging's side of the budget: it asks before every request to its source and reports
/// every answer. While it is the probe, it is let through the block it is probing.
pub struct StagingBudget {
    budgets: Arc<Budgets>,
    holder: String,
    probing: AtomicBool,
}

impl RegistryObserver for StagingBudget {
    fn admit(&self, registry: &str) -> Result<(), Duration> {
        if self.probing.load(Ordering::Relaxed) {
            return Ok(());
        }
        match self.budgets.blocked_for(registry) {
            Some(wait) => Err(wait),
            None => Ok(()),
        }
    }

    fn observed(&self, registry: &str, status: StatusCode, headers: &HeaderMap) {
        if status == StatusCode::TOO_MANY_REQUESTS {
            let wait = retry_after(headers)
                .unwrap_or(DEFAULT_BLOCK)
                .max(Duration::from_secs(1));
            tracing::info!(%registry, wait_s = wait.as_secs(), "upstream rate limit: the fleet waits");
            self.probing.store(false, Ordering::Relaxed);
            self.budgets.block(registry, wait);
            return;
        }
        if RateLimitHeaders::parse(headers).is_some_and(|h| h.remaining == Some(0)) {
            // The next request would be refused: stop the fleet before it is.
            self.budgets.block(registry, DEFAULT_BLOCK);
            return;
        }
        if self.probing.swap(false, Ordering::Relaxed) && !status.is_server_error() {
            tracing::info!(%registry, "rate limit probe answered: the registry is open again");
            self.budgets.lift(registry, &self.holder);
        }
    }
}
