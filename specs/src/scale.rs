//! The scale-out scenario, shared by its acceptance test and its benchmark: one `stager-api`
//! and N `tailor work` processes with default settings on a PostgreSQL server of their own at
//! its default `max_connections`, staging many images that share base layers.

use std::time::{Duration, Instant};

use futures_util::StreamExt;

use serde_json::json;
use testkit::image::{BuiltImage, ImageSpec, LayerSpec, ManifestFormat};
use testkit::{TestDatabase, TestRegistry};
use uuid::Uuid;

use crate::fleet::{ConnectionPeak, Fleet, FleetOptions, connection_exhaustion};

/// What one run measured.
#[derive(Debug)]
pub struct ScaleRun {
    pub worker_processes: usize,
    pub stagings: usize,
    pub succeeded: usize,
    pub elapsed: Duration,
    /// Most client connections the server had at once (the watch's own included).
    pub peak_connections: i64,
    /// Log lines saying a process ran out of connections.
    pub exhaustion: Vec<String>,
    /// The first failures, for messages.
    pub failures: Vec<serde_json::Value>,
}

impl ScaleRun {
    pub fn stagings_per_minute(&self) -> f64 {
        self.succeeded as f64 * 60.0 / self.elapsed.as_secs_f64()
    }
}

/// `count` images of two shared base layers (`base` bytes each) and one layer of their own.
pub fn images_sharing_a_base(count: usize, base: u64, own: u64) -> Vec<BuiltImage> {
    (0..count as u64)
        .map(|i| {
            let mut spec = ImageSpec::seeded(ManifestFormat::Docker, 8000 + i, 0, 0);
            spec.layers = vec![
                LayerSpec {
                    seed: 80_001,
                    size: base,
                },
                LayerSpec {
                    seed: 80_002,
                    size: base,
                },
                LayerSpec {
                    seed: 81_000 + i,
                    size: own,
                },
            ];
            spec.build()
        })
        .collect()
}

/// Stages `stagings` times (round robin over `images`, each for a new app) through a fleet of
/// `worker_processes`, and waits for all of them to end.
pub async fn run(worker_processes: usize, images: &[BuiltImage], stagings: usize) -> ScaleRun {
    let db = TestDatabase::private().await;
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    for (i, image) in images.iter().enumerate() {
        hub.push(&format!("scale/app{i}:v1"), image).await;
    }
    let peak = ConnectionPeak::watch(&db.url).await;
    let fleet = Fleet::start(FleetOptions {
        database_url: db.url.clone(),
        internal: internal.host(),
        insecure: vec![hub.host(), internal.host()],
        worker_processes,
        ..FleetOptions::default()
    });
    let started = Instant::now();
    let client = reqwest::Client::new();
    let posts = (0..stagings).map(|n| {
        let body = json!({
            "app_guid": Uuid::new_v4(),
            "image": format!("{}/scale/app{}:v1", hub.host(), n % images.len()),
        });
        let request = client
            .post(format!("{}/stage", fleet.api.base_url))
            .bearer_auth(crate::TOKEN)
            .json(&body)
            .send();
        async move {
            let response = request.await.expect("POST /stage");
            assert_eq!(response.status(), 202);
            let staging: serde_json::Value = response.json().await.expect("a staging");
            staging["staging_guid"].as_str().expect("a GUID").to_owned()
        }
    });
    let guids: Vec<String> = futures_util::stream::iter(posts)
        .buffer_unordered(32)
        .collect()
        .await;
    let mut finished = Vec::new();
    for guid in &guids {
        finished.push(crate::wait_finished(&fleet.api, guid, Duration::from_secs(900)).await);
    }
    let elapsed = started.elapsed();
    let succeeded = finished
        .iter()
        .filter(|s| s["state"] == "succeeded")
        .count();
    let failures = finished
        .iter()
        .filter(|s| s["state"] != "succeeded")
        .take(3)
        .cloned()
        .collect();
    let logs = fleet.logs();
    ScaleRun {
        worker_processes,
        stagings,
        succeeded,
        elapsed,
        peak_connections: peak.peak(),
        exhaustion: connection_exhaustion(&logs)
            .into_iter()
            .map(str::to_owned)
            .collect(),
        failures,
    }
}
