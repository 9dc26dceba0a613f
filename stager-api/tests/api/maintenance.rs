//! The internal registry's garbage-collection window: while it is read-only, stagings wait
//! (handed back to the queue without spending attempts) and finish once it is writable again.

use std::time::Duration;

use serde_json::json;
use stager_api::startup::Application;
use tailor::staging::worker::WorkerSettings;
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::supervised_registry::SupervisedRegistry;
use testkit::{TestDatabase, TestRegistry};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{TOKEN, settings};

/// Flips `storage.maintenance.readonly.enabled` and restarts the registry, as
/// scripts/registry-gc does.
fn set_read_only(registry: &SupervisedRegistry, read_only: bool) {
    let config = std::fs::read_to_string(registry.config_path()).unwrap();
    let (from, to) = if read_only {
        ("enabled: false", "enabled: true")
    } else {
        ("enabled: true", "enabled: false")
    };
    let marker = config.find("readonly:").expect("a readonly block");
    let at = marker + config[marker..].find(from).expect("its enabled line");
    let edited = format!("{}{to}{}", &config[..at], &config[at + from.len()..]);
    std::fs::write(registry.config_path(), edited).unwrap();
    let status = std::process::Command::new("bash")
        .arg("-c")
        .arg(registry.restart_command())
        .status()
        .unwrap();
    assert!(status.success());
    registry.wait_ready();
}

async fn row(pool: &sqlx::PgPool, guid: Uuid) -> (String, i32, Option<String>) {
    sqlx::query_as("SELECT state::text, attempts, last_error FROM stagings WHERE staging_guid = $1")
        .bind(guid)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn stagings_wait_out_a_read_only_registry_without_spending_attempts() {
    testkit::init();
    let db = TestDatabase::new().await;
    let hub = TestRegistry::anonymous();
    let internal = SupervisedRegistry::start();
    let image = ImageSpec::seeded(ManifestFormat::Docker, 4900, 2, 64 * 1024).build();
    hub.push("maintenance/app:v1", &image).await;
    set_read_only(&internal, true);

    let settings = settings(&db.url, &internal.host(), &[hub.host()]);
    let mut workers = WorkerSettings::from_settings(&settings.tailor, None, |_| None).unwrap();
    // One attempt: a counted retry would fail the staging at once.
    workers.max_attempts = 1;
    workers.read_only_retry = Duration::from_millis(500);
    workers.poll_interval = Duration::from_millis(200);
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    tokio::spawn(tailor::staging::worker::run(
        db.pool().await,
        workers,
        1,
        shutdown,
    ));
    let pool = db.pool().await;
    let app = Application::build(&settings, pool.clone()).unwrap();
    let base = format!("http://{}", app.addr());
    tokio::spawn(app.run_until_stopped());

    let guid = Uuid::new_v4();
    let response = reqwest::Client::new()
        .post(format!("{base}/stage"))
        .bearer_auth(TOKEN)
        .json(&json!({
            "app_guid": Uuid::new_v4(),
            "staging_guid": guid,
            "image": format!("{}/maintenance/app:v1", hub.host()),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);

    // Handed back at least twice, never failed.
    let mut handbacks = 0;
    let mut last_seen = None;
    while handbacks < 2 {
        let (state, attempts, last_error) = row(&pool, guid).await;
        assert_ne!(state, "failed", "{last_error:?}");
        if let ("queued", 0, Some(error)) = (state.as_str(), attempts, last_error) {
            assert!(error.starts_with("INTERNAL_REGISTRY_READ_ONLY"), "{error}");
            let seen: Option<(String,)> =
                sqlx::query_as("SELECT run_after::text FROM stagings WHERE staging_guid = $1")
                    .bind(guid)
                    .fetch_optional(&pool)
                    .await
                    .unwrap();
            if seen != last_seen {
                handbacks += 1;
                last_seen = seen;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    set_read_only(&internal, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (state, attempts, last_error) = row(&pool, guid).await;
        if state == "succeeded" {
            assert_eq!(attempts, 1, "the read-only rounds were not counted");
            break;
        }
        assert_ne!(state, "failed", "{last_error:?}");
        assert!(tokio::time::Instant::now() < deadline, "still {state}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
