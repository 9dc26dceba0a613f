//! The copy engine: an image from a source repository into a destination repository, fetching
//! only the blobs the destination lacks, verifying every byte, and pushing manifests as the
//! exact bytes upstream published (children before the index, the tag last), so that a tag
//! never points at an incomplete image and the pinned digest equals upstream's.
//!
//! A source is a registry repository or an OCI image layout ([`Source`]); a destination is a
//! registry repository ([`copy_image`], [`copy_from`]) or a layout in a directory or a bucket
//! ([`copy_to_layout`], see [`crate::layout`]). [`pin`] checks an image as a staging's copy
//! would, without copying it.
//!
//! It speaks to registries only through [`crate::registry::Repository`] handles, so every
//! request it makes is bounded, deadlined and egress-checked there. With
//! [`CopyOptions::runnable`] (stagings) it also refuses, before anything is tagged, what cannot
//! run on the platform: artifacts, other platforms' images, configs it cannot use.

mod blob;
mod pin;
mod plan;
mod referrers;
mod resume;
mod source;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;

use blob::BlobJob;
pub use blob::BlobOutcome;
pub use pin::{Pinned, pin};
pub use plan::select_platform;
pub use referrers::Referrer;
pub use resume::{Resumable, UploadCheckpoint};
pub use source::{Source, Wanted};

use crate::error::CopyError;
use crate::image_config::RunInfo;
use crate::layout::Layout;
use crate::manifest::{Blob, RawManifest};
use crate::platform::Platform;
use crate::reference::ImageReference;
use crate::registry::Repository;

/// Parallel blob transfers by default: enough to fill a link, few enough for a small host.
pub const DEFAULT_CONCURRENCY: usize = 8;

/// Which part of a multi-platform image to copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlatformChoice {
    /// That platform's manifest only (the pinned digest is upstream's platform manifest).
    One(Platform),
    /// The index and every child (the pinned digest is upstream's index).
    All,
}

impl Default for PlatformChoice {
    fn default() -> Self {
        Self::One(Platform::default())
    }
}

/// Held while this copy fetches a blob from upstream; dropping it lets waiting copies proceed.
pub type FetchGuard = Box<dyn std::any::Any + Send>;

/// What [`BlobLedger::claim_fetch`] answered.
pub enum FetchClaim {
    /// This copy fetches the blob; others wait until the guard is dropped.
    Mine(FetchGuard),
    /// Another copy is fetching it now: wait for it ([`BlobLedger::wait_fetch`]), then mount.
    Busy,
    /// No coordination (each copy fetches on its own).
    Uncoordinated,
}

/// Where else in the destination registry a blob already is: the blob index.
///
/// Locations are recorded with the *origin* registry the blob was verified from, and a copy
/// is offered as mount sources only locations of its own source's origin: a tenant can never
/// mount another tenant's blob by naming its digest (see docs/ARCHITECTURE.md, invariant
/// "Tenants cannot read each other's images").
pub trait BlobLedger: Send + Sync {
    /// Repositories of the destination registry holding `digest` verified from `origin`,
    /// best first.
    fn mount_sources<'a>(&'a self, digest: &'a str, origin: &'a str) -> BoxFuture<'a, Vec<String>>;
    /// `blob` is now in `repository` of the destination registry, verified from `origin`.
    fn record<'a>(
        &'a self,
        blob: &'a Blob,
        repository: &'a str,
        origin: &'a str,
    ) -> BoxFuture<'a, ()>;
    /// Claims the right to fetch `digest` from `origin`. Copies from different origins never
    /// wait for each other: what one fetches is no mount source for the other.
    fn claim_fetch<'a>(&'a self, _digest: &'a str, _origin: &'a str) -> BoxFuture<'a, FetchClaim> {
        Box::pin(async { FetchClaim::Uncoordinated })
    }
    /// Waits until the copy fetching `digest` from `origin` is done (or gone), or for one
    /// bounded round: a fetch that takes longer is not waited for forever.
    fn wait_fetch<'a>(&'a self, _digest: &'a str, _origin: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
    /// Where an interrupted upload of `blob` into `repository`, read from `origin`, stands.
    /// Asked and recorded only under this copy's fetch claim on the blob.
    fn checkpoint<'a>(
        &'a self,
        _blob: &'a Blob,
        _repository: &'a str,
        _origin: &'a str,
    ) -> BoxFuture<'a, Option<UploadCheckpoint>> {
        Box::pin(async { None })
    }
    /// Records where the upload stands now, or with `None`, that nothing is left to resume;
    /// `true` if it was recorded (a ledger that keeps none, or a claim lost, says `false`).
    fn set_checkpoint<'a>(
        &'a self,
        _blob: &'a Blob,
        _repository: &'a str,
        _origin: &'a str,
        _checkpoint: Option<&'a UploadCheckpoint>,
    ) -> BoxFuture<'a, bool> {
        Box::pin(async { false })
    }
}

