//! Liveness (`/_ping`) and dependency health (`/_status`), in the spirit of the classic
//! Docker registry's endpoints of the same names.

use std::time::Duration;

use actix_web::{HttpResponse, web};
use serde::Serialize;

use crate::auth::Authenticated;
use crate::state::AppState;

const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Unauthenticated liveness: the process is up and serving HTTP.
pub async fn ping() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

#[derive(Serialize)]
struct Check {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

impl Check {
    fn from_result(result: Result<(), String>) -> Self {
        match result {
            Ok(()) => Self {
                status: "ok",
                message: None,
            },
            Err(message) => Self {
                status: "unavailable",
                message: Some(message),
            },
        }
    }
}

#[derive(Serialize)]
struct Status {
    status: &'static str,
    database: Check,
    internal_registry: Check,
}

/// 200 when Postgres and the internal registry both answer, 503 otherwise.
pub async fn status(_: Authenticated, state: web::Data<AppState>) -> HttpResponse {
    let (database, registry) = tokio::join!(check_database(&state), check_registry(&state));
    let healthy = database.is_ok() && registry.is_ok();
    let body = Status {
        status: if healthy { "ok" } else { "unavailable" },
        database: Check::from_result(database),
        internal_registry: Check::from_result(registry),
    };
    if healthy {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "5"))
            .json(body)
    }
}

async fn check_database(state: &AppState) -> Result<(), String> {
    let query = sqlx::query_scalar!(r#"SELECT 1 AS "one!""#).fetch_one(&state.db);
    match tokio::time::timeout(CHECK_TIMEOUT, query).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("query failed: {e}")),
        Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
    }
}

async fn check_registry(state: &AppState) -> Result<(), String> {
    match tokio::time::timeout(CHECK_TIMEOUT, state.internal.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
    }
}
