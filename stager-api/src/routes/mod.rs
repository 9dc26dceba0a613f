//! HTTP routes. Each module is one resource; [`configure`] mounts them all.

mod health;
mod openapi;

use actix_web::web;

pub use openapi::openapi_document;

/// Registers every route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/_ping", web::get().to(health::ping))
        .route("/_status", web::get().to(health::status))
        .route("/openapi.json", web::get().to(openapi::serve));
}

/// Unknown paths get the same JSON error shape as everything else.
pub async fn not_found(req: actix_web::HttpRequest) -> actix_web::HttpResponse {
    use actix_web::ResponseError;
    crate::error::ApiError::not_found(format!("no route for {} {}", req.method(), req.path()))
        .error_response()
}
