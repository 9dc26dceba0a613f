//! An OCI image layout in a directory (the image-spec's `image-layout.md`), written so that a
//! reader never sees a half-written blob or tag and concurrent writers never lose one.
//!
//! - A blob is streamed into a temporary file beside its final path and renamed into place
//!   only after its size and digest check out ([`BlobSink::commit`]); a sink dropped without a
//!   commit removes its temporary file. A blob path therefore only ever holds verified bytes.
//! - A tag is written last, after every blob and manifest it reaches. It is written twice:
//!   first as one small file per tag under `refs/` (dogestry's scheme: one rename publishes it,
//!   so no reader ever sees a half-written index), then into `index.json`, the spec's list,
//!   rewritten under an exclusive `flock` on `index.json.lock` by temporary file and rename.
//!   containers/image rewrites `index.json` unlocked, so two writers racing into one layout
//!   can lose a tag (containers/image#1028); here they cannot.
//!
//! Digests are `sha256:<64 hex>` and tags follow the distribution tag grammar, both checked
//! before they become paths, so no name can escape the layout's directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::code::Code;
use crate::digest::StreamingDigest;

/// The `oci-layout` file's content this writer produces and accepts.
const LAYOUT_VERSION: &str = "1.0.0";
/// The annotation naming a tag in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Largest `index.json` or `refs/` file read: a layout's lists are small; a huge one is
/// not something this writer made.
const MAX_INDEX_BYTES: u64 = 16 * 1024 * 1024;
/// Bytes a blob sink gathers before it writes to its file.
const SINK_BUFFER: usize = 256 * 1024;

/// What went wrong with a layout.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LayoutError {
    /// The directory is not an OCI image layout this writer can use, or holds entries that
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
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },
}

