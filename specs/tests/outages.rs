//! Outages survived, with the real binaries: an upstream down for three minutes, an upstream
//! rate limiting twenty concurrent stagings for a minute (and how few requests it receives
//! meanwhile), and a gigabyte layer copied while its worker is killed again and again.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use specs::fleet::{Fleet, FleetOptions};
use specs::{get, stage, wait_finished};
use tailor::embedded::{EmbeddedRegistry, RegistryOptions, free_loopback_port};
use testkit::fault_proxy::{FaultProxy, Rule};
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::{PushAuth, TestDatabase, TestRegistry, skopeo};
use uuid::Uuid;

const MIB: u64 = 1024 * 1024;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn states(fleet: &Fleet, guids: &[String]) -> Vec<Value> {
    let mut all = Vec::new();
    for guid in guids {
        all.push(get(&fleet.api, guid).await);
    }
    all
}

#[tokio::test]
async fn stagings_survive_an_upstream_down_for_three_minutes() {
    let db = TestDatabase::new().await;
    let internal = TestRegistry::anonymous();
    // The upstream comes back where it was, with what it had.
    let storage = tempfile::tempdir().unwrap();
    let port = free_loopback_port().unwrap();
    let start_hub = || {
        EmbeddedRegistry::start(RegistryOptions {
            storage_dir: Some(storage.path().to_owned()),
            port: Some(port),
            ..RegistryOptions::default()
        })
        .expect("start the upstream")
    };
    let mut hub = start_hub();
    let images: Vec<_> = (0..3)
        .map(|i| ImageSpec::seeded(ManifestFormat::Docker, 9100 + i, 2, 32 * MIB).build())
        .collect();
    for (i, image) in images.iter().enumerate() {
        testkit::push_image(
            &hub.base_url(),
            &format!("outage/app{i}"),
            "v1",
            image,
            &PushAuth::Anonymous,
        )
        .await;
    }
    let fleet = Fleet::start(FleetOptions {
        database_url: db.url.clone(),
        internal: internal.host(),
        insecure: vec![hub.host(), internal.host()],
        worker_processes: 1,
        // Backoff grows to a minute here (five by default), so the test waits less.
        worker_env: env(&[("TAILOR_WORKERS", "2"), ("TAILOR_RETRY_MAX_SECONDS", "60")]),
        ..FleetOptions::default()
    });
    let mut guids = Vec::new();
    for n in 0..6 {
        let body = json!({ "app_guid": Uuid::new_v4(), "image": format!("{}/outage/app{}:v1", hub.host(), n % 3) });
        guids.push(
            stage(&fleet.api, body).await["staging_guid"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    // The upstream goes down while a worker is copying and the rest wait.
    let deadline = Instant::now() + Duration::from_secs(60);
    let at_outage = loop {
        let now = states(&fleet, &guids).await;
        if now.iter().any(|s| s["state"] == "running") {
            break now;
        }
        assert!(Instant::now() < deadline, "no staging started: {now:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    hub.kill();
    let count = |state: &str| at_outage.iter().filter(|s| s["state"] == state).count();
    assert!(
        count("running") >= 1 && count("queued") >= 1,
        "{at_outage:#?}"
    );

    tokio::time::sleep(Duration::from_secs(180)).await;
    let meanwhile = states(&fleet, &guids).await;
    assert!(
        meanwhile.iter().all(|s| s["state"] != "failed"),
        "nothing failed while the upstream was down: {meanwhile:#?}"
    );
    assert!(
        meanwhile.iter().any(|s| s["waiting"]["reason"] == "retry"),
        "waiting stagings say why: {meanwhile:#?}"
    );
    let _hub = start_hub();
    for guid in &guids {
        let done = wait_finished(&fleet.api, guid, Duration::from_secs(600)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
    }
}

#[tokio::test]
async fn a_rate_limited_upstream_receives_about_one_probe_per_window_from_the_whole_fleet() {
    let db = TestDatabase::new().await;
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let proxy = FaultProxy::start(&hub.base_url());
    let images: Vec<_> = (0..4)
        .map(|i| ImageSpec::seeded(ManifestFormat::Docker, 9200 + i, 2, 256 * 1024).build())
        .collect();
    for (i, image) in images.iter().enumerate() {
        hub.push(&format!("limited/app{i}:v1"), image).await;
    }
    proxy.add(Rule::new("/v2/", 429).header("Retry-After", "30"));
    // Twenty workers in two processes: twenty stagings at once.
    let fleet = Fleet::start(FleetOptions {
        database_url: db.url.clone(),
        internal: internal.host(),
        insecure: vec![proxy.host(), internal.host()],
        worker_processes: 2,
        worker_env: env(&[("TAILOR_WORKERS", "10"), ("TAILOR_POLL_SECONDS", "1")]),
        ..FleetOptions::default()
    });
    let limited_since = Instant::now();
    let mut guids = Vec::new();
    for n in 0..20 {
        let body = json!({ "app_guid": Uuid::new_v4(), "image": format!("{}/limited/app{}:v1", proxy.host(), n % 4) });
        guids.push(
            stage(&fleet.api, body).await["staging_guid"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    // While the limit lasts, stagings say they wait for the budget, and /metrics shows it.
    let deadline = Instant::now() + Duration::from_secs(50);
    loop {
        let now = states(&fleet, &guids).await;
        if now.iter().any(|s| s["waiting"]["reason"] == "rate_limit") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no staging waits for the budget: {now:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = specs::metrics(&fleet.api).await;
    assert!(
        metrics.contains(&format!(
            "tailor_registry_rate_limited_seconds{{registry=\"{}\"}}",
            proxy.host()
        )),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(limited_since.elapsed())).await;
    proxy.clear_rules();
    let requests_while_limited = proxy
        .answered()
        .iter()
        .filter(|(_, status)| *status == 429)
        .count();

    for guid in &guids {
        let done = wait_finished(&fleet.api, guid, Duration::from_secs(300)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
    }
    eprintln!(
        "the rate-limited upstream received {requests_while_limited} requests in its minute of 429s"
    );
    // Twenty workers each retrying every 30 s would send 60; the fleet sends its first
    // requests (about one per staging, before anyone has seen a 429) and then about one
    // probe per 30-second window.
    assert!(
        requests_while_limited <= 20 + 6,
        "{requests_while_limited} requests reached the rate-limited upstream"
    );
}

#[tokio::test]
async fn a_gigabyte_layer_is_copied_while_its_worker_is_killed_again_and_again() {
    let db = TestDatabase::new().await;
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let image = tokio::task::spawn_blocking(|| {
        ImageSpec::seeded(ManifestFormat::Docker, 9300, 1, 1024 * MIB).build()
    })
    .await
    .unwrap();
    hub.push("huge/layer:v1", &image).await;
    let mut fleet = Fleet::start(FleetOptions {
        database_url: db.url.clone(),
        internal: internal.host(),
        insecure: vec![hub.host(), internal.host()],
        worker_processes: 1,
        worker_env: env(&[
            ("TAILOR_WORKERS", "1"),
            ("TAILOR_LEASE_SECONDS", "3"),
            ("TAILOR_POLL_SECONDS", "1"),
        ]),
        ..FleetOptions::default()
    });
    let staged = stage(
        &fleet.api,
        json!({ "app_guid": Uuid::new_v4(), "image": format!("{}/huge/layer:v1", hub.host()) }),
    )
    .await;
    let guid = staged["staging_guid"].as_str().unwrap().to_owned();
    // Three times: once the copy has moved 64 MiB more, kill its worker and start another.
    for kill in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let now = get(&fleet.api, &guid).await;
            let done = now["progress"]["bytes_done"].as_u64().unwrap_or(0);
            let attempt = now["attempts"].as_u64().unwrap_or(0);
            assert_ne!(now["state"], "succeeded", "finished before kill {kill}");
            // This attempt's own progress (a claim starts it from zero).
            if now["state"] == "running" && attempt > kill && done >= 64 * MIB {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no progress before kill {kill}: {now}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        fleet.restart_worker(0);
    }
    let done = wait_finished(&fleet.api, &guid, Duration::from_secs(600)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(done["attempts"].as_u64().unwrap() >= 4, "{done}");
    let pinned = done["result"]["pinned_image"].as_str().unwrap();
    assert_eq!(skopeo::digest(pinned, None).unwrap(), image.digest);
}
