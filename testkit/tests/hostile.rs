//! The test support for untrusted upstreams, checked against independent clients: skopeo copies
//! what an honest `HostileRegistry` serves, each misbehaviour is observed with a plain reqwest
//! client, and the network-namespace helpers are checked from inside and from the host.
//!
//! Assertions are on bytes and counts, never on elapsed time; every wait has a deadline.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use serde_json::{Value, json};
use testkit::hostile_registry::{HostileRegistry, Lie, Misbehaviour, Rule};
use testkit::image::{ArtifactSpec, ImageSpec, IndexSpec, LayerSpec, ManifestFormat, OCI_INDEX};
use testkit::netns::{self, METADATA_V4, METADATA_V6};
use testkit::tcp_target::TcpTarget;
use testkit::{TestDatabase, sha256_digest, skopeo};

const MIB: u64 = 1024 * 1024;
/// The longest any single read of a hostile body may take before the test fails.
const READ_DEADLINE: Duration = Duration::from_secs(20);

/// A client that shows what the server sent: no redirects followed, no proxy, and a deadline
/// on every request, body included.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("a reqwest client")
}

/// Reads a body until its end or its first error: the bytes received and how it ended.
async fn read_all(response: reqwest::Response) -> (Vec<u8>, Result<(), reqwest::Error>) {
    tokio::time::timeout(READ_DEADLINE, async {
        let mut stream = response.bytes_stream();
        let mut body = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => body.extend_from_slice(&chunk),
                Err(error) => return (body, Err(error)),
            }
        }
        (body, Ok(()))
    })
    .await
    .expect("the body ended or failed before the deadline")
}

fn content_length(response: &reqwest::Response) -> Option<u64> {
    response
        .headers()
        .get(reqwest::header::CONTENT_LENGTH)
        .map(|v| v.to_str().unwrap().parse().unwrap())
}

fn memory_bytes(blob: &testkit::image::Blob) -> bytes::Bytes {
    match &blob.data {
        testkit::image::BlobData::Memory(bytes) => bytes.clone(),
        testkit::image::BlobData::File(path) => std::fs::read(path.as_ref() as &std::path::Path)
            .expect("read the layer file")
            .into(),
    }
}

/// Peak resident set size of this process (the registry runs in it), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/self/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in kB");
    kib * 1024
}

// --- the honest registry, judged by skopeo ---

