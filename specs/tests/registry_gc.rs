//! `scripts/registry-gc` as a deployment runs it in a maintenance window: against a registry
//! under a restart loop, checking that blob storage is reclaimed, that pushes are refused only
//! while it collects, and that no failure leaves the registry read-only.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use reqwest::StatusCode;
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::supervised_registry::SupervisedRegistry;

const READ_WRITE: &str = "    readonly:\n      enabled: false\n";
const READ_ONLY: &str = "    readonly:\n      enabled: true\n";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/registry-gc")
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run_script(args: &[&str]) -> Run {
    let output = Command::new(script())
        .args(args)
        .env_remove("REGISTRY_GC_USER")
        .env_remove("REGISTRY_GC_PASSWORD")
        .output()
        .expect("run scripts/registry-gc");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `registry-gc --config --restart --url` for `registry`, plus `extra`.
fn run_gc(registry: &SupervisedRegistry, extra: &[&str]) -> Run {
    let config = registry.config_path().to_string_lossy().into_owned();
    let restart = registry.restart_command();
    let url = registry.url();
    let mut args = vec![
        "--config",
        config.as_str(),
        "--restart",
        restart.as_str(),
        "--url",
        url.as_str(),
        "--timeout",
        "60",
    ];
    args.extend_from_slice(extra);
    run_script(&args)
}

/// The status of `POST /v2/<repository>/blobs/uploads/`: 202 read-write, 405 read-only. An
/// opened session is cancelled so it leaves nothing behind.
async fn start_upload(registry: &SupervisedRegistry, repository: &str) -> StatusCode {
    let client = reqwest::Client::new();
    let response = client
        .post(format!(
            "{}/v2/{repository}/blobs/uploads/",
            registry.base_url()
        ))
        .send()
        .await
        .expect("POST an upload");
    let status = response.status();
    if status == StatusCode::ACCEPTED {
        let location = response.headers()[reqwest::header::LOCATION]
            .to_str()
            .expect("ASCII Location")
            .to_owned();
        client
            .delete(location)
            .send()
            .await
            .expect("cancel the upload");
    }
    status
}

/// A stand-in for `docker-registry` that runs `body` (bash) instead of collecting garbage.
fn fake_registry_bin(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("fake-docker-registry");
    std::fs::write(&path, format!("#!/usr/bin/env bash\n{body}\n")).expect("write the fake");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn read_config(registry: &SupervisedRegistry) -> String {
    std::fs::read_to_string(registry.config_path()).expect("read the registry config")
}

#[tokio::test]
async fn gc_reclaims_a_deleted_images_blobs_and_keeps_the_live_ones() {
    let registry = SupervisedRegistry::start();
    let (a, b) = ImageSpec::sharing(ManifestFormat::Docker, 4100, 3, 1, 64 * 1024);
    let (a, b) = (a.build(), b.build());
    registry.push("gc/app:a", &a).await;
    registry.push("gc/app:b", &b).await;
    let original_config = read_config(&registry);

    let deleted = reqwest::Client::new()
        .delete(format!(
            "{}/v2/gc/app/manifests/{}",
            registry.base_url(),
            a.digest
        ))
        .send()
        .await
        .expect("DELETE A's manifest");
    assert_eq!(deleted.status(), StatusCode::ACCEPTED);

    let b_digests: Vec<&str> = b.blobs().map(|blob| blob.digest.as_str()).collect();
    let a_only: Vec<&testkit::image::Blob> = a
        .blobs()
        .filter(|blob| !b_digests.contains(&blob.digest.as_str()))
        .collect();
    assert!(
        a_only.len() >= 2 && a_only.len() < a.blobs().count(),
        "A and B must share some blobs and not others"
    );
    let expected = a_only.iter().map(|blob| blob.size).sum::<u64>() + a.manifest.len() as u64;

    let before = registry.blob_storage_bytes();
    let run = run_gc(&registry, &[]);
    assert_eq!(run.code, 0, "{}\n{}", run.stderr, run.stdout);
    let after = registry.blob_storage_bytes();

    let reclaimed = before.saturating_sub(after);
    assert!(
        reclaimed.abs_diff(expected) <= 4096,
        "reclaimed {reclaimed} bytes (before {before}, after {after}), expected {expected}\n{}",
        run.stderr
    );
    assert!(run.stderr.contains("reclaimed"), "{}", run.stderr);

    // Back to read-write, with the configuration exactly as it was.
    assert_eq!(read_config(&registry), original_config);
    assert!(original_config.contains(READ_WRITE));

    let client = reqwest::Client::new();
    let gone = client
        .head(format!(
            "{}/v2/gc/app/blobs/{}",
            registry.base_url(),
            a_only[1].digest
        ))
        .send()
        .await
        .expect("HEAD a collected layer");
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);

    let layout = tempfile::tempdir().expect("an OCI layout directory");
    testkit::skopeo::copy_to_oci_layout(
        &format!("{}/gc/app:b", registry.host()),
        None,
        layout.path(),
        false,
    )
    .expect("B still pulls, every blob verified");

    let c = ImageSpec::seeded(ManifestFormat::Docker, 4101, 2, 4096).build();
    registry.push("gc/other:c", &c).await;
}

#[tokio::test]
async fn a_dry_run_reports_but_deletes_nothing() {
    let registry = SupervisedRegistry::start();
    let a = ImageSpec::seeded(ManifestFormat::Docker, 4200, 2, 16 * 1024).build();
    registry.push("gc/dry:a", &a).await;
    let deleted = reqwest::Client::new()
        .delete(format!(
            "{}/v2/gc/dry/manifests/{}",
            registry.base_url(),
            a.digest
        ))
        .send()
        .await
        .expect("DELETE the manifest");
    assert_eq!(deleted.status(), StatusCode::ACCEPTED);

    let before = registry.blob_storage_bytes();
    let run = run_gc(&registry, &["--dry-run"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stderr, run.stdout);
    assert_eq!(registry.blob_storage_bytes(), before);
    let report = format!("{}{}", run.stdout, run.stderr);
    assert!(
        report.contains(&a.layers[0].digest),
        "the dry run names what it would delete:\n{report}"
    );
    assert!(read_config(&registry).contains(READ_WRITE));
    assert_eq!(
        start_upload(&registry, "gc/dry").await,
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn pushes_are_refused_and_pulls_served_while_collecting() {
    let registry = SupervisedRegistry::start();
    let image = ImageSpec::seeded(ManifestFormat::Docker, 4300, 1, 4096).build();
    registry.push("gc/live:v1", &image).await;
    let original_config = read_config(&registry);

    let dir = tempfile::tempdir().expect("a directory for the fake");
    let record = dir.path().join("record");
    let fake = fake_registry_bin(
        dir.path(),
        &format!(
            r#"set -eu
url={url}
{{
  echo "args: $*"
  echo "push: $(curl -s -o /dev/null -w '%{{http_code}}' -X POST "$url/v2/gc/live/blobs/uploads/")"
  echo "pull: $(curl -s -o /dev/null -w '%{{http_code}}' -H 'Accept: {media_type}' "$url/v2/gc/live/manifests/v1")"
}} > {record}
cp "${{@: -1}}" {record}.config
"#,
            url = registry.url(),
            media_type = image.media_type,
            record = record.display(),
        ),
    );

    let run = run_gc(&registry, &["--registry-bin", &fake.to_string_lossy()]);
    assert_eq!(run.code, 0, "{}\n{}", run.stderr, run.stdout);

    let recorded = std::fs::read_to_string(&record).expect("the fake ran");
    assert!(
        recorded.contains(&format!(
            "args: garbage-collect {}\n",
            registry.config_path().display()
        )),
        "garbage-collect gets the config and no --delete-untagged:\n{recorded}"
    );
    assert!(recorded.contains("push: 405\n"), "{recorded}");
    assert!(recorded.contains("pull: 200\n"), "{recorded}");

    // While collecting, only the readonly value differed from the original.
    let during = std::fs::read_to_string(format!("{}.config", record.display())).unwrap();
    assert_eq!(during, original_config.replace(READ_WRITE, READ_ONLY));

    assert_eq!(read_config(&registry), original_config);
    assert_eq!(
        start_upload(&registry, "gc/live").await,
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn a_failed_collection_restores_read_write() {
    let registry = SupervisedRegistry::start();
    let image = ImageSpec::seeded(ManifestFormat::Docker, 4400, 1, 4096).build();
    registry.push("gc/fail:v1", &image).await;
    let original_config = read_config(&registry);
    let dir = tempfile::tempdir().expect("a directory for the fake");
    let fake = fake_registry_bin(dir.path(), "echo 'simulated failure' >&2\nexit 1");

    let run = run_gc(&registry, &["--registry-bin", &fake.to_string_lossy()]);
    assert_eq!(run.code, 1, "{}\n{}", run.stderr, run.stdout);
    assert!(
        run.stderr.contains("garbage-collect failed"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("registry restored to read-write"),
        "{}",
        run.stderr
    );

    assert_eq!(read_config(&registry), original_config);
    assert_eq!(
        start_upload(&registry, "gc/fail").await,
        StatusCode::ACCEPTED
    );
    registry
        .push(
            "gc/fail:v2",
            &ImageSpec::seeded(ManifestFormat::Docker, 4401, 1, 4096).build(),
        )
        .await;
}

#[tokio::test]
async fn a_run_terminated_while_collecting_stops_the_collection_and_restores_read_write() {
    let registry = SupervisedRegistry::start();
    let image = ImageSpec::seeded(ManifestFormat::Docker, 4500, 1, 4096).build();
    registry.push("gc/term:v1", &image).await;
    let original_config = read_config(&registry);
    let dir = tempfile::tempdir().expect("a directory for the fake");
    let gc_pid_file = dir.path().join("gc.pid");
    let fake = fake_registry_bin(
        dir.path(),
        &format!(
            "echo $$ > {pid}.tmp && mv {pid}.tmp {pid}\nexec sleep 600",
            pid = gc_pid_file.display()
        ),
    );

    let config = registry.config_path().to_string_lossy().into_owned();
    let restart = registry.restart_command();
    let url = registry.url();
    let fake_arg = fake.to_string_lossy().into_owned();
    let mut child = Command::new(script())
        .args([
            "--config",
            &config,
            "--restart",
            &restart,
            "--url",
            &url,
            "--registry-bin",
            &fake_arg,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start scripts/registry-gc");
    // Waiting for the collection to begin (the restart takes seconds; five minutes is a hang).
    let begin_deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let gc_pid = loop {
        if let Some(pid) = std::fs::read_to_string(&gc_pid_file)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
        {
            break pid;
        }
        if let Some(status) = child.try_wait().expect("poll the script") {
            panic!("the script ended ({status}) before collecting");
        }
        assert!(
            std::time::Instant::now() < begin_deadline,
            "the collection never began"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let output = child.wait_with_output().expect("wait for the script");
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("terminated"), "{stderr}");
    assert!(
        !testkit::process::alive(gc_pid),
        "the collection was stopped"
    );
    assert!(
        stderr.contains("registry restored to read-write"),
        "{stderr}"
    );
    assert_eq!(read_config(&registry), original_config);
    assert_eq!(
        start_upload(&registry, "gc/term").await,
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn a_restart_that_never_takes_effect_times_out_and_is_undone() {
    let registry = SupervisedRegistry::start();
    let original_config = read_config(&registry);
    let config = registry.config_path().to_string_lossy().into_owned();
    let url = registry.url();

    // `true` restarts nothing: the read-write server keeps answering 202.
    let run = run_script(&[
        "--config",
        &config,
        "--restart",
        "true",
        "--url",
        &url,
        "--timeout",
        "2",
    ]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("not read-only after 2s"),
        "{}",
        run.stderr
    );
    assert_eq!(read_config(&registry), original_config);
    assert_eq!(
        start_upload(&registry, "gc/probe").await,
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn usage_and_configuration_errors_exit_2_and_change_nothing() {
    let dir = tempfile::tempdir().expect("a directory");
    let url = "http://127.0.0.1:9";

    let run = run_script(&["--restart", "true", "--url", url]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("--config FILE is required"),
        "{}",
        run.stderr
    );

    let run = run_script(&[
        "--config",
        "x",
        "--restart",
        "true",
        "--url",
        url,
        "--bogus",
    ]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("unknown argument: --bogus"),
        "{}",
        run.stderr
    );

    // `enabled:` lines elsewhere (delete, uploadpurging, a top-level readonly) are not it.
    let without = dir.path().join("without-readonly.yml");
    let text = "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: /tmp/nowhere\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nreadonly:\n  enabled: false\nhttp:\n  addr: 127.0.0.1:9\n";
    std::fs::write(&without, text).unwrap();
    let without_arg = without.to_string_lossy().into_owned();
    let run = run_script(&["--config", &without_arg, "--restart", "true", "--url", url]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    // The script names the file it resolved (through any symlink).
    let resolved = std::fs::canonicalize(&without).unwrap();
    assert!(
        run.stderr.contains(&*resolved.to_string_lossy()),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("readonly"), "{}", run.stderr);
    assert_eq!(std::fs::read_to_string(&without).unwrap(), text);

    // Already read-only: another maintenance is running, or one was killed; not ours to end.
    let already = dir.path().join("already.yml");
    let text = "storage:\n  maintenance:\n    readonly:\n      enabled: true\n";
    std::fs::write(&already, text).unwrap();
    let already_arg = already.to_string_lossy().into_owned();
    let run = run_script(&["--config", &already_arg, "--restart", "true", "--url", url]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("already true"), "{}", run.stderr);
    assert_eq!(std::fs::read_to_string(&already).unwrap(), text);

    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "no backups or temporary files: {names:?}");
}
