//! OCI image layouts (the image-spec's `image-layout.md`) in a directory ([`OciDir`]), under
//! a prefix of an S3 bucket ([`S3Layout`]) or in a tar file ([`OciArchive`]), written so that
//! a reader never sees a half-written blob or tag and concurrent writers never lose one.
//!
//! - A blob gets its name only after its size and digest check out: on disk by rename from a
//!   temporary file, on S3 by completing a multipart upload (or one `PUT`) only then.
//! - A tag is written last, after every blob and manifest it reaches, twice: first as one
//!   small object per tag under `refs/` (dogestry's scheme: one atomic write publishes it, so
//!   no reader ever sees a half-written index, and it works on eventually-consistent stores),
//!   then into `index.json`, the spec's list, which concurrent writers update without losing
//!   each other's entries (a `flock` on disk, a compare-and-swap on the object's ETag on S3).
//!   containers/image rewrites `index.json` unlocked, so two writers racing into one layout
//!   can lose a tag (containers/image#1028); here they cannot.
//! - A reader resolves a tag through `index.json` first (any tool that retags a layout
//!   rewrites it), and through `refs/` when a writer stopped between the two writes.
//!
//! Digests are `sha256:<64 hex>` and tags follow the distribution tag grammar, both checked
//! before they become paths or keys, so no name can escape the layout.

mod archive;
mod dir;
mod s3;

use std::path::PathBuf;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::code::Code;

pub use archive::{ArchiveWriter, OciArchive};
pub use dir::{DirBlobSink, OciDir};
pub use s3::{S3BlobSink, S3Layout, S3Location};

/// The `oci-layout` file's content this writer produces and accepts.
const LAYOUT_VERSION: &str = "1.0.0";
/// The annotation naming a tag in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Largest `index.json` or `refs/` file read: a layout's lists are small; a huge one is
/// not something this writer made.
const MAX_INDEX_BYTES: u64 = 16 * 1024 * 1024;

/// What went wrong with a layout.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LayoutError {
    /// The location is not an OCI image layout this writer can use, or holds entries that
    /// contradict themselves.
    #[error("{path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
    /// A blob's bytes were not what its descriptor says.
    #[error("blob {expected}: {detail}")]
    DigestMismatch { expected: String, detail: String },
    /// A digest or tag that cannot name anything in a layout.
    #[error("{0}")]
    InvalidName(String),
    /// The tag or blob a reader asked for is not in the layout.
    #[error("{0}")]
    NotFound(String),
    /// The location itself does not exist (a bucket).
    #[error("{0}")]
    LocationNotFound(String),
    /// The object store refused the credentials, or access to the bucket.
    #[error("{0}")]
    Denied(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },
    /// An object store request failed (after its retries).
    #[error("{0}")]
    Store(String),
}

impl LayoutError {
    /// The stable, machine-readable code.
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid { .. } => Code::LayoutInvalid,
            Self::DigestMismatch { .. } => Code::DigestMismatch,
            Self::InvalidName(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::ImageNotFound,
            Self::LocationNotFound(_) => Code::LocationNotFound,
            Self::Denied(_) => Code::LocationDenied,
            Self::Io { .. } | Self::Store(_) => Code::LocationIoError,
        }
    }
}

/// Checks an `oci-layout` file's content (read from `path`).
fn check_marker(path: &std::path::Path, bytes: &[u8]) -> Result<(), LayoutError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Marker {
        image_layout_version: String,
    }
    match serde_json::from_slice::<Marker>(bytes) {
        Ok(m) if m.image_layout_version == LAYOUT_VERSION => Ok(()),
        Ok(m) => Err(LayoutError::Invalid {
            path: path.to_owned(),
            detail: format!(
                "image layout version {:?}; only {LAYOUT_VERSION} is supported",
                m.image_layout_version
            ),
        }),
        Err(e) => Err(LayoutError::Invalid {
            path: path.to_owned(),
            detail: format!("not an oci-layout file: {e}"),
        }),
    }
}

/// A content descriptor, as `index.json` and the `refs/` files hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

impl Descriptor {
    /// A `refs/` file's content, read from `path`.
    fn parse_ref(bytes: &[u8], path: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        serde_json::from_slice(bytes).map_err(|e| LayoutError::Invalid {
            path: path.into(),
            detail: format!("not a descriptor: {e}"),
        })
    }
}

/// `index.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    /// Whatever else another writer put there is kept as it was.
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

impl Index {
    fn empty() -> Self {
        Self {
            schema_version: 2,
            media_type: Some(INDEX_MEDIA_TYPE.to_owned()),
            manifests: Vec::new(),
            rest: Default::default(),
        }
    }

    /// `index.json`'s content, read from `path`.
    fn parse(bytes: &[u8], path: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        let path = path.into();
        if bytes.len() as u64 > MAX_INDEX_BYTES {
            return Err(LayoutError::Invalid {
                path,
                detail: format!("larger than {MAX_INDEX_BYTES} bytes"),
            });
        }
        let index: Index = serde_json::from_slice(bytes).map_err(|e| LayoutError::Invalid {
            path: path.clone(),
            detail: format!("not an image index: {e}"),
        })?;
        if index.schema_version != 2 {
            return Err(LayoutError::Invalid {
                path,
                detail: format!("schemaVersion {}; expected 2", index.schema_version),
            });
        }
        Ok(index)
    }

    fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an index serialises")
    }

    /// The entry `tag` names.
    fn tagged(&self, tag: &str) -> Option<Descriptor> {
        self.manifests
            .iter()
            .find(|m| m.annotations.get(REF_NAME).map(String::as_str) == Some(tag))
            .cloned()
    }

    /// Points `tag` at `entry` (which carries the tag's annotation), dropping its old entry.
    fn retag(&mut self, tag: &str, entry: Descriptor) {
        self.manifests
            .retain(|m| m.annotations.get(REF_NAME).map(String::as_str) != Some(tag));
        self.manifests.push(entry);
    }

    /// The one image listed, for a reader that named no tag.
    fn only_entry(mut self, name: &str) -> Result<Descriptor, LayoutError> {
        match self.manifests.len() {
            1 => Ok(self.manifests.remove(0)),
            0 => Err(LayoutError::NotFound(format!(
                "{name}: the layout holds no image"
            ))),
            n => {
                let tags: Vec<&str> = self
                    .manifests
                    .iter()
                    .filter_map(|m| m.annotations.get(REF_NAME).map(String::as_str))
                    .take(8)
                    .collect();
                Err(LayoutError::InvalidName(format!(
                    "{name}: the layout holds {n} images; name one with a tag (tags: {})",
                    crate::text::clean(&tags.join(", "), 400)
                )))
            }
        }
    }
}

/// `descriptor` annotated as the entry for `tag`.
fn tag_entry(tag: &str, descriptor: &Descriptor) -> Descriptor {
    let mut entry = descriptor.clone();
    entry
        .annotations
        .insert(REF_NAME.to_owned(), tag.to_owned());
    entry
}

/// An OCI image layout, wherever it is.
#[derive(Debug, Clone)]
pub enum Layout {
    Dir(OciDir),
    S3(S3Layout),
    /// Read only: an archive is written whole, through [`ArchiveWriter`].
    Archive(OciArchive),
}

impl From<OciDir> for Layout {
    fn from(dir: OciDir) -> Self {
        Self::Dir(dir)
    }
}

impl From<OciArchive> for Layout {
    fn from(archive: OciArchive) -> Self {
        Self::Archive(archive)
    }
}

impl From<S3Layout> for Layout {
    fn from(layout: S3Layout) -> Self {
        Self::S3(layout)
    }
}

/// A blob's bytes as they are read from a layout.
pub type BlobStream = BoxStream<'static, Result<Bytes, LayoutError>>;

impl Layout {
    /// `oci:<dir>` or `s3://<bucket>/<prefix>`: for messages and reports.
    pub fn name(&self) -> String {
        match self {
            Self::Dir(dir) => format!("oci:{}", dir.root().display()),
            Self::S3(layout) => layout.location().to_string(),
            Self::Archive(archive) => format!("oci-archive:{}", archive.path().display()),
        }
    }

    /// Refuses a write into an archive (written whole by [`ArchiveWriter`] instead).
    fn written_whole(&self) -> LayoutError {
        LayoutError::InvalidName(format!(
            "{}: an archive is written whole, as a copy's destination",
            self.name()
        ))
    }

    /// The size of the blob `digest`, if the layout has it.
    pub async fn blob_size(&self, digest: &str) -> Result<Option<u64>, LayoutError> {
        match self {
            Self::Dir(dir) => dir.blob_size(digest).await,
            Self::S3(layout) => layout.blob_size(digest).await,
            Self::Archive(archive) => archive.blob_size(digest),
        }
    }

    /// Starts writing the blob `digest` of `size` bytes; nothing is visible until
    /// [`BlobSink::commit`].
    pub async fn begin_blob(&self, digest: &str, size: u64) -> Result<BlobSink, LayoutError> {
        match self {
            Self::Dir(dir) => Ok(BlobSink::Dir(dir.begin_blob(digest, size).await?)),
            Self::S3(layout) => Ok(BlobSink::S3(layout.begin_blob(digest, size)?)),
            Self::Archive(_) => Err(self.written_whole()),
        }
    }

    /// Writes a small blob (a manifest) held in memory, verified first.
    pub async fn put_blob_bytes(&self, digest: &str, bytes: &[u8]) -> Result<(), LayoutError> {
        match self {
            Self::Dir(dir) => dir.put_blob_bytes(digest, bytes).await,
            Self::S3(layout) => layout.put_blob_bytes(digest, bytes).await,
            Self::Archive(_) => Err(self.written_whole()),
        }
    }

    /// Points `tag` at `descriptor`, a manifest already in the layout: `refs/<tag>`, then
    /// `index.json`.
    pub async fn set_tag(&self, tag: &str, descriptor: &Descriptor) -> Result<(), LayoutError> {
        match self {
            Self::Dir(dir) => dir.set_tag(tag, descriptor).await,
            Self::S3(layout) => layout.set_tag(tag, descriptor).await,
            Self::Archive(_) => Err(self.written_whole()),
        }
    }

