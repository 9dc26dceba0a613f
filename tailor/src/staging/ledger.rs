//! The blob index in PostgreSQL as the copy engine's [`BlobLedger`]: where each blob lives in
//! the internal registry (mount sources), and a per-digest advisory lock held while a blob is
//! fetched from upstream, so concurrent stagings wait for it and then mount it.

use futures_util::future::BoxFuture;
use sqlx::PgPool;

use crate::copy::{BlobLedger, FetchGuard};
use crate::manifest::Blob;

/// The blob index of one internal registry.
#[derive(Clone)]
pub struct PgLedger {
    pool: PgPool,
}

impl PgLedger {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

impl BlobLedger for PgLedger {
    fn mount_sources<'a>(&'a self, digest: &'a str) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async move {
            sqlx::query_scalar(
                "SELECT repository FROM blob_locations WHERE digest = $1 ORDER BY added_at DESC LIMIT 5",
            )
            .bind(digest)
            .fetch_all(&self.pool)
            .await
            .unwrap_or_else(|error| {
                tracing::warn!(%digest, %error, "blob index unavailable; not mounting");
                Vec::new()
            })
        })
    }

    fn record<'a>(&'a self, blob: &'a Blob, repository: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let result = sqlx::query(
                "WITH b AS (INSERT INTO blobs (digest, size, media_type) VALUES ($1, $2, $3) \
                 ON CONFLICT (digest) DO NOTHING) \
                 INSERT INTO blob_locations (digest, repository) VALUES ($1, $4) \
                 ON CONFLICT (digest, repository) DO UPDATE SET added_at = now()",
            )
            .bind(&blob.digest)
            .bind(blob.size as i64)
            .bind(&blob.media_type)
            .bind(repository)
            .execute(&self.pool)
            .await;
            if let Err(error) = result {
                // The index is an optimisation: losing a row costs a future copy, not correctness.
                tracing::warn!(digest = %blob.digest, %error, "could not record blob location");
            }
        })
    }

    fn fetch_guard<'a>(&'a self, digest: &'a str) -> BoxFuture<'a, Option<FetchGuard>> {
        Box::pin(async move {
            // A transaction-scoped lock: whatever ends the transaction (commit, the guard being
            // dropped, the connection dying) releases it, so a crashed worker cannot wedge it.
            let mut tx = match self.pool.begin().await {
                Ok(tx) => tx,
                Err(error) => {
                    tracing::warn!(%digest, %error, "no connection for the fetch lock; fetching unguarded");
                    return None;
                }
            };
            match sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))")
                .bind(digest)
                .execute(&mut *tx)
                .await
            {
                Ok(_) => Some(Box::new(tx) as FetchGuard),
                Err(error) => {
                    tracing::warn!(%digest, %error, "fetch lock failed; fetching unguarded");
                    None
                }
            }
        })
    }
}