/// A ledger that knows nothing (the CLI's default).
pub struct NoLedger;

impl BlobLedger for NoLedger {
    fn mount_sources<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async { Vec::new() })
    }

    fn record<'a>(&'a self, _: &'a Blob, _: &'a str, _: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// What a copy reports while it runs.
#[derive(Debug, Clone)]
pub enum Progress {
    /// The plan: how many blobs and bytes the image has in all.
    Planned {
        blobs: usize,
        bytes: u64,
    },
    BlobStarted {
        digest: String,
        size: u64,
    },
    BlobBytes {
        digest: String,
        bytes: u64,
    },
    BlobFinished {
        digest: String,
        size: u64,
        outcome: BlobOutcome,
    },
}

pub type ProgressSink = Arc<dyn Fn(Progress) + Send + Sync>;

/// How to copy.
#[derive(Clone)]
pub struct CopyOptions {
    pub platforms: PlatformChoice,
    pub concurrency: usize,
    pub ledger: Arc<dyn BlobLedger>,
    pub progress: Option<ProgressSink>,
    pub cancel: CancellationToken,
    /// Stagings: the image must be a container image that runs on this platform; checked
    /// (with its config) before any layer is fetched and before anything is tagged.
    pub runnable: Option<Platform>,
    /// Copies into a layout: annotations for the image's `index.json` entry, beside its
    /// `org.opencontainers.image.ref.name` (`tailor export` records the staging there).
    pub layout_annotations: std::collections::BTreeMap<String, String>,
    /// Also copy the artifacts that refer to the image (signatures, SBOMs, attestations:
    /// [`referrers`]), between registries only.
    pub referrers: bool,
    /// Upload large blobs in checkpointed chunks, so that a later try resumes inside them
    /// (stagings; the ledger keeps the checkpoints). `None`: each blob in one request.
    pub resumable: Option<Resumable>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            platforms: PlatformChoice::default(),
            concurrency: DEFAULT_CONCURRENCY,
            ledger: Arc::new(NoLedger),
            progress: None,
            cancel: CancellationToken::new(),
            runnable: None,
            layout_annotations: Default::default(),
            referrers: false,
            resumable: None,
        }
    }
}

/// Blob counts by outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlobCounts {
    pub copied: u64,
    pub mounted: u64,
    pub skipped: u64,
}

/// What a successful copy did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CopyReport {
    /// Upstream's digest of what was copied (the platform manifest, or the index).
    pub source_digest: String,
    /// `<destination repository>@<digest>`: immutable.
    pub pinned: String,
    /// `<destination repository>:<tag>`.
    pub tagged: String,
    pub media_type: String,
    pub blobs: BlobCounts,
    pub bytes_copied: u64,
    pub bytes_mounted: u64,
    pub bytes_skipped: u64,
    /// Non-distributable layers left out of the copy.
    pub foreign_layers: Vec<String>,
    /// The config blob of the copied image (for an index, of the default platform's child).
    pub config_digest: Option<String>,
    /// Every object the image is made of in the destination: its manifests, configs and
    /// (distributable) layers. What the pruner weighs when the image goes.
    pub objects: Vec<StoredObject>,
    /// How to run it, when the copy checked it was runnable.
    #[serde(skip)]
    pub run: Option<RunInfo>,
    /// What the copy did that may not be what was meant (an image for another platform than
    /// the one asked for, when there was nothing to choose from; referrers left out).
    pub warnings: Vec<String>,
    /// The artifacts copied because they refer to the image ([`CopyOptions::referrers`]).
    pub referrers: Vec<Referrer>,
}

