//! Trust boundaries, tried as an attacker would: one tenant reading another's image out of the
//! internal registry (by naming it, by redirecting to it, by naming its blobs' digests), a
//! staging or a callback reaching loopback or tailor's own endpoints, upstreams that trickle,
//! hang or put NUL and newlines in their text, images that cannot run, a dead callback
//! endpoint, and a failed staging's tag. Upstreams are real HTTP servers that misbehave on
//! purpose ([`HostileRegistry`]); the internal registry and PostgreSQL are the real ones.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use testkit::hostile_registry::{HostileRegistry, Misbehaviour, Rule};
use testkit::image::{ArtifactSpec, ImageSpec, ManifestFormat};
use testkit::tcp_target::TcpTarget;
use testkit::{TestRegistry, skopeo};
use uuid::Uuid;

use crate::helpers::{AppOptions, TestApp, spawn};

const LAYER: u64 = 64 * 1024;

async fn app_with(hostile: &HostileRegistry, workers: usize, env: &[(&str, &str)]) -> TestApp {
    let mut options = AppOptions {
        workers,
        also_insecure: vec![hostile.host()],
        ..AppOptions::default()
    };
    for (name, value) in env {
        options = options.env(name, value);
    }
    spawn(options).await
}

/// POSTs a staging of `image`; asserts it was accepted and returns its GUID.
async fn stage(app: &TestApp, image: &str) -> String {
    let (status, body) = app
        .stage(json!({ "app_guid": Uuid::new_v4(), "image": image }))
        .await;
    assert_eq!(status, 202, "{image}: {body}");
    body["staging_guid"].as_str().unwrap().to_owned()
}

/// Stages `image` and waits for it to end; returns the finished staging.
async fn staged(app: &TestApp, image: &str) -> Value {
    let guid = stage(app, image).await;
    app.wait_finished(&guid).await
}

fn error_code(staging: &Value) -> &str {
    staging["error"]["code"].as_str().unwrap_or("")
}

/// No character that could end a log line, forge the next, recolour a terminal or stop
/// PostgreSQL.
fn assert_clean(what: &str, text: &str) {
    assert!(
        !text.chars().any(tailor::text::is_hostile),
        "{what} carries raw control characters: {text:?}"
    );
}

/// How many requests the internal registry has seen for paths containing `needle`.
fn internal_requests(app: &TestApp, needle: &str) -> usize {
    app.internal()
        .access_log()
        .iter()
        .filter(|e| e.path.contains(needle))
        .count()
}

#[tokio::test]
async fn the_internal_registry_is_never_a_source_under_any_spelling() {
    let hostile = HostileRegistry::start();
    let realm = HostileRegistry::start();
    let app = spawn(AppOptions {
        workers: 2,
        also_insecure: vec![hostile.host(), realm.host()],
        ..AppOptions::default()
    })
    .await;
    // A victim's image in the internal registry.
    let image = ImageSpec::seeded(ManifestFormat::Docker, 6100, 2, LAYER).build();
    app.hub.push("victim/app:v1", &image).await;
    let victim = staged(&app, &format!("{}/victim/app:v1", app.hub.host())).await;
    assert_eq!(victim["state"], "succeeded", "{victim}");
    let victim_repo = format!("tailor/{}", victim["app_guid"].as_str().unwrap());
    let victim_tag = victim["staging_guid"].as_str().unwrap();
    let port = app.internal().host().rsplit_once(':').unwrap().1.to_owned();
    let before = internal_requests(&app, &victim_repo);

    // Loopback is allowed in these tests (upstreams live there): the refusal is tailor's own.
    for host in [
        "127.0.0.1",
        "127.1",
        "127.0.0.2",
        "0.0.0.0",
        "localhost",
        "LocalHost",
        "[::1]",
        "2130706433",
        "0x7f.0.0.1",
    ] {
        let reference = format!("{host}:{port}/{victim_repo}:{victim_tag}");
        let (status, body) = app
            .stage(json!({ "app_guid": Uuid::new_v4(), "image": reference }))
            .await;
        assert_eq!(status, 422, "{reference}: {body}");
        assert_eq!(
            body["code"], "INTERNAL_SOURCE_REFUSED",
            "{reference}: {body}"
        );
    }

    // An upstream that redirects a blob, or its token realm, into the internal registry.
    let bait = ImageSpec::seeded(ManifestFormat::Docker, 6101, 1, LAYER).build();
    hostile.add_image("bait/blob", "v1", &bait);
    hostile.add_rule(Rule::new(
        &format!("/v2/bait/blob/blobs/{}", bait.layers[0].digest),
        Misbehaviour::Redirect {
            status: 307,
            location: format!(
                "http://127.0.0.1:{port}/v2/{victim_repo}/blobs/{}",
                image.layers[0].digest
            ),
        },
    ));
    let redirected = staged(&app, &format!("{}/bait/blob:v1", hostile.host())).await;
    assert_eq!(
        error_code(&redirected),
        "INTERNAL_SOURCE_REFUSED",
        "{redirected}"
    );

    realm.add_image("bait/realm", "v1", &bait);
    realm.require_token(Some(format!("http://localhost:{port}/token")));
    let by_realm = staged(&app, &format!("{}/bait/realm:v1", realm.host())).await;
    assert_eq!(
        error_code(&by_realm),
        "INTERNAL_SOURCE_REFUSED",
        "{by_realm}"
    );
    assert_eq!(internal_requests(&app, "/token"), 0);

    assert_eq!(
        internal_requests(&app, &victim_repo),
        before,
        "nothing was read from the victim's repository"
    );
}

