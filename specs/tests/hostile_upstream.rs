//! Hostile upstreams against the real binaries: answers of a gigabyte where kilobytes are due
//! (manifests, configs, tokens, error bodies, blobs) and large reference lists must not grow
//! the stager or the worker (their peak RSS is read from /proc), and upstream text full of
//! NUL, CR/LF and escape sequences must never forge a line in their logs.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use specs::{Service, TOKEN, binary, stage, stager_api, wait_finished};
use testkit::hostile_registry::{HostileRegistry, Misbehaviour, Rule};
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::{TestDatabase, TestRegistry};
use uuid::Uuid;

const GIB: u64 = 1 << 30;
/// Far above what a bounded process needs, far below a buffered gigabyte.
const RSS_CEILING_KIB: u64 = 128 * 1024;

/// A process's peak resident set (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process is alive");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

fn worker(
    db: &TestDatabase,
    internal: &str,
    insecure: &[String],
    extra: &[(&str, &str)],
) -> std::process::Child {
    let mut command = Command::new(binary("tailor"));
    command
        .args(["work", "--workers", "2"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("TAILOR_INTERNAL_REGISTRY", internal)
        .env("TAILOR_INSECURE_REGISTRIES", insecure.join(","))
        .env("TAILOR_EGRESS_ALLOW", specs::EGRESS_ALLOW_LOOPBACK)
        .env("TAILOR_POLL_SECONDS", "1")
        .stdout(Stdio::null());
    for (name, value) in extra {
        command.env(name, value);
    }
    command.spawn().expect("start tailor work")
}

#[tokio::test]
async fn gigabyte_answers_and_large_reference_lists_never_grow_the_processes() {
    let db = TestDatabase::new().await;
    let internal = TestRegistry::anonymous();
    let hostile = HostileRegistry::start();
    let tokens = HostileRegistry::start();
    let insecure = [internal.host(), hostile.host(), tokens.host()];
    // Stagers set deadlines: a staging that meets only 5xx gives up after 20 s.
    let api = Service::start(stager_api(
        &db.url,
        &internal.host(),
        &insecure,
        &[("STAGER_WORKERS", "0"), ("TAILOR_STAGING_TIMEOUT", "20s")],
    ));
    let mut work = worker(&db, &internal.host(), &insecure, &[]);

    let endless = |status, declare_length| Misbehaviour::Oversized {
        status,
        bytes: GIB,
        declare_length,
    };
    let image = ImageSpec::seeded(ManifestFormat::Oci, 7000, 2, 64 * 1024).build();
    for repository in ["big/config", "big/layer", "big/missing-layer"] {
        hostile.add_image(repository, "v1", &image);
    }
    hostile.add_rule(Rule::new(
        "/v2/big/manifest/manifests/",
        endless(200, false),
    ));
    hostile.add_rule(Rule::new(
        "/v2/big/sized-manifest/manifests/",
        endless(200, true),
    ));
    hostile.add_rule(Rule::new("/v2/big/error/manifests/", endless(500, false)));
    hostile.add_rule(Rule::new(
        &format!("/v2/big/config/blobs/{}", image.config.digest),
        endless(200, false),
    ));
    hostile.add_rule(Rule::new(
        &format!("/v2/big/layer/blobs/{}", image.layers[0].digest),
        endless(200, false),
    ));
    hostile.add_rule(Rule::new(
        &format!("/v2/big/missing-layer/blobs/{}", image.layers[0].digest),
        endless(404, false),
    ));
    // A config declared to be a gigabyte: refused before it is fetched.
    let huge_config = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "size": GIB, "digest": format!("sha256:{}", "ab".repeat(32)) },
        "layers": [],
    });
    hostile.add_manifest(
        "big/declared-config",
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        serde_json::to_vec(&huge_config).unwrap(),
    );
    tokens.add_image("big/realm", "v1", &image);
    tokens.require_token(None);
    tokens.add_rule(Rule::new("/token?", endless(200, false)));

    let mut guids = Vec::new();
    for image in [
        format!("{}/big/manifest:v1", hostile.host()),
        format!("{}/big/sized-manifest:v1", hostile.host()),
        format!("{}/big/error:v1", hostile.host()),
        format!("{}/big/config:v1", hostile.host()),
        format!("{}/big/layer:v1", hostile.host()),
        format!("{}/big/missing-layer:v1", hostile.host()),
        format!("{}/big/declared-config:v1", hostile.host()),
        format!("{}/big/realm:v1", tokens.host()),
    ] {
        let staged = stage(&api, json!({ "app_guid": Uuid::new_v4(), "image": image })).await;
        guids.push((image, staged["staging_guid"].as_str().unwrap().to_owned()));
    }
    for (image, guid) in &guids {
        let done = wait_finished(&api, guid, Duration::from_secs(90)).await;
        assert_eq!(done["state"], "failed", "{image}: {done}");
    }

    // Reference lists of about 15 MiB each (400 000 GUIDs), ten at once.
    let list: Vec<String> = (0..400_000).map(|_| Uuid::new_v4().to_string()).collect();
    let body = serde_json::to_vec(&json!({ "staging_guids": list })).unwrap();
    let client = reqwest::Client::new();
    let statuses: Vec<u16> = futures_util::future::join_all((0..10).map(|_| {
        client
            .put(format!("{}/references?force=true", api.base_url))
            .bearer_auth(TOKEN)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
    }))
    .await
    .into_iter()
    .map(|r| r.expect("an answer").status().as_u16())
    .collect();
    assert!(
        statuses.iter().all(|s| matches!(s, 200 | 429)),
        "{statuses:?}"
    );
    assert!(statuses.contains(&200), "{statuses:?}");

    let (worker_peak, api_peak) = (peak_rss_kib(work.id()), peak_rss_kib(api.pid()));
    work.kill().ok();
    work.wait().ok();
    assert!(
        worker_peak < RSS_CEILING_KIB,
        "tailor work peaked at {worker_peak} KiB"
    );
    assert!(
        api_peak < RSS_CEILING_KIB,
        "stager-api peaked at {api_peak} KiB"
    );
    eprintln!("peak RSS: tailor work {worker_peak} KiB, stager-api {api_peak} KiB");
}

