//! One fresh database per test.
//!
//! All tests of a run share one PostgreSQL server: the one named by `TAILOR_TEST_DATABASE_URL`
//! (the test command starts it, see `scripts/test`), or else one this process starts on first
//! use. A template database is migrated once per migration set (guarded by an advisory lock, as
//! many test processes race for it) and every test gets `CREATE DATABASE ... TEMPLATE` of it:
//! a few milliseconds, and no test sees another's rows.
//!
//! Inside a private network namespace ([`crate::netns`]) the shared server, on the host's
//! loopback, is out of reach: [`TestDatabase::private`] starts a server of the test's own there.

use std::sync::{Arc, OnceLock};

use sha2::{Digest, Sha256};
// Every formatted statement below only interpolates names this module generated.
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, PgPool};
use tailor::embedded::EmbeddedPostgres;

const TEMPLATE_LOCK_KEY: i64 = 0x7a11_0e5e;

/// A database of its own for one test. Dropped with the server at the end of the run.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    /// The server of a [`TestDatabase::private`] database, stopped when the last clone goes.
    _private_server: Option<Arc<PrivateServer>>,
}

impl TestDatabase {
    /// Creates a migrated, empty database.
    pub async fn new() -> Self {
        crate::init();
        assert!(
            !crate::netns::in_isolated_namespace(),
            "the shared test PostgreSQL is unreachable inside a private network namespace: \
             use TestDatabase::private() there"
        );
        let admin_url = server_admin_url();
        let template = ensure_template(&admin_url).await;
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("connect to the test server");
        admin
            .execute(AssertSqlSafe(format!(
                "CREATE DATABASE {name} TEMPLATE {template}"
            )))
            .await
            .expect("create the test database");
        admin.close().await.ok();
        let url = replace_database(&admin_url, &name);
        Self {
            name,
            url,
            _private_server: None,
        }
    }

    /// Creates a migrated, empty database on a PostgreSQL server of its own, started in the
    /// calling thread's network namespace: what a test inside [`crate::netns::run_isolated`]
    /// uses. The server stops when the last clone of the returned value is dropped. Slower
    /// than [`TestDatabase::new`] (an `initdb` and a full migration: a few seconds).
    pub async fn private() -> Self {
        crate::init();
        let server = PrivateServer::start().await;
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&server.admin_url)
            .await
            .expect("connect to the private server");
        admin
            .execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .expect("create the private database");
        admin.close().await.ok();
        let url = replace_database(&server.admin_url, &name);
        let mut conn = PgConnection::connect(&url)
            .await
            .expect("connect to the private database");
        tailor::db::MIGRATOR
            .run(&mut conn)
            .await
            .expect("migrate the private database");
        conn.close().await.ok();
        Self {
            name,
            url,
            _private_server: Some(Arc::new(server)),
        }
    }

    /// A small pool on this database (tests share one server at its default
    /// max_connections, as production does).
    pub async fn pool(&self) -> PgPool {
        tailor::db::connect(&self.url, 4)
            .await
            .expect("connect to the test database")
    }
}

/// The admin URL (database `postgres`) of the shared test server.
pub fn server_admin_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("TAILOR_TEST_DATABASE_URL") {
            return url;
        }
        // No shared server: start one for this process, on a thread that outlives every test
        // (the server's parent-death signal is tied to the spawning thread).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("testkit-postgres".into())
            .spawn(move || {
                let server =
                    EmbeddedPostgres::start().expect("start an embedded PostgreSQL for tests");
                tx.send(server.url("postgres")).expect("send the URL");
                // Keep the server (and this thread) alive until the process exits.
                let _server = server;
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn the postgres thread");
        rx.recv().expect("embedded PostgreSQL started")
    })
    .clone()
}

/// An [`EmbeddedPostgres`] owned by a thread of its own.
///
/// The server's parent-death signal is tied to the thread that spawned it, so it must not be
/// a Tokio worker or blocking thread (those come and go); this thread lives until the handle
/// is dropped. Spawned from the caller's thread, it shares the caller's network namespace.
#[derive(Debug)]
struct PrivateServer {
    admin_url: String,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PrivateServer {
    async fn start() -> Self {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("testkit-private-postgres".into())
            .spawn(move || {
                let server =
                    EmbeddedPostgres::start().expect("start a private PostgreSQL for the test");
                if ready_tx.send(server.url("postgres")).is_err() {
                    return;
                }
                // Returns once the sender is dropped; then the server is stopped.
                let _ = stop_rx.recv();
                drop(server);
            })
            .expect("spawn the private postgres thread");
        let admin_url = ready_rx
            .await
            .expect("the private PostgreSQL failed to start (see the panic above)");
        Self {
            admin_url,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            // Waits for the server to shut down, so nothing outlives the test.
            let _ = thread.join();
        }
    }
}

async fn ensure_template(admin_url: &str) -> String {
    let mut hasher = Sha256::new();
    for migration in tailor::db::MIGRATOR.iter() {
        hasher.update(migration.version.to_le_bytes());
        hasher.update(&*migration.checksum);
    }
    let template = format!("tailor_template_{}", &hex::encode(hasher.finalize())[..16]);

    let mut admin = PgConnection::connect(admin_url)
        .await
        .expect("connect to the test server");
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(TEMPLATE_LOCK_KEY)
        .execute(&mut admin)
        .await
        .expect("take the template lock");
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&template)
            .fetch_one(&mut admin)
            .await
            .expect("look for the template");
    if !exists {
        let building = format!("{template}_building");
        admin
            .execute(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {building}")))
            .await
            .expect("drop a half-built template");
        admin
            .execute(AssertSqlSafe(format!("CREATE DATABASE {building}")))
            .await
            .expect("create the template");
        {
            let mut conn = PgConnection::connect(&replace_database(admin_url, &building))
                .await
                .expect("connect to the template");
            tailor::db::MIGRATOR
                .run(&mut conn)
                .await
                .expect("migrate the template");
            conn.close().await.ok();
        }
        // Renamed only once complete, so no test ever clones a half-migrated template.
        admin
            .execute(AssertSqlSafe(format!(
                "ALTER DATABASE {building} RENAME TO {template}"
            )))
            .await
            .expect("publish the template");
    }
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(TEMPLATE_LOCK_KEY)
        .execute(&mut admin)
        .await
        .expect("release the template lock");
    admin.close().await.ok();
    template
}

fn replace_database(url: &str, name: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("a database URL has a path");
    format!("{base}/{name}")
}
