//! The copy benchmark: tailor against skopeo, side by side, on two local registries.
//!
//! `cargo bench -p tailor --bench copy` (optionally `-- --runs N`). It builds an 8-layer,
//! 512 MiB image, a version of it sharing 7 of 8 layers, and a single 1 GiB layer; then it
//! measures, as whole processes:
//! - cold copies, `tailor copy` vs `skopeo copy` on the same registry pair (median of runs);
//! - a re-copy when everything is present (time and blob bytes read from the source);
//! - a copy of the new version (bytes read from the source, per the source registry's own
//!   access log);
//! - peak RSS while copying the 1 GiB layer (from wait4's rusage), for both tools.

use std::process::Command;

use testkit::TestRegistry;
use testkit::bench::{measure, median, ms, runs_ms};
use testkit::image::{ImageSpec, LayerSpec, ManifestFormat};

const MIB: u64 = 1024 * 1024;

fn tailor_copy(src: &str, dst: &str, insecure: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tailor"));
    command
        .args(["copy", "--json", "--insecure", insecure, src, dst])
        .env("RUST_LOG", "warn");
    command
}

fn skopeo_copy(src: &str, dst: &str) -> Command {
    let mut command = testkit::skopeo::skopeo();
    command.args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
    ]);
    command
        .arg(format!("docker://{src}"))
        .arg(format!("docker://{dst}"));
    command
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
    let internal = TestRegistry::anonymous();
    let insecure = format!("{},{}", hub.host(), internal.host());

    eprintln!("building images (8 x 64 MiB, a 7-of-8 sibling, 1 x 1 GiB)...");
    let (v1, v2) = ImageSpec::sharing(ManifestFormat::Docker, 9000, 8, 7, 64 * MIB);
    let mut big = ImageSpec::seeded(ManifestFormat::Oci, 9100, 1, 0);
    big.layers = vec![LayerSpec {
        seed: 9101,
        size: 1024 * MIB,
    }];
    let (v1, v2, big) = tokio::task::spawn_blocking(move || (v1.build(), v2.build(), big.build()))
        .await
        .unwrap();
    for (repo, tag, image) in [
        ("bench/app", "v1", &v1),
        ("bench/app", "v2", &v2),
        ("bench/big", "v1", &big),
    ] {
        hub.push(&format!("{repo}:{tag}"), image).await;
    }
    let src = |repo_tag: &str| format!("{}/{repo_tag}", hub.host());
    let dst = |repo_tag: &str| format!("{}/{repo_tag}", internal.host());

    // Cold copies, alternating tools, each into a fresh registry. skopeo gets an empty home
    // directory every time: its blob-info cache would otherwise remember where it pushed
    // blobs before and mount them instead of copying. One untimed warm-up each, so both meet
    // warm page caches on the source side.
    let cold_tailor = |run: &str| {
        let target = TestRegistry::anonymous();
        let insecure = format!("{},{}", hub.host(), target.host());
        measure(tailor_copy(
            &src("bench/app:v1"),
            &format!("{}/cold/{run}:x", target.host()),
            &insecure,
        ))
        .elapsed
    };
    let cold_skopeo = |run: &str| {
        let target = TestRegistry::anonymous();
        let home = tempfile::tempdir().expect("skopeo home");
        let mut command = skopeo_copy(
            &src("bench/app:v1"),
            &format!("{}/cold/{run}:x", target.host()),
        );
        command
            .env("HOME", home.path())
            .env("XDG_DATA_HOME", home.path().join("data"));
        measure(command).elapsed
    };
    cold_tailor("warm");
    cold_skopeo("warm");
    let (mut tailor_times, mut skopeo_times) = (Vec::new(), Vec::new());
    for run in 0..runs {
        tailor_times.push(cold_tailor(&run.to_string()));
        skopeo_times.push(cold_skopeo(&run.to_string()));
    }
    let (tailor_cold, skopeo_cold) = (median(tailor_times.clone()), median(skopeo_times.clone()));

    // Re-copy with everything present.
    measure(tailor_copy(
        &src("bench/app:v1"),
        &dst("present/app:x"),
        &insecure,
    ));
    let before = hub.blob_bytes_served();
    let mut recopy_times = Vec::new();
    for _ in 0..runs.max(5) {
        recopy_times.push(
            measure(tailor_copy(
                &src("bench/app:v1"),
                &dst("present/app:x"),
                &insecure,
            ))
            .elapsed,
        );
    }
    let recopy = median(recopy_times);
    let recopy_bytes = hub.blob_bytes_served() - before;

    // The new version: only its new layer and config may be read.
    measure(tailor_copy(
        &src("bench/app:v1"),
        &dst("shared/app:s1"),
        &insecure,
    ));
    let before = hub.blob_bytes_served();
    let report = measure(tailor_copy(
        &src("bench/app:v2"),
        &dst("shared/app:s2"),
        &insecure,
    ));
    let shared_bytes = hub.blob_bytes_served() - before;
    let expected_shared = v2.layers.last().unwrap().size + v2.config.size;

    // Peak memory on one 1 GiB layer.
    let tailor_big = measure(tailor_copy(
        &src("bench/big:v1"),
        &dst("big/tailor:x"),
        &insecure,
    ));
    let skopeo_home = tempfile::tempdir().expect("skopeo home");
    let mut skopeo_big = skopeo_copy(&src("bench/big:v1"), &dst("big/skopeo:x"));
    skopeo_big
        .env("HOME", skopeo_home.path())
        .env("XDG_DATA_HOME", skopeo_home.path().join("data"));
    let skopeo_big = measure(skopeo_big);

    let image_mib = v1.blob_bytes() as f64 / MIB as f64;
    println!(
        "tailor copy benchmark ({runs} runs, medians; image {image_mib:.0} MiB in 8 layers + config)"
    );
    println!();
    println!("| measurement | tailor | skopeo | ratio (tailor/skopeo) | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| cold copy, 8 layers / 512 MiB | {} | {} | {:.2}x | <= 0.85x |",
        ms(tailor_cold),
        ms(skopeo_cold),
        tailor_cold.as_secs_f64() / skopeo_cold.as_secs_f64()
    );
    println!(
        "| cold copy runs | {:?} | {:?} | | |",
        runs_ms(&tailor_times),
        runs_ms(&skopeo_times)
    );
    println!(
        "| re-copy, all present (process wall time) | {} | | | < 50 ms |",
        ms(recopy)
    );
    println!("| re-copy, blob bytes read from source | {recopy_bytes} | | | 0 |");
    println!(
        "| new version sharing 7 of 8 layers: bytes read from source (access log) | {shared_bytes} | | expected {expected_shared} (new layer + config) | equal |"
    );
    println!(
        "| peak RSS, one 1 GiB layer | {:.1} MiB | {:.1} MiB | {:.2}x | < 32 MiB |",
        tailor_big.max_rss_kib as f64 / 1024.0,
        skopeo_big.max_rss_kib as f64 / 1024.0,
        tailor_big.max_rss_kib as f64 / skopeo_big.max_rss_kib as f64
    );
    println!(
        "| 1 GiB layer copy time | {} | {} | {:.2}x | |",
        ms(tailor_big.elapsed),
        ms(skopeo_big.elapsed),
        tailor_big.elapsed.as_secs_f64() / skopeo_big.elapsed.as_secs_f64()
    );
    println!();
    println!("new-version report: {}", report.stdout.trim());
}