impl CopyReport {
    /// Adds what copying the referrers did: their blobs, bytes and objects count as the
    /// image's (the pruner weighs them with it).
    fn fold_referrers(&mut self, copied: referrers::Copied) {
        for nested in copied.reports {
            self.blobs.copied += nested.blobs.copied;
            self.blobs.mounted += nested.blobs.mounted;
            self.blobs.skipped += nested.blobs.skipped;
            self.bytes_copied += nested.bytes_copied;
            self.bytes_mounted += nested.bytes_mounted;
            self.bytes_skipped += nested.bytes_skipped;
            for object in nested.objects {
                if !self.objects.contains(&object) {
                    self.objects.push(object);
                }
            }
            self.warnings.extend(nested.warnings);
        }
        self.objects.extend(copied.index);
        self.warnings.extend(copied.warnings);
        self.referrers = copied.referrers;
    }
}

/// One manifest or blob in the destination registry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredObject {
    pub digest: String,
    pub size: u64,
}

/// Copies `src` (read from the registry repository `source`) into `dest`, tagged `tag`.
pub async fn copy_image(
    source: &Repository,
    src: &ImageReference,
    dest: &Repository,
    tag: &str,
    options: &CopyOptions,
) -> Result<CopyReport, CopyError> {
    let source = Source::registry(source.clone());
    copy_from(&source, &Wanted::image(src), dest, tag, options).await
}

/// Copies `src` (read from `source`, a registry or a layout) into `dest`, tagged `tag`.
pub async fn copy_from(
    source: &Source,
    src: &Wanted,
    dest: &Repository,
    tag: &str,
    options: &CopyOptions,
) -> Result<CopyReport, CopyError> {
    cancellable(options, copy_unguarded(source, src, dest, tag, options)).await
}

/// Runs `copy` until it ends or the copy is cancelled.
async fn cancellable<T>(
    options: &CopyOptions,
    copy: impl std::future::Future<Output = Result<T, CopyError>>,
) -> Result<T, CopyError> {
    tokio::select! {
        biased;
        () = options.cancel.cancelled() => Err(CopyError::Cancelled),
        result = copy => result,
    }
}

/// Plans the copy and reports the plan.
async fn planned(
    source: &Source,
    src: &Wanted,
    options: &CopyOptions,
) -> Result<plan::Plan, CopyError> {
    let plan = plan::plan(source, src, options).await?;
    if let Some(progress) = &options.progress {
        progress(Progress::Planned {
            blobs: plan.blobs.len(),
            bytes: plan.blobs.iter().map(|b| b.size).sum(),
        });
    }
    Ok(plan)
}

