//! Private temporary directories for embedded components, cleaned up even after a crash.

use std::path::{Path, PathBuf};

use super::EmbeddedError;

const PREFIX: &str = "tailor-embedded-";
const OWNER_FILE: &str = "owner.pid";

/// A temporary directory owned by this process, removed on drop.
///
/// It records the owning pid so that [`WorkDir::sweep_stale`] can remove directories whose owner
/// was killed before it could clean up.
#[derive(Debug)]
pub struct WorkDir {
    dir: tempfile::TempDir,
}

impl WorkDir {
    /// Creates `$TMPDIR/tailor-embedded-<component>-XXXXXX`.
    pub fn new(component: &str) -> Result<Self, EmbeddedError> {
        Self::sweep_stale();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}{component}-"))
            .tempdir()
            .map_err(|source| EmbeddedError::io("create a temporary directory", source))?;
        std::fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())
            .map_err(|source| EmbeddedError::io("write owner.pid", source))?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Removes directories left behind by processes that no longer exist.
    pub fn sweep_stale() {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with(PREFIX) {
                continue;
            }
            let path: PathBuf = entry.path();
            let Ok(owner) = std::fs::read_to_string(path.join(OWNER_FILE)) else {
                continue;
            };
            let Ok(pid) = owner.trim().parse::<libc::pid_t>() else {
                continue;
            };
            if !process_exists(pid) {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}

fn process_exists(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
