//! One process-wide TLS crypto provider, and the TLS client configuration HTTP clients share.
//!
//! Several dependencies enable rustls with different providers; with more than one compiled in,
//! rustls cannot pick a default and panics on first use. Every binary and test helper calls
//! [`install_crypto_provider`] first so the choice is explicit.
//!
//! [`client_config`] builds what reqwest would build for each client (the platform verifier
//! over the system's roots and any extra ones, TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1 offered by
//! ALPN) once, so that the egress policy's clients, one per checked destination, do not each
//! load the system's roots again.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Installs aws-lc-rs as the process-wide rustls provider. Idempotent.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is all we need.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The TLS configuration of an HTTP client trusting the system's roots and the PEM
/// certificates in `extra_roots` (an internal CA), for
/// `reqwest::ClientBuilder::tls_backend_preconfigured` (which needs the same rustls version as
/// reqwest's; a mismatch fails when the client is built, not silently).
pub fn client_config(extra_roots: &[u8]) -> Result<rustls::ClientConfig, String> {
    install_crypto_provider();
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let extra: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(extra_roots)
        .collect::<Result<_, _>>()
        .map_err(|_| "the CA bundle is not PEM: invalid certificate encoding".to_owned())?;
    let verifier =
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())
            .map_err(|e| format!("cannot load the trusted CA certificates: {e}"))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| format!("cannot configure TLS: {e}"))?
        // rustls calls every verifier but its own webpki one "dangerous"; this is the verifier
        // reqwest itself installs.
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    // What reqwest offers by default with HTTP/2 enabled.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