async fn copy_unguarded(
    source: &Source,
    src: &Wanted,
    dest: &Repository,
    tag: &str,
    options: &CopyOptions,
) -> Result<CopyReport, CopyError> {
    let plan = planned(source, src, options).await?;
    let same_registry = source
        .repository()
        .filter(|r| r.registry().host() == dest.registry().host())
        .map(|r| r.name().to_owned());
    let job = Arc::new(BlobJob {
        source: source.clone(),
        dest: dest.clone(),
        same_registry,
        ledger: options.ledger.clone(),
        progress: options.progress.clone(),
        floor: source.floor(),
        resumable: options.resumable.clone(),
    });

    // A staging's config comes first: it decides whether the image may run here at all,
    // before a single layer is fetched or anything is tagged.
    let mut outcomes: Vec<(Blob, BlobOutcome)> = Vec::new();
    let mut layers = plan.blobs.clone();
    let mut run = None;
    if let Some(platform) = &options.runnable {
        let config = plan.images[0].config.clone();
        let limit = source.config_limit();
        if config.size > limit {
            return Err(CopyError::ImageConfig(
                crate::image_config::ImageConfigError::TooLarge(format!(
                    "the image config is {} bytes; at most {limit} are accepted",
                    config.size
                )),
            ));
        }
        let outcome = transfer_reporting(&job, &config, &options.progress).await?;
        outcomes.push((config.clone(), outcome));
        layers.retain(|b| b.digest != config.digest);
        // Read back from the internal registry: verified bytes, whatever way they arrived.
        let bytes = dest
            .get_blob_bytes(&config.digest, limit)
            .await
            .map_err(CopyError::Destination)?;
        run = Some(crate::image_config::inspect(&bytes, platform)?);
    }

    let moved: Vec<(Blob, BlobOutcome)> = futures_util::stream::iter(layers)
        .map(|blob| {
            let job = job.clone();
            let progress = options.progress.clone();
            async move {
                let outcome = transfer_reporting(&job, &blob, &progress).await?;
                Ok::<_, CopyError>((blob, outcome))
            }
        })
        .buffer_unordered(options.concurrency.max(1))
        .try_collect()
        .await?;
    outcomes.extend(moved);

    let mut warnings = Vec::new();
    if let (None, PlatformChoice::One(platform), false) =
        (&options.runnable, &options.platforms, plan.from_index)
        && let Some(warning) = other_platform(dest, &plan.images[0], platform).await
    {
        tracing::warn!("{warning}");
        warnings.push(warning);
    }

    for child in &plan.children {
        dest.put_manifest(&child.digest, child)
            .await
            .map_err(CopyError::Destination)?;
    }
    dest.put_manifest(tag, &plan.tagged)
        .await
        .map_err(CopyError::Destination)?;

    let name = format!("{}/{}", dest.registry().name(), dest.name());
    let mut report = report(&plan, &name, tag, outcomes, run);
    report.warnings = warnings;
    // After the tag: a referrer is about the image, and a failed copy of one fails the copy,
    // whose cleanup removes the tag and the referrers with it (`referrers::remove`).
    if options.referrers {
        let copied = referrers::copy(source, dest, &plan.tagged.digest, options).await?;
        report.fold_referrers(copied);
    }
    Ok(report)
}

/// Copies `src` (read from `source`) into the OCI image layout `dest`, tagged `tag`, with the
/// registry copy's guarantees: only blobs the layout lacks are read, each is verified before it
/// gets its name, manifests are upstream's exact bytes, and the tag is written last.
pub async fn copy_to_layout(
    source: &Source,
    src: &Wanted,
    dest: &Layout,
    tag: &str,
    options: &CopyOptions,
) -> Result<CopyReport, CopyError> {
    crate::layout::check_tag(tag).map_err(CopyError::Layout)?;
    if options.runnable.is_some() {
        return Err(CopyError::InvalidArgument(
            "only copies into a registry check that the image runs here".into(),
        ));
    }
    if options.referrers {
        return Err(CopyError::InvalidArgument(
            "referrers are copied between registries only".into(),
        ));
    }
    cancellable(options, layout_unguarded(source, src, dest, tag, options)).await
}

/// Copies `src` into the archive `target` (`oci-archive:FILE`), tagged `tag`: into a
/// directory layout beside it, then packed and renamed over it; a failed copy leaves `target`
/// as it was. The archive holds this one image.
pub async fn copy_to_archive(
    source: &Source,
    src: &Wanted,
    target: &std::path::Path,
    tag: &str,
    options: &CopyOptions,
) -> Result<CopyReport, CopyError> {
    let owned = target.to_owned();
    let writer = tokio::task::spawn_blocking(move || crate::layout::ArchiveWriter::new(&owned))
        .await
        .expect("preparing an archive does not panic")
        .map_err(CopyError::Layout)?;
    let layout = Layout::Dir(writer.layout().clone());
    let mut report = copy_to_layout(source, src, &layout, tag, options).await?;
    writer.seal().await.map_err(CopyError::Layout)?;
    let name = format!("oci-archive:{}", target.display());
    report.pinned = format!("{name}@{}", report.source_digest);
    report.tagged = format!("{name}:{tag}");
    Ok(report)
}

