//! Why a copy failed, with the stable codes callers (the API, the CLI's `--json`) report.
//!
//! A registry failure keeps the side it happened on: on the source it is reported as it is
//! (`IMAGE_NOT_FOUND`, `RATE_LIMITED`, `EGRESS_DENIED`, ...); on the internal registry it is
//! `INTERNAL_REGISTRY_ERROR` (or `INTERNAL_REGISTRY_READ_ONLY` in a maintenance window), since
//! the tenant did nothing wrong.

use std::time::Duration;

use crate::code::Code;
use crate::image_config::ImageConfigError;
use crate::manifest::ManifestError;
use crate::registry::RegistryError;

/// A failed copy. `code()` is stable; the message names the registry and object involved and
/// never contains credentials or raw upstream text.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CopyError {
    #[error("{0}")]
    InvalidReference(#[from] crate::reference::ReferenceError),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The image source failed or misbehaved.
    #[error("{0}")]
    Source(RegistryError),
    /// The internal (destination) registry failed.
    #[error("internal registry: {0}")]
    Destination(RegistryError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The image has no manifest for the platform, or its config says another one.
    #[error("platform mismatch: {0}")]
    PlatformMismatch(String),
    /// An artifact (a Helm chart, an SBOM, a signature), not something a runtime can run.
    #[error("not a container image: {0}")]
    NotAContainerImage(String),
    #[error(transparent)]
    ImageConfig(#[from] ImageConfigError),
    #[error("the copy was cancelled")]
    Cancelled,
    /// An OCI image layout (source or destination) failed or is not usable.
    #[error("OCI layout: {0}")]
    Layout(crate::layout::LayoutError),
    /// A staging's layout source is outside this worker's enabled locations.
    #[error("{0}")]
    LocationRefused(String),
}

impl CopyError {
    /// The stable, machine-readable code.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidReference(_) => Code::InvalidReference,
            Self::InvalidArgument(_) => Code::InvalidArgument,
            // Copies only read from a source: a 405 there is the source misbehaving, not a
            // maintenance window of ours.
            Self::Source(RegistryError::ReadOnly { .. }) => Code::UpstreamProtocolError,
            Self::Source(error) => error.code(),
            Self::Destination(RegistryError::ReadOnly { .. }) => Code::InternalRegistryReadOnly,
            Self::Destination(_) => Code::InternalRegistryError,
            Self::Manifest(error) => error.code(),
            Self::PlatformMismatch(_) => Code::PlatformMismatch,
            Self::NotAContainerImage(_) => Code::NotAContainerImage,
            Self::ImageConfig(error) => error.code(),
            Self::Cancelled => Code::Cancelled,
            Self::Layout(error) => error.code(),
            Self::LocationRefused(_) => Code::LocationNotAllowed,
        }
    }

    /// Whether trying the same copy again may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Source(RegistryError::ReadOnly { .. }) => false,
            Self::Source(error) => error.is_transient(),
            // The operator's registry: a restart, a full disk, a maintenance window.
            Self::Destination(error) => !matches!(error, RegistryError::EgressDenied(_)),
            // A bucket or a disk that failed to answer may answer next time.
            Self::Layout(error) => error.code() == Code::LocationIoError,
            _ => false,
        }
    }

    /// When the source said to come back (`Retry-After`, or the fleet's rate-limit budget).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Source(error) => error.retry_after(),
            _ => None,
        }
    }

    /// The internal registry is in a read-only maintenance window.
    pub fn is_read_only(&self) -> bool {
        matches!(self, Self::Destination(RegistryError::ReadOnly { .. }))
    }

    /// The source is rate limiting (429, or the fleet's budget).
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, Self::Source(RegistryError::RateLimited { .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_405_is_a_maintenance_window_only_on_the_internal_registry() {
        let read_only = || RegistryError::ReadOnly {
            registry: "registry.example.com".into(),
        };
        let internal = CopyError::Destination(read_only());
        assert_eq!(internal.code(), Code::InternalRegistryReadOnly);
        assert!(internal.is_read_only() && internal.is_transient());
        // A copy only reads from its source: a 405 there is the source breaking the protocol.
        let source = CopyError::Source(read_only());
        assert_eq!(source.code(), Code::UpstreamProtocolError);
        assert!(!source.is_read_only() && !source.is_transient());
    }
}
