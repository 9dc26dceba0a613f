//! Moving one blob into the destination: skip it if present, mount it from a repository that
//! holds it (only one holding it verified from this copy's own source registry, which must
//! prove it has the blob too), or stream it from the source while verifying its digest.
//! Under a fetch claim, a large blob goes in checkpointed chunks instead ([`super::resume`]).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use super::source::{Source, SourceBody};
use super::{BlobLedger, FetchClaim, Progress, ProgressSink, Resumable};
use crate::digest::StreamingDigest;
use crate::error::CopyError;
use crate::layout::Layout;
use crate::manifest::Blob;
use crate::registry::{Floor, Mount, Repository, TransferMeter, UploadSession};

/// How many repositories a mount is tried from before falling back to an upload.
const MAX_MOUNT_TRIES: usize = 3;
/// Tries of one blob (a mid-stream failure starts again from the destination `HEAD`).
const BLOB_TRIES: u32 = 3;
/// Rounds of waiting for another copy's fetch before fetching regardless.
const WAIT_ROUNDS: usize = 3;

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
    pub source: Source,
    pub dest: Repository,
    /// The source repository, when it is in the destination's registry: a mount source.
    pub same_registry: Option<String>,
    pub ledger: Arc<dyn BlobLedger>,
    pub progress: Option<ProgressSink>,
    pub floor: Floor,
    pub resumable: Option<Resumable>,
}

impl BlobJob {
    /// The origin recorded for blobs this copy verifies.
    pub(super) fn origin(&self) -> &str {
        self.source.name()
    }

