//! The blob index in PostgreSQL as the copy engine's [`BlobLedger`]: where each blob lives in
//! the internal registry and which upstream registry it was verified from (mount sources are
//! only locations of the copy's own origin), and the fetch lease that makes concurrent stagings
//! needing one blob wait for a single fetch and then mount it; and the checkpoints of chunked
//! uploads (`blob_uploads`), which the holder of that lease writes and the next one resumes.
//!
//! Nothing here holds a connection while a blob moves: the fetch lease is a row renewed by the
//! worker's heartbeat, and waiters sleep on the lease notifications (or poll).

use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::PgPool;
use tokio::sync::watch;

use super::lease::{self, Leases};
use crate::copy::{BlobLedger, FetchClaim, FetchGuard, UploadCheckpoint};
use crate::manifest::Blob;

/// How often a waiter looks again without a notification.
const WAIT_POLL: Duration = Duration::from_secs(1);
/// The longest one wait for another copy's fetch lasts (the copy engine waits a few rounds,
/// then fetches itself): a fetch that crawls holds others back only so long.
const WAIT_ROUND: Duration = Duration::from_secs(120);

/// The blob index of one internal registry, as one worker uses it.
#[derive(Clone)]
pub struct PgLedger {
    pool: PgPool,
    leases: Leases,
    let_go: watch::Receiver<u64>,
}

impl PgLedger {
    /// `leases`: the worker's own (renewed by its heartbeat); `let_go`: the process's lease
    /// notifications.
    pub fn new(pool: PgPool, leases: Leases, let_go: watch::Receiver<u64>) -> Self {
        Self {
            pool,
            leases,
            let_go,
        }
    }
}

/// Lets go of the fetch lease when dropped.
struct FetchLease {
    leases: Leases,
    resource: String,
}

impl Drop for FetchLease {
    fn drop(&mut self) {
        self.leases.let_go_soon(std::mem::take(&mut self.resource));
    }
}

