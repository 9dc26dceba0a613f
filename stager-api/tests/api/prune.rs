//! The pruner against the real internal registry and Postgres: what it deletes, what it must
//! never delete, what the registry's garbage collection then frees, and pruning while
//! stagings run.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tailor::prune::{Action, PruneOptions, PruneOutcome, PruneReport};
use tailor::registry::Registries;
use testkit::image::{BuiltImage, ImageSpec, ManifestFormat};
use testkit::skopeo;
use uuid::Uuid;

use crate::helpers::{AppOptions, TestApp, spawn, spawn_app_with};

const LAYER: u64 = 256 * 1024;

/// The internal registry as the pruner reaches it.
fn internal(app: &TestApp) -> std::sync::Arc<tailor::registry::Registry> {
    let host = app.internal().host();
    Registries::unrestricted([host.clone()]).internal(&host, None)
}

pub(crate) async fn prune(app: &TestApp, dry_run: bool) -> PruneReport {
    tailor::prune::prune(
        &app.pool,
        &internal(app),
        &PruneOptions {
            grace: Duration::ZERO,
            dry_run,
        },
    )
    .await
    .expect("prune runs")
}

/// Pushes `image` upstream as `repo:tag`, stages it for `app_guid` and waits for success.
async fn staged(app: &TestApp, app_guid: Uuid, image: &BuiltImage, repo_tag: &str) -> Value {
    app.hub.push(repo_tag, image).await;
    let (status, body) = app
        .stage(json!({ "app_guid": app_guid, "image": format!("{}/{repo_tag}", app.hub.host()) }))
        .await;
    assert_eq!(status, 202, "{body}");
    let done = app
        .wait_finished(body["staging_guid"].as_str().unwrap())
        .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    done
}

