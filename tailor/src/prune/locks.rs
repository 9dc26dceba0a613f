//! The advisory locks that keep pruning and staging apart.
//!
//! - One *prune lock*: two prune runs never overlap.
//! - One lock per internal repository: a worker holds it *shared* from the moment it starts
//!   copying into the repository until its result is committed; the pruner takes it
//!   *exclusive* (without waiting) while it decides and deletes in that repository. So the
//!   pruner never deletes a manifest a staging is about to tag or has just tagged without
//!   the database knowing, and a staging that starts meanwhile waits, then pushes its
//!   manifest again.

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres, Transaction};

const PRUNE_LOCK: &str = "tailor-prune";

fn repository_key(repository: &str) -> String {
    format!("tailor-repository:{repository}")
}

/// A session-level advisory lock on a connection of its own. Released explicitly; if it is
/// dropped instead (a panic, a cancelled task), its connection is closed, which releases it.
pub struct HeldLock {
    connection: Option<PoolConnection<Postgres>>,
    unlock_sql: &'static str,
    key: String,
}

impl HeldLock {
    /// The connection holding the lock: what is committed through it is committed while the
    /// lock is held (a session-level lock lives exactly as long as its session).
    pub fn connection(&mut self) -> &mut sqlx::PgConnection {
        self.connection.as_mut().expect("held until released")
    }

    pub async fn release(mut self) {
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        let unlocked = sqlx::query(self.unlock_sql)
            .bind(&self.key)
            .execute(&mut *connection)
            .await;
        if let Err(error) = unlocked {
            tracing::warn!(%error, key = %self.key, "advisory unlock failed; closing its connection");
            connection.close_on_drop();
        }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.as_mut() {
            connection.close_on_drop();
        }
    }
}

/// Takes the prune lock, or `None` if another prune run holds it.
pub async fn try_prune_lock(pool: &PgPool) -> Result<Option<HeldLock>, sqlx::Error> {
    let mut connection = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 7))")
        .bind(PRUNE_LOCK)
        .fetch_one(&mut *connection)
        .await?;
    Ok(locked.then(|| HeldLock {
        connection: Some(connection),
        unlock_sql: "SELECT pg_advisory_unlock(hashtextextended($1, 7))",
        key: PRUNE_LOCK.to_owned(),
    }))
}

/// Holds `repository` against the pruner while a staging copies into it; waits while the
/// pruner is deleting there (one repository's transaction: short). Not cancellation-safe by
/// design: dropped mid-wait, the connection is closed rather than returned to the pool with a
/// lock it may have been granted meanwhile.
pub async fn hold_repository(pool: &PgPool, repository: &str) -> Result<HeldLock, sqlx::Error> {
    let key = repository_key(repository);
    let mut held = HeldLock {
        connection: Some(pool.acquire().await?),
        unlock_sql: "SELECT pg_advisory_unlock_shared(hashtextextended($1, 7))",
        key,
    };
    // Until the lock query has answered, `held`'s Drop closes the connection.
    let connection = held.connection.as_mut().expect("just acquired");
    sqlx::query("SELECT pg_advisory_lock_shared(hashtextextended($1, 7))")
        .bind(&held.key)
        .execute(&mut **connection)
        .await?;
    Ok(held)
}

/// Takes `repository` exclusively for the rest of `tx`, or returns false at once if a staging
/// is copying into it.
pub async fn try_lock_repository(
    tx: &mut Transaction<'_, Postgres>,
    repository: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 7))")
        .bind(repository_key(repository))
        .fetch_one(&mut **tx)
        .await
}