async fn layout_unguarded(
    source: &Source,
    src: &Wanted,
    dest: &Layout,
    tag: &str,
    options: &CopyOptions,
) -> Result<CopyReport, CopyError> {
    let plan = planned(source, src, options).await?;
    let outcomes: Vec<(Blob, BlobOutcome)> = futures_util::stream::iter(plan.blobs.clone())
        .map(|blob| async move {
            let outcome = blob::into_layout(source, dest, &blob, &options.progress).await?;
            report_finished(&options.progress, &blob, outcome);
            Ok::<_, CopyError>((blob, outcome))
        })
        .buffer_unordered(options.concurrency.max(1))
        .try_collect()
        .await?;
    for manifest in plan.children.iter().chain(std::iter::once(&plan.tagged)) {
        dest.put_blob_bytes(&manifest.digest, &manifest.bytes)
            .await
            .map_err(CopyError::Layout)?;
    }
    let descriptor = crate::layout::Descriptor {
        media_type: plan.tagged.media_type.clone(),
        digest: plan.tagged.digest.clone(),
        size: plan.tagged.bytes.len() as u64,
        annotations: options.layout_annotations.clone(),
    };
    dest.set_tag(tag, &descriptor)
        .await
        .map_err(CopyError::Layout)?;
    let name = dest.name();
    Ok(report(&plan, &name, tag, outcomes, None))
}

/// A single-platform image copied for another platform: said, not silent. Read from the
/// destination (the config was just copied there); an artifact's config is not looked at.
async fn other_platform(
    dest: &Repository,
    image: &crate::manifest::ImageManifest,
    platform: &Platform,
) -> Option<String> {
    if !crate::manifest::IMAGE_CONFIG_TYPES.contains(&image.config.media_type.as_str()) {
        return None;
    }
    let limit = dest.registry().limits().config_bytes;
    let bytes = dest
        .get_blob_bytes(&image.config.digest, limit)
        .await
        .ok()?;
    match crate::image_config::check_platform_of(&bytes, platform) {
        Err(crate::image_config::ImageConfigError::PlatformMismatch(problem)) => Some(format!(
            "{problem}; the source is a single-platform image, so there was nothing else to choose"
        )),
        _ => None,
    }
}

async fn transfer_reporting(
    job: &BlobJob,
    blob: &Blob,
    progress: &Option<ProgressSink>,
) -> Result<BlobOutcome, CopyError> {
    let outcome = job.transfer(blob).await?;
    report_finished(progress, blob, outcome);
    Ok(outcome)
}

fn report_finished(progress: &Option<ProgressSink>, blob: &Blob, outcome: BlobOutcome) {
    if let Some(progress) = progress {
        progress(Progress::BlobFinished {
            digest: blob.digest.clone(),
            size: blob.size,
            outcome,
        });
    }
}

/// The report of a copy into `name` (`registry/repository`, or `oci:DIR`).
fn report(
    plan: &plan::Plan,
    name: &str,
    tag: &str,
    outcomes: Vec<(Blob, BlobOutcome)>,
    run: Option<RunInfo>,
) -> CopyReport {
    let objects = plan
        .children
        .iter()
        .chain(std::iter::once(&plan.tagged))
        .map(|m: &RawManifest| StoredObject {
            digest: m.digest.clone(),
            size: m.bytes.len() as u64,
        })
        .chain(outcomes.iter().map(|(blob, _)| StoredObject {
            digest: blob.digest.clone(),
            size: blob.size,
        }))
        .collect();
    let mut report = CopyReport {
        source_digest: plan.tagged.digest.clone(),
        pinned: format!("{name}@{}", plan.tagged.digest),
        tagged: format!("{name}:{tag}"),
        media_type: plan.tagged.media_type.clone(),
        blobs: BlobCounts::default(),
        bytes_copied: 0,
        bytes_mounted: 0,
        bytes_skipped: 0,
        foreign_layers: plan.foreign.clone(),
        config_digest: plan.config_digest.clone(),
        objects,
        run,
        warnings: Vec::new(),
        referrers: Vec::new(),
    };
    for (blob, outcome) in outcomes {
        match outcome {
            BlobOutcome::Copied => {
                report.blobs.copied += 1;
                report.bytes_copied += blob.size;
            }
            BlobOutcome::Mounted => {
                report.blobs.mounted += 1;
                report.bytes_mounted += blob.size;
            }
            BlobOutcome::Skipped => {
                report.blobs.skipped += 1;
                report.bytes_skipped += blob.size;
            }
        }
    }
    report
}