#[tokio::test]
async fn upstream_text_never_forges_a_log_line() {
    let db = TestDatabase::new().await;
    let internal = TestRegistry::anonymous();
    let hostile = HostileRegistry::start();
    let insecure = [internal.host(), hostile.host()];
    let forged = "2026-11-23T00:00:00.000000Z  INFO tailor: staging succeeded";
    let message = format!("denied\n{forged}\r\n{forged}\u{0}\u{1b}[31m\u{2028}{forged}");
    let body = serde_json::to_vec(&json!({ "errors": [{ "code": "DENIED", "message": message }] }))
        .unwrap();
    hostile.add_rule(Rule::new(
        "/v2/forge/denied/",
        Misbehaviour::respond(403, body.clone()),
    ));
    hostile.add_rule(Rule::new(
        "/v2/forge/missing/",
        Misbehaviour::respond(404, body),
    ));
    hostile.add_rule(Rule::new(
        "/v2/forge/broken/",
        Misbehaviour::respond(500, format!("\n{forged}\n\u{0}").into_bytes()),
    ));
    let image = ImageSpec::seeded(ManifestFormat::Docker, 7100, 1, 4096)
        .with_container_config(
            json!({ "Cmd": [format!("run\n{forged}")], "Labels": { "x": message } }),
        )
        .build();
    hostile.add_image("forge/config", "v1", &image);

    let logs = tempfile::NamedTempFile::new().unwrap();
    let mut command = stager_api(
        &db.url,
        &internal.host(),
        &insecure,
        &[
            ("STAGER_WORKERS", "1"),
            ("TAILOR_STAGING_TIMEOUT", "12s"),
            ("RUST_LOG", "debug"),
        ],
    );
    command.stderr(logs.reopen().unwrap());
    let mut api = Service::start_quiet(command);
    let mut guids = Vec::new();
    for repository in [
        "forge/denied",
        "forge/missing",
        "forge/broken",
        "forge/config",
    ] {
        let staged = stage(&api, json!({ "app_guid": Uuid::new_v4(), "image": format!("{}/{repository}:v1", hostile.host()) })).await;
        guids.push(staged["staging_guid"].as_str().unwrap().to_owned());
    }
    for guid in &guids {
        let done = wait_finished(&api, guid, Duration::from_secs(60)).await;
        assert!(
            matches!(done["state"].as_str(), Some("failed" | "succeeded")),
            "{done}"
        );
    }
    api.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));

    let written = std::fs::read(logs.path()).unwrap();
    let text = String::from_utf8_lossy(&written);
    assert!(
        text.contains("staging started"),
        "the log was captured: {text}"
    );
    for line in text.lines() {
        assert!(
            !line.starts_with("2026-11-23T00:00:00"),
            "a forged line: {line:?}"
        );
        assert!(
            !line
                .chars()
                .any(|c| c != '\t' && tailor::text::is_hostile(c)),
            "a raw control character: {line:?}"
        );
    }
}
