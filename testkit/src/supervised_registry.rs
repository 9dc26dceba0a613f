//! A distribution registry that can be restarted from outside, as a deployment's process
//! supervisor (monit, systemd) would: for testing `scripts/registry-gc`, which switches the
//! registry read-only by rewriting its configuration and running a restart command.
//!
//! [`crate::TestRegistry`] cannot be used for that: its server is our direct child, so a restart
//! by a shell command would leave nothing to bring it back. Here a small bash loop runs
//! `docker-registry serve CONFIG` again each time the server exits, until a stop file exists,
//! and keeps the current server's pid in a file; [`SupervisedRegistry::restart_command`] kills
//! that pid, so the next server reads the configuration as it is on disk at that moment.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tailor::embedded::{
    ManagedChild, RegistryOptions, WorkDir, find_registry_binary, free_loopback_port, probe_v2,
    render_config,
};

use crate::push::PushAuth;

const START_ATTEMPTS: usize = 5;
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The supervisor loop. On SIGTERM (our stop signal, which the kernel also sends when the test
/// process dies first) it stops the current server as well, so no orphan is left serving; the
/// server runs in the background only so that `wait` can be interrupted by that signal. The pid
/// file is replaced atomically so a restart never reads half a pid. The pause after an exit keeps
/// a server that cannot start from turning the loop into a busy one.
const SUPERVISOR: &str = r#"
bin="$1"; config="$2"; pid_file="$3"; stop_file="$4"
pid=""
trap 'touch "$stop_file"; if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null; wait "$pid"; fi; exit 0' TERM INT
while [ ! -e "$stop_file" ]; do
    "$bin" serve "$config" &
    pid=$!
    echo "$pid" > "$pid_file.tmp"
    mv -f "$pid_file.tmp" "$pid_file"
    wait "$pid" || true
    sleep 0.05
done
"#;

/// A registry under a restart loop (anonymous, delete enabled, access log on, started
/// read-write); the loop and its server are stopped when this is dropped.
pub struct SupervisedRegistry {
    supervisor: Option<ManagedChild>,
    port: u16,
    config_path: PathBuf,
    storage_dir: PathBuf,
    pid_file: PathBuf,
    stop_file: PathBuf,
    log_path: PathBuf,
    access_log: PathBuf,
    // Last, so the directory outlives everything that writes into it.
    workdir: WorkDir,
}

impl SupervisedRegistry {
    /// Starts the supervisor and waits until the registry answers.
    pub fn start() -> Self {
        crate::init();
        let program = find_registry_binary()
            .expect("docker-registry is installed (scripts/test installs it)");
        let workdir = WorkDir::new("supervised-registry").expect("a registry work directory");
        let dir = workdir.path().to_owned();
        let storage_dir = dir.join("storage");
        std::fs::create_dir_all(&storage_dir).expect("create the registry storage");
        let config_path = dir.join("config.yml");
        let pid_file = dir.join("server.pid");
        let stop_file = dir.join("stop");

        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_loopback_port().expect("a free loopback port");
            std::fs::write(
                &config_path,
                render_config(&RegistryOptions::default(), &storage_dir, port),
            )
            .expect("write the registry config");
            let _ = std::fs::remove_file(&stop_file);
            let _ = std::fs::remove_file(&pid_file);
            let log_path = dir.join(format!("registry-{port}.log"));
            let access_log = dir.join(format!("access-{port}.log"));
            let mut command = Command::new("bash");
            command
                .arg("-c")
                .arg(SUPERVISOR)
                .arg("registry-supervisor")
                .arg(&program)
                .arg(&config_path)
                .arg(&pid_file)
                .arg(&stop_file)
                .current_dir(&dir);
            let mut supervisor = ManagedChild::spawn(
                "registry-supervisor",
                command,
                &log_path,
                &access_log,
                libc::SIGTERM,
            )
            .expect("start the registry supervisor");
            match wait_until_serving(&mut supervisor, port, &log_path) {
                Ok(()) => {
                    return Self {
                        supervisor: Some(supervisor),
                        port,
                        config_path,
                        storage_dir,
                        pid_file,
                        stop_file,
                        log_path,
                        access_log,
                        workdir,
                    };
                }
                Err(detail) => {
                    // Most likely another process took the port first; try another one.
                    last_error = detail;
                    shut_down(supervisor, &stop_file, &pid_file);
                }
            }
        }
        panic!("the supervised registry did not start: {last_error}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`, the registry's host in image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// The URL a client (and `registry-gc --url`) uses; the same as [`Self::base_url`].
    pub fn url(&self) -> String {
        self.base_url()
    }

    /// The configuration file every (re)started server reads.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The storage driver's root directory (`docker/registry/v2/...` lives below it).
    pub fn storage_dir(&self) -> &Path {
        &self.storage_dir
    }

    /// The registry's work directory (config, logs, pid file, storage).
    pub fn dir(&self) -> &Path {
        self.workdir.path()
    }

    /// The registry's own log, from every server the loop has run.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The access log, from every server the loop has run.
    pub fn access_log_path(&self) -> &Path {
        &self.access_log
    }

    /// The last `max_bytes` of the registry's log, for assertion messages.
    pub fn log_tail(&self, max_bytes: usize) -> String {
        let text = std::fs::read(&self.log_path).unwrap_or_default();
        let start = text.len().saturating_sub(max_bytes);
        String::from_utf8_lossy(&text[start..]).into_owned()
    }

    /// The pid of the server serving now, if the loop has started one.
    pub fn server_pid(&self) -> Option<u32> {
        read_pid(&self.pid_file)
    }

    /// A shell command that restarts the registry as a supervisor would: it stops the current
    /// server and returns once that process is gone; the loop then starts a new server with the
    /// configuration as it is on disk now. It does not wait for the new server to answer.
    pub fn restart_command(&self) -> String {
        let pid_file = shell_quote(&self.pid_file.to_string_lossy());
        format!(
            "pid=$(cat {pid_file}) && kill -TERM \"$pid\" && \
             for _ in $(seq 400); do kill -0 \"$pid\" 2>/dev/null || exit 0; sleep 0.025; done; \
             echo \"registry server $pid did not exit\" >&2; exit 1"
        )
    }

    /// Bytes of blob storage: the sum of the apparent sizes of the files under
    /// `docker/registry/v2/blobs` (directories left out, so the figure is exactly the content
    /// the registry keeps, independent of the file system).
    pub fn blob_storage_bytes(&self) -> u64 {
        fn walk(dir: &Path) -> u64 {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return 0;
            };
            entries
                .flatten()
                .map(|entry| match entry.file_type() {
                    Ok(kind) if kind.is_dir() => walk(&entry.path()),
                    Ok(kind) if kind.is_file() => entry.metadata().map_or(0, |m| m.len()),
                    _ => 0,
                })
                .sum()
        }
        walk(&self.storage_dir.join("docker/registry/v2/blobs"))
    }

    /// Waits until the registry answers `GET /v2/` (after a restart, say); panics with the
    /// registry's log after 30 seconds.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if matches!(probe_v2(self.port), Some(200 | 401)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "the supervised registry is not answering after {READY_TIMEOUT:?}: {}",
            self.log_tail(4096)
        );
    }

    /// Pushes `image` as `repository:tag` (given as `"repository:tag"`); returns its digest.
    pub async fn push(&self, repository_tag: &str, image: &crate::BuiltImage) -> String {
        let (repository, tag) = repository_tag.rsplit_once(':').expect("repository:tag");
        crate::push_image(
            &self.base_url(),
            repository,
            tag,
            image,
            &PushAuth::Anonymous,
        )
        .await
    }
}

