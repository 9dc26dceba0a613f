//! The embedded components start for real and leave nothing behind when dropped.

use std::path::Path;

use tailor::embedded::{EmbeddedPostgres, EmbeddedRegistry, RegistryOptions, WorkDir};
use testkit::process::alive as process_alive;

#[tokio::test]
async fn postgres_serves_queries_then_leaves_nothing_behind() {
    tailor::tls::install_crypto_provider();
    let postgres = EmbeddedPostgres::start().unwrap();
    let (pid, dir) = (postgres.pid(), postgres.dir().to_owned());

    let pool = tailor::db::connect(&postgres.url("postgres"), 2)
        .await
        .unwrap();
    tailor::db::migrate(&pool).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('stagings', 'blobs', 'blob_locations')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 3);
    pool.close().await;

    assert!(process_alive(pid));
    drop(postgres);
    assert!(!process_alive(pid), "postgres {pid} still running");
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[tokio::test]
async fn registry_serves_the_v2_api_then_leaves_nothing_behind() {
    tailor::tls::install_crypto_provider();
    let registry = EmbeddedRegistry::start(RegistryOptions::default()).unwrap();
    let response = reqwest::get(format!("{}/v2/", registry.base_url()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let config = std::fs::read_to_string(registry.config_path()).unwrap();
    assert!(config.contains("delete:\n    enabled: true"), "{config}");

    let (dir, base_url) = (registry.dir().to_owned(), registry.base_url());
    drop(registry);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        reqwest::get(format!("{base_url}/v2/")).await.is_err(),
        "registry still answering"
    );
}

#[test]
fn directories_of_dead_owners_are_swept() {
    let live = WorkDir::new("sweep-test").unwrap();
    let orphan = tempfile::Builder::new()
        .prefix("tailor-embedded-sweep-orphan-")
        .tempdir()
        .unwrap()
        .keep();
    // pid_max is at most 2^22 on Linux, so this pid cannot exist.
    std::fs::write(orphan.join("owner.pid"), "99999999").unwrap();

    WorkDir::sweep_stale();
    assert!(!orphan.exists(), "orphan not swept");
    assert!(
        Path::new(live.path()).exists(),
        "a live owner's directory was swept"
    );
}
