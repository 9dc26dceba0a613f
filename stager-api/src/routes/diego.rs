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

/// A StagingRequestFromCC for the docker lifecycle, converted: what its `lifecycle_data`
/// carries, checked for the rules only this API has. The rest is [`NewStaging`]'s to judge.
///
/// [`NewStaging`]: tailor::staging::NewStaging
struct DockerStaging {
    app_guid: uuid::Uuid,
    image: String,
    credentials: Option<Credentials>,
    completion_callback: Option<String>,
    timeout: Option<std::time::Duration>,
}

impl DockerStaging {
    fn parse(body: StagingRequestFromCc) -> Result<Self, ApiError> {
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
        let data: DockerStagingData =
            serde_json::from_value(body.lifecycle_data.unwrap_or(serde_json::Value::Null))
                .map_err(|e| {
                    unprocessable(Code::InvalidLifecycleData, format!("lifecycle_data: {e}"))
                })?;
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
            (Some(user), Some(password)) => Some(Credentials::new(user, password)),
            (None, None) => None,
            _ => {
                return Err(unprocessable(
                    Code::InvalidCredentials,
                    "docker_user and docker_password must be given together",
                ));
            }
        };
        Ok(Self {
            app_guid,
            image,
            credentials,
            completion_callback: body.completion_callback,
            timeout: body.timeout.map(std::time::Duration::from_secs),
        })
    }
}

/// `PUT /v1/staging/{staging_guid}`
pub async fn stage(
    _: Authenticated,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<StagingRequestFromCc>,
) -> Result<HttpResponse, ApiError> {
    let staging_guid = path_guid("staging_guid", &path)?;
    let docker = DockerStaging::parse(body.into_inner())?;
    let new = new_staging(
        &state,
        Requested {
            staging_guid,
            app_guid: docker.app_guid,
            image: &docker.image,
            platform: None,
            credentials: docker.credentials,
            completion_callback: docker.completion_callback,
            api: Api::Diego,
            timeout: docker.timeout,
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn request(body: serde_json::Value) -> StagingRequestFromCc {
        serde_json::from_value(body).unwrap()
    }

    fn docker(data: serde_json::Value) -> StagingRequestFromCc {
        request(json!({
            "app_id": "0f8e5a5c-2c1d-4b8a-9f4e-3d2c1b0a9f8e",
            "lifecycle": "docker",
            "lifecycle_data": data,
            "timeout": 900,
        }))
    }

    #[test]
    fn a_docker_request_converts_with_its_image_credentials_and_deadline() {
        let parsed = DockerStaging::parse(docker(json!({
            "docker_image": "cloudfoundry/diego-docker-app:latest",
            "docker_user": "robot",
            "docker_password": "hunter2",
        })))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.image, "cloudfoundry/diego-docker-app:latest");
        assert_eq!(parsed.credentials.unwrap().username, "robot");
        assert_eq!(parsed.timeout, Some(std::time::Duration::from_secs(900)));
        assert_eq!(
            parsed.app_guid.to_string(),
            "0f8e5a5c-2c1d-4b8a-9f4e-3d2c1b0a9f8e"
        );
    }

    #[test]
    fn each_broken_rule_answers_with_its_own_code_and_never_the_password() {
        let buildpack = request(json!({
            "app_id": "0f8e5a5c-2c1d-4b8a-9f4e-3d2c1b0a9f8e",
            "lifecycle": "buildpack",
            "lifecycle_data": {},
        }));
        let bad_app = request(json!({
            "app_id": "not-a-guid",
            "lifecycle": "docker",
            "lifecycle_data": { "docker_image": "redis" },
        }));
        let cases = [
            ("buildpack", buildpack, Code::UnsupportedLifecycle),
            ("app_id", bad_app, Code::InvalidGuid),
            ("no image", docker(json!({})), Code::InvalidLifecycleData),
            (
                "blank image",
                docker(json!({ "docker_image": " " })),
                Code::InvalidLifecycleData,
            ),
            (
                "data not an object",
                docker(json!("redis")),
                Code::InvalidLifecycleData,
            ),
            (
                "password alone",
                docker(json!({ "docker_image": "redis", "docker_password": "hunter2" })),
                Code::InvalidCredentials,
            ),
            (
                "user alone",
                docker(json!({ "docker_image": "redis", "docker_user": "robot" })),
                Code::InvalidCredentials,
            ),
        ];
        for (what, body, code) in cases {
            let Err(error) = DockerStaging::parse(body) else {
                panic!("{what}: accepted");
            };
            assert_eq!(error.code, code, "{what}: {error}");
            assert_eq!(error.status, StatusCode::UNPROCESSABLE_ENTITY, "{what}");
            assert!(!error.message.contains("hunter2"), "{what}: {error}");
        }
    }
}