pub(crate) async fn release(app: &TestApp, staging: &Value) {
    let guid = staging["staging_guid"].as_str().unwrap();
    let response = app.delete(&format!("/stage/{guid}")).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

fn pinned(staging: &Value) -> String {
    staging["result"]["pinned_image"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Whether the registry still has the staging's manifest, by digest.
pub(crate) async fn manifest_exists(app: &TestApp, staging: &Value) -> bool {
    let pinned = pinned(staging);
    let (name, digest) = pinned.split_once('@').unwrap();
    let repository = name.split_once('/').unwrap().1;
    let status = app
        .client
        .head(format!(
            "{}/v2/{repository}/manifests/{digest}",
            app.internal().base_url()
        ))
        // Every manifest type: registry 2.8 answers 404 for an OCI manifest asked for as a
        // Docker one, which would make "gone" pass vacuously.
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json, \
             application/vnd.oci.image.manifest.v1+json",
        )
        .send()
        .await
        .unwrap()
        .status();
    assert!(status == 200 || status == 404, "HEAD manifest: {status}");
    status == 200
}

/// A full pull with skopeo (every blob fetched and verified); by pinned digest and by tag.
fn pulls(staging: &Value) -> Result<(), String> {
    for reference in [
        pinned(staging),
        staging["result"]["tagged_image"]
            .as_str()
            .unwrap()
            .to_owned(),
    ] {
        let dir = tempfile::tempdir().unwrap();
        skopeo::copy_to_oci_layout(&reference, None, dir.path(), false)
            .map_err(|e| format!("{reference}: {e}"))?;
    }
    Ok(())
}

fn blob_storage_bytes(storage: &Path) -> u64 {
    fn walk(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| match e.metadata() {
                        Ok(m) if m.is_dir() => walk(&e.path()),
                        Ok(m) => m.len(),
                        Err(_) => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(&storage.join("docker/registry/v2/blobs"))
}

/// The registry's own mark-and-sweep. The registry is idle here, so it need not be stopped
/// (scripts/registry-gc, tested in specs, does the read-only dance for real deployments).
fn garbage_collect(app: &TestApp) {
    let output = std::process::Command::new("docker-registry")
        .arg("garbage-collect")
        .arg(app.internal().embedded().config_path())
        .output()
        .expect("docker-registry garbage-collect");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn decision<'a>(report: &'a PruneReport, staging: &Value) -> Option<&'a tailor::prune::Decision> {
    let guid: Uuid = staging["staging_guid"].as_str().unwrap().parse().unwrap();
    report.decisions.iter().find(|d| d.staging_guid == guid)
}

#[tokio::test]
async fn released_images_go_the_newest_stays_and_gc_frees_what_was_reported() {
    let app = spawn_app_with(2, testkit::TestRegistry::anonymous()).await;
    let app_guid = Uuid::new_v4();
    let mut stagings = Vec::new();
    for (n, seed) in [4100u64, 4200, 4300].into_iter().enumerate() {
        let image = ImageSpec::seeded(ManifestFormat::Docker, seed, 3, LAYER).build();
        stagings.push(staged(&app, app_guid, &image, &format!("web/app:v{n}")).await);
    }
    release(&app, &stagings[0]).await;
    release(&app, &stagings[1]).await;
    let storage = app.internal().embedded().storage_dir().to_owned();
    let before = blob_storage_bytes(&storage);

    let report = prune(&app, false).await;
    assert_eq!(report.outcome, PruneOutcome::Pruned, "{report:?}");
    assert_eq!((report.images_pruned, report.manifests_deleted), (2, 2));
    for old in &stagings[..2] {
        assert_eq!(decision(&report, old).unwrap().action, Action::Deleted);
        assert!(
            !manifest_exists(&app, old).await,
            "pruned manifest still served"
        );
        let body = app.staging(old["staging_guid"].as_str().unwrap()).await;
        assert!(body["pruned_at"].is_string(), "{body}");
    }
    assert!(
        decision(&report, &stagings[2]).is_none(),
        "the newest is not a candidate"
    );
    pulls(&stagings[2]).unwrap();
    let audited: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT staging_guid, reason, action FROM prune_audit WHERE run_id = $1 ORDER BY pruned_at",
    )
    .bind(report.run_id.unwrap())
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(audited.len(), 2);
    assert!(
        audited
            .iter()
            .all(|(_, reason, action)| reason == "released" && action == "deleted")
    );

    garbage_collect(&app);
    let freed = before - blob_storage_bytes(&storage);
    assert!(
        freed.abs_diff(report.bytes_reclaimable) <= 4096,
        "GC freed {freed} bytes, the pruner reported {}",
        report.bytes_reclaimable
    );
    assert!(report.bytes_reclaimable >= 2 * 3 * LAYER / 2, "{report:?}");
    pulls(&stagings[2]).unwrap();

    // Nothing left to do, and a second run says so.
    assert_eq!(prune(&app, false).await.outcome, PruneOutcome::NothingToDo);
}

#[tokio::test]
async fn pruning_a_deleted_app_never_breaks_another_app_sharing_its_base_layers() {
    let app = spawn_app_with(2, testkit::TestRegistry::anonymous()).await;
    let (one, two) = ImageSpec::sharing(ManifestFormat::Docker, 4400, 4, 3, LAYER);
    let (one, two) = (one.build(), two.build());
    let gone = staged(&app, Uuid::new_v4(), &one, "base/one:v1").await;
    let kept = staged(&app, Uuid::new_v4(), &two, "base/two:v1").await;
    let response = app
        .delete(&format!("/apps/{}", gone["app_guid"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["released"], 1, "{body}");

    let report = prune(&app, false).await;
    let decided = decision(&report, &gone).unwrap();
    assert_eq!(
        (decided.action, decided.reason),
        (Action::Deleted, tailor::prune::Reason::AppDeleted)
    );
    assert!(decision(&report, &kept).is_none());
    // Only what the other app does not use is reclaimable: its own layer, config, manifest.
    assert_eq!(
        report.bytes_reclaimable,
        one.layers[3].size + one.config.size + one.manifest.len() as u64,
        "{report:?}"
    );
    pulls(&kept).unwrap();
    garbage_collect(&app);
    pulls(&kept).unwrap();
    assert!(!manifest_exists(&app, &gone).await);
}

#[tokio::test]
async fn a_restage_with_the_released_digest_keeps_the_manifest_and_both_tags_pull() {
    let app = spawn_app_with(2, testkit::TestRegistry::anonymous()).await;
    let app_guid = Uuid::new_v4();
    let image = ImageSpec::seeded(ManifestFormat::Oci, 4500, 2, LAYER).build();
    let first = staged(&app, app_guid, &image, "same/app:v1").await;
    release(&app, &first).await;
    let again = staged(&app, app_guid, &image, "same/app:v1").await;
    assert_eq!(
        pinned(&first),
        pinned(&again),
        "same digest, same repository"
    );

    let report = prune(&app, false).await;
    assert_eq!(report.outcome, PruneOutcome::NothingToDo, "{report:?}");
    assert_eq!(
        decision(&report, &first).unwrap().action,
        Action::KeptShared
    );
    assert_eq!(report.bytes_reclaimable, 0);
    pulls(&again).unwrap();
    pulls(&first).unwrap();

    // Once the restage is released too and a newer one exists, the manifest goes.
    release(&app, &again).await;
    let newer = ImageSpec::seeded(ManifestFormat::Oci, 4501, 2, LAYER).build();
    let newest = staged(&app, app_guid, &newer, "same/app:v2").await;
    let report = prune(&app, false).await;
    assert_eq!(
        (report.images_pruned, report.manifests_deleted),
        (2, 1),
        "{report:?}"
    );
    assert!(!manifest_exists(&app, &again).await);
    pulls(&newest).unwrap();
}

/// Everything the pruner could change: the stagings' JSON, the run and audit tables, and
/// every file in the registry's storage.
async fn snapshot(app: &TestApp) -> (Vec<Value>, i64, i64, Vec<(String, u64)>) {
    let rows: Vec<(Value,)> =
        sqlx::query_as("SELECT to_jsonb(s) - 'updated_at' FROM stagings s ORDER BY staging_guid")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM prune_runs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let audit: i64 = sqlx::query_scalar("SELECT count(*) FROM prune_audit")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let mut files = Vec::new();
    let mut stack = vec![app.internal().embedded().storage_dir().to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                files.push((entry.path().display().to_string(), meta.len()));
            }
        }
    }
    files.sort();
    (rows.into_iter().map(|(v,)| v).collect(), runs, audit, files)
}

#[tokio::test]
async fn a_dry_run_reports_and_changes_nothing_in_the_registry_or_postgres() {
    let app = spawn_app_with(2, testkit::TestRegistry::anonymous()).await;
    let app_guid = Uuid::new_v4();
    let old = ImageSpec::seeded(ManifestFormat::Docker, 4600, 2, LAYER).build();
    let new = ImageSpec::seeded(ManifestFormat::Docker, 4601, 2, LAYER).build();
    let first = staged(&app, app_guid, &old, "dry/app:v1").await;
    staged(&app, app_guid, &new, "dry/app:v2").await;
    release(&app, &first).await;
    let before = snapshot(&app).await;

    let report = prune(&app, true).await;
    assert!(report.dry_run && report.run_id.is_none());
    assert_eq!(report.outcome, PruneOutcome::Pruned);
    assert_eq!(
        decision(&report, &first).unwrap().action,
        Action::WouldDelete
    );
    assert_eq!(
        report.bytes_reclaimable,
        old.blob_bytes() + old.manifest.len() as u64
    );
    assert_eq!(snapshot(&app).await, before);
    assert!(manifest_exists(&app, &first).await);

    // The real run then does what the dry run said.
    let real = prune(&app, false).await;
    assert_eq!(real.bytes_reclaimable, report.bytes_reclaimable);
    assert_eq!(decision(&real, &first).unwrap().action, Action::Deleted);
}

#[tokio::test]
async fn two_prune_runs_never_overlap() {
    let app = spawn_app_with(0, testkit::TestRegistry::anonymous()).await;
    let held = tailor::prune::locks::PruneLeases::try_start(&app.pool)
        .await
        .unwrap()
        .expect("the prune lease is free");
    let error = tailor::prune::prune(
        &app.pool,
        &internal(&app),
        &PruneOptions {
            grace: Duration::ZERO,
            dry_run: false,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), "PRUNE_ALREADY_RUNNING");
    held.finish().await;
    assert_eq!(prune(&app, false).await.outcome, PruneOutcome::NothingToDo);
}

#[tokio::test]
async fn the_grace_period_keeps_recently_released_images() {
    let app = spawn_app_with(2, testkit::TestRegistry::anonymous()).await;
    let app_guid = Uuid::new_v4();
    let first = staged(
        &app,
        app_guid,
        &ImageSpec::seeded(ManifestFormat::Docker, 4700, 1, LAYER).build(),
        "grace/app:v1",
    )
    .await;
    staged(
        &app,
        app_guid,
        &ImageSpec::seeded(ManifestFormat::Docker, 4701, 1, LAYER).build(),
        "grace/app:v2",
    )
    .await;
    release(&app, &first).await;
    let report = tailor::prune::prune(
        &app.pool,
        &internal(&app),
        &PruneOptions {
            grace: Duration::from_secs(3600),
            dry_run: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(report.outcome, PruneOutcome::NothingToDo, "{report:?}");
    assert!(manifest_exists(&app, &first).await);
}

#[tokio::test]
async fn a_repository_a_staging_is_copying_into_is_skipped_until_the_copy_is_done() {
    let app = spawn_app_with(2, testkit::TestRegistry::anonymous()).await;
    let app_guid = Uuid::new_v4();
    let old = ImageSpec::seeded(ManifestFormat::Docker, 4950, 1, LAYER).build();
    let new = ImageSpec::seeded(ManifestFormat::Docker, 4951, 1, LAYER).build();
    let first = staged(&app, app_guid, &old, "busy/one:v1").await;
    staged(&app, app_guid, &new, "busy/one:v2").await;
    release(&app, &first).await;

    // What a worker holds from the start of its copy to the commit of its result.
    let repository = tailor::staging::lease::repository(&format!("tailor/{app_guid}"));
    let copying =
        tailor::staging::lease::Leases::new(app.pool.clone(), "a-worker", Duration::from_secs(60));
    assert!(copying.acquire(&repository, false).await.unwrap());
    let report = prune(&app, false).await;
    assert_eq!(
        decision(&report, &first).unwrap().action,
        Action::SkippedBusy
    );
    assert_eq!(report.outcome, PruneOutcome::NothingToDo, "{report:?}");
    assert!(manifest_exists(&app, &first).await);

    copying.let_go(&repository).await.unwrap();
    let report = prune(&app, false).await;
    assert_eq!(decision(&report, &first).unwrap().action, Action::Deleted);
    assert!(!manifest_exists(&app, &first).await);
}

#[tokio::test]
async fn pruning_while_twenty_stagings_run_leaves_every_success_pullable() {
    let app = spawn_app_with(4, testkit::TestRegistry::anonymous()).await;
    // Four apps; in each, a released older staging pinned to digest D_i and a newer one on
    // E_i. Twenty restagings of D_i then run while the pruner runs in a loop: the released
    // staging is prunable and, until a restaging succeeds, nothing live shares D_i, which is
    // exactly when a careless pruner deletes the manifest a restaging has just tagged.
    let images: Vec<BuiltImage> = (0..8)
        .map(|i| ImageSpec::seeded(ManifestFormat::Docker, 4800 + i, 2, LAYER).build())
        .collect();
    let apps: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    for (i, app_guid) in apps.iter().enumerate() {
        let old = staged(&app, *app_guid, &images[i], &format!("busy/d{i}:v1")).await;
        staged(&app, *app_guid, &images[4 + i], &format!("busy/e{i}:v1")).await;
        release(&app, &old).await;
    }
    let posts = (0..20).map(|n| {
        let image_ref = format!("{}/busy/d{}:v1", app.hub.host(), n % 4);
        app.stage(json!({ "app_guid": apps[n % 4], "image": image_ref }))
    });
    let guids: Vec<String> = futures_util::future::join_all(posts)
        .await
        .into_iter()
        .map(|(status, body)| {
            assert_eq!(status, 202, "{body}");
            body["staging_guid"].as_str().unwrap().to_owned()
        })
        .collect();

    let mut finished = Vec::new();
    let mut actions = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while finished.len() < guids.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stagings still running after two minutes"
        );
        let report = prune(&app, false).await;
        assert!(report.errors.is_empty(), "{report:?}");
        actions.extend(report.decisions.iter().map(|d| d.action));
        finished.clear();
        for guid in &guids {
            let body = app.staging(guid).await;
            if matches!(
                body["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                finished.push(body);
            }
        }
    }
    let last = prune(&app, false).await;
    actions.extend(last.decisions.iter().map(|d| d.action));
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::Deleted | Action::KeptShared | Action::SkippedBusy
        )),
        "the pruner had prunable images to decide on: {actions:?}"
    );
    for staging in &finished {
        assert_eq!(staging["state"], "succeeded", "{staging}");
        pulls(staging).unwrap_or_else(|e| panic!("a live staging stopped pulling: {e}"));
    }
}

