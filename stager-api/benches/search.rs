//! Search at scale: `cargo bench -p stager-api --bench search`.
//!
//! Fills a database of its own with 100 000 succeeded stagings of 10 000 apps (sources spread
//! over 1 000 repositories and their tags, each with two labels), starts the real `stager-api`
//! on it, and times `GET /images?q=` over HTTP for queries that find one image, a few, and
//! thousands (a page of 20), a digest prefix, an app GUID, a label value, a query that finds
//! nothing, and a page deep in a large result by its cursor: the median and the slowest of 50
//! requests each.

use std::time::{Duration, Instant};

use specs::{Service, TOKEN, stager_api};
use testkit::bench::median;
use testkit::{TestDatabase, TestRegistry};

const ROWS: i64 = 100_000;
const REQUESTS: usize = 50;

#[tokio::main]
async fn main() {
    testkit::init();
    let db = TestDatabase::private().await;
    let pool = tailor::db::connect(&db.url, 2).await.unwrap();
    let started = Instant::now();
    // App i % 10 000; repository r = i % 1 000 (team-<r % 50>/service-<r>), tag v<i % 97>;
    // labels: team and a build number. Digests are sha256 of the row number, all different.
    sqlx::query(
        "INSERT INTO stagings (staging_guid, app_guid, source_image, platform, request_fingerprint, \
         state, pinned_image, tagged_image, source_digest, started_at, finished_at, image_labels, \
         created_at) \
         SELECT gen_random_uuid(), \
                ('00000000-0000-4000-8000-' || lpad(to_hex(i % 10000), 12, '0'))::uuid, \
                'registry.example.com/team-' || (i % 1000) % 50 || '/service-' || i % 1000 || ':v' || i % 97, \
                'linux/amd64', '\\x00', 'succeeded', \
                'r/tailor/x@sha256:' || encode(sha256(i::text::bytea), 'hex'), \
                'r/tailor/x:' || i, \
                'sha256:' || encode(sha256(i::text::bytea), 'hex'), \
                now(), now(), \
                jsonb_build_object('team', 'team-' || (i % 1000) % 50, 'build', 'build-' || i), \
                now() - i * interval '1 second' \
         FROM generate_series(1, $1) AS i",
    )
    .bind(ROWS)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();
    eprintln!("{ROWS} stagings written in {:?}", started.elapsed());
    let digest_prefix: String =
        sqlx::query_scalar("SELECT substr(encode(sha256('4242'::bytea), 'hex'), 1, 12)")
            .fetch_one(&pool)
            .await
            .unwrap();

    let internal = TestRegistry::anonymous();
    let api = Service::start_quiet({
        let mut command = stager_api(
            &db.url,
            &internal.host(),
            &[internal.host()],
            &[("STAGER_WORKERS", "0"), ("RUST_LOG", "warn")],
        );
        command.stderr(std::process::Stdio::null());
        command
    });
    let client = reqwest::Client::new();
    let get = |query: String| {
        let client = client.clone();
        let url = format!("{}/images?{query}", api.base_url);
        async move {
            let started = Instant::now();
            let page: serde_json::Value = client
                .get(&url)
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (started.elapsed(), page)
        }
    };
    // A cursor 50 pages deep into "team-7" (2 000 images).
    let mut cursor = String::new();
    for _ in 0..50 {
        let (_, page) = get(format!("q=team-7&limit=20{cursor}")).await;
        cursor = format!("&cursor={}", page["next_cursor"].as_str().unwrap());
    }
    let cases: Vec<(&str, String)> = vec![
        ("one image (repository and tag)", "q=service-421:v33".into()),
        (
            "a repository (100 images), first page",
            "q=service-421".into(),
        ),
        (
            "a label value (2 000 images), first page",
            "q=team-7".into(),
        ),
        (
            "everything (100 000 images), first page",
            "q=registry".into(),
        ),
        (
            "a digest prefix (12 hex digits)",
            format!("q=sha256:{digest_prefix}"),
        ),
        (
            "an app GUID (10 images)",
            "q=00000000-0000-4000-8000-000000000abc".into(),
        ),
        ("a word nothing has", "q=postgres".into()),
        (
            "page 51 of a label value, by cursor",
            format!("q=team-7&limit=20{cursor}"),
        ),
    ];
    println!(
        "| `GET /images?q=` ({ROWS} stagings, {REQUESTS} requests each) | found (page) | median | slowest |"
    );
    println!("|---|---|---|---|");
    for (label, query) in cases {
        let mut times: Vec<Duration> = Vec::new();
        let mut found = 0;
        for _ in 0..REQUESTS {
            let (elapsed, page) = get(query.clone()).await;
            found = page["images"].as_array().map_or(0, Vec::len);
            times.push(elapsed);
        }
        let slowest = *times.iter().max().unwrap();
        println!(
            "| {label} | {found} | {:.2} ms | {:.2} ms |",
            median(times).as_secs_f64() * 1000.0,
            slowest.as_secs_f64() * 1000.0
        );
    }
}
