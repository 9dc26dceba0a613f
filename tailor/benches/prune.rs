//! The pruner benchmark: `cargo bench -p tailor --bench prune`.
//!
//! On an ephemeral PostgreSQL and a loopback registry, it measures:
//! - deleting 200 released images: one `tailor prune` process against `skopeo delete` of the
//!   same manifests one process each (what a script-based pruner does), same registry;
//! - a dry run (planning and reclaimable bytes) over 20 000 stagings of 2 000 apps, 18 000 of
//!   them prunable;
//! - a reference sync (`PUT /references`' work) listing 100 000 staging GUIDs.

use std::time::{Duration, Instant};

use tailor::prune::{PruneOptions, prune};
use tailor::registry::Registries;
use testkit::image::{BuiltImage, ImageSpec, ManifestFormat};
use testkit::{TestDatabase, TestRegistry};
use uuid::Uuid;

const IMAGES: usize = 200;
const APPS: usize = 2_000;
const STAGINGS_PER_APP: usize = 10;
const LISTED: usize = 100_000;

/// One image per app in `tailor/<app>`, recorded as a released, succeeded staging of a deleted
/// app: everything the pruner needs to delete it.
async fn seed_released(
    pool: &sqlx::PgPool,
    registry: &TestRegistry,
    images: &[BuiltImage],
) -> Vec<(String, String)> {
    let mut pinned = Vec::new();
    for image in images {
        let (app, staging) = (Uuid::new_v4(), Uuid::new_v4());
        let repository = format!("tailor/{app}");
        registry
            .push(&format!("{repository}:{staging}"), image)
            .await;
        let reference = format!("{}/{repository}@{}", registry.host(), image.digest);
        insert_staging(pool, staging, app, &reference).await;
        pinned.push((repository, image.digest.clone()));
    }
    sqlx::query(
        "INSERT INTO deleted_apps SELECT DISTINCT app_guid FROM stagings ON CONFLICT DO NOTHING",
    )
    .execute(pool)
    .await
    .unwrap();
    pinned
}

async fn insert_staging(pool: &sqlx::PgPool, staging: Uuid, app: Uuid, pinned: &str) {
    sqlx::query(
        "INSERT INTO stagings (staging_guid, app_guid, source_image, platform, request_fingerprint, \
         state, pinned_image, tagged_image, source_digest, started_at, finished_at, released_at) \
         VALUES ($1, $2, 'docker.io/library/bench:1', 'linux/amd64', '\\x00', 'succeeded', $3, $3, \
         split_part($3, '@', 2), now() - interval '3 days', now() - interval '3 days', now() - interval '2 days')",
    )
    .bind(staging)
    .bind(app)
    .bind(pinned)
    .execute(pool)
    .await
    .unwrap();
}

