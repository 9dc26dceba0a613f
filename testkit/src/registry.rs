//! Registries for tests: the upstream "Hub" and the internal registry, in every auth mode.

use std::path::PathBuf;

use tailor::embedded::{EmbeddedRegistry, RegistryAuth, RegistryOptions};

use crate::access_log::{self, AccessLogEntry};
use crate::push::PushAuth;
use crate::token_issuer::{ISSUER, IssuerPolicy, SERVICE, TokenIssuer};

/// A distribution registry started for one test; stopped and deleted on drop.
pub struct TestRegistry {
    // Declared first so the registry stops before the issuer it depends on.
    registry: EmbeddedRegistry,
    credentials: Option<(String, String)>,
    issuer: Option<TokenIssuer>,
    _htpasswd_dir: Option<tempfile::TempDir>,
}

impl TestRegistry {
    /// Anyone may push and pull.
    pub fn anonymous() -> Self {
        crate::init();
        Self {
            registry: EmbeddedRegistry::start(RegistryOptions::default())
                .expect("start a registry"),
            credentials: None,
            issuer: None,
            _htpasswd_dir: None,
        }
    }

    /// HTTP basic auth with one user.
    pub fn htpasswd(username: &str, password: &str) -> Self {
        crate::init();
        let dir = tempfile::tempdir().expect("htpasswd directory");
        let htpasswd_file = dir.path().join("htpasswd");
        let hash = bcrypt::hash(password, 4).expect("bcrypt");
        std::fs::write(&htpasswd_file, format!("{username}:{hash}\n")).expect("write htpasswd");
        let registry = EmbeddedRegistry::start(RegistryOptions {
            auth: RegistryAuth::Htpasswd { htpasswd_file },
            ..Default::default()
        })
        .expect("start an htpasswd registry");
        Self {
            registry,
            credentials: Some((username.into(), password.into())),
            issuer: None,
            _htpasswd_dir: Some(dir),
        }
    }

    /// Bearer tokens from a [`TokenIssuer`], through the real 401 challenge flow.
    pub fn token(policy: IssuerPolicy) -> Self {
        crate::init();
        let issuer = TokenIssuer::start(policy.clone());
        let registry = EmbeddedRegistry::start(RegistryOptions {
            auth: RegistryAuth::Token {
                realm: issuer.realm(),
                service: SERVICE.into(),
                issuer: ISSUER.into(),
                root_cert_bundle: issuer.root_cert_bundle().to_owned(),
            },
            ..Default::default()
        })
        .expect("start a token-auth registry");
        Self {
            registry,
            credentials: Some((policy.username, policy.password)),
            issuer: Some(issuer),
            _htpasswd_dir: None,
        }
    }

    /// A token registry with user `tailor` / `s3cret-pass` and no anonymous access.
    pub fn token_default() -> Self {
        Self::token(IssuerPolicy {
            username: "tailor".into(),
            password: "s3cret-pass".into(),
            anonymous_pull: false,
            expires_in: 300,
        })
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        self.registry.host()
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        self.registry.base_url()
    }

    /// The user and password, when the registry needs them.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    pub fn issuer(&self) -> Option<&TokenIssuer> {
        self.issuer.as_ref()
    }

    /// How test set-up authenticates its pushes to `repository`.
    pub fn push_auth(&self, repository: &str) -> PushAuth {
        match (&self.issuer, &self.credentials) {
            (Some(issuer), _) => {
                PushAuth::Bearer(issuer.mint(repository, &["pull", "push", "delete"]))
            }
            (None, Some((u, p))) => PushAuth::Basic(u.clone(), p.clone()),
            (None, None) => PushAuth::Anonymous,
        }
    }

    /// Pushes `image` as `repository:tag` (given as `"repository:tag"`); returns its digest.
    pub async fn push(&self, repository_tag: &str, image: &crate::BuiltImage) -> String {
        let (repository, tag) = repository_tag.rsplit_once(':').expect("repository:tag");
        crate::push_image(
            &self.base_url(),
            repository,
            tag,
            image,
            &self.push_auth(repository),
        )
        .await
    }

    /// Pushes `index` and its children as `repository:tag`; returns the index digest.
    pub async fn push_index(&self, repository_tag: &str, index: &crate::BuiltIndex) -> String {
        let (repository, tag) = repository_tag.rsplit_once(':').expect("repository:tag");
        crate::push_index(
            &self.base_url(),
            repository,
            tag,
            index,
            &self.push_auth(repository),
        )
        .await
    }

    /// Pushes `artifacts` (each naming `subject` as its `subject`) as a client does to a
    /// registry without the referrers API (oras, regclient, cosign 2 with OCI 1.1 mode): each
    /// by digest, and the `sha256-<hex>` index listing them (OCI distribution-spec 1.1's
    /// fallback tag schema). Returns the index's digest.
    pub async fn push_referrers(
        &self,
        repository: &str,
        subject: &str,
        artifacts: &[crate::BuiltImage],
    ) -> String {
        let auth = self.push_auth(repository);
        let mut entries = Vec::new();
        for artifact in artifacts {
            crate::push_image(
                &self.base_url(),
                repository,
                &artifact.digest,
                artifact,
                &auth,
            )
            .await;
            let manifest: serde_json::Value = serde_json::from_slice(&artifact.manifest).unwrap();
            let mut entry = serde_json::json!({
                "mediaType": artifact.media_type,
                "digest": artifact.digest,
                "size": artifact.manifest.len(),
            });
            if let Some(artifact_type) = manifest.get("artifactType") {
                entry["artifactType"] = artifact_type.clone();
            }
            entries.push(entry);
        }
        let index = bytes::Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": crate::image::OCI_INDEX,
                "manifests": entries,
            }))
            .unwrap(),
        );
        crate::push::push_manifest(
            &reqwest::Client::new(),
            &self.base_url(),
            repository,
            &subject.replacen(':', "-", 1),
            &index,
            crate::image::OCI_INDEX,
            &auth,
        )
        .await;
        crate::sha256_digest(&index)
    }

    pub fn embedded(&self) -> &EmbeddedRegistry {
        &self.registry
    }

    /// Every request served so far.
    pub fn access_log(&self) -> Vec<AccessLogEntry> {
        access_log::read(self.registry.access_log_path())
    }

    /// Bytes of blob content served so far, as the registry itself counted them.
    pub fn blob_bytes_served(&self) -> u64 {
        self.access_log()
            .iter()
            .filter(|e| e.is_blob_get())
            .map(|e| e.bytes)
            .sum()
    }

    /// [`Self::blob_bytes_served`] once the access log has stopped growing (two readings
    /// 300 ms apart agree; at most 10 s): after a client gave up mid-request, the registry
    /// may log that request a moment later.
    pub fn blob_bytes_served_settled(&self) -> u64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut lines = self.access_log().len();
        loop {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let now = self.access_log().len();
            if now == lines || std::time::Instant::now() > deadline {
                return self.blob_bytes_served();
            }
            lines = now;
        }
    }

    /// Where the registry keeps the blob `digest` on disk (tests corrupt it to simulate
    /// a registry serving bad data).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.registry
            .storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}
