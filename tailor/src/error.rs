//! Why a copy failed, with the stable codes callers (the API, the CLI's `--json`) report.

/// Which side of a copy an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// A failed copy. `code()` is stable; the message names the registry and object involved and
/// never contains credentials.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CopyError {
    #[error("{0}")]
    InvalidReference(#[from] crate::reference::ReferenceError),
    #[error("image not found: {0}")]
    ImageNotFound(String),
    #[error("authentication to {registry} failed: {detail}")]
    Unauthorized { registry: String, detail: String },
    #[error("{registry} denied access: {detail}")]
    Denied { registry: String, detail: String },
    #[error("{registry} is rate limiting requests; gave up after retries")]
    RateLimited { registry: String },
    #[error("digest mismatch for {expected}: {detail}")]
    DigestMismatch { expected: String, detail: String },
    #[error("invalid manifest: {0}")]
    ManifestInvalid(String),
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    #[error("cannot reach {registry}: {detail}")]
    UpstreamUnreachable { registry: String, detail: String },
    #[error("{registry} did not answer in time ({detail})")]
    Timeout { registry: String, detail: String },
    #[error("internal registry {registry}: {detail}")]
    InternalRegistry { registry: String, detail: String },
    #[error("internal registry {registry} is read-only (a maintenance window); try again later")]
    ReadOnly { registry: String },
    #[error("the copy was cancelled")]
    Cancelled,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl CopyError {
    /// The stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidReference(_) => "INVALID_REFERENCE",
            Self::ImageNotFound(_) => "IMAGE_NOT_FOUND",
            Self::Unauthorized { .. } => "UNAUTHORIZED",
            Self::Denied { .. } => "DENIED",
            Self::RateLimited { .. } => "RATE_LIMITED",
            Self::DigestMismatch { .. } => "DIGEST_MISMATCH",
            Self::ManifestInvalid(_) => "MANIFEST_INVALID",
            Self::UnsupportedMediaType(_) => "UNSUPPORTED_MEDIA_TYPE",
            Self::UpstreamUnreachable { .. } => "UPSTREAM_UNREACHABLE",
            Self::Timeout { .. } => "TIMEOUT",
            Self::InternalRegistry { .. } => "INTERNAL_REGISTRY_ERROR",
            Self::ReadOnly { .. } => "INTERNAL_REGISTRY_READ_ONLY",
            Self::Cancelled => "CANCELLED",
            Self::InvalidArgument(_) => "INVALID_ARGUMENT",
        }
    }

    /// Whether trying the same operation again may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. }
                | Self::UpstreamUnreachable { .. }
                | Self::Timeout { .. }
                | Self::InternalRegistry { .. }
                | Self::ReadOnly { .. }
        )
    }
}