fn skopeo_delete(host: &str, repository: &str, digest: &str) {
    let status = testkit::skopeo::skopeo()
        .args(["delete", "--tls-verify=false"])
        .arg(format!("docker://{host}/{repository}@{digest}"))
        .status()
        .expect("skopeo");
    assert!(status.success(), "skopeo delete {repository}@{digest}");
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    testkit::init();
    let registry = TestRegistry::anonymous();
    let internal = Registries::unrestricted([registry.host()]).internal(&registry.host(), None);
    let options = PruneOptions {
        grace: Duration::from_secs(3600),
        dry_run: false,
    };
    let images: Vec<BuiltImage> = (0..IMAGES as u64)
        .map(|i| ImageSpec::seeded(ManifestFormat::Docker, 90_000 + i, 1, 4096).build())
        .collect();

    // 1. Deleting released images: one `tailor prune` process against skopeo, one process per
    //    manifest (what a script-based pruner runs), start-up included on both sides.
    let db = TestDatabase::new().await;
    let pool = db.pool().await;
    seed_released(&pool, &registry, &images).await;
    let started = Instant::now();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tailor"))
        .args(["prune", "--grace", "1h", "--json"])
        .env("DATABASE_URL", &db.url)
        .env("TAILOR_INTERNAL_REGISTRY", registry.host())
        .env("TAILOR_INSECURE_REGISTRIES", registry.host())
        .output()
        .expect("run tailor prune");
    let tailor_delete = started.elapsed();
    assert!(
        output.status.success(),
        "tailor prune: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("--json");
    assert_eq!(report["outcome"], "pruned", "{report}");
    assert_eq!(report["manifests_deleted"], IMAGES, "{report}");

    let peer_db = TestDatabase::new().await;
    let peer_pool = peer_db.pool().await;
    let pinned = seed_released(&peer_pool, &registry, &images).await;
    let started = Instant::now();
    for (repository, digest) in &pinned {
        skopeo_delete(&registry.host(), repository, digest);
    }
    let skopeo_delete_time = started.elapsed();

    // 2. Planning over a large ledger (no registry traffic in a dry run).
    let big = TestDatabase::new().await;
    let big_pool = big.pool().await;
    let (mut guids, mut apps, mut pinned_refs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..APPS {
        let app = Uuid::new_v4();
        for n in 0..STAGINGS_PER_APP {
            guids.push(Uuid::new_v4());
            apps.push(app);
            pinned_refs.push(format!(
                "{}/tailor/{app}@sha256:{:064x}",
                registry.host(),
                guids.len() * 31 + n
            ));
        }
    }
    sqlx::query(
        "INSERT INTO stagings (staging_guid, app_guid, source_image, platform, request_fingerprint, \
         state, pinned_image, tagged_image, source_digest, started_at, finished_at, released_at) \
         SELECT g, a, 'docker.io/library/bench:1', 'linux/amd64', '\\x00', 'succeeded', p, p, \
         split_part(p, '@', 2), now() - interval '3 days', now() - interval '3 days' + n * interval '1 second', \
         CASE WHEN n < 9 THEN now() - interval '2 days' END \
         FROM unnest($1::uuid[], $2::uuid[], $3::text[]) WITH ORDINALITY AS u(g, a, p, i), \
         LATERAL (SELECT (i - 1) % 10 AS n) AS o",
    )
    .bind(&guids)
    .bind(&apps)
    .bind(&pinned_refs)
    .execute(&big_pool)
    .await
    .unwrap();
    // Each staging: its manifest plus a base layer shared by every app.
    sqlx::query(
        "INSERT INTO staging_objects (staging_guid, digest, size) \
         SELECT staging_guid, split_part(pinned_image, '@', 2), 1000 FROM stagings \
         UNION ALL SELECT staging_guid, 'sha256:' || repeat('b', 64), 30000000 FROM stagings",
    )
    .execute(&big_pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(&big_pool).await.unwrap();
    let started = Instant::now();
    let plan = prune(
        &big_pool,
        &internal,
        &PruneOptions {
            dry_run: true,
            ..options.clone()
        },
    )
    .await
    .unwrap();
    let plan_time = started.elapsed();
    assert_eq!(plan.images_pruned, APPS * (STAGINGS_PER_APP - 1));

    // 3. A reference sync as large as a big foundation's droplet list.
    let mut listed = guids.clone();
    listed.extend((0..LISTED - guids.len()).map(|_| Uuid::new_v4()));
    let started = Instant::now();
    let synced = tailor::staging::references::sync(&big_pool, &listed, false)
        .await
        .unwrap();
    let sync_time = started.elapsed();
    assert_eq!(synced.listed as usize, guids.len());

    println!("\n## Pruner benchmark\n");
    println!("| measurement | tailor | skopeo | tailor / skopeo |");
    println!("|---|---|---|---|");
    println!(
        "| delete {IMAGES} released images (one manifest each) | {} | {} | {:.2}x |",
        ms(tailor_delete),
        ms(skopeo_delete_time),
        tailor_delete.as_secs_f64() / skopeo_delete_time.as_secs_f64()
    );
    println!(
        "| dry run over {} stagings of {APPS} apps ({} prunable) | {} | n/a | |",
        guids.len(),
        plan.images_pruned,
        ms(plan_time)
    );
    println!(
        "| reference sync listing {LISTED} GUIDs | {} | n/a | |",
        ms(sync_time)
    );
}
