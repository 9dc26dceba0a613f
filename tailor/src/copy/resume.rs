//! Resuming inside a blob: a large blob goes to the destination in `PATCH` chunks, and after
//! each one the ledger keeps a checkpoint (the upload's location, the bytes it holds, and the
//! hash of those bytes). A later try (this process's, or another worker's after this one was
//! killed) asks the registry how much the session holds, asks the source for the rest with
//! `Range`, and carries on hashing from the checkpoint's hash state. The bytes already uploaded
//! are not read upstream again; the registry checks the whole blob, those bytes included,
//! against its digest before it commits the upload, and this copy checks that the saved state
//! and the rest hash to it before it sends the last chunk. A resumed blob that does not verify
//! is started once more from its first byte before its failure is believed.
//!
//! Where either side cannot resume (the session is gone or holds other than the checkpoint's
//! bytes, the source answers the whole blob or another range), the blob starts again from its
//! first byte, and the checkpoint is forgotten. A chunk is read whole into memory before it is
//! sent: a `PATCH` cut part-way leaves distribution holding bytes its upload state does not
//! count, and it cancels such a session when next asked. Memory is bounded by
//! [`Resumable::buffers`]: a blob that finds none free goes in one streaming request (unless
//! it has a checkpoint: then it waits for one). Once a checkpoint names the session, dropping
//! it (a drained, cancelled or timed-out copy) leaves it for the next try.

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::blob::{BlobJob, BlobOutcome, VerifyingStream, open_source, started, watched};
use super::source::Rest;
use crate::digest::StreamingDigest;
use crate::error::CopyError;
use crate::manifest::Blob;
use crate::registry::{RegistryError, UploadSession};

/// Where an interrupted upload stands: the session at `location` holds the blob's first
/// `uploaded` bytes, whose hash state is `hash_state` ([`StreamingDigest::state`]).
#[derive(Clone, PartialEq, Eq)]
pub struct UploadCheckpoint {
    pub location: String,
    pub uploaded: u64,
    pub hash_state: Vec<u8>,
}

impl std::fmt::Debug for UploadCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadCheckpoint")
            .field("uploaded", &self.uploaded)
            .finish_non_exhaustive()
    }
}

/// How a process uploads large blobs resumably.
#[derive(Debug, Clone)]
pub struct Resumable {
    /// Bytes per chunk; a blob no larger goes in one request.
    chunk: u64,
    /// Chunk buffers the process may hold at once (each `chunk` bytes).
    buffers: Arc<Semaphore>,
}

impl Resumable {
    /// Chunks of `chunk` bytes (at least 1), at most `buffers` of them in memory at once.
    pub fn new(chunk: u64, buffers: usize) -> Self {
        Self {
            chunk: chunk.max(1),
            buffers: Arc::new(Semaphore::new(buffers)),
        }
    }

    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    /// A chunk buffer: at once if one is free (`None` if not), or with `wait`, when one is.
    pub(super) async fn buffer(&self, wait: bool) -> Option<OwnedSemaphorePermit> {
        if wait {
            return self.buffers.clone().acquire_owned().await.ok();
        }
        self.buffers.clone().try_acquire_owned().ok()
    }
}

/// Sends `blob` in checkpointed chunks if it is worth it and memory allows; if not, gives
/// `declined` (an upload session a declined mount opened) back, for the caller to stream the
/// blob in one request.
pub(super) async fn fetch_resumably(
    job: &BlobJob,
    blob: &Blob,
    declined: Option<UploadSession>,
    resumable: &Resumable,
) -> Result<Result<BlobOutcome, CopyError>, Option<UploadSession>> {
    // A layout is local (or read from a bucket in parts anyway): nothing to resume.
    if blob.size <= resumable.chunk || job.source.repository().is_none() {
        return Err(declined);
    }
    let checkpoint = job
        .ledger
        .checkpoint(blob, job.dest.name(), job.origin())
        .await;
    // With a checkpoint, waiting for a buffer beats reading the blob again from byte 0.
    let Some(buffer) = resumable.buffer(checkpoint.is_some()).await else {
        return Err(declined);
    };
    let outcome = match fetch_in_chunks(job, blob, declined, resumable, checkpoint).await {
        Err(Failed { error, resumed_at })
            if resumed_at > 0 && error.code() == crate::code::Code::DigestMismatch =>
        {
            // The saved state, the session's bytes or the rest: whichever was wrong, a read from
            // the first byte settles it (and a source that lies still fails there).
            tracing::warn!(digest = %blob.digest, resumed_at, %error, "a resumed blob did not verify; starting it again from its first byte");
            fetch_in_chunks(job, blob, None, resumable, None).await
        }
        outcome => outcome,
    };
    drop(buffer);
    Ok(outcome.map_err(|failed| failed.error))
}

/// A failed try, and where it had resumed (0: from the first byte).
struct Failed {
    error: CopyError,
    resumed_at: u64,
}

