//! Self-signed certificates for tests that need real PEM material (TLS settings, templates).

/// A self-signed certificate for `names` and its private key, both PEM.
pub fn self_signed(names: &[&str]) -> (String, String) {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let certified = rcgen::generate_simple_self_signed(names).expect("a self-signed certificate");
    (certified.cert.pem(), certified.signing_key.serialize_pem())
}
