//! One repository's part of the distribution API: blobs (HEAD, GET as a stream or bounded
//! bytes, cross-repository mount, upload), manifests (GET bounded and verified, HEAD, PUT as
//! the exact bytes, DELETE by digest), tags, and the OCI 1.1 referrers API.

use std::sync::Arc;

use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Method, StatusCode};

use super::auth::Scope;
use super::client::{Registry, Request};
use super::error::RegistryError;
use super::transfer::BlobBody;
use super::upload::UploadSession;
use crate::manifest::{self, RawManifest};
use crate::text::clean;

/// Most tags read from one repository.
const MAX_TAGS: usize = 10_000;

/// A handle on one repository of a registry.
#[derive(Clone, Debug)]
pub struct Repository {
    registry: Arc<Registry>,
    name: String,
}

/// How the registry answered a cross-repository mount.
#[derive(Debug)]
pub enum Mount {
    /// 201: the blob is now in this repository.
    Mounted,
    /// 202: the registry declined and opened an ordinary upload session instead.
    Declined(UploadSession),
}

/// What a manifest `HEAD` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestHead {
    pub digest: String,
    pub media_type: Option<String>,
    pub size: Option<u64>,
}

/// What a manifest `DELETE` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Deleted,
    /// The registry no longer had it (404).
    AlreadyGone,
}

impl Repository {
    pub(crate) fn new(registry: Arc<Registry>, name: &str) -> Self {
        Self {
            registry,
            name: name.to_owned(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    fn pull(&self) -> [Scope; 1] {
        [Scope::pull(&self.name)]
    }

    fn push(&self) -> [Scope; 1] {
        [Scope::push(&self.name)]
    }

    /// `HEAD` a blob: its size if the repository has it.
    pub async fn head_blob(&self, digest: &str) -> Result<Option<u64>, RegistryError> {
        let path = format!("/v2/{}/blobs/{digest}", self.name);
        let scopes = self.pull();
        let response = self
            .registry
            .send(Request::new(Method::HEAD, &path, &scopes))
            .await?;
        match response.status() {
            // The header, not the (empty) body of a HEAD, says the size.
            s if s.is_success() => Ok(Some(
                response
                    .headers()
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self
                .registry
                .status_error(response, &format!("blob {digest}"))
                .await),
        }
    }

    /// `GET` a blob as a stream (redirects followed and checked). Only the time to the answer
    /// is bounded here; the caller watches the body's throughput ([`BlobBody::meter`]).
    pub async fn get_blob(&self, digest: &str) -> Result<BlobBody, RegistryError> {
        let path = format!("/v2/{}/blobs/{digest}", self.name);
        let scopes = self.pull();
        let response = self
            .registry
            .send(Request::new(Method::GET, &path, &scopes).streaming())
            .await?;
        if !response.status().is_success() {
            return Err(self
                .registry
                .status_error(response, &format!("blob {digest}"))
                .await);
        }
        Ok(BlobBody::new(
            response,
            self.registry.name(),
            self.registry.is_insecure(),
        ))
    }

    /// `GET`s the blob `digest` of `size` bytes from byte `offset` on (`Range`), to resume it:
    /// `Ok(Some(body, true))` for exactly that rest (206 with the matching `Content-Range`),
    /// `Ok(Some(body, false))` for the whole blob (a registry that serves no ranges answers 200),
    /// `Ok(None)` for any other range, or a refusal of the range itself (416, 400...), which
    /// nothing here can use.
    pub async fn get_blob_from(
        &self,
        digest: &str,
        offset: u64,
        size: u64,
    ) -> Result<Option<(BlobBody, bool)>, RegistryError> {
        let path = format!("/v2/{}/blobs/{digest}", self.name);
        let scopes = self.pull();
        let range = format!("bytes={offset}-");
        let response = self
            .registry
            .send(
                Request::new(Method::GET, &path, &scopes)
                    .header(reqwest::header::RANGE, &range)
                    .streaming(),
            )
            .await?;
        let partial = match response.status() {
            StatusCode::PARTIAL_CONTENT => true,
            status if status.is_success() => false,
            status
                if status.is_client_error()
                    && !matches!(
                        status,
                        StatusCode::UNAUTHORIZED
                            | StatusCode::FORBIDDEN
                            | StatusCode::NOT_FOUND
                            | StatusCode::TOO_MANY_REQUESTS
                    ) =>
            {
                tracing::info!(%digest, %status, "the source refused the range");
                return Ok(None);
            }
            _ => {
                return Err(self
                    .registry
                    .status_error(response, &format!("blob {digest}"))
                    .await);
            }
        };
        let wanted = format!("bytes {offset}-{}/{size}", size.saturating_sub(1));
        let answered = response
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok());
        if partial && answered != Some(wanted.as_str()) {
            tracing::info!(%digest, %wanted, answered = ?answered.map(|a| crate::text::clean(a, 100)), "the source answered another range");
            return Ok(None);
        }
        let body = BlobBody::new(response, self.registry.name(), self.registry.is_insecure());
        Ok(Some((body, partial)))
    }

    /// `GET` a small blob (an image config) whole, refusing more than `limit` bytes, and
    /// verifying it against `digest`.
    pub async fn get_blob_bytes(&self, digest: &str, limit: u64) -> Result<Bytes, RegistryError> {
        let path = format!("/v2/{}/blobs/{digest}", self.name);
        let scopes = self.pull();
        let response = self
            .registry
            .send(Request::new(Method::GET, &path, &scopes))
            .await?;
        if !response.status().is_success() {
            return Err(self
                .registry
                .status_error(response, &format!("blob {digest}"))
                .await);
        }
        let bytes = self
            .registry
            .read_bounded(response, limit, &format!("blob {digest}"))
            .await?;
        let actual = crate::digest::sha256(&bytes);
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                expected: digest.to_owned(),
                detail: format!(
                    "{} served content hashing to {actual}",
                    self.registry.name()
                ),
            });
        }
        Ok(bytes)
    }

