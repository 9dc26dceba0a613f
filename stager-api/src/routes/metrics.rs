//! `/metrics` in the Prometheus text format.

use std::fmt::Write;

use actix_web::{HttpResponse, web};
use tailor::staging::StagingState;
use tailor::staging::store::metrics_snapshot;

use crate::auth::Authenticated;
use crate::error::ApiError;
use crate::startup::AppState;

const STATES: [StagingState; 5] = [
    StagingState::Queued,
    StagingState::Running,
    StagingState::Succeeded,
    StagingState::Failed,
    StagingState::Cancelled,
];

pub async fn serve(_: Authenticated, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let snapshot = metrics_snapshot(&state.db)
        .await
        .map_err(|e| crate::error::database_error(&e))?;
    let mut out = String::new();
    let count = |s: StagingState| {
        snapshot
            .by_state
            .iter()
            .find(|(k, _)| *k == s)
            .map_or(0, |(_, n)| *n)
    };
    out.push_str("# HELP tailor_stagings Stagings by state.\n# TYPE tailor_stagings gauge\n");
    for s in STATES {
        let _ = writeln!(
            out,
            "tailor_stagings{{state=\"{}\"}} {}",
            s.as_str(),
            count(s)
        );
    }
    out.push_str("# HELP tailor_queue_depth Stagings waiting for a worker.\n# TYPE tailor_queue_depth gauge\n");
    let _ = writeln!(out, "tailor_queue_depth {}", count(StagingState::Queued));
    out.push_str("# HELP tailor_blob_bytes_total Blob bytes of successful stagings by how they reached the internal registry.\n# TYPE tailor_blob_bytes_total counter\n");
    for (kind, bytes) in [
        ("copied", snapshot.bytes_copied),
        ("mounted", snapshot.bytes_mounted),
        ("skipped", snapshot.bytes_skipped),
    ] {
        let _ = writeln!(out, "tailor_blob_bytes_total{{kind=\"{kind}\"}} {bytes}");
    }
    out.push_str("# HELP tailor_copy_duration_seconds Time from claim to success of successful stagings.\n# TYPE tailor_copy_duration_seconds histogram\n");
    for (bound, n) in &snapshot.duration_buckets {
        let _ = writeln!(
            out,
            "tailor_copy_duration_seconds_bucket{{le=\"{bound}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "tailor_copy_duration_seconds_bucket{{le=\"+Inf\"}} {}",
        snapshot.duration_count
    );
    let _ = writeln!(
        out,
        "tailor_copy_duration_seconds_sum {}",
        snapshot.duration_sum_seconds
    );
    let _ = writeln!(
        out,
        "tailor_copy_duration_seconds_count {}",
        snapshot.duration_count
    );
    out.push_str("# HELP tailor_callbacks_pending Completion callbacks not yet delivered.\n# TYPE tailor_callbacks_pending gauge\n");
    let _ = writeln!(
        out,
        "tailor_callbacks_pending {}",
        snapshot.callbacks_pending
    );
    let prune = tailor::prune::metrics(&state.db)
        .await
        .map_err(|e| crate::error::database_error(&e))?;
    out.push_str("# HELP tailor_prune_images_pruned_total Staged images the pruner removed from the internal registry.\n# TYPE tailor_prune_images_pruned_total counter\n");
    let _ = writeln!(
        out,
        "tailor_prune_images_pruned_total {}",
        prune.images_pruned_total
    );
    out.push_str("# HELP tailor_prune_manifests_deleted_total Manifest deletions the pruner sent to the internal registry.\n# TYPE tailor_prune_manifests_deleted_total counter\n");
    let _ = writeln!(
        out,
        "tailor_prune_manifests_deleted_total {}",
        prune.manifests_deleted_total
    );
    out.push_str("# HELP tailor_prune_bytes_reclaimable Bytes the last prune run left for the registry's garbage collection.\n# TYPE tailor_prune_bytes_reclaimable gauge\n");
    let _ = writeln!(
        out,
        "tailor_prune_bytes_reclaimable {}",
        prune.bytes_reclaimable
    );
    if let Some((finished, outcome)) = &prune.last_run {
        out.push_str("# HELP tailor_prune_last_run_timestamp_seconds When the last prune run finished.\n# TYPE tailor_prune_last_run_timestamp_seconds gauge\n");
        let _ = writeln!(out, "tailor_prune_last_run_timestamp_seconds {finished}");
        out.push_str("# HELP tailor_prune_last_run_outcome The last prune run's outcome (1 for the one it had).\n# TYPE tailor_prune_last_run_outcome gauge\n");
        for candidate in ["pruned", "nothing_to_do", "error"] {
            let _ = writeln!(
                out,
                "tailor_prune_last_run_outcome{{outcome=\"{candidate}\"}} {}",
                u8::from(candidate == outcome)
            );
        }
    }
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(out))
}
