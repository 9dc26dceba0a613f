//! The export and import benchmark: `tailor copy` between a registry and an OCI layout (a
//! directory or a bucket) against the peer tools doing the same, whole processes on loopback.
//!
//! `cargo bench -p tailor --bench export` (optionally `-- --runs N`). It builds the 8 x 64 MiB
//! image (OCI media types, so skopeo writes the manifest as it is and both tools produce the
//! same layout), pushes it to one local distribution registry and measures, for both sides:
//! - export into `oci:DIR`, `tailor copy docker://… oci:DIR` vs `skopeo copy`: cold exports
//!   into a new layout (median of runs, alternating tools); a re-export into the same layout
//!   (time, and blob bytes read from the registry, from its own access log); peak RSS of a cold
//!   export (wait4's rusage);
//! - import from `oci:DIR` (the layout skopeo wrote) into an empty repository of a fresh
//!   registry, `tailor copy oci:DIR:x docker://…` vs `skopeo copy --preserve-digests`: time and
//!   peak RSS, with the 9 blobs uploaded checked in tailor's report and in the registry's log;
//! - `s3://` on a SeaweedFS S3 server, against skopeo into `oci:DIR` plus `aws s3 sync` (awscli,
//!   installed into `target/bench-tools/awscli-venv` on first use; the peer columns are skipped,
//!   with a note, if it cannot be installed), timed as the sum of both processes and with the
//!   larger of their peak RSS: a cold export into a fresh server; a re-export into the same
//!   prefix (time and blob bytes read from the registry); an import from the bucket into an
//!   empty repository of a fresh registry (the peer syncs the prefix down to a directory and
//!   runs skopeo on it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use testkit::TestRegistry;
use testkit::bench::{Measured, measure, median, ms, runs_ms};
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::s3::S3Server;

const MIB: u64 = 1024 * 1024;
/// The image's blobs: 8 layers and the config.
const IMAGE_BLOBS: u64 = 9;
/// What a layout's `blobs/` holds for the image: its blobs and the manifest.
const LAYOUT_BLOBS: usize = 10;

fn tailor_copy(src: &str, dst: &str, insecure: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tailor"));
    command
        .args(["copy", "--json", "--insecure", insecure, src, dst])
        .env("RUST_LOG", "warn");
    command
}

fn tailor_export(src: &str, layout: &Path, insecure: &str) -> Command {
    tailor_copy(src, &format!("oci:{}:x", layout.display()), insecure)
}

/// skopeo with an empty home, so no blob-info cache of an earlier run helps it.
fn skopeo_copy(tls_flag: &str, src: &str, dst: &str, home: &Path) -> Command {
    let mut command = testkit::skopeo::skopeo();
    command
        .args(["copy", "--quiet", tls_flag, src, dst])
        .env("HOME", home)
        .env("XDG_DATA_HOME", home.join("data"));
    command
}

fn skopeo_export(src: &str, layout: &Path, home: &Path) -> Command {
    skopeo_copy(
        "--src-tls-verify=false",
        &format!("docker://{src}"),
        &format!("oci:{}:x", layout.display()),
        home,
    )
}

/// `skopeo copy --preserve-digests oci:DIR:x docker://DST`.
fn skopeo_import(layout: &Path, dst: &str, home: &Path) -> Command {
    let mut command = skopeo_copy(
        "--dest-tls-verify=false",
        &format!("oci:{}:x", layout.display()),
        &format!("docker://{dst}"),
        home,
    );
    command.arg("--preserve-digests");
    command
}

/// tailor's layout location for `prefix` of the server's bucket, tag `x`.
fn s3_location(s3: &S3Server, prefix: &str) -> String {
    format!(
        "s3://{}/{prefix}:x?endpoint={}&region={}",
        s3.bucket(),
        s3.endpoint(),
        s3.region()
    )
}

/// The server's credentials in the environment, as for any AWS client.
fn with_s3_credentials(mut command: Command, s3: &S3Server) -> Command {
    command
        .env("AWS_ACCESS_KEY_ID", s3.access_key())
        .env("AWS_SECRET_ACCESS_KEY", s3.secret_key().expose())
        .env("AWS_DEFAULT_REGION", s3.region())
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN");
    command
}