#[tokio::test]
async fn a_tenant_cannot_mount_another_tenants_blobs_by_naming_their_digests() {
    let hub = TestRegistry::htpasswd("owner", "private-pass");
    let hostile = HostileRegistry::start();
    let app = spawn(AppOptions {
        workers: 2,
        hub: Some(hub),
        also_insecure: vec![hostile.host()],
        ..AppOptions::default()
    })
    .await;
    let private = ImageSpec::seeded(ManifestFormat::Oci, 6200, 3, LAYER).build();
    app.hub.push("owner/secret:v1", &private).await;
    let (status, owner) = app
        .stage(json!({
            "app_guid": Uuid::new_v4(),
            "image": format!("{}/owner/secret:v1", app.hub.host()),
            "credentials": { "username": "owner", "password": "private-pass" },
        }))
        .await;
    assert_eq!(status, 202, "{owner}");
    let owner = app
        .wait_finished(owner["staging_guid"].as_str().unwrap())
        .await;
    assert_eq!(owner["state"], "succeeded", "{owner}");

    // The attacker publishes the private image's manifest (its digests are no secret) on a
    // registry of their own, which has none of its blobs, and stages it.
    hostile.add_manifest(
        "thief/copy",
        "v1",
        private.media_type,
        private.manifest.clone(),
    );
    let thief_app = Uuid::new_v4();
    let (_, thief) = app
        .stage(
            json!({ "app_guid": thief_app, "image": format!("{}/thief/copy:v1", hostile.host()) }),
        )
        .await;
    let thief = app
        .wait_finished(thief["staging_guid"].as_str().unwrap())
        .await;
    assert_eq!(thief["state"], "failed", "{thief}");
    let mounts_into_thief = app
        .internal()
        .access_log()
        .iter()
        .filter(|e| {
            e.method == "POST"
                && e.path.contains(&format!("tailor/{thief_app}/"))
                && e.path.contains("mount=")
        })
        .count();
    assert_eq!(
        mounts_into_thief, 0,
        "no mount was even tried from the owner's repository"
    );
    assert!(
        app.internal_tags(&format!("tailor/{thief_app}"))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn loopback_and_tailors_own_endpoints_are_refused_and_never_reached() {
    let hostile = HostileRegistry::start();
    let app = app_with(&hostile, 2, &[]).await;
    // 127.0.0.2 is loopback, outside these tests' allowance (127.0.0.1).
    let target = TcpTarget::bind("127.0.0.2:0".parse().unwrap());
    let app_port = app.address.rsplit_once(':').unwrap().1;
    let db_port = {
        let url =
            reqwest::Url::parse(&std::env::var("TAILOR_TEST_DATABASE_URL").unwrap_or_default())
                .ok();
        url.and_then(|u| u.port()).unwrap_or(5432)
    };

    for (field, value, code) in [
        ("image", format!("{}/x/y:1", target.host()), "EGRESS_DENIED"),
        ("image", "0.0.0.0:1/x/y:1".to_owned(), "EGRESS_DENIED"),
        ("image", "224.0.0.1:80/x/y:1".to_owned(), "EGRESS_DENIED"),
        (
            "completion_callback",
            format!("http://{}/cb", target.host()),
            "EGRESS_DENIED",
        ),
        (
            "completion_callback",
            format!("http://127.0.0.1:{app_port}/stage"),
            "EGRESS_DENIED",
        ),
        (
            "completion_callback",
            format!("http://localhost:{app_port}/stage"),
            "EGRESS_DENIED",
        ),
        (
            "completion_callback",
            format!("http://127.0.0.1:{db_port}/"),
            "EGRESS_DENIED",
        ),
    ] {
        let mut body =
            json!({ "app_guid": Uuid::new_v4(), "image": format!("{}/ok/app:v1", hostile.host()) });
        body[field] = json!(value);
        let (status, answer) = app.stage(body).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (422, Some(code)),
            "{field}={value}: {answer}"
        );
    }

    // What only the fetch reveals: redirects of a blob or a manifest, and a token realm.
    let image = ImageSpec::seeded(ManifestFormat::Docker, 6300, 1, LAYER).build();
    hostile.add_image("redirect/blob", "v1", &image);
    hostile.add_image("redirect/manifest", "v1", &image);
    hostile.add_rule(Rule::new(
        &format!("/v2/redirect/blob/blobs/{}", image.layers[0].digest),
        Misbehaviour::Redirect {
            status: 302,
            location: format!("{}/blob", target.base_url()),
        },
    ));
    hostile.add_rule(Rule::new(
        "/v2/redirect/manifest/manifests/",
        Misbehaviour::Redirect {
            status: 307,
            location: format!("{}/manifest", target.base_url()),
        },
    ));
    for repository in ["redirect/blob", "redirect/manifest"] {
        let done = staged(&app, &format!("{}/{repository}:v1", hostile.host())).await;
        assert_eq!(error_code(&done), "EGRESS_DENIED", "{repository}: {done}");
        assert_clean(
            "the error message",
            done["error"]["message"].as_str().unwrap(),
        );
    }
    let realm = HostileRegistry::start();
    realm.add_image("realm/app", "v1", &image);
    realm.require_token(Some(format!("{}/token", target.base_url())));
    let app_realm = app_with(&realm, 1, &[]).await;
    let done = staged(&app_realm, &format!("{}/realm/app:v1", realm.host())).await;
    assert_eq!(error_code(&done), "EGRESS_DENIED", "{done}");

    assert_eq!(
        target.accepted(),
        0,
        "no connection reached the target: {:?}",
        target.received()
    );
    // The target does count connections: one made on purpose is seen.
    tokio::net::TcpStream::connect(target.addr()).await.unwrap();
    assert!(
        target
            .wait_for_connections(1, Duration::from_secs(10))
            .await
    );
}

#[tokio::test]
async fn a_token_realm_cannot_downgrade_an_https_registry_to_plain_http() {
    let plain = HostileRegistry::start();
    let secure = HostileRegistry::start_tls();
    let image = ImageSpec::seeded(ManifestFormat::Docker, 6350, 1, LAYER).build();
    secure.add_image("tls/app", "v1", &image);
    secure.require_token(Some(format!("{}/token", plain.base_url())));
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), secure.certificate_pem().unwrap()).unwrap();
    let app = spawn(
        AppOptions {
            workers: 1,
            ..AppOptions::default()
        }
        .env("TAILOR_CA_CERTIFICATES", ca.path().to_str().unwrap()),
    )
    .await;
    let (status, body) = app
        .stage(json!({
            "app_guid": Uuid::new_v4(),
            "image": format!("{}/tls/app:v1", secure.host()),
            "credentials": { "username": "tenant", "password": "never-in-clear-text" },
        }))
        .await;
    assert_eq!(status, 202, "{body}");
    let done = app
        .wait_finished(body["staging_guid"].as_str().unwrap())
        .await;
    assert_eq!(error_code(&done), "UPSTREAM_PROTOCOL_ERROR", "{done}");
    assert!(
        plain.token_requests().is_empty(),
        "the credentials never travelled in clear text"
    );
    assert!(
        secure
            .requests()
            .iter()
            .any(|r| r.path.contains("/manifests/")),
        "the registry itself was reached over TLS"
    );
}

