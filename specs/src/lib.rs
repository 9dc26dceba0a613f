//! Black-box acceptance harness: runs the built `tailor` and `stager-api` binaries as a
//! platform would, and talks to them only over HTTP, the CLI and signals.
//!
//! The binaries are the ones cargo built next to this test executable (`target/<profile>/`);
//! the README's test command builds them before running the suite.

pub mod bosh;
pub mod fleet;
pub mod scale;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Path of a workspace binary built in the same profile as this test.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile> directory")
        .join(name);
    assert!(
        path.is_file(),
        "{} is not built; run `cargo build --workspace --bins` (the README's test command does)",
        path.display()
    );
    path
}

/// The API token every spec uses.
pub const TOKEN: &str = "spec-token-0123456789abcdef";

/// The egress exception every spec needs: upstreams and callback sinks live on loopback.
pub const EGRESS_ALLOW_LOOPBACK: &str = "127.0.0.1";

/// `stager-api` configured from a clean environment: `database_url`, the internal registry
/// `internal`, plain HTTP to every host in `insecure`, loopback allowed as an egress
/// destination, port 0, and `extra` settings (which may override any of these).
pub fn stager_api(
    database_url: &str,
    internal: &str,
    insecure: &[String],
    extra: &[(&str, &str)],
) -> Command {
    let mut command = Command::new(binary("stager-api"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url)
        .env("TAILOR_INTERNAL_REGISTRY", internal)
        .env("TAILOR_INSECURE_REGISTRIES", insecure.join(","))
        .env("TAILOR_EGRESS_ALLOW", EGRESS_ALLOW_LOOPBACK)
        .env("STAGER_API_TOKENS", TOKEN)
        .env("STAGER_LISTEN", "127.0.0.1:0");
    for (key, value) in extra {
        command.env(key, value);
    }
    command
}

/// `tailor work` configured from a clean environment as [`stager_api`] is (without its token
/// and listener), with `extra` settings.
pub fn tailor_work(
    database_url: &str,
    internal: &str,
    insecure: &[String],
    extra: &[(&str, &str)],
) -> Command {
    let mut command = Command::new(binary("tailor"));
    command
        .arg("work")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url)
        .env("TAILOR_INTERNAL_REGISTRY", internal)
        .env("TAILOR_INSECURE_REGISTRIES", insecure.join(","))
        .env("TAILOR_EGRESS_ALLOW", EGRESS_ALLOW_LOOPBACK);
    for (key, value) in extra {
        command.env(key, value);
    }
    command
}

/// A whole number from the environment (a benchmark's or a long test's size), or `default`.
pub fn tunable(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `POST /stage` with `body`; asserts 202 and returns the staging.
pub async fn stage(api: &Service, body: serde_json::Value) -> serde_json::Value {
    let response = reqwest::Client::new()
        .post(format!("{}/stage", api.base_url))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .expect("POST /stage");
    assert_eq!(response.status(), 202);
    response.json().await.expect("a staging")
}

/// `GET /stage/{guid}`.
pub async fn get(api: &Service, guid: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("{}/stage/{guid}", api.base_url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET /stage")
        .json()
        .await
        .expect("a staging")
}

/// `GET /metrics`, as Prometheus scrapes it.
pub async fn metrics(api: &Service) -> String {
    reqwest::Client::new()
        .get(format!("{}/metrics", api.base_url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("the metrics text")
}

/// Polls every few milliseconds until the staging has finished; panics after `timeout`.
pub async fn wait_finished(api: &Service, guid: &str, timeout: Duration) -> serde_json::Value {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let body = get(api, guid).await;
        if matches!(
            body["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "staging {guid} still {}",
            body["state"]
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A service binary we started; killed on drop if still running.
pub struct Service {
    pub child: Child,
    /// `http://127.0.0.1:<port>`, from the service's start-up line.
    pub base_url: String,
}

impl Service {
    /// Spawns `command` and waits for its `... listening on http://...` line on stdout.
    pub fn start(mut command: Command) -> Self {
        command.stderr(Stdio::inherit());
        Self::start_quiet(command)
    }

    /// Like [`Service::start`], leaving stderr as the caller configured it.
    pub fn start_quiet(mut command: Command) -> Self {
        command.stdout(Stdio::piped()).stdin(Stdio::null());
        let mut child = command.spawn().expect("spawn the service");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.split("listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let base_url = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the service printed its listening address");
        Self { child, base_url }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` and waits for the process to exit; returns its exit code.
    pub fn signal_and_wait(&mut self, signal: libc::c_int, timeout: Duration) -> Option<i32> {
        // SAFETY: kill(2) on our own, unreaped child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "service {} did not exit within {timeout:?} of signal {signal}",
            self.child.id()
        );
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub use testkit::process::{alive, children_of};