/// Where this try of a blob starts.
struct Start {
    session: UploadSession,
    body: super::source::SourceBody,
    /// The bytes the session holds and their hash: `(0, empty)` for a fresh start.
    prefix: (u64, StreamingDigest),
}

/// Copies `blob` in checkpointed chunks, resuming `checkpoint` if it is usable.
async fn fetch_in_chunks(
    job: &BlobJob,
    blob: &Blob,
    declined: Option<UploadSession>,
    resumable: &Resumable,
    checkpoint: Option<UploadCheckpoint>,
) -> Result<BlobOutcome, Failed> {
    let failed = |error| Failed {
        error,
        resumed_at: 0,
    };
    let Start {
        mut session,
        body,
        prefix,
    } = start(job, blob, declined, checkpoint)
        .await
        .map_err(failed)?;
    let resumed_at = prefix.0;
    let meter = body.meter();
    let failure = Arc::new(Mutex::new(None));
    let mut stream = VerifyingStream::resuming(
        body,
        blob,
        prefix,
        resumable.chunk,
        failure.clone(),
        job.progress.clone(),
    );
    let mut checkpointed = resumed_at > 0;
    if checkpointed {
        session.keep_when_dropped();
    }
    let send = send_chunks(
        job,
        blob,
        &mut session,
        &mut stream,
        (resumable.chunk, &failure),
        &mut checkpointed,
    );
    match watched(send, (&meter, job.floor), &job.source, blob, &failure).await {
        Ok(()) => {
            forget(job, blob).await;
            job.ledger.record(blob, job.dest.name(), job.origin()).await;
            if resumed_at > 0 {
                tracing::info!(digest = %blob.digest, resumed_at, size = blob.size, "resumed blob upload finished");
            }
            Ok(BlobOutcome::Copied)
        }
        // The checkpoint and its session stand; the next try (or worker) continues there.
        Err(error) if error.is_transient() && checkpointed => Err(Failed { error, resumed_at }),
        Err(error) => {
            // Content that does not verify, or nothing kept yet: nothing worth resuming.
            forget(job, blob).await;
            session.cancel().await;
            Err(Failed { error, resumed_at })
        }
    }
}

/// Reads a chunk at a time (verified as it passes), `PATCH`es it, and checkpoints; the last
/// chunk commits the upload.
async fn send_chunks(
    job: &BlobJob,
    blob: &Blob,
    session: &mut UploadSession,
    stream: &mut VerifyingStream,
    (chunk_size, failure): (u64, &Mutex<Option<CopyError>>),
    checkpointed: &mut bool,
) -> Result<(), CopyError> {
    loop {
        let (offset, _) = stream.hashed();
        let want = chunk_size.min(blob.size - offset);
        let chunk = read_chunk(stream, want, failure, job.source.name()).await?;
        if offset + chunk.len() as u64 == blob.size {
            // The stream checked the last byte against the digest before passing it on.
            return session
                .finish(&blob.digest, chunk)
                .await
                .map_err(CopyError::Destination);
        }
        let uploaded = session
            .patch(offset, chunk)
            .await
            .map_err(CopyError::Destination)?;
        let (hashed, hash_state) = stream.hashed();
        let Some(hash_state) = hash_state.filter(|_| hashed == uploaded) else {
            // Never expected: the stream cuts its pieces where chunks end.
            return Err(CopyError::Destination(RegistryError::Protocol {
                registry: job.dest.registry().name().to_owned(),
                detail: format!("{uploaded} bytes uploaded but {hashed} hashed"),
            }));
        };
        let checkpoint = UploadCheckpoint {
            location: session.location().to_owned(),
            uploaded,
            hash_state,
        };
        if job
            .ledger
            .set_checkpoint(blob, job.dest.name(), job.origin(), Some(&checkpoint))
            .await
        {
            session.keep_when_dropped();
            *checkpointed = true;
        }
    }
}

/// The stream's next `want` bytes, whole (the stream cuts its chunks where ours end). A
/// failure is the stream's own verdict, from `failure`.
async fn read_chunk(
    stream: &mut VerifyingStream,
    want: u64,
    failure: &Mutex<Option<CopyError>>,
    source: &str,
) -> Result<Bytes, CopyError> {
    let mut chunk = BytesMut::with_capacity(want as usize);
    while (chunk.len() as u64) < want {
        match stream.next().await {
            Some(Ok(piece)) => chunk.extend_from_slice(&piece),
            Some(Err(error)) => {
                let verdict = failure.lock().expect("not poisoned").take();
                return Err(verdict.unwrap_or_else(|| unreadable(source, error.to_string())));
            }
            None => {
                let detail = format!(
                    "the blob ended {} bytes short of a chunk",
                    want - chunk.len() as u64
                );
                return Err(unreadable(source, detail));
            }
        }
    }
    Ok(chunk.freeze())
}

