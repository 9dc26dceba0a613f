//! What the API does with stagings: create (idempotently), read, list, cancel, release.

use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::{NewStaging, STAGING_COLUMNS, Staging};
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
    pub fn code(&self) -> &'static str {
        match self {
            Self::Conflict(_) => "STAGING_CONFLICT",
            Self::NoCredentialsKey => "CREDENTIALS_NOT_ACCEPTED",
            Self::Database(_) => "DATABASE_UNAVAILABLE",
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
    let sealed = match (&new.credentials, key) {
        (None, _) => None,
        (Some(credentials), Some(key)) => Some(key.encrypt(credentials)),
        (Some(_), None) => return Err(StoreError::NoCredentialsKey),
    };
    let fingerprint = new.fingerprint();
    let mut tx = pool.begin().await?;
    let inserted: Option<Staging> = sqlx::query_as(AssertSqlSafe(format!(
        "INSERT INTO stagings (staging_guid, app_guid, source_image, platform, request_fingerprint, \
         completion_callback, api, encrypted_credentials, deadline_at, budget_key) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now() + make_interval(secs => $9), $10) \
         ON CONFLICT (staging_guid) DO NOTHING RETURNING {STAGING_COLUMNS}"
    )))
    .bind(new.staging_guid)
    .bind(new.app_guid)
    .bind(new.image.to_string())
    .bind(new.platform.to_string())
    .bind(&fingerprint)
    .bind(&new.completion_callback)
    .bind(new.api.as_str())
    .bind(sealed)
    .bind(new.timeout.as_secs_f64())
    .bind(new.budget_key())
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(staging) = inserted {
        // A new staging means the app is alive, even if it was deleted once.
        sqlx::query("DELETE FROM deleted_apps WHERE app_guid = $1")
            .bind(new.app_guid)
            .execute(&mut *tx)
            .await?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(NEW_WORK_CHANNEL)
            .bind(staging.staging_guid.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        return Ok(Created::New(staging));
    }
    let (existing_fingerprint,): (Vec<u8>,) =
        sqlx::query_as("SELECT request_fingerprint FROM stagings WHERE staging_guid = $1")
            .bind(new.staging_guid)
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;
    if existing_fingerprint != fingerprint {
        return Err(StoreError::Conflict(new.staging_guid));
    }
    let existing = get(pool, new.staging_guid)
        .await?
        .ok_or(StoreError::Conflict(new.staging_guid))?;
    Ok(Created::Existing(existing))
}

pub async fn get(pool: &PgPool, staging_guid: Uuid) -> Result<Option<Staging>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {STAGING_COLUMNS} FROM stagings WHERE staging_guid = $1"
    )))
    .bind(staging_guid)
    .fetch_optional(pool)
    .await
}

/// An app's stagings, newest first.
pub async fn list_for_app(
    pool: &PgPool,
    app_guid: Uuid,
    limit: i64,
) -> Result<Vec<Staging>, sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT {STAGING_COLUMNS} FROM stagings WHERE app_guid = $1 ORDER BY created_at DESC LIMIT $2"
    )))
    .bind(app_guid)
    .bind(limit)
    .fetch_all(pool)
    .await
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
    let cancelled: Option<Staging> = sqlx::query_as(AssertSqlSafe(format!(
        "UPDATE stagings SET state = 'cancelled', encrypted_credentials = NULL, error_code = 'CANCELLED', \
         error_message = 'cancelled before it started', finished_at = now(), updated_at = now(), \
         waiting_for = NULL \
         WHERE staging_guid = $1 AND state = 'queued' RETURNING {STAGING_COLUMNS}"
    )))
    .bind(staging_guid)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(staging) = cancelled {
        enqueue_callback(&mut tx, &staging).await?;
        tx.commit().await?;
        return Ok(Stopped::Cancelled(staging));
    }
    let requested: Option<Staging> = sqlx::query_as(AssertSqlSafe(format!(
        "UPDATE stagings SET cancel_requested = true, updated_at = now() \
         WHERE staging_guid = $1 AND state = 'running' RETURNING {STAGING_COLUMNS}"
    )))
    .bind(staging_guid)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(staging) = requested {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(super::store::CANCEL_CHANNEL)
            .bind(staging_guid.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        return Ok(Stopped::CancelRequested(staging));
    }
    let released: Option<Staging> = sqlx::query_as(AssertSqlSafe(format!(
        "UPDATE stagings SET released_at = coalesce(released_at, now()), updated_at = now() \
         WHERE staging_guid = $1 AND state IN ('succeeded', 'failed', 'cancelled') RETURNING {STAGING_COLUMNS}"
    )))
    .bind(staging_guid)
    .fetch_optional(&mut *tx)
    .await?;
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
        sqlx::query("INSERT INTO callbacks (staging_guid, url, payload) VALUES ($1, $2, $3)")
            .bind(staging.staging_guid)
            .bind(url)
            .bind(staging.callback_payload())
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}
