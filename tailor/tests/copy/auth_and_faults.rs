//! Authentication, registry errors mapped to stable codes, retries, and bad content refused.

use std::io::{Seek, SeekFrom, Write};

use testkit::TestRegistry;
use testkit::fault_proxy::{FaultProxy, Rule};
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::token_issuer::IssuerPolicy;

use crate::helpers::*;

#[tokio::test]
async fn a_corrupted_upstream_blob_fails_with_digest_mismatch_and_tags_nothing() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Docker, 600, 3, 256 * 1024).build();
    hub.push("bad/app:v1", &image).await;
    let victim = &image.layers[1];
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(hub.blob_data_path(&victim.digest))
        .unwrap();
    file.seek(SeekFrom::Start(victim.size / 2)).unwrap();
    file.write_all(b"flipped bits").unwrap();
    drop(file);

    let error = copy(
        &registries,
        &format!("{}/bad/app:v1", hub.host()),
        &format!("{}/t/bad:s", internal.host()),
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), "DIGEST_MISMATCH", "{error}");
    assert!(error.to_string().contains(&victim.digest));

    let tag = reqwest::get(format!("{}/v2/t/bad/manifests/s", internal.base_url()))
        .await
        .unwrap();
    assert_eq!(tag.status(), 404, "nothing is tagged");
    let corrupt = reqwest::Client::new()
        .head(format!(
            "{}/v2/t/bad/blobs/{}",
            internal.base_url(),
            victim.digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(
        corrupt.status(),
        404,
        "the corrupted blob was never committed"
    );
}

#[tokio::test]
async fn basic_auth_on_both_sides() {
    let hub = TestRegistry::htpasswd("hub-user", "hub-secret");
    let internal = TestRegistry::htpasswd("tailor", "internal-secret");
    let image = ImageSpec::seeded(ManifestFormat::Oci, 610, 2, 8192).build();
    hub.push("private/app:v1", &image).await;
    let (src, dst) = (
        format!("{}/private/app:v1", hub.host()),
        format!("{}/t/app:s", internal.host()),
    );

    let anonymous = registries(&[hub.host(), internal.host()]);
    assert_eq!(
        copy(&anonymous, &src, &dst).await.unwrap_err().code(),
        "UNAUTHORIZED"
    );

    let wrong = registries(&[hub.host(), internal.host()]).with_credentials(
        &hub.host(),
        tailor::registry::Credentials::new("hub-user", "nope"),
    );
    assert_eq!(
        copy(&wrong, &src, &dst).await.unwrap_err().code(),
        "UNAUTHORIZED"
    );

    let both = with_creds(
        with_creds(registries(&[hub.host(), internal.host()]), &hub),
        &internal,
    );
    let report = copy(&both, &src, &dst).await.unwrap();
    assert_eq!(skopeo_digest(&internal, "t/app:s").unwrap(), image.digest);
    assert_eq!(report.blobs.copied, 3);
}

#[tokio::test]
async fn bearer_tokens_through_the_challenge_flow_are_cached() {
    let hub = TestRegistry::token(IssuerPolicy {
        username: "hub-user".into(),
        password: "hub-secret".into(),
        anonymous_pull: false,
        expires_in: 300,
    });
    let internal = TestRegistry::anonymous();
    let image = ImageSpec::seeded(ManifestFormat::Docker, 620, 6, 8192).build();
    hub.push("private/tok:v1", &image).await;
    let (src, dst) = (
        format!("{}/private/tok:v1", hub.host()),
        format!("{}/t/tok:s", internal.host()),
    );

    let anonymous = registries(&[hub.host(), internal.host()]);
    assert_eq!(
        copy(&anonymous, &src, &dst).await.unwrap_err().code(),
        "UNAUTHORIZED"
    );

    let issued_before = hub.issuer().unwrap().issued();
    let authed = with_creds(registries(&[hub.host(), internal.host()]), &hub);
    let report = copy(&authed, &src, &dst).await.unwrap();
    assert_eq!(report.blobs.copied, 7);
    assert_eq!(
        hub.issuer().unwrap().issued() - issued_before,
        1,
        "one pull token serves the manifest and all blobs"
    );
    assert_eq!(skopeo_digest(&internal, "t/tok:s").unwrap(), image.digest);
}

#[tokio::test]
async fn registry_errors_map_to_stable_codes() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let image = ImageSpec::seeded(ManifestFormat::Docker, 630, 1, 1024).build();
    hub.push("err/app:v1", &image).await;
    let proxy = FaultProxy::start(&hub.base_url());
    let registries = registries(&[hub.host(), internal.host(), proxy.host()]);
    let dst = format!("{}/t/err:s", internal.host());

    let missing = copy(&registries, &format!("{}/err/nothing:v1", hub.host()), &dst)
        .await
        .unwrap_err();
    assert_eq!(missing.code(), "IMAGE_NOT_FOUND");

    proxy.add(Rule::new("/v2/err/denied/", 403).body(
        r#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#,
    ));
    let denied = copy(
        &registries,
        &format!("{}/err/denied:v1", proxy.host()),
        &dst,
    )
    .await
    .unwrap_err();
    assert_eq!(denied.code(), "DENIED");
    assert!(
        denied
            .to_string()
            .contains("requested access to the resource is denied"),
        "{denied}"
    );

    proxy.add(Rule::new("/v2/err/limited/", 429).header("Retry-After", "0"));
    let limited = copy(
        &registries,
        &format!("{}/err/limited:v1", proxy.host()),
        &dst,
    )
    .await
    .unwrap_err();
    assert_eq!(limited.code(), "RATE_LIMITED");

    proxy.add(Rule::new("/v2/err/broken/", 503));
    let broken = copy(
        &registries,
        &format!("{}/err/broken:v1", proxy.host()),
        &dst,
    )
    .await
    .unwrap_err();
    assert_eq!(broken.code(), "UPSTREAM_UNREACHABLE");
    let tries = proxy
        .answered()
        .iter()
        .filter(|(p, _)| p.contains("/err/broken/"))
        .count();
    assert_eq!(
        tries as u32,
        tailor::registry::RetryPolicy::patient().max_attempts,
        "bounded retries"
    );

    let closed = testkit_closed_port();
    let unreachable = copy(
        &crate::helpers::registries(std::slice::from_ref(&closed)),
        &format!("{closed}/err/app:v1"),
        &dst,
    )
    .await
    .unwrap_err();
    assert_eq!(unreachable.code(), "UPSTREAM_UNREACHABLE");
}

