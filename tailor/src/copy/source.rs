//! Where a copy reads from: a registry repository, or an OCI image layout in a directory or a
//! bucket (an export read back: the bootstrap import, an air-gapped site fed by directory).
//!
//! A source answers three questions: the manifest a reference names (its exact bytes, checked
//! against a pinned digest), whether it holds a blob, and the blob's bytes as a stream. The
//! copy engine checks every byte it reads from either kind the same way
//! (`blob::VerifyingStream`); nothing here is trusted more because it is local.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use crate::error::CopyError;
use crate::layout::{Layout, LayoutError};
use crate::manifest::{MAX_MANIFEST_BYTES, RawManifest};
use crate::reference::ImageReference;
use crate::registry::{BlobBody, Floor, RegistryError, Repository, TransferMeter};

/// A place a copy reads an image from.
#[derive(Debug, Clone)]
pub struct Source {
    /// What the copy records as the blobs' origin, and names in messages: the registry's
    /// name, or `oci:<dir>`.
    name: String,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Registry(Repository),
    Layout(Layout),
}

/// Which image of a source to copy: a tag or a digest, and the digest it must have when the
/// reference pinned one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// A tag or a digest; for a layout, `None` means its only image.
    reference: Option<String>,
    digest: Option<String>,
    /// The reference as the user wrote it, for messages.
    shown: String,
}

impl Wanted {
    /// The image `reference` names.
    pub fn image(reference: &ImageReference) -> Self {
        Self {
            reference: Some(reference.manifest_reference().to_owned()),
            digest: reference.digest.clone(),
            shown: reference.to_string(),
        }
    }

    /// The manifest `digest` in the registry repository `repository` (a referrer).
    pub(crate) fn digest(repository: &str, digest: &str) -> Self {
        Self {
            reference: Some(digest.to_owned()),
            digest: Some(digest.to_owned()),
            shown: format!("{repository}@{digest}"),
        }
    }

    /// In a layout: the image tagged `tag`, or with `None`, the layout's only image.
    pub fn in_layout(layout: &Layout, tag: Option<&str>) -> Self {
        let shown = match tag {
            Some(tag) => format!("{}:{tag}", layout.name()),
            None => layout.name(),
        };
        Self {
            reference: tag.map(str::to_owned),
            digest: None,
            shown,
        }
    }
}

impl std::fmt::Display for Wanted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Source {
    pub fn registry(repository: Repository) -> Self {
        Self {
            name: repository.registry().name().to_owned(),
            kind: Kind::Registry(repository),
        }
    }

    pub fn layout(layout: impl Into<Layout>) -> Self {
        let layout = layout.into();
        Self {
            name: layout.name(),
            kind: Kind::Layout(layout),
        }
    }

    /// The origin recorded for blobs read from here.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The registry repository, when the source is one.
    pub fn repository(&self) -> Option<&Repository> {
        match &self.kind {
            Kind::Registry(repository) => Some(repository),
            Kind::Layout(_) => None,
        }
    }

    /// The slowest a blob may arrive. A directory has no floor (a slow disk is slow, not
    /// hostile); a bucket has a registry's.
    pub(crate) fn floor(&self) -> Floor {
        match &self.kind {
            Kind::Registry(repository) => repository.registry().limits().floor,
            Kind::Layout(Layout::Dir(_) | Layout::Archive(_)) => Floor {
                min_bytes_per_second: 0,
                window: std::time::Duration::ZERO,
            },
            Kind::Layout(Layout::S3(_)) => Floor::default(),
        }
    }

    /// The largest image config a staging accepts from here.
    pub(crate) fn config_limit(&self) -> u64 {
        match &self.kind {
            Kind::Registry(repository) => repository.registry().limits().config_bytes,
            Kind::Layout(_) => crate::registry::Limits::default().config_bytes,
        }
    }

    /// The manifest `wanted` names.
    pub(crate) async fn top_manifest(&self, wanted: &Wanted) -> Result<RawManifest, CopyError> {
        match (&self.kind, &wanted.reference) {
            (Kind::Registry(repository), Some(reference)) => repository
                .get_manifest(reference, wanted.digest.as_deref())
                .await
                .map_err(CopyError::Source),
            (Kind::Registry(_), None) => Err(CopyError::InvalidArgument(format!(
                "{wanted}: a registry image needs a tag or a digest"
            ))),
            (Kind::Layout(layout), reference) => {
                let entry = match reference {
                    Some(r) if r.starts_with("sha256:") => None,
                    tag => Some(
                        layout
                            .entry(tag.as_deref())
                            .await
                            .map_err(CopyError::Layout)?,
                    ),
                };
                let digest = entry
                    .as_ref()
                    .map(|e| e.digest.clone())
                    .or_else(|| reference.clone())
                    .expect("a digest reference or an entry");
                let manifest = self.manifest(&digest).await?;
                if let Some(entry) = entry
                    && entry.size != manifest.bytes.len() as u64
                {
                    return Err(CopyError::Layout(LayoutError::DigestMismatch {
                        expected: digest,
                        detail: format!(
                            "index.json says {} bytes, the manifest has {}",
                            entry.size,
                            manifest.bytes.len()
                        ),
                    }));
                }
                Ok(manifest)
            }
        }
    }