#[tokio::test]
async fn skopeo_copies_an_image_byte_exact_with_a_layer_streamed_from_disk() {
    let registry = HostileRegistry::start();
    let mut spec = ImageSpec::seeded(ManifestFormat::Oci, 41, 2, 32 * 1024);
    // Above IN_MEMORY_LIMIT: built on disk, served as a stream from the file.
    spec.layers.push(LayerSpec {
        seed: 4141,
        size: 12 * MIB,
    });
    let image = spec.build();
    assert!(matches!(
        image.layers[2].data,
        testkit::image::BlobData::File(_)
    ));
    registry.add_image("library/app", "v1", &image);

    let reference = format!("{}/library/app:v1", registry.host());
    let raw = tokio::task::spawn_blocking({
        let reference = reference.clone();
        move || skopeo::inspect_raw(&reference, None)
    })
    .await
    .unwrap()
    .expect("skopeo inspect");
    assert_eq!(raw, image.manifest);

    let layout = tempfile::tempdir().unwrap();
    let dir = layout.path().to_owned();
    tokio::task::spawn_blocking(move || skopeo::copy_to_oci_layout(&reference, None, &dir, false))
        .await
        .unwrap()
        .expect("skopeo copy");
    let blob_path = |digest: &str| {
        layout
            .path()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    assert_eq!(
        std::fs::read(blob_path(&image.digest)).expect("the manifest in the layout"),
        image.manifest,
        "the manifest is copied byte for byte"
    );
    for blob in image.blobs() {
        let copied = std::fs::read(blob_path(&blob.digest)).expect("the blob in the layout");
        assert_eq!(sha256_digest(&copied), blob.digest);
    }
    let blob_gets = registry
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/blobs/") && r.status == Some(200))
        .count();
    assert_eq!(blob_gets, image.blobs().count());
    assert!(registry.served_bytes() >= image.blob_bytes());
    assert!(registry.connections() >= 1);
}

#[tokio::test]
async fn skopeo_copies_an_index_with_every_platform_and_reads_docker_manifests() {
    let registry = HostileRegistry::start();
    let index = IndexSpec::seeded(
        ManifestFormat::Oci,
        42,
        &["linux/amd64", "linux/arm64/v8"],
        2,
        8 * 1024,
    )
    .build();
    registry.add_index("multi/app", "v1", &index);
    let docker = ImageSpec::seeded(ManifestFormat::Docker, 43, 2, 4096).build();
    registry.add_image("docker/app", "latest", &docker);

    let (index_ref, docker_ref) = (
        format!("{}/multi/app:v1", registry.host()),
        format!("{}/docker/app:latest", registry.host()),
    );
    let layout = tempfile::tempdir().unwrap();
    let dir = layout.path().to_owned();
    let (index_raw, docker_raw) = tokio::task::spawn_blocking(move || {
        skopeo::copy_to_oci_layout(&index_ref, None, &dir, true).expect("skopeo copy --all");
        (
            skopeo::inspect_raw(&index_ref, None).expect("inspect the index"),
            skopeo::inspect_raw(&docker_ref, None).expect("inspect the docker image"),
        )
    })
    .await
    .unwrap();
    assert_eq!(index_raw, index.manifest);
    assert_eq!(docker_raw, docker.manifest);
    for child in &index.children {
        let path = layout
            .path()
            .join("blobs/sha256")
            .join(child.digest.trim_start_matches("sha256:"));
        assert_eq!(std::fs::read(path).unwrap(), child.manifest);
    }
}

#[tokio::test]
async fn skopeo_runs_the_bearer_challenge_flow_and_no_secret_is_recorded() {
    let registry = HostileRegistry::start();
    let image = ImageSpec::seeded(ManifestFormat::Oci, 44, 1, 4096).build();
    registry.add_image("private/app", "v1", &image);
    registry.require_token(None);

    let response = client()
        .get(format!(
            "{}/v2/private/app/manifests/v1",
            registry.base_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["www-authenticate"],
        format!(
            "Bearer realm=\"{}/token\",service=\"hostile\",scope=\"repository:private/app:pull\"",
            registry.base_url()
        )
        .as_str()
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");

    let reference = format!("{}/private/app:v1", registry.host());
    let digest = tokio::task::spawn_blocking(move || {
        skopeo::digest(&reference, Some(("hub-user", "hub-pass")))
    })
    .await
    .unwrap()
    .expect("skopeo gets a token and the manifest");
    assert_eq!(digest, image.digest);

    let token_requests = registry.token_requests();
    assert!(!token_requests.is_empty());
    assert!(token_requests.iter().all(|t| {
        t.username.as_deref() == Some("hub-user") && t.password.as_deref() == Some("hub-pass")
    }));
    // Go's url.Values encodes the scope.
    assert!(
        token_requests[0]
            .query
            .contains("scope=repository%3Aprivate%2Fapp%3Apull"),
        "{:?}",
        token_requests[0].query
    );
    let requests = registry.requests();
    assert!(requests.iter().any(|r| {
        r.path == "/v2/private/app/manifests/v1"
            && r.authorization.as_deref() == Some("Bearer")
            && r.status == Some(200)
    }));
    let recorded = format!("{requests:?}");
    assert!(!recorded.contains("hostile-") && !recorded.contains("hub-pass"));
}

#[tokio::test]
async fn the_realm_can_be_anything_and_tls_registries_serve_it_too() {
    let registry = HostileRegistry::start_tls();
    let pem = registry
        .certificate_pem()
        .expect("a TLS registry has a certificate");
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .no_proxy()
        .build()
        .unwrap();
    assert!(registry.base_url().starts_with("https://127.0.0.1:"));
    let response = client
        .get(format!("{}/v2/", registry.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // An http:// realm for an https registry, then a cloud-metadata one: only announced here,
    // never contacted (no client in this test follows a challenge).
    for realm in [
        "http://127.0.0.1:9/token".to_owned(),
        format!("http://{METADATA_V4}/latest/meta-data"),
    ] {
        registry.require_token(Some(realm.clone()));
        let response = client
            .get(format!("{}/v2/app/manifests/v1", registry.base_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(
            response.headers()["www-authenticate"],
            format!("Bearer realm=\"{realm}\",service=\"hostile\",scope=\"repository:app:pull\"")
                .as_str()
        );
    }
}

#[tokio::test]
async fn errors_are_distribution_json_and_tags_are_listed() {
    let registry = HostileRegistry::start();
    let image = ImageSpec::seeded(ManifestFormat::Oci, 45, 1, 1024).build();
    registry.add_image("a/b/c", "v1", &image);
    registry.add_image("a/b/c", "v2", &image);
    let base = registry.base_url();
    let client = client();

    for (path, status, code) in [
        ("/v2/a/b/c/manifests/nope", 404, Some("MANIFEST_UNKNOWN")),
        (
            "/v2/a/b/c/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
            404,
            Some("BLOB_UNKNOWN"),
        ),
        ("/v2/unknown/tags/list", 404, Some("NAME_UNKNOWN")),
        ("/v2/", 200, None),
    ] {
        let response = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), status, "{path}");
        let body: Value = response.json().await.unwrap();
        if let Some(code) = code {
            assert_eq!(body["errors"][0]["code"], code, "{path}");
        }
    }
    let tags: Value = client
        .get(format!("{base}/v2/a/b/c/tags/list"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tags, json!({ "name": "a/b/c", "tags": ["v1", "v2"] }));

    let head = client
        .head(format!("{base}/v2/a/b/c/manifests/{}", image.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(content_length(&head), Some(image.manifest.len() as u64));
    assert_eq!(
        head.headers()["docker-content-digest"],
        image.digest.as_str()
    );
    assert_eq!(head.headers()["content-type"], image.media_type);

    let put = client
        .put(format!("{base}/v2/a/b/c/manifests/v3"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 405);
}

#[tokio::test]
async fn it_listens_on_ipv6() {
    let registry = HostileRegistry::start_on("[::1]:0".parse().unwrap());
    assert!(registry.host().starts_with("[::1]:"), "{}", registry.host());
    assert_eq!(
        registry.base_url(),
        format!("http://[::1]:{}", registry.port())
    );
    let response = client()
        .get(format!("{}/v2/", registry.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(registry.requests()[0].peer.unwrap().is_ipv6());
}

// --- crafted content ---

#[tokio::test]
async fn crafted_config_text_reaches_skopeo_intact() {
    let hostile = "line\nbreak\r\0nul\u{1b}[31mansi\u{9b}c1";
    let image = ImageSpec::seeded(ManifestFormat::Oci, 46, 1, 2048)
        .with_container_config(json!({
            "Cmd": [hostile],
            "Entrypoint": [hostile],
            "Env": [format!("HOSTILE={hostile}")],
            "WorkingDir": hostile,
            "User": hostile,
            "ExposedPorts": { format!("8080/tcp{hostile}"): {} },
            "Labels": { hostile: hostile },
        }))
        .with_config(json!({ "architecture": hostile, "variant": hostile }))
        .build();
    let registry = HostileRegistry::start();
    registry.add_image("crafted/app", "v1", &image);
    let reference = format!("docker://{}/crafted/app:v1", registry.host());
    let output = tokio::task::spawn_blocking(move || {
        skopeo::skopeo()
            .args(["inspect", "--tls-verify=false", &reference])
            .output()
            .expect("run skopeo")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let inspected: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(inspected["Env"][0], format!("HOSTILE={hostile}"));
    assert_eq!(inspected["Labels"][hostile], hostile);
    assert_eq!(inspected["Architecture"], hostile);
}

#[tokio::test]
async fn artifacts_windows_images_and_self_references_are_served() {
    let registry = HostileRegistry::start();
    let client = client();
    let base = registry.base_url();

    let image = ImageSpec::seeded(ManifestFormat::Oci, 47, 1, 1024).build();
    let chart = ArtifactSpec::helm_chart("web", "1.0.0").build();
    let sbom = ArtifactSpec::sbom("web").about(&image).build();
    registry.add_image("charts/web", "1.0.0", &chart);
    registry.add_image("app/web", "v1", &image);
    registry.add_image("app/web", "sbom", &sbom);
    for (repository, tag, built) in [("charts/web", "1.0.0", &chart), ("app/web", "sbom", &sbom)] {
        let response = client
            .get(format!("{base}/v2/{repository}/manifests/{tag}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.bytes().await.unwrap(), built.manifest);
        let config = client
            .get(format!(
                "{base}/v2/{repository}/blobs/{}",
                built.config.digest
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(config.bytes().await.unwrap(), memory_bytes(&built.config));
    }

    // The foreign base layer is not in the registry: clients are to fetch it from its URL.
    let windows = ImageSpec::windows(
        ManifestFormat::Docker,
        48,
        "https://foreign.invalid/{digest}",
    )
    .build();
    registry.add_image("windows/app", "v1", &windows);
    let missing = client
        .get(format!(
            "{base}/v2/windows/app/blobs/{}",
            windows.layers[0].digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let present = client
        .get(format!(
            "{base}/v2/windows/app/blobs/{}",
            windows.layers[1].digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(present.status(), 200);

    let claimed = registry.add_self_referencing_index("loop/app", "v1");
    let by_tag = client
        .get(format!("{base}/v2/loop/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(by_tag.headers()["content-type"], OCI_INDEX);
    let by_tag = by_tag.bytes().await.unwrap();
    let index: Value = serde_json::from_slice(&by_tag).unwrap();
    assert_eq!(index["manifests"][0]["digest"], claimed.as_str());
    assert_eq!(index["manifests"][0]["size"], by_tag.len());
    let followed = client
        .get(format!("{base}/v2/loop/app/manifests/{claimed}"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(followed, by_tag, "following the entry gives the same index");
    assert_ne!(
        sha256_digest(&followed),
        claimed,
        "which does not hash to it"
    );
}

// --- misbehaviour, observed with reqwest ---

#[tokio::test]
async fn an_oversized_body_streams_without_the_server_growing() {
    const BYTES: u64 = 512 * MIB;
    let registry = HostileRegistry::start();
    registry.add_rule(Rule::new("/manifests/", Misbehaviour::oversized(BYTES)));
    let client = client();
    // Warm up the server and the client before the baseline, so their set-up is not counted.
    let warm_up = client
        .get(format!("{}/v2/", registry.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(warm_up.status(), 200);
    let before = peak_rss();

    let response = client
        .get(format!("{}/v2/app/manifests/v1", registry.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        content_length(&response),
        None,
        "no Content-Length: chunked"
    );
    let mut stream = response.bytes_stream();
    let (mut received, mut first) = (0u64, None);
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.expect("the filler streams without error");
            if first.is_none() {
                first = Some(chunk.slice(..chunk.len().min(11)));
            }
            received += chunk.len() as u64;
        }
    })
    .await;
    assert!(read.is_ok(), "512 MiB streamed before the deadline");
    assert_eq!(received, BYTES);
    assert_eq!(first.as_deref(), Some(&b"{\"filler\":\""[..]));
    assert!(registry.served_bytes() >= BYTES);
    let grown = peak_rss().saturating_sub(before);
    assert!(
        grown < 64 * MIB,
        "peak RSS grew by {} MiB while streaming 512 MiB",
        grown / MIB
    );
}

#[tokio::test]
async fn an_oversized_body_can_declare_its_length_and_any_status() {
    let registry = HostileRegistry::start();
    registry.add_rule(
        Rule::new(
            "/token",
            Misbehaviour::Oversized {
                status: 500,
                bytes: 3 * MIB,
                declare_length: true,
            },
        )
        .times(1),
    );
    let response = client()
        .get(format!("{}/token?service=hostile", registry.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    assert_eq!(content_length(&response), Some(3 * MIB));
    let (body, ended) = read_all(response).await;
    ended.expect("a complete body");
    assert_eq!(body.len() as u64, 3 * MIB);
    assert_eq!(
        registry.requests()[0].misbehaviour,
        Some("oversized"),
        "the record names the rule"
    );

    // Used once: the next token request is honest.
    let honest: Value = client()
        .get(format!("{}/token?service=hostile", registry.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(honest["expires_in"], 300);
}

#[tokio::test]
async fn a_trickle_sends_about_one_byte_per_second() {
    let registry = HostileRegistry::start();
    registry.add_rule(Rule::new(
        "/v2/slow/",
        Misbehaviour::Trickle {
            bytes_per_second: 1,
            body: Some(b"0123456789".repeat(10)),
        },
    ));
    let response = client()
        .get(format!("{}/v2/slow/manifests/v1", registry.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(content_length(&response), Some(100));
    let mut stream = response.bytes_stream();
    let mut received = Vec::new();
    let window = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(window, stream.next()).await {
        received.extend_from_slice(&chunk.expect("a trickled chunk"));
    }
    assert!(
        (1..=4).contains(&received.len()),
        "{} bytes in the first two seconds",
        received.len()
    );
    assert_eq!(received, &b"0123456789"[..received.len()]);
}

#[tokio::test]
async fn a_trickle_of_real_content_delivers_it_intact() {
    let registry = HostileRegistry::start();
    let image = ImageSpec::seeded(ManifestFormat::Oci, 49, 1, 16 * 1024).build();
    registry.add_image("app", "v1", &image);
    let layer = &image.layers[0];
    registry.add_rule(Rule::new(
        "/blobs/",
        Misbehaviour::Trickle {
            bytes_per_second: 200_000,
            body: None,
        },
    ));
    let response = client()
        .get(format!(
            "{}/v2/app/blobs/{}",
            registry.base_url(),
            layer.digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(content_length(&response), Some(layer.size));
    assert_eq!(
        response.headers()["docker-content-digest"],
        layer.digest.as_str()
    );
    let (body, ended) = read_all(response).await;
    ended.expect("a complete body");
    assert_eq!(sha256_digest(&body), layer.digest);
}

#[tokio::test]
async fn redirects_carry_their_status_and_location() {
    let registry = HostileRegistry::start();
    let client = client();
    for (status, location) in [
        (301, "http://127.0.0.2:1/v2/app/blobs/x"),
        (
            302,
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        ),
        (307, "http://[fd00:ec2::254]/latest/api/token"),
        (308, "file:///etc/passwd"),
    ] {
        registry.clear_rules();
        registry.add_rule(Rule::new(
            "/blobs/",
            Misbehaviour::Redirect {
                status,
                location: location.to_owned(),
            },
        ));
        let response = client
            .get(format!("{}/v2/app/blobs/sha256:00", registry.base_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status);
        assert_eq!(response.headers()["location"], location);
    }
}

#[tokio::test]
async fn canned_answers_carry_hostile_bytes() {
    let registry = HostileRegistry::start();
    let body = b"boom\0nul\r\nInjected: yes\r\n\x1b[2J\x1b[31mred\xff\xfe".to_vec();
    let header = b"tab\there \xc2\x9b31m obs-text \xff".to_vec();
    registry.add_rule(
        Rule::new(
            "/manifests/",
            Misbehaviour::Respond {
                status: 500,
                headers: vec![("X-Hostile".into(), header.clone())],
                body: body.clone(),
            },
        )
        .method("GET")
        .times(1),
    );
    registry.add_rule(Rule::new(
        "/manifests/",
        Misbehaviour::Respond {
            status: 429,
            headers: vec![("Retry-After".into(), b"3".to_vec())],
            body: Vec::new(),
        },
    ));
    let client = client();
    let url = format!("{}/v2/app/manifests/v1", registry.base_url());

    let first = client.get(&url).send().await.unwrap();
    assert_eq!(first.status(), 500);
    assert_eq!(first.headers()["x-hostile"].as_bytes(), header);
    assert_eq!(first.bytes().await.unwrap(), body);

    let second = client.get(&url).send().await.unwrap();
    assert_eq!(second.status(), 429);
    assert_eq!(second.headers()["retry-after"], "3");
}

#[tokio::test]
async fn a_hang_never_answers_and_does_not_block_other_requests() {
    let registry = HostileRegistry::start();
    registry.add_rule(Rule::new("/manifests/hang", Misbehaviour::Hang));
    let client = client();
    let hung = client
        .get(format!("{}/v2/app/manifests/hang", registry.base_url()))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    let error = hung.expect_err("no answer");
    assert!(error.is_timeout(), "{error}");

    let other = client
        .get(format!("{}/v2/", registry.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    let hang_record = registry
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/hang"))
        .expect("the hung request is recorded");
    assert_eq!(
        (hang_record.misbehaviour, hang_record.status),
        (Some("hang"), None)
    );
    registry.stop().await;
}

#[tokio::test]
async fn a_connection_can_be_dropped_mid_body() {
    let registry = HostileRegistry::start();
    let image = ImageSpec::seeded(ManifestFormat::Oci, 50, 1, 64 * 1024).build();
    registry.add_image("app", "v1", &image);
    let layer = &image.layers[0];
    registry.add_rule(Rule::new(
        "/blobs/",
        Misbehaviour::CloseMidBody { after_bytes: 1000 },
    ));
    let response = client()
        .get(format!(
            "{}/v2/app/blobs/{}",
            registry.base_url(),
            layer.digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(content_length(&response), Some(layer.size));
    let (body, ended) = read_all(response).await;
    assert!(ended.is_err(), "the body must end in an error");
    assert_eq!(body.len(), 1000);
    assert_eq!(body, memory_bytes(layer)[..1000]);
}

#[tokio::test]
async fn lies_about_lengths_content_and_digests() {
    let registry = HostileRegistry::start();
    let image = ImageSpec::seeded(ManifestFormat::Oci, 51, 1, 8 * 1024).build();
    registry.add_image("app", "v1", &image);
    let layer = &image.layers[0];
    let real = memory_bytes(layer);
    let blob_url = format!("{}/v2/app/blobs/{}", registry.base_url(), layer.digest);
    let client = client();
    let lie = |lie: Lie| {
        registry.clear_rules();
        registry.add_rule(Rule::new("/v2/app/", Misbehaviour::Lie(lie)));
    };

    lie(Lie::LengthLonger { extra: 10 });
    let response = client.get(&blob_url).send().await.unwrap();
    assert_eq!(content_length(&response), Some(layer.size + 10));
    let (body, ended) = read_all(response).await;
    assert!(ended.is_err(), "the body ends before its declared length");
    assert_eq!(body, real);

    lie(Lie::LengthShorter { fewer: 10 });
    let response = client.get(&blob_url).send().await.unwrap();
    assert_eq!(content_length(&response), Some(layer.size - 10));
    let (body, _) = read_all(response).await;
    assert_eq!(
        body,
        real[..real.len() - 10],
        "the client reads what was declared"
    );

    lie(Lie::WrongContent);
    let response = client.get(&blob_url).send().await.unwrap();
    assert_eq!(content_length(&response), Some(layer.size));
    let (body, ended) = read_all(response).await;
    ended.expect("a complete body");
    assert_eq!(body.len(), real.len());
    assert_ne!(sha256_digest(&body), layer.digest);

    let other = format!("sha256:{}", "ab".repeat(32));
    lie(Lie::DigestHeader(other.clone()));
    let response = client
        .get(format!("{}/v2/app/manifests/v1", registry.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["docker-content-digest"], other.as_str());
    assert_eq!(response.bytes().await.unwrap(), image.manifest);
}

// --- network namespaces and targets ---

#[test]
fn metadata_addresses_are_bound_only_inside_a_private_namespace() {
    let host_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A target on the host's loopback, to show the namespace cannot reach it.
    let host_target =
        host_runtime.block_on(async { TcpTarget::bind("127.0.0.1:0".parse().unwrap()) });
    let host_port = host_target.addr().port();
    assert!(!netns::in_isolated_namespace());

    let (v4_received, v6_received) = netns::run_isolated_async(move || async move {
        assert!(netns::in_isolated_namespace());
        let v4 = TcpTarget::bind(SocketAddr::from((METADATA_V4, 80)));
        let v6 = TcpTarget::bind(SocketAddr::from((METADATA_V6, 80)));
        let client = client();
        for url in [
            "http://169.254.169.254/latest/meta-data/".to_owned(),
            "http://[fd00:ec2::254]/latest/api/token".to_owned(),
        ] {
            let response = client.get(&url).send().await.expect("the target answers");
            assert_eq!(response.text().await.unwrap(), "tcp-target");
        }
        let raw = tokio::net::TcpStream::connect(SocketAddr::from((METADATA_V4, 80)))
            .await
            .expect("a raw connection");
        drop(raw);
        assert!(v4.wait_for_connections(2, Duration::from_secs(5)).await);
        assert_eq!((v4.accepted(), v6.accepted()), (2, 1));

        let to_host = tokio::net::TcpStream::connect(("127.0.0.1", host_port)).await;
        assert!(to_host.is_err(), "the host's loopback is out of reach");
        (v4.received(), v6.received())
    });
    assert!(
        v4_received[0].starts_with("GET /latest/meta-data/ HTTP/1.1\r\n"),
        "{v4_received:?}"
    );
    assert!(v6_received[0].starts_with("GET /latest/api/token HTTP/1.1\r\n"));
    assert_eq!(host_target.accepted(), 0);

    // Nothing of the namespace is left on the host.
    let output = std::process::Command::new("ip")
        .args(["-o", "addr", "show", "dev", "lo"])
        .output()
        .expect("run ip");
    let host_lo = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(
        !host_lo.contains("169.254.169.254") && !host_lo.contains("fd00:ec2::254"),
        "{host_lo}"
    );
    assert!(!netns::in_isolated_namespace());
}

#[test]
#[should_panic(expected = "bind it only inside testkit::netns::run_isolated")]
fn a_metadata_address_cannot_be_bound_on_the_host() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async { TcpTarget::bind(SocketAddr::from((METADATA_V4, 80))) });
}

#[test]
fn skopeo_reads_a_registry_on_the_metadata_address_inside_the_namespace() {
    let image = ImageSpec::seeded(ManifestFormat::Oci, 52, 1, 1024).build();
    let expected = image.digest.clone();
    let (digest, requests) = netns::run_isolated_async(move || async move {
        let registry = HostileRegistry::start_on(SocketAddr::from((METADATA_V4, 80)));
        registry.add_image("app", "v1", &image);
        assert_eq!(registry.host(), "169.254.169.254:80");
        let digest =
            tokio::task::spawn_blocking(|| skopeo::digest("169.254.169.254:80/app:v1", None))
                .await
                .unwrap()
                .expect("skopeo inside the namespace");
        (digest, registry.requests().len())
    });
    assert_eq!(digest, expected);
    assert!(requests >= 1);
}

#[test]
fn a_private_database_runs_inside_the_namespace() {
    let (applied, expected) = netns::run_isolated_async(|| async {
        // The shared server lives on the host's loopback: asking for it here is a mistake.
        let shared = std::panic::AssertUnwindSafe(TestDatabase::new())
            .catch_unwind()
            .await;
        assert!(shared.is_err(), "refused inside the namespace");

        let database = TestDatabase::private().await;
        let pool = database.pool().await;
        let applied: i64 =
            sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&pool)
                .await
                .expect("query the private database");
        pool.close().await;
        (applied, tailor::db::MIGRATOR.iter().count())
    });
    assert_eq!(applied as usize, expected);
}
