//! The reference record: `PUT /references` (the platform's periodic list of stagings in use)
//! and `DELETE /apps/{app_guid}` (the app is gone). What these say decides what the pruner
//! may delete, so a malformed or suspicious list changes nothing.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use tailor::code::Code;
use tailor::staging::references::{self, SyncError};
use uuid::Uuid;

use crate::auth::Authenticated;
use crate::error::ApiError;
use crate::routes::stage::path_guid;
use crate::state::AppState;

/// Room for about 400 000 GUIDs: the largest foundations' droplet counts, with margin.
pub const MAX_REFERENCES_BODY_BYTES: usize = 16 * 1024 * 1024;

/// How many `PUT /references` bodies are read and applied at once per process; more answer 429
/// with `Retry-After`, so that large lists cannot multiply memory.
pub const SYNCS_AT_ONCE: usize = 2;

/// The body of `PUT /references`: GUIDs are parsed as they are read, never held as strings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferencesRequest {
    #[serde(deserialize_with = "guid_list")]
    pub staging_guids: Vec<Uuid>,
}

fn guid_list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<Uuid>, D::Error> {
    struct Guids;
    impl<'de> serde::de::Visitor<'de> for Guids {
        type Value = Vec<Uuid>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of staging GUIDs")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<Uuid>, A::Error> {
            let mut guids = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(text) = seq.next_element::<std::borrow::Cow<'de, str>>()? {
                let guid = Uuid::parse_str(text.trim()).map_err(|_| {
                    serde::de::Error::custom(format!(
                        "staging_guids[{}] {:?} is not a GUID",
                        guids.len(),
                        tailor::text::clean(&text, 64)
                    ))
                })?;
                guids.push(guid);
            }
            Ok(guids)
        }
    }
    deserializer.deserialize_seq(Guids)
}

fn unprocessable(code: Code, message: impl Into<String>) -> ApiError {
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
                    Code::InvalidQuery,
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
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let force = force_flag(&req)?;
    let is_json = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().starts_with("application/json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::UnsupportedMediaType,
            "send the body as Content-Type: application/json",
        ));
    }
    // Admitted before the body is read: a queue of large bodies never builds up in memory.
    let _permit = state
        .reference_syncs
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                Code::TooManyReferenceSyncs,
                "other reference syncs are being applied; retry shortly",
            )
            .with_retry_after(5)
        })?;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = futures_util::StreamExt::next(&mut payload).await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                Code::MalformedJson,
                format!("reading the body failed: {e}"),
            )
        })?;
        if body.len() + chunk.len() > MAX_REFERENCES_BODY_BYTES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::PayloadTooLarge,
                format!("the body is over the {MAX_REFERENCES_BODY_BYTES}-byte limit"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    let request: ReferencesRequest = serde_json::from_slice(&body).map_err(|e| {
        let text = e.to_string();
        if text.contains("is not a GUID") {
            unprocessable(Code::InvalidGuid, format!("{text}; nothing was changed"))
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                Code::MalformedJson,
                format!(
                    "the body is not a valid request: {}",
                    tailor::text::clean(&text, 300)
                ),
            )
        }
    })?;
    drop(body);
    let in_use = request.staging_guids;
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
        Err(error @ SyncError::Suspicious { .. }) => {
            tracing::warn!(%error, "reference list refused");
            Err(unprocessable(
                error.code(),
                format!("{error}; nothing was changed"),
            ))
        }
        Err(SyncError::Database(error)) => Err(crate::error::database_error(&error)),
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
