//! Certificates for tests that need real PEM material (TLS settings, templates, HTTPS servers).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A self-signed certificate for `names` and its private key, both PEM.
pub fn self_signed(names: &[&str]) -> (String, String) {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let certified = rcgen::generate_simple_self_signed(names).expect("a self-signed certificate");
    (certified.cert.pem(), certified.signing_key.serialize_pem())
}

/// A test certificate authority: clients trust its certificate, servers present certificates
/// it issued, as with a real deployment's CA (and unlike a self-signed server certificate,
/// which some clients refuse to use as a trust anchor).
pub struct TestCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    /// A fresh CA named `common_name`.
    pub fn new(common_name: &str) -> Self {
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let cert = params
            .self_signed(&key)
            .expect("a self-signed CA certificate");
        Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `names` (DNS names or IP addresses) signed by this CA, and its
    /// private key, both PEM.
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().expect("a server key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("server certificate parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, "tailor test server");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("a certificate signed by the test CA");
        (cert.pem(), key.serialize_pem())
    }

    /// Writes the CA certificate as `dir/ca.crt`, the layout skopeo's `--*-cert-dir` and
    /// containers' `certs.d/<host>/` expect; returns the file's path.
    pub fn write_cert_dir(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).expect("create the certificate directory");
        let path = dir.join("ca.crt");
        std::fs::write(&path, &self.cert_pem).expect("write ca.crt");
        path
    }
}
