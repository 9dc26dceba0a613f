//! The one error shape every endpoint answers with: `{"code": "...", "message": "..."}`.
//!
//! Codes are stable identifiers clients can branch on; messages are for humans and may change.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use tailor::code::Code;

/// An error on its way to the client.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: Code,
    pub message: String,
    /// Seconds a client should wait before retrying (sent as `Retry-After`).
    pub retry_after: Option<u32>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: Code,
    message: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: Code, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, Code::Unauthorized, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, Code::NotFound, message)
    }

    pub fn with_retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(seconds) = self.retry_after {
            response.insert_header((header::RETRY_AFTER, seconds.to_string()));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.insert_header((
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"stager-api\""),
            ));
        }
        let mut response = response.json(ErrorBody {
            code: self.code,
            message: &self.message,
        });
        // For the contract check (`crate::contract`), which sees responses, not errors.
        response.extensions_mut().insert(self.code);
        response
    }
}

/// A database failure as the client sees it: 503 with `Retry-After` when PostgreSQL is
/// unreachable (nothing was written), 500 otherwise. Details go to the log, not the client.
pub fn database_error(error: &sqlx::Error) -> ApiError {
    match tailor::db::error_code(error) {
        Code::DatabaseUnavailable => {
            tracing::warn!(%error, "database unavailable");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::DatabaseUnavailable,
                "the database is unavailable; retry later",
            )
            .with_retry_after(5)
        }
        _ => {
            tracing::error!(%error, "database error");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                Code::InternalError,
                "internal error",
            )
        }
    }
}

/// Malformed or oversized JSON bodies answer with the same `{code, message}` shape.
pub fn json_error(
    error: actix_web::error::JsonPayloadError,
    _: &actix_web::HttpRequest,
) -> actix_web::Error {
    use actix_web::error::JsonPayloadError;
    let api_error = match &error {
        JsonPayloadError::OverflowKnownLength { length, limit } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::PayloadTooLarge,
            format!("the body is {length} bytes; the limit is {limit}"),
        ),
        JsonPayloadError::Overflow { limit } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::PayloadTooLarge,
            format!("the body is over the {limit}-byte limit"),
        ),
        JsonPayloadError::ContentType => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::UnsupportedMediaType,
            "send the body as Content-Type: application/json",
        ),
        JsonPayloadError::Deserialize(inner) => ApiError::new(
            StatusCode::BAD_REQUEST,
            Code::MalformedJson,
            format!("the body is not a valid request: {inner}"),
        ),
        other => ApiError::new(
            StatusCode::BAD_REQUEST,
            Code::MalformedJson,
            other.to_string(),
        ),
    };
    actix_web::error::InternalError::from_response(
        error,
        actix_web::ResponseError::error_response(&api_error),
    )
    .into()
}
