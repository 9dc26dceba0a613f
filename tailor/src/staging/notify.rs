//! One LISTEN connection per process, fanned out to whoever waits: new work for the workers,
//! cancellations of running stagings, leases let go of (a blob fetch ended, the pruner left a
//! repository) and changed rate-limit budgets.
//!
//! A notification is a hint, never the only way to learn something: every waiter also polls,
//! and after a reconnection every subscriber is woken once, since anything may have happened
//! while nobody listened.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::budget::CHANGED_CHANNEL as BUDGET_CHANNEL;
use super::lease::LET_GO_CHANNEL as LEASE_CHANNEL;
use super::store::{CANCEL_CHANNEL, NEW_WORK_CHANNEL};

/// The process's subscriptions.
#[derive(Clone)]
pub struct Hub {
    new_work: watch::Sender<u64>,
    leases: watch::Sender<u64>,
    budgets: watch::Sender<u64>,
    cancels: broadcast::Sender<Uuid>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        Self {
            new_work: watch::channel(0).0,
            leases: watch::channel(0).0,
            budgets: watch::channel(0).0,
            cancels: broadcast::channel(256).0,
        }
    }

    /// Changes whenever a staging may have become claimable.
    pub fn new_work(&self) -> watch::Receiver<u64> {
        self.new_work.subscribe()
    }

    /// Changes whenever a lease was let go of somewhere.
    pub fn lease_let_go(&self) -> watch::Receiver<u64> {
        self.leases.subscribe()
    }

    /// Changes whenever a registry's rate-limit budget changed.
    pub fn budgets_changed(&self) -> watch::Receiver<u64> {
        self.budgets.subscribe()
    }

    /// The GUIDs of stagings someone asked to cancel.
    pub fn cancels(&self) -> broadcast::Receiver<Uuid> {
        self.cancels.subscribe()
    }

    fn wake_all(&self) {
        for sender in [&self.new_work, &self.leases, &self.budgets] {
            sender.send_modify(|v| *v += 1);
        }
    }

    /// Listens until `shutdown`, reconnecting after `retry` when the connection drops.
    pub async fn listen(self, pool: PgPool, retry: Duration, shutdown: CancellationToken) {
        let channels = [
            NEW_WORK_CHANNEL,
            CANCEL_CHANNEL,
            LEASE_CHANNEL,
            BUDGET_CHANNEL,
        ];
        while !shutdown.is_cancelled() {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::warn!(%error, "LISTEN connection failed; polling meanwhile");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(retry) => continue,
                    }
                }
            };
            if let Err(error) = listener.listen_all(channels).await {
                tracing::warn!(%error, "LISTEN failed; polling meanwhile");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(retry) => continue,
                }
            }
            self.wake_all();
            loop {
                let received = tokio::select! {
                    () = shutdown.cancelled() => return,
                    received = listener.recv() => received,
                };
                match received {
                    Ok(n) if n.channel() == CANCEL_CHANNEL => {
                        if let Ok(guid) = n.payload().parse::<Uuid>() {
                            let _ = self.cancels.send(guid);
                        }
                    }
                    Ok(n) if n.channel() == LEASE_CHANNEL => self.leases.send_modify(|v| *v += 1),
                    Ok(n) if n.channel() == BUDGET_CHANNEL => self.budgets.send_modify(|v| *v += 1),
                    Ok(_) => self.new_work.send_modify(|v| *v += 1),
                    Err(error) => {
                        tracing::warn!(%error, "LISTEN connection lost; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}
