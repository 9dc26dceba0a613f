//! Blob streams and their throughput floor.
//!
//! A blob may take as long as it needs, but not forever at a trickle: a transfer fails when a
//! whole [`Floor::window`] passes with fewer than `min_bytes_per_second * window` bytes moved.
//! The floor is watched from outside the stream ([`TransferMeter::watch`]), so it also catches
//! a transfer stalled on the other side (a destination that stopped reading), when nobody
//! polls the stream at all.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;

use super::error::RegistryError;

/// The slowest a blob transfer may be, measured over a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Floor {
    /// 0 disables the floor.
    pub min_bytes_per_second: u64,
    pub window: Duration,
}

impl Default for Floor {
    fn default() -> Self {
        Self {
            min_bytes_per_second: 16 * 1024,
            window: Duration::from_secs(30),
        }
    }
}

/// Counts the bytes a transfer moved, for its floor and its progress.
#[derive(Debug, Clone, Default)]
pub struct TransferMeter(Arc<AtomicU64>);

impl TransferMeter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn total(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Resolves only when a whole window went by under the floor; race it with the transfer.
    pub async fn watch(&self, floor: Floor, registry: &str, what: &str) -> RegistryError {
        if floor.min_bytes_per_second == 0 || floor.window.is_zero() {
            return std::future::pending().await;
        }
        let needed = floor
            .min_bytes_per_second
            .saturating_mul(floor.window.as_secs().max(1));
        let mut ticker = tokio::time::interval(floor.window);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut last = self.total();
        loop {
            ticker.tick().await;
            let now = self.total();
            let moved = now - last;
            if moved < needed {
                return RegistryError::Timeout {
                    registry: registry.to_owned(),
                    detail: format!(
                        "{what} moved {moved} bytes in {}s, under the floor of {} bytes/s (TAILOR_MIN_TRANSFER_RATE)",
                        floor.window.as_secs(),
                        floor.min_bytes_per_second
                    ),
                };
            }
            last = now;
        }
    }
}

/// A blob's content as it arrives, counted into a [`TransferMeter`].
pub struct BlobBody {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    meter: TransferMeter,
    length: Option<u64>,
    registry: String,
    insecure: bool,
}

impl BlobBody {
    pub(crate) fn new(response: reqwest::Response, registry: &str, insecure: bool) -> Self {
        Self {
            length: response.content_length(),
            inner: Box::pin(response.bytes_stream()),
            meter: TransferMeter::new(),
            registry: registry.to_owned(),
            insecure,
        }
    }

    /// The length the registry declared, if any.
    pub fn content_length(&self) -> Option<u64> {
        self.length
    }

    /// The registry it comes from (for messages).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The bytes read so far (to watch with [`TransferMeter::watch`]).
    pub fn meter(&self) -> TransferMeter {
        self.meter.clone()
    }
}

impl Stream for BlobBody {
    type Item = Result<Bytes, RegistryError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                self.meter.add(chunk.len() as u64);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(error))) => {
                let detail = super::client::describe_transport_error(&error, self.insecure);
                Poll::Ready(Some(Err(RegistryError::Unreachable {
                    registry: self.registry.clone(),
                    detail: format!(
                        "reading a blob failed after {} bytes: {detail}",
                        self.meter.total()
                    ),
                })))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_floor_trips_only_after_a_whole_slow_window() {
        let meter = TransferMeter::new();
        let floor = Floor {
            min_bytes_per_second: 100,
            window: Duration::from_secs(10),
        };
        let feeder = {
            let meter = meter.clone();
            tokio::spawn(async move {
                // Fast for three windows, then a trickle of 10 bytes/s.
                for second in 0..100u64 {
                    meter.add(if second < 30 { 5000 } else { 10 });
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        };
        let error = meter.watch(floor, "hub", "blob x").await;
        feeder.abort();
        // It let the fast phase through whole, and tripped within two windows of the trickle.
        let moved = meter.total();
        assert!(moved >= 30 * 5000, "tripped during the fast phase: {moved}");
        assert!(moved <= 30 * 5000 + 2 * 10 * 10, "tripped late: {moved}");
        assert_eq!(error.code(), "TIMEOUT");
        assert!(error.to_string().contains("under the floor"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_disabled_floor_never_trips() {
        let meter = TransferMeter::new();
        let floor = Floor {
            min_bytes_per_second: 0,
            window: Duration::from_secs(1),
        };
        let watched =
            tokio::time::timeout(Duration::from_secs(3600), meter.watch(floor, "r", "b")).await;
        assert!(watched.is_err(), "the watch must still be pending");
    }
}
