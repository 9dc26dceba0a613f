//! A TLS-terminating load balancer in front of registries: nginx (Debian's binary), as the HA
//! internal registry runs in production, on a free loopback port with a certificate for
//! `127.0.0.1` and `localhost` signed by a test CA.
//!
//! The configuration ([`render_config`]) is what a registry needs from a proxy: request and
//! response bodies streamed both ways and unbounded (layers are GiBs), HTTP/1.1 with keep-alive
//! to the upstreams, the client's `Host` and `X-Forwarded-Proto: https` passed on so the
//! registry writes upload `Location`s that point back at the load balancer, and failover: an
//! upstream that refuses a connection is marked down for a moment and the request goes to the
//! next one, unless it is a non-idempotent request whose bytes were already sent.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tailor::embedded::{ManagedChild, WorkDir, free_loopback_port};

use crate::access_log::{self, AccessLogEntry};
use crate::certs::TestCa;

const START_ATTEMPTS: usize = 5;
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// nginx in the foreground with its own prefix directory; stopped and deleted on drop.
pub struct LoadBalancer {
    server: Option<ManagedChild>,
    port: u16,
    ca_pem_path: PathBuf,
    access_log: PathBuf,
    // Last, so the directory outlives the server writing into it.
    workdir: WorkDir,
}

impl LoadBalancer {
    /// Starts nginx balancing over `upstreams` (`host:port`, plain HTTP) and waits until it
    /// listens.
    pub fn start(upstreams: &[String]) -> Self {
        crate::init();
        assert!(
            !upstreams.is_empty(),
            "a load balancer needs at least one upstream"
        );
        let program = find_nginx_binary();
        let workdir = WorkDir::new("nginx").expect("an nginx work directory");
        let dir = workdir.path().to_owned();
        for sub in ["tls", "ca", "temp"] {
            std::fs::create_dir_all(dir.join(sub)).expect("create nginx directories");
        }
        let ca = TestCa::new("tailor test CA");
        let (cert, key) = ca.issue(&["127.0.0.1", "localhost"]);
        std::fs::write(dir.join("tls/cert.pem"), cert).expect("write the certificate");
        std::fs::write(dir.join("tls/key.pem"), key).expect("write the key");
        let ca_pem_path = ca.write_cert_dir(&dir.join("ca"));
        let access_log = dir.join("access.log");

        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_loopback_port().expect("a free loopback port");
            let config = dir.join("nginx.conf");
            let settings = NginxSettings {
                listen: format!("127.0.0.1:{port}"),
                upstreams: upstreams.to_vec(),
                prefix: dir.clone(),
                // SAFETY: geteuid(2) only reads.
                run_as_root: unsafe { libc::geteuid() } == 0,
            };
            std::fs::write(&config, render_config(&settings)).expect("write nginx.conf");
            let _ = std::fs::remove_file(dir.join("nginx.pid"));
            let log_path = dir.join(format!("nginx-{port}.log"));
            let mut command = Command::new(&program);
            command
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&config)
                // Errors before the configuration is read (Debian's build already defaults
                // to stderr; other builds would write to a system path).
                .args(["-e", "stderr"])
                .current_dir(&dir);
            let mut server =
                ManagedChild::spawn("nginx", command, &log_path, &log_path, libc::SIGTERM)
                    .expect("start nginx");
            match wait_listening(&mut server, port, &dir.join("nginx.pid")) {
                Ok(()) => {
                    return Self {
                        server: Some(server),
                        port,
                        ca_pem_path,
                        access_log,
                        workdir,
                    };
                }
                Err(detail) => {
                    // Most likely another process took the port first.
                    last_error = detail;
                    stop_group(server);
                }
            }
        }
        panic!("nginx did not start: {last_error}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`, the registry host clients use.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `https://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("https://{}", self.host())
    }

    /// The test CA's certificate (`ca.crt`), which clients must trust.
    pub fn ca_pem_path(&self) -> &Path {
        &self.ca_pem_path
    }

    /// The directory holding `ca.crt`, as skopeo's `--src-cert-dir`/`--dest-cert-dir` take it.
    pub fn cert_dir(&self) -> &Path {
        self.ca_pem_path.parent().expect("ca.crt is in a directory")
    }

    /// nginx's access log: the same fields as the registry's (so [`access_log::parse_line`]
    /// reads it), then which upstream answered and with what status, e.g.
    /// `upstream=127.0.0.1:40001, 127.0.0.1:40002 upstream_status=502, 201` after a failover.
    pub fn access_log_path(&self) -> &Path {
        &self.access_log
    }

    /// Every request served so far.
    pub fn access_log(&self) -> Vec<AccessLogEntry> {
        access_log::read(&self.access_log)
    }

    /// The raw access log lines, upstream fields included.
    pub fn access_log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// nginx's error log (the master's stderr), for assertion messages.
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

impl Drop for LoadBalancer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            stop_group(server);
        }
    }
}

