//! tailor: stages container images from upstream registries into an internal OCI registry.
//!
//! The library holds everything the `tailor` and `stager-api` binaries share: configuration,
//! the database (migrations, the staging queue, the reference record), the pruner, the copy engine (`copy`, on top of
//! `reference`, `manifest` and `registry`), and, with the `embedded` feature, the embedded
//! components the single-node default and the tests run on (Linux only: they manage child
//! processes with `prctl`; without the feature the library and `tailor` build anywhere).
//! See `docs/ARCHITECTURE.md` for the map.

pub mod code;
pub mod config;
pub mod copy;
pub mod db;
pub mod digest;
pub mod egress;
#[cfg(feature = "embedded")]
pub mod embedded;
pub mod error;
pub mod image_config;
pub mod layout;
pub mod manifest;
pub mod platform;
pub mod portable;
pub mod prune;
pub mod reference;
pub mod registry;
pub mod secrets;
pub mod staging;
pub mod telemetry;
pub mod text;
pub mod tls;
