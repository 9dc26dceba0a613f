//! Staged images carried without a registry: `tailor export` copies stagings out of the
//! internal registry into an OCI image layout (a directory, a tar file or a bucket), and
//! `tailor import` copies them back in and records them as stagings again, so an environment
//! can be rebuilt or moved, or an air-gapped site fed from a bucket.
//!
//! - The layout is the format: each staging is one `index.json` entry, tagged with its staging
//!   GUID (`org.opencontainers.image.ref.name`) and annotated with what makes it a staging
//!   (`io.tailor.staging.*`: app, source image, platform). Any OCI tool can read the images;
//!   only tailor reads the annotations.
//! - Export pins: it copies the staged manifest by digest, so the layout holds exactly what
//!   was staged, byte for byte, whatever the upstream tag says today.
//! - Import is a staging that succeeded elsewhere: copied through the same engine (only what
//!   the registry lacks, every blob verified) into `<prefix>/<app GUID>:<staging GUID>`, under
//!   the repository lease that keeps the pruner out, and recorded in the same transaction
//!   that checks the lease is still held, as a worker records a success. A staging already
//!   here with the same digest is left alone; one with another is a conflict, never overwritten.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

use crate::code::Code;
use crate::copy::{CopyOptions, CopyReport, PlatformChoice, Source, Wanted, copy_from};
use crate::error::CopyError;
use crate::layout::{Descriptor, Layout, REF_NAME};
use crate::platform::Platform;
use crate::reference::ImageReference;
use crate::registry::Registry;
use crate::staging::lease::{self, Leases};
use crate::staging::ledger::PgLedger;
use crate::staging::location::StagingSource;
use crate::staging::queue::{self, RepositoryLease};
use crate::staging::request::NewStaging;
use crate::staging::{Staging, StagingState, store};

/// The staging GUID an exported image was staged as.
pub const STAGING_GUID: &str = "io.tailor.staging.guid";
/// The app it was staged for.
pub const APP_GUID: &str = "io.tailor.staging.app-guid";
/// The image the staging asked for, as stored (fully qualified).
pub const SOURCE_IMAGE: &str = "io.tailor.staging.source-image";
/// The platform it was staged for.
pub const PLATFORM: &str = "io.tailor.staging.platform";

/// How long an import waits for the pruner to leave a repository before giving up.
const REPOSITORY_WAIT: Duration = Duration::from_secs(120);

/// Why a staging could not be exported or imported.
#[derive(Debug, thiserror::Error)]
pub enum PortableError {
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Nothing to export under that GUID.
    #[error("{0}")]
    NotFound(String),
    /// The staging exists here with another image, or in another state.
    #[error("{0}")]
    Conflict(String),
    /// A layout entry that is not a tailor export.
    #[error("{0}")]
    NotAStaging(String),
    /// The repository stayed leased exclusively (by the pruner) past the wait.
    #[error("{0}")]
    RepositoryBusy(String),
}

impl PortableError {
    pub fn code(&self) -> Code {
        match self {
            Self::Copy(error) => error.code(),
            Self::Database(_) => Code::DatabaseError,
            Self::NotFound(_) => Code::NotFound,
            Self::Conflict(_) => Code::StagingConflict,
            Self::NotAStaging(_) => Code::LayoutInvalid,
            Self::RepositoryBusy(_) => Code::Timeout,
        }
    }
}

/// Which stagings an export takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// A staging GUID (any succeeded, unpruned staging), or an app GUID (its live stagings).
    Guid(Uuid),
    /// Every live staging: the whole internal registry's worth of images.
    All,
}

/// A succeeded staging whose image is in the internal registry.
#[derive(Debug, Clone)]
pub struct Staged {
    pub staging_guid: Uuid,
    pub app_guid: Uuid,
    pub source_image: StagingSource,
    pub platform: Platform,
    pub pinned_image: ImageReference,
}

