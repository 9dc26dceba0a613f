//! `spawn_app()`: the application on port 0 with a fresh database, an upstream "hub" and an
//! internal registry, and in-process workers.

use std::time::Duration;

use stager_api::config::{Parts, StagerSettings};
use stager_api::startup::Application;
use tailor::config::{Secret, TailorSettings};
use tailor::staging::worker::WorkerSettings;
use testkit::{TestDatabase, TestRegistry};
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "test-token-0123456789abcdef";

pub struct TestApp {
    pub address: String,
    pub pool: sqlx::PgPool,
    pub hub: TestRegistry,
    pub internal_registry: Option<TestRegistry>,
    pub client: reqwest::Client,
    pub workers: CancellationToken,
    /// Kept for the app's lifetime (a private server stops when its last handle goes).
    pub _database: TestDatabase,
    /// How [`TestApp::start_workers`] starts more workers.
    worker_settings: WorkerSettings,
}

/// Every API test also checks the error contract: each `{code}` the app answered with is one
/// `specs/openapi.yaml` documents for that operation (`stager_api::contract`).
impl Drop for TestApp {
    fn drop(&mut self) {
        self.workers.cancel();
        if !std::thread::panicking() {
            assert_eq!(
                stager_api::contract::undocumented_answers(),
                0,
                "the app answered with a code specs/openapi.yaml does not document for the \
                 operation (its log names the code and the route)"
            );
        }
    }
}

impl TestApp {
    /// Runs one attempt of the next ready staging to its recorded end, as a worker of this app
    /// would (`tailor::staging::worker::run_one`); the staging it ran, if any.
    pub async fn step(&self) -> Option<uuid::Uuid> {
        tailor::staging::worker::run_one(&self.pool, &self.worker_settings, "test-step")
            .await
            .expect("a step of the queue")
    }

    /// Starts `count` more in-process workers (for tests that let stagings wait first).
    pub async fn start_workers(&self, count: usize) {
        let pool = tailor::db::connect(&self._database.url, 4).await.unwrap();
        tokio::spawn(tailor::staging::worker::run(
            pool,
            self.worker_settings.clone(),
            count,
            self.workers.clone(),
        ));
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(format!("{}{path}", self.address))
    }

