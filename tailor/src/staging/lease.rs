//! Leases: exclusion between processes that holds no database connection, transaction or lock
//! while the holder works.
//!
//! A lease is a row in `leases` (resource, holder, shared or exclusive, expiry). Taking one is
//! one short statement (`acquire_lease`, which serialises acquirers of a resource for its own
//! length only); the holder's heartbeat renews every lease it holds in one statement; a holder
//! that dies simply stops renewing, and whoever comes after the expiry takes over. Letting go
//! deletes the row and notifies `tailor_leases`, so waiters wake at once instead of at their
//! next poll.
//!
//! Resources: `repository:<name>` (stagings copying into it, shared, against the pruner,
//! exclusive), `blob:<origin>:<digest>` (the one copy fetching it from that upstream), `prune` (one run).

use std::time::Duration;

use sqlx::PgPool;

/// The channel a lease let go of is announced on (payload: the resource). ("Release" is
/// kept for the platform releasing an image; leases are let go of.)
pub const LET_GO_CHANNEL: &str = "tailor_leases";

/// The lease key of a repository of the internal registry.
pub fn repository(name: &str) -> String {
    format!("repository:{name}")
}

/// The lease key of a blob being fetched from the upstream registry `origin`.
pub fn blob(origin: &str, digest: &str) -> String {
    format!("blob:{origin}:{digest}")
}

/// The lease key of the prune run.
pub const PRUNE: &str = "prune";

/// Leases held by one holder (a worker, a prune run), each for `ttl` past its last renewal.
#[derive(Debug, Clone)]
pub struct Leases {
    pool: PgPool,
    holder: String,
    ttl: Duration,
}

impl Leases {
    pub fn new(pool: PgPool, holder: impl Into<String>, ttl: Duration) -> Self {
        Self {
            pool,
            holder: holder.into(),
            ttl,
        }
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Takes (or renews) `resource`, shared or exclusive; `false` if a conflicting holder has
    /// it and its lease has not expired.
    pub async fn acquire(&self, resource: &str, exclusive: bool) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar!(
            r#"SELECT acquire_lease($1, $2, $3, $4) AS "acquired!""#,
            resource,
            &self.holder,
            exclusive,
            self.ttl.as_secs_f64()
        )
        .fetch_one(&self.pool)
        .await
    }

    /// Lets go of `resource` and tells waiters.
    pub async fn let_go(&self, resource: &str) -> Result<(), sqlx::Error> {
        sqlx::query!("WITH gone AS (DELETE FROM leases WHERE resource = $1 AND holder = $2 RETURNING resource) \
             SELECT pg_notify($3, resource) FROM gone", resource, &self.holder, LET_GO_CHANNEL)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Lets go of every lease this holder has (an attempt's end, whatever happened in it).
    pub async fn let_go_all(&self) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "WITH gone AS (DELETE FROM leases WHERE holder = $1 RETURNING resource) \
             SELECT pg_notify($2, resource) FROM gone",
            &self.holder,
            LET_GO_CHANNEL
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Lets go of `resource` in the background (from a `Drop`).
    pub fn let_go_soon(&self, resource: String) {
        let leases = self.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = leases.let_go(&resource).await {
                    tracing::warn!(%error, %resource, "could not let go of a lease; it will expire");
                }
            });
        }
    }

    /// Extends every lease this holder has; returns how many it still holds.
    pub async fn renew_all(&self) -> Result<u64, sqlx::Error> {
        let renewed = sqlx::query!(
            "UPDATE leases SET expires_at = now() + make_interval(secs => $2) \
             WHERE holder = $1 AND expires_at > now()",
            &self.holder,
            self.ttl.as_secs_f64()
        )
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected())
    }

    /// Whether this holder still holds `resource` (not expired).
    pub async fn holds(&self, resource: &str) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar!(r#"SELECT EXISTS (SELECT 1 FROM leases WHERE resource = $1 AND holder = $2 AND expires_at > now()) AS "holds!""#, resource, &self.holder)
        .fetch_one(&self.pool)
        .await
    }

    /// Whether anyone holds `resource` now.
    pub async fn is_held(pool: &PgPool, resource: &str) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM leases WHERE resource = $1 AND expires_at > now()) AS "held!""#,
            resource
        )
        .fetch_one(pool)
        .await
    }
}
