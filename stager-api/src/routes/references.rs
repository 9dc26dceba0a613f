//! The reference ledger: `PUT /references` (the platform's periodic list of stagings in use)
//! and `DELETE /apps/{app_guid}` (the app is gone). What these say decides what the pruner
//! may delete, so a malformed or suspicious list changes nothing.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use tailor::staging::references::{self, ReferenceError};
use uuid::Uuid;

use crate::auth::Authenticated;
use crate::error::ApiError;
use crate::routes::stage::path_guid;
use crate::startup::AppState;

/// Room for about 400 000 GUIDs: the largest foundations' droplet counts, with margin.
pub const MAX_REFERENCES_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The body of `PUT /references`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferencesRequest {
    pub staging_guids: Vec<String>,
}

fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

/// `?force=true` (or `false`); anything else is refused rather than guessed at.
fn force_flag(req: &HttpRequest) -> Result<bool, ApiError> {
    let mut force = false;
    for pair in req.query_string().split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("force", "true") => force = true,
            ("force", "false") => force = false,
            (name, value) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "INVALID_QUERY",
                    format!(
                        "unexpected query parameter {name}={value:?}; only force=true|false is accepted"
                    ),
                ));
            }
        }
    }
    Ok(force)
}

/// `PUT /references[?force=true]`
pub async fn sync(
    _: Authenticated,
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<ReferencesRequest>,
) -> Result<HttpResponse, ApiError> {
    let force = force_flag(&req)?;
    let mut in_use = Vec::with_capacity(body.staging_guids.len());
    for (index, text) in body.staging_guids.iter().enumerate() {
        let guid = Uuid::parse_str(text.trim()).map_err(|_| {
            unprocessable(
                "INVALID_GUID",
                format!("staging_guids[{index}] {text:?} is not a GUID; nothing was changed"),
            )
        })?;
        in_use.push(guid);
    }
    match references::sync(&state.db, &in_use, force).await {
        Ok(report) => {
            tracing::info!(
                listed = report.listed,
                unknown = report.unknown,
                unreferenced = report.unreferenced,
                rereferenced = report.rereferenced,
                force,
                "references synced"
            );
            Ok(HttpResponse::Ok().json(report))
        }
        Err(error @ ReferenceError::Suspicious { .. }) => {
            tracing::warn!(%error, "reference list refused");
            Err(unprocessable(
                error.code(),
                format!("{error}; nothing was changed"),
            ))
        }
        Err(ReferenceError::Database(error)) => Err(crate::error::database_error(&error)),
    }
}

/// `DELETE /apps/{app_guid}`: releases every staging of the app.
pub async fn delete_app(
    _: Authenticated,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let app_guid = path_guid("app_guid", &path)?;
    match references::release_app(&state.db, app_guid)
        .await
        .map_err(|e| crate::error::database_error(&e))?
    {
        Some(released) => {
            tracing::info!(%app_guid, released = released.released, cancelled = released.cancelled, "app deleted: stagings released");
            Ok(HttpResponse::Ok().json(serde_json::json!({
                "app_guid": app_guid,
                "released": released.released,
                "cancelled": released.cancelled,
            })))
        }
        None => Err(ApiError::not_found(format!(
            "no stagings for app {app_guid}"
        ))),
    }
}
