//! HTTPS, and mutual TLS where a client certificate authenticates instead of a token.

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use stager_api::config::StagerSettings;
use stager_api::startup::Application;
use stager_api::tls::TlsSettings;
use testkit::{TestDatabase, TestRegistry};

use crate::helpers::TOKEN;

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    client_identity: String,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["cloud-controller".into()])
        .unwrap()
        .signed_by(&client_key, &issuer)
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    Pki {
        dir,
        ca_pem: ca.pem(),
        client_identity: format!("{}{}", client.pem(), client_key.serialize_pem()),
    }
}

/// The app's URL, and the registry it reports on (kept alive by the caller).
async fn spawn_tls(pki: &Pki, mutual: bool) -> (String, TestRegistry) {
    testkit::init();
    let db = TestDatabase::new().await;
    let registry = TestRegistry::anonymous();
    let tls = TlsSettings {
        cert: pki.dir.path().join("server.pem"),
        key: pki.dir.path().join("server.key"),
        client_ca: mutual.then(|| pki.dir.path().join("ca.pem")),
    };
    let settings = StagerSettings {
        tls: Some(tls),
        ..crate::helpers::settings(&db.url, &registry.host(), &[])
    };
    let app = Application::build(&settings, db.pool().await).unwrap();
    let url = app.base_url();
    tokio::spawn(app.run_until_stopped());
    (url, registry)
}

fn client(pki: &Pki, identity: bool) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap());
    if identity {
        builder =
            builder.identity(reqwest::Identity::from_pem(pki.client_identity.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

#[tokio::test]
async fn https_serves_and_still_requires_a_token() {
    let pki = pki();
    let (url, _registry) = spawn_tls(&pki, false).await;
    assert!(url.starts_with("https://"));
    let client = client(&pki, false);
    assert_eq!(
        client
            .get(format!("{url}/_ping"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        client
            .get(format!("{url}/metrics"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        reqwest::get(format!("{}/_ping", url.replace("https", "http")))
            .await
            .map(|r| r.status() != 200)
            .unwrap_or(true)
    );
}

#[tokio::test]
async fn a_verified_client_certificate_authenticates_without_a_token() {
    let pki = pki();
    let (url, _registry) = spawn_tls(&pki, true).await;
    let with_cert = client(&pki, true);
    assert_eq!(
        with_cert
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let without = client(&pki, false);
    assert_eq!(
        without
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        without
            .get(format!("{url}/metrics"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn tls_settings_name_what_is_missing_or_broken() {
    let lookup = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    };
    let err = TlsSettings::from_lookup(lookup(&[("STAGER_TLS_CERT", "/x.pem")])).unwrap_err();
    assert_eq!(err.setting(), "STAGER_TLS_KEY");
    let err = TlsSettings::from_lookup(lookup(&[("STAGER_TLS_CLIENT_CA", "/ca.pem")])).unwrap_err();
    assert_eq!(err.setting(), "STAGER_TLS_CERT");
    let err = TlsSettings::from_lookup(lookup(&[
        ("STAGER_TLS_CERT", "/no/such.pem"),
        ("STAGER_TLS_KEY", "/no/such.key"),
    ]))
    .unwrap_err();
    assert_eq!(err.setting(), "STAGER_TLS_CERT");
    assert!(TlsSettings::from_lookup(lookup(&[])).unwrap().is_none());
}
