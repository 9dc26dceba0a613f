//! Stagings: the domain record of "make this image available for this app", and the
//! PostgreSQL-backed queue that workers take them from.
//!
//! - [`request`]: [`NewStaging::parse`], every rule a staging request must meet, whichever
//!   API it came through.
//! - [`columns`]: text columns read back as the types they were parsed into.
//! - [`store`]: creating, reading, cancelling and releasing stagings (what the API does).
//! - [`queue`]: claiming with `FOR UPDATE SKIP LOCKED`, leases on stagings, finishing,
//!   requeueing, deadlines (what workers do); a staging's end and its callback are one
//!   transaction.
//! - [`lease`]: leases on shared resources (a repository against the pruner, a blob being
//!   fetched, the prune run), held by rows with an owner and an expiry, never by a lock held
//!   across a network call.
//! - [`ledger`]: the blob index as a [`crate::copy::BlobLedger`]: where each blob is, which
//!   upstream it was verified from, and the fetch lease that makes each upstream blob come in
//!   once across the fleet.
//! - [`budget`]: the fleet's rate-limit budget per upstream registry.
//! - [`notify`]: one LISTEN connection per process, fanned out to whoever waits.
//! - [`worker`]: the worker loop, its heartbeat, and the pure decision of what an attempt's
//!   outcome means for the staging.
//! - [`callbacks`]: the outbox deliverer.
//! - [`references`]: the reference record the platform feeds (released apps, the periodic
//!   sync of stagings in use), which the pruner reads.
//! - [`metrics`]: cluster-wide figures for `/metrics`, from counters, not scans.

pub mod budget;
pub mod callbacks;
pub mod columns;
pub mod lease;
pub mod ledger;
pub mod location;
pub mod metrics;
pub mod notify;
pub mod queue;
pub mod references;
pub mod request;
pub mod search;
pub mod store;
pub mod worker;

pub use request::{InvalidRequest, NewStaging, Requested, Rules};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::platform::Platform;
use crate::reference::ImageReference;

/// Where a staging is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize)]
#[sqlx(type_name = "staging_state", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum StagingState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl StagingState {
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Which API a staging came through: it decides the completion callback's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum Api {
    /// `POST /stage`: the callback receives the staging's JSON.
    Stage,
    /// `PUT /v1/staging/{guid}` from a Cloud Controller: the callback receives a StagingResponseForCC.
    Diego,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stage => "stage",
            Self::Diego => "diego",
        }
    }
}

/// What a staging makes of its image: the opt-in to the internal registry, per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, sqlx::Type, serde::Serialize)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Copy the image into the internal registry and answer the internal reference pinned by
    /// digest: what runs never depends on upstream again.
    #[default]
    Copy,
    /// Resolve the tag upstream, check the manifest and the config as a copy would, and answer
    /// upstream's reference pinned by digest; no blob is copied, and runtimes pull from
    /// upstream (the Diego proposal's "apps that aren't [opted in] are fetched from the Hub",
    /// still immune to a moving tag).
    Pin,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Copy => "copy",
            Self::Pin => "pin",
        }
    }

    /// `copy` or `pin`, as a request or a setting spells it (any case, no padding).
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.to_ascii_lowercase().as_str() {
            "copy" => Ok(Self::Copy),
            "pin" => Ok(Self::Pin),
            _ => Err(format!(
                "mode {:?} is neither \"copy\" nor \"pin\"",
                crate::text::clean(text, 40)
            )),
        }
    }
}

/// Why a queued staging is waiting to run again (its `waiting_for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Waiting {
    /// Backing off after a transient failure.
    Retry,
    /// Its source registry's rate-limit budget.
    RateLimit,
    /// The internal registry's maintenance window (or the pruner in its repository).
    Maintenance,
}

impl Waiting {
    pub const ALL: [Waiting; 3] = [Self::Retry, Self::RateLimit, Self::Maintenance];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::RateLimit => "rate_limit",
            Self::Maintenance => "maintenance",
        }
    }
}