impl Staged {
    /// The annotations its layout entry carries.
    fn annotations(&self) -> std::collections::BTreeMap<String, String> {
        [
            (STAGING_GUID, self.staging_guid.to_string()),
            (APP_GUID, self.app_guid.to_string()),
            (SOURCE_IMAGE, self.source_image.to_string()),
            (PLATFORM, self.platform.to_string()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
    }
}

/// The stagings `selection` names, oldest first. Live means succeeded, neither released nor
/// pruned; a staging named by its own GUID is exported if it is merely released. Only copies
/// are selected: a pinned-only staging has no image in the internal registry.
pub async fn select(pool: &PgPool, selection: Selection) -> Result<Vec<Staged>, PortableError> {
    let (guid, all) = match selection {
        Selection::Guid(guid) => (guid, false),
        Selection::All => (Uuid::nil(), true),
    };
    let staged = sqlx::query_as!(
        Staged,
        r#"SELECT staging_guid, app_guid, source_image AS "source_image: StagingSource",
               platform AS "platform: Platform", pinned_image AS "pinned_image!: ImageReference"
           FROM stagings
           WHERE state = 'succeeded' AND pruned_at IS NULL AND mode = 'copy'
             AND (staging_guid = $1
                  OR ((app_guid = $1 OR $2) AND released_at IS NULL))
           ORDER BY created_at, staging_guid"#,
        guid,
        all,
    )
    .fetch_all(pool)
    .await?;
    if staged.is_empty()
        && let Selection::Guid(guid) = selection
    {
        return Err(PortableError::NotFound(format!(
            "{guid} is neither a succeeded staging whose image is still kept nor an app with \
             live stagings (a pinned-only staging keeps no image to export: it is upstream's)"
        )));
    }
    Ok(staged)
}

/// Copies `staged`'s image, by its pinned digest, from the internal registry into `layout`,
/// tagged with its staging GUID and annotated as a staging.
pub async fn export(
    internal: &Arc<Registry>,
    staged: &Staged,
    layout: &Layout,
    options: &CopyOptions,
) -> Result<CopyReport, CopyError> {
    let options = CopyOptions {
        platforms: PlatformChoice::All,
        runnable: None,
        layout_annotations: staged.annotations(),
        ..options.clone()
    };
    crate::copy::copy_to_layout(
        &Source::registry(internal.repository(&staged.pinned_image.repository)),
        &Wanted::image(&staged.pinned_image),
        layout,
        &staged.staging_guid.to_string(),
        &options,
    )
    .await
}

/// An exported staging found in a layout.
#[derive(Debug)]
pub struct Entry {
    /// Its tag in the layout.
    pub tag: String,
    /// The manifest digest it was exported with.
    pub digest: String,
    pub staging: NewStaging,
}

impl Entry {
    /// Reads an `index.json` entry's annotations; an entry without them (or with ones that do
    /// not parse) is not a staging.
    pub fn parse(descriptor: &Descriptor) -> Result<Self, PortableError> {
        let tag = descriptor.annotations.get(REF_NAME).cloned();
        let named = tag.clone().unwrap_or_else(|| descriptor.digest.clone());
        let field = |key: &str| {
            descriptor.annotations.get(key).ok_or_else(|| {
                PortableError::NotAStaging(format!(
                    "{named}: not a tailor export (no {key} annotation)"
                ))
            })
        };
        let invalid = |key: &str, problem: String| {
            PortableError::NotAStaging(format!("{named}: {key}: {problem}"))
        };
        let guid = |key: &str| {
            let text = field(key)?;
            Uuid::parse_str(text).map_err(|e| invalid(key, e.to_string()))
        };
        let staging_guid = guid(STAGING_GUID)?;
        let app_guid = guid(APP_GUID)?;
        let image = StagingSource::parse_stored(field(SOURCE_IMAGE)?)
            .map_err(|e| invalid(SOURCE_IMAGE, e))?;
        let platform =
            Platform::parse(field(PLATFORM)?).map_err(|e| invalid(PLATFORM, e.to_string()))?;
        let tag = tag.ok_or_else(|| {
            PortableError::NotAStaging(format!("{named}: untagged ({REF_NAME} missing)"))
        })?;
        Ok(Self {
            tag,
            digest: descriptor.digest.clone(),
            staging: NewStaging::imported(staging_guid, app_guid, image, platform),
        })
    }
}

/// What an import did with one entry.
#[derive(Debug)]
pub enum Imported {
    /// Copied into the internal registry and recorded as a succeeded staging.
    Recorded {
        staging: Box<Staging>,
        report: Box<CopyReport>,
    },
    /// The staging is already here, succeeded with the same digest: nothing was done.
    AlreadyThere { staging: Box<Staging> },
}

/// Where an import writes and who it is.
pub struct Importer {
    pub pool: PgPool,
    pub internal: Arc<Registry>,
    pub repo_prefix: String,
    /// The import's own leases (renewed by the caller while it runs).
    pub leases: Leases,
    /// The process's lease notifications, for the blob index's waits.
    pub let_go: watch::Receiver<u64>,
}

impl Importer {
    /// Imports `entry` from `layout`.
    pub async fn import(
        &self,
        layout: &Layout,
        entry: &Entry,
        options: &CopyOptions,
    ) -> Result<Imported, PortableError> {
        let new = &entry.staging;
        if let Some(existing) = store::get(&self.pool, new.staging_guid()).await? {
            let same = existing.state == StagingState::Succeeded
                && existing.pruned_at.is_none()
                && existing.source_digest.as_deref() == Some(entry.digest.as_str());
            if same {
                return Ok(Imported::AlreadyThere {
                    staging: Box::new(existing),
                });
            }
            return Err(PortableError::Conflict(format!(
                "staging {} already exists here ({}, digest {}), not the exported {}",
                new.staging_guid(),
                existing.state.as_str(),
                existing.source_digest.as_deref().unwrap_or("none"),
                entry.digest
            )));
        }
        let repository = format!("{}/{}", self.repo_prefix, new.app_guid());
        let resource = lease::repository(&repository);
        self.hold_repository(&resource).await?;
        let dest = self.internal.repository(&repository);
        let tag = new.staging_guid().to_string();
        let result = self
            .copy_and_record(layout, entry, &dest, &resource, options)
            .await;
        if result.is_err() {
            // Nothing may stay tagged that no staging records (the pruner only knows stagings).
            crate::staging::worker::attempt::remove_unrecorded_tag(
                &self.pool,
                &self.leases,
                self.let_go.clone(),
                &dest,
                &resource,
                &tag,
                new.app_guid(),
            )
            .await;
        }
        if let Err(error) = self.leases.let_go(&resource).await {
            tracing::warn!(%error, %resource, "could not let go of the repository; the lease will expire");
        }
        result
    }

    /// The import of `entry` once the repository is held: the copy, then the record.
    async fn copy_and_record(
        &self,
        layout: &Layout,
        entry: &Entry,
        dest: &crate::registry::Repository,
        resource: &str,
        options: &CopyOptions,
    ) -> Result<Imported, PortableError> {
        let new = &entry.staging;
        let options = CopyOptions {
            platforms: PlatformChoice::One(new.platform().clone()),
            runnable: Some(new.platform().clone()),
            ledger: Arc::new(PgLedger::new(
                self.pool.clone(),
                self.leases.clone(),
                self.let_go.clone(),
            )),
            ..options.clone()
        };
        let report = copy_from(
            &Source::layout(layout.clone()),
            &Wanted::in_layout(layout, Some(&entry.tag)),
            dest,
            &new.staging_guid().to_string(),
            &options,
        )
        .await?;
        let run = report.run.clone().ok_or_else(|| {
            CopyError::InvalidArgument("the imported image has no run information".into())
        })?;
        let recorded = queue::record_imported(
            &self.pool,
            new,
            &report,
            &run,
            RepositoryLease {
                resource,
                holder: self.leases.holder(),
            },
        )
        .await?;
        match recorded {
            Some(staging) => Ok(Imported::Recorded {
                staging: Box::new(staging),
                report: Box::new(report),
            }),
            None => Err(PortableError::Conflict(format!(
                "staging {}: the repository's lease was lost, or the staging was created here, \
                 while it was copied; nothing was recorded (import again)",
                new.staging_guid()
            ))),
        }
    }

    /// Takes the repository lease (shared, as workers do), waiting while the pruner has it.
    async fn hold_repository(&self, resource: &str) -> Result<(), PortableError> {
        let deadline = tokio::time::Instant::now() + REPOSITORY_WAIT;
        let mut released = self.let_go.clone();
        loop {
            if self.leases.acquire(resource, false).await? {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(PortableError::RepositoryBusy(format!(
                    "{resource} stayed held by the pruner for {}s",
                    REPOSITORY_WAIT.as_secs()
                )));
            }
            tokio::select! {
                _ = released.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}