    /// Asks the registry to mount `digest` from repository `from` (same registry).
    pub async fn mount_blob(&self, digest: &str, from: &str) -> Result<Mount, RegistryError> {
        let path = format!(
            "/v2/{}/blobs/uploads/?mount={digest}&from={from}",
            self.name
        );
        let scopes = vec![Scope::push(&self.name), Scope::pull(from)];
        match self.open_upload(path, scopes).await? {
            Opened::Created => Ok(Mount::Mounted),
            Opened::Session(session) => Ok(Mount::Declined(session)),
        }
    }

    /// Opens an upload session.
    pub async fn start_upload(&self) -> Result<UploadSession, RegistryError> {
        let path = format!("/v2/{}/blobs/uploads/", self.name);
        match self.open_upload(path, self.push().to_vec()).await? {
            Opened::Session(session) => Ok(session),
            Opened::Created => Err(self
                .registry
                .protocol("a plain upload POST answered 201 Created".into())),
        }
    }

    /// Picks up an upload session of this repository at `location`, as a chunked upload left
    /// it ([`UploadSession::resume`]): the session and the bytes it holds, or `None`.
    pub async fn resume_upload(
        &self,
        location: &str,
    ) -> Result<Option<(UploadSession, u64)>, RegistryError> {
        let uploads = format!("/v2/{}/blobs/uploads/", self.name);
        if !self.registry.url(location)?.path().starts_with(&uploads) {
            return Err(self
                .registry
                .protocol(format!("an upload location outside {uploads}")));
        }
        UploadSession::resume(&self.registry, location, self.push().to_vec()).await
    }