    /// What `tag` points at, if anything.
    pub async fn resolve(&self, tag: &str) -> Result<Option<Descriptor>, LayoutError> {
        match self {
            Self::Dir(dir) => dir.resolve(tag).await,
            Self::S3(layout) => layout.resolve(tag).await,
            Self::Archive(archive) => archive.resolve(tag).await,
        }
    }

    async fn index(&self) -> Result<Index, LayoutError> {
        match self {
            Self::Dir(dir) => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || dir.read_index())
                    .await
                    .expect("reading the index does not panic")
            }
            Self::S3(layout) => Ok(layout.read_index().await?.0),
            Self::Archive(archive) => {
                let archive = archive.clone();
                tokio::task::spawn_blocking(move || archive.read_index())
                    .await
                    .expect("reading the index does not panic")
            }
        }
    }

    /// What a reader of `LOCATION[:TAG]` copies: the manifest `tag` names or, with no tag,
    /// the one manifest `index.json` lists (several are ambiguous, and named in the message).
    pub async fn entry(&self, tag: Option<&str>) -> Result<Descriptor, LayoutError> {
        match tag {
            Some(tag) => self
                .resolve(tag)
                .await?
                .ok_or_else(|| LayoutError::NotFound(format!("{}: no tag {tag:?}", self.name()))),
            None => self.index().await?.only_entry(&self.name()),
        }
    }

    /// The images `index.json` lists, with their annotations.
    pub async fn entries(&self) -> Result<Vec<Descriptor>, LayoutError> {
        Ok(self.index().await?.manifests)
    }

    /// The media type `index.json` gives `digest`, if it lists it.
    pub async fn listed_media_type(&self, digest: &str) -> Result<Option<String>, LayoutError> {
        Ok(self
            .index()
            .await?
            .manifests
            .into_iter()
            .find(|m| m.digest == digest)
            .map(|m| m.media_type))
    }

    /// The blob `digest`'s bytes as they are read, and its size.
    pub async fn open_blob(&self, digest: &str) -> Result<(BlobStream, u64), LayoutError> {
        match self {
            Self::Dir(dir) => dir.open_blob(digest).await,
            Self::S3(layout) => layout.open_blob(digest).await,
            Self::Archive(archive) => archive.open_blob(digest).await,
        }
    }

    /// Reads a small blob (a manifest) whole, refusing more than `limit` bytes and content
    /// that does not hash to `digest`.
    pub async fn read_blob(&self, digest: &str, limit: u64) -> Result<Bytes, LayoutError> {
        use futures_util::TryStreamExt;
        let (stream, size) = self.open_blob(digest).await?;
        if size > limit {
            return Err(LayoutError::Invalid {
                path: format!("{}: blob {digest}", self.name()).into(),
                detail: format!("{size} bytes; at most {limit} are read"),
            });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        let mut stream = stream;
        while let Some(chunk) = stream.try_next().await? {
            if (bytes.len() + chunk.len()) as u64 > limit {
                return Err(LayoutError::Invalid {
                    path: format!("{}: blob {digest}", self.name()).into(),
                    detail: format!("more than {limit} bytes"),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        let actual = crate::digest::sha256(&bytes);
        if actual != digest {
            return Err(LayoutError::DigestMismatch {
                expected: digest.to_owned(),
                detail: format!("{} holds content hashing to {actual}", self.name()),
            });
        }
        Ok(bytes.into())
    }
}

/// A blob being written into a layout, published by [`BlobSink::commit`] only.
pub enum BlobSink {
    Dir(DirBlobSink),
    S3(S3BlobSink),
}

impl BlobSink {
    /// Appends `chunk`; refuses bytes beyond the declared size.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), LayoutError> {
        match self {
            Self::Dir(sink) => sink.write(chunk).await,
            Self::S3(sink) => sink.write(chunk).await,
        }
    }

    /// Checks size and digest, and only then gives the blob its name.
    pub async fn commit(self) -> Result<(), LayoutError> {
        match self {
            Self::Dir(sink) => sink.commit().await,
            Self::S3(sink) => sink.commit().await,
        }
    }
}

/// The hex of a `sha256:<64 hex>` digest, the only kind a layout names.
fn checked_hex(digest: &str) -> Result<&str, LayoutError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(hex)
        }
        _ => Err(LayoutError::InvalidName(format!(
            "{digest:?} is not a sha256 digest"
        ))),
    }
}

/// The distribution tag grammar: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn check_tag(tag: &str) -> Result<(), LayoutError> {
    let mut bytes = tag.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    if first_ok
        && tag.len() <= 128
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        Ok(())
    } else {
        Err(LayoutError::InvalidName(format!(
            "{tag:?} is not a tag (letters, digits, '_', '.' and '-', at most 128, not starting with '.' or '-')"
        )))
    }
}
