//! An open blob upload session: committed by one streaming `PUT ?digest=`, or cancelled
//! (`DELETE`) — also when it is dropped unfinished (a cancelled copy, a sibling's failure), so
//! the registry never keeps a session nobody will finish.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue, LOCATION};
use reqwest::{Body, Method, Response, StatusCode, Url};

use super::auth::Scope;
use super::client::{Registry, Request};
use super::error::RegistryError;

/// An upload session the registry opened (202 with a `Location`).
pub struct UploadSession {
    registry: Arc<Registry>,
    location: Url,
    scopes: Vec<Scope>,
    /// Set once it is committed or cancelled: nothing left to clean up.
    finished: bool,
}

impl std::fmt::Debug for UploadSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadSession")
            .field("location", &self.location.path())
            .finish()
    }
}

impl UploadSession {
    pub(crate) fn from_response(
        registry: &Arc<Registry>,
        response: &Response,
        scopes: Vec<Scope>,
    ) -> Result<Self, RegistryError> {
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| {
                registry.protocol("an upload session without a Location header".into())
            })?;
        Ok(Self {
            location: registry.url(location)?,
            registry: registry.clone(),
            scopes,
            finished: false,
        })
    }

    /// Commits the session with `body`, which must be exactly `size` bytes hashing to `digest`
    /// (a stream that finds otherwise fails before its last byte, and the registry, which
    /// checks the digest too, commits nothing).
    pub async fn put<S>(mut self, digest: &str, size: u64, body: S) -> Result<(), RegistryError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        let mut url = self.location.clone();
        url.query_pairs_mut().append_pair("digest", digest);
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_LENGTH, HeaderValue::from(size));
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let response = self
            .registry
            .send_stream(
                Method::PUT,
                url,
                &self.scopes,
                headers,
                Body::wrap_stream(body),
            )
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(self
                .registry
                .status_error(response, &format!("upload of blob {digest}"))
                .await);
        }
        self.finished = true;
        Ok(())
    }

    /// Commits the session with bytes already in memory (and verified).
    pub async fn put_bytes(mut self, digest: &str, bytes: Bytes) -> Result<(), RegistryError> {
        let mut url = self.location.clone();
        url.query_pairs_mut().append_pair("digest", digest);
        let response = self
            .registry
            .send(
                Request::new(Method::PUT, url.as_str(), &self.scopes)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .body(bytes),
            )
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(self
                .registry
                .status_error(response, &format!("upload of blob {digest}"))
                .await);
        }
        self.finished = true;
        Ok(())
    }

    /// Cancels the session now.
    pub async fn cancel(mut self) {
        self.finished = true;
        delete_session(&self.registry, &self.location, &self.scopes).await;
    }
}

impl Drop for UploadSession {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let registry = self.registry.clone();
        let location = self.location.clone();
        let scopes = std::mem::take(&mut self.scopes);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { delete_session(&registry, &location, &scopes).await });
        }
    }
}

/// Cancels an upload session. While the registry is still handling an aborted PUT it does
/// not know the session (404) and would keep its files, so a 404 is retried briefly.
async fn delete_session(registry: &Registry, location: &Url, scopes: &[Scope]) {
    for attempt in 1..=6u32 {
        match registry
            .send(Request::new(Method::DELETE, location.as_str(), scopes))
            .await
        {
            Ok(response) if response.status() == StatusCode::NOT_FOUND => {
                tokio::time::sleep(std::time::Duration::from_millis(50 * u64::from(attempt))).await;
            }
            Ok(_) => return,
            Err(error) => {
                tracing::debug!(error = %error, "could not cancel an upload session");
                return;
            }
        }
    }
}