impl LayoutError {
    /// The stable, machine-readable code.
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid { .. } => Code::LayoutInvalid,
            Self::DigestMismatch { .. } => Code::DigestMismatch,
            Self::InvalidName(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::ImageNotFound,
            Self::Io { .. } => Code::LocationIoError,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.to_owned(),
        source: source.into(),
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

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciDir {
    root: PathBuf,
}

impl OciDir {
    /// Opens the layout at `root`, creating it (and `oci-layout`, `index.json`) if it does not
    /// exist; refuses a directory that holds something else.
    /// A directory with other content and no `oci-layout` file is refused too: a mistyped path
    /// must not scatter blobs into someone's home directory.
    pub fn create(root: &Path) -> Result<Self, LayoutError> {
        let layout = Self {
            root: root.to_owned(),
        };
        let marker = root.join("oci-layout");
        match std::fs::read(&marker) {
            Ok(bytes) => layout.check_marker(&marker, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let occupied = match std::fs::read_dir(root) {
                    Ok(mut entries) => entries.next().is_some(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                    Err(e) => return Err(io(root)(e)),
                };
                if occupied {
                    return Err(LayoutError::Invalid {
                        path: root.to_owned(),
                        detail: "the directory holds other files and no oci-layout file; \
                                 name an empty or new directory, or an OCI image layout"
                            .into(),
                    });
                }
                std::fs::create_dir_all(root).map_err(io(root))?;
                let text = format!("{{\"imageLayoutVersion\":\"{LAYOUT_VERSION}\"}}");
                write_atomically(&marker, text.as_bytes())?;
            }
            Err(e) => return Err(io(&marker)(e)),
        }
        std::fs::create_dir_all(root.join("blobs/sha256")).map_err(io(root))?;
        std::fs::create_dir_all(root.join("refs")).map_err(io(root))?;
        let _lock = layout.lock_index()?;
        let index = root.join("index.json");
        if !index.exists() {
            layout.write_index(&Index {
                schema_version: 2,
                media_type: Some(INDEX_MEDIA_TYPE.to_owned()),
                manifests: Vec::new(),
                rest: serde_json::Map::new(),
            })?;
        }
        Ok(layout)
    }

    /// Opens an existing layout for reading.
    pub fn open(root: &Path) -> Result<Self, LayoutError> {
        let marker = root.join("oci-layout");
        let bytes = std::fs::read(&marker).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LayoutError::Invalid {
                path: root.to_owned(),
                detail: "not an OCI image layout (no oci-layout file)".into(),
            },
            _ => io(&marker)(e),
        })?;
        let layout = Self {
            root: root.to_owned(),
        };
        layout.check_marker(&marker, &bytes)?;
        Ok(layout)
    }

    fn check_marker(&self, marker: &Path, bytes: &[u8]) -> Result<(), LayoutError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Marker {
            image_layout_version: String,
        }
        match serde_json::from_slice::<Marker>(bytes) {
            Ok(m) if m.image_layout_version == LAYOUT_VERSION => Ok(()),
            Ok(m) => Err(LayoutError::Invalid {
                path: marker.to_owned(),
                detail: format!(
                    "image layout version {:?}; only {LAYOUT_VERSION} is supported",
                    m.image_layout_version
                ),
            }),
            Err(e) => Err(LayoutError::Invalid {
                path: marker.to_owned(),
                detail: format!("not an oci-layout file: {e}"),
            }),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob `digest` lives (whether or not it is there).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, LayoutError> {
        let hex = checked_hex(digest)?;
        Ok(self.root.join("blobs/sha256").join(hex))
    }

    /// The size of the blob `digest`, if the layout has it.
    pub async fn blob_size(&self, digest: &str) -> Result<Option<u64>, LayoutError> {
        let path = self.blob_path(digest)?;
        match tokio::fs::metadata(&path).await {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Starts writing the blob `digest` of `size` bytes; nothing is visible until
    /// [`BlobSink::commit`].
    pub async fn begin_blob(&self, digest: &str, size: u64) -> Result<BlobSink, LayoutError> {
        let target = self.blob_path(digest)?;
        let temp = target.with_file_name(format!(
            ".tmp-{}-{}",
            checked_hex(digest)?,
            uuid::Uuid::new_v4().simple()
        ));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .await
            .map_err(io(&temp))?;
        Ok(BlobSink {
            file: Some(tokio::io::BufWriter::with_capacity(SINK_BUFFER, file)),
            temp,
            target,
            expected: digest.to_owned(),
            size,
            written: 0,
            hasher: StreamingDigest::default(),
        })
    }

    /// Writes a small blob (a manifest, a config) held in memory.
    pub async fn put_blob_bytes(&self, digest: &str, bytes: &[u8]) -> Result<(), LayoutError> {
        if self.blob_size(digest).await? == Some(bytes.len() as u64) {
            return Ok(());
        }
        let mut sink = self.begin_blob(digest, bytes.len() as u64).await?;
        sink.write(bytes).await?;
        sink.commit().await
    }

    /// Points `tag` at `descriptor` (a manifest or index already in the layout): its `refs/`
    /// file first, then its `index.json` entry, replacing the tag's earlier entry.
    pub async fn set_tag(&self, tag: &str, descriptor: &Descriptor) -> Result<(), LayoutError> {
        check_tag(tag)?;
        match self.blob_size(&descriptor.digest).await? {
            Some(size) if size == descriptor.size => {}
            _ => {
                return Err(LayoutError::Invalid {
                    path: self.root.clone(),
                    detail: format!(
                        "cannot tag {tag}: manifest {} ({} bytes) is not in the layout",
                        descriptor.digest, descriptor.size
                    ),
                });
            }
        }
        let mut entry = descriptor.clone();
        entry
            .annotations
            .insert(REF_NAME.to_owned(), tag.to_owned());
        let layout = self.clone();
        let tag = tag.to_owned();
        tokio::task::spawn_blocking(move || {
            let json = serde_json::to_vec(&entry).expect("a descriptor serialises");
            write_atomically(&layout.root.join("refs").join(&tag), &json)?;
            let _lock = layout.lock_index()?;
            let mut index = layout.read_index()?;
            index
                .manifests
                .retain(|m| m.annotations.get(REF_NAME) != Some(&tag));
            index.manifests.push(entry);
            layout.write_index(&index)
        })
        .await
        .expect("the index writer does not panic")
    }

    /// What `tag` points at: its `index.json` entry, the spec's record, which any tool that
    /// retags the layout rewrites; else its `refs/` file (a writer stopped between the two
    /// writes has published the tag there, after every blob it reaches).
    pub async fn resolve(&self, tag: &str) -> Result<Option<Descriptor>, LayoutError> {
        check_tag(tag)?;
        let layout = self.clone();
        let index = tokio::task::spawn_blocking(move || layout.read_index())
            .await
            .expect("reading the index does not panic")?;
        if let Some(entry) = index
            .manifests
            .into_iter()
            .find(|m| m.annotations.get(REF_NAME).map(String::as_str) == Some(tag))
        {
            return Ok(Some(entry));
        }
        let path = self.root.join("refs").join(tag);
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| LayoutError::Invalid {
                        path,
                        detail: format!("not a descriptor: {e}"),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// What a reader of `oci:DIR[:TAG]` copies: the manifest `tag` names or, with no tag, the
    /// one manifest `index.json` lists (several are ambiguous, and named in the message).
    pub async fn entry(&self, tag: Option<&str>) -> Result<Descriptor, LayoutError> {
        if let Some(tag) = tag {
            return self.resolve(tag).await?.ok_or_else(|| {
                LayoutError::NotFound(format!("{}: no tag {tag:?}", self.root.display()))
            });
        }
        let layout = self.clone();
        let mut manifests = tokio::task::spawn_blocking(move || layout.read_index())
            .await
            .expect("reading the index does not panic")?
            .manifests;
        match manifests.len() {
            1 => Ok(manifests.remove(0)),
            0 => Err(LayoutError::NotFound(format!(
                "{}: the layout holds no image",
                self.root.display()
            ))),
            n => {
                let tags: Vec<&str> = manifests
                    .iter()
                    .filter_map(|m| m.annotations.get(REF_NAME).map(String::as_str))
                    .take(8)
                    .collect();
                Err(LayoutError::InvalidName(format!(
                    "{}: the layout holds {n} images; name one with oci:DIR:TAG (tags: {})",
                    self.root.display(),
                    crate::text::clean(&tags.join(", "), 400)
                )))
            }
        }
    }

    /// The media type `index.json` gives `digest`, if it lists it.
    pub async fn listed_media_type(&self, digest: &str) -> Result<Option<String>, LayoutError> {
        let layout = self.clone();
        let index = tokio::task::spawn_blocking(move || layout.read_index())
            .await
            .expect("reading the index does not panic")?;
        Ok(index
            .manifests
            .into_iter()
            .find(|m| m.digest == digest)
            .map(|m| m.media_type))
    }

    /// Opens the blob `digest` for reading, with its size.
    pub async fn open_blob(&self, digest: &str) -> Result<(tokio::fs::File, u64), LayoutError> {
        let path = self.blob_path(digest)?;
        let file = tokio::fs::File::open(&path).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                LayoutError::NotFound(format!(
                    "{}: blob {digest} is not in the layout",
                    self.root.display()
                ))
            } else {
                io(&path)(e)
            }
        })?;
        let size = file.metadata().await.map_err(io(&path))?.len();
        Ok((file, size))
    }

    /// Reads a small blob (a manifest) whole, refusing more than `limit` bytes and content
    /// that does not hash to `digest`.
    pub async fn read_blob(&self, digest: &str, limit: u64) -> Result<bytes::Bytes, LayoutError> {
        use tokio::io::AsyncReadExt;
        let (file, size) = self.open_blob(digest).await?;
        if size > limit {
            return Err(LayoutError::Invalid {
                path: self.blob_path(digest)?,
                detail: format!("{size} bytes; at most {limit} are read"),
            });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        let path = self.blob_path(digest)?;
        file.take(limit + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(io(&path))?;
        let actual = crate::digest::sha256(&bytes);
        if actual != digest {
            return Err(LayoutError::DigestMismatch {
                expected: digest.to_owned(),
                detail: format!("{} holds content hashing to {actual}", path.display()),
            });
        }
        Ok(bytes.into())
    }

    /// Every tag `index.json` lists, with what it points at.
    pub fn tags(&self) -> Result<Vec<(String, Descriptor)>, LayoutError> {
        Ok(self
            .read_index()?
            .manifests
            .into_iter()
            .filter_map(|m| Some((m.annotations.get(REF_NAME)?.clone(), m)))
            .collect())
    }

    fn lock_index(&self) -> Result<IndexLock, LayoutError> {
        let path = self.root.join("index.json.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        use std::os::fd::AsRawFd;
        // Blocking: callers hold it for one read and one rename of a small file.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(&path)(std::io::Error::last_os_error()));
        }
        Ok(IndexLock { _file: file })
    }

    fn read_index(&self) -> Result<Index, LayoutError> {
        let path = self.root.join("index.json");
        let file = std::fs::File::open(&path).map_err(io(&path))?;
        let mut bytes = Vec::new();
        use std::io::Read;
        file.take(MAX_INDEX_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io(&path))?;
        if bytes.len() as u64 > MAX_INDEX_BYTES {
            return Err(LayoutError::Invalid {
                path,
                detail: format!("larger than {MAX_INDEX_BYTES} bytes"),
            });
        }
        let index: Index = serde_json::from_slice(&bytes).map_err(|e| LayoutError::Invalid {
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

    fn write_index(&self, index: &Index) -> Result<(), LayoutError> {
        let json = serde_json::to_vec(index).expect("an index serialises");
        write_atomically(&self.root.join("index.json"), &json)
    }
}

/// Released when dropped (closing the file releases the `flock`).
struct IndexLock {
    _file: std::fs::File,
}

/// A blob being written: verified as it comes, published by [`BlobSink::commit`] only.
pub struct BlobSink {
    /// Buffered: a source's chunks are small, and each write to a `tokio::fs::File` is a trip
    /// to the blocking pool.
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    temp: PathBuf,
    target: PathBuf,
    expected: String,
    size: u64,
    written: u64,
    hasher: StreamingDigest,
}

impl BlobSink {
    /// Appends `chunk`; refuses bytes beyond the declared size.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), LayoutError> {
        self.written += chunk.len() as u64;
        if self.written > self.size {
            return Err(LayoutError::DigestMismatch {
                expected: self.expected.clone(),
                detail: format!("more than the {} bytes declared", self.size),
            });
        }
        self.hasher.update(chunk);
        let file = self.file.as_mut().expect("open until committed");
        file.write_all(chunk).await.map_err(io(&self.temp))
    }

    /// Checks size and digest, flushes the bytes to disk, and renames the blob into place.
    pub async fn commit(mut self) -> Result<(), LayoutError> {
        if self.written != self.size {
            return Err(LayoutError::DigestMismatch {
                expected: self.expected.clone(),
                detail: format!("{} of {} bytes written", self.written, self.size),
            });
        }
        let actual = std::mem::take(&mut self.hasher).finish();
        if actual != self.expected {
            return Err(LayoutError::DigestMismatch {
                expected: self.expected.clone(),
                detail: format!("the content hashes to {actual}"),
            });
        }
        let mut file = self.file.take().expect("open until committed");
        file.flush().await.map_err(io(&self.temp))?;
        let file = file.into_inner();
        file.sync_all().await.map_err(io(&self.temp))?;
        drop(file);
        tokio::fs::rename(&self.temp, &self.target)
            .await
            .map_err(io(&self.target))?;
        let parent = self
            .target
            .parent()
            .expect("a blob path has a parent")
            .to_owned();
        tokio::task::spawn_blocking(move || sync_dir(&parent))
            .await
            .expect("syncing a directory does not panic")
    }
}

impl Drop for BlobSink {
    fn drop(&mut self) {
        // Committed or not, the temporary name is gone afterwards (a rename moved it).
        let _ = std::fs::remove_file(&self.temp);
    }
}

/// Writes `path` by temporary file, fsync and rename: readers see the old or the new content.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), LayoutError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let temp = path.with_file_name(format!(".tmp-{name}-{}", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.map_err(io(path))?;
    sync_dir(path.parent().expect("a layout file has a parent"))
}

/// Makes a rename in `dir` durable: without it, a crash may forget the new name.
fn sync_dir(dir: &Path) -> Result<(), LayoutError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(bytes: &[u8]) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: crate::digest::sha256(bytes),
            size: bytes.len() as u64,
            annotations: Default::default(),
        }
    }

    fn blob_files(layout: &OciDir) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(layout.root().join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_blob_appears_only_once_verified() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciDir::create(dir.path()).unwrap();
        let good = b"hello world";
        let digest = crate::digest::sha256(good);

        let mut sink = layout.begin_blob(&digest, 11).await.unwrap();
        sink.write(b"hello wurld").await.unwrap();
        let error = sink.commit().await.unwrap_err();
        assert_eq!(error.code(), Code::DigestMismatch);
        assert!(blob_files(&layout).is_empty(), "nothing left behind");

        let mut sink = layout.begin_blob(&digest, 11).await.unwrap();
        sink.write(b"hello").await.unwrap();
        drop(sink); // an interrupted copy
        assert!(blob_files(&layout).is_empty(), "nothing left behind");

        let mut sink = layout.begin_blob(&digest, 11).await.unwrap();
        assert!(
            sink.write(b"hello world!").await.is_err(),
            "more than declared"
        );
        drop(sink);
        assert!(blob_files(&layout).is_empty());

        layout.put_blob_bytes(&digest, good).await.unwrap();
        assert_eq!(blob_files(&layout), vec![digest[7..].to_owned()]);
        assert_eq!(layout.blob_size(&digest).await.unwrap(), Some(11));
    }

    #[tokio::test]
    async fn names_cannot_escape_the_layout() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciDir::create(dir.path()).unwrap();
        for digest in ["sha256:../../etc/passwd", "sha512:00", "sha256:ABC"] {
            assert_eq!(
                layout.blob_path(digest).unwrap_err().code(),
                Code::InvalidArgument
            );
        }
        for tag in ["", "../x", "a/b", ".hidden", "-x", &"a".repeat(129)] {
            assert!(check_tag(tag).is_err(), "{tag:?}");
        }
        for tag in ["latest", "v1.2.3-rc_1", "_", &"a".repeat(128)] {
            check_tag(tag).unwrap();
        }
    }

    #[tokio::test]
    async fn a_tag_needs_its_manifest_and_is_written_in_both_places() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciDir::create(dir.path()).unwrap();
        let manifest = br#"{"schemaVersion":2}"#;
        let desc = descriptor(manifest);
        let error = layout.set_tag("v1", &desc).await.unwrap_err();
        assert_eq!(error.code(), Code::LayoutInvalid);
        assert!(layout.tags().unwrap().is_empty());

        layout.put_blob_bytes(&desc.digest, manifest).await.unwrap();
        layout.set_tag("v1", &desc).await.unwrap();
        layout.set_tag("v1", &desc).await.unwrap();
        let tags = layout.tags().unwrap();
        assert_eq!(tags.len(), 1, "a tag set again replaces its entry");
        assert_eq!(tags[0].0, "v1");
        assert_eq!(
            layout.resolve("v1").await.unwrap().unwrap().digest,
            desc.digest
        );
        assert!(dir.path().join("refs/v1").exists());
        // A layout another tool wrote has no refs/: the index answers.
        std::fs::remove_file(dir.path().join("refs/v1")).unwrap();
        assert_eq!(
            layout.resolve("v1").await.unwrap().unwrap().digest,
            desc.digest
        );
        assert_eq!(layout.resolve("v2").await.unwrap(), None);

        // Another tool retags v1 in index.json only: the index wins over a stale refs/ file.
        layout.set_tag("v1", &desc).await.unwrap();
        let other = br#"{"schemaVersion":2,"other":true}"#;
        let other_desc = descriptor(other);
        layout
            .put_blob_bytes(&other_desc.digest, other)
            .await
            .unwrap();
        let index = std::fs::read_to_string(dir.path().join("index.json")).unwrap();
        std::fs::write(
            dir.path().join("index.json"),
            index.replace(&desc.digest, &other_desc.digest).replace(
                &format!("\"size\":{}", desc.size),
                &format!("\"size\":{}", other_desc.size),
            ),
        )
        .unwrap();
        assert_eq!(
            layout.resolve("v1").await.unwrap().unwrap().digest,
            other_desc.digest
        );
        // A writer stopped after refs/ and before index.json: refs/ answers.
        std::fs::copy(dir.path().join("refs/v1"), dir.path().join("refs/v3")).unwrap();
        assert_eq!(
            layout.resolve("v3").await.unwrap().unwrap().digest,
            desc.digest
        );
    }

    #[tokio::test]
    async fn writers_racing_into_one_layout_lose_no_tag() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciDir::create(dir.path()).unwrap();
        let manifest = br#"{"schemaVersion":2}"#;
        let desc = descriptor(manifest);
        layout.put_blob_bytes(&desc.digest, manifest).await.unwrap();
        // Separate handles, as separate processes would have, on a multi-threaded runtime.
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let layout = OciDir::create(dir.path()).unwrap();
                let desc = desc.clone();
                tokio::spawn(async move { layout.set_tag(&format!("t{i}"), &desc).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let mut tags: Vec<String> = layout.tags().unwrap().into_iter().map(|t| t.0).collect();
        tags.sort();
        let mut expected: Vec<String> = (0..32).map(|i| format!("t{i}")).collect();
        expected.sort();
        assert_eq!(tags, expected);
    }

    #[tokio::test]
    async fn something_else_is_refused_as_a_layout() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            OciDir::open(dir.path()).unwrap_err().code(),
            Code::LayoutInvalid
        );
        std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        assert_eq!(
            OciDir::create(dir.path()).unwrap_err().code(),
            Code::LayoutInvalid,
            "a directory of other files"
        );
        std::fs::write(
            dir.path().join("oci-layout"),
            r#"{"imageLayoutVersion":"9"}"#,
        )
        .unwrap();
        assert_eq!(
            OciDir::create(dir.path()).unwrap_err().code(),
            Code::LayoutInvalid
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "nothing written into it: {names:?}");
    }
}
