//! The Diego stager's API, so that a Cloud Controller can use tailor as its stager for the
//! `docker` lifecycle: `PUT /v1/staging/{staging_guid}` (StagingRequestFromCC) and
//! `DELETE /v1/staging/{staging_guid}`. The result goes to the request's
//! `completion_callback` as a StagingResponseForCC.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use serde::Deserialize;
use tailor::code::Code;
use tailor::registry::Credentials;
use tailor::staging::{Api, Requested};

use super::stage::{accept, body_guid, new_staging, path_guid, stop_staging};
use crate::auth::Authenticated;
use crate::error::ApiError;
use crate::state::AppState;

/// StagingRequestFromCC. Fields tailor has no use for (memory, disk, environment, egress
/// rules, log GUID, isolation segment) are accepted and ignored, as Diego's own stager would.
#[derive(Deserialize)]
pub struct StagingRequestFromCc {
    pub app_id: String,
    pub lifecycle: String,
    pub lifecycle_data: Option<serde_json::Value>,
    pub completion_callback: Option<String>,
    /// Seconds the Cloud Controller gives the staging: its deadline.
    pub timeout: Option<u64>,
}

/// DockerStagingData. Not `Debug`: it carries a password.
#[derive(Deserialize)]
pub struct DockerStagingData {
    pub docker_image: Option<String>,
    pub docker_user: Option<String>,
    pub docker_password: Option<String>,
}

fn unprocessable(code: Code, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

/// `PUT /v1/staging/{staging_guid}`
pub async fn stage(
    _: Authenticated,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<StagingRequestFromCc>,
) -> Result<HttpResponse, ApiError> {
    let staging_guid = path_guid("staging_guid", &path)?;
    let body = body.into_inner();
    if body.lifecycle != "docker" {
        return Err(unprocessable(
            Code::UnsupportedLifecycle,
            format!(
                "lifecycle {:?} is not supported: tailor stages only the \"docker\" lifecycle",
                body.lifecycle
            ),
        ));
    }
    let app_guid = body_guid("app_id", &body.app_id)?;
    let data: DockerStagingData = serde_json::from_value(
        body.lifecycle_data.unwrap_or(serde_json::Value::Null),
    )
    .map_err(|e| unprocessable(Code::InvalidLifecycleData, format!("lifecycle_data: {e}")))?;
    let image = data
        .docker_image
        .filter(|i| !i.trim().is_empty())
        .ok_or_else(|| {
            unprocessable(
                Code::InvalidLifecycleData,
                "lifecycle_data.docker_image is required",
            )
        })?;
    let credentials = match (data.docker_user, data.docker_password) {
        (Some(user), Some(password)) if !user.is_empty() => Some(Credentials::new(user, password)),
        (None, None) => None,
        _ => {
            return Err(unprocessable(
                Code::InvalidCredentials,
                "docker_user and docker_password must be given together",
            ));
        }
    };
    let new = new_staging(
        &state,
        Requested {
            staging_guid,
            app_guid,
            image: &image,
            platform: None,
            credentials,
            completion_callback: body.completion_callback,
            api: Api::Diego,
            timeout: body.timeout.map(std::time::Duration::from_secs),
        },
    )?;
    accept(&state, &new).await
}

/// `DELETE /v1/staging/{staging_guid}`
pub async fn stop(
    _: Authenticated,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let staging_guid = path_guid("staging_guid", &path)?;
    stop_staging(&state, staging_guid).await
}
