//! Staging through `POST /stage`: pinned results, idempotency, validation, cancellation.

use serde_json::json;
use testkit::hostile_registry::{HostileRegistry, Misbehaviour, Rule};
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::{TestRegistry, skopeo};
use uuid::Uuid;

use crate::helpers::{AppOptions, spawn, spawn_app, spawn_app_with};

#[tokio::test]
async fn a_staging_copies_the_image_and_pins_it_by_digest() {
    let app = spawn_app().await;
    let image = ImageSpec::seeded(ManifestFormat::Docker, 1000, 3, 64 * 1024).build();
    app.hub.push("library/web:1.0", &image).await;
    let app_guid = Uuid::new_v4();

    let response = app
        .post("/stage")
        .json(&json!({ "app_guid": app_guid, "image": format!("{}/library/web:1.0", app.hub.host()) }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: serde_json::Value = response.json().await.unwrap();
    let guid = body["staging_guid"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/stage/{guid}"));
    assert!(
        Uuid::parse_str(&guid).unwrap().get_version_num() == 4,
        "a generated staging GUID is a v4 UUID"
    );

    let done = app.wait_finished(&guid).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let internal = app.internal().host();
    let result = &done["result"];
    assert_eq!(
        result["pinned_image"],
        format!("{internal}/tailor/{app_guid}@{}", image.digest)
    );
    assert_eq!(
        result["tagged_image"],
        format!("{internal}/tailor/{app_guid}:{guid}")
    );
    assert_eq!(result["source_digest"], image.digest.as_str());
    assert_eq!(result["blobs"]["copied"], 4);
    assert_eq!(result["process_types"]["web"], "/bin/app --port 8080");
    assert_eq!(done["progress"]["bytes_done"], image.blob_bytes());

    let pinned = result["pinned_image"].as_str().unwrap();
    assert_eq!(skopeo::digest(pinned, None).unwrap(), image.digest);
    assert_eq!(
        skopeo::digest(result["tagged_image"].as_str().unwrap(), None).unwrap(),
        image.digest
    );
    let layout = tempfile::tempdir().unwrap();
    skopeo::copy_to_oci_layout(pinned, None, layout.path(), false).unwrap();

    let listed: serde_json::Value = app
        .get_authed(&format!("/apps/{app_guid}/stagings"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["stagings"].as_array().unwrap().len(), 1);
    assert_eq!(listed["stagings"][0]["staging_guid"], guid.as_str());
}

#[tokio::test]
async fn the_same_request_is_idempotent_and_a_different_one_conflicts() {
    let app = spawn_app_with(0, TestRegistry::anonymous()).await;
    let (app_guid, staging_guid) = (Uuid::new_v4(), Uuid::new_v4());
    let request = json!({ "app_guid": app_guid, "staging_guid": staging_guid, "image": "redis:7" });
    let (first_status, first) = app.stage(request.clone()).await;
    let (second_status, second) = app.stage(request).await;
    assert_eq!((first_status, second_status), (202, 202));
    assert_eq!(
        first["created_at"], second["created_at"],
        "the same staging, not a new one"
    );
    assert_eq!(first["image"], "docker.io/library/redis:7");

    let (status, body) = app
        .stage(json!({ "app_guid": app_guid, "staging_guid": staging_guid, "image": "redis:8" }))
        .await;
    assert_eq!(status, 409);
    assert_eq!(body["code"], "STAGING_CONFLICT");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM stagings")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
}

#[tokio::test]
async fn bad_requests_get_precise_errors_and_write_nothing() {
    let app = spawn_app_with(0, TestRegistry::anonymous()).await;
    let guid = Uuid::new_v4();
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (app.post("/stage").header("content-type", "application/json").body("{not json"), 400, "MALFORMED_JSON"),
        (app.post("/stage").json(&json!({ "app_guid": guid })), 400, "MALFORMED_JSON"),
        (app.post("/stage").json(&json!({ "app_guid": guid, "image": "x", "surprise": 1 })), 400, "MALFORMED_JSON"),
        (app.post("/stage").header("content-type", "text/plain").body("{}"), 415, "UNSUPPORTED_MEDIA_TYPE"),
        (app.post("/stage").json(&json!({ "app_guid": "not-a-guid", "image": "redis" })), 422, "INVALID_GUID"),
        (app.post("/stage").json(&json!({ "app_guid": guid, "staging_guid": "42", "image": "redis" })), 422, "INVALID_GUID"),
        (app.post("/stage").json(&json!({ "app_guid": guid, "image": "Redis:Latest" })), 422, "INVALID_REFERENCE"),
        (app.post("/stage").json(&json!({ "app_guid": guid, "image": "redis", "platform": "linux" })), 422, "INVALID_PLATFORM"),
        (
            app.post("/stage").json(&json!({ "app_guid": guid, "image": "redis", "completion_callback": "ftp://x" })),
            422,
            "INVALID_CALLBACK",
        ),
        (
            app.post("/stage").json(&json!({ "app_guid": guid, "image": "redis", "credentials": { "username": "", "password": "p" } })),
            422,
            "INVALID_CREDENTIALS",
        ),
        (
            app.post("/stage").json(&json!({ "app_guid": guid, "image": "x".repeat(100 * 1024) })),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
        (app.get_authed("/stage/not-a-guid"), 400, "INVALID_GUID"),
        (app.get_authed(&format!("/stage/{guid}")), 404, "NOT_FOUND"),
        (app.delete(&format!("/stage/{guid}")), 404, "NOT_FOUND"),
    ];
    for (request, status, code) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "expected {code}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["code"], code, "{body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM stagings")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(count, 0);
}

#[tokio::test]
async fn a_queued_staging_is_cancelled_and_a_finished_one_released() {
    let app = spawn_app_with(0, TestRegistry::anonymous()).await;
    let (status, body) = app
        .stage(json!({ "app_guid": Uuid::new_v4(), "image": "redis:7" }))
        .await;
    assert_eq!(status, 202);
    let guid = body["staging_guid"].as_str().unwrap();

    let cancelled = app.delete(&format!("/stage/{guid}")).send().await.unwrap();
    assert_eq!(cancelled.status(), 202);
    let body: serde_json::Value = cancelled.json().await.unwrap();
    assert_eq!(body["state"], "cancelled");
    assert_eq!(body["error"]["code"], "CANCELLED");

    let released = app.delete(&format!("/stage/{guid}")).send().await.unwrap();
    assert_eq!(released.status(), 200);
    let body: serde_json::Value = released.json().await.unwrap();
    assert!(body["released_at"].is_string(), "{body}");
}

#[tokio::test]
async fn a_running_staging_is_cancelled_promptly() {
    // The layers trickle (1 MiB/s, above the transfer floor: slow but legitimate), so the copy
    // is provably mid-layer when the cancellation arrives, however loaded the machine is.
    let upstream = HostileRegistry::start();
    let image = ImageSpec::seeded(ManifestFormat::Oci, 1010, 2, 8 * 1024 * 1024).build();
    upstream.add_image("big/app", "v1", &image);
    for layer in &image.layers {
        upstream.add_rule(Rule::new(
            &format!("/blobs/{}", layer.digest),
            Misbehaviour::Trickle {
                bytes_per_second: 1024 * 1024,
                body: None,
            },
        ));
    }
    let app = spawn(AppOptions {
        workers: 1,
        also_insecure: vec![upstream.host()],
        ..AppOptions::default()
    })
    .await;
    let app_guid = Uuid::new_v4();
    let (_, body) = app
        .stage(json!({ "app_guid": app_guid, "image": format!("{}/big/app:v1", upstream.host()) }))
        .await;
    let guid = body["staging_guid"].as_str().unwrap().to_owned();
    // Wait until layer bytes flow, then cancel it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let body = app.staging(&guid).await;
        if body["progress"]["bytes_done"].as_i64().unwrap_or(0) > image.config.size as i64 {
            break;
        }
        assert!(
            body["state"] == "queued" || body["state"] == "running",
            "{body}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no layer bytes ever flowed: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let response = app.delete(&format!("/stage/{guid}")).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let done = app.wait_finished(&guid).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(done["result"].is_null());

    // Promptly: the copy stopped part-way, rather than finishing and being thrown away.
    let layer_bytes: u64 = image.layers.iter().map(|l| l.size).sum();
    let served = upstream.served_bytes();
    assert!(
        served < layer_bytes,
        "the upstream served {served} of the layers' {layer_bytes} bytes: the copy ran on after \
         the cancellation"
    );
    assert!(
        !app.internal_tags(&format!("tailor/{app_guid}"))
            .await
            .contains(&guid),
        "a cancelled staging leaves no tag"
    );
}

#[tokio::test]
async fn private_images_use_credentials_only_while_staging() {
    let hub = TestRegistry::htpasswd("hub-user", "hunter2-private");
    let app = spawn_app_with(0, hub).await;
    let image = ImageSpec::seeded(ManifestFormat::Docker, 1020, 1, 4096).build();
    app.hub.push("private/app:v1", &image).await;
    let request = json!({
        "app_guid": Uuid::new_v4(),
        "image": format!("{}/private/app:v1", app.hub.host()),
        "credentials": { "username": "hub-user", "password": "hunter2-private" },
    });
    let (status, body) = app.stage(request).await;
    assert_eq!(status, 202);
    assert!(
        !body.to_string().contains("hunter2"),
        "the response never echoes the password"
    );
    let guid: Uuid = body["staging_guid"].as_str().unwrap().parse().unwrap();

    let sealed: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT encrypted_credentials FROM stagings WHERE staging_guid = $1")
            .bind(guid)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let sealed = sealed.expect("held while queued");
    assert!(
        !String::from_utf8_lossy(&sealed).contains("hunter2"),
        "encrypted at rest"
    );

    // Now let a worker run it.
    let mut settings =
        tailor::staging::worker::WorkerSettings::new(&app.internal().host(), "tailor");
    settings.insecure_registries = vec![app.internal().host(), app.hub.host()];
    settings.poll_interval = std::time::Duration::from_millis(200);
    // The app's key is private to it; a worker with another key cannot decrypt.
    settings.credentials_key = Some(tailor::secrets::CredentialsKey::generate());
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(tailor::staging::worker::run(
        app.pool.clone(),
        settings,
        1,
        stop.clone(),
    ));
    let done = app.wait_finished(&guid.to_string()).await;
    stop.cancel();
    assert_eq!(done["state"], "failed");
    assert_eq!(done["error"]["code"], "CREDENTIALS_UNAVAILABLE");
    assert!(!done.to_string().contains("hunter2"));
    let erased: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT encrypted_credentials FROM stagings WHERE staging_guid = $1")
            .bind(guid)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(erased.is_none(), "erased when the staging ended");
}

#[tokio::test]
async fn metrics_report_stagings_bytes_and_durations() {
    let app = spawn_app().await;
    let image = ImageSpec::seeded(ManifestFormat::Docker, 1030, 2, 4096).build();
    app.hub.push("metrics/app:v1", &image).await;
    let (_, body) = app.stage(json!({ "app_guid": Uuid::new_v4(), "image": format!("{}/metrics/app:v1", app.hub.host()) })).await;
    app.wait_finished(body["staging_guid"].as_str().unwrap())
        .await;

    assert_eq!(app.get("/metrics").send().await.unwrap().status(), 401);
    let text = app
        .get_authed("/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "tailor_stagings{state=\"succeeded\"} 1".to_owned(),
        "tailor_queue_depth 0".to_owned(),
        format!(
            "tailor_blob_bytes_total{{kind=\"copied\"}} {}",
            image.blob_bytes()
        ),
        "tailor_copy_duration_seconds_count 1".to_owned(),
        "tailor_copy_duration_seconds_bucket{le=\"+Inf\"} 1".to_owned(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

#[tokio::test]
async fn database_outage_answers_503_with_retry_after_and_writes_nothing() {
    // A database of its own, so that stopping it disturbs no other test.
    let postgres = tailor::embedded::EmbeddedPostgres::start().unwrap();
    let url = postgres.url("postgres");
    let pool = tailor::db::connect(&url, 2).await.unwrap();
    tailor::db::migrate(&pool).await.unwrap();
    let registry = TestRegistry::anonymous();
    let settings = crate::helpers::settings(&url, &registry.host(), &[]);
    let app = stager_api::startup::Application::build(&settings, pool).unwrap();
    let base = format!("http://{}", app.addr());
    tokio::spawn(app.run_until_stopped());
    drop(postgres);

    let response = reqwest::Client::new()
        .post(format!("{base}/stage"))
        .bearer_auth(crate::helpers::TOKEN)
        .json(&json!({ "app_guid": Uuid::new_v4(), "image": "redis" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], "DATABASE_UNAVAILABLE");
}

#[tokio::test]
async fn a_step_runs_the_oldest_ready_staging_to_its_end_and_then_finds_nothing() {
    // No workers: only the test's steps run stagings, one whole attempt at a time.
    let app = spawn_app_with(0, TestRegistry::anonymous()).await;
    let image = ImageSpec::seeded(ManifestFormat::Docker, 1100, 2, 16 * 1024).build();
    app.hub.push("steps/app:v1", &image).await;
    let reference = format!("{}/steps/app:v1", app.hub.host());
    let (_, first) = app
        .stage(json!({ "app_guid": Uuid::new_v4(), "image": reference }))
        .await;
    let (_, second) = app
        .stage(json!({ "app_guid": Uuid::new_v4(), "image": format!("{}/steps/missing:v1", app.hub.host()) }))
        .await;
    let guid = |body: &serde_json::Value| body["staging_guid"].as_str().unwrap().to_owned();

    let ran = app.step().await.expect("a ready staging");
    assert_eq!(ran.to_string(), guid(&first));
    // Recorded before the step returned: no waiting.
    let done = app.staging(&guid(&first)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(app.staging(&guid(&second)).await["state"], "queued");

    let ran = app.step().await.expect("the second staging");
    assert_eq!(ran.to_string(), guid(&second));
    let failed = app.staging(&guid(&second)).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "IMAGE_NOT_FOUND", "{failed}");

    assert_eq!(app.step().await, None, "nothing is left to run");
}