/// `aws s3 sync FROM TO` against the server, with no configuration files from `$HOME`.
fn aws_sync(aws: &Path, s3: &S3Server, home: &Path, from: &str, to: &str) -> Command {
    let mut command = Command::new(aws);
    command
        .args(["s3", "sync", "--only-show-errors", "--endpoint-url"])
        .arg(s3.endpoint())
        .args([from, to])
        .env("HOME", home)
        .env("AWS_CONFIG_FILE", home.join("no-aws-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            home.join("no-aws-credentials"),
        );
    with_s3_credentials(command, s3)
}

/// awscli from a venv next to the build (`target/bench-tools/awscli-venv`), installed with
/// `python3 -m venv` and `pip install awscli` when it is not there yet.
fn awscli() -> Result<(PathBuf, String), String> {
    let target = Path::new(env!("CARGO_BIN_EXE_tailor"))
        .parent()
        .and_then(Path::parent)
        .ok_or("no target directory above the tailor binary")?;
    let venv = target.join("bench-tools/awscli-venv");
    let aws = venv.join("bin/aws");
    let version = || {
        Command::new(&aws)
            .arg("--version")
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| {
                // awscli 1 prints its version on stderr, 2 on stdout.
                let text = [output.stdout, output.stderr].concat();
                let text = String::from_utf8_lossy(&text);
                text.split_whitespace().next().unwrap_or("aws").to_owned()
            })
    };
    if let Some(version) = version() {
        return Ok((aws, version));
    }
    eprintln!(
        "installing awscli into {} (python3 -m venv, pip install awscli)...",
        venv.display()
    );
    let run = |command: &mut Command| -> Result<(), String> {
        let output = command.output().map_err(|e| format!("{command:?}: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{command:?} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "awscli"]))?;
    match version() {
        Some(version) => Ok((aws, version)),
        None => Err(format!("{} does not run after installing", aws.display())),
    }
}

/// `blobs.copied` of tailor's `--json` report.
fn blobs_copied(run: &Measured) -> u64 {
    let report: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("tailor's report: {e}: {}", run.stdout));
    report["blobs"]["copied"]
        .as_u64()
        .unwrap_or_else(|| panic!("no blobs.copied in {}", run.stdout))
}

/// Blob uploads `repository` completed, as the registry logged them (the final `PUT`).
fn blob_uploads(registry: &TestRegistry, repository: &str) -> usize {
    let uploads = format!("/v2/{repository}/blobs/uploads/");
    registry
        .access_log()
        .iter()
        .filter(|e| e.method == "PUT" && e.status == 201 && e.path.starts_with(&uploads))
        .count()
}

/// Checks that the bucket holds the image's layout under `prefix`: its `blobs/` and an
/// `index.json`.
async fn assert_layout_in_bucket(s3: &S3Server, prefix: &str) {
    let objects = s3.list_objects(prefix).await;
    let blobs = objects
        .iter()
        .filter(|(key, _)| key.starts_with(&format!("{prefix}/blobs/")))
        .count();
    assert_eq!(blobs, LAYOUT_BLOBS, "s3 {prefix}: {objects:?}");
    let index = format!("{prefix}/index.json");
    assert!(
        objects.iter().any(|(key, _)| *key == index),
        "s3 {prefix}: {objects:?}"
    );
}

/// One side's runs: times, and the largest peak RSS.
#[derive(Default)]
struct Side {
    times: Vec<Duration>,
    max_rss_kib: u64,
}

impl Side {
    fn add(&mut self, elapsed: Duration, max_rss_kib: u64) {
        self.times.push(elapsed);
        self.max_rss_kib = self.max_rss_kib.max(max_rss_kib);
    }

    fn median(&self) -> Duration {
        median(self.times.clone())
    }

    fn ms(&self) -> String {
        ms(self.median())
    }

    fn runs(&self) -> String {
        format!("{:?}", runs_ms(&self.times))
    }

    fn rss(&self) -> String {
        format!("{:.1} MiB", self.max_rss_kib as f64 / 1024.0)
    }
}

fn time_ratio(a: &Side, b: &Side) -> String {
    format!(
        "{:.2}x",
        a.median().as_secs_f64() / b.median().as_secs_f64()
    )
}

fn rss_ratio(a: &Side, b: &Side) -> String {
    format!("{:.2}x", a.max_rss_kib as f64 / b.max_rss_kib as f64)
}

/// The peer's two processes, each with its median time and peak RSS.
fn steps((first, a): (&str, &Side), (second, b): (&str, &Side)) -> String {
    format!(
        "{first} {} / {} + {second} {} / {}",
        a.ms(),
        a.rss(),
        b.ms(),
        b.rss()
    )
}

/// The peer's cell, or `n/a` when awscli is missing.
fn peer_cell(peer: &Option<Side>, cell: impl Fn(&Side) -> String) -> String {
    peer.as_ref().map(cell).unwrap_or_else(|| "n/a".to_owned())
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    testkit::init();
    let hub = TestRegistry::anonymous();
    eprintln!("building the image (8 x 64 MiB)...");
    let image = ImageSpec::seeded(ManifestFormat::Oci, 9200, 8, 64 * MIB);
    let image = tokio::task::spawn_blocking(move || image.build())
        .await
        .unwrap();
    hub.push("bench/app:v1", &image).await;
    let src = format!("{}/bench/app:v1", hub.host());
    let work = tempfile::tempdir().expect("work directory");
    let layout = |name: &str| work.path().join(name);

    // One untimed warm-up each, so both meet warm page caches on the registry side.
    measure(tailor_export(&src, &layout("warm-tailor"), &hub.host()));
    let home = tempfile::tempdir().expect("skopeo home");
    measure(skopeo_export(&src, &layout("warm-skopeo"), home.path()));
    let (mut tailor_times, mut skopeo_times) = (Vec::new(), Vec::new());
    let (mut tailor_rss, mut skopeo_rss) = (0, 0);
    for run in 0..runs {
        let tailor = measure(tailor_export(
            &src,
            &layout(&format!("t{run}")),
            &hub.host(),
        ));
        tailor_times.push(tailor.elapsed);
        tailor_rss = tailor_rss.max(tailor.max_rss_kib);
        std::fs::remove_dir_all(layout(&format!("t{run}"))).unwrap();
        let home = tempfile::tempdir().expect("skopeo home");
        let skopeo = measure(skopeo_export(
            &src,
            &layout(&format!("s{run}")),
            home.path(),
        ));
        skopeo_times.push(skopeo.elapsed);
        skopeo_rss = skopeo_rss.max(skopeo.max_rss_kib);
        std::fs::remove_dir_all(layout(&format!("s{run}"))).unwrap();
    }
    let (tailor_cold, skopeo_cold) = (median(tailor_times.clone()), median(skopeo_times.clone()));

    // Re-exports into the layouts the warm-ups wrote.
    let (mut tailor_again, mut skopeo_again) = (Vec::new(), Vec::new());
    let before = hub.blob_bytes_served();
    for _ in 0..runs {
        tailor_again
            .push(measure(tailor_export(&src, &layout("warm-tailor"), &hub.host())).elapsed);
    }
    let tailor_again_bytes = hub.blob_bytes_served() - before;
    let before = hub.blob_bytes_served();
    for _ in 0..runs {
        let home = tempfile::tempdir().expect("skopeo home");
        skopeo_again
            .push(measure(skopeo_export(&src, &layout("warm-skopeo"), home.path())).elapsed);
    }
    let skopeo_again_bytes = hub.blob_bytes_served() - before;
    let (tailor_again, skopeo_again) = (median(tailor_again), median(skopeo_again));

    // Imports of the layout skopeo wrote, each into a new repository of a fresh registry (a
    // cold import: nothing to mount, every blob uploaded). One untimed warm-up each.
    let import_src = layout("warm-skopeo");
    let import_tailor = |repository: &str| {
        let target = TestRegistry::anonymous();
        let run = measure(tailor_copy(
            &format!("oci:{}:x", import_src.display()),
            &format!("docker://{}/{repository}:x", target.host()),
            &target.host(),
        ));
        assert_eq!(blobs_copied(&run), IMAGE_BLOBS, "{}", run.stdout);
        assert_eq!(blob_uploads(&target, repository), IMAGE_BLOBS as usize);
        run
    };
    let import_skopeo = |repository: &str| {
        let target = TestRegistry::anonymous();
        let home = tempfile::tempdir().expect("skopeo home");
        let run = measure(skopeo_import(
            &import_src,
            &format!("{}/{repository}:x", target.host()),
            home.path(),
        ));
        assert_eq!(blob_uploads(&target, repository), IMAGE_BLOBS as usize);
        run
    };
    import_tailor("imp/twarm");
    import_skopeo("imp/swarm");
    let (mut tailor_import, mut skopeo_import_side) = (Side::default(), Side::default());
    for run in 0..runs {
        let tailor = import_tailor(&format!("imp/t{run}"));
        tailor_import.add(tailor.elapsed, tailor.max_rss_kib);
        let skopeo = import_skopeo(&format!("imp/s{run}"));
        skopeo_import_side.add(skopeo.elapsed, skopeo.max_rss_kib);
    }

    let image_mib = image.blob_bytes() as f64 / MIB as f64;
    println!(
        "tailor export benchmark ({runs} runs, medians; image {image_mib:.0} MiB in 8 layers + config, into oci:DIR)"
    );
    println!();
    println!("| measurement | tailor | skopeo | ratio (tailor/skopeo) |");
    println!("|---|---|---|---|");
    println!(
        "| cold export | {} | {} | {:.2}x |",
        ms(tailor_cold),
        ms(skopeo_cold),
        tailor_cold.as_secs_f64() / skopeo_cold.as_secs_f64()
    );
    println!(
        "| cold export runs (ms) | {:?} | {:?} | |",
        runs_ms(&tailor_times),
        runs_ms(&skopeo_times)
    );
    println!(
        "| re-export into the same layout | {} | {} | {:.2}x |",
        ms(tailor_again),
        ms(skopeo_again),
        tailor_again.as_secs_f64() / skopeo_again.as_secs_f64()
    );
    println!(
        "| re-export: blob bytes read from the registry ({runs} runs, access log) | {tailor_again_bytes} | {skopeo_again_bytes} | |"
    );
    println!(
        "| peak RSS, cold export | {:.1} MiB | {:.1} MiB | {:.2}x |",
        tailor_rss as f64 / 1024.0,
        skopeo_rss as f64 / 1024.0,
        tailor_rss as f64 / skopeo_rss as f64
    );
    println!();
    println!(
        "tailor import benchmark ({runs} runs, medians; oci:DIR written by skopeo, into a new repository of a fresh registry)"
    );
    println!();
    println!("| measurement | tailor | skopeo --preserve-digests | ratio (tailor/skopeo) |");
    println!("|---|---|---|---|");
    println!(
        "| cold import | {} | {} | {} |",
        tailor_import.ms(),
        skopeo_import_side.ms(),
        time_ratio(&tailor_import, &skopeo_import_side)
    );
    println!(
        "| cold import runs (ms) | {} | {} | |",
        tailor_import.runs(),
        skopeo_import_side.runs()
    );
    println!(
        "| blobs uploaded per import (registry access log, checked every run; tailor's report agrees) | {IMAGE_BLOBS} | {IMAGE_BLOBS} | |"
    );
    println!(
        "| peak RSS, cold import | {} | {} | {} |",
        tailor_import.rss(),
        skopeo_import_side.rss(),
        rss_ratio(&tailor_import, &skopeo_import_side)
    );

    s3_benchmark(runs, &hub, &src, work.path()).await;
}

/// The `s3://` section: tailor against skopeo + `aws s3 sync`.
async fn s3_benchmark(runs: usize, hub: &TestRegistry, src: &str, work: &Path) {
    let aws = match awscli() {
        Ok(aws) => Some(aws),
        Err(error) => {
            eprintln!("note: no awscli ({error}); the S3 peer columns are skipped");
            None
        }
    };
    let aws_version = aws
        .as_ref()
        .map_or("awscli unavailable".to_owned(), |(_, v)| v.clone());
    let aws = aws.map(|(path, _)| path);
    let dir = |name: &str| work.join(name);
    let source = format!("docker://{src}");

    // tailor: one process. The peer: skopeo into a directory, then `aws s3 sync` of it.
    let tailor_export_s3 = |s3: &S3Server, prefix: &str| {
        measure(with_s3_credentials(
            tailor_copy(&source, &s3_location(s3, prefix), &hub.host()),
            s3,
        ))
    };
    let peer_export_s3 = |aws: &Path, s3: &S3Server, local: &Path, prefix: &str| {
        let home = tempfile::tempdir().expect("peer home");
        let skopeo = measure(skopeo_export(src, local, home.path()));
        let sync = measure(aws_sync(
            aws,
            s3,
            home.path(),
            &local.display().to_string(),
            &format!("s3://{}/{prefix}", s3.bucket()),
        ));
        (skopeo, sync)
    };

    // One server for the warm-ups, the re-exports and the imports. The warm-ups (untimed) also
    // write the prefixes the re-exports go into, and tailor's is the imports' source.
    eprintln!("starting SeaweedFS...");
    let s3 = S3Server::start();
    let warm = tailor_export_s3(&s3, "tailor/warm");
    assert_eq!(blobs_copied(&warm), IMAGE_BLOBS, "{}", warm.stdout);
    assert_layout_in_bucket(&s3, "tailor/warm").await;
    if let Some(aws) = &aws {
        peer_export_s3(aws, &s3, &dir("peer-warm"), "peer/warm");
        assert_layout_in_bucket(&s3, "peer/warm").await;
    }

    // Cold exports, each into a fresh server (SeaweedFS frees deleted space only when it
    // vacuums, and its test store holds 4 GiB), alternating tools.
    let (mut tailor_cold, mut peer_cold) = (Side::default(), Side::default());
    let (mut peer_cold_skopeo, mut peer_cold_sync) = (Side::default(), Side::default());
    for run in 0..runs {
        let fresh = S3Server::start();
        let prefix = format!("tailor/{run}");
        let tailor = tailor_export_s3(&fresh, &prefix);
        assert_eq!(blobs_copied(&tailor), IMAGE_BLOBS, "{}", tailor.stdout);
        assert_layout_in_bucket(&fresh, &prefix).await;
        tailor_cold.add(tailor.elapsed, tailor.max_rss_kib);
        drop(fresh);
        if let Some(aws) = &aws {
            let fresh = S3Server::start();
            let prefix = format!("peer/{run}");
            let local = dir(&format!("peer-{run}"));
            let (skopeo, sync) = peer_export_s3(aws, &fresh, &local, &prefix);
            assert_layout_in_bucket(&fresh, &prefix).await;
            peer_cold.add(
                skopeo.elapsed + sync.elapsed,
                skopeo.max_rss_kib.max(sync.max_rss_kib),
            );
            peer_cold_skopeo.add(skopeo.elapsed, skopeo.max_rss_kib);
            peer_cold_sync.add(sync.elapsed, sync.max_rss_kib);
            std::fs::remove_dir_all(&local).unwrap();
        }
    }
    let peer_cold = aws.as_ref().map(|_| peer_cold);

    // Re-exports into the warm-ups' prefixes; the peer keeps its directory from the warm-up,
    // so skopeo finds its blobs there and the sync uploads only what changed.
    let mut tailor_again = Side::default();
    let before = hub.blob_bytes_served();
    for _ in 0..runs {
        let again = tailor_export_s3(&s3, "tailor/warm");
        assert_eq!(blobs_copied(&again), 0, "{}", again.stdout);
        tailor_again.add(again.elapsed, again.max_rss_kib);
    }
    let tailor_again_bytes = hub.blob_bytes_served() - before;
    let mut peer_again = Side::default();
    let before = hub.blob_bytes_served();
    if let Some(aws) = &aws {
        for _ in 0..runs {
            let (skopeo, sync) = peer_export_s3(aws, &s3, &dir("peer-warm"), "peer/warm");
            peer_again.add(
                skopeo.elapsed + sync.elapsed,
                skopeo.max_rss_kib.max(sync.max_rss_kib),
            );
        }
    }
    let peer_again_bytes = hub.blob_bytes_served() - before;
    let peer_again = aws.as_ref().map(|_| peer_again);

    // Imports of tailor's prefix, each into a new repository of a fresh registry. The peer
    // syncs the prefix down into a new directory, then skopeo pushes it. One untimed warm-up
    // each.
    let tailor_import = |repository: &str| {
        let target = TestRegistry::anonymous();
        let run = measure(with_s3_credentials(
            tailor_copy(
                &s3_location(&s3, "tailor/warm"),
                &format!("docker://{}/{repository}:x", target.host()),
                &target.host(),
            ),
            &s3,
        ));
        assert_eq!(blobs_copied(&run), IMAGE_BLOBS, "{}", run.stdout);
        assert_eq!(blob_uploads(&target, repository), IMAGE_BLOBS as usize);
        run
    };
    let peer_import = |aws: &Path, repository: &str, local: &Path| {
        let target = TestRegistry::anonymous();
        let home = tempfile::tempdir().expect("peer home");
        let sync = measure(aws_sync(
            aws,
            &s3,
            home.path(),
            &format!("s3://{}/tailor/warm", s3.bucket()),
            &local.display().to_string(),
        ));
        let skopeo = measure(skopeo_import(
            local,
            &format!("{}/{repository}:x", target.host()),
            home.path(),
        ));
        assert_eq!(blob_uploads(&target, repository), IMAGE_BLOBS as usize);
        std::fs::remove_dir_all(local).unwrap();
        (sync, skopeo)
    };
    tailor_import("imp/bwarm");
    if let Some(aws) = &aws {
        peer_import(aws, "imp/pwarm", &dir("peer-import-warm"));
    }
    let (mut tailor_imports, mut peer_imports) = (Side::default(), Side::default());
    let (mut peer_import_sync, mut peer_import_skopeo) = (Side::default(), Side::default());
    for run in 0..runs {
        let tailor = tailor_import(&format!("imp/b{run}"));
        tailor_imports.add(tailor.elapsed, tailor.max_rss_kib);
        if let Some(aws) = &aws {
            let (sync, skopeo) = peer_import(
                aws,
                &format!("imp/p{run}"),
                &dir(&format!("peer-import-{run}")),
            );
            peer_imports.add(
                sync.elapsed + skopeo.elapsed,
                sync.max_rss_kib.max(skopeo.max_rss_kib),
            );
            peer_import_sync.add(sync.elapsed, sync.max_rss_kib);
            peer_import_skopeo.add(skopeo.elapsed, skopeo.max_rss_kib);
        }
    }
    let peer_imports = aws.as_ref().map(|_| peer_imports);

    let ratio = |tailor: &Side, peer: &Option<Side>| peer_cell(peer, |p| time_ratio(tailor, p));
    println!();
    println!(
        "tailor S3 benchmark ({runs} runs, medians; SeaweedFS S3 on loopback; peer: skopeo copy to oci:DIR and aws s3 sync ({aws_version}), times summed, RSS the larger)"
    );
    println!();
    println!("| measurement | tailor | skopeo + aws s3 sync | ratio (tailor/peer) |");
    println!("|---|---|---|---|");
    println!(
        "| cold export (fresh server each run) | {} | {} | {} |",
        tailor_cold.ms(),
        peer_cell(&peer_cold, Side::ms),
        ratio(&tailor_cold, &peer_cold)
    );
    println!(
        "| cold export runs (ms) | {} | {} | |",
        tailor_cold.runs(),
        peer_cell(&peer_cold, Side::runs)
    );
    println!(
        "| cold export, the peer's two steps (median time, peak RSS) | | {} | |",
        peer_cell(&peer_cold, |_| steps(
            ("skopeo", &peer_cold_skopeo),
            ("sync", &peer_cold_sync)
        ))
    );
    println!(
        "| peak RSS, cold export | {} | {} | {} |",
        tailor_cold.rss(),
        peer_cell(&peer_cold, Side::rss),
        peer_cell(&peer_cold, |p| rss_ratio(&tailor_cold, p))
    );
    println!(
        "| re-export into the same prefix (peer: into its kept oci:DIR, then sync) | {} | {} | {} |",
        tailor_again.ms(),
        peer_cell(&peer_again, Side::ms),
        ratio(&tailor_again, &peer_again)
    );
    println!(
        "| re-export: blob bytes read from the registry ({runs} runs, access log) | {tailor_again_bytes} | {} | |",
        peer_cell(&peer_again, |_| peer_again_bytes.to_string())
    );
    println!(
        "| import into a new repository of a fresh registry | {} | {} | {} |",
        tailor_imports.ms(),
        peer_cell(&peer_imports, Side::ms),
        ratio(&tailor_imports, &peer_imports)
    );
    println!(
        "| import runs (ms) | {} | {} | |",
        tailor_imports.runs(),
        peer_cell(&peer_imports, Side::runs)
    );
    println!(
        "| import, the peer's two steps (median time, peak RSS) | | {} | |",
        peer_cell(&peer_imports, |_| steps(
            ("sync", &peer_import_sync),
            ("skopeo", &peer_import_skopeo)
        ))
    );
    println!(
        "| peak RSS, import | {} | {} | {} |",
        tailor_imports.rss(),
        peer_cell(&peer_imports, Side::rss),
        peer_cell(&peer_imports, |p| rss_ratio(&tailor_imports, p))
    );
}
