//! What the API does with stagings: create (idempotently), read, list, cancel, release.

use sqlx::{PgExecutor, PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::location::StagingSource;
use super::{Api, Mode, NewStaging, Staging, StagingState, Waiting};
use crate::code::Code;
use crate::platform::Platform;
use crate::reference::ImageReference;
use crate::secrets::CredentialsKey;

/// The channel workers LISTEN on for new work.
pub const NEW_WORK_CHANNEL: &str = "tailor_stagings";
/// The channel workers LISTEN on for cancellations (payload: the staging GUID).
pub const CANCEL_CHANNEL: &str = "tailor_cancel";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("staging {0} already exists with a different request")]
    Conflict(Uuid),
    #[error("this stager cannot accept credentials: TAILOR_CREDENTIALS_KEY is not configured")]
    NoCredentialsKey,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    pub fn code(&self) -> Code {
        match self {
            Self::Conflict(_) => Code::StagingConflict,
            Self::NoCredentialsKey => Code::CredentialsNotAccepted,
            Self::Database(error) => crate::db::error_code(error),
        }
    }
}

/// Whether `create` made a new staging or found the same request already there.
#[derive(Debug)]
pub enum Created {
    New(Staging),
    Existing(Staging),
}

/// Creates a queued staging, or returns the existing one for a repeated identical request.
pub async fn create(
    pool: &PgPool,
    new: &NewStaging,
    key: Option<&CredentialsKey>,
) -> Result<Created, StoreError> {
    let sealed = match (new.credentials(), key) {
        (None, _) => None,
        (Some(credentials), Some(key)) => Some(key.encrypt(credentials)),
        (Some(_), None) => return Err(StoreError::NoCredentialsKey),
    };
    let fingerprint = new.fingerprint();
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query_scalar!(
        "INSERT INTO stagings (staging_guid, app_guid, source_image, platform, request_fingerprint, \
         completion_callback, api, encrypted_credentials, deadline_at, budget_key, mode) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now() + make_interval(secs => $9), $10, $11) \
         ON CONFLICT (staging_guid) DO NOTHING RETURNING staging_guid",
        new.staging_guid(),
        new.app_guid(),
        new.image().to_string(),
        new.platform().to_string(),
        &fingerprint,
        new.completion_callback(),
        new.api() as Api,
        sealed,
        new.timeout().as_secs_f64(),
        new.budget_key(),
        new.mode() as Mode,
    )
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(staging_guid) = inserted {
        // A new staging means the app is alive, even if it was deleted once.
        sqlx::query!(
            "DELETE FROM deleted_apps WHERE app_guid = $1",
            new.app_guid()
        )
        .execute(&mut *tx)
        .await?;
        notify(&mut *tx, NEW_WORK_CHANNEL, staging_guid).await?;
        let staging = read_one(&mut *tx, staging_guid)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        tx.commit().await?;
        return Ok(Created::New(staging));
    }
    let existing_fingerprint = sqlx::query_scalar!(
        "SELECT request_fingerprint FROM stagings WHERE staging_guid = $1",
        new.staging_guid()
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    if existing_fingerprint != fingerprint {
        return Err(StoreError::Conflict(new.staging_guid()));
    }
    let existing = get(pool, new.staging_guid())
        .await?
        .ok_or(StoreError::Conflict(new.staging_guid()))?;
    Ok(Created::Existing(existing))
}

/// Reads stagings by GUID, newest first. This is the one statement that reads whole
/// [`Staging`]s: every statement that changes stagings returns their GUIDs and lets this read
/// them (in its transaction), so the column list is written once and checked against the
/// schema at compile time.
pub(crate) async fn read<'e>(
    executor: impl PgExecutor<'e>,
    guids: &[Uuid],
) -> Result<Vec<Staging>, sqlx::Error> {
    sqlx::query_as!(
        Staging,
        r#"SELECT staging_guid, app_guid, source_image AS "source_image: StagingSource",
               platform AS "platform: Platform", mode AS "mode: Mode", api AS "api: Api",
               completion_callback,
               state AS "state: StagingState", attempts, cancel_requested, error_code,
               error_message, last_error, source_digest,
               pinned_image AS "pinned_image: ImageReference", tagged_image, bytes_total,
               bytes_done, bytes_copied, bytes_mounted, bytes_skipped, blobs_copied,
               blobs_mounted, blobs_skipped, start_command, execution_metadata, created_at,
               updated_at, started_at, finished_at, released_at, unreferenced_at, pruned_at,
               deadline_at, source_registry AS "source_registry!", budget_key, run_after,
               waiting_for AS "waiting_for: Waiting", workers_lost, referrers
           FROM stagings WHERE staging_guid = ANY($1) ORDER BY created_at DESC"#,
        guids
    )
    .fetch_all(executor)
    .await
}