    /// Sends an upload POST (plain or mount) from a task of its own: if the caller is dropped
    /// while the POST is in flight, the registry may still open a session; the task sees the
    /// answer through, and the session it hands to nobody is dropped, which cancels it.
    async fn open_upload(&self, path: String, scopes: Vec<Scope>) -> Result<Opened, RegistryError> {
        let registry = self.registry.clone();
        let session_scopes = self.push().to_vec();
        let task = tokio::spawn(async move {
            let response = registry
                .send(Request::new(Method::POST, &path, &scopes))
                .await?;
            match response.status() {
                StatusCode::CREATED => Ok(Opened::Created),
                StatusCode::ACCEPTED => Ok(Opened::Session(UploadSession::from_response(
                    &registry,
                    &response,
                    session_scopes,
                )?)),
                StatusCode::METHOD_NOT_ALLOWED => Err(RegistryError::ReadOnly {
                    registry: registry.name().to_owned(),
                }),
                _ => Err(registry.status_error(response, "an upload session").await),
            }
        });
        task.await.map_err(|error| {
            self.registry
                .protocol(format!("the upload task failed: {error}"))
        })?
    }

    /// `GET` a manifest: the four kinds in `Accept`, refused over the size limit before it is
    /// read, recognised, and checked against `expected_digest` when the reference pinned one.
    pub async fn get_manifest(
        &self,
        reference: &str,
        expected_digest: Option<&str>,
    ) -> Result<RawManifest, RegistryError> {
        let path = format!("/v2/{}/manifests/{reference}", self.name);
        let scopes = self.pull();
        let response = self
            .registry
            .send(Request::new(Method::GET, &path, &scopes).header(ACCEPT, manifest::ACCEPT))
            .await?;
        let what = format!("manifest {}:{reference}", self.name);
        if !response.status().is_success() {
            return Err(self.registry.status_error(response, &what).await);
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let limit = self.registry.limits().manifest_bytes;
        let body = self.registry.read_bounded(response, limit, &what).await?;
        let manifest = RawManifest::recognise(body, content_type.as_deref())?;
        if let Some(expected) = expected_digest
            && manifest.digest != expected
        {
            return Err(RegistryError::DigestMismatch {
                expected: expected.to_owned(),
                detail: format!("the manifest served hashes to {}", manifest.digest),
            });
        }
        Ok(manifest)
    }

    /// `HEAD` a manifest: its digest (from `Docker-Content-Digest`) if it exists.
    pub async fn head_manifest(
        &self,
        reference: &str,
    ) -> Result<Option<ManifestHead>, RegistryError> {
        let path = format!("/v2/{}/manifests/{reference}", self.name);
        let scopes = self.pull();
        let response = self
            .registry
            .send(Request::new(Method::HEAD, &path, &scopes).header(ACCEPT, manifest::ACCEPT))
            .await?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                let digest = header("docker-content-digest")
                    .and_then(|d| crate::reference::parse_digest(&d).ok())
                    .ok_or_else(|| {
                        self.registry.protocol(format!(
                            "HEAD {reference} without a valid Docker-Content-Digest"
                        ))
                    })?;
                Ok(Some(ManifestHead {
                    digest,
                    media_type: header(CONTENT_TYPE.as_str()).map(|t| clean(&t, 255)),
                    size: header(CONTENT_LENGTH.as_str()).and_then(|l| l.parse().ok()),
                }))
            }
            _ => Err(self
                .registry
                .status_error(response, &format!("manifest {}:{reference}", self.name))
                .await),
        }
    }

    /// `PUT` a manifest as the exact bytes read, under `reference` (a tag or its digest).
    pub async fn put_manifest(
        &self,
        reference: &str,
        manifest: &RawManifest,
    ) -> Result<(), RegistryError> {
        let path = format!("/v2/{}/manifests/{reference}", self.name);
        let scopes = self.push();
        let response = self
            .registry
            .send(
                Request::new(Method::PUT, &path, &scopes)
                    .header(CONTENT_TYPE, &manifest.media_type)
                    .body(manifest.bytes.clone()),
            )
            .await?;
        match response.status() {
            StatusCode::CREATED => {}
            StatusCode::METHOD_NOT_ALLOWED => {
                return Err(RegistryError::ReadOnly {
                    registry: self.registry.name().to_owned(),
                });
            }
            _ => {
                return Err(self
                    .registry
                    .status_error(
                        response,
                        &format!("push of manifest {}:{reference}", self.name),
                    )
                    .await);
            }
        }
        let stored = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok());
        if let Some(stored) = stored
            && stored != manifest.digest
        {
            return Err(self.registry.protocol(format!(
                "stored manifest {reference} as {}, expected {}",
                clean(stored, 100),
                manifest.digest
            )));
        }
        Ok(())
    }

    /// `DELETE` a manifest revision by digest (and with it every tag on it).
    pub async fn delete_manifest(&self, digest: &str) -> Result<Deleted, RegistryError> {
        let path = format!("/v2/{}/manifests/{digest}", self.name);
        let scopes = [Scope::delete(&self.name)];
        let response = self
            .registry
            .send(Request::new(Method::DELETE, &path, &scopes))
            .await?;
        match response.status() {
            StatusCode::ACCEPTED | StatusCode::OK | StatusCode::NO_CONTENT => Ok(Deleted::Deleted),
            StatusCode::NOT_FOUND => Ok(Deleted::AlreadyGone),
            StatusCode::METHOD_NOT_ALLOWED => Err(self.registry.protocol(
                "the registry refuses deletes: enable storage.delete.enabled \
                 (or it is in read-only maintenance)"
                    .into(),
            )),
            _ => Err(self
                .registry
                .status_error(response, &format!("DELETE manifest {digest}"))
                .await),
        }
    }

    /// `GET /v2/<name>/referrers/<digest>` (OCI distribution-spec 1.1): the index of the
    /// manifests whose `subject` is `digest`, bounded like a manifest. `None` when the registry
    /// has no referrers API (404, which distribution 2.8 answers; then the fallback tag schema
    /// applies). Only the first page is read: the bound on referrers is the caller's.
    pub async fn referrers(&self, digest: &str) -> Result<Option<Bytes>, RegistryError> {
        let path = format!("/v2/{}/referrers/{digest}", self.name);
        let scopes = self.pull();
        let response = self
            .registry
            .send(Request::new(Method::GET, &path, &scopes).header(ACCEPT, manifest::OCI_INDEX))
            .await?;
        let what = format!("referrers of {}@{digest}", self.name);
        match response.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                let limit = self.registry.limits().manifest_bytes;
                Ok(Some(
                    self.registry.read_bounded(response, limit, &what).await?,
                ))
            }
            _ => Err(self.registry.status_error(response, &what).await),
        }
    }

    /// The repository's tags (following `Link` pagination), at most 10 000.
    pub async fn tags(&self) -> Result<Vec<String>, RegistryError> {
        #[derive(serde::Deserialize)]
        struct TagList {
            tags: Option<Vec<String>>,
        }
        let scopes = self.pull();
        let mut tags = Vec::new();
        let mut path = format!("/v2/{}/tags/list?n=1000", self.name);
        loop {
            let response = self
                .registry
                .send(Request::new(Method::GET, &path, &scopes))
                .await?;
            if !response.status().is_success() {
                return Err(self
                    .registry
                    .status_error(response, &format!("tags of {}", self.name))
                    .await);
            }
            let next = response
                .headers()
                .get("link")
                .and_then(|l| l.to_str().ok())
                .and_then(|l| l.split(';').next())
                .map(|l| {
                    l.trim()
                        .trim_start_matches('<')
                        .trim_end_matches('>')
                        .to_owned()
                });
            let limit = self.registry.limits().manifest_bytes;
            let body = self
                .registry
                .read_bounded(response, limit, &format!("tags of {}", self.name))
                .await?;
            let page: TagList = serde_json::from_slice(&body).map_err(|e| {
                self.registry
                    .protocol(clean(&format!("tag list: {e}"), 300))
            })?;
            tags.extend(
                page.tags
                    .unwrap_or_default()
                    .into_iter()
                    .map(|t| clean(&t, 128)),
            );
            match next {
                Some(next) if tags.len() < MAX_TAGS && next.starts_with("/v2/") => path = next,
                _ => break,
            }
        }
        tags.truncate(MAX_TAGS);
        Ok(tags)
    }
}

enum Opened {
    Created,
    Session(UploadSession),
}