    /// Transfers `blob`, retrying transient failures; each try starts by checking the
    /// destination again, so whatever an earlier try completed is not redone.
    pub async fn transfer(&self, blob: &Blob) -> Result<BlobOutcome, CopyError> {
        let mut tries = 1;
        loop {
            match self.transfer_once(blob).await {
                Err(error)
                    if error.is_transient()
                        && !error.is_read_only()
                        && !error.is_rate_limited()
                        && tries < BLOB_TRIES =>
                {
                    tracing::warn!(digest = %blob.digest, tries, error = %error, "blob transfer failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(tries)))
                        .await;
                    tries += 1;
                }
                result => return result,
            }
        }
    }

    async fn transfer_once(&self, blob: &Blob) -> Result<BlobOutcome, CopyError> {
        let mut proven = None;
        for round in 0..=WAIT_ROUNDS {
            if self.present(blob).await? {
                return Ok(BlobOutcome::Skipped);
            }
            let declined = match self.try_mounts(blob, &mut proven).await? {
                Ok(()) => return Ok(BlobOutcome::Mounted),
                Err(declined) => declined,
            };
            match self.ledger.claim_fetch(&blob.digest, self.origin()).await {
                FetchClaim::Busy if round < WAIT_ROUNDS => {
                    // Another copy is bringing it in; afterwards a mount is all that is left.
                    if let Some(session) = declined {
                        session.cancel().await;
                    }
                    self.ledger.wait_fetch(&blob.digest, self.origin()).await;
                }
                FetchClaim::Mine(guard) => {
                    let outcome = self.fetch_claimed(blob, declined, &mut proven).await;
                    drop(guard);
                    return outcome;
                }
                FetchClaim::Busy | FetchClaim::Uncoordinated => {
                    return self.fetch(blob, declined, false).await;
                }
            }
        }
        unreachable!("the last round fetches")
    }

    async fn present(&self, blob: &Blob) -> Result<bool, CopyError> {
        Ok(self
            .dest
            .head_blob(&blob.digest)
            .await
            .map_err(CopyError::Destination)?
            .is_some())
    }

    /// Tries the mount sources; `Err(session)` carries the upload session of the last
    /// declined mount (a 202), for the upload to reuse.
    async fn try_mounts(
        &self,
        blob: &Blob,
        proven: &mut Option<bool>,
    ) -> Result<Result<(), Option<UploadSession>>, CopyError> {
        let mut candidates = Vec::new();
        if let Some(repository) = &self.same_registry {
            candidates.push(repository.clone());
        }
        let recorded = self.ledger.mount_sources(&blob.digest, self.origin()).await;
        let mut seen = std::collections::HashSet::new();
        let mut recorded: Vec<String> = recorded
            .into_iter()
            .filter(|r| r != self.dest.name() && seen.insert(r.clone()))
            .collect();
        recorded.truncate(MAX_MOUNT_TRIES);
        // Another tenant's repository is a mount source only if this copy's own source, with
        // this copy's own credentials, has the blob too.
        if !recorded.is_empty() {
            let has = match *proven {
                Some(has) => has,
                None => *proven.insert(self.source_has(blob).await),
            };
            if has {
                candidates.extend(recorded);
            }
        }
        candidates.retain(|r| r != self.dest.name());

        let mut session: Option<UploadSession> = None;
        for from in candidates {
            match self
                .dest
                .mount_blob(&blob.digest, &from)
                .await
                .map_err(CopyError::Destination)?
            {
                Mount::Mounted => {
                    tracing::debug!(digest = %blob.digest, from = %from, "mounted");
                    if let Some(declined) = session.take() {
                        declined.cancel().await;
                    }
                    self.ledger
                        .record(blob, self.dest.name(), self.origin())
                        .await;
                    return Ok(Ok(()));
                }
                Mount::Declined(opened) => {
                    if let Some(replaced) = session.replace(opened) {
                        replaced.cancel().await;
                    }
                }
            }
        }
        Ok(Err(session))
    }

    /// Fetches `blob` under this copy's claim. A copy that fetched it between this copy's look
    /// at the index and its claim recorded the blob before letting go of its own claim, so
    /// the index is read once more first: the blob is then mounted, not read upstream twice.
    async fn fetch_claimed(
        &self,
        blob: &Blob,
        declined: Option<UploadSession>,
        proven: &mut Option<bool>,
    ) -> Result<BlobOutcome, CopyError> {
        match self.try_mounts(blob, proven).await {
            Ok(Ok(())) => {
                if let Some(session) = declined {
                    session.cancel().await;
                }
                Ok(BlobOutcome::Mounted)
            }
            Ok(Err(again)) => {
                let session = match (declined, again) {
                    (Some(earlier), Some(later)) => {
                        earlier.cancel().await;
                        Some(later)
                    }
                    (earlier, later) => later.or(earlier),
                };
                self.fetch(blob, session, true).await
            }
            Err(error) => {
                if let Some(session) = declined {
                    session.cancel().await;
                }
                Err(error)
            }
        }
    }

    /// Whether the source answers for `blob` with its declared size (a proof of access).
    async fn source_has(&self, blob: &Blob) -> bool {
        match self.source.head_blob(&blob.digest).await {
            Ok(Some(size)) => size == blob.size,
            Ok(None) => false,
            Err(error) => {
                tracing::debug!(digest = %blob.digest, %error, "the source did not confirm the blob; not mounting");
                false
            }
        }
    }

    /// Streams the blob from the source into an upload session, verifying it on the way.
    /// Under this copy's fetch claim (`claimed`), a resumable copy sends a large blob in
    /// checkpointed chunks while it has a chunk buffer to spare.
    async fn fetch(
        &self,
        blob: &Blob,
        session: Option<UploadSession>,
        claimed: bool,
    ) -> Result<BlobOutcome, CopyError> {
        let session = match (&self.resumable, claimed) {
            (Some(resumable), true) => {
                match super::resume::fetch_resumably(self, blob, session, resumable).await {
                    Ok(outcome) => return outcome,
                    Err(declined) => declined,
                }
            }
            _ => session,
        };
        let session = match session {
            Some(session) => session,
            None => self
                .dest
                .start_upload()
                .await
                .map_err(CopyError::Destination)?,
        };
        let body = open_source(&self.source, blob, &self.progress).await?;
        let meter = body.meter();
        let failure = Arc::new(Mutex::new(None));
        let stream = VerifyingStream::new(body, blob, failure.clone(), self.progress.clone());
        let put = async {
            let put = session.put(&blob.digest, blob.size, stream).await;
            put.map_err(CopyError::Destination)
        };
        watched(put, (&meter, self.floor), &self.source, blob, &failure).await?;
        self.ledger
            .record(blob, self.dest.name(), self.origin())
            .await;
        Ok(BlobOutcome::Copied)
    }
}

/// `GET`s `blob` from `source`, refusing a body whose announced length is not the blob's size.
pub(super) async fn open_source(
    source: &Source,
    blob: &Blob,
    progress: &Option<ProgressSink>,
) -> Result<SourceBody, CopyError> {
    let body = source.open_blob(&blob.digest).await?;
    started(body, blob, 0, progress)
}

/// Checks that `body`, the blob's bytes from `offset` on, announces that many, and reports the
/// blob started (with `offset` bytes of it already done).
pub(super) fn started(
    body: SourceBody,
    blob: &Blob,
    offset: u64,
    progress: &Option<ProgressSink>,
) -> Result<SourceBody, CopyError> {
    if let Some(length) = body.content_length()
        && length != blob.size - offset
    {
        let detail = format!(
            "the source serves {length} bytes from byte {offset}, the manifest says {} in all",
            blob.size
        );
        return Err(body.mismatch(&blob.digest, detail));
    }
    if let Some(progress) = progress {
        progress(Progress::BlobStarted {
            digest: blob.digest.clone(),
            size: blob.size,
        });
        if offset > 0 {
            progress(Progress::BlobBytes {
                digest: blob.digest.clone(),
                bytes: offset,
            });
        }
    }
    Ok(body)
}

/// Moves `blob` from `source` into the OCI layout `dest` unless it is there already, retrying
/// transient failures as [`BlobJob::transfer`] does. The bytes are checked as they stream
/// (the chunk completing a wrong blob is never written) and again by the layout before the
/// blob gets its name.
pub(crate) async fn into_layout(
    source: &Source,
    dest: &Layout,
    blob: &Blob,
    progress: &Option<ProgressSink>,
) -> Result<BlobOutcome, CopyError> {
    let mut tries = 1;
    loop {
        match into_layout_once(source, dest, blob, progress).await {
            Err(error) if error.is_transient() && tries < BLOB_TRIES => {
                tracing::warn!(digest = %blob.digest, tries, error = %error, "blob transfer failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(tries))).await;
                tries += 1;
            }
            result => return result,
        }
    }
}

async fn into_layout_once(
    source: &Source,
    dest: &Layout,
    blob: &Blob,
    progress: &Option<ProgressSink>,
) -> Result<BlobOutcome, CopyError> {
    if dest
        .blob_size(&blob.digest)
        .await
        .map_err(CopyError::Layout)?
        == Some(blob.size)
    {
        return Ok(BlobOutcome::Skipped);
    }
    let body = open_source(source, blob, progress).await?;
    let meter = body.meter();
    let failure = Arc::new(Mutex::new(None));
    let mut stream = VerifyingStream::new(body, blob, failure.clone(), progress.clone());
    let mut sink = dest
        .begin_blob(&blob.digest, blob.size)
        .await
        .map_err(CopyError::Layout)?;
    let write = async {
        while let Some(Ok(chunk)) = stream.next().await {
            sink.write(&chunk).await.map_err(CopyError::Layout)?;
        }
        Ok::<_, CopyError>(())
    };
    // On failure, a sink dropped uncommitted leaves nothing behind.
    watched(write, (&meter, source.floor()), source, blob, &failure).await?;
    sink.commit().await.map_err(CopyError::Layout)?;
    Ok(BlobOutcome::Copied)
}

/// Runs `transfer` (of `blob`'s bytes from `source`, counted by `meter`) until it ends or a
/// window passes under `floor`; the verifying stream's own verdict, left in `failure`, beats
/// whatever the transfer reported (a request failed because the stream refused to go on).
pub(super) async fn watched<T>(
    transfer: impl Future<Output = Result<T, CopyError>>,
    (meter, floor): (&TransferMeter, Floor),
    source: &Source,
    blob: &Blob,
    failure: &Mutex<Option<CopyError>>,
) -> Result<T, CopyError> {
    let what = format!("blob {}", blob.digest);
    let result = tokio::select! {
        result = transfer => result,
        // The floor covers both ends: a trickling source, or a destination that stalls.
        error = meter.watch(floor, source.name(), &what) => Err(CopyError::Source(error)),
    };
    match failure.lock().expect("not poisoned").take() {
        Some(verdict) => Err(verdict),
        None => result,
    }
}

/// The source body, passed through while hashed and counted. It fails the upload, before its
/// last byte is sent, if the content is not exactly the `size` bytes hashing to `digest`.
pub(super) struct VerifyingStream {
    inner: SourceBody,
    expected: String,
    size: u64,
    seen: u64,
    hasher: Option<StreamingDigest>,
    failure: Arc<Mutex<Option<CopyError>>>,
    progress: Option<ProgressSink>,
    done: bool,
    /// No chunk passed on crosses a multiple of this many bytes from where the stream started
    /// (0: no cuts), so that the hash stands exactly at each chunk boundary of an upload.
    cut_every: u64,
    next_cut: u64,
    /// The rest of a chunk cut at a boundary, passed on next.
    carry: Option<Bytes>,
}

impl VerifyingStream {
    fn new(
        inner: SourceBody,
        blob: &Blob,
        failure: Arc<Mutex<Option<CopyError>>>,
        progress: Option<ProgressSink>,
    ) -> Self {
        Self {
            inner,
            expected: blob.digest.clone(),
            size: blob.size,
            seen: 0,
            hasher: Some(StreamingDigest::default()),
            failure,
            progress,
            done: false,
            cut_every: 0,
            next_cut: u64::MAX,
            carry: None,
        }
    }

    /// The blob's bytes from `seen` on (`inner`), after a prefix that hashed to `hasher`, cut
    /// at every `cut_every` bytes from there.
    pub(super) fn resuming(
        inner: SourceBody,
        blob: &Blob,
        (seen, hasher): (u64, StreamingDigest),
        cut_every: u64,
        failure: Arc<Mutex<Option<CopyError>>>,
        progress: Option<ProgressSink>,
    ) -> Self {
        let mut stream = Self::new(inner, blob, failure, progress);
        stream.seen = seen;
        stream.hasher = Some(hasher);
        stream.cut_every = cut_every;
        stream.next_cut = seen.saturating_add(cut_every);
        stream
    }

    /// How many bytes have passed, and the state of their hash (`None` once the last byte
    /// passed).
    pub(super) fn hashed(&self) -> (u64, Option<Vec<u8>>) {
        (self.seen, self.hasher.as_ref().map(StreamingDigest::state))
    }

    fn fail(&mut self, error: CopyError) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        let message = error.to_string();
        *self.failure.lock().expect("not poisoned") = Some(error);
        self.done = true;
        Poll::Ready(Some(Err(std::io::Error::other(message))))
    }

    fn mismatch(&mut self, detail: String) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        let error = self.inner.mismatch(&self.expected, detail);
        self.fail(error)
    }
}

