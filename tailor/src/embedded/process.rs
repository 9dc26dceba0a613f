//! A child process we started and must not leave behind.
//!
//! Every component the embedded mode and the tests start (Postgres, registries) runs as a
//! [`ManagedChild`]: in its own process group, so a terminal's Ctrl-C reaches only us and we stop
//! the children in order; with a parent-death signal, so a crash or SIGKILL of ours still takes
//! them down; and stopped (politely, then by force) when dropped.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::EmbeddedError;

/// A running child process, stopped when dropped.
#[derive(Debug)]
pub struct ManagedChild {
    name: &'static str,
    child: Child,
    stop_signal: libc::c_int,
    log_path: PathBuf,
}

impl ManagedChild {
    /// Spawns `command` with its stderr appended to `log_path` and its stdout to `stdout_path`
    /// (the same file unless the program writes something distinct there, like an access log).
    ///
    /// `stop_signal` is what asks the program to shut down cleanly; it is also the signal the
    /// kernel sends the child if this process dies first. The parent-death signal is tied to the
    /// spawning *thread*, so call this from a thread that lives as long as the child should.
    pub fn spawn(
        name: &'static str,
        mut command: Command,
        log_path: &Path,
        stdout_path: &Path,
        stop_signal: libc::c_int,
    ) -> Result<Self, EmbeddedError> {
        let open = |path: &Path| {
            File::options()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| EmbeddedError::io(format!("open log {}", path.display()), source))
        };
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(open(stdout_path)?))
            .stderr(Stdio::from(open(log_path)?));
        // SAFETY: only async-signal-safe libc calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, stop_signal as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|source| EmbeddedError::Spawn {
            program: format!("{:?}", command.get_program()),
            source,
        })?;
        Ok(Self {
            name,
            child,
            stop_signal,
            log_path: log_path.to_owned(),
        })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Where the child's output goes.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `max_bytes` of the child's output, for error messages.
    pub fn log_tail(&self, max_bytes: usize) -> String {
        let text = std::fs::read(&self.log_path).unwrap_or_default();
        let start = text.len().saturating_sub(max_bytes);
        String::from_utf8_lossy(&text[start..]).into_owned()
    }

    /// `Some(status)` once the child has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Asks the child to stop with its stop signal, waits up to `grace`, then kills it.
    pub fn stop(&mut self, grace: Duration) {
        if self.exit_status().is_some() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain kill(2) on a pid we own and have not reaped.
        unsafe {
            libc::kill(pid, self.stop_signal);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exit_status().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(component = self.name, pid, "did not stop in time; killing");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ManagedChild {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// Picks a loopback port that is free right now.
///
/// Another process can take it before our child binds it, so callers retry start-up on an
/// "address in use" failure instead of trusting this blindly.
pub fn free_loopback_port() -> Result<u16, EmbeddedError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|source| EmbeddedError::io("bind a free loopback port", source))?;
    let port = listener
        .local_addr()
        .map_err(|source| EmbeddedError::io("read the bound port", source))?
        .port();
    Ok(port)
}