impl Drop for SupervisedRegistry {
    fn drop(&mut self) {
        if let Some(supervisor) = self.supervisor.take() {
            shut_down(supervisor, &self.stop_file, &self.pid_file);
        }
    }
}

/// Stops the loop and its server and waits for both: the stop file keeps the loop from starting
/// another server, SIGTERM to the loop makes it stop the current one. Whatever still runs after
/// that (the loop was killed before it could) is killed with its process group, which
/// `ManagedChild` made the loop's own and the server inherited.
fn shut_down(mut supervisor: ManagedChild, stop_file: &Path, pid_file: &Path) {
    let _ = std::fs::write(stop_file, b"");
    let group = supervisor.id() as libc::pid_t;
    let server = read_pid(pid_file);
    supervisor.stop(STOP_TIMEOUT);
    drop(supervisor);
    let Some(server) = server else { return };
    let deadline = Instant::now() + STOP_TIMEOUT;
    while in_group(server, group) {
        if Instant::now() >= deadline {
            eprintln!("registry server {server} outlived its supervisor; killing its group");
            // SAFETY: kill(2) on a process group we created; checked to still exist just above.
            unsafe {
                libc::kill(-group, libc::SIGKILL);
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` is a live process in process group `group`: a pid that was reused by an
/// unrelated process after our server exited is not ours to wait for or kill.
fn in_group(pid: u32, group: libc::pid_t) -> bool {
    // SAFETY: getpgid(2) only reads.
    let pgid = unsafe { libc::getpgid(pid as libc::pid_t) };
    pgid == group && crate::process::alive(pid)
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn wait_until_serving(
    supervisor: &mut ManagedChild,
    port: u16,
    log_path: &Path,
) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let tail = || {
        let text = std::fs::read(log_path).unwrap_or_default();
        let start = text.len().saturating_sub(2048);
        String::from_utf8_lossy(&text[start..]).into_owned()
    };
    while Instant::now() < deadline {
        if let Some(status) = supervisor.exit_status() {
            return Err(format!("the supervisor exited ({status}): {}", tail()));
        }
        if matches!(probe_v2(port), Some(200 | 401)) {
            return Ok(());
        }
        // The loop would retry a port that is taken forever; give up on it at once.
        if tail().contains("address already in use") {
            return Err(format!("port {port} is taken: {}", tail()));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(format!("not ready after {READY_TIMEOUT:?}: {}", tail()))
}

/// `text` as one single-quoted shell word.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}
