//! The copy engine: an image from a source registry into a destination registry, fetching
//! only the blobs the destination lacks, verifying every byte, and pushing manifests as the
//! exact bytes upstream published (children before the index, the tag last), so that a tag
//! never points at an incomplete image and the pinned digest equals upstream's.

mod blob;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use tokio_util::sync::CancellationToken;

use blob::BlobJob;
pub use blob::BlobOutcome;

use crate::error::{CopyError, Side};
use crate::manifest::{self, Blob, IndexEntry, MAX_MANIFEST_BYTES, RawManifest};
use crate::platform::Platform;
use crate::reference::ImageReference;
use crate::registry::{Credentials, RegistryClient, RetryPolicy, Scope};

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

/// Held while a blob is fetched from upstream; dropping it lets waiting copies proceed.
pub type FetchGuard = Box<dyn std::any::Any + Send>;

/// Where else in the destination registry a blob may already be: the blob index.
pub trait BlobLedger: Send + Sync {
    /// Repositories of the destination registry believed to hold `digest`, best first.
    fn mount_sources<'a>(&'a self, digest: &'a str) -> BoxFuture<'a, Vec<String>>;
    /// `blob` is now in `repository` of the destination registry.
    fn record<'a>(&'a self, blob: &'a Blob, repository: &'a str) -> BoxFuture<'a, ()>;
    /// Waits until no other copy is fetching `digest`, then holds that right until the guard is
    /// dropped. `None` when the ledger cannot coordinate (each copy then fetches on its own).
    fn fetch_guard<'a>(&'a self, _digest: &'a str) -> BoxFuture<'a, Option<FetchGuard>> {
        Box::pin(async { None })
    }
}

/// A ledger that knows nothing (the CLI's default).
pub struct NoLedger;

impl BlobLedger for NoLedger {
    fn mount_sources<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async { Vec::new() })
    }

    fn record<'a>(&'a self, _: &'a Blob, _: &'a str) -> BoxFuture<'a, ()> {
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
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            platforms: PlatformChoice::default(),
            concurrency: DEFAULT_CONCURRENCY,
            ledger: Arc::new(NoLedger),
            progress: None,
            cancel: CancellationToken::new(),
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
}

/// One manifest or blob in the destination registry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredObject {
    pub digest: String,
    pub size: u64,
}

/// The registries a process talks to: one HTTP connection pool, which hosts are plain HTTP,
/// and credentials per registry.
#[derive(Clone)]
pub struct Registries {
    http: reqwest::Client,
    insecure: HashSet<String>,
    credentials: HashMap<String, Credentials>,
    pub retry: RetryPolicy,
}