    /// The manifest with digest `digest` (an index's child), checked against it.
    pub(crate) async fn manifest(&self, digest: &str) -> Result<RawManifest, CopyError> {
        match &self.kind {
            Kind::Registry(repository) => repository
                .get_manifest(digest, Some(digest))
                .await
                .map_err(CopyError::Source),
            Kind::Layout(layout) => {
                let bytes = layout
                    .read_blob(digest, MAX_MANIFEST_BYTES as u64)
                    .await
                    .map_err(CopyError::Layout)?;
                let media_type = layout
                    .listed_media_type(digest)
                    .await
                    .map_err(CopyError::Layout)?;
                Ok(RawManifest::recognise(bytes, media_type.as_deref())?)
            }
        }
    }

    /// The size of the blob `digest`, if the source holds it.
    pub(crate) async fn head_blob(&self, digest: &str) -> Result<Option<u64>, CopyError> {
        match &self.kind {
            Kind::Registry(repository) => repository
                .head_blob(digest)
                .await
                .map_err(CopyError::Source),
            Kind::Layout(layout) => layout.blob_size(digest).await.map_err(CopyError::Layout),
        }
    }

    /// The bytes of the blob `digest` (of `size` bytes) from byte `offset` on, if the source
    /// serves ranges; a layout is read whole (it is local, or a bucket read in parts anyway).
    pub(crate) async fn open_blob_from(
        &self,
        digest: &str,
        offset: u64,
        size: u64,
    ) -> Result<Rest, CopyError> {
        let Kind::Registry(repository) = &self.kind else {
            return Ok(Rest::Whole(self.open_blob(digest).await?));
        };
        let answer = repository
            .get_blob_from(digest, offset, size)
            .await
            .map_err(CopyError::Source)?;
        Ok(match answer {
            Some((body, true)) => Rest::From(SourceBody::registry(body)),
            Some((body, false)) => Rest::Whole(SourceBody::registry(body)),
            None => Rest::Unusable,
        })
    }

    /// The blob `digest`'s bytes, as they are read.
    pub(crate) async fn open_blob(&self, digest: &str) -> Result<SourceBody, CopyError> {
        match &self.kind {
            Kind::Registry(repository) => {
                let body = repository
                    .get_blob(digest)
                    .await
                    .map_err(CopyError::Source)?;
                Ok(SourceBody::registry(body))
            }
            Kind::Layout(layout) => {
                let (stream, size) = layout.open_blob(digest).await.map_err(CopyError::Layout)?;
                let meter = TransferMeter::new();
                let counted = meter.clone();
                let stream = stream.map(move |chunk| match chunk {
                    Ok(chunk) => {
                        counted.add(chunk.len() as u64);
                        Ok(chunk)
                    }
                    Err(error) => Err(CopyError::Layout(error)),
                });
                Ok(SourceBody {
                    inner: Box::pin(stream),
                    meter,
                    length: Some(size),
                    name: self.name.clone(),
                    layout: true,
                })
            }
        }
    }
}

/// What a source answered when asked for a blob from a byte on ([`Source::open_blob_from`]).
pub(crate) enum Rest {
    /// The bytes from there on.
    From(SourceBody),
    /// The whole blob: the source serves no ranges (or is a layout, read whole).
    Whole(SourceBody),
    /// A range nothing can use; ask again for the whole blob.
    Unusable,
}

/// A blob's bytes from a source, counted into a [`TransferMeter`].
pub(crate) struct SourceBody {
    inner: Pin<Box<dyn Stream<Item = Result<Bytes, CopyError>> + Send>>,
    meter: TransferMeter,
    length: Option<u64>,
    name: String,
    layout: bool,
}

impl SourceBody {
    pub(crate) fn registry(body: BlobBody) -> Self {
        Self {
            meter: body.meter(),
            length: body.content_length(),
            name: body.registry().to_owned(),
            inner: Box::pin(body.map(|chunk| chunk.map_err(CopyError::Source))),
            layout: false,
        }
    }

    /// The length the source declared, if any.
    pub(crate) fn content_length(&self) -> Option<u64> {
        self.length
    }

    /// The bytes read so far.
    pub(crate) fn meter(&self) -> TransferMeter {
        self.meter.clone()
    }

    /// The source's content is not the blob it should be.
    pub(crate) fn mismatch(&self, expected: &str, detail: String) -> CopyError {
        let expected = expected.to_owned();
        if self.layout {
            CopyError::Layout(LayoutError::DigestMismatch { expected, detail })
        } else {
            CopyError::Source(RegistryError::DigestMismatch { expected, detail })
        }
    }

    /// The source's content ended before the blob did (a layout's file shrank while read).
    pub(crate) fn ended_early(&self, expected: &str, detail: String) -> CopyError {
        if self.layout {
            self.mismatch(expected, detail)
        } else {
            CopyError::Source(RegistryError::Unreachable {
                registry: self.name.clone(),
                detail,
            })
        }
    }
}

impl Stream for SourceBody {
    type Item = Result<Bytes, CopyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}