#[tokio::test]
async fn trickling_and_hanging_upstreams_time_out_and_free_their_worker() {
    let hostile = HostileRegistry::start();
    let image = ImageSpec::seeded(ManifestFormat::Docker, 6400, 1, 256 * 1024).build();
    for repository in ["slow/manifest", "slow/blob", "slow/hang"] {
        hostile.add_image(repository, "v1", &image);
    }
    hostile.add_rule(Rule::new(
        "/v2/slow/manifest/manifests/",
        Misbehaviour::Trickle {
            bytes_per_second: 1,
            body: None,
        },
    ));
    hostile.add_rule(Rule::new(
        &format!("/v2/slow/blob/blobs/{}", image.layers[0].digest),
        Misbehaviour::Trickle {
            bytes_per_second: 1,
            body: None,
        },
    ));
    hostile.add_rule(Rule::new("/v2/slow/hang/manifests/", Misbehaviour::Hang));
    // One worker: if any of these held it, the last staging could never run.
    let app = app_with(
        &hostile,
        1,
        &[
            ("TAILOR_REQUEST_TIMEOUT", "2"),
            ("TAILOR_MIN_TRANSFER_WINDOW", "2"),
            ("TAILOR_STAGING_TIMEOUT", "15s"),
        ],
    )
    .await;
    let images: Vec<String> = ["slow/manifest", "slow/blob", "slow/hang"]
        .iter()
        .map(|r| format!("{}/{r}:v1", hostile.host()))
        .collect();
    let slow: Vec<String> =
        futures_util::future::join_all(images.iter().map(|image| stage(&app, image))).await;
    // Each fails for its own reason: no answer within the request deadline, or a transfer
    // under the throughput floor; none waits for more than the staging's deadline.
    for (guid, cause) in slow
        .iter()
        .zip(["within 2s", "under the floor", "within 2s"])
    {
        let done = app.wait_finished(guid).await;
        assert_eq!(
            (done["state"].as_str(), error_code(&done)),
            (Some("failed"), "TIMEOUT"),
            "{done}"
        );
        let message = done["error"]["message"].as_str().unwrap();
        assert!(message.contains(cause), "{cause:?} in {message:?}");
    }
    app.hub.push("fast/app:v1", &image).await;
    let fast = staged(&app, &format!("{}/fast/app:v1", app.hub.host())).await;
    assert_eq!(
        fast["state"], "succeeded",
        "the worker was free again: {fast}"
    );
}

