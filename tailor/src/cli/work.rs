//! `tailor work`: staging workers against `DATABASE_URL` until SIGTERM or Ctrl-C (then drain).

use anyhow::Context;
use tailor::config::{ConfigError, Secret, TailorSettings};
use tailor::staging::worker::WorkerSettings;

/// Everything `tailor work` runs with, built once from its flag and the environment; a value
/// that builds here is one `work` accepts (`check-config --for work` is this).
pub struct WorkSettings {
    pub database_url: Secret,
    pub worker: WorkerSettings,
    /// How many stagings this process copies at once (`--workers`, `TAILOR_WORKERS`).
    pub count: usize,
    /// The pool's size: workers borrow a connection for one short statement at a time, so it
    /// (its LISTEN connection included) does not grow with workers or blob transfers.
    pub connections: u32,
}

impl WorkSettings {
    pub fn from_lookup(
        count: u16,
        lookup: impl Fn(&str) -> Option<String> + Copy,
    ) -> Result<Self, ConfigError> {
        let tailor = TailorSettings::from_lookup(lookup)?;
        let key = tailor::secrets::CredentialsKey::from_lookup(lookup)?;
        let worker = WorkerSettings::from_settings(&tailor, key, lookup)?;
        worker.registries()?;
        Ok(Self {
            connections: tailor.database_pool(4, true)?,
            database_url: tailor.database_url,
            worker,
            count: usize::from(count),
        })
    }
}

pub async fn run(settings: WorkSettings) -> anyhow::Result<()> {
    let pool = tailor::db::connect(settings.database_url.expose(), settings.connections)
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
    tracing::info!("{}", settings.worker.egress.describe());
    println!("tailor work: {} workers running", settings.count);
    tailor::staging::worker::run(pool, settings.worker, settings.count, shutdown).await;
    Ok(())
}
