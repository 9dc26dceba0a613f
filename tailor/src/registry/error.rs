//! What can go wrong talking to a registry, with stable codes.
//!
//! Every message names the registry and the object involved, quotes upstream text only after
//! [`crate::text::clean`], and never contains a credential.

use std::time::Duration;

use crate::code::Code;
use crate::egress::EgressDenied;
use crate::manifest::ManifestError;

/// A failed registry operation. `code()` is stable; callers that know which side of a copy
/// the registry is on (source or internal) may map it further.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// 404 for the object asked for.
    #[error("{what} not found on {registry}: {detail}")]
    NotFound {
        registry: String,
        what: String,
        detail: String,
    },
    /// 401 after the challenge flow, or a token service refusing the credentials.
    #[error("authentication to {registry} failed: {detail}")]
    Unauthorized { registry: String, detail: String },
    /// 403.
    #[error("{registry} denied access: {detail}")]
    Denied { registry: String, detail: String },
    /// 429, or the fleet's budget for the registry says wait.
    #[error("{registry} is rate limiting requests{}", wait_text(*retry_after))]
    RateLimited {
        registry: String,
        retry_after: Option<Duration>,
    },
    /// 5xx or 408 (after the client's own retries).
    #[error("{registry} is unavailable: {detail}")]
    Unavailable {
        registry: String,
        detail: String,
        retry_after: Option<Duration>,
    },
    /// No HTTP answer: the connection failed or broke.
    #[error("cannot reach {registry}: {detail}")]
    Unreachable { registry: String, detail: String },
    /// No answer in time, or a transfer slower than the throughput floor.
    #[error("{registry} did not answer in time: {detail}")]
    Timeout { registry: String, detail: String },
    /// A response over its size limit; refused before it is read.
    #[error("{what} from {registry} is over the {limit}-byte limit")]
    TooLarge {
        registry: String,
        what: String,
        limit: u64,
    },
    /// 405 on a write: distribution in read-only maintenance (garbage collection).
    #[error("{registry} is read-only (a maintenance window); try again later")]
    ReadOnly { registry: String },
    /// The egress policy refused a destination (the registry, its token realm, a redirect).
    #[error(transparent)]
    EgressDenied(#[from] EgressDenied),
    /// An answer the protocol does not allow (a missing header, a redirect downgrading to
    /// plain HTTP, a malformed token response, an unexpected status).
    #[error("{registry} broke the distribution protocol: {detail}")]
    Protocol { registry: String, detail: String },
    /// Content that does not match the digest it was asked for.
    #[error("digest mismatch for {expected}: {detail}")]
    DigestMismatch { expected: String, detail: String },
    /// A manifest tailor does not accept.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

fn wait_text(retry_after: Option<Duration>) -> String {
    match retry_after {
        Some(wait) => format!("; try again in {}s", wait.as_secs().max(1)),
        None => String::new(),
    }
}

impl RegistryError {
    /// The stable, machine-readable code (as for an upstream registry).
    pub fn code(&self) -> Code {
        match self {
            Self::NotFound { .. } => Code::ImageNotFound,
            Self::Unauthorized { .. } => Code::Unauthorized,
            Self::Denied { .. } => Code::Denied,
            Self::RateLimited { .. } => Code::RateLimited,
            Self::Unavailable { .. } | Self::Unreachable { .. } => Code::UpstreamUnreachable,
            Self::Timeout { .. } => Code::Timeout,
            Self::TooLarge { .. } => Code::ResponseTooLarge,
            Self::ReadOnly { .. } => Code::InternalRegistryReadOnly,
            Self::EgressDenied(denied) => denied.code(),
            Self::Protocol { .. } => Code::UpstreamProtocolError,
            Self::DigestMismatch { .. } => Code::DigestMismatch,
            Self::Manifest(error) => error.code(),
        }
    }

    /// Whether the same operation may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. }
                | Self::Unavailable { .. }
                | Self::Unreachable { .. }
                | Self::Timeout { .. }
                | Self::ReadOnly { .. }
        )
    }

    /// When the registry said to come back (`Retry-After`, or the fleet's rate-limit budget).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } | Self::Unavailable { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }
}
