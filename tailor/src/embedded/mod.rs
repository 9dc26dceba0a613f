//! Real components started by tailor itself: an ephemeral PostgreSQL cluster and CNCF
//! distribution registries on loopback (on local disk or on S3).
//!
//! This is what `stager-api embedded` runs on, and what every test runs against (through the
//! `testkit` crate). Nothing here assumes a system service: each component lives in a private
//! temporary directory, listens on a free loopback port, and is stopped and deleted when its
//! handle is dropped. Directories left by a process that was killed are swept at the next start.

mod postgres;
mod process;
mod registry;
mod workdir;

pub use postgres::{EmbeddedPostgres, find_postgres_bin_dir};
pub use process::{ManagedChild, free_loopback_port};
pub use registry::{
    EmbeddedRegistry, RegistryAuth, RegistryOptions, RegistryStorage, S3Storage,
    find_registry_binary, probe_v2, render_config,
};
pub use workdir::WorkDir;

use crate::code::Code;

/// Why a component could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("{program} is not installed: {hint}")]
    NotInstalled {
        program: &'static str,
        hint: &'static str,
    },
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{component} failed to start: {detail}")]
    StartFailed {
        component: &'static str,
        detail: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl EmbeddedError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    /// A stable, machine-readable code for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::NotInstalled { .. } => Code::ComponentNotInstalled,
            Self::Spawn { .. } | Self::StartFailed { .. } => Code::ComponentStartFailed,
            Self::Io { .. } => Code::ComponentIoError,
        }
    }
}
