//! An OCI image layout in a directory. Blobs are streamed into a temporary file beside their
//! final path and renamed into place only after their size and digest check out
//! ([`DirBlobSink::commit`]); a sink dropped without a commit removes its temporary file, so a
//! blob path only ever holds verified bytes. `index.json` is rewritten by temporary file and
//! rename under an exclusive `flock` on `index.json.lock`; every rename is made durable by
//! syncing its directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::{
    BlobStream, Descriptor, Index, LAYOUT_VERSION, LayoutError, MAX_INDEX_BYTES, REF_NAME,
    check_tag, checked_hex, tag_entry,
};
use crate::digest::StreamingDigest;

/// Bytes a blob sink gathers before it writes to its file.
const SINK_BUFFER: usize = 256 * 1024;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.to_owned(),
        source: source.into(),
    }
}

/// The `oci-layout` file's bytes, read only if it is a regular file and at most 4 KiB (what is
/// not, a FIFO or a huge file, is refused with `InvalidData` before it can hang or fill memory).
fn read_marker(marker: &Path) -> std::io::Result<Vec<u8>> {
    const MAX_MARKER_BYTES: u64 = 4096;
    let metadata = std::fs::metadata(marker)?;
    if !metadata.is_file() || metadata.len() > MAX_MARKER_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a regular file of at most {MAX_MARKER_BYTES} bytes"),
        ));
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::open(marker)?, MAX_MARKER_BYTES),
        &mut bytes,
    )?;
    Ok(bytes)
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
        match read_marker(&marker) {
            Ok(bytes) => super::check_marker(&marker, &bytes)?,
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
            layout.write_index(&Index::empty())?;
        }
        Ok(layout)
    }

    /// Opens an existing layout for reading.
    pub fn open(root: &Path) -> Result<Self, LayoutError> {
        let marker = root.join("oci-layout");
        let bytes = read_marker(&marker).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LayoutError::Invalid {
                path: root.to_owned(),
                detail: "not an OCI image layout (no oci-layout file)".into(),
            },
            _ => io(&marker)(e),
        })?;
        let layout = Self {
            root: root.to_owned(),
        };
        super::check_marker(&marker, &bytes)?;
        Ok(layout)
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
    /// [`DirBlobSink::commit`].
    pub async fn begin_blob(&self, digest: &str, size: u64) -> Result<DirBlobSink, LayoutError> {
        let target = self.blob_path(digest)?;
        let temp = target.with_file_name(format!(
            ".tmp-{}-{}",
            checked_hex(digest)?,
            uuid::Uuid::new_v4().simple()
        ));
        // Created without an await point before the sink owns it: a copy cancelled here (a
        // sibling blob failed) must not leave a temporary file that nothing will remove.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(io(&temp))?;
        Ok(DirBlobSink {
            file: Some(tokio::io::BufWriter::with_capacity(
                SINK_BUFFER,
                tokio::fs::File::from_std(file),
            )),
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
        let entry = tag_entry(tag, descriptor);
        let layout = self.clone();
        let tag = tag.to_owned();
        tokio::task::spawn_blocking(move || {
            let json = serde_json::to_vec(&entry).expect("a descriptor serialises");
            write_atomically(&layout.root.join("refs").join(&tag), &json)?;
            let _lock = layout.lock_index()?;
            let mut index = layout.read_index()?;
            index.retag(&tag, entry);
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
        if let Some(entry) = index.tagged(tag) {
            return Ok(Some(entry));
        }
        let path = self.root.join("refs").join(tag);
        match tokio::fs::read(&path).await {
            Ok(bytes) => Descriptor::parse_ref(&bytes, path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Opens the blob `digest` for reading: its bytes as they are read, and its size.
    pub async fn open_blob(&self, digest: &str) -> Result<(BlobStream, u64), LayoutError> {
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
        let stream = tokio_util::io::ReaderStream::with_capacity(file, SINK_BUFFER)
            .map(move |chunk| chunk.map_err(io(&path)));
        Ok((stream.boxed(), size))
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

    pub(super) fn read_index(&self) -> Result<Index, LayoutError> {
        let path = self.root.join("index.json");
        let file = std::fs::File::open(&path).map_err(io(&path))?;
        let mut bytes = Vec::new();
        use std::io::Read;
        file.take(MAX_INDEX_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io(&path))?;
        Index::parse(&bytes, path)
    }

    fn write_index(&self, index: &Index) -> Result<(), LayoutError> {
        write_atomically(&self.root.join("index.json"), &index.to_json())
    }
}

/// Released when dropped (closing the file releases the `flock`).
struct IndexLock {
    _file: std::fs::File,
}

/// A blob being written: verified as it comes, published by [`DirBlobSink::commit`] only.
pub struct DirBlobSink {
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

impl DirBlobSink {
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

impl Drop for DirBlobSink {
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
pub(super) fn sync_dir(dir: &Path) -> Result<(), LayoutError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::code::Code;

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
