//! A CNCF distribution registry (`docker-registry serve`) on a free loopback port.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::process::{ManagedChild, free_loopback_port};
use super::{EmbeddedError, WorkDir};

const START_ATTEMPTS: usize = 5;
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How clients must authenticate to the registry.
#[derive(Debug, Clone, Default)]
pub enum RegistryAuth {
    /// Anyone may push and pull.
    #[default]
    Anonymous,
    /// HTTP basic auth checked against an htpasswd file (bcrypt entries).
    Htpasswd { htpasswd_file: PathBuf },
    /// Bearer tokens: a 401 challenge sends clients to `realm`; the registry verifies the JWT
    /// against the certificates in `root_cert_bundle`.
    Token {
        realm: String,
        service: String,
        issuer: String,
        root_cert_bundle: PathBuf,
    },
}

/// Everything that varies between the registries tailor and its tests run.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    pub auth: RegistryAuth,
    /// Refuse writes (`storage.maintenance.readonly`), as during garbage collection.
    pub read_only: bool,
    /// Where blobs and manifests live; a fresh directory when `None`.
    pub storage_dir: Option<PathBuf>,
}

/// A running distribution registry; stopped and deleted when dropped.
#[derive(Debug)]
pub struct EmbeddedRegistry {
    server: ManagedChild,
    port: u16,
    storage_dir: PathBuf,
    config_path: PathBuf,
    access_log: PathBuf,
    workdir: WorkDir,
}

impl EmbeddedRegistry {
    /// Starts `docker-registry serve` with delete enabled and the access log on.
    pub fn start(options: RegistryOptions) -> Result<Self, EmbeddedError> {
        let program = find_registry_binary()?;
        let workdir = WorkDir::new("registry")?;
        let storage_dir = options
            .storage_dir
            .clone()
            .unwrap_or_else(|| workdir.path().join("storage"));
        std::fs::create_dir_all(&storage_dir)
            .map_err(|source| EmbeddedError::io("create registry storage", source))?;

        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_loopback_port()?;
            let config_path = workdir.path().join(format!("config-{port}.yml"));
            std::fs::write(&config_path, render_config(&options, &storage_dir, port))
                .map_err(|source| EmbeddedError::io("write registry config", source))?;
            let log_path = workdir.path().join(format!("registry-{port}.log"));
            let access_log = workdir.path().join(format!("access-{port}.log"));
            let mut cmd = Command::new(&program);
            cmd.arg("serve")
                .arg(&config_path)
                .current_dir(workdir.path());
            let mut server = ManagedChild::spawn(
                "docker-registry",
                cmd,
                &log_path,
                &access_log,
                libc::SIGTERM,
            )?;
            match wait_ready(&mut server, port) {
                Ok(()) => {
                    tracing::info!(port, dir = %workdir.path().display(), "embedded registry ready");
                    return Ok(Self {
                        server,
                        port,
                        storage_dir,
                        config_path,
                        access_log,
                        workdir,
                    });
                }
                Err(detail) => last_error = detail,
            }
        }
        Err(EmbeddedError::StartFailed {
            component: "docker-registry",
            detail: last_error,
        })
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

    /// The storage driver's root directory (`docker/registry/v2/...` lives below it).
    pub fn storage_dir(&self) -> &Path {
        &self.storage_dir
    }

    /// The configuration file, as `docker-registry garbage-collect` needs it.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The Apache-style access log: one line per request with the bytes sent.
    pub fn access_log_path(&self) -> &Path {
        &self.access_log
    }

    /// The registry's own (logrus) log.
    pub fn log_path(&self) -> &Path {
        self.server.log_path()
    }

    pub fn dir(&self) -> &Path {
        self.workdir.path()
    }
}

/// The configuration tailor's registries run with: delete enabled, access log on, and the
/// `storage.maintenance.readonly` block always present (scripts/registry-gc rewrites it).
pub fn render_config(options: &RegistryOptions, storage_dir: &Path, port: u16) -> String {
    // JSON strings are valid YAML scalars and quote any path safely.
    let q = |s: &str| serde_json::to_string(s).expect("strings serialise");
    let auth = match &options.auth {
        RegistryAuth::Anonymous => String::new(),
        RegistryAuth::Htpasswd { htpasswd_file } => format!(
            "auth:\n  htpasswd:\n    realm: tailor\n    path: {}\n",
            q(&htpasswd_file.to_string_lossy())
        ),
        RegistryAuth::Token {
            realm,
            service,
            issuer,
            root_cert_bundle,
        } => format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            q(realm),
            q(service),
            q(issuer),
            q(&root_cert_bundle.to_string_lossy())
        ),
    };
    format!(
        "version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
    readonly:
      enabled: {read_only}
http:
  addr: 127.0.0.1:{port}
  secret: {secret}
{auth}",
        storage = q(&storage_dir.to_string_lossy()),
        read_only = options.read_only,
        secret = q(&uuid::Uuid::new_v4().to_string()),
    )
}

fn wait_ready(server: &mut ManagedChild, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = server.exit_status() {
            return Err(format!(
                "docker-registry exited ({status}): {}",
                server.log_tail(2048)
            ));
        }
        if matches!(probe_v2(port), Some(200 | 401)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(format!(
        "docker-registry not ready after {READY_TIMEOUT:?}: {}",
        server.log_tail(2048)
    ))
}

/// The status code of `GET /v2/` on a loopback port, or `None` while nothing answers.
pub fn probe_v2(port: u16) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 32];
    let n = stream.read(&mut head).ok()?;
    let line = std::str::from_utf8(&head[..n]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `docker-registry`: `TAILOR_REGISTRY_BIN`, else the first on `PATH`.
pub fn find_registry_binary() -> Result<PathBuf, EmbeddedError> {
    if let Some(path) = std::env::var_os("TAILOR_REGISTRY_BIN") {
        return Ok(PathBuf::from(path));
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("docker-registry"))
        .find(|candidate| candidate.is_file())
        .ok_or(EmbeddedError::NotInstalled {
            program: "docker-registry",
            hint: "install Debian's `docker-registry` package or set TAILOR_REGISTRY_BIN",
        })
}