impl Registries {
    pub fn new(insecure: impl IntoIterator<Item = String>) -> Self {
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .user_agent(concat!("tailor/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            // Detects stalled transfers without bounding how long a large blob may take.
            .read_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(32)
            .build()
            .expect("the HTTP client configuration is valid");
        Self {
            http,
            insecure: insecure.into_iter().collect(),
            credentials: HashMap::new(),
            retry: RetryPolicy::default(),
        }
    }

    /// Uses `credentials` for `registry` (as named in references, e.g. `docker.io`).
    pub fn with_credentials(mut self, registry: &str, credentials: Credentials) -> Self {
        self.credentials.insert(registry.to_owned(), credentials);
        self
    }

    pub fn client(&self, reference: &ImageReference, side: Side) -> Arc<RegistryClient> {
        Arc::new(RegistryClient::new(
            &reference.registry,
            reference.endpoint(),
            self.insecure.contains(&reference.registry)
                || self.insecure.contains(reference.endpoint()),
            side,
            self.http.clone(),
            self.credentials.get(&reference.registry).cloned(),
            self.retry.clone(),
        ))
    }
}

/// Copies `src` to `dst` (tagged with `dst`'s tag, `latest` if none).
pub async fn copy_image(
    registries: &Registries,
    src: &ImageReference,
    dst: &ImageReference,
    options: &CopyOptions,
) -> Result<CopyReport, CopyError> {
    if dst.digest.is_some() {
        return Err(CopyError::InvalidReference(
            crate::reference::ReferenceError {
                input: dst.to_string(),
                problem: "a destination is named by tag; its digest is the result of the copy"
                    .into(),
            },
        ));
    }
    let cancel = options.cancel.clone();
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(CopyError::Cancelled),
        result = copy_unguarded(registries, src, dst, options) => result,
    }
}

async fn copy_unguarded(
    registries: &Registries,
    src: &ImageReference,
    dst: &ImageReference,
    options: &CopyOptions,
) -> Result<CopyReport, CopyError> {
    let source = registries.client(src, Side::Source);
    let dest = registries.client(dst, Side::Destination);
    let top = fetch_manifest(
        &source,
        &src.repository,
        src.manifest_reference(),
        src.digest.as_deref(),
    )
    .await?;

    // Plan: the manifests to push (children first, the tagged one last) and their blobs.
    let mut children: Vec<RawManifest> = Vec::new();
    let mut images = Vec::new();
    let tagged = if top.kind.is_index() {
        let entries = top.index()?;
        match &options.platforms {
            PlatformChoice::All => {
                for entry in &entries {
                    let child = fetch_child(&source, &src.repository, entry).await?;
                    images.push(child.image()?);
                    children.push(child);
                }
                top
            }
            PlatformChoice::One(platform) => {
                let entry = select_platform(&entries, platform).ok_or_else(|| {
                    let available: Vec<String> =
                        entries.iter().map(IndexEntry::platform_text).collect();
                    CopyError::ImageNotFound(format!(
                        "{src} has no {platform} image (it has: {})",
                        available.join(", ")
                    ))
                })?;
                let child = fetch_child(&source, &src.repository, entry).await?;
                images.push(child.image()?);
                child
            }
        }
    } else {
        images.push(top.image()?);
        top
    };

    let config_digest = match &options.platforms {
        PlatformChoice::All if tagged.kind.is_index() => {
            let entries = tagged.index()?;
            let default = select_platform(&entries, &Platform::default()).map(|e| e.digest.clone());
            children
                .iter()
                .zip(&images)
                .find(|(c, _)| Some(&c.digest) == default.as_ref())
                .map(|(_, i)| i.config.digest.clone())
        }
        _ => images.first().map(|i| i.config.digest.clone()),
    };
    let mut blobs: Vec<Blob> = Vec::new();
    let mut seen = HashSet::new();
    let mut foreign = Vec::new();
    for image in &images {
        for blob in std::iter::once(&image.config).chain(&image.layers) {
            if seen.insert(blob.digest.clone()) {
                blobs.push(blob.clone());
            }
        }
        foreign.extend(image.foreign.iter().map(|b| b.digest.clone()));
    }
    for digest in &foreign {
        tracing::warn!(%digest, "non-distributable layer left out of the copy");
    }
    // Largest first: the long transfers start early and the tail is short.
    blobs.sort_by_key(|b| std::cmp::Reverse(b.size));
    if let Some(progress) = &options.progress {
        progress(Progress::Planned {
            blobs: blobs.len(),
            bytes: blobs.iter().map(|b| b.size).sum(),
        });
    }

    let job = Arc::new(BlobJob {
        source: source.clone(),
        dest: dest.clone(),
        src_repo: src.repository.clone(),
        dst_repo: dst.repository.clone(),
        same_registry: src.registry == dst.registry,
        ledger: options.ledger.clone(),
        progress: options.progress.clone(),
        retry: registries.retry.clone(),
    });
    let outcomes: Vec<(Blob, BlobOutcome)> = futures_util::stream::iter(blobs)
        .map(|blob| {
            let job = job.clone();
            let progress = options.progress.clone();
            async move {
                let outcome = job.transfer(&blob).await?;
                if let Some(progress) = &progress {
                    progress(Progress::BlobFinished {
                        digest: blob.digest.clone(),
                        size: blob.size,
                        outcome,
                    });
                }
                Ok::<_, CopyError>((blob, outcome))
            }
        })
        .buffer_unordered(options.concurrency.max(1))
        .try_collect()
        .await?;

    for child in &children {
        push_manifest(&dest, &dst.repository, &child.digest, child).await?;
    }
    let tag = dst.tag_or_latest();
    push_manifest(&dest, &dst.repository, tag, &tagged).await?;

    let objects = children
        .iter()
        .chain(std::iter::once(&tagged))
        .map(|m| StoredObject {
            digest: m.digest.clone(),
            size: m.bytes.len() as u64,
        })
        .chain(outcomes.iter().map(|(blob, _)| StoredObject {
            digest: blob.digest.clone(),
            size: blob.size,
        }))
        .collect();
    let mut report = CopyReport {
        source_digest: tagged.digest.clone(),
        pinned: dst.pinned(&tagged.digest),
        tagged: format!("{}:{tag}", dst.name()),
        media_type: tagged.media_type.clone(),
        blobs: BlobCounts::default(),
        bytes_copied: 0,
        bytes_mounted: 0,
        bytes_skipped: 0,
        foreign_layers: foreign,
        config_digest,
        objects,
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
    Ok(report)
}

/// The best index entry for `platform`, if any.
pub fn select_platform<'a>(
    entries: &'a [IndexEntry],
    platform: &Platform,
) -> Option<&'a IndexEntry> {
    entries
        .iter()
        .filter(|e| match (&e.os, &e.architecture) {
            (Some(os), Some(arch)) => platform.matches(os, arch, e.variant.as_deref()),
            _ => false,
        })
        .min_by_key(|e| {
            platform.rank(
                e.architecture.as_deref().unwrap_or(""),
                e.variant.as_deref(),
            )
        })
}