    pub fn get_authed(&self, path: &str) -> reqwest::RequestBuilder {
        self.get(path).bearer_auth(TOKEN)
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.address))
            .bearer_auth(TOKEN)
    }

    pub fn put(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .put(format!("{}{path}", self.address))
            .bearer_auth(TOKEN)
    }

    pub fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .delete(format!("{}{path}", self.address))
            .bearer_auth(TOKEN)
    }

    pub fn internal(&self) -> &TestRegistry {
        self.internal_registry
            .as_ref()
            .expect("internal registry running")
    }

    /// The tags of `repository` in the internal registry (none if it does not exist).
    pub async fn internal_tags(&self, repository: &str) -> Vec<String> {
        let response = reqwest::get(format!(
            "{}/v2/{repository}/tags/list",
            self.internal().base_url()
        ))
        .await
        .unwrap();
        if response.status() == 404 {
            return Vec::new();
        }
        let body: serde_json::Value = response.json().await.unwrap();
        body["tags"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// POSTs a staging and returns (status, body).
    pub async fn stage(&self, body: serde_json::Value) -> (u16, serde_json::Value) {
        let response = self.post("/stage").json(&body).send().await.unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    /// `GET /stage/{guid}`'s body.
    pub async fn staging(&self, staging_guid: &str) -> serde_json::Value {
        self.get_authed(&format!("/stage/{staging_guid}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Polls the staging until it has finished; panics after a minute.
    pub async fn wait_finished(&self, staging_guid: &str) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let body = self.staging(staging_guid).await;
            if matches!(
                body["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                assert_outcome_code_is_documented(&body);
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "staging {staging_guid} still {}",
                body["state"]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A staging's `error.code` must be one `specs/openapi.yaml` lists for a staging's end
/// (`Staging.error.x-error-codes`): every test that waits for a staging checks the contract.
fn assert_outcome_code_is_documented(staging: &serde_json::Value) {
    let Some(code) = staging["error"]["code"].as_str() else {
        return;
    };
    let documented = &stager_api::routes::openapi_document()["components"]["schemas"]["Staging"]["properties"]
        ["error"]["x-error-codes"];
    assert!(
        documented
            .as_array()
            .is_some_and(|codes| codes.iter().any(|c| c == code)),
        "a staging ended with {code}, which specs/openapi.yaml does not list for a staging's \
         end: {staging}"
    );
}

/// Settings for an app on port 0 with `TOKEN`, the internal registry `internal`, plain HTTP to
/// it and to `also_insecure`, loopback allowed as an egress destination (the test's upstreams
/// and callback sinks live there), and no workers, credentials key or TLS.
pub fn settings(database_url: &str, internal: &str, also_insecure: &[String]) -> StagerSettings {
    settings_with(database_url, internal, also_insecure, &[])
}

/// [`settings`] with `env` read first (it may override any of them).
pub fn settings_with(
    database_url: &str,
    internal: &str,
    also_insecure: &[String],
    env: &[(String, String)],
) -> StagerSettings {
    settings_of(parts(database_url, internal, also_insecure, env), env)
}

/// Settings built as `serve` builds them, from `parts` and the tunables in `env`.
fn settings_of(parts: Parts, env: &[(String, String)]) -> StagerSettings {
    StagerSettings::new(parts, |name| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, value)| value.clone())
    })
    .expect("valid test settings")
}

/// What [`settings_with`] builds its settings from.
fn parts(
    database_url: &str,
    internal: &str,
    also_insecure: &[String],
    env: &[(String, String)],
) -> Parts {
    let mut insecure = vec![internal.to_owned()];
    insecure.extend_from_slice(also_insecure);
    let insecure = insecure.join(",");
    let tailor = TailorSettings::from_lookup(|name| {
        if let Some((_, value)) = env.iter().find(|(k, _)| k == name) {
            return Some(value.clone());
        }
        match name {
            "DATABASE_URL" => Some(database_url.to_owned()),
            "TAILOR_INTERNAL_REGISTRY" => Some(internal.to_owned()),
            "TAILOR_INSECURE_REGISTRIES" => Some(insecure.clone()),
            "TAILOR_EGRESS_ALLOW" => Some("127.0.0.1".to_owned()),
            _ => None,
        }
    })
    .expect("valid test settings");
    Parts {
        tailor,
        listen: "127.0.0.1:0".parse().unwrap(),
        api_tokens: vec![Secret::new(TOKEN)],
        workers: 0,
        credentials_key: None,
        tls: None,
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(2, TestRegistry::anonymous()).await
}

/// The app with `workers` in-process workers (0: nothing is ever claimed) and `hub` upstream.
pub async fn spawn_app_with(workers: usize, hub: TestRegistry) -> TestApp {
    spawn(AppOptions {
        workers,
        hub: Some(hub),
        ..AppOptions::default()
    })
    .await
}

/// How [`spawn`] sets an app up.
#[derive(Default)]
pub struct AppOptions {
    /// In-process workers (0: nothing is ever claimed).
    pub workers: usize,
    /// The upstream "hub" (an anonymous registry when `None`).
    pub hub: Option<TestRegistry>,
    /// More hosts spoken to over plain HTTP (a hostile registry).
    pub also_insecure: Vec<String>,
    /// Settings read before the defaults (`TAILOR_REQUEST_TIMEOUT`, `TAILOR_LEASE_SECONDS`...).
    pub env: Vec<(String, String)>,
    /// A database of the test's own (one inside a private network namespace).
    pub database: Option<TestDatabase>,
    /// How long a staging waits in-process for the pruner to leave its repository (30 s).
    pub repository_wait: Option<Duration>,
}

impl AppOptions {
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }
}

pub async fn spawn(options: AppOptions) -> TestApp {
    testkit::init();
    let db = match options.database {
        Some(db) => db,
        None => TestDatabase::new().await,
    };
    let hub = options.hub.unwrap_or_else(TestRegistry::anonymous);
    let registry = TestRegistry::anonymous();
    let key = tailor::secrets::CredentialsKey::generate();
    let mut insecure = vec![hub.host()];
    insecure.extend(options.also_insecure);
    let settings = settings_of(
        Parts {
            workers: options.workers,
            credentials_key: Some(key),
            ..parts(&db.url, &registry.host(), &insecure, &options.env)
        },
        &options.env,
    );
    let pool = db.pool().await;
    let app = Application::build(&settings, pool.clone()).expect("build the app");
    let address = format!("http://{}", app.addr());
    let shutdown = CancellationToken::new();
    let env = options.env.clone();
    let mut worker_settings = settings.worker.clone();
    // The workers, like stager-api's own, may not call this very app back.
    worker_settings.egress = settings.egress_policy(app.addr());
    if !env.iter().any(|(k, _)| k == "TAILOR_POLL_SECONDS") {
        worker_settings.poll_interval = Duration::from_millis(500);
    }
    if let Some(wait) = options.repository_wait {
        worker_settings.repository_wait = wait;
    }
    if options.workers > 0 {
        let worker_pool = tailor::db::connect(&db.url, 4).await.unwrap();
        tokio::spawn(tailor::staging::worker::run(
            worker_pool,
            worker_settings.clone(),
            options.workers,
            shutdown.clone(),
        ));
    }
    tokio::spawn(app.run_until_stopped());
    TestApp {
        address,
        pool,
        hub,
        internal_registry: Some(registry),
        client: reqwest::Client::new(),
        workers: shutdown,
        _database: db,
        worker_settings,
    }
}
