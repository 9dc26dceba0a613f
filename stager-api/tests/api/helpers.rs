//! `spawn_app()`: the application on port 0 with a fresh database and internal registry.

use stager_api::config::StagerSettings;
use stager_api::startup::Application;
use tailor::config::{Secret, TailorSettings};
use testkit::{TestDatabase, TestRegistry};

pub const TOKEN: &str = "test-token-0123456789abcdef";

pub struct TestApp {
    pub address: String,
    pub internal_registry: Option<TestRegistry>,
    pub client: reqwest::Client,
}

impl TestApp {
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(format!("{}{path}", self.address))
    }

    pub fn get_authed(&self, path: &str) -> reqwest::RequestBuilder {
        self.get(path).bearer_auth(TOKEN)
    }
}

pub async fn spawn_app() -> TestApp {
    testkit::init();
    let db = TestDatabase::new().await;
    let registry = TestRegistry::anonymous();
    let settings = StagerSettings {
        tailor: TailorSettings {
            database_url: Secret::new(db.url.clone()),
            internal_registry: registry.host(),
            internal_registry_credentials: None,
            insecure_registries: vec![registry.host()],
            repo_prefix: "tailor".into(),
            default_registry: "docker.io".into(),
        },
        listen: "127.0.0.1:0".parse().unwrap(),
        api_tokens: vec![Secret::new(TOKEN)],
    };
    let pool = db.pool().await;
    let app = Application::build(&settings, pool).expect("build the app");
    let address = format!("http://{}", app.addr());
    tokio::spawn(app.run_until_stopped());
    TestApp {
        address,
        internal_registry: Some(registry),
        client: reqwest::Client::new(),
    }
}