/// A failed TLS handshake is the same on every try (a server that does not speak TLS, a
/// certificate nobody vouches for): it is reported at once, not retried.
#[tokio::test]
async fn a_failed_tls_handshake_is_reported_without_retrying() {
    let internal = TestRegistry::anonymous();
    let plain = testkit::tcp_target::TcpTarget::bind("127.0.0.1:0".parse().unwrap());
    let source = plain.addr().to_string();
    // Only the internal registry is plain HTTP: the source is spoken to over HTTPS.
    let registries = registries(std::slice::from_ref(&internal.host()));
    assert!(
        tailor::registry::RetryPolicy::patient().max_attempts > 1,
        "the policy would retry a transport error"
    );

    let error = copy(
        &registries,
        &format!("{source}/tls/app:v1"),
        &format!("{}/t/app:s", internal.host()),
    )
    .await
    .unwrap_err();

    assert_eq!(error.code(), "UPSTREAM_UNREACHABLE", "{error}");
    assert!(error.to_string().contains("does not speak TLS"), "{error}");
    assert_eq!(plain.accepted(), 1, "one handshake, no retries: {error}");
}

fn testkit_closed_port() -> String {
    let port = tailor::embedded::free_loopback_port().unwrap();
    format!("127.0.0.1:{port}")
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_and_retried() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let image = ImageSpec::seeded(ManifestFormat::Oci, 640, 2, 4096).build();
    hub.push("slow/app:v1", &image).await;
    let proxy = FaultProxy::start(&hub.base_url());
    proxy.add(
        Rule::new("/manifests/v1", 429)
            .times(1)
            .header("Retry-After", "1"),
    );
    proxy.add(
        Rule::new("/blobs/", 429)
            .method("GET")
            .times(1)
            .header("Retry-After", "1"),
    );
    let registries = registries(&[internal.host(), proxy.host()]);

    let started = std::time::Instant::now();
    let report = copy(
        &registries,
        &format!("{}/slow/app:v1", proxy.host()),
        &format!("{}/t/slow:s", internal.host()),
    )
    .await
    .unwrap();
    assert_eq!(proxy.answered().len(), 2, "both 429s were served");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "Retry-After was honoured twice"
    );
    assert_eq!(report.source_digest, image.digest);
    assert_eq!(skopeo_digest(&internal, "t/slow:s").unwrap(), image.digest);
}

#[tokio::test]
async fn schema1_unknown_and_oversized_manifests_are_refused() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let proxy = FaultProxy::start(&hub.base_url());
    let registries = registries(&[internal.host(), proxy.host()]);
    let dst = format!("{}/t/refused:s", internal.host());

    proxy.add(
        Rule::new("/v2/old/schema1/manifests/", 200)
            .header(
                "Content-Type",
                "application/vnd.docker.distribution.manifest.v1+prettyjws",
            )
            .body(
                r#"{"schemaVersion":1,"name":"old/schema1","tag":"v1","fsLayers":[],"history":[]}"#,
            ),
    );
    let schema1 = copy(
        &registries,
        &format!("{}/old/schema1:v1", proxy.host()),
        &dst,
    )
    .await
    .unwrap_err();
    assert_eq!(schema1.code(), "UNSUPPORTED_MEDIA_TYPE");
    assert!(schema1.to_string().contains("schema 1"), "{schema1}");

    proxy.add(
        Rule::new("/v2/odd/helm/manifests/", 200)
            .header(
                "Content-Type",
                "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
            )
            .body(r#"{"schemaVersion":2}"#),
    );
    let unknown = copy(&registries, &format!("{}/odd/helm:v1", proxy.host()), &dst)
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), "UNSUPPORTED_MEDIA_TYPE");

    let huge = format!(
        r#"{{"schemaVersion":2,"pad":"{}"}}"#,
        "x".repeat(5 * 1024 * 1024)
    );
    proxy.add(
        Rule::new("/v2/big/manifest/manifests/", 200)
            .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            .body(huge),
    );
    let oversized = copy(
        &registries,
        &format!("{}/big/manifest:v1", proxy.host()),
        &dst,
    )
    .await
    .unwrap_err();
    assert_eq!(oversized.code(), "RESPONSE_TOO_LARGE");
    assert!(oversized.to_string().contains("limit"), "{oversized}");
}
