//! The export benchmark: `tailor copy docker://… oci:DIR` against `skopeo copy docker://…
//! oci:DIR`, whole processes on one local registry and one disk.
//!
//! `cargo bench -p tailor --bench export` (optionally `-- --runs N`). It builds the 8 x 64 MiB
//! image (OCI media types, so skopeo writes the manifest as it is and both tools produce the
//! same layout) and measures, for both tools:
//! - cold exports into a new layout (median of runs, alternating tools);
//! - a re-export into the same layout: time, and blob bytes read from the registry (its own
//!   access log);
//! - peak RSS of a cold export (wait4's rusage).

use std::process::Command;

use testkit::TestRegistry;
use testkit::bench::{measure, median, ms, runs_ms};
use testkit::image::{ImageSpec, ManifestFormat};

const MIB: u64 = 1024 * 1024;

fn tailor_export(src: &str, layout: &std::path::Path, insecure: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tailor"));
    command
        .args(["copy", "--json", "--insecure", insecure, src])
        .arg(format!("oci:{}:x", layout.display()))
        .env("RUST_LOG", "warn");
    command
}

/// skopeo with an empty home, so no blob-info cache of an earlier run helps it.
fn skopeo_export(src: &str, layout: &std::path::Path, home: &std::path::Path) -> Command {
    let mut command = testkit::skopeo::skopeo();
    command
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{src}"))
        .arg(format!("oci:{}:x", layout.display()))
        .env("HOME", home)
        .env("XDG_DATA_HOME", home.join("data"));
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
}
