//! The staging service end to end, as a platform runs it: real binaries, real Postgres, real
//! registries; workers killed, stagers restarted, secrets looked for where they must not be.

use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::json;
use specs::{Service, TOKEN, binary, get, stage, stager_api, wait_finished};
use testkit::callback_sink::CallbackSink;
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::{TestDatabase, TestRegistry, skopeo};
use uuid::Uuid;

const KEY: &str = "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=";

fn worker(db: &TestDatabase, internal: &str, insecure: &[String]) -> std::process::Child {
    Command::new(binary("tailor"))
        .args(["work", "--workers", "1"])
        .env("DATABASE_URL", &db.url)
        .env("TAILOR_INTERNAL_REGISTRY", internal)
        .env("TAILOR_INSECURE_REGISTRIES", insecure.join(","))
        .env("TAILOR_EGRESS_ALLOW", specs::EGRESS_ALLOW_LOOPBACK)
        .env("TAILOR_CREDENTIALS_KEY", KEY)
        .env("TAILOR_LEASE_SECONDS", "3")
        .env("TAILOR_POLL_SECONDS", "1")
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn a_worker_killed_mid_copy_is_replaced_and_the_staging_finishes() {
    let db = TestDatabase::new().await;
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let insecure = [hub.host(), internal.host()];
    let image = tokio::task::spawn_blocking(|| {
        ImageSpec::seeded(ManifestFormat::Docker, 1300, 3, 128 * 1024 * 1024).build()
    })
    .await
    .unwrap();
    hub.push("big/app:v1", &image).await;
    let api = Service::start(stager_api(
        &db.url,
        &internal.host(),
        &insecure,
        &[("STAGER_WORKERS", "0")],
    ));

    let mut first = worker(&db, &internal.host(), &insecure);
    let staged = stage(
        &api,
        json!({ "app_guid": Uuid::new_v4(), "image": format!("{}/big/app:v1", hub.host()) }),
    )
    .await;
    let guid = staged["staging_guid"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let body = get(&api, &guid).await;
        if body["progress"]["bytes_done"].as_u64().unwrap_or(0) > 0 || body["state"] == "running" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never started the copy: {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    assert_ne!(
        get(&api, &guid).await["state"],
        "succeeded",
        "killed before it could finish"
    );

    let mut second = worker(&db, &internal.host(), &insecure);
    let done = wait_finished(&api, &guid, Duration::from_secs(120)).await;
    second.kill().ok();
    second.wait().ok();
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        done["attempts"], 2,
        "the second worker took over after the lease expired"
    );
    let pinned = done["result"]["pinned_image"].as_str().unwrap();
    assert_eq!(skopeo::digest(pinned, None).unwrap(), image.digest);
    let layout = tempfile::tempdir().unwrap();
    skopeo::copy_to_oci_layout(pinned, None, layout.path(), false).unwrap();
}

/// Waits until a worker has claimed the staging (its copy starts at once).
async fn wait_running(api: &Service, guid: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let body = get(api, guid).await;
        if body["state"] == "running" {
            return;
        }
        assert_eq!(body["state"], "queued", "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "no worker claimed the staging: {body}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn sigterm_drains_a_worker_and_the_staging_goes_back_to_the_queue() {
    let db = TestDatabase::new().await;
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let insecure = [hub.host(), internal.host()];
    let image = tokio::task::spawn_blocking(|| {
        ImageSpec::seeded(ManifestFormat::Oci, 1330, 3, 128 * 1024 * 1024).build()
    })
    .await
    .unwrap();
    hub.push("drain/app:v1", &image).await;
    let api = Service::start(stager_api(
        &db.url,
        &internal.host(),
        &insecure,
        &[("STAGER_WORKERS", "0")],
    ));
    let mut draining = Command::new(binary("tailor"))
        .args(["work", "--workers", "1"])
        .env("DATABASE_URL", &db.url)
        .env("TAILOR_INTERNAL_REGISTRY", internal.host())
        .env("TAILOR_INSECURE_REGISTRIES", insecure.join(","))
        .env("TAILOR_EGRESS_ALLOW", specs::EGRESS_ALLOW_LOOPBACK)
        // No time to finish: the copy is cancelled and handed back at once.
        .env("TAILOR_DRAIN_SECONDS", "0")
        .env("TAILOR_POLL_SECONDS", "1")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let staged = stage(
        &api,
        json!({ "app_guid": Uuid::new_v4(), "image": format!("{}/drain/app:v1", hub.host()) }),
    )
    .await;
    let guid = staged["staging_guid"].as_str().unwrap().to_owned();
    wait_running(&api, &guid).await;

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(draining.id() as libc::pid_t, libc::SIGTERM) };
    let status = draining.wait().unwrap();
    assert!(
        status.success(),
        "the worker exits cleanly after draining: {status}"
    );
    let body = get(&api, &guid).await;
    assert_eq!(body["state"], "queued", "handed back, not lost: {body}");
    assert_eq!(body["attempts"], 0, "a drained attempt does not count");

    let mut next = worker(&db, &internal.host(), &insecure);
    let done = wait_finished(&api, &guid, Duration::from_secs(120)).await;
    next.kill().ok();
    next.wait().ok();
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["result"]["source_digest"], image.digest.as_str());
}

#[tokio::test]
async fn cancelling_a_running_staging_stops_its_copy() {
    let db = TestDatabase::new().await;
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let insecure = [hub.host(), internal.host()];
    let image = tokio::task::spawn_blocking(|| {
        ImageSpec::seeded(ManifestFormat::Docker, 1340, 3, 128 * 1024 * 1024).build()
    })
    .await
    .unwrap();
    hub.push("cancel/app:v1", &image).await;
    let api = Service::start(stager_api(
        &db.url,
        &internal.host(),
        &insecure,
        &[("STAGER_WORKERS", "1")],
    ));
    let app_guid = Uuid::new_v4();
    let staged = stage(
        &api,
        json!({ "app_guid": app_guid, "image": format!("{}/cancel/app:v1", hub.host()) }),
    )
    .await;
    let guid = staged["staging_guid"].as_str().unwrap().to_owned();
    wait_running(&api, &guid).await;

    let response = reqwest::Client::new()
        .delete(format!("{}/stage/{guid}", api.base_url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let done = wait_finished(&api, &guid, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    let tag = reqwest::get(format!(
        "{}/v2/tailor/{app_guid}/manifests/{guid}",
        internal.base_url()
    ))
    .await
    .unwrap();
    assert_eq!(tag.status(), 404, "a cancelled staging tags nothing");
}

#[tokio::test]
async fn credentials_appear_in_no_log_line_and_nowhere_in_the_database() {
    let db = TestDatabase::new().await;
    let password = "s3cr3t-P@ssw0rd-for-spec";
    let hub = TestRegistry::htpasswd("private-user", password);
    let internal = TestRegistry::anonymous();
    let image = ImageSpec::seeded(ManifestFormat::Oci, 1310, 2, 16 * 1024).build();
    hub.push("private/app:v1", &image).await;
    let logs = tempfile::NamedTempFile::new().unwrap();
    let mut command = stager_api(
        &db.url,
        &internal.host(),
        &[hub.host(), internal.host()],
        &[
            ("STAGER_WORKERS", "1"),
            ("TAILOR_CREDENTIALS_KEY", KEY),
            ("RUST_LOG", "debug"),
            ("TAILOR_LOG_FORMAT", "json"),
        ],
    );
    command.stderr(logs.reopen().unwrap());
    let mut api = Service::start_quiet(command);

    let sink = CallbackSink::start();
    let staged = stage(
        &api,
        json!({
            "app_guid": Uuid::new_v4(),
            "image": format!("{}/private/app:v1", hub.host()),
            "credentials": { "username": "private-user", "password": password },
            "completion_callback": sink.url("/done"),
        }),
    )
    .await;
    let guid = staged["staging_guid"].as_str().unwrap().to_owned();
    let done = wait_finished(&api, &guid, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let callback = sink
        .wait_for("/done", Duration::from_secs(30))
        .await
        .expect("callback");
    api.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));

    let dump = Command::new(
        tailor::embedded::find_postgres_bin_dir()
            .unwrap()
            .join("pg_dump"),
    )
    .arg("--data-only")
    .arg(&db.url)
    .output()
    .unwrap();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
    assert!(dump.contains(&guid), "the dump does hold the staging");
    let log_text = std::fs::read_to_string(logs.path()).unwrap();
    assert!(log_text.lines().count() > 10, "debug logs were captured");
    let b64 = base64::engine::general_purpose::STANDARD;
    let forbidden = [
        password.to_owned(),
        b64.encode(password),
        b64.encode(format!("private-user:{password}")),
    ];
    for needle in &forbidden {
        assert!(!dump.contains(needle.as_str()), "pg_dump contains {needle}");
        assert!(
            !log_text.contains(needle.as_str()),
            "a log line contains {needle}"
        );
        assert!(
            !callback.to_string().contains(needle.as_str()),
            "the callback contains {needle}"
        );
    }
    let staging_lines: Vec<&str> = log_text
        .lines()
        .filter(|l| l.contains("staging started") || l.contains("staging succeeded"))
        .collect();
    assert_eq!(staging_lines.len(), 2, "{log_text}");
    for line in staging_lines {
        assert!(
            line.contains(&guid),
            "staging log lines carry the staging GUID: {line}"
        );
    }
}

#[tokio::test]
async fn a_callback_survives_a_stager_restart() {
    let db = TestDatabase::new().await;
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let insecure = [hub.host(), internal.host()];
    let image = ImageSpec::seeded(ManifestFormat::Docker, 1320, 1, 4096).build();
    hub.push("cb/app:v1", &image).await;
    // The Cloud Controller is down while the staging finishes.
    let cc_port = tailor::embedded::free_loopback_port().unwrap();
    let callback = format!("http://127.0.0.1:{cc_port}/staging/done");

    let mut api = Service::start(stager_api(
        &db.url,
        &internal.host(),
        &insecure,
        &[("STAGER_WORKERS", "1")],
    ));
    let staged = stage(
        &api,
        json!({ "app_guid": Uuid::new_v4(), "image": format!("{}/cb/app:v1", hub.host()), "completion_callback": callback }),
    )
    .await;
    let guid = staged["staging_guid"].as_str().unwrap().to_owned();
    assert_eq!(
        wait_finished(&api, &guid, Duration::from_secs(60)).await["state"],
        "succeeded"
    );
    let pool = tailor::db::connect(&db.url, 1).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM callbacks")
            .fetch_one(&pool)
            .await
            .unwrap();
        if attempts > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivery attempted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        api.signal_and_wait(libc::SIGTERM, Duration::from_secs(30)),
        Some(0)
    );

    let cc = CallbackSink::start_on(cc_port);
    let restarted = Service::start(stager_api(
        &db.url,
        &internal.host(),
        &insecure,
        &[("STAGER_WORKERS", "1")],
    ));
    let body = cc
        .wait_for("/staging/done", Duration::from_secs(60))
        .await
        .expect("delivered after the restart");
    assert_eq!(body["staging_guid"], guid.as_str());
    assert_eq!(body["state"], "succeeded");
    drop(restarted);
}
