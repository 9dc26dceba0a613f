//! An OCI image layout in a tar file (`oci-archive:FILE[:TAG]`, containers/image's transport),
//! the form that travels: the bootstrap of a first registry, a site fed by USB stick.
//!
//! - Read in place: the members' offsets are indexed once ([`OciArchive::open`]), and a blob is
//!   streamed from its offset, so reading needs no second copy on disk. Only regular members
//!   with a layout's names (`oci-layout`, `index.json`, `refs/<tag>`, `blobs/sha256/<hex>`)
//!   are indexed; anything else in the tar is ignored, and nothing is ever extracted, so a
//!   hostile member name cannot reach the filesystem. Blobs are verified by the copy as any
//!   other source's are.
//! - Written whole ([`ArchiveWriter`]): the copy goes into a directory layout beside the target,
//!   which [`ArchiveWriter::seal`] packs into a temporary file (blobs first, `index.json`
//!   last), syncs, and renames over the target. A failed copy leaves the target as it was and
//!   no temporary file or directory behind. As with containers/image, an archive holds the one
//!   image written last.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::dir::sync_dir;
use super::{BlobStream, Descriptor, Index, LayoutError, MAX_INDEX_BYTES, OciDir, checked_hex};

/// Most members indexed: far more than any image has blobs; a tar with more is not a layout.
const MAX_MEMBERS: usize = 100_000;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.to_owned(),
        source: source.into(),
    }
}

/// An OCI image layout in a tar file, read in place.
#[derive(Debug, Clone)]
pub struct OciArchive {
    path: PathBuf,
    /// Member name → (offset of its content in the file, size).
    members: Arc<HashMap<String, (u64, u64)>>,
}

impl OciArchive {
    /// Indexes the archive at `path` (blocking: it reads every member header).
    pub fn open(path: &Path) -> Result<Self, LayoutError> {
        let file = std::fs::File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LayoutError::Invalid {
                path: path.to_owned(),
                detail: "no such archive".into(),
            },
            _ => io(path)(e),
        })?;
        let not_a_tar = |e: std::io::Error| LayoutError::Invalid {
            path: path.to_owned(),
            detail: format!("not a tar archive: {e}"),
        };
        let mut archive = tar::Archive::new(std::io::BufReader::new(file));
        let mut members = HashMap::new();
        // Seeking past each member's content: opening reads the headers, not the blobs.
        for entry in archive.entries_with_seek().map_err(not_a_tar)? {
            let entry = entry.map_err(not_a_tar)?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let name = entry.path().map_err(not_a_tar)?;
            let Some(name) = layout_member(&name) else {
                continue;
            };
            if members.len() == MAX_MEMBERS {
                return Err(LayoutError::Invalid {
                    path: path.to_owned(),
                    detail: format!("more than {MAX_MEMBERS} members"),
                });
            }
            members.insert(name, (entry.raw_file_position(), entry.size()));
        }
        let archive = Self {
            path: path.to_owned(),
            members: Arc::new(members),
        };
        let marker =
            archive
                .read_member("oci-layout", 4096)?
                .ok_or_else(|| LayoutError::Invalid {
                    path: path.to_owned(),
                    detail: "not an OCI image layout archive (no oci-layout member)".into(),
                })?;
        super::check_marker(path, &marker)?;
        Ok(archive)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A small member read whole (blocking), refused over `limit` bytes.
    fn read_member(&self, name: &str, limit: u64) -> Result<Option<Vec<u8>>, LayoutError> {
        let Some(&(offset, size)) = self.members.get(name) else {
            return Ok(None);
        };
        if size > limit {
            return Err(LayoutError::Invalid {
                path: self.path.join(name),
                detail: format!("larger than {limit} bytes"),
            });
        }
        let mut file = std::fs::File::open(&self.path).map_err(io(&self.path))?;
        file.seek(SeekFrom::Start(offset)).map_err(io(&self.path))?;
        let mut bytes = Vec::with_capacity(size as usize);
        file.take(size)
            .read_to_end(&mut bytes)
            .map_err(io(&self.path))?;
        Ok(Some(bytes))
    }

    pub(super) fn read_index(&self) -> Result<Index, LayoutError> {
        match self.read_member("index.json", MAX_INDEX_BYTES)? {
            Some(bytes) => Index::parse(&bytes, self.path.join("index.json")),
            None => Ok(Index::empty()),
        }
    }

    /// What `tag` points at: its `index.json` entry, else its `refs/` member.
    pub async fn resolve(&self, tag: &str) -> Result<Option<Descriptor>, LayoutError> {
        super::check_tag(tag)?;
        let archive = self.clone();
        let tag = tag.to_owned();
        tokio::task::spawn_blocking(move || {
            if let Some(entry) = archive.read_index()?.tagged(&tag) {
                return Ok(Some(entry));
            }
            let name = format!("refs/{tag}");
            match archive.read_member(&name, MAX_INDEX_BYTES)? {
                Some(bytes) => Descriptor::parse_ref(&bytes, archive.path.join(name)).map(Some),
                None => Ok(None),
            }
        })
        .await
        .expect("reading an archive does not panic")
    }

    /// The size of the blob `digest`, if the archive has it.
    pub fn blob_size(&self, digest: &str) -> Result<Option<u64>, LayoutError> {
        let name = format!("blobs/sha256/{}", checked_hex(digest)?);
        Ok(self.members.get(&name).map(|&(_, size)| size))
    }

    /// The blob `digest`'s bytes, streamed from its offset in the archive, and its size.
    pub async fn open_blob(&self, digest: &str) -> Result<(BlobStream, u64), LayoutError> {
        let name = format!("blobs/sha256/{}", checked_hex(digest)?);
        let &(offset, size) = self.members.get(&name).ok_or_else(|| {
            LayoutError::NotFound(format!(
                "{}: blob {digest} is not in the archive",
                self.path.display()
            ))
        })?;
        let mut file = tokio::fs::File::open(&self.path)
            .await
            .map_err(io(&self.path))?;
        file.seek(SeekFrom::Start(offset))
            .await
            .map_err(io(&self.path))?;
        let path = self.path.clone();
        let stream = tokio_util::io::ReaderStream::with_capacity(file.take(size), 256 * 1024)
            .map(move |chunk| chunk.map_err(io(&path)));
        Ok((stream.boxed(), size))
    }
}