/// Stops the master (SIGTERM: fast shutdown, which stops its workers), then kills any worker
/// that outlived it: workers are not told when their master is killed, and would keep serving.
fn stop_group(mut server: ManagedChild) {
    let group = server.id() as libc::pid_t;
    let workers = crate::process::children_of(server.id());
    server.stop(STOP_TIMEOUT);
    drop(server);
    for worker in workers {
        // SAFETY: getpgid(2) only reads; kill(2) only on a live process still in the group
        // we created, so never on a pid reused by someone else.
        unsafe {
            if libc::getpgid(worker as libc::pid_t) == group && crate::process::alive(worker) {
                libc::kill(worker as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

/// Ready once the master has written its pid file, which it does only after it bound the
/// listening socket, and the port accepts connections. A connection alone could be another
/// process's that holds the port while our nginx is retrying to bind it.
fn wait_listening(server: &mut ManagedChild, port: u16, pid_file: &Path) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let pid = server.id().to_string();
    while Instant::now() < deadline {
        if let Some(status) = server.exit_status() {
            return Err(format!(
                "nginx exited ({status}): {}",
                server.log_tail(4096)
            ));
        }
        let pid_written = std::fs::read_to_string(pid_file).is_ok_and(|text| text.trim() == pid);
        if pid_written && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(format!(
        "nginx not listening after {READY_TIMEOUT:?}: {}",
        server.log_tail(4096)
    ))
}

/// What varies between load balancers.
#[derive(Debug, Clone)]
pub struct NginxSettings {
    /// `address:port` to listen on (TLS).
    pub listen: String,
    /// The registries, `host:port`, spoken to over plain HTTP.
    pub upstreams: Vec<String>,
    /// The prefix directory: `tls/cert.pem`, `tls/key.pem`, the pid file, the access log and
    /// temporary files live under it.
    pub prefix: PathBuf,
    /// nginx started as root runs its workers as `nobody`, who cannot enter a private
    /// temporary directory; a test's load balancer keeps them as root instead.
    pub run_as_root: bool,
}

/// The nginx configuration of a test load balancer; the BOSH job `registry-lb` renders the same
/// proxy settings.
pub fn render_config(settings: &NginxSettings) -> String {
    let prefix = settings.prefix.display();
    let user = if settings.run_as_root {
        "user root;\n"
    } else {
        ""
    };
    let servers: String = settings
        .upstreams
        .iter()
        .map(|upstream| format!("        server {upstream} max_fails=1 fail_timeout=2s;\n"))
        .collect();
    format!(
        r#"# Generated by testkit::load_balancer.
{user}daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
lock_file {prefix}/nginx.lock;
error_log stderr notice;

events {{
    worker_connections 1024;
}}

http {{
    log_format registry '$remote_addr - - [$time_local] "$request" $status $body_bytes_sent '
                        '"$http_referer" "$http_user_agent" '
                        'upstream=$upstream_addr upstream_status=$upstream_status';
    access_log {prefix}/access.log registry;

    # Every temporary path inside the prefix: the compiled-in defaults are system directories.
    client_body_temp_path {prefix}/temp/client_body;
    proxy_temp_path {prefix}/temp/proxy;
    fastcgi_temp_path {prefix}/temp/fastcgi;
    uwsgi_temp_path {prefix}/temp/uwsgi;
    scgi_temp_path {prefix}/temp/scgi;

    upstream registry {{
        # One refused connection marks an instance down for two seconds; then it is tried again.
{servers}        keepalive 16;
    }}

    server {{
        listen {listen} ssl;
        ssl_certificate {prefix}/tls/cert.pem;
        ssl_certificate_key {prefix}/tls/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;

        # Layers are as large as they come; the registry checks sizes and digests itself.
        client_max_body_size 0;

        location / {{
            proxy_pass http://registry;
            # HTTP/1.1 with keep-alive to the registries, and chunked request bodies passed on.
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # The registry builds absolute Locations (upload sessions) from Host and
            # X-Forwarded-Proto: the client must be sent back here, over HTTPS, not to an
            # instance. No `Forwarded` header: distribution 2.8 would take its `for=` as the host.
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Real-IP $remote_addr;

            # Stream both ways: uploads reach the registry as they arrive, downloads reach the
            # client as they are read, nothing is spooled to disk.
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_max_temp_file_size 0;

            # A dead instance refuses at once; a hung one is given up on quickly for connects
            # and slowly for reads (a large blob can pause while S3 catches up).
            proxy_connect_timeout 2s;
            proxy_send_timeout 300s;
            proxy_read_timeout 300s;
            # Failover: a request that could not be sent, or an idempotent one that got a 502 or
            # 503 or timed out, goes to the next instance. A POST or PATCH already sent, or a
            # request whose streamed body had started, is not replayed: the client retries.
            proxy_next_upstream error timeout http_502 http_503;
            proxy_next_upstream_timeout 30s;
        }}
    }}
}}
"#,
        listen = settings.listen,
    )
}

/// nginx: `TAILOR_NGINX_BIN`, else the first on `PATH`, else Debian's `/usr/sbin/nginx`
/// (`/usr/sbin` is not on every user's `PATH`).
pub fn find_nginx_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TAILOR_NGINX_BIN") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nginx is not installed: run scripts/test (it installs Debian's `nginx`) \
                 or set TAILOR_NGINX_BIN"
            )
        })
}