/// The race the repository lease closes: a restaging of a released image starts while the
/// pruner has committed its decision to delete that image's manifest and has not yet sent the
/// DELETE. Without the lease the restaging would tag the manifest and succeed, and the DELETE
/// would then take its tag with it. The pruner is held at exactly that point until the
/// staging has met it (it went back to the queue, waiting for maintenance), so the test
/// proves the window was hit; after the deletion the staging runs again and pulls.
#[tokio::test]
async fn a_restaging_started_between_the_pruners_decision_and_its_delete_still_pulls() {
    let app = spawn(AppOptions {
        workers: 2,
        repository_wait: Some(Duration::from_millis(300)),
        ..AppOptions::default()
    })
    .await;
    let app_guid = Uuid::new_v4();
    let old = ImageSpec::seeded(ManifestFormat::Docker, 4960, 1, LAYER).build();
    let new = ImageSpec::seeded(ManifestFormat::Docker, 4961, 1, LAYER).build();
    let first = staged(&app, app_guid, &old, "race/one:v1").await;
    staged(&app, app_guid, &new, "race/one:v2").await;
    release(&app, &first).await;

    let (decided_tx, decided_rx) = tokio::sync::oneshot::channel::<String>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Some((decided_tx, go_rx))));
    let hooks = tailor::prune::PruneHooks {
        before_delete: Some(std::sync::Arc::new(move |repository: String| {
            let held = held.lock().unwrap().take();
            Box::pin(async move {
                if let Some((decided, go)) = held {
                    decided.send(repository).unwrap();
                    let _ = go.await;
                }
            })
        })),
    };
    let (pool, internal) = (app.pool.clone(), internal(&app));
    let pruning = tokio::spawn(async move {
        tailor::prune::prune_with_hooks(
            &pool,
            &internal,
            &PruneOptions {
                grace: Duration::ZERO,
                dry_run: false,
            },
            &hooks,
        )
        .await
    });
    let repository = tokio::time::timeout(Duration::from_secs(60), decided_rx)
        .await
        .expect("the pruner reaches its deletions within a minute")
        .expect("the pruner decided");
    assert_eq!(repository, format!("tailor/{app_guid}"));
    assert!(
        manifest_exists(&app, &first).await,
        "held before the DELETE: the manifest is still there"
    );

    // In the window: the same image staged again for the same app.
    let (status, body) = app
        .stage(json!({ "app_guid": app_guid, "image": format!("{}/race/one:v1", app.hub.host()) }))
        .await;
    assert_eq!(status, 202, "{body}");
    let guid = body["staging_guid"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let staging = app.staging(&guid).await;
        if staging["waiting"]["reason"] == "maintenance" {
            break;
        }
        assert!(
            matches!(staging["state"].as_str(), Some("queued" | "running")),
            "the staging went ahead while the pruner held its repository: {staging}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the staging never met the pruner: {staging}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    go_tx.send(()).unwrap();
    let report = pruning.await.unwrap().expect("prune runs");
    assert_eq!(
        decision(&report, &first).unwrap().action,
        Action::Deleted,
        "{report:?}"
    );
    let done = app.wait_finished(&guid).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        pinned(&done),
        pinned(&first),
        "the same image, staged again"
    );
    pulls(&done).unwrap_or_else(|e| panic!("the restaging does not pull: {e}"));
}

