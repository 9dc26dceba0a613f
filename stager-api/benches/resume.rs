//! The resume benchmark: `cargo bench -p stager-api --bench resume`.
//!
//! A worker killed in the middle of a large layer, then replaced: how many bytes upstream
//! serves in all, by its own access log. One 1 GiB layer (`TAILOR_RESUME_LAYER_MIB`) on a real
//! registry behind a link of 64 MiB/s (`TAILOR_RESUME_LINK_MIB`, a throttling proxy); a
//! `tailor work` process (release build) is SIGKILLed once the link has carried half the layer
//! plus 0, 1/4, 1/2 or 3/4 of a chunk (one run each: a kill lands wherever the worker is then,
//! reading a chunk upstream or sending one to the internal registry), and a second one finishes
//! the staging. Each run has a fresh database and internal registry. Compared, like with like:
//! chunked, resumable uploads (`TAILOR_UPLOAD_CHUNK_MIB=16`, the default) against uploads in
//! one request (`TAILOR_UPLOAD_CHUNK_MIB=0`, how every blob went before), at the same points.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use specs::{Service, stage, stager_api, tailor_work, tunable, wait_finished};
use testkit::fault_proxy::FaultProxy;
use testkit::image::{BuiltImage, ImageSpec, ManifestFormat};
use testkit::{TestDatabase, TestRegistry};
use uuid::Uuid;

const MIB: u64 = 1024 * 1024;
const KEY: &str = "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=";
/// Where past half the layer each run's kill lands, in quarters of a chunk.
const PHASES: [u64; 4] = [0, 1, 2, 3];
const CHUNK_MIB: u64 = 16;

fn worker(db: &TestDatabase, internal: &str, insecure: &[String], chunk_mib: u64) -> Child {
    let chunk_mib = chunk_mib.to_string();
    let settings = [
        ("TAILOR_WORKERS", "1"),
        ("TAILOR_CREDENTIALS_KEY", KEY),
        ("TAILOR_LEASE_SECONDS", "3"),
        ("TAILOR_POLL_SECONDS", "1"),
        ("TAILOR_UPLOAD_CHUNK_MIB", chunk_mib.as_str()),
        ("RUST_LOG", "warn"),
    ];
    tailor_work(&db.url, internal, insecure, &settings)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

struct Run {
    ratio: f64,
    resumed_from: Option<u64>,
    elapsed: Duration,
}

async fn run(
    hub: &TestRegistry,
    image: &BuiltImage,
    link_mib: u64,
    chunk_mib: u64,
    kill_at: u64,
) -> Run {
    let db = TestDatabase::new().await;
    let internal = TestRegistry::anonymous();
    let link = FaultProxy::start(&hub.base_url());
    link.throttle(link_mib * MIB);
    let insecure = [link.host(), internal.host()];
    let api = Service::start_quiet({
        let mut command = stager_api(
            &db.url,
            &internal.host(),
            &insecure,
            &[("STAGER_WORKERS", "0"), ("RUST_LOG", "warn")],
        );
        command.stderr(Stdio::null());
        command
    });
    let served_before = hub.blob_bytes_served_settled();
    let started = Instant::now();
    let mut first = worker(&db, &internal.host(), &insecure, chunk_mib);
    let staged = stage(
        &api,
        json!({ "app_guid": Uuid::new_v4(), "image": format!("{}/bench/big:v1", link.host()) }),
    )
    .await;
    let guid = staged["staging_guid"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(600);
    while link.forwarded_bytes() < kill_at {
        assert!(
            Instant::now() < deadline,
            "the link never carried {kill_at} bytes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let mut second = worker(&db, &internal.host(), &insecure, chunk_mib);
    let done = wait_finished(&api, &guid, Duration::from_secs(1200)).await;
    let elapsed = started.elapsed();
    second.kill().ok();
    second.wait().ok();
    assert_eq!(done["state"], "succeeded", "{done}");
    let log = hub.access_log();
    let resumed_from = log
        .iter()
        .rev()
        .find(|e| e.is_blob_get() && e.status == 206)
        .map(|e| image.layers[0].size - e.bytes);
    let served = hub.blob_bytes_served_settled() - served_before;
    Run {
        ratio: served as f64 / image.blob_bytes() as f64,
        resumed_from,
        elapsed,
    }
}

#[tokio::main]
async fn main() {
    testkit::init();
    let layer_mib = tunable("TAILOR_RESUME_LAYER_MIB", 1024);
    let link_mib = tunable("TAILOR_RESUME_LINK_MIB", 64);
    let hub = TestRegistry::anonymous();
    eprintln!("building a {layer_mib} MiB single-layer image...");
    let image = tokio::task::spawn_blocking(move || {
        ImageSpec::seeded(ManifestFormat::Oci, 9100, 1, layer_mib * MIB).build()
    })
    .await
    .unwrap();
    hub.push("bench/big:v1", &image).await;
    println!("layer {layer_mib} MiB over a {link_mib} MiB/s link");
    println!(
        "| uploads | killed after the link carried | upstream served / image | resumed from | POST to succeeded |"
    );
    println!("|---|---|---|---|---|");
    let half = image.layers[0].size / 2;
    for (label, chunk_mib) in [
        ("one request (before)", 0),
        ("16 MiB chunks (now)", CHUNK_MIB),
    ] {
        for phase in PHASES {
            let kill_at = half + phase * CHUNK_MIB * MIB / 4;
            let run = run(&hub, &image, link_mib, chunk_mib, kill_at).await;
            let resumed = match run.resumed_from {
                Some(offset) => format!("{} MiB", offset / MIB),
                None => "not resumed".into(),
            };
            println!(
                "| {label} | {} MiB | {:.3}x | {resumed} | {:.1} s |",
                kill_at / MIB,
                run.ratio,
                run.elapsed.as_secs_f64()
            );
        }
    }
}