#[tokio::test]
async fn a_cloud_controllers_timeout_is_the_stagings_deadline() {
    let app = spawn(AppOptions::default()).await;
    let guid = Uuid::new_v4();
    let response = app
        .put(&format!("/v1/staging/{guid}"))
        .json(&json!({
            "app_id": Uuid::new_v4(),
            "lifecycle": "docker",
            "lifecycle_data": { "docker_image": format!("{}/any/app:v1", app.hub.host()) },
            "timeout": 42,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let seconds: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM deadline_at - created_at)::float8 FROM stagings WHERE staging_guid = $1",
    )
    .bind(guid)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(seconds, 42.0);
    let shown = app.staging(&guid.to_string()).await;
    assert!(shown["deadline_at"].is_string(), "{shown}");
}

#[tokio::test]
async fn nul_bytes_and_newlines_from_upstreams_never_lose_an_outcome() {
    let hostile = HostileRegistry::start();
    let forged =
        "no\u{0}such\nimage\r\n2026-11-23T00:00:00Z  INFO staging succeeded\u{1b}[31m\u{202e}";
    let error_body = serde_json::to_vec(&json!({
        "errors": [{ "code": "MANIFEST_UNKNOWN", "message": forged }]
    }))
    .unwrap();
    hostile.add_rule(Rule::new(
        "/v2/nul/missing/",
        Misbehaviour::respond(404, error_body.clone()),
    ));
    hostile.add_rule(Rule::new(
        "/v2/nul/denied/",
        Misbehaviour::respond(403, error_body),
    ));
    hostile.add_rule(Rule::new(
        "/v2/nul/broken/",
        Misbehaviour::respond(
            500,
            b"\x00\n2026-11-23T00:00:00Z ERROR forged\x1b[0m".to_vec(),
        ),
    ));
    let nul_cmd = ImageSpec::seeded(ManifestFormat::Docker, 6500, 1, LAYER)
        .with_container_config(json!({ "Cmd": ["sh", "-c", "a\u{0}b"] }))
        .build();
    hostile.add_image("nul/cmd", "v1", &nul_cmd);
    let noisy = ImageSpec::seeded(ManifestFormat::Docker, 6501, 1, LAYER)
        .with_container_config(json!({
            "Entrypoint": [],
            "Cmd": ["sh", "-c", "set -e\necho ready"],
            "Env": ["A=\u{0}", "B=line\nbreak"],
            "Labels": { "evil": "\u{0}\n\u{1b}[31m" },
        }))
        .build();
    hostile.add_image("nul/noisy", "v1", &noisy);
    hostile.add_image("nul/realm", "v1", &noisy);
    hostile.add_rule(Rule::new(
        "/v2/nul/realm/manifests/",
        Misbehaviour::Respond {
            status: 401,
            headers: vec![(
                "WWW-Authenticate".into(),
                b"Bearer realm=\"http://127.0.0.1:1/t\t\x9b31m\"".to_vec(),
            )],
            body: Vec::new(),
        },
    ));
    let callbacks = testkit::callback_sink::CallbackSink::start();
    let app = app_with(&hostile, 2, &[("TAILOR_STAGING_TIMEOUT", "12s")]).await;

    let mut expectations = Vec::new();
    for (repository, code) in [
        ("nul/missing", "IMAGE_NOT_FOUND"),
        ("nul/denied", "DENIED"),
        ("nul/broken", "UPSTREAM_UNREACHABLE"),
        ("nul/cmd", "IMAGE_CONFIG_INVALID"),
        ("nul/realm", "UNAUTHORIZED"),
        ("nul/noisy", ""),
    ] {
        let (status, body) = app
            .stage(json!({
                "app_guid": Uuid::new_v4(),
                "image": format!("{}/{repository}:v1", hostile.host()),
                "completion_callback": callbacks.url(&format!("/{repository}")),
            }))
            .await;
        assert_eq!(status, 202, "{body}");
        expectations.push((
            repository,
            code,
            body["staging_guid"].as_str().unwrap().to_owned(),
        ));
    }
    for (repository, code, guid) in &expectations {
        let done = app.wait_finished(guid).await;
        if code.is_empty() {
            assert_eq!(done["state"], "succeeded", "{repository}: {done}");
            assert_eq!(
                done["result"]["process_types"]["web"],
                "sh -c set -e\necho ready"
            );
        } else {
            // A 500 is retried until no retry fits before the deadline; on a loaded machine an
            // attempt may still be running when the deadline comes, and the staging then ends
            // as TIMEOUT, naming the same last error. Either way the outcome is not lost.
            let timed_out_on_it = error_code(&done) == "TIMEOUT"
                && done["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(&format!("last error: {code}")));
            let code = if timed_out_on_it { "TIMEOUT" } else { *code };
            assert_eq!(
                (done["state"].as_str(), error_code(&done)),
                (Some("failed"), code),
                "{repository}: {done}"
            );
            assert_clean(repository, done["error"]["message"].as_str().unwrap());
        }
        let callback = callbacks
            .wait_for(&format!("/{repository}"), Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("{repository}: no callback"));
        if let Some(message) = callback["error"]["message"].as_str() {
            assert_clean(repository, message);
        }
    }
}

/// A callback endpoint that accepts connections and never answers; knows whether the client
/// gave up (closed its connection).
struct DeadEndpoint {
    addr: SocketAddr,
    accepted: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
}

impl DeadEndpoint {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, closed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (seen, gone) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let (mut socket, _) = listener.accept().await.unwrap();
            seen.store(true, Ordering::SeqCst);
            let mut buffer = [0u8; 4096];
            // Read the request and whatever follows, until the client hangs up.
            while matches!(socket.read(&mut buffer).await, Ok(n) if n > 0) {}
            gone.store(true, Ordering::SeqCst);
        });
        Self {
            addr,
            accepted,
            closed,
        }
    }
}

