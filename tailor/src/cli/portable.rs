//! `tailor export` and `tailor import`: staged images out of the internal registry into an
//! OCI layout (a directory, a tar file or a bucket), and back in as stagings (the rules are
//! `tailor::portable`'s). Both read the same settings as `tailor work` (`DATABASE_URL`, the
//! internal registry), draw progress on a terminal, print a table or `--json`, and exit 1 if
//! any staging failed (the others are done regardless).

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tailor::code::Code;
use tailor::config::{ConfigError, Secret, TailorSettings};
use tailor::copy::CopyOptions;
use tailor::error::CopyError;
use tailor::layout::Layout;
use tailor::portable::{Entry, Imported, Importer, PortableError, Selection, Staged};
use tailor::registry::Registry;
use tailor::staging::lease::Leases;
use uuid::Uuid;

use super::copy::Location;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A staging GUID (that staging), an app GUID (its live stagings) and the destination; or,
    /// with --all, only the destination: oci:DIR, oci-archive:FILE or s3://BUCKET/PREFIX.
    #[arg(value_name = "GUID DEST", num_args = 1..=2, required = true)]
    pub arguments: Vec<String>,
    /// Export every live staging (the whole internal registry's images).
    #[arg(long)]
    pub all: bool,
    /// Print one JSON object: what was exported and what failed.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// What `tailor export` wrote: oci:DIR, oci-archive:FILE or s3://BUCKET/PREFIX, with
    /// `:STAGING_GUID` to import only that staging.
    pub source: String,
    /// Print one JSON object: what was imported and what failed.
    #[arg(long)]
    pub json: bool,
}

/// The settings export and import run with (those of `tailor work` they need).
struct PortableSettings {
    database_url: Secret,
    connections: u32,
    internal: Arc<Registry>,
    repo_prefix: String,
}

impl PortableSettings {
    fn from_env() -> Result<Self, ConfigError> {
        let settings = TailorSettings::from_lookup(|name| std::env::var(name).ok())?;
        let internal = super::operator_internal_registry(&settings)?;
        Ok(Self {
            connections: settings.database_pool(2, false)?,
            database_url: settings.database_url,
            internal,
            repo_prefix: settings.repo_prefix,
        })
    }

    async fn pool(&self) -> Result<sqlx::PgPool, Failure> {
        tailor::db::connect(self.database_url.expose(), self.connections)
            .await
            .map_err(|e| Failure::new(Code::DatabaseUnavailable, e.to_string()))
    }
}

/// An error that ends the command before any staging was tried.
struct Failure {
    code: Code,
    message: String,
}

impl Failure {
    fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<CopyError> for Failure {
    fn from(error: CopyError) -> Self {
        Self::new(error.code(), error.to_string())
    }
}

impl From<PortableError> for Failure {
    fn from(error: PortableError) -> Self {
        Self::new(error.code(), error.to_string())
    }
}

impl From<ConfigError> for Failure {
    fn from(error: ConfigError) -> Self {
        Self::new(error.code(), error.to_string())
    }
}

/// One staging's result, as printed.
#[derive(serde::Serialize)]
struct Done {
    staging_guid: String,
    app_guid: String,
    /// `exported`, `imported` or `already_present`.
    outcome: &'static str,
    pinned: String,
    blobs_copied: u64,
    bytes_copied: u64,
}

#[derive(serde::Serialize)]
struct Failed {
    /// The staging GUID, or the layout entry's tag if it is not a staging.
    staging: String,
    error: ErrorBody,
}

#[derive(serde::Serialize)]
struct ErrorBody {
    code: Code,
    message: String,
}

#[derive(serde::Serialize)]
struct Summary {
    location: String,
    done: Vec<Done>,
    failed: Vec<Failed>,
}

fn failed(staging: String, error: &PortableError) -> Failed {
    Failed {
        staging,
        error: ErrorBody {
            code: error.code(),
            message: error.to_string(),
        },
    }
}

/// Runs `tailor export`; returns the exit status.
pub async fn export(args: ExportArgs) -> i32 {
    finish(args.json, execute_export(&args).await)
}

/// Runs `tailor import`; returns the exit status.
pub async fn import(args: ImportArgs) -> i32 {
    finish(args.json, execute_import(&args).await)
}

fn finish(json: bool, result: Result<Summary, Failure>) -> i32 {
    match result {
        Ok(summary) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&summary).expect("summary serialises")
                );
            } else {
                print_table(&summary);
            }
            i32::from(!summary.failed.is_empty())
        }
        Err(failure) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"error": {"code": failure.code, "message": failure.message}})
                );
            } else {
                eprintln!("error: {} ({})", failure.message, failure.code);
            }
            1
        }
    }
}

