//! `tailor prune` as cron runs it: the real binary against a stager's database and the real
//! internal registry; its table, `--json`, `--dry-run`, and the exit statuses that tell
//! "pruned", "nothing to do" and "error" apart.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};
use specs::{Service, TOKEN, binary, stage, stager_api, wait_finished};
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::{TestDatabase, TestRegistry};
use uuid::Uuid;

fn prune(db_url: &str, internal: &str, args: &[&str]) -> Output {
    Command::new(binary("tailor"))
        .arg("prune")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db_url)
        .env("TAILOR_INTERNAL_REGISTRY", internal)
        .env("TAILOR_INSECURE_REGISTRIES", internal)
        .output()
        .expect("run tailor prune")
}

fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[tokio::test]
async fn prune_reports_per_app_and_its_exit_status_says_what_happened() {
    let db = TestDatabase::new().await;
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let api = Service::start(stager_api(
        &db.url,
        &internal.host(),
        &[hub.host(), internal.host()],
        &[("STAGER_WORKERS", "2")],
    ));
    let internal_host = internal.host();

    // An empty database: nothing to do (3).
    let empty = prune(&db.url, &internal_host, &["--grace", "0s"]);
    assert_eq!(empty.status.code(), Some(3), "{empty:?}");
    assert!(String::from_utf8_lossy(&empty.stdout).contains("nothing to prune"));

    let app_guid = Uuid::new_v4();
    let mut stagings = Vec::new();
    for seed in [5100u64, 5101] {
        let image = ImageSpec::seeded(ManifestFormat::Docker, seed, 2, 64 * 1024).build();
        hub.push(&format!("cron/app:{seed}"), &image).await;
        let staged = stage(
            &api,
            json!({ "app_guid": app_guid, "image": format!("{}/cron/app:{seed}", hub.host()) }),
        )
        .await;
        let guid = staged["staging_guid"].as_str().unwrap().to_owned();
        let done = wait_finished(&api, &guid, Duration::from_secs(60)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        stagings.push(done);
    }
    let old = stagings[0]["staging_guid"].as_str().unwrap().to_owned();
    let released = reqwest::Client::new()
        .delete(format!("{}/stage/{old}", api.base_url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(released.status(), 200);

    // Within the default grace period (24h): nothing to do.
    let graced = prune(&db.url, &internal_host, &["--json"]);
    assert_eq!(graced.status.code(), Some(3));
    assert_eq!(json_of(&graced)["outcome"], "nothing_to_do");

    // A dry run shows the table and says "would".
    let dry = prune(&db.url, &internal_host, &["--dry-run", "--grace", "0s"]);
    assert_eq!(dry.status.code(), Some(0), "{dry:?}");
    let table = String::from_utf8_lossy(&dry.stdout);
    for needle in [
        "APP",
        app_guid.to_string().as_str(),
        old.as_str(),
        "released",
        "would delete",
        "would prune 1 images",
    ] {
        assert!(table.contains(needle), "{needle:?} missing from:\n{table}");
    }

    // The real run (0), then nothing left (3).
    let real = prune(&db.url, &internal_host, &["--grace", "0s", "--json"]);
    assert_eq!(real.status.code(), Some(0), "{real:?}");
    let report = json_of(&real);
    assert_eq!(
        String::from_utf8_lossy(&real.stderr),
        "",
        "--json: the report on stdout, nothing on stderr"
    );
    assert_eq!(report["outcome"], "pruned");
    assert_eq!(report["images_pruned"], 1);
    assert_eq!(report["decisions"][0]["staging_guid"], old.as_str());
    assert_eq!(report["decisions"][0]["action"], "deleted");
    assert!(report["bytes_reclaimable"].as_u64().unwrap() > 2 * 64 * 1024);
    let again = prune(&db.url, &internal_host, &["--grace", "0s"]);
    assert_eq!(again.status.code(), Some(3));

    // The run is visible in /metrics.
    let metrics = specs::metrics(&api).await;
    assert!(
        metrics.contains("tailor_prune_images_pruned_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("tailor_prune_last_run_outcome{outcome=\"nothing_to_do\"} 1"));
    assert!(metrics.contains("tailor_prune_last_run_timestamp_seconds "));
}

#[tokio::test]
async fn prune_errors_are_precise_and_exit_1() {
    let db = TestDatabase::new().await;
    let internal = TestRegistry::anonymous();

    // Another run holds the prune lease.
    let pool = db.pool().await;
    let holder = tailor::prune::locks::PruneLeases::try_start(&pool)
        .await
        .unwrap()
        .expect("the prune lease is free");
    let locked = prune(&db.url, &internal.host(), &["--json"]);
    assert_eq!(locked.status.code(), Some(1));
    assert_eq!(json_of(&locked)["error"]["code"], "PRUNE_ALREADY_RUNNING");
    holder.finish().await;

    // Postgres unreachable: the password in the URL never shows.
    let unreachable = prune(
        "postgres://tailor:s3cret-pw@127.0.0.1:1/tailor",
        &internal.host(),
        &["--json"],
    );
    assert_eq!(unreachable.status.code(), Some(1));
    let body = json_of(&unreachable);
    assert_eq!(body["error"]["code"], "DATABASE_UNAVAILABLE");
    assert!(!String::from_utf8_lossy(&unreachable.stdout).contains("s3cret-pw"));
    assert!(!String::from_utf8_lossy(&unreachable.stderr).contains("s3cret-pw"));

    // A grace period that is not a duration is a usage error (2) naming the input.
    let bad = prune(&db.url, &internal.host(), &["--grace", "soon"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("\"soon\" is not a duration"));
}
