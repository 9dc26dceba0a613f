//! `tailor prune`: one pruning run for cron. A table (or `--json`) of what was, or with
//! `--dry-run` would be, deleted per app, and the exit status says which of "pruned",
//! "nothing to do" and "error" happened. With `--schedule`, a long-running process that prunes
//! on a cron schedule (how the BOSH job runs it, supervised like any other process).

use std::sync::Arc;

use clap::Args;
use tailor::code::Code;
use tailor::config::{ConfigError, Secret, TailorSettings};
use tailor::prune::{PruneOptions, PruneOutcome, PruneReport};
use tailor::registry::Registry;

/// Exit status: images were (or, dry, would be) pruned.
pub const EXIT_PRUNED: i32 = 0;
/// Exit status: something failed; what could be done was done.
pub const EXIT_ERROR: i32 = 1;
/// Exit status: nothing was prunable.
pub const EXIT_NOTHING_TO_DO: i32 = 3;

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Decide and report; delete nothing and write nothing.
    #[arg(long, env = "TAILOR_PRUNE_DRY_RUN")]
    pub dry_run: bool,
    /// How long an image is kept after it was released or left unreferenced: 90s, 30m, 24h, 7d.
    #[arg(long, env = "TAILOR_PRUNE_GRACE", default_value = "24h", value_parser = tailor::prune::duration::parse_duration)]
    pub grace: std::time::Duration,
    /// Print one JSON object (the report, or {"error": {code, message}}); one line per run
    /// with --schedule.
    #[arg(long)]
    pub json: bool,
    /// Keep running and prune on this cron schedule (5 fields, UTC), e.g. "0 * * * *"; stops
    /// on SIGTERM or Ctrl-C, after the run in progress.
    #[arg(long, env = "TAILOR_PRUNE_SCHEDULE", value_parser = tailor::prune::schedule::Schedule::parse)]
    pub schedule: Option<tailor::prune::schedule::Schedule>,
}

/// Runs the pruner once, or on its schedule until stopped; returns the process exit code.
pub async fn run(args: PruneArgs) -> i32 {
    match &args.schedule {
        None => run_once(&args).await,
        Some(schedule) => run_scheduled(&args, schedule).await,
    }
}

async fn run_scheduled(args: &PruneArgs, schedule: &tailor::prune::schedule::Schedule) -> i32 {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            eprintln!("error: cannot handle SIGTERM: {error}");
            return EXIT_ERROR;
        }
    };
    tracing::info!(%schedule, "pruning on a schedule (UTC)");
    loop {
        let now = chrono::Utc::now();
        let Some(next) = schedule.next_after(now) else {
            eprintln!("error: the schedule {schedule} never fires");
            return EXIT_ERROR;
        };
        tracing::info!(next_run = %next, "next prune run");
        let wait = (next - now).to_std().unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        let code = run_once(args).await;
        tracing::info!(exit_status = code, "prune run finished");
    }
    tracing::info!("pruner stopped");
    0
}

async fn run_once(args: &PruneArgs) -> i32 {
    match execute(args).await {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&report).expect("report serialises")
                );
            } else {
                print_table(&report);
            }
            match report.outcome {
                PruneOutcome::Pruned => EXIT_PRUNED,
                PruneOutcome::NothingToDo => EXIT_NOTHING_TO_DO,
                PruneOutcome::Error => EXIT_ERROR,
            }
        }
        Err((code, message)) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "error": { "code": code, "message": message } })
                );
            } else {
                eprintln!("error: {message} ({code})");
            }
            EXIT_ERROR
        }
    }
}

/// What a prune run reaches, built once from the environment; a value that builds here is one
/// `prune` accepts (`check-config --for prune` is this, with the arguments clap builds).
pub struct PruneSettings {
    database_url: Secret,
    connections: u32,
    /// The internal registry, with tailor's credentials; the operator's, so unrestricted.
    internal: Arc<Registry>,
}

impl PruneSettings {
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let settings = TailorSettings::from_lookup(lookup)?;
        let internal = super::operator_internal_registry(&settings)?;
        Ok(Self {
            connections: settings.database_pool(2, false)?,
            database_url: settings.database_url,
            internal,
        })
    }
}

async fn execute(args: &PruneArgs) -> Result<PruneReport, (Code, String)> {
    let settings = PruneSettings::from_lookup(|name| std::env::var(name).ok())
        .map_err(|e| (e.code(), e.to_string()))?;
    let pool = tailor::db::connect(settings.database_url.expose(), settings.connections)
        .await
        .map_err(|e| (Code::DatabaseUnavailable, e.to_string()))?;
    let options = PruneOptions {
        grace: args.grace,
        dry_run: args.dry_run,
    };
    tailor::prune::prune(&pool, &settings.internal, &options)
        .await
        .map_err(|e| (e.code(), e.to_string()))
}

fn print_table(report: &PruneReport) {
    let dry = if report.dry_run { " (dry run)" } else { "" };
    if report.decisions.is_empty() {
        println!("nothing to prune{dry}");
    } else {
        println!(
            "{:<36}  {:<36}  {:<12}  {:<12}  ACTION",
            "APP", "STAGING", "DIGEST", "REASON"
        );
        for d in &report.decisions {
            let digest = d.digest.trim_start_matches("sha256:");
            println!(
                "{:<36}  {:<36}  {:<12}  {:<12}  {}{}",
                d.app_guid,
                d.staging_guid,
                &digest[..digest.len().min(12)],
                d.reason.as_str(),
                d.action.as_str(),
                d.detail
                    .as_deref()
                    .map(|detail| format!(": {detail}"))
                    .unwrap_or_default()
            );
        }
        let mut apps: Vec<_> = report.decisions.iter().map(|d| d.app_guid).collect();
        apps.sort();
        apps.dedup();
        println!();
        for app in apps {
            let of_app = report.decisions.iter().filter(|d| d.app_guid == app);
            let pruned = of_app.clone().filter(|d| d.action.prunes()).count();
            let kept = of_app.count() - pruned;
            println!("app {app}: {pruned} pruned, {kept} kept");
        }
    }
    let verb = if report.dry_run {
        "would prune"
    } else {
        "pruned"
    };
    println!(
        "{verb} {} images ({} manifests deleted); {} reclaimable by the registry's garbage collection{dry}",
        report.images_pruned,
        report.manifests_deleted,
        indicatif::HumanBytes(report.bytes_reclaimable)
    );
    for error in &report.errors {
        eprintln!("error: {error}");
    }
}
