//! The staging benchmark: `cargo bench -p stager-api --bench staging`.
//!
//! Runs the real `stager-api` binary (8 in-process workers) on an ephemeral PostgreSQL with
//! two loopback registries, and measures:
//! - 100 concurrent `POST /stage` for 100 apps of one new 256 MiB image: all must succeed, and
//!   the upstream registry's access log says how many bytes it served (target <= 1.05x image);
//! - restaging an image already staged for the app, from POST to `succeeded` (p50 target < 100 ms);
//! - pinning it (`mode: pin`) for new apps, from POST to `succeeded`, and the upstream bytes
//!   the pins read (the config only);
//! - `POST /stage` acceptance under load from wrk (target >= 1000 requests/s, p99 < 50 ms),
//!   against a second stager with no workers so that only acceptance is measured.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use specs::{Service, TOKEN, stager_api};
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::{TestDatabase, TestRegistry};
use uuid::Uuid;

const MIB: u64 = 1024 * 1024;

async fn wait_all(api: &Service, guids: &[String]) -> Vec<serde_json::Value> {
    let mut done = Vec::new();
    for guid in guids {
        done.push(specs::wait_finished(api, guid, Duration::from_secs(600)).await);
    }
    done
}

/// POSTs one staging and waits for it to succeed: how long that took.
async fn staged_in(client: &reqwest::Client, api: &Service, body: serde_json::Value) -> Duration {
    let started = Instant::now();
    let response = client
        .post(format!("{}/stage", api.base_url))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let guid = response.json::<serde_json::Value>().await.unwrap()["staging_guid"]
        .as_str()
        .unwrap()
        .to_owned();
    let result = wait_all(api, std::slice::from_ref(&guid)).await;
    assert_eq!(result[0]["state"], "succeeded", "{}", result[0]);
    started.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    testkit::init();
    let db = TestDatabase::new().await;
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let insecure = [hub.host(), internal.host()];
    eprintln!("building a 256 MiB image (4 x 64 MiB layers)...");
    let image = tokio::task::spawn_blocking(|| {
        ImageSpec::seeded(ManifestFormat::Docker, 7000, 4, 64 * MIB).build()
    })
    .await
    .unwrap();
    hub.push("bench/app:v1", &image).await;
    let source = format!("{}/bench/app:v1", hub.host());
    let api = Service::start_quiet({
        let mut command = stager_api(
            &db.url,
            &internal.host(),
            &insecure,
            &[("STAGER_WORKERS", "8"), ("RUST_LOG", "warn")],
        );
        command.stderr(Stdio::null());
        command
    });
    let client = reqwest::Client::new();

    // 1. 100 concurrent stagings of one new image.
    let started = Instant::now();
    let posts = (0..100).map(|_| {
        let client = client.clone();
        let url = format!("{}/stage", api.base_url);
        let body = json!({ "app_guid": Uuid::new_v4(), "image": source });
        async move {
            let response = client
                .post(url)
                .bearer_auth(TOKEN)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202);
            response.json::<serde_json::Value>().await.unwrap()["staging_guid"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    });
    let guids: Vec<String> = futures_util::future::join_all(posts).await;
    let done = wait_all(&api, &guids).await;
    let fleet_time = started.elapsed();
    let succeeded = done.iter().filter(|d| d["state"] == "succeeded").count();
    let served = hub.blob_bytes_served();
    let (copied, mounted): (u64, u64) = done.iter().fold((0, 0), |(c, m), d| {
        (
            c + d["result"]["blobs"]["copied"].as_u64().unwrap_or(0),
            m + d["result"]["blobs"]["mounted"].as_u64().unwrap_or(0),
        )
    });

    // 2. Restage latency: the image is already staged for this app.
    let app_guid = done[0]["app_guid"].as_str().unwrap().to_owned();
    let mut restage = Vec::new();
    for _ in 0..30 {
        let body = json!({ "app_guid": app_guid, "image": source });
        restage.push(staged_in(&client, &api, body).await);
    }
    restage.sort();

    // 3. Pins for new apps: the manifest and the config upstream, nothing copied.
    let served_before_pins = hub.blob_bytes_served();
    let mut pins = Vec::new();
    for _ in 0..30 {
        let body = json!({ "app_guid": Uuid::new_v4(), "image": source, "mode": "pin" });
        pins.push(staged_in(&client, &api, body).await);
    }
    pins.sort();
    let pin_bytes = hub.blob_bytes_served() - served_before_pins;

    // 4. Acceptance under load, on a stager without workers.
    let acceptor = Service::start_quiet({
        let mut command = stager_api(
            &db.url,
            &internal.host(),
            &insecure,
            &[("STAGER_WORKERS", "0"), ("RUST_LOG", "error")],
        );
        command.stderr(Stdio::null());
        command
    });
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        script.path(),
        format!(
            r#"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {TOKEN}"
local counter = 0
request = function()
  counter = counter + 1
  local app = string.format("%08x-0000-4000-8000-%012x", math.random(0, 0x7fffffff), counter)
  return wrk.format(nil, "/stage", nil, '{{"app_guid":"' .. app .. '","image":"redis:7"}}')
end
done = function(summary, latency, requests)
  io.write(string.format("WRK rps=%.1f p50_ms=%.2f p99_ms=%.2f requests=%d errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.requests, summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"#
        ),
    )
    .unwrap();
    let wrk = Command::new("wrk")
        .args(["-t2", "-c32", "-d10s", "--latency", "-s"])
        .arg(script.path())
        .arg(&acceptor.base_url)
        .output();
    let wrk_line = match wrk {
        Ok(output) => String::from_utf8_lossy(&output.stdout)
            .lines()
            .find(|l| l.starts_with("WRK "))
            .unwrap_or("wrk printed no summary")
            .to_owned(),
        Err(_) => "wrk is not installed (scripts/bench installs it)".to_owned(),
    };
    let accepted: i64 = {
        let pool = tailor::db::connect(&db.url, 1).await.unwrap();
        sqlx::query_scalar(
            "SELECT count(*) FROM stagings WHERE source_image = 'docker.io/library/redis:7'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };

    println!("tailor staging benchmark");
    println!();
    println!("| measurement | result | target |");
    println!("|---|---|---|");
    println!(
        "| 100 concurrent stagings of one new {} MiB image: succeeded | {succeeded}/100 in {:.1} s | 100/100 |",
        image.blob_bytes() / MIB,
        fleet_time.as_secs_f64()
    );
    println!(
        "| upstream bytes served (registry access log) / image bytes | {served} / {} = {:.3}x | <= 1.05x |",
        image.blob_bytes(),
        served as f64 / image.blob_bytes() as f64
    );
    println!("| blobs copied / mounted across the 100 stagings | {copied} / {mounted} | |");
    println!(
        "| restage of an already-staged image, POST to succeeded (30 runs) | p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms | p50 < 100 ms |",
        percentile(&restage, 0.5).as_secs_f64() * 1000.0,
        percentile(&restage, 0.9).as_secs_f64() * 1000.0,
        restage.last().unwrap().as_secs_f64() * 1000.0
    );
    println!(
        "| pin of the same image for a new app (`mode: pin`), POST to succeeded (30 runs) | p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms | |",
        percentile(&pins, 0.5).as_secs_f64() * 1000.0,
        percentile(&pins, 0.9).as_secs_f64() * 1000.0,
        pins.last().unwrap().as_secs_f64() * 1000.0
    );
    println!(
        "| upstream blob bytes the 30 pins read / 30 x the config's size | {pin_bytes} / {} | equal |",
        30 * image.config.size
    );
    println!(
        "| POST /stage under wrk (2 threads, 32 connections, 10 s) | {wrk_line}; {accepted} rows written | >= 1000 rps, p99 < 50 ms |"
    );
}