#[tokio::test]
async fn a_dead_callback_endpoint_never_delays_another_apps_callback() {
    let app = spawn(
        AppOptions {
            workers: 2,
            ..AppOptions::default()
        }
        .env("TAILOR_CALLBACK_TIMEOUT", "300"),
    )
    .await;
    let image = ImageSpec::seeded(ManifestFormat::Docker, 6600, 1, LAYER).build();
    app.hub.push("cb/app:v1", &image).await;
    let dead = DeadEndpoint::start().await;
    let healthy = testkit::callback_sink::CallbackSink::start();
    let source = format!("{}/cb/app:v1", app.hub.host());

    let (_, first) = app
        .stage(json!({ "app_guid": Uuid::new_v4(), "image": source, "completion_callback": format!("http://{}/dead", dead.addr) }))
        .await;
    app.wait_finished(first["staging_guid"].as_str().unwrap())
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !dead.accepted.load(Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dead endpoint was never called"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, second) = app
        .stage(json!({ "app_guid": Uuid::new_v4(), "image": source, "completion_callback": healthy.url("/healthy") }))
        .await;
    app.wait_finished(second["staging_guid"].as_str().unwrap())
        .await;
    let delivered = healthy.wait_for("/healthy", Duration::from_secs(60)).await;
    assert!(delivered.is_some(), "the healthy callback was delivered");
    assert!(
        !dead.closed.load(Ordering::SeqCst),
        "it was delivered while the dead endpoint still held the first callback"
    );
}

#[tokio::test]
async fn only_images_that_can_run_on_the_platform_succeed_and_nothing_is_tagged_otherwise() {
    let hostile = HostileRegistry::start();
    let app = app_with(&hostile, 2, &[]).await;
    let foreign_target = TcpTarget::bind("127.0.0.2:0".parse().unwrap());
    let arm = ImageSpec::seeded(ManifestFormat::Oci, 6700, 1, LAYER)
        .with_platform("linux/arm64")
        .build();
    app.hub.push("other/arm:v1", &arm).await;
    let windows = ImageSpec::windows(
        ManifestFormat::Docker,
        6701,
        &format!("{}/layers/{{digest}}", foreign_target.base_url()),
    )
    .build();
    hostile.add_image("other/windows", "v1", &windows);
    hostile.add_image(
        "other/helm",
        "v1",
        &ArtifactSpec::helm_chart("web", "1.0.0").build(),
    );
    hostile.add_image("other/sbom", "v1", &ArtifactSpec::sbom("app").build());

    for (image, code) in [
        (
            format!("{}/other/arm:v1", app.hub.host()),
            "PLATFORM_MISMATCH",
        ),
        (
            format!("{}/other/windows:v1", hostile.host()),
            "PLATFORM_MISMATCH",
        ),
        (
            format!("{}/other/helm:v1", hostile.host()),
            "NOT_A_CONTAINER_IMAGE",
        ),
        (
            format!("{}/other/sbom:v1", hostile.host()),
            "NOT_A_CONTAINER_IMAGE",
        ),
    ] {
        let done = staged(&app, &image).await;
        assert_eq!(
            (done["state"].as_str(), error_code(&done)),
            (Some("failed"), code),
            "{image}: {done}"
        );
        let repository = format!("tailor/{}", done["app_guid"].as_str().unwrap());
        assert!(
            app.internal_tags(&repository).await.is_empty(),
            "{image}: nothing tagged"
        );
    }
    let fetched_artifact_blobs = hostile
        .requests()
        .iter()
        .filter(|r| {
            r.method == "GET"
                && r.path.contains("/blobs/")
                && (r.path.contains("/helm/") || r.path.contains("/sbom/"))
        })
        .count();
    assert_eq!(
        fetched_artifact_blobs, 0,
        "an artifact is refused before any of its blobs is read"
    );
    assert_eq!(
        foreign_target.accepted(),
        0,
        "foreign layer URLs are never followed"
    );
}

#[tokio::test]
async fn a_failed_staging_removes_the_tag_an_earlier_attempt_pushed() {
    let app = spawn(AppOptions {
        workers: 2,
        ..AppOptions::default()
    })
    .await;
    let image = ImageSpec::seeded(ManifestFormat::Docker, 6800, 1, LAYER).build();
    let app_guid = Uuid::new_v4();
    let repository = format!("tailor/{app_guid}");

    // An earlier attempt of this staging pushed its tag, then the worker died; the retry fails.
    let guid = Uuid::new_v4();
    app.internal()
        .push(&format!("{repository}:{guid}"), &image)
        .await;
    let (status, body) = app
        .stage(json!({ "app_guid": app_guid, "staging_guid": guid, "image": format!("{}/gone/app:v1", app.hub.host()) }))
        .await;
    assert_eq!(status, 202, "{body}");
    let done = app.wait_finished(&guid.to_string()).await;
    assert_eq!(error_code(&done), "IMAGE_NOT_FOUND", "{done}");
    assert!(
        app.internal_tags(&repository).await.is_empty(),
        "the failed staging's tag is gone"
    );

    // A tag whose manifest is another staging's image stays (deleting it would delete that
    // image: the registry deletes by digest), and that image keeps pulling.
    app.hub.push("kept/app:v1", &image).await;
    let (_, live) = app
        .stage(json!({ "app_guid": app_guid, "image": format!("{}/kept/app:v1", app.hub.host()) }))
        .await;
    let live = app
        .wait_finished(live["staging_guid"].as_str().unwrap())
        .await;
    assert_eq!(live["state"], "succeeded", "{live}");
    let guid = Uuid::new_v4();
    app.internal()
        .push(&format!("{repository}:{guid}"), &image)
        .await;
    let (_, body) = app
        .stage(json!({ "app_guid": app_guid, "staging_guid": guid, "image": format!("{}/gone/app:v2", app.hub.host()) }))
        .await;
    let done = app
        .wait_finished(body["staging_guid"].as_str().unwrap())
        .await;
    assert_eq!(done["state"], "failed", "{done}");
    let pinned = live["result"]["pinned_image"].as_str().unwrap();
    assert_eq!(skopeo::digest(pinned, None).unwrap(), image.digest);
}

#[tokio::test]
async fn a_staging_overdue_before_any_worker_claims_it_fails_and_leaves_no_tag() {
    let app = spawn(AppOptions::default()).await;
    let image = ImageSpec::seeded(ManifestFormat::Docker, 6900, 1, LAYER).build();
    let (app_guid, guid) = (Uuid::new_v4(), Uuid::new_v4());
    let repository = format!("tailor/{app_guid}");
    // What an attempt whose worker then died had pushed.
    app.internal()
        .push(&format!("{repository}:{guid}"), &image)
        .await;
    let response = app
        .put(&format!("/v1/staging/{guid}"))
        .json(&json!({
            "app_id": app_guid,
            "lifecycle": "docker",
            "lifecycle_data": { "docker_image": format!("{}/late/app:v1", app.hub.host()) },
            "timeout": 1,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    // Past its deadline before any worker runs.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.start_workers(1).await;
    let done = app.wait_finished(&guid.to_string()).await;
    assert_eq!(
        (done["state"].as_str(), error_code(&done)),
        (Some("failed"), "TIMEOUT"),
        "{done}"
    );
    assert!(
        app.internal_tags(&repository).await.is_empty(),
        "the tag is gone"
    );
}

#[tokio::test]
async fn a_callback_is_never_redirected() {
    let app = spawn(AppOptions {
        workers: 1,
        ..AppOptions::default()
    })
    .await;
    let image = ImageSpec::seeded(ManifestFormat::Docker, 6950, 1, LAYER).build();
    app.hub.push("cb/redirect:v1", &image).await;
    let elsewhere = testkit::callback_sink::CallbackSink::start();
    let redirector = HostileRegistry::start();
    redirector.add_rule(Rule::new(
        "/cb",
        Misbehaviour::Redirect {
            status: 307,
            location: elsewhere.url("/moved"),
        },
    ));
    let (_, body) = app
        .stage(json!({
            "app_guid": Uuid::new_v4(),
            "image": format!("{}/cb/redirect:v1", app.hub.host()),
            "completion_callback": format!("{}/cb", redirector.base_url()),
        }))
        .await;
    let guid: Uuid = body["staging_guid"].as_str().unwrap().parse().unwrap();
    app.wait_finished(&guid.to_string()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let last_error = loop {
        let row: Option<(i32, Option<String>)> =
            sqlx::query_as("SELECT attempts, last_error FROM callbacks WHERE staging_guid = $1")
                .bind(guid)
                .fetch_optional(&app.pool)
                .await
                .unwrap();
        if let Some((attempts, last_error)) = row
            && attempts > 0
        {
            break last_error.unwrap_or_default();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no callback attempt"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        last_error.contains("redirects are not followed"),
        "{last_error}"
    );
    assert!(
        elsewhere.received().is_empty(),
        "the redirect's target was never called"
    );
}
