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

/// StagingRequestFromCC. Fields tailor has no use for (memory, disk, egress rules, log GUID,
/// isolation segment) are accepted and ignored, as Diego's own stager would.
#[derive(Deserialize)]
pub struct StagingRequestFromCc {
    pub app_id: String,
    pub lifecycle: String,
    pub lifecycle_data: Option<serde_json::Value>,
    pub completion_callback: Option<String>,
    /// Seconds the Cloud Controller gives the staging: its deadline.
    pub timeout: Option<u64>,
    /// The app's staging environment; tailor reads one variable of it, `TAILOR_MODE` (set with
    /// `cf set-env APP TAILOR_MODE pin`), and keeps nothing else (it may hold secrets).
    pub environment: Option<serde_json::Value>,
}

/// The staging environment variable an app opts in or out of the internal registry with.
pub const MODE_VARIABLE: &str = "TAILOR_MODE";

/// An environment variable as the Cloud Controller sends it. Values other than strings (or
/// entries of another shape) are not this variable's business and are left alone.
#[derive(Deserialize)]
struct EnvironmentVariable {
    name: String,
    value: serde_json::Value,
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
    /// `TAILOR_MODE` from the environment, if set.
    mode: Option<String>,
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
        let mode = mode_from(body.environment)?;
        Ok(Self {
            app_guid,
            image,
            credentials,
            completion_callback: body.completion_callback,
            timeout: body.timeout.map(std::time::Duration::from_secs),
            mode,
        })
    }
}

/// `TAILOR_MODE`'s value in a StagingRequestFromCC's `environment` (`[{name, value}]`). Other
/// variables are not read, let alone kept or logged, and an environment of another shape is
/// ignored like the other fields tailor has no use for. A `TAILOR_MODE` whose value is not a
/// string is refused: the app meant to choose, and something is wrong with how.
fn mode_from(environment: Option<serde_json::Value>) -> Result<Option<String>, ApiError> {
    let Some(serde_json::Value::Array(variables)) = environment else {
        return Ok(None);
    };
    let mut mode = None;
    for variable in variables {
        let Ok(variable) = serde_json::from_value::<EnvironmentVariable>(variable) else {
            continue;
        };
        if variable.name != MODE_VARIABLE {
            continue;
        }
        // The last one wins, as in a shell's environment.
        mode = Some(match variable.value {
            serde_json::Value::String(value) => value,
            _ => {
                return Err(unprocessable(
                    Code::InvalidMode,
                    format!("{MODE_VARIABLE} must be a string: \"copy\" or \"pin\""),
                ));
            }
        });
    }
    Ok(mode)
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
            mode: docker.mode.as_deref(),
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

    #[test]
    fn the_mode_comes_from_tailor_mode_in_the_environment_and_nothing_else_is_read() {
        let with_environment = |environment: serde_json::Value| {
            let mut body = docker(json!({ "docker_image": "redis" }));
            body.environment = Some(environment);
            DockerStaging::parse(body)
        };
        let mode = |environment| {
            with_environment(environment)
                .unwrap_or_else(|e| panic!("{e}"))
                .mode
        };
        assert_eq!(mode(json!([])), None);
        assert_eq!(
            mode(json!([
                { "name": "DATABASE_PASSWORD", "value": "hunter2" },
                { "name": "TAILOR_MODE", "value": "copy" },
                { "name": "TAILOR_MODE", "value": "pin" },
                { "name": "PORT", "value": 8080 },
                "not an object",
            ])),
            Some("pin".to_owned())
        );
        // Not a list: ignored, like the other fields tailor has no use for.
        assert_eq!(mode(json!({ "TAILOR_MODE": "pin" })), None);
        assert_eq!(
            DockerStaging::parse(docker(json!({ "docker_image": "redis" })))
                .ok()
                .unwrap()
                .mode,
            None
        );
        let Err(refused) = with_environment(json!([{ "name": "TAILOR_MODE", "value": true }]))
        else {
            panic!("a TAILOR_MODE that is not a string was accepted");
        };
        assert_eq!(refused.code, Code::InvalidMode, "{refused}");
    }
}
