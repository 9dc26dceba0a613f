//! The `tailor` binary: `copy` an image, `work` the staging queue, `prune` the internal
//! registry, `migrate` the database.

mod cli;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tailor",
    version,
    about = "Stage container images into an internal registry, pinned by digest"
)]
struct Cli {
    /// More log lines on stderr: -v for progress (info), -vv for detail (debug). Commands with
    /// --json log only errors unless asked.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Copy an image between registries: only missing blobs, verified, pinned by digest.
    Copy(cli::copy::CopyArgs),
    /// Run staging workers against DATABASE_URL until SIGTERM or Ctrl-C (then drain).
    Work {
        /// How many stagings this process copies at once.
        #[arg(long, env = "TAILOR_WORKERS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
        workers: u16,
    },
    /// Delete images nothing uses any more from the internal registry (for cron). Exit status:
    /// 0 pruned, 3 nothing to do, 1 error.
    Prune(cli::prune::PruneArgs),
    /// Validate the configuration in the environment (everything `work` and `prune` read, or
    /// what one of them reads with `--for`) and exit: 0 and "configuration is valid", or 1 and
    /// a message naming the setting.
    CheckConfig {
        /// Check only what this subcommand reads.
        #[arg(long = "for", value_enum)]
        role: Option<Role>,
        /// Also check that the database and the internal registry answer.
        #[arg(long)]
        probe: bool,
    },
    /// Apply pending database migrations to DATABASE_URL and exit.
    Migrate {
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

/// A subcommand whose configuration `check-config` can check alone.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    Work,
    Prune,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let json = match &cli.command {
        Command::Copy(args) => args.json,
        Command::Prune(args) => args.json,
        _ => false,
    };
    tailor::telemetry::init_with_default(match (cli.verbose, json) {
        // The JSON on stdout says everything, errors included.
        (0, true) => "off",
        (0, false) | (1, _) => "info",
        _ => "debug",
    });
    tailor::tls::install_crypto_provider();
    let runtime = tokio::runtime::Runtime::new().expect("a Tokio runtime");
    match runtime.block_on(run(cli.command)) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(error) => {
            // One line, the same shape everywhere, never a backtrace (whatever RUST_BACKTRACE).
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Copy(args) => return Ok(cli::copy::run(args).await as u8),
        Command::Prune(args) => return Ok(cli::prune::run(args).await as u8),
        Command::Work { workers } => work(usize::from(workers)).await?,
        Command::CheckConfig { role, probe } => {
            let lookup = |name: &str| std::env::var(name).ok();
            let policy = check_config(lookup, role).map_err(config_error)?;
            if probe {
                self::probe(lookup).await?;
            }
            println!("{policy}");
            println!("configuration is valid");
        }
        Command::Migrate { database_url } => {
            let pool = tailor::db::connect(&database_url, 2)
                .await
                .context("connecting to DATABASE_URL")?;
            let applied = tailor::db::migrate(&pool).await?;
            println!("database is up to date ({applied} migrations applied)");
        }
    }
    Ok(0)
}

fn config_error(error: tailor::config::ConfigError) -> anyhow::Error {
    anyhow::anyhow!("{error} ({})", error.code())
}

/// `check-config --probe`: the database answers a query and the internal registry its API root.
async fn probe(lookup: impl Fn(&str) -> Option<String> + Copy) -> anyhow::Result<()> {
    let settings = tailor::config::TailorSettings::from_lookup(lookup).map_err(config_error)?;
    settings
        .probe(|part| println!("{part}: answers"))
        .await
        .map_err(probe_error)
}

fn probe_error(error: tailor::config::ProbeError) -> anyhow::Error {
    match error {
        tailor::config::ProbeError::Config(error) => config_error(error),
        unanswered => anyhow::anyhow!(unanswered),
    }
}

/// Everything `tailor work` and `tailor prune` would refuse at start-up, without starting;
/// returns the egress policy in words.
fn check_config(
    lookup: impl Fn(&str) -> Option<String> + Copy,
    role: Option<Role>,
) -> Result<String, tailor::config::ConfigError> {
    let settings = tailor::config::TailorSettings::from_lookup(lookup)?;
    let key = tailor::secrets::CredentialsKey::from_lookup(lookup)?;
    let workers = tailor::staging::worker::WorkerSettings::from_settings(&settings, key, lookup)?;
    workers.registries()?;
    settings.database_pool(4, role != Some(Role::Prune))?;
    // What `work` and `prune` take from flags and the environment, built as they build it.
    for (subcommand, reads) in [("work", Role::Work), ("prune", Role::Prune)] {
        if role.is_none_or(|role| role == reads) {
            Cli::try_parse_from(["tailor", subcommand])
                .map_err(|error| refused_setting(subcommand, &error))?;
        }
    }
    Ok(workers.egress.describe())
}

/// The settings `tailor <subcommand>` reads from the environment, by their variables.
const SUBCOMMAND_SETTINGS: [&str; 4] = [
    "TAILOR_WORKERS",
    "TAILOR_PRUNE_DRY_RUN",
    "TAILOR_PRUNE_GRACE",
    "TAILOR_PRUNE_SCHEDULE",
];

/// Clap's refusal of a subcommand's argument, as the setting (environment variable) it came from.
fn refused_setting(subcommand: &str, error: &clap::Error) -> tailor::config::ConfigError {
    use clap::CommandFactory;
    use clap::error::{ContextKind, ContextValue};
    let rendered = error.render().to_string();
    let mut lines = rendered.lines().map(str::trim);
    let mut problem = lines
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned();
    if let Some(values) = lines.find(|line| line.starts_with("[possible values")) {
        problem = format!("{problem} {values}");
    }
    // The refused argument (`--grace <GRACE>`), and the variable it reads.
    let refused = match error.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(text)) => text.clone(),
        _ => String::new(),
    };
    let command = Cli::command();
    let env = command
        .find_subcommand(subcommand)
        .into_iter()
        .flat_map(|c| c.get_arguments())
        .find(|arg| {
            arg.get_long()
                .is_some_and(|long| refused.starts_with(&format!("--{long}")))
        })
        .and_then(|arg| arg.get_env())
        .and_then(|env| SUBCOMMAND_SETTINGS.into_iter().find(|s| env == *s));
    tailor::config::ConfigError::Invalid {
        setting: env.unwrap_or("the command line"),
        problem,
    }
}

async fn work(count: usize) -> anyhow::Result<()> {
    let settings = tailor::config::TailorSettings::from_env().map_err(config_error)?;
    let key = tailor::secrets::CredentialsKey::from_lookup(|n| std::env::var(n).ok())
        .map_err(config_error)?;
    let worker_settings =
        tailor::staging::worker::WorkerSettings::from_settings(&settings, key, |n| {
            std::env::var(n).ok()
        })
        .map_err(config_error)?;
    // Workers borrow a connection for one short statement at a time; the pool's size (its
    // LISTEN connection included) does not grow with workers or blob transfers.
    let connections = settings.database_pool(4, true).map_err(config_error)?;
    let pool = tailor::db::connect(settings.database_url.expose(), connections)
        .await
        .context("connecting to DATABASE_URL")?;
    tailor::db::migrate(&pool)
        .await
        .context("running database migrations")?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down: no new stagings will be claimed");
        signal.cancel();
    });
    tracing::info!("{}", worker_settings.egress.describe());
    println!("tailor work: {count} workers running");
    tailor::staging::worker::run(pool, worker_settings, count, shutdown).await;
    Ok(())
}
