//! Test support shared by every test suite: real components, real images.
//!
//! - [`db`]: one fresh PostgreSQL database per test, cloned from a migrated template on a shared
//!   ephemeral server (crates.io's approach), so tests run in parallel without collisions.
//! - [`registry`]: CNCF distribution registries on loopback, anonymous, htpasswd or bearer-token
//!   (with the small token issuer in [`token_issuer`]), plus their access logs.
//! - [`image`]: synthetic but valid images (gzip'ed tar layers whose diff_ids match the config;
//!   Docker schema2, OCI, manifest lists and indexes), deterministic from seeds, streamed from
//!   disk when large, and pushed with plain HTTP calls independent of tailor's own client.
//! - [`skopeo`]: skopeo as an independent client to check what is in a registry.
//! - [`fault_proxy`]: a proxy in front of a registry that injects 429s, 403s and crafted answers.
//! - [`hostile_registry`]: a registry of its own that lies on purpose (huge or trickling bodies,
//!   redirects anywhere, wrong lengths and digests, hangs), for tests of untrusted upstreams.
//! - [`tcp_target`]: a bare TCP listener that proves whether a client connected at all.
//! - [`netns`]: running a test in a private network namespace, where metadata addresses such as
//!   169.254.169.254 can be bound without any traffic leaving the machine.
//! - [`ha_registry`]: the internal registry's HA shape: registries sharing an S3 bucket
//!   ([`s3`], SeaweedFS) behind a TLS load balancer ([`load_balancer`], nginx), with instances
//!   that can be killed and restarted.
//!
//! Nothing is assumed to be running: every component is started here and stopped on drop.

pub mod access_log;
pub mod bench;
pub mod callback_sink;
pub mod certs;
pub mod db;
pub mod fault_proxy;
pub mod ha_registry;
pub mod hostile_registry;
pub mod image;
pub mod load_balancer;
pub mod netns;
pub mod process;
pub mod push;
pub mod registry;
pub mod s3;
pub mod skopeo;
pub mod supervised_registry;
pub mod tcp_target;
pub mod token_issuer;

pub use db::TestDatabase;
pub use ha_registry::HaRegistry;
pub use image::{
    BuiltImage, BuiltIndex, ImageSpec, IndexSpec, LayerSpec, ManifestFormat, Platform,
};
pub use push::{PushAuth, PushOptions, push_image, push_image_with, push_index, push_index_with};
pub use registry::TestRegistry;

/// Process-wide set-up every test helper calls first: a TLS provider and test logging.
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tailor::tls::install_crypto_provider();
        tailor::telemetry::init();
    });
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}
