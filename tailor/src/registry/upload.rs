//! An open blob upload session: committed by one streaming `PUT ?digest=`, or cancelled
//! (`DELETE`) — also when it is dropped unfinished (a cancelled copy, a sibling's failure), so
//! the registry never keeps a session nobody will finish.
//!
//! A resumable upload sends the blob in `PATCH` chunks instead, each one whole from memory
//! (a chunk cut part-way leaves the registry holding bytes its upload state does not count,
//! and distribution then cancels the session at its next use), and commits with the last chunk.
//! Its location after each chunk is what a later try resumes ([`UploadSession::resume`]); a
//! session marked [`UploadSession::keep_when_dropped`] (once a checkpoint names it) is not
//! cancelled when dropped: a drained or cancelled copy leaves it for the next try.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue, LOCATION, RANGE};
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
    /// A checkpoint names it: dropping it leaves it to a later try.
    kept: bool,
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
        Ok(Self {
            location: location_of(registry, response)?,
            registry: registry.clone(),
            scopes,
            finished: false,
            kept: false,
        })
    }

    /// Picks up the session at `location` (one this registry gave), answering how many bytes
    /// it holds; `None` when the registry no longer knows it (finished, cancelled, purged, or
    /// left inconsistent by a chunk cut part-way, which distribution cancels when asked).
    pub(crate) async fn resume(
        registry: &Arc<Registry>,
        location: &str,
        scopes: Vec<Scope>,
    ) -> Result<Option<(Self, u64)>, RegistryError> {
        let url = registry.url(location)?;
        if url.origin() != registry.url("/")?.origin() {
            return Err(registry.protocol("an upload location on another origin".into()));
        }
        let response = registry
            .send(Request::new(Method::GET, url.as_str(), &scopes))
            .await?;
        match response.status() {
            StatusCode::NO_CONTENT => {}
            // distribution's BLOB_UPLOAD_UNKNOWN and BLOB_UPLOAD_INVALID (a session left
            // inconsistent, which it cancels on the spot) are 404s; a 400 is a state it refused.
            StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST => return Ok(None),
            _ => return Err(registry.status_error(response, "an upload's status").await),
        }
        let held = uploaded(&response)
            .ok_or_else(|| registry.protocol("an upload status without a usable Range".into()))?;
        let mut session = Self::from_response(registry, &response, scopes)?;
        if session.location.path() != url.path() {
            // Not the session asked about: leave it to the registry's own purge.
            session.finished = true;
            return Err(registry.protocol("an upload status naming another session".into()));
        }
        Ok(Some((session, held)))
    }

    /// Where the session is now (it moves with each chunk): what [`Self::resume`] takes.
    pub fn location(&self) -> &str {
        self.location.as_str()
    }

    /// Appends `chunk`, which must start at byte `offset` of the blob, and answers how many
    /// bytes the session holds now. Sent whole and once: a retried `PATCH` could append twice.
    pub async fn patch(&mut self, offset: u64, chunk: Bytes) -> Result<u64, RegistryError> {
        let end = offset + chunk.len() as u64;
        let response = self
            .registry
            .send(
                Request::new(Method::PATCH, self.location.as_str(), &self.scopes)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(
                        reqwest::header::CONTENT_RANGE,
                        &format!("{offset}-{}", end - 1),
                    )
                    .body(chunk),
            )
            .await?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(self
                .registry
                .status_error(response, "a chunk of a blob upload")
                .await);
        }
        let held = uploaded(&response);
        if held != Some(end) {
            return Err(self.registry.protocol(format!(
                "after a chunk ending at byte {end}, the upload holds {held:?} bytes"
            )));
        }
        self.location = location_of(&self.registry, &response)?;
        Ok(end)
    }

    /// From now on, dropping the session leaves it open for a later try to resume (the
    /// registry purges sessions nobody finishes, after a week by default); [`Self::cancel`]
    /// still cancels it.
    pub fn keep_when_dropped(&mut self) {
        self.kept = true;
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
        self.finish(digest, bytes).await
    }

    /// Commits the session with its last bytes (the rest, or a resumable upload's last chunk),
    /// already in memory and verified. Unless it succeeds, the session stays the caller's.
    pub async fn finish(&mut self, digest: &str, bytes: Bytes) -> Result<(), RegistryError> {
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

/// The session's `Location`, which distribution moves with every chunk (its signed state).
fn location_of(registry: &Registry, response: &Response) -> Result<Url, RegistryError> {
    let location = response
        .headers()
        .get(LOCATION)
        .and_then(|l| l.to_str().ok())
        .ok_or_else(|| registry.protocol("an upload session without a Location header".into()))?;
    registry.url(location)
}

/// The bytes an upload holds, from its `Range: 0-<last byte>` header. distribution answers
/// `0-0` for an empty session too, which is why a session is only resumed past its first chunk.
fn uploaded(response: &Response) -> Option<u64> {
    let range = response.headers().get(RANGE)?.to_str().ok()?;
    let last: u64 = range.strip_prefix("0-")?.parse().ok()?;
    last.checked_add(1)
}

impl Drop for UploadSession {
    fn drop(&mut self) {
        if self.finished || self.kept {
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
