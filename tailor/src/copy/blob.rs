//! Moving one blob into the destination: skip it if present, mount it from a repository that
//! has it, or stream it from the source while verifying its digest.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Body, Method, Response, StatusCode};

use super::{BlobLedger, Progress, ProgressSink};
use crate::digest::StreamingDigest;
use crate::error::CopyError;
use crate::manifest::Blob;
use crate::registry::{RegistryClient, RetryPolicy, Scope};

/// How many repositories a mount is tried from before falling back to an upload.
const MAX_MOUNT_TRIES: usize = 3;

/// What happened to a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobOutcome {
    /// Streamed from the source.
    Copied,
    /// Cross-repository mount inside the destination.
    Mounted,
    /// Already in the destination repository.
    Skipped,
}

/// Everything a blob transfer needs from its copy.
pub(crate) struct BlobJob {
    pub source: Arc<RegistryClient>,
    pub dest: Arc<RegistryClient>,
    pub src_repo: String,
    pub dst_repo: String,
    /// Source and destination are one registry: the source repository is a mount source.
    pub same_registry: bool,
    pub ledger: Arc<dyn BlobLedger>,
    pub progress: Option<ProgressSink>,
    pub retry: RetryPolicy,
}

impl BlobJob {
    /// Transfers `blob`, retrying transient failures; each try starts by checking the
    /// destination again, so whatever an earlier try completed is not redone.
    pub async fn transfer(&self, blob: &Blob) -> Result<BlobOutcome, CopyError> {
        let mut attempt = 0;
        loop {
            match self.transfer_once(blob).await {
                Err(error) if error.is_transient() && attempt + 1 < self.retry.max_attempts => {
                    tracing::warn!(digest = %blob.digest, attempt, error = %error, "blob transfer failed; retrying");
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn transfer_once(&self, blob: &Blob) -> Result<BlobOutcome, CopyError> {
        let dst = &self.dst_repo;
        let push = [Scope::push(dst)];
        let blob_path = format!("/v2/{dst}/blobs/{}", blob.digest);
        let head = self
            .dest
            .send(&push, || self.dest.request(Method::HEAD, &blob_path))
            .await?;
        match head.status() {
            StatusCode::OK => {
                self.ledger.record(blob, dst).await;
                return Ok(BlobOutcome::Skipped);
            }
            StatusCode::NOT_FOUND => {}
            _ => {
                return Err(self
                    .dest
                    .status_error(head, &format!("HEAD blob {}", blob.digest))
                    .await);
            }
        }

        // If another copy is fetching this blob right now, wait for it: afterwards the blob
        // is in the internal registry and a mount (or nothing) is all that is left to do.
        let fetching = self.ledger.fetch_guard(&blob.digest).await;
        if fetching.is_some() {
            let head = self
                .dest
                .send(&push, || self.dest.request(Method::HEAD, &blob_path))
                .await?;
            if head.status() == StatusCode::OK {
                self.ledger.record(blob, dst).await;
                return Ok(BlobOutcome::Skipped);
            }
        }

        // A declined mount (202) opens an ordinary upload session. Keep the latest one for the
        // upload if every candidate declines; cancel the ones it replaces.
        let mut session: Option<UploadSession> = None;
        for from in self.mount_candidates(blob).await {
            let scopes = vec![Scope::push(dst), Scope::pull(&from)];
            let path = format!("/v2/{dst}/blobs/uploads/?mount={}&from={from}", blob.digest);
            match self.start_upload(scopes, path).await? {
                UploadStart::Mounted => {
                    tracing::debug!(digest = %blob.digest, from = %from, "mounted");
                    if let Some(mut declined) = session.take() {
                        declined.cancel().await;
                    }
                    self.ledger.record(blob, dst).await;
                    return Ok(BlobOutcome::Mounted);
                }
                UploadStart::Session(opened) => {
                    if let Some(mut replaced) = session.replace(opened) {
                        replaced.cancel().await;
                    }
                }
                UploadStart::Refused(response) => {
                    tracing::debug!(digest = %blob.digest, from = %from, status = %response.status(), "mount refused")
                }
            }
        }
        let mut session = match session {
            Some(session) => session,
            None => {
                let path = format!("/v2/{dst}/blobs/uploads/");
                match self.start_upload(push.to_vec(), path).await? {
                    UploadStart::Session(opened) => opened,
                    UploadStart::Mounted => {
                        return Err(CopyError::InternalRegistry {
                            registry: self.dest.name().to_owned(),
                            detail: "a plain upload POST answered 201 Created".into(),
                        });
                    }
                    UploadStart::Refused(response) => {
                        return Err(self.dest.status_error(response, "start upload").await);
                    }
                }
            }
        };

        let src = &self.src_repo;
        let source_path = format!("/v2/{src}/blobs/{}", blob.digest);
        let response = self
            .source
            .send(&[Scope::pull(src)], || {
                self.source.request(Method::GET, &source_path)
            })
            .await?;
        if !response.status().is_success() {
            return Err(self
                .source
                .status_error(response, &format!("blob {}", blob.digest))
                .await);
        }
        if let Some(length) = response.content_length()
            && length != blob.size
        {
            return Err(CopyError::DigestMismatch {
                expected: blob.digest.clone(),
                detail: format!(
                    "the source serves {length} bytes, the manifest says {}",
                    blob.size
                ),
            });
        }
        if let Some(progress) = &self.progress {
            progress(Progress::BlobStarted {
                digest: blob.digest.clone(),
                size: blob.size,
            });
        }

        let failure = Arc::new(Mutex::new(None));
        let body = VerifyingStream::new(
            response,
            blob,
            failure.clone(),
            self.progress.clone(),
            self.source.name(),
        );
        let separator = if session.location.contains('?') {
            '&'
        } else {
            '?'
        };
        let put = self
            .dest
            .request(
                Method::PUT,
                &format!("{}{separator}digest={}", session.location, blob.digest),
            )
            .header(CONTENT_LENGTH, blob.size)
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(Body::wrap_stream(body));
        let result = self.dest.send_once(&push, put).await;
        // The stream's own verdict beats whatever the failed request reported.
        let verdict = failure.lock().expect("not poisoned").take();
        if let Some(error) = verdict {
            session.cancel().await;
            return Err(error);
        }
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                session.cancel().await;
                return Err(error);
            }
        };
        if response.status() != StatusCode::CREATED {
            let error = self
                .dest
                .status_error(response, &format!("upload blob {}", blob.digest))
                .await;
            session.cancel().await;
            return Err(error);
        }
        session.committed = true;
        self.ledger.record(blob, dst).await;
        drop(fetching);
        Ok(BlobOutcome::Copied)
    }

    async fn mount_candidates(&self, blob: &Blob) -> Vec<String> {
        let mut candidates = Vec::new();
        if self.same_registry {
            candidates.push(self.src_repo.clone());
        }
        candidates.extend(self.ledger.mount_sources(&blob.digest).await);
        let mut seen = std::collections::HashSet::new();
        candidates.retain(|repo| repo != &self.dst_repo && seen.insert(repo.clone()));
        candidates.truncate(MAX_MOUNT_TRIES);
        candidates
    }

    /// Sends an upload POST (plain or mount) from a task of its own. If the copy is cancelled
    /// while the POST is in flight, the registry may still open a session; the task sees the
    /// response through, and the session it returns to nobody is dropped, which cancels it.
    async fn start_upload(
        &self,
        scopes: Vec<Scope>,
        path: String,
    ) -> Result<UploadStart, CopyError> {
        let dest = self.dest.clone();
        let session_scopes = vec![Scope::push(&self.dst_repo)];
        let task = tokio::spawn(async move {
            let response = dest
                .send(&scopes, || dest.request(Method::POST, &path))
                .await?;
            Ok(match response.status() {
                StatusCode::CREATED => UploadStart::Mounted,
                StatusCode::ACCEPTED => UploadStart::Session(UploadSession::from_response(
                    &dest,
                    &response,
                    session_scopes,
                )?),
                _ => UploadStart::Refused(response),
            })
        });
        task.await.map_err(|error| CopyError::InternalRegistry {
            registry: self.dest.name().to_owned(),
            detail: format!("the upload task failed: {error}"),
        })?
    }
}

/// How the registry answered an upload POST.
enum UploadStart {
    /// 201: the blob was mounted from another repository.
    Mounted,
    /// 202: an upload session is open.
    Session(UploadSession),
    /// Anything else, for the caller to judge.
    Refused(Response),
}

/// An open upload session in the destination; cancelled (DELETE) unless committed, also when
/// the copy is dropped midway (cancellation, a sibling's failure).
struct UploadSession {
    dest: Arc<RegistryClient>,
    location: String,
    scopes: Vec<Scope>,
    committed: bool,
}

impl UploadSession {
    fn from_response(
        dest: &Arc<RegistryClient>,
        response: &Response,
        scopes: Vec<Scope>,
    ) -> Result<Self, CopyError> {
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| CopyError::InternalRegistry {
                registry: dest.name().to_owned(),
                detail: "upload session without a Location header".into(),
            })?;
        Ok(Self {
            dest: dest.clone(),
            location: dest.url(location),
            scopes,
            committed: false,
        })
    }

    async fn cancel(&mut self) {
        self.committed = true;
        delete_upload(&self.dest, &self.location, &self.scopes).await;
    }
}

impl Drop for UploadSession {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let dest = self.dest.clone();
        let location = std::mem::take(&mut self.location);
        let scopes = std::mem::take(&mut self.scopes);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { delete_upload(&dest, &location, &scopes).await });
        }
    }
}

