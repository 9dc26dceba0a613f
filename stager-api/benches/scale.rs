//! The scale-out benchmark: `cargo bench -p stager-api --bench scale`.
//!
//! One `stager-api` and 1, 2, 4 and 8 `tailor work` processes (default settings: 4 workers
//! and 4 pooled connections each) on a PostgreSQL server of their own at its default
//! `max_connections`, staging 200 times out of 40 images that share two base layers. Reports,
//! per fleet size, throughput (stagings per minute, from the first POST to the last success),
//! the peak number of client connections the server had, and any log line saying a process
//! ran out of connections.

use testkit::image::BuiltImage;

const KIB: u64 = 1024;

#[tokio::main]
async fn main() {
    testkit::init();
    let images: Vec<BuiltImage> = tokio::task::spawn_blocking(|| {
        specs::scale::images_sharing_a_base(40, 2048 * KIB, 512 * KIB)
    })
    .await
    .unwrap();
    println!(
        "| worker processes | workers | stagings | succeeded | time | stagings/min | peak connections | out-of-connection lines |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for processes in [1, 2, 4, 8] {
        let run = specs::scale::run(processes, &images, 200).await;
        println!(
            "| {processes} | {} | {} | {} | {:.1} s | {:.0} | {} | {} |",
            processes * 4,
            run.stagings,
            run.succeeded,
            run.elapsed.as_secs_f64(),
            run.stagings_per_minute(),
            run.peak_connections,
            run.exhaustion.len()
        );
    }
}