/// A staging as stored (read by [`store::read`]).
#[derive(Debug, Clone)]
pub struct Staging {
    pub staging_guid: Uuid,
    pub app_guid: Uuid,
    pub source_image: location::StagingSource,
    pub platform: Platform,
    pub mode: Mode,
    pub api: Api,
    pub completion_callback: Option<String>,
    pub state: StagingState,
    pub attempts: i32,
    pub cancel_requested: bool,
    /// A [`crate::code::Code`] as text: one a newer version added (codes may be added) still reads.
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub last_error: Option<String>,
    pub source_digest: Option<String>,
    pub pinned_image: Option<ImageReference>,
    pub tagged_image: Option<String>,
    pub bytes_total: Option<i64>,
    pub bytes_done: i64,
    pub bytes_copied: i64,
    pub bytes_mounted: i64,
    pub bytes_skipped: i64,
    pub blobs_copied: i32,
    pub blobs_mounted: i32,
    pub blobs_skipped: i32,
    pub start_command: Option<String>,
    pub execution_metadata: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub released_at: Option<DateTime<Utc>>,
    pub unreferenced_at: Option<DateTime<Utc>>,
    pub pruned_at: Option<DateTime<Utc>>,
    pub deadline_at: DateTime<Utc>,
    pub source_registry: String,
    /// Whose rate-limit budget the staging spends: its source registry, and the account its
    /// credentials name (one tenant's exhausted quota is not everyone's).
    pub budget_key: String,
    pub run_after: DateTime<Utc>,
    pub waiting_for: Option<Waiting>,
    pub workers_lost: i32,
    /// The artifacts copied with the image because they refer to it (a JSON list of
    /// [`crate::copy::Referrer`]).
    pub referrers: Value,
}

impl Staging {
    /// The staging's public JSON (the API's representation and the `stage` callback's body).
    pub fn to_json(&self) -> Value {
        let result = (self.state == StagingState::Succeeded).then(|| {
            json!({
                "pinned_image": self.pinned_image.as_ref().map(ToString::to_string),
                "tagged_image": self.tagged_image,
                "source_digest": self.source_digest,
                "blobs": { "copied": self.blobs_copied, "mounted": self.blobs_mounted, "skipped": self.blobs_skipped },
                "bytes": { "copied": self.bytes_copied, "mounted": self.bytes_mounted, "skipped": self.bytes_skipped },
                "process_types": { "web": self.start_command },
                "referrers": self.referrers,
            })
        });
        let error = self
            .error_code
            .as_ref()
            .map(|code| json!({ "code": code, "message": self.error_message }));
        // While it waits to run again: why, since when it failed, and when it runs next.
        let waiting = (self.state == StagingState::Queued
            && (self.waiting_for.is_some() || self.last_error.is_some()))
        .then(|| {
            json!({
                "reason": self.waiting_for,
                "last_error": self.last_error,
                "next_attempt_at": self.run_after,
            })
        });
        json!({
            "staging_guid": self.staging_guid,
            "app_guid": self.app_guid,
            "image": self.source_image.to_string(),
            "platform": self.platform.to_string(),
            "mode": self.mode,
            "state": self.state,
            "attempts": self.attempts,
            "progress": { "bytes_done": self.bytes_done, "bytes_total": self.bytes_total },
            "result": result,
            "error": error,
            "waiting": waiting,
            "deadline_at": self.deadline_at,
            "completion_callback": self.completion_callback,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "released_at": self.released_at,
            "unreferenced_at": self.unreferenced_at,
            "pruned_at": self.pruned_at,
        })
    }

    /// The body POSTed to the completion callback when the staging ends.
    pub fn callback_payload(&self) -> Value {
        if self.api != Api::Diego {
            return self.to_json();
        }
        match self.state {
            StagingState::Succeeded => json!({
                "result": {
                    "lifecycle_type": "docker",
                    "lifecycle_metadata": { "docker_image": self.pinned_image.as_ref().map(ToString::to_string) },
                    "process_types": { "web": self.start_command.clone().unwrap_or_default() },
                    "execution_metadata": self.execution_metadata.clone().unwrap_or_else(|| "{}".into()),
                }
            }),
            _ => json!({
                "error": {
                    "id": "StagingError",
                    "message": match (&self.error_code, &self.error_message) {
                        (Some(code), Some(message)) => format!("{code}: {message}"),
                        _ => format!("staging {}", self.state.as_str()),
                    },
                }
            }),
        }
    }
}