fn print_table(summary: &Summary) {
    if !summary.done.is_empty() {
        println!(
            "{:<36}  {:<36}  {:<15}  {:>6}  PINNED",
            "STAGING", "APP", "OUTCOME", "BLOBS"
        );
    }
    for done in &summary.done {
        println!(
            "{:<36}  {:<36}  {:<15}  {:>6}  {}",
            done.staging_guid, done.app_guid, done.outcome, done.blobs_copied, done.pinned
        );
    }
    for failed in &summary.failed {
        eprintln!(
            "failed: {}: {} ({})",
            failed.staging, failed.error.message, failed.error.code
        );
    }
    let bytes: u64 = summary.done.iter().map(|d| d.bytes_copied).sum();
    println!(
        "{}: {} done ({} copied), {} failed",
        summary.location,
        summary.done.len(),
        indicatif::HumanBytes(bytes),
        summary.failed.len()
    );
}

/// A bar over the stagings, on a terminal only.
fn staging_bar(json: bool, count: usize) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(count as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} [{bar:40}] {pos}/{len} stagings {wide_msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

async fn execute_export(args: &ExportArgs) -> Result<Summary, Failure> {
    let (selection, destination) = match (args.all, args.arguments.as_slice()) {
        (true, [destination]) => (Selection::All, destination),
        (false, [guid, destination]) => {
            let guid = Uuid::parse_str(guid).map_err(|e| {
                Failure::new(
                    Code::InvalidGuid,
                    format!("{guid}: not a staging or app GUID ({e})"),
                )
            })?;
            (Selection::Guid(guid), destination)
        }
        (true, _) => {
            return Err(Failure::new(
                Code::InvalidArgument,
                "with --all, name only the destination",
            ));
        }
        (false, _) => {
            return Err(Failure::new(
                Code::InvalidArgument,
                "name a staging or app GUID and the destination (or --all and the destination)",
            ));
        }
    };
    let location = Location::parse(destination, "docker.io")?;
    if location.tag().is_some() {
        return Err(Failure::new(
            Code::InvalidArgument,
            format!("{destination}: each image is tagged with its staging GUID; drop the :TAG"),
        ));
    }
    let settings = PortableSettings::from_env()?;
    let pool = settings.pool().await?;
    let stagings = tailor::portable::select(&pool, selection).await?;
    let bar = staging_bar(args.json, stagings.len());
    bar.set_prefix("exporting");
    // An archive is written whole: every staging goes into a directory beside it, packed
    // once at the end (and not at all if none made it).
    let (layout, archive) = match location {
        Location::Archive { file, .. } => {
            let writer =
                tokio::task::spawn_blocking(move || tailor::layout::ArchiveWriter::new(&file))
                    .await
                    .expect("preparing an archive does not panic")
                    .map_err(CopyError::Layout)?;
            (Layout::Dir(writer.layout().clone()), Some(writer))
        }
        location => (location.open_layout(true).await?, None),
    };
    let (mut done, mut failures) = (Vec::new(), Vec::new());
    for staged in &stagings {
        bar.set_message(staged.staging_guid.to_string());
        match tailor::portable::export(&settings.internal, staged, &layout, &CopyOptions::default())
            .await
        {
            Ok(report) => done.push(done_of(staged, "exported", &report)),
            Err(error) => {
                let error = PortableError::from(error);
                tracing::error!(staging_guid = %staged.staging_guid, code = %error.code(), %error, "export failed");
                failures.push(failed(staged.staging_guid.to_string(), &error));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if let Some(writer) = archive
        && !done.is_empty()
    {
        writer.seal().await.map_err(CopyError::Layout)?;
    }
    Ok(Summary {
        location: destination.clone(),
        done,
        failed: failures,
    })
}

fn done_of(staged: &Staged, outcome: &'static str, report: &tailor::copy::CopyReport) -> Done {
    Done {
        staging_guid: staged.staging_guid.to_string(),
        app_guid: staged.app_guid.to_string(),
        outcome,
        pinned: report.pinned.clone(),
        blobs_copied: report.blobs.copied,
        bytes_copied: report.bytes_copied,
    }
}

async fn execute_import(args: &ImportArgs) -> Result<Summary, Failure> {
    let location = Location::parse(&args.source, "docker.io")?;
    let only = location.tag();
    let layout = location.open_layout(false).await?;
    let settings = PortableSettings::from_env()?;
    let pool = settings.pool().await?;
    let mut entries = Vec::new();
    let mut failures = Vec::new();
    for descriptor in layout.entries().await.map_err(CopyError::Layout)? {
        let tag = descriptor
            .annotations
            .get(tailor::layout::REF_NAME)
            .cloned()
            .unwrap_or_else(|| descriptor.digest.clone());
        if only.as_ref().is_some_and(|only| *only != tag) {
            continue;
        }
        match Entry::parse(&descriptor) {
            Ok(entry) => entries.push(entry),
            Err(error) => failures.push(failed(tag, &error)),
        }
    }
    if let Some(only) = &only
        && entries.is_empty()
        && failures.is_empty()
    {
        return Err(Failure::new(
            Code::ImageNotFound,
            format!("{}: no entry tagged {only}", args.source),
        ));
    }
    let leases = Leases::new(
        pool.clone(),
        format!("import-{}", Uuid::new_v4().simple()),
        Duration::from_secs(30),
    );
    // The leases outlive any one statement: renewed here while the import runs.
    let renewing = {
        let leases = leases.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(leases.ttl() / 3).await;
                if let Err(error) = leases.renew_all().await {
                    tracing::warn!(%error, "could not renew the import's leases");
                }
            }
        })
    };
    let (_let_go, let_go) = tokio::sync::watch::channel(0);
    let importer = Importer {
        pool,
        internal: settings.internal,
        repo_prefix: settings.repo_prefix,
        leases: leases.clone(),
        let_go,
    };
    let bar = staging_bar(args.json, entries.len());
    bar.set_prefix("importing");
    let mut done = Vec::new();
    for entry in &entries {
        let guid = entry.staging.staging_guid();
        bar.set_message(guid.to_string());
        match importer
            .import(&layout, entry, &CopyOptions::default())
            .await
        {
            Ok(Imported::Recorded { staging, report }) => done.push(Done {
                staging_guid: guid.to_string(),
                app_guid: staging.app_guid.to_string(),
                outcome: "imported",
                pinned: report.pinned,
                blobs_copied: report.blobs.copied,
                bytes_copied: report.bytes_copied,
            }),
            Ok(Imported::AlreadyThere { staging }) => done.push(Done {
                staging_guid: guid.to_string(),
                app_guid: staging.app_guid.to_string(),
                outcome: "already_present",
                pinned: staging
                    .pinned_image
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                blobs_copied: 0,
                bytes_copied: 0,
            }),
            Err(error) => {
                tracing::error!(staging_guid = %guid, code = %error.code(), %error, "import failed");
                failures.push(failed(guid.to_string(), &error));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    renewing.abort();
    if let Err(error) = leases.let_go_all().await {
        tracing::warn!(%error, "could not let go of the import's leases; they will expire");
    }
    Ok(Summary {
        location: args.source.clone(),
        done,
        failed: failures,
    })
}