/// Every manifest and blob the live images of `app_guid` are made of (their recorded
/// objects, referrers included): what deleting referrers must leave alone.
pub async fn objects_in_use<'e>(
    executor: impl PgExecutor<'e>,
    app_guid: Uuid,
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let digests = sqlx::query_scalar!(
        r#"SELECT DISTINCT o.digest AS "digest!" FROM staging_objects o
           JOIN stagings s USING (staging_guid)
           WHERE s.app_guid = $1 AND s.state = 'succeeded' AND s.pruned_at IS NULL"#,
        app_guid
    )
    .fetch_all(executor)
    .await?;
    Ok(digests.into_iter().collect())
}

/// [`read`] for one GUID.
pub(crate) async fn read_one<'e>(
    executor: impl PgExecutor<'e>,
    staging_guid: Uuid,
) -> Result<Option<Staging>, sqlx::Error> {
    Ok(read(executor, &[staging_guid]).await?.pop())
}

/// Reads the one staging a statement returned the GUID of, if it returned one.
pub(crate) async fn read_returned(
    tx: &mut Transaction<'_, Postgres>,
    returned: Option<Uuid>,
) -> Result<Option<Staging>, sqlx::Error> {
    match returned {
        Some(staging_guid) => read_one(&mut **tx, staging_guid).await,
        None => Ok(None),
    }
}

/// `pg_notify(channel, staging_guid)`, in the caller's transaction (delivered at its commit).
pub(crate) async fn notify<'e>(
    executor: impl PgExecutor<'e>,
    channel: &str,
    staging_guid: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "SELECT pg_notify($1, $2)",
        channel,
        staging_guid.to_string()
    )
    .execute(executor)
    .await?;
    Ok(())
}

pub async fn get(pool: &PgPool, staging_guid: Uuid) -> Result<Option<Staging>, sqlx::Error> {
    read_one(pool, staging_guid).await
}

/// An app's stagings, newest first.
pub async fn list_for_app(
    pool: &PgPool,
    app_guid: Uuid,
    limit: i64,
) -> Result<Vec<Staging>, sqlx::Error> {
    let guids = sqlx::query_scalar!(
        "SELECT staging_guid FROM stagings WHERE app_guid = $1 ORDER BY created_at DESC LIMIT $2",
        app_guid,
        limit
    )
    .fetch_all(pool)
    .await?;
    read(pool, &guids).await
}

/// What `DELETE /stage/{guid}` did.
#[derive(Debug)]
pub enum Stopped {
    /// It was queued and is now cancelled.
    Cancelled(Staging),
    /// It is running; its worker was asked to stop and will mark it cancelled.
    CancelRequested(Staging),
    /// It had finished; it is now released (its image may be pruned).
    Released(Staging),
    NotFound,
}

/// Cancels a queued or running staging, or releases a finished one.
pub async fn stop(pool: &PgPool, staging_guid: Uuid) -> Result<Stopped, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let cancelled = sqlx::query_scalar!(
        "UPDATE stagings SET state = 'cancelled', encrypted_credentials = NULL, error_code = $2, \
         error_message = 'cancelled before it started', finished_at = now(), updated_at = now(), \
         waiting_for = NULL \
         WHERE staging_guid = $1 AND state = 'queued' RETURNING staging_guid",
        staging_guid,
        Code::Cancelled.as_str(),
    )
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(staging) = read_returned(&mut tx, cancelled).await? {
        enqueue_callback(&mut tx, &staging).await?;
        tx.commit().await?;
        return Ok(Stopped::Cancelled(staging));
    }
    let requested = sqlx::query_scalar!(
        "UPDATE stagings SET cancel_requested = true, updated_at = now() \
         WHERE staging_guid = $1 AND state = 'running' RETURNING staging_guid",
        staging_guid
    )
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(staging) = read_returned(&mut tx, requested).await? {
        notify(&mut *tx, CANCEL_CHANNEL, staging_guid).await?;
        tx.commit().await?;
        return Ok(Stopped::CancelRequested(staging));
    }
    let released = sqlx::query_scalar!(
        "UPDATE stagings SET released_at = coalesce(released_at, now()), updated_at = now() \
         WHERE staging_guid = $1 AND state IN ('succeeded', 'failed', 'cancelled') RETURNING staging_guid",
        staging_guid
    )
    .fetch_optional(&mut *tx)
    .await?;
    let released = read_returned(&mut tx, released).await?;
    tx.commit().await?;
    Ok(match released {
        Some(staging) => Stopped::Released(staging),
        None => Stopped::NotFound,
    })
}

/// Writes the completion callback for a staging that just ended, in the caller's transaction.
pub(crate) async fn enqueue_callback(
    tx: &mut Transaction<'_, Postgres>,
    staging: &Staging,
) -> Result<(), sqlx::Error> {
    debug_assert!(staging.state.is_finished());
    if let Some(url) = &staging.completion_callback {
        sqlx::query!(
            "INSERT INTO callbacks (staging_guid, url, payload) VALUES ($1, $2, $3)",
            staging.staging_guid,
            url,
            staging.callback_payload()
        )
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}