/// The layout name of a tar member, if it is one a layout has (`./` prefixes allowed).
fn layout_member(name: &Path) -> Option<String> {
    let name = name.to_str()?.trim_start_matches("./");
    let known = match name.split_once('/') {
        None => matches!(name, "oci-layout" | "index.json"),
        Some(("refs", tag)) => super::check_tag(tag).is_ok(),
        Some(("blobs", blob)) => blob
            .strip_prefix("sha256/")
            .is_some_and(|hex| checked_hex(&format!("sha256:{hex}")).is_ok()),
        Some(_) => false,
    };
    known.then(|| name.to_owned())
}

/// A copy into an archive in progress: a directory layout beside the target, packed and
/// renamed over it by [`ArchiveWriter::seal`], removed (target untouched) if dropped unsealed.
pub struct ArchiveWriter {
    target: PathBuf,
    layout: OciDir,
}

impl ArchiveWriter {
    /// Prepares writing the archive `target` (blocking).
    pub fn new(target: &Path) -> Result<Self, LayoutError> {
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                LayoutError::InvalidName(format!("{}: not a file name", target.display()))
            })?;
        if target.is_dir() {
            return Err(LayoutError::Invalid {
                path: target.to_owned(),
                detail: "a directory; an archive is a file (oci:DIR is a layout directory)".into(),
            });
        }
        let parent = match target.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        };
        let dir = parent.join(format!(".{name}.layout-{}", uuid::Uuid::new_v4().simple()));
        let layout = OciDir::create(&dir)?;
        Ok(Self {
            target: target.to_owned(),
            layout,
        })
    }

    /// The directory layout to copy into.
    pub fn layout(&self) -> &OciDir {
        &self.layout
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Packs the layout into the target: a temporary file beside it, synced, then renamed.
    pub async fn seal(self) -> Result<(), LayoutError> {
        let (root, target) = (self.layout.root().to_owned(), self.target.clone());
        tokio::task::spawn_blocking(move || pack(&root, &target))
            .await
            .expect("packing an archive does not panic")
        // `self` drops here and removes the directory.
    }
}

impl Drop for ArchiveWriter {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.layout.root());
    }
}

/// Writes the layout at `root` as a tar at `target`: `oci-layout`, blobs and `refs/` first,
/// `index.json` last; owners, modes and times fixed, so equal layouts give equal archives.
fn pack(root: &Path, target: &Path) -> Result<(), LayoutError> {
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("archive");
    let temp = target.with_file_name(format!(".{name}.tmp-{}", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        let file = std::fs::File::create(&temp).map_err(io(&temp))?;
        let mut tar = tar::Builder::new(std::io::BufWriter::with_capacity(256 * 1024, file));
        let mut members = vec!["oci-layout".to_owned()];
        for dir in ["blobs/sha256", "refs"] {
            let mut names: Vec<String> = std::fs::read_dir(root.join(dir))
                .map_err(io(&root.join(dir)))?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.'))
                .map(|n| format!("{dir}/{n}"))
                .collect();
            names.sort();
            members.extend(names);
        }
        members.push("index.json".to_owned());
        for member in &members {
            let path = root.join(member);
            let mut file = std::fs::File::open(&path).map_err(io(&path))?;
            let size = file.metadata().map_err(io(&path))?.len();
            let mut header = tar::Header::new_ustar();
            header.set_size(size);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, member, &mut file)
                .map_err(io(&temp))?;
        }
        let file = tar
            .into_inner()
            .map_err(io(&temp))?
            .into_inner()
            .map_err(|e| io(&temp)(e.into_error()))?;
        file.sync_all().map_err(io(&temp))?;
        std::fs::rename(&temp, target).map_err(io(target))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result?;
    sync_dir(
        target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_layouts_member_names_are_indexed() {
        let hex = "a".repeat(64);
        for (name, indexed) in [
            ("oci-layout", Some("oci-layout")),
            ("./index.json", Some("index.json")),
            ("refs/v1", Some("refs/v1")),
            (
                &*format!("blobs/sha256/{hex}"),
                Some(&*format!("blobs/sha256/{hex}")),
            ),
            ("blobs/sha256/short", None),
            ("refs/../../etc/passwd", None),
            ("../index.json", None),
            ("/etc/oci-layout", None),
            ("manifest.json", None),
        ] {
            assert_eq!(layout_member(Path::new(name)).as_deref(), indexed, "{name}");
        }
    }
}
