//! One process-wide TLS crypto provider.
//!
//! Several dependencies enable rustls with different providers; with more than one compiled in,
//! rustls cannot pick a default and panics on first use. Every binary and test helper calls
//! [`install_crypto_provider`] first so the choice is explicit.

/// Installs aws-lc-rs as the process-wide rustls provider. Idempotent.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is all we need.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