async fn fetch_child(
    source: &RegistryClient,
    repository: &str,
    entry: &IndexEntry,
) -> Result<RawManifest, CopyError> {
    let child = fetch_manifest(source, repository, &entry.digest, Some(&entry.digest)).await?;
    if child.kind.is_index() {
        return Err(CopyError::UnsupportedMediaType(format!(
            "index entry {} is itself an index; nested indexes are not supported",
            entry.digest
        )));
    }
    Ok(child)
}

/// GETs a manifest, refusing anything over the size limit before reading it all, and checks
/// its digest when the reference pinned one.
pub async fn fetch_manifest(
    client: &RegistryClient,
    repository: &str,
    reference: &str,
    expected_digest: Option<&str>,
) -> Result<RawManifest, CopyError> {
    let path = format!("/v2/{repository}/manifests/{reference}");
    let mut response = client
        .send(&[Scope::pull(repository)], || {
            client
                .request(Method::GET, &path)
                .header(ACCEPT, manifest::ACCEPT)
        })
        .await?;
    if !response.status().is_success() {
        return Err(client
            .status_error(response, &format!("manifest {repository}:{reference}"))
            .await);
    }
    let too_big = || {
        CopyError::ManifestInvalid(format!(
            "manifest {repository}:{reference} is over the {MAX_MANIFEST_BYTES}-byte limit"
        ))
    };
    if response
        .content_length()
        .is_some_and(|l| l > MAX_MANIFEST_BYTES as u64)
    {
        return Err(too_big());
    }
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| client.transport_error(&e))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_MANIFEST_BYTES {
            return Err(too_big());
        }
    }
    let manifest = RawManifest::recognise(Bytes::from(body), content_type.as_deref())?;
    if let Some(expected) = expected_digest
        && manifest.digest != expected
    {
        return Err(CopyError::DigestMismatch {
            expected: expected.to_owned(),
            detail: format!("the manifest served hashes to {}", manifest.digest),
        });
    }
    Ok(manifest)
}

async fn push_manifest(
    dest: &RegistryClient,
    repository: &str,
    reference: &str,
    manifest: &RawManifest,
) -> Result<(), CopyError> {
    let path = format!("/v2/{repository}/manifests/{reference}");
    let response = dest
        .send(&[Scope::push(repository)], || {
            dest.request(Method::PUT, &path)
                .header(CONTENT_TYPE, &manifest.media_type)
                .body(manifest.bytes.clone())
        })
        .await?;
    if response.status() != StatusCode::CREATED {
        return Err(dest
            .status_error(response, &format!("push manifest {repository}:{reference}"))
            .await);
    }
    let stored = response
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok());
    if let Some(stored) = stored
        && stored != manifest.digest
    {
        return Err(CopyError::InternalRegistry {
            registry: dest.name().to_owned(),
            detail: format!(
                "stored manifest {reference} as {stored}, expected {}",
                manifest.digest
            ),
        });
    }
    Ok(())
}
