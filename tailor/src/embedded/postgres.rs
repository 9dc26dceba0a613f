//! An ephemeral PostgreSQL cluster from the machine's own binaries.

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::process::{ManagedChild, free_loopback_port};
use super::{EmbeddedError, WorkDir};

const START_ATTEMPTS: usize = 5;
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const READY_LINE: &str = "database system is ready to accept connections";

/// A throwaway PostgreSQL cluster on a free loopback port, trusted local access, no durability.
///
/// Dropping it shuts the server down and deletes its data directory.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    // Field order matters: the server must stop before its directory is deleted.
    server: ManagedChild,
    port: u16,
    workdir: WorkDir,
}

impl EmbeddedPostgres {
    /// Runs `initdb` into a temporary directory and starts `postgres` on it.
    ///
    /// PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user.
    pub fn start() -> Result<Self, EmbeddedError> {
        Self::start_on(None)
    }

    /// [`Self::start`] on `port` (one try) instead of a free port (a few tries).
    pub fn start_on(port: Option<u16>) -> Result<Self, EmbeddedError> {
        let bin = find_postgres_bin_dir()?;
        let workdir = WorkDir::new("postgres")?;
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(lookup_user("postgres")?)
        } else {
            None
        };
        let data = workdir.path().join("data");
        if let Some((uid, gid)) = run_as {
            chown(workdir.path(), uid, gid)?;
            ensure_reachable_by(workdir.path(), uid, gid)?;
        }

        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .current_dir(workdir.path());
        if let Some((uid, gid)) = run_as {
            initdb.uid(uid).gid(gid);
        }
        let output = initdb.output().map_err(|source| EmbeddedError::Spawn {
            program: "initdb".into(),
            source,
        })?;
        if !output.status.success() {
            return Err(EmbeddedError::StartFailed {
                component: "postgres",
                detail: format!("initdb failed: {}", String::from_utf8_lossy(&output.stderr)),
            });
        }

        let mut last_error = String::new();
        let attempts = if port.is_some() { 1 } else { START_ATTEMPTS };
        for _ in 0..attempts {
            let port = match port {
                Some(port) => port,
                None => free_loopback_port()?,
            };
            let log_path = workdir.path().join(format!("postgres-{port}.log"));
            let mut cmd = Command::new(bin.join("postgres"));
            cmd.arg("-D")
                .arg(&data)
                .arg("-p")
                .arg(port.to_string())
                .args(["-c", "listen_addresses=127.0.0.1"])
                .arg("-c")
                .arg(format!(
                    "unix_socket_directories={}",
                    workdir.path().display()
                ))
                // Throwaway data: trade durability for speed.
                .args([
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                ])
                // The server's default max_connections (100), as in production: tests and the
                // embedded mode see the connection budget a deployment has.
                .args(["-c", "shared_buffers=128MB"])
                .current_dir(workdir.path());
            if let Some((uid, gid)) = run_as {
                cmd.uid(uid).gid(gid);
                // The log file must be writable by the server's user.
                std::fs::File::create(&log_path)
                    .map_err(|source| EmbeddedError::io("create postgres log", source))?;
                chown(&log_path, uid, gid)?;
            }
            let mut server =
                ManagedChild::spawn("postgres", cmd, &log_path, &log_path, libc::SIGINT)?;
            match wait_ready(&mut server) {
                Ok(()) => {
                    tracing::info!(port, dir = %workdir.path().display(), "embedded postgres ready");
                    return Ok(Self {
                        server,
                        port,
                        workdir,
                    });
                }
                Err(detail) => last_error = detail,
            }
        }
        Err(EmbeddedError::StartFailed {
            component: "postgres",
            detail: last_error,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection URL for database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, name)
    }

    /// The server's process id (tests use it to simulate an outage).
    pub fn pid(&self) -> u32 {
        self.server.id()
    }

    pub fn dir(&self) -> &Path {
        self.workdir.path()
    }
}

fn wait_ready(server: &mut ManagedChild) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if server.log_tail(64 * 1024).contains(READY_LINE) {
            return Ok(());
        }
        if let Some(status) = server.exit_status() {
            return Err(format!(
                "postgres exited ({status}): {}",
                server.log_tail(2048)
            ));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(format!(
        "postgres not ready after {READY_TIMEOUT:?}: {}",
        server.log_tail(2048)
    ))
}

/// Where `initdb` and `postgres` live: `$TAILOR_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian's layout), else the directory of `pg_config --bindir`.
pub fn find_postgres_bin_dir() -> Result<PathBuf, EmbeddedError> {
    if let Some(dir) = std::env::var_os("TAILOR_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if bin.join("postgres").exists() {
            return Ok(bin);
        }
    }
    Err(EmbeddedError::NotInstalled {
        program: "postgres",
        hint: "install Debian's `postgresql` package or set TAILOR_PG_BIN to its bin directory",
    })
}

fn lookup_user(name: &str) -> Result<(u32, u32), EmbeddedError> {
    let c_name = CString::new(name).expect("user name has no NUL");
    // SAFETY: getpwnam returns a pointer into static storage, read immediately.
    let entry = unsafe { libc::getpwnam(c_name.as_ptr()) };
    if entry.is_null() {
        return Err(EmbeddedError::StartFailed {
            component: "postgres",
            detail: format!(
                "running as root, but there is no `{name}` user to run PostgreSQL as (install the `postgresql` package)"
            ),
        });
    }
    // SAFETY: checked non-null above.
    let entry = unsafe { &*entry };
    Ok((entry.pw_uid, entry.pw_gid))
}

/// Fails with the fix when a directory above `dir` (a private `$TMPDIR`, say) keeps the user
/// PostgreSQL runs as from entering it: otherwise `initdb` fails with a bare "permission denied".
fn ensure_reachable_by(dir: &Path, uid: u32, gid: u32) -> Result<(), EmbeddedError> {
    use std::os::unix::fs::MetadataExt;
    for ancestor in dir.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(ancestor) else {
            continue;
        };
        let mode = meta.mode();
        let can_enter = if meta.uid() == uid {
            mode & 0o100 != 0
        } else if meta.gid() == gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !can_enter {
            return Err(EmbeddedError::StartFailed {
                component: "postgres",
                detail: format!(
                    "running as root, PostgreSQL runs as the `postgres` user, which cannot enter {} (mode {:o}); \
                     point TMPDIR at a directory it can reach (such as /tmp) or `chmod o+x` it",
                    ancestor.display(),
                    mode & 0o7777
                ),
            });
        }
    }
    Ok(())
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), EmbeddedError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|source| EmbeddedError::io(format!("chown {}", path.display()), source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_directory_the_server_user_cannot_enter_is_named_with_the_fix() {
        let private = tempfile::tempdir().unwrap();
        let inner = private.path().join("postgres-work");
        std::fs::create_dir(&inner).unwrap();
        // Neither owner nor group of the temporary directory: only the "other" bits apply.
        let (uid, gid) = (u32::MAX - 1, u32::MAX - 1);

        std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let error = ensure_reachable_by(&inner, uid, gid)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(&private.path().display().to_string()),
            "{error}"
        );
        assert!(error.contains("TMPDIR"), "{error}");

        std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        ensure_reachable_by(&inner, uid, gid).unwrap();
    }
}
