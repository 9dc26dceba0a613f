//! `/metrics` in the Prometheus text format, every figure read from PostgreSQL at scrape time
//! (why this is not `prometheus-client`: docs/ARCHITECTURE.md, "Our own code where a crate
//! exists").

use std::fmt::Write;

use actix_web::{HttpResponse, web};
use tailor::staging::metrics::snapshot;
use tailor::staging::{StagingState, Waiting};

use crate::auth::Authenticated;
use crate::error::ApiError;
use crate::state::AppState;

const STATES: [StagingState; 5] = [
    StagingState::Queued,
    StagingState::Running,
    StagingState::Succeeded,
    StagingState::Failed,
    StagingState::Cancelled,
];

/// Writes one metric family's `# HELP`/`# TYPE` header and its samples (`labels` may be empty).
fn family<V: std::fmt::Display>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (String, V)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

fn label(name: &str, value: impl std::fmt::Display) -> String {
    format!("{{{name}=\"{value}\"}}")
}

/// A label value as the exposition format wants it (registry names are hosts, but say so).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn serve(_: Authenticated, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let snapshot = snapshot(&state.db)
        .await
        .map_err(|e| crate::error::database_error(&e))?;
    let prune = tailor::prune::metrics(&state.db)
        .await
        .map_err(|e| crate::error::database_error(&e))?;
    let count = |s: StagingState| {
        snapshot
            .by_state
            .iter()
            .find(|(k, _)| *k == s)
            .map_or(0, |(_, n)| *n)
    };
    let mut out = String::new();
    let out = &mut out;
    family(
        out,
        "tailor_stagings",
        "gauge",
        "Stagings by state.",
        STATES.map(|s| (label("state", s.as_str()), count(s))),
    );
    family(
        out,
        "tailor_queue_depth",
        "gauge",
        "Stagings waiting for a worker.",
        [(String::new(), count(StagingState::Queued))],
    );
    family(
        out,
        "tailor_blob_bytes_total",
        "counter",
        "Blob bytes of successful stagings by how they reached the internal registry.",
        [
            ("copied", snapshot.bytes_copied),
            ("mounted", snapshot.bytes_mounted),
            ("skipped", snapshot.bytes_skipped),
        ]
        .map(|(kind, bytes)| (label("kind", kind), bytes)),
    );
    family(
        out,
        "tailor_copy_duration_seconds",
        "histogram",
        "Time from claim to success of successful stagings.",
        Vec::<(String, f64)>::new(),
    );
    let buckets = snapshot
        .duration_buckets
        .iter()
        .map(|(bound, n)| (bound.to_string(), *n))
        .chain([("+Inf".to_owned(), snapshot.duration_count)]);
    for (bound, n) in buckets {
        let _ = writeln!(
            out,
            "tailor_copy_duration_seconds_bucket{} {n}",
            label("le", bound)
        );
    }
    let _ = writeln!(
        out,
        "tailor_copy_duration_seconds_sum {}\ntailor_copy_duration_seconds_count {}",
        snapshot.duration_sum_seconds, snapshot.duration_count
    );
    family(
        out,
        "tailor_queue_oldest_seconds",
        "gauge",
        "Age of the oldest queued staging (0 when none is queued).",
        [(String::new(), snapshot.queue_oldest_seconds)],
    );
    family(
        out,
        "tailor_stagings_failed_total",
        "counter",
        "Failed stagings by error code.",
        snapshot
            .failed_by_code
            .iter()
            .map(|(code, n)| (label("code", escape(code)), *n)),
    );
    family(
        out,
        "tailor_stagings_waiting",
        "gauge",
        "Queued stagings by what they wait for (retry: backing off; rate_limit: their registry's budget; maintenance: the internal registry or the pruner).",
        Waiting::ALL.map(|reason| {
            let n = snapshot
                .waiting
                .iter()
                .find(|(r, _)| *r == reason)
                .map_or(0, |(_, n)| *n);
            (label("reason", reason.as_str()), n)
        }),
    );
    family(
        out,
        "tailor_registry_rate_limited_seconds",
        "gauge",
        "Upstream registries the fleet leaves alone now (a 429), and for how many more seconds.",
        snapshot
            .rate_limited
            .iter()
            .map(|(registry, seconds)| (label("registry", escape(registry)), *seconds)),
    );
    family(
        out,
        "tailor_registry_rate_limited_total",
        "counter",
        "429 answers met per upstream registry.",
        snapshot
            .rate_limited_total
            .iter()
            .map(|(registry, n)| (label("registry", escape(registry)), *n)),
    );
    family(
        out,
        "tailor_callbacks_pending",
        "gauge",
        "Completion callbacks not yet delivered.",
        [(String::new(), snapshot.callbacks_pending)],
    );
    family(
        out,
        "tailor_callbacks_oldest_pending_seconds",
        "gauge",
        "Age of the oldest completion callback not yet delivered (0 when none is pending).",
        [(String::new(), snapshot.callback_oldest_pending_seconds)],
    );
    family(
        out,
        "tailor_prune_images_pruned_total",
        "counter",
        "Staged images the pruner removed from the internal registry.",
        [(String::new(), prune.images_pruned_total)],
    );
    family(
        out,
        "tailor_prune_manifests_deleted_total",
        "counter",
        "Manifest deletions the pruner sent to the internal registry.",
        [(String::new(), prune.manifests_deleted_total)],
    );
    family(
        out,
        "tailor_prune_bytes_reclaimable",
        "gauge",
        "Bytes the last prune run left for the registry's garbage collection.",
        [(String::new(), prune.bytes_reclaimable)],
    );
    if let Some((finished, outcome)) = &prune.last_run {
        family(
            out,
            "tailor_prune_last_run_timestamp_seconds",
            "gauge",
            "When the last prune run finished.",
            [(String::new(), finished)],
        );
        family(
            out,
            "tailor_prune_last_run_outcome",
            "gauge",
            "The last prune run's outcome (1 for the one it had).",
            ["pruned", "nothing_to_do", "error"]
                .map(|o| (label("outcome", o), u8::from(o == outcome))),
        );
    }
    family(
        out,
        "tailor_api_undocumented_answers_total",
        "counter",
        "Error answers of this process whose code specs/openapi.yaml does not document for the operation.",
        [(String::new(), crate::contract::undocumented_answers())],
    );
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(std::mem::take(out)))
}
