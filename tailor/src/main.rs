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
    /// Copy staged images out of the internal registry into an OCI layout (oci:DIR,
    /// oci-archive:FILE or s3://BUCKET/PREFIX), each tagged with its staging GUID.
    Export(cli::portable::ExportArgs),
    /// Copy what `tailor export` wrote back into the internal registry and record each image
    /// as a succeeded staging again.
    Import(cli::portable::ImportArgs),
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
        Command::Export(args) => args.json,
        Command::Import(args) => args.json,
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
        Command::Export(args) => return Ok(cli::portable::export(args).await as u8),
        Command::Import(args) => return Ok(cli::portable::import(args).await as u8),
        Command::Prune(args) => return Ok(cli::prune::run(args).await as u8),
        Command::Work { workers } => {
            let settings = cli::work::WorkSettings::from_lookup(workers, |n| std::env::var(n).ok())
                .map_err(config_error)?;
            cli::work::run(settings).await?
        }
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
/// returns the egress policy in words. The settings are read through `lookup`; the subcommands'
/// own arguments, as clap reads them, from the process's environment.
fn check_config(
    lookup: impl Fn(&str) -> Option<String> + Copy,
    role: Option<Role>,
) -> Result<String, tailor::config::ConfigError> {
    // The policy the workers enforce, in words; the pruner reaches only the internal registry.
    let mut policy =
        "egress: the pruner reaches only the internal registry (TAILOR_INTERNAL_REGISTRY)"
            .to_owned();
    if role.is_none_or(|role| role == Role::Work) {
        let Command::Work { workers } = parsed("work")? else {
            unreachable!("clap parsed `tailor work` as another subcommand")
        };
        policy = cli::work::WorkSettings::from_lookup(workers, lookup)?
            .worker
            .egress
            .describe();
    }
    if role.is_none_or(|role| role == Role::Prune) {
        parsed("prune")?;
        cli::prune::PruneSettings::from_lookup(lookup)?;
    }
    Ok(policy)
}

/// `tailor <subcommand>`'s arguments as clap builds them from the environment alone (what the
/// subcommand would refuse, naming the variable).
fn parsed(subcommand: &str) -> Result<Command, tailor::config::ConfigError> {
    Cli::try_parse_from(["tailor", subcommand])
        .map(|cli| cli.command)
        .map_err(|error| refused_setting(subcommand, &error))
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_variable_a_subcommand_reads_is_one_check_config_can_name() {
        let command = Cli::command();
        for subcommand in ["work", "prune"] {
            let arguments = command.find_subcommand(subcommand).unwrap().get_arguments();
            for env in arguments.filter_map(|arg| arg.get_env()) {
                assert!(
                    SUBCOMMAND_SETTINGS.iter().any(|setting| env == *setting),
                    "tailor {subcommand} reads {env:?}: add it to SUBCOMMAND_SETTINGS"
                );
            }
        }
    }
}