impl BlobLedger for PgLedger {
    fn mount_sources<'a>(&'a self, digest: &'a str, origin: &'a str) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async move {
            sqlx::query_scalar!(
                "SELECT repository FROM blob_locations WHERE digest = $1 AND origin_registry = $2 \
                 ORDER BY added_at DESC LIMIT 5",
                digest,
                origin
            )
            .fetch_all(&self.pool)
            .await
            .unwrap_or_else(|error| {
                tracing::warn!(%digest, %error, "blob index unavailable; not mounting");
                Vec::new()
            })
        })
    }

    fn record<'a>(
        &'a self,
        blob: &'a Blob,
        repository: &'a str,
        origin: &'a str,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let result = sqlx::query!("WITH b AS (INSERT INTO blobs (digest, size, media_type) VALUES ($1, $2, $3) \
                 ON CONFLICT (digest) DO NOTHING) \
                 INSERT INTO blob_locations (digest, repository, origin_registry) VALUES ($1, $4, $5) \
                 ON CONFLICT (digest, repository) DO UPDATE SET added_at = now(), \
                     origin_registry = excluded.origin_registry", &blob.digest, blob.size as i64, &blob.media_type, repository, origin)
            .execute(&self.pool)
            .await;
            if let Err(error) = result {
                // The index is an optimisation: losing a row costs a future copy, not correctness.
                tracing::warn!(digest = %blob.digest, %error, "could not record blob location");
            }
        })
    }

    fn claim_fetch<'a>(&'a self, digest: &'a str, origin: &'a str) -> BoxFuture<'a, FetchClaim> {
        Box::pin(async move {
            let resource = lease::blob(origin, digest);
            match self.leases.acquire(&resource, true).await {
                Ok(true) => FetchClaim::Mine(Box::new(FetchLease {
                    leases: self.leases.clone(),
                    resource,
                }) as FetchGuard),
                Ok(false) => FetchClaim::Busy,
                Err(error) => {
                    tracing::warn!(%digest, %error, "fetch lease unavailable; fetching uncoordinated");
                    FetchClaim::Uncoordinated
                }
            }
        })
    }

    fn checkpoint<'a>(
        &'a self,
        blob: &'a Blob,
        repository: &'a str,
        origin: &'a str,
    ) -> BoxFuture<'a, Option<UploadCheckpoint>> {
        Box::pin(async move {
            let row = sqlx::query!(
                "SELECT location, uploaded, hash_state FROM blob_uploads \
                 WHERE repository = $1 AND digest = $2 AND origin_registry = $3 AND size = $4",
                repository,
                &blob.digest,
                origin,
                blob.size as i64
            )
            .fetch_optional(&self.pool)
            .await;
            match row {
                Ok(row) => row.map(|row| UploadCheckpoint {
                    location: row.location,
                    uploaded: row.uploaded as u64,
                    hash_state: row.hash_state,
                }),
                Err(error) => {
                    tracing::warn!(digest = %blob.digest, %error, "upload checkpoints unavailable; starting the blob from its first byte");
                    None
                }
            }
        })
    }

    fn set_checkpoint<'a>(
        &'a self,
        blob: &'a Blob,
        repository: &'a str,
        origin: &'a str,
        checkpoint: Option<&'a UploadCheckpoint>,
    ) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            // Only while this worker holds the blob's fetch lease: one whose lease expired
            // (and whose blob another worker may be resuming now) changes nothing.
            let (lease, holder) = (lease::blob(origin, &blob.digest), self.leases.holder());
            let result = match checkpoint {
                Some(checkpoint) => sqlx::query!(
                    "INSERT INTO blob_uploads \
                         (repository, digest, origin_registry, size, location, uploaded, hash_state) \
                     SELECT $1, $2, $3, $4, $5, $6, $7 WHERE EXISTS (SELECT 1 FROM leases \
                         WHERE resource = $8 AND holder = $9 AND expires_at > now()) \
                     ON CONFLICT (repository, digest, origin_registry) DO UPDATE SET \
                         size = excluded.size, location = excluded.location, \
                         uploaded = excluded.uploaded, hash_state = excluded.hash_state, \
                         updated_at = now()",
                    repository,
                    &blob.digest,
                    origin,
                    blob.size as i64,
                    &checkpoint.location,
                    checkpoint.uploaded as i64,
                    &checkpoint.hash_state,
                    lease,
                    holder
                )
                .execute(&self.pool)
                .await,
                None => sqlx::query!(
                    "DELETE FROM blob_uploads \
                     WHERE repository = $1 AND digest = $2 AND origin_registry = $3 \
                       AND EXISTS (SELECT 1 FROM leases \
                           WHERE resource = $4 AND holder = $5 AND expires_at > now())",
                    repository,
                    &blob.digest,
                    origin,
                    lease,
                    holder
                )
                .execute(&self.pool)
                .await,
            };
            match result {
                Ok(done) => done.rows_affected() > 0,
                Err(error) => {
                    // A lost checkpoint costs a resume, not correctness: the blob is verified.
                    tracing::warn!(digest = %blob.digest, %error, "could not record an upload checkpoint");
                    false
                }
            }
        })
    }

    fn wait_fetch<'a>(&'a self, digest: &'a str, origin: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let resource = lease::blob(origin, digest);
            let mut let_go = self.let_go.clone();
            let round_ends = tokio::time::Instant::now() + WAIT_ROUND;
            while tokio::time::Instant::now() < round_ends {
                match Leases::is_held(&self.pool, &resource).await {
                    Ok(false) => return,
                    Ok(true) => {}
                    Err(error) => {
                        tracing::warn!(%digest, %error, "cannot see the fetch lease; fetching");
                        return;
                    }
                }
                tokio::select! {
                    _ = let_go.changed() => {}
                    () = tokio::time::sleep(WAIT_POLL) => {}
                }
            }
            tracing::info!(%digest, %origin, "another copy is still fetching the blob; looking again");
        })
    }
}