fn unreadable(source: &str, detail: String) -> CopyError {
    CopyError::Source(crate::registry::RegistryError::Unreachable {
        registry: source.to_owned(),
        detail,
    })
}

/// Where this try starts: the checkpoint, if both the registry's session and the source can
/// continue from it; otherwise the first byte (the checkpoint forgotten).
async fn start(
    job: &BlobJob,
    blob: &Blob,
    declined: Option<UploadSession>,
    checkpoint: Option<UploadCheckpoint>,
) -> Result<Start, CopyError> {
    let mut whole = None;
    if let Some(checkpoint) = checkpoint {
        match resume(job, blob, &checkpoint).await? {
            Resumed::At(resumed) => {
                let Start {
                    session,
                    body,
                    prefix,
                } = *resumed;
                if let Some(declined) = declined {
                    declined.cancel().await;
                }
                tracing::info!(digest = %blob.digest, offset = checkpoint.uploaded, size = blob.size, "resuming blob upload");
                let body = started(body, blob, checkpoint.uploaded, &job.progress)?;
                return Ok(Start {
                    session,
                    body,
                    prefix,
                });
            }
            Resumed::No { source_whole } => {
                forget(job, blob).await;
                whole = source_whole;
            }
        }
    }
    let session = match declined {
        Some(session) => session,
        None => job
            .dest
            .start_upload()
            .await
            .map_err(CopyError::Destination)?,
    };
    let body = match whole {
        Some(body) => started(body, blob, 0, &job.progress)?,
        None => open_source(&job.source, blob, &job.progress).await?,
    };
    Ok(Start {
        session,
        body,
        prefix: (0, StreamingDigest::default()),
    })
}

enum Resumed {
    At(Box<Start>),
    /// Start again; `source_whole` is the whole blob if the source answered the range with it.
    No {
        source_whole: Option<super::source::SourceBody>,
    },
}

/// Picks up `checkpoint`: the registry's session must hold exactly its bytes, and the source
/// must serve exactly the rest. A transient failure of either keeps the checkpoint for later.
async fn resume(
    job: &BlobJob,
    blob: &Blob,
    checkpoint: &UploadCheckpoint,
) -> Result<Resumed, CopyError> {
    let no = Ok(Resumed::No { source_whole: None });
    let digest = &blob.digest;
    if checkpoint.uploaded == 0 || checkpoint.uploaded >= blob.size {
        tracing::warn!(%digest, uploaded = checkpoint.uploaded, "a checkpoint outside the blob; starting it again");
        return no;
    }
    let Some(hasher) = StreamingDigest::restore(&checkpoint.hash_state) else {
        tracing::warn!(%digest, "a checkpoint with an unusable hash state; starting the blob again");
        return no;
    };
    let session = match job.dest.resume_upload(&checkpoint.location).await {
        Ok(Some((session, held))) if held == checkpoint.uploaded => session,
        Ok(Some((session, held))) => {
            tracing::info!(%digest, held, uploaded = checkpoint.uploaded, "the upload holds other bytes than its checkpoint; starting the blob again");
            session.cancel().await;
            return no;
        }
        Ok(None) => {
            tracing::info!(%digest, "the checkpoint's upload is gone; starting the blob again");
            return no;
        }
        // Kept for a later try: the internal registry is away for now.
        Err(error) if error.is_transient() => return Err(CopyError::Destination(error)),
        Err(error) => {
            tracing::warn!(%digest, %error, "the checkpoint's upload cannot be resumed; starting the blob again");
            return no;
        }
    };
    match job
        .source
        .open_blob_from(digest, checkpoint.uploaded, blob.size)
        .await
    {
        Ok(Rest::From(body)) => Ok(Resumed::At(Box::new(Start {
            session,
            body,
            prefix: (checkpoint.uploaded, hasher),
        }))),
        Ok(Rest::Whole(body)) => {
            tracing::info!(%digest, "the source serves no ranges; starting the blob again");
            session.cancel().await;
            Ok(Resumed::No {
                source_whole: Some(body),
            })
        }
        Ok(Rest::Unusable) => {
            session.cancel().await;
            no
        }
        Err(error) if error.is_transient() => {
            // Kept for a later try: the session stays, as does the checkpoint.
            let mut session = session;
            session.keep_when_dropped();
            Err(error)
        }
        Err(error) => {
            // Whatever it is (the blob gone upstream, say), a fresh start meets it plainly.
            tracing::info!(%digest, %error, "the source cannot serve the rest; starting the blob again");
            session.cancel().await;
            no
        }
    }
}

/// Forgets the blob's checkpoint (done, or nothing left worth resuming).
async fn forget(job: &BlobJob, blob: &Blob) {
    job.ledger
        .set_checkpoint(blob, job.dest.name(), job.origin(), None)
        .await;
}
