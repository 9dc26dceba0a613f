//! The staging service end to end, as a platform runs it: real binaries, real Postgres, real
//! registries; workers killed, stagers restarted, secrets looked for where they must not be.

use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::json;
use specs::{Service, TOKEN, binary, get, stage, stager_api, tailor_work, wait_finished};
use testkit::callback_sink::CallbackSink;
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::{TestDatabase, TestRegistry, skopeo};
use uuid::Uuid;

const KEY: &str = "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=";

fn worker(db: &TestDatabase, internal: &str, insecure: &[String]) -> std::process::Child {
    worker_with(db, internal, insecure, &[])
}

/// One `tailor work` worker whose lease others may take over 3 s after it dies.
fn worker_with(
    db: &TestDatabase,
    internal: &str,
    insecure: &[String],
    extra: &[(&str, &str)],
) -> std::process::Child {
    let mut settings = vec![
        ("TAILOR_WORKERS", "1"),
        ("TAILOR_CREDENTIALS_KEY", KEY),
        ("TAILOR_LEASE_SECONDS", "3"),
        ("TAILOR_POLL_SECONDS", "1"),
    ];
    settings.extend_from_slice(extra);
    tailor_work(&db.url, internal, insecure, &settings)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn a_worker_killed_mid_layer_is_resumed_and_upstream_serves_at_most_a_tenth_more() {
    resumed_after(libc::SIGKILL).await;
}

/// A drain that hands the staging back at once (`TAILOR_DRAIN_SECONDS=0`) drops the copy in
/// the middle of the layer: the checkpointed upload session is left for the next worker, not
/// cancelled.
#[tokio::test]
async fn a_worker_drained_mid_layer_leaves_its_upload_to_resume() {
    resumed_after(libc::SIGTERM).await;
}

/// Resuming inside a blob: one layer (96 MiB here; `TAILOR_RESUME_LAYER_MIB`) read from a real
/// registry over a link of 16 MiB/s (`TAILOR_RESUME_LINK_MIB`), uploaded in chunks of 4 MiB
/// (`TAILOR_RESUME_CHUNK_MIB`); the worker gets `signal` just after it checkpointed the
/// layer's first half (so it is reading the next chunk, not sending one), and a second worker
/// finishes the staging. Upstream's own access log must show at most 1.1x the image.
/// (`cargo bench -p stager-api --bench resume` measures kills at any moment.)
async fn resumed_after(signal: libc::c_int) {
    const MIB: u64 = 1024 * 1024;
    let layer_mib = specs::tunable("TAILOR_RESUME_LAYER_MIB", 96);
    let chunk_mib = specs::tunable("TAILOR_RESUME_CHUNK_MIB", 4);
    let link_mib = specs::tunable("TAILOR_RESUME_LINK_MIB", 16);
    let db = TestDatabase::new().await;
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let image = tokio::task::spawn_blocking(move || {
        ImageSpec::seeded(ManifestFormat::Oci, 1400, 1, layer_mib * MIB).build()
    })
    .await
    .unwrap();
    hub.push("big/app:v1", &image).await;
    let link = testkit::fault_proxy::FaultProxy::start(&hub.base_url());
    link.throttle(link_mib * MIB);
    let insecure = [link.host(), internal.host()];
    let api = Service::start(stager_api(
        &db.url,
        &internal.host(),
        &insecure,
        &[("STAGER_WORKERS", "0")],
    ));
    let chunk_setting = chunk_mib.to_string();
    let chunks = [
        ("TAILOR_UPLOAD_CHUNK_MIB", chunk_setting.as_str()),
        ("TAILOR_DRAIN_SECONDS", "0"),
    ];

    let started = std::time::Instant::now();
    let mut first = worker_with(&db, &internal.host(), &insecure, &chunks);
    let staged = stage(
        &api,
        json!({ "app_guid": Uuid::new_v4(), "image": format!("{}/big/app:v1", link.host()) }),
    )
    .await;
    let guid = staged["staging_guid"].as_str().unwrap().to_owned();
    // Just after a checkpoint past half the layer, the worker is reading the next chunk
    // upstream (a chunk takes chunk/link seconds), not sending one: kill it then.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let half = (image.layers[0].size / 2) as i64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let killed_at = loop {
        let uploaded: Option<i64> = sqlx::query_scalar("SELECT max(uploaded) FROM blob_uploads")
            .fetch_one(&pool)
            .await
            .unwrap();
        if let Some(uploaded) = uploaded.filter(|u| *u >= half) {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(first.id() as libc::pid_t, signal) };
            break uploaded as u64;
        }
        let now = get(&api, &guid).await;
        assert_ne!(
            now["state"], "succeeded",
            "no checkpoint past half the layer"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "no checkpoint past half the layer: {now}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    first.wait().unwrap();

    let mut second = worker_with(&db, &internal.host(), &insecure, &chunks);
    let done = wait_finished(&api, &guid, Duration::from_secs(600)).await;
    let elapsed = started.elapsed();
    second.kill().ok();
    second.wait().ok();
    assert_eq!(done["state"], "succeeded", "{done}");
    let pinned = done["result"]["pinned_image"].as_str().unwrap();
    assert_eq!(skopeo::digest(pinned, None).unwrap(), image.digest);
    let layout = tempfile::tempdir().unwrap();
    skopeo::copy_to_oci_layout(pinned, None, layout.path(), false).unwrap();

    let read = hub.blob_bytes_served_settled();
    let ratio = read as f64 / image.blob_bytes() as f64;
    let resumed_from: Vec<u64> = hub
        .access_log()
        .iter()
        .filter(|e| e.is_blob_get() && e.status == 206)
        .map(|e| image.layers[0].size - e.bytes)
        .collect();
    println!(
        "resume after signal {signal}: layer {layer_mib} MiB, chunk {chunk_mib} MiB, link {link_mib} MiB/s: killed after a \
         checkpoint at {killed_at} bytes; resumed from {resumed_from:?}; upstream served {read} \
         bytes = {ratio:.3}x the image; {:.1} s in all",
        elapsed.as_secs_f64()
    );
    // From the checkpoint seen before the signal, or the next one if the worker got a chunk
    // further before the signal reached it (a chunk takes chunk/link seconds to read).
    let chunk = chunk_mib * MIB;
    assert!(
        matches!(resumed_from[..], [from] if from == killed_at || from == killed_at + chunk),
        "resumed once, from the kill's checkpoint: {resumed_from:?}"
    );
    assert!(ratio <= 1.1, "upstream served {ratio:.3}x the image");
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