#[tokio::test]
async fn a_deletion_that_fails_leaves_the_image_unpruned_and_a_later_run_prunes_it() {
    let app = spawn_app_with(2, testkit::TestRegistry::anonymous()).await;
    let app_guid = Uuid::new_v4();
    let old = ImageSpec::seeded(ManifestFormat::Docker, 4700, 2, LAYER).build();
    let new = ImageSpec::seeded(ManifestFormat::Docker, 4800, 2, LAYER).build();
    let released = staged(&app, app_guid, &old, "failing/app:v1").await;
    staged(&app, app_guid, &new, "failing/app:v2").await;
    release(&app, &released).await;
    let guid = released["staging_guid"].as_str().unwrap();

    // Between its decision and its DELETE the pruner loses the repository's lease, so it may
    // not delete (a staging may have started there): the decision is undone.
    let pool = app.pool.clone();
    let hooks = tailor::prune::PruneHooks {
        before_delete: Some(std::sync::Arc::new(move |repository: String| {
            let pool = pool.clone();
            Box::pin(async move {
                sqlx::query("DELETE FROM leases WHERE resource = $1")
                    .bind(tailor::staging::lease::repository(&repository))
                    .execute(&pool)
                    .await
                    .unwrap();
            })
        })),
    };
    let options = PruneOptions {
        grace: Duration::ZERO,
        dry_run: false,
    };
    let failed = tailor::prune::prune_with_hooks(&app.pool, &internal(&app), &options, &hooks)
        .await
        .expect("prune runs");
    assert_eq!(failed.outcome, PruneOutcome::Error, "{failed:?}");
    assert_eq!(decision(&failed, &released).unwrap().action, Action::Failed);
    let body = app.staging(guid).await;
    assert!(body["pruned_at"].is_null(), "marked pruned: {body}");
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM prune_audit WHERE run_id = $1")
        .bind(failed.run_id.unwrap())
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(audited, 0, "the failed deletion's audit rows stay");
    assert!(manifest_exists(&app, &released).await);

    let pruned = prune(&app, false).await;
    assert_eq!(
        decision(&pruned, &released).unwrap().action,
        Action::Deleted
    );
    assert!(app.staging(guid).await["pruned_at"].is_string());
    assert!(!manifest_exists(&app, &released).await);
}