/// Cancels an upload session. While the registry is still handling our aborted PUT it does
/// not know the session (404) and would keep its files, so a 404 is retried briefly.
async fn delete_upload(dest: &RegistryClient, location: &str, scopes: &[Scope]) {
    for attempt in 1..=6u32 {
        match dest
            .send_once(scopes, dest.request(Method::DELETE, location))
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

/// The source body, passed through while hashed and counted. It fails the upload, before its
/// last byte is sent, if the content is not exactly the `size` bytes hashing to `digest`.
struct VerifyingStream {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    expected: String,
    size: u64,
    seen: u64,
    hasher: Option<StreamingDigest>,
    failure: Arc<Mutex<Option<CopyError>>>,
    progress: Option<ProgressSink>,
    source_name: String,
    done: bool,
}

impl VerifyingStream {
    fn new(
        response: Response,
        blob: &Blob,
        failure: Arc<Mutex<Option<CopyError>>>,
        progress: Option<ProgressSink>,
        source_name: &str,
    ) -> Self {
        Self {
            inner: Box::pin(response.bytes_stream()),
            expected: blob.digest.clone(),
            size: blob.size,
            seen: 0,
            hasher: Some(StreamingDigest::default()),
            failure,
            progress,
            source_name: source_name.to_owned(),
            done: false,
        }
    }

    fn fail(&mut self, error: CopyError) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        let message = error.to_string();
        *self.failure.lock().expect("not poisoned") = Some(error);
        self.done = true;
        Poll::Ready(Some(Err(std::io::Error::other(message))))
    }
}

impl Stream for VerifyingStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                self.seen += chunk.len() as u64;
                if self.seen > self.size {
                    let detail = format!(
                        "the source sent more than the {} bytes the manifest declares",
                        self.size
                    );
                    let expected = self.expected.clone();
                    return self.fail(CopyError::DigestMismatch { expected, detail });
                }
                self.hasher.as_mut().expect("hashing").update(&chunk);
                if let Some(progress) = &self.progress {
                    progress(Progress::BlobBytes {
                        digest: self.expected.clone(),
                        bytes: chunk.len() as u64,
                    });
                }
                if self.seen == self.size {
                    let actual = self.hasher.take().expect("hashing").finish();
                    if actual != self.expected {
                        let expected = self.expected.clone();
                        let detail = format!("the content read hashes to {actual}");
                        return self.fail(CopyError::DigestMismatch { expected, detail });
                    }
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(error))) => {
                let registry = self.source_name.clone();
                let detail = format!(
                    "reading blob {} failed after {} bytes: {error}",
                    self.expected, self.seen
                );
                self.fail(CopyError::UpstreamUnreachable { registry, detail })
            }
            Poll::Ready(None) if self.seen < self.size => {
                let registry = self.source_name.clone();
                let detail = format!(
                    "blob {} ended after {} of {} bytes",
                    self.expected, self.seen, self.size
                );
                self.fail(CopyError::UpstreamUnreachable { registry, detail })
            }
            Poll::Ready(None) => {
                // An empty blob never reached the check above.
                if let Some(hasher) = self.hasher.take() {
                    let actual = hasher.finish();
                    if actual != self.expected {
                        let expected = self.expected.clone();
                        let detail = format!("the content read hashes to {actual}");
                        return self.fail(CopyError::DigestMismatch { expected, detail });
                    }
                }
                self.done = true;
                Poll::Ready(None)
            }
        }
    }
}
