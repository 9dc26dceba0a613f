//! `/metrics` at scale: `cargo bench -p stager-api --bench metrics`.
//!
//! Fills a database of its own with 1 000 000 staging rows (in every state, a third of them
//! succeeded with byte counts and durations), starts the real `stager-api` on it, and times
//! `GET /metrics` (20 scrapes, after one to fold the counters). For contrast it also times the
//! queries a scrape used to run: a `GROUP BY state` and the sums and histogram over every
//! succeeded staging.

use std::time::Instant;

use specs::{Service, TOKEN, stager_api};
use testkit::bench::median;
use testkit::{TestDatabase, TestRegistry};

const ROWS: i64 = 1_000_000;

#[tokio::main]
async fn main() {
    testkit::init();
    let db = TestDatabase::private().await;
    let pool = tailor::db::connect(&db.url, 2).await.unwrap();
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO stagings (staging_guid, app_guid, source_image, platform, request_fingerprint, \
         state, pinned_image, tagged_image, source_digest, started_at, finished_at, \
         bytes_copied, bytes_mounted, bytes_skipped, error_code) \
         SELECT gen_random_uuid(), gen_random_uuid(), 'docker.io/library/bench:1', 'linux/amd64', '\\x00', \
                s.state, \
                CASE WHEN s.state = 'succeeded' THEN 'r/tailor/x@sha256:' || repeat('a', 64) END, \
                CASE WHEN s.state = 'succeeded' THEN 'r/tailor/x:' || i END, \
                CASE WHEN s.state = 'succeeded' THEN 'sha256:' || repeat('a', 64) END, \
                CASE WHEN s.state <> 'queued' THEN now() - interval '1 hour' END, \
                CASE WHEN s.state IN ('succeeded', 'failed', 'cancelled') THEN now() - interval '1 hour' + (i % 90) * interval '1 second' END, \
                i % 1000000, i % 7000, i % 300, \
                CASE WHEN s.state IN ('failed', 'cancelled') THEN 'TIMEOUT' END \
         FROM generate_series(1, $1) AS i, \
              LATERAL (SELECT (CASE WHEN i % 3 = 0 THEN 'succeeded' WHEN i % 3 = 1 THEN 'failed' ELSE 'cancelled' END)::staging_state AS state) AS s",
    )
    .bind(ROWS)
    .execute(&pool)
    .await
    .unwrap();
    // Successes are recorded by the worker that finishes them; the bulk insert does it here.
    sqlx::query(
        "INSERT INTO staging_success_deltas (bytes_copied, bytes_mounted, bytes_skipped, seconds) \
         SELECT bytes_copied, bytes_mounted, bytes_skipped, extract(epoch FROM finished_at - started_at) \
         FROM stagings WHERE state = 'succeeded'",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();
    eprintln!("{ROWS} stagings written in {:?}", started.elapsed());

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
    let scrape = || async {
        let started = Instant::now();
        let body = client
            .get(format!("{}/metrics", api.base_url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            body.contains("tailor_stagings{state=\"succeeded\"} 333333"),
            "{body}"
        );
        started.elapsed()
    };
    let first = scrape().await;
    let mut times = Vec::new();
    for _ in 0..20 {
        times.push(scrape().await);
    }
    let scans = {
        let mut times = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            sqlx::query("SELECT state, count(*) FROM stagings GROUP BY state")
                .fetch_all(&pool)
                .await
                .unwrap();
            sqlx::query(
                "SELECT sum(bytes_copied), sum(bytes_mounted), sum(bytes_skipped), count(*), \
                 count(*) FILTER (WHERE extract(epoch FROM finished_at - started_at) <= 10) \
                 FROM stagings WHERE state = 'succeeded'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            times.push(started.elapsed());
        }
        median(times)
    };
    println!("| measurement ({ROWS} stagings) | result |");
    println!("|---|---|");
    println!(
        "| first scrape (folds {} deltas) | {:.1} ms |",
        ROWS / 3,
        first.as_secs_f64() * 1000.0
    );
    println!(
        "| scrape, median of 20 | {:.2} ms |",
        median(times).as_secs_f64() * 1000.0
    );
    println!(
        "| the old scan (GROUP BY state + sums over successes), median of 5 | {:.1} ms |",
        scans.as_secs_f64() * 1000.0
    );
}
