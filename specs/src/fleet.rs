//! A tailor deployment on one machine, as an operator scales it: one `stager-api` and any
//! number of `tailor work` processes on one PostgreSQL, every process's stderr kept in a file of
//! its own; and a watch on the database server's connections.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::{Service, stager_api};

/// How to start a fleet.
#[derive(Clone, Debug, Default)]
pub struct FleetOptions {
    pub database_url: String,
    /// host:port of the internal registry.
    pub internal: String,
    /// Hosts spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// `tailor work` processes.
    pub worker_processes: usize,
    /// Settings for `stager-api` (it runs no workers unless this says `STAGER_WORKERS`).
    pub api_env: Vec<(String, String)>,
    /// Settings for every `tailor work` process (`TAILOR_WORKERS` is theirs to set).
    pub worker_env: Vec<(String, String)>,
}

/// The running processes; killed on drop.
pub struct Fleet {
    pub api: Service,
    options: FleetOptions,
    workers: Vec<Option<Child>>,
    logs: tempfile::TempDir,
}

impl Fleet {
    pub fn start(options: FleetOptions) -> Self {
        let logs = tempfile::tempdir().expect("a log directory");
        let mut api_env: Vec<(&str, &str)> = vec![("STAGER_WORKERS", "0")];
        api_env.extend(
            options
                .api_env
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        let mut command = stager_api(
            &options.database_url,
            &options.internal,
            &options.insecure,
            &api_env,
        );
        command.stderr(log_file(logs.path().join("stager-api.log")));
        let api = Service::start_quiet(command);
        let mut fleet = Self {
            api,
            workers: Vec::new(),
            options,
            logs,
        };
        for n in 0..fleet.options.worker_processes {
            let child = fleet.spawn_worker(n);
            fleet.workers.push(Some(child));
        }
        fleet
    }

    fn spawn_worker(&self, n: usize) -> Child {
        let mut command = crate::tailor_work(
            &self.options.database_url,
            &self.options.internal,
            &self.options.insecure,
            &[],
        );
        for (name, value) in &self.options.worker_env {
            command.env(name, value);
        }
        command
            .stdout(Stdio::null())
            .stderr(log_file(self.logs.path().join(format!("worker-{n}.log"))))
            .spawn()
            .expect("start tailor work")
    }

    /// Kills worker process `n` with SIGKILL (it gets no chance to hand anything back).
    pub fn kill_worker(&mut self, n: usize) {
        if let Some(mut child) = self.workers[n].take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// Starts worker process `n` again (after [`Self::kill_worker`]).
    pub fn restart_worker(&mut self, n: usize) {
        self.kill_worker(n);
        self.workers[n] = Some(self.spawn_worker(n));
    }

    /// The pids of the running worker processes.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.workers.iter().flatten().map(Child::id).collect()
    }

    /// Everything every process wrote to stderr so far.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(self.logs.path())
            .expect("the log directory")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        paths.sort();
        for path in paths {
            all.push_str(&String::from_utf8_lossy(
                &std::fs::read(&path).unwrap_or_default(),
            ));
        }
        all
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for n in 0..self.workers.len() {
            self.kill_worker(n);
        }
    }
}

fn log_file(path: PathBuf) -> std::fs::File {
    std::fs::File::create(path).expect("a log file")
}

/// Lines saying a process ran out of database connections, or the server refused one.
pub fn connection_exhaustion(logs: &str) -> Vec<&str> {
    logs.lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("too many clients")
                || l.contains("remaining connection slots")
                || l.contains("pool timed out")
                || l.contains("pooltimedout")
        })
        .collect()
}

/// The most client connections the database server had at once, sampled every 100 ms while
/// this lives.
pub struct ConnectionPeak {
    peak: Arc<AtomicI64>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnectionPeak {
    pub async fn watch(database_url: &str) -> Self {
        let pool = tailor::db::connect(database_url, 1)
            .await
            .expect("connect to watch connections");
        let peak = Arc::new(AtomicI64::new(0));
        let seen = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                let count: Result<i64, _> = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
                )
                .fetch_one(&pool)
                .await;
                if let Ok(count) = count {
                    seen.fetch_max(count, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { peak, task }
    }

    /// The peak so far (this watch's own connection included).
    pub fn peak(&self) -> i64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for ConnectionPeak {
    fn drop(&mut self) {
        self.task.abort();
    }
}
