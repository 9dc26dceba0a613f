//! The `tailor` binary: `copy` an image, `migrate` the database; `work` and `prune` as they land.

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Copy an image between registries: only missing blobs, verified, pinned by digest.
    Copy(cli::copy::CopyArgs),
    /// Apply pending database migrations to DATABASE_URL and exit.
    Migrate {
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tailor::tls::install_crypto_provider();
    tailor::telemetry::init();
    match Cli::parse().command {
        Command::Copy(args) => std::process::exit(cli::copy::run(args).await),
        Command::Migrate { database_url } => {
            let pool = tailor::db::connect(&database_url, 2)
                .await
                .context("connecting to DATABASE_URL")?;
            tailor::db::migrate(&pool).await?;
            let applied: i64 =
                sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
                    .fetch_one(&pool)
                    .await?;
            println!("database is up to date ({applied} migrations applied)");
        }
    }
    Ok(())
}
