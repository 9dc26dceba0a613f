//! A CNCF distribution registry (`docker-registry serve`) on a loopback port.
//!
//! Storage is a local directory by default, or an S3 bucket: several registries sharing one
//! bucket and one `http.secret` serve the same content, which is how the internal registry is
//! made highly available behind a load balancer.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::process::{ManagedChild, free_loopback_port};
use super::{EmbeddedError, WorkDir};
use crate::config::Secret;

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

/// Where the registry keeps blobs and manifests.
#[derive(Debug, Clone, Default)]
pub enum RegistryStorage {
    /// A local directory: [`RegistryOptions::storage_dir`], or a fresh one.
    #[default]
    Filesystem,
    /// An S3 bucket (AWS or a compatible store such as SeaweedFS or MinIO).
    S3(S3Storage),
}

/// distribution's `storage.s3` settings.
#[derive(Debug, Clone)]
pub struct S3Storage {
    /// `regionendpoint`: the URL of an S3-compatible store; `None` for AWS itself.
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: Secret,
    /// `forcepathstyle`: `http://host/bucket/key` instead of `http://bucket.host/key`, which
    /// loopback and most self-hosted stores need. distribution 2.8 already uses path style
    /// whenever `regionendpoint` is set and ignores the key; 3.x reads it.
    pub force_path_style: bool,
    /// `secure`: HTTPS to the store. Off for a plain-HTTP endpoint on loopback.
    pub secure: bool,
    /// `rootdirectory`: the key prefix everything lives under; the bucket's root when `None`.
    pub root_directory: Option<String>,
}

/// Everything that varies between the registries tailor and its tests run.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    pub auth: RegistryAuth,
    /// Refuse writes (`storage.maintenance.readonly`), as during garbage collection.
    pub read_only: bool,
    /// With filesystem storage, where blobs and manifests live; a fresh directory when `None`.
    pub storage_dir: Option<PathBuf>,
    /// Filesystem (the default) or S3.
    pub storage: RegistryStorage,
    /// `http.secret`, which signs upload state: registries that serve one address must share
    /// it, or an upload started on one cannot finish on another. A fresh random one when `None`.
    pub http_secret: Option<Secret>,
    /// Listen on this loopback port (so a stopped registry can come back at the same address);
    /// a free one when `None`.
    pub port: Option<u16>,
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
        if matches!(options.storage, RegistryStorage::Filesystem) {
            std::fs::create_dir_all(&storage_dir)
                .map_err(|source| EmbeddedError::io("create registry storage", source))?;
        }

        let mut last_error = String::new();
        for attempt in 0..START_ATTEMPTS {
            let port = match options.port {
                Some(port) => {
                    // A fixed port may still be held for a moment by a registry that was just
                    // stopped; give it that moment instead of failing at once.
                    if attempt > 0 {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    port
                }
                None => free_loopback_port()?,
            };
            let config_path = workdir.path().join(format!("config-{port}.yml"));
            std::fs::write(&config_path, render_config(&options, &storage_dir, port))
                .map_err(|source| EmbeddedError::io("write registry config", source))?;
            let log_path = workdir.path().join(format!("registry-{port}.log"));
            let access_log = workdir.path().join(format!("access-{port}.log"));
            let mut cmd = Command::new(&program);
            cmd.arg("serve")
                .arg(&config_path)
                .current_dir(workdir.path())
                // With S3 storage, Debian's 2.8.2 panics at start-up when this is set: the AWS
                // SDK cannot load a CA bundle into distribution's own HTTP transport
                // ("LoadCustomCABundleError ... transport unsupported type").
                .env_remove("AWS_CA_BUNDLE");
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

    /// The storage driver's root directory (`docker/registry/v2/...` lives below it). With S3
    /// storage the content is in the bucket instead and this directory is never created.
    pub fn storage_dir(&self) -> &Path {
        &self.storage_dir
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.server.id()
    }

    /// Kills the server with SIGKILL, as a crash or an OOM kill would, and waits until it is
    /// gone. Its port is free again afterwards; nothing is cleaned up on its behalf.
    pub fn kill(&mut self) {
        if self.server.exit_status().is_none() {
            // SAFETY: kill(2) on our own child, which has not been reaped (checked just above).
            unsafe {
                libc::kill(self.server.id() as libc::pid_t, libc::SIGKILL);
            }
        }
        // Reaps it; SIGKILL cannot be ignored, so the grace is never used up.
        self.server.stop(Duration::from_secs(10));
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        self.server.exit_status().is_none()
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
    let storage = match &options.storage {
        RegistryStorage::Filesystem => format!(
            "  filesystem:\n    rootdirectory: {}\n",
            q(&storage_dir.to_string_lossy())
        ),
        RegistryStorage::S3(s3) => render_s3(s3),
    };
    let secret = match &options.http_secret {
        Some(secret) => secret.expose().to_owned(),
        None => uuid::Uuid::new_v4().to_string(),
    };
    format!(
        "version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
{storage}  delete:
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
        read_only = options.read_only,
        secret = q(&secret),
    )
}

/// The `storage.s3` block, plus `storage.redirect.disable`: by default distribution answers a
/// blob GET with a redirect to a pre-signed bucket URL, which clients of an internal registry
/// (and of a load balancer in front of it) may have no route to; reads stay on the registry.
fn render_s3(s3: &S3Storage) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("strings serialise");
    let mut block = format!(
        "  s3:\n    region: {}\n    bucket: {}\n    accesskey: {}\n    secretkey: {}\n    \
         secure: {}\n    forcepathstyle: {}\n    v4auth: true\n",
        q(&s3.region),
        q(&s3.bucket),
        q(&s3.access_key),
        q(s3.secret_key.expose()),
        s3.secure,
        s3.force_path_style,
    );
    if let Some(endpoint) = &s3.endpoint {
        block.push_str(&format!("    regionendpoint: {}\n", q(endpoint)));
    }
    if let Some(root) = &s3.root_directory {
        block.push_str(&format!("    rootdirectory: {}\n", q(root)));
    }
    block.push_str("  redirect:\n    disable: true\n");
    block
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
        // An answer alone could come from another process holding a fixed port; ours says it
        // is listening once it has bound the port.
        if matches!(probe_v2(port), Some(200 | 401))
            && server.log_tail(64 * 1024).contains("listening on ")
        {
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