impl Stream for VerifyingStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let next = match self.carry.take() {
            Some(rest) => Poll::Ready(Some(Ok(rest))),
            None => Pin::new(&mut self.inner).poll_next(cx),
        };
        match next {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) if chunk.is_empty() => {
                // Nothing to hash or pass on (and the hasher is gone once the last byte came).
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(Some(Ok(mut chunk))) => {
                if self.cut_every > 0 && self.seen + chunk.len() as u64 > self.next_cut {
                    self.carry = Some(chunk.split_off((self.next_cut - self.seen) as usize));
                }
                self.seen += chunk.len() as u64;
                if self.seen == self.next_cut {
                    self.next_cut = self.next_cut.saturating_add(self.cut_every);
                }
                if self.seen > self.size {
                    let detail = format!(
                        "the source sent more than the {} bytes the manifest declares",
                        self.size
                    );
                    return self.mismatch(detail);
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
                        return self.mismatch(format!("the content read hashes to {actual}"));
                    }
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(error))) => self.fail(error),
            Poll::Ready(None) if self.seen < self.size => {
                let detail = format!(
                    "blob {} ended after {} of {} bytes",
                    self.expected, self.seen, self.size
                );
                let error = self.inner.ended_early(&self.expected, detail);
                self.fail(error)
            }
            Poll::Ready(None) => {
                // An empty blob never reached the check above.
                if let Some(hasher) = self.hasher.take() {
                    let actual = hasher.finish();
                    if actual != self.expected {
                        return self.mismatch(format!("the content read hashes to {actual}"));
                    }
                }
                self.done = true;
                Poll::Ready(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    fn body(chunks: Vec<&'static [u8]>) -> SourceBody {
        let stream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c))),
        );
        let response = http::Response::new(reqwest::Body::wrap_stream(stream));
        SourceBody::registry(crate::registry::BlobBody::new(
            reqwest::Response::from(response),
            "upstream.test",
            false,
        ))
    }

    fn blob(content: &[u8]) -> Blob {
        Blob {
            media_type: "application/octet-stream".into(),
            digest: crate::digest::sha256(content),
            size: content.len() as u64,
        }
    }

    async fn drain(chunks: Vec<&'static [u8]>, blob: &Blob) -> (Vec<u8>, Option<String>) {
        let failure = Arc::new(Mutex::new(None));
        let mut stream = VerifyingStream::new(body(chunks), blob, failure.clone(), None);
        let mut passed = Vec::new();
        let mut error = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => passed.extend_from_slice(&chunk),
                Err(e) => error = Some(e.to_string()),
            }
        }
        (passed, error)
    }

    #[tokio::test]
    async fn empty_chunks_anywhere_are_harmless() {
        let blob = blob(b"hello world");
        let (passed, error) = drain(vec![b"", b"hello", b"", b" world", b"", b""], &blob).await;
        assert_eq!(error, None);
        assert_eq!(passed, b"hello world");
        let empty = super::tests::blob(b"");
        let (passed, error) = drain(vec![b"", b""], &empty).await;
        assert_eq!(error, None);
        assert!(passed.is_empty());
    }

    async fn drain_stream(mut stream: VerifyingStream) -> (Vec<Vec<u8>>, Option<String>) {
        let mut passed = Vec::new();
        let mut error = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(chunk) => passed.push(chunk.to_vec()),
                Err(e) => error = Some(e.to_string()),
            }
        }
        (passed, error)
    }

    #[tokio::test]
    async fn chunks_are_cut_at_every_boundary_so_the_hash_stands_there() {
        let blob = blob(b"hello world");
        let failure = Arc::new(Mutex::new(None));
        let start = (0, StreamingDigest::default());
        let mut stream = VerifyingStream::resuming(
            body(vec![b"hello wor", b"ld"]),
            &blob,
            start,
            4,
            failure,
            None,
        );
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(&first[..], b"hell");
        let (seen, state) = stream.hashed();
        let mut expected = StreamingDigest::default();
        expected.update(b"hell");
        assert_eq!((seen, state), (4, Some(expected.state())));
        let (rest, error) = drain_stream(stream).await;
        assert_eq!(error, None);
        assert_eq!(rest, vec![b"o wo".to_vec(), b"r".to_vec(), b"ld".to_vec()]);
    }

    #[tokio::test]
    async fn a_resumed_stream_verifies_the_whole_blob_with_the_kept_prefix() {
        let blob = blob(b"hello world");
        let mut prefix = StreamingDigest::default();
        prefix.update(b"hello ");
        let failure = Arc::new(Mutex::new(None));
        let resumed = VerifyingStream::resuming(
            body(vec![b"world"]),
            &blob,
            (6, prefix.clone()),
            4,
            failure.clone(),
            None,
        );
        let (passed, error) = drain_stream(resumed).await;
        assert_eq!((passed.concat(), error), (b"world".to_vec(), None));

        // A rest that does not continue the prefix: its last piece is withheld.
        let failure = Arc::new(Mutex::new(None));
        let wrong = VerifyingStream::resuming(
            body(vec![b"wurld"]),
            &blob,
            (6, prefix),
            4,
            failure.clone(),
            None,
        );
        let (passed, error) = drain_stream(wrong).await;
        assert_eq!(
            passed.concat(),
            b"wurl",
            "the piece completing the blob is withheld"
        );
        assert!(error.unwrap().contains("hashes to"));
        assert!(failure.lock().unwrap().is_some());
    }

    #[tokio::test]
    async fn the_last_chunk_is_withheld_on_a_mismatch() {
        let blob = blob(b"hello world");
        let (passed, error) = drain(vec![b"hello", b" wurld"], &blob).await;
        assert_eq!(
            passed, b"hello",
            "the chunk that completes a wrong blob is never sent"
        );
        assert!(error.unwrap().contains("hashes to"));
    }
}
