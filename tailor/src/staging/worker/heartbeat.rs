//! The heartbeat of a running staging: every second it extends the staging's lease and every
//! other lease its attempt holds (the repository, a blob being fetched), publishes progress,
//! and stops the copy when the staging is cancelled, its lease was lost, or a drain outlasts
//! its timeout. Having stopped the copy it keeps renewing, until the attempt has recorded its
//! outcome (removing a failed staging's tag takes the repository lease a while) and aborts
//! it. Two short statements a tick; no connection is held in between.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::decide::StopReason;
use crate::staging::lease::Leases;
use crate::staging::queue::{self, Heartbeat as Beat};

/// What the heartbeat of one staging needs.
pub(super) struct Heartbeat {
    pub pool: PgPool,
    pub guid: Uuid,
    pub worker: String,
    pub leases: Leases,
    pub lease: Duration,
    pub drain_timeout: Duration,
    pub shutdown: CancellationToken,
    pub cancel: CancellationToken,
    pub stop_reason: Arc<Mutex<Option<StopReason>>>,
    pub bytes_done: Arc<AtomicU64>,
    pub bytes_total: Arc<AtomicU64>,
}

/// Runs until aborted.
pub(super) async fn keep_alive(h: Heartbeat) {
    let stop = |reason| {
        h.stop_reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(reason);
        h.cancel.cancel();
    };
    // Progress is published every second (GET /stage shows it); the leases need far less.
    let mut ticker = tokio::time::interval((h.lease / 3).min(Duration::from_secs(1)));
    ticker.tick().await;
    let mut drain_deadline = None;
    let mut stopped = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = h.shutdown.cancelled(), if drain_deadline.is_none() => {
                drain_deadline = Some(tokio::time::Instant::now() + h.drain_timeout);
            }
            () = async { tokio::time::sleep_until(drain_deadline.expect("set")).await }, if drain_deadline.is_some() && !stopped => {
                stop(StopReason::Draining);
                stopped = true;
            }
        }
        let total = h.bytes_total.load(Ordering::Relaxed);
        let beat = queue::heartbeat(
            &h.pool,
            h.guid,
            &h.worker,
            h.lease,
            h.bytes_done.load(Ordering::Relaxed),
            (total > 0).then_some(total),
        )
        .await;
        match beat {
            Ok(Beat::Held {
                cancel_requested: true,
            }) if !stopped => {
                stop(StopReason::CancelRequested);
                stopped = true;
            }
            Ok(Beat::Held { .. }) => {}
            Ok(Beat::Lost) => {
                // Another worker has the staging: nothing of this attempt is worth renewing.
                stop(StopReason::LeaseLost);
                return;
            }
            Err(error) => tracing::warn!(%error, "heartbeat failed; will retry"),
        }
        if let Err(error) = h.leases.renew_all().await {
            tracing::warn!(%error, "could not renew the attempt's leases; will retry");
        }
    }
}
