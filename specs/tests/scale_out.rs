//! Scale-out: tailor grows by adding processes on one PostgreSQL at its default
//! `max_connections` (100), with no process running out of connections.

use testkit::image::BuiltImage;

const KIB: u64 = 1024;

#[tokio::test]
async fn one_stager_and_eight_worker_processes_stage_200_images_on_a_default_postgres() {
    let images: Vec<BuiltImage> = tokio::task::spawn_blocking(|| {
        specs::scale::images_sharing_a_base(40, 512 * KIB, 128 * KIB)
    })
    .await
    .unwrap();
    let run = specs::scale::run(8, &images, 200).await;
    eprintln!(
        "{} stagings by 8 worker processes in {:?} ({:.0}/min), peak {} server connections",
        run.succeeded,
        run.elapsed,
        run.stagings_per_minute(),
        run.peak_connections
    );
    assert_eq!(run.succeeded, 200, "failures: {:#?}", run.failures);
    assert!(
        run.exhaustion.is_empty(),
        "processes ran out of database connections: {:#?}",
        run.exhaustion
    );
    // The budget: stager-api's pool (8), each worker process's pool (4, its LISTEN connection
    // included), the watch's own connection; whatever the workers and transfers in flight.
    let budget = 8 + 8 * 4 + 1;
    assert!(
        run.peak_connections <= budget,
        "{} connections at peak, over the budget of {budget}",
        run.peak_connections
    );
}
