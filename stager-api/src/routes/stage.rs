//! `/stage`: create, read, cancel and list stagings.

use actix_web::http::StatusCode;
use actix_web::http::header::LOCATION;
use actix_web::{HttpResponse, web};
use serde::Deserialize;
use tailor::code::Code;
use tailor::registry::Credentials;
use tailor::staging::store::{self, Created, Stopped, StoreError};
use tailor::staging::{Api, NewStaging, Requested, Rules};
use uuid::Uuid;

use crate::auth::Authenticated;
use crate::error::ApiError;
use crate::state::AppState;

/// The body of `POST /stage`. Not `Debug`: it carries a password.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageRequest {
    pub app_guid: String,
    pub staging_guid: Option<String>,
    pub image: String,
    pub platform: Option<String>,
    pub credentials: Option<CredentialsBody>,
    pub completion_callback: Option<String>,
    /// `copy` or `pin`; the stager's `TAILOR_DEFAULT_MODE` when absent.
    pub mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsBody {
    pub username: String,
    pub password: String,
}

fn unprocessable(code: Code, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

/// Parses a GUID from a request body field (422 when malformed).
pub fn body_guid(field: &str, value: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(value.trim()).map_err(|_| {
        unprocessable(
            Code::InvalidGuid,
            format!("{field} {value:?} is not a GUID (e.g. 3f2a...-...)"),
        )
    })
}

/// Parses a GUID from the URL path (400 when malformed).
pub fn path_guid(field: &str, value: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(value).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            Code::InvalidGuid,
            format!("{field} {value:?} in the URL is not a GUID"),
        )
    })
}

/// Parses a staging request under this stager's rules (422 with the rule's code when it breaks one).
pub fn new_staging(state: &AppState, requested: Requested<'_>) -> Result<NewStaging, ApiError> {
    let rules = Rules {
        egress: &state.egress,
        registries: &state.registries,
        default_registry: &state.tailor.default_registry,
        accepts_credentials: state.credentials_key.is_some(),
        default_timeout: state.tailor.staging_timeout,
        source_locations: &state.tailor.source_locations,
        default_mode: state.tailor.default_mode,
    };
    NewStaging::parse(requested, &rules).map_err(|e| unprocessable(e.code(), e.to_string()))
}

/// Stores `new` and answers 202 with the staging (the same one again for a repeated request).
pub async fn accept(state: &AppState, new: &NewStaging) -> Result<HttpResponse, ApiError> {
    let created = store::create(&state.db, new, state.credentials_key.as_ref())
        .await
        .map_err(|e| match e {
            StoreError::Conflict(guid) => ApiError::new(
                StatusCode::CONFLICT,
                e.code(),
                format!("staging {guid} already exists with a different request"),
            ),
            StoreError::NoCredentialsKey => unprocessable(e.code(), e.to_string()),
            StoreError::Database(error) => crate::error::database_error(&error),
        })?;
    let staging = match created {
        Created::New(staging) => {
            tracing::info!(staging_guid = %staging.staging_guid, app_guid = %staging.app_guid, image = %staging.source_image, mode = staging.mode.as_str(), "staging queued");
            staging
        }
        Created::Existing(staging) => staging,
    };
    Ok(HttpResponse::Accepted()
        .insert_header((LOCATION, format!("/stage/{}", staging.staging_guid)))
        .json(staging.to_json()))
}

/// `POST /stage`
pub async fn create(
    _: Authenticated,
    state: web::Data<AppState>,
    body: web::Json<StageRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let app_guid = body_guid("app_guid", &body.app_guid)?;
    let staging_guid = match &body.staging_guid {
        Some(guid) => body_guid("staging_guid", guid)?,
        None => Uuid::new_v4(),
    };
    let credentials = body
        .credentials
        .map(|c| Credentials::new(c.username, c.password));
    let new = new_staging(
        &state,
        Requested {
            staging_guid,
            app_guid,
            image: &body.image,
            platform: body.platform.as_deref(),
            credentials,
            completion_callback: body.completion_callback,
            api: Api::Stage,
            timeout: None,
            mode: body.mode.as_deref(),
        },
    )?;
    accept(&state, &new).await
}

/// `GET /stage/{staging_guid}`
pub async fn get(
    _: Authenticated,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let guid = path_guid("staging_guid", &path)?;
    match store::get(&state.db, guid)
        .await
        .map_err(|e| crate::error::database_error(&e))?
    {
        Some(staging) => Ok(HttpResponse::Ok().json(staging.to_json())),
        None => Err(ApiError::not_found(format!("no staging {guid}"))),
    }
}

/// `DELETE /stage/{staging_guid}`: cancels a queued or running staging; releases a finished one.
pub async fn stop(
    _: Authenticated,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let guid = path_guid("staging_guid", &path)?;
    stop_staging(&state, guid).await
}

pub async fn stop_staging(state: &AppState, guid: Uuid) -> Result<HttpResponse, ApiError> {
    match store::stop(&state.db, guid)
        .await
        .map_err(|e| crate::error::database_error(&e))?
    {
        Stopped::Cancelled(staging) | Stopped::CancelRequested(staging) => {
            tracing::info!(staging_guid = %guid, "staging cancellation requested");
            Ok(HttpResponse::Accepted().json(staging.to_json()))
        }
        Stopped::Released(staging) => {
            tracing::info!(staging_guid = %guid, "staging released");
            Ok(HttpResponse::Ok().json(staging.to_json()))
        }
        Stopped::NotFound => Err(ApiError::not_found(format!("no staging {guid}"))),
    }
}

/// `GET /apps/{app_guid}/stagings`
pub async fn list_for_app(
    _: Authenticated,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let app_guid = path_guid("app_guid", &path)?;
    let stagings = store::list_for_app(&state.db, app_guid, 500)
        .await
        .map_err(|e| crate::error::database_error(&e))?;
    let items: Vec<_> = stagings.iter().map(|s| s.to_json()).collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "app_guid": app_guid, "stagings": items })))
}
