//! What keeps pruning and staging apart, on leases ([`crate::staging::lease`]), never on a
//! lock held across a network call:
//!
//! - the *prune lease* (`prune`, exclusive): two prune runs never overlap;
//! - one lease per internal repository: a staging holds it *shared* from before it copies
//!   until its result is committed (the commit checks it still holds it); the pruner takes it
//!   *exclusively*, without waiting, while it decides and deletes in that repository. So the
//!   pruner never deletes a manifest a staging is about to tag or has just tagged without the
//!   database knowing, and a staging that starts meanwhile waits, then pushes its manifest again.
//!
//! A prune run's leases are renewed by a task of its own for as long as the run lasts.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::staging::lease::{self, Leases};

/// How long the prune leases live without renewal.
const PRUNE_LEASE: Duration = Duration::from_secs(60);

/// The prune run's leases, renewed until it lets go of them.
pub struct PruneLeases {
    leases: Leases,
    renewer: CancellationToken,
}

impl PruneLeases {
    /// Takes the prune lease, or `None` if another run holds it.
    pub async fn try_start(pool: &PgPool) -> Result<Option<Self>, sqlx::Error> {
        let holder = format!(
            "prune/{}/{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let leases = Leases::new(pool.clone(), holder, PRUNE_LEASE);
        if !leases.acquire(lease::PRUNE, true).await? {
            return Ok(None);
        }
        let renewer = CancellationToken::new();
        let (renewing, stop) = (leases.clone(), renewer.clone());
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(PRUNE_LEASE / 4);
            ticker.tick().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                if let Err(error) = renewing.renew_all().await {
                    tracing::warn!(%error, "could not renew the prune leases; will retry");
                }
            }
        });
        Ok(Some(Self { leases, renewer }))
    }

    /// Takes `repository` exclusively, or returns false at once if a staging is copying into it.
    pub async fn try_repository(&self, repository: &str) -> Result<bool, sqlx::Error> {
        self.leases
            .acquire(&lease::repository(repository), true)
            .await
    }

    /// Whether the run still holds `repository` (checked before each deletion).
    pub async fn holds_repository(&self, repository: &str) -> Result<bool, sqlx::Error> {
        self.leases.holds(&lease::repository(repository)).await
    }

    pub async fn let_go_of_repository(&self, repository: &str) {
        if let Err(error) = self.leases.let_go(&lease::repository(repository)).await {
            tracing::warn!(%error, %repository, "could not let go of a repository lease; it will expire");
        }
    }

    /// Ends the run: stops renewing and lets go of the prune lease.
    pub async fn finish(self) {
        self.renewer.cancel();
        if let Err(error) = self.leases.let_go(lease::PRUNE).await {
            tracing::warn!(%error, "could not let go of the prune lease; it will expire");
        }
    }
}
