//! HTTP routes. Each module is one resource; [`configure`] mounts them all.

mod diego;
mod health;
mod images;
mod metrics;
mod openapi;
mod references;
mod stage;

use actix_web::web;

pub use openapi::openapi_document;
pub use references::SYNCS_AT_ONCE as REFERENCE_SYNCS_AT_ONCE;

/// Registers every route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/_ping", web::get().to(health::ping))
        .route("/_status", web::get().to(health::status))
        .route("/openapi.json", web::get().to(openapi::serve))
        .route("/metrics", web::get().to(metrics::serve))
        .route("/stage", web::post().to(stage::create))
        .route("/stage/{staging_guid}", web::get().to(stage::get))
        .route("/stage/{staging_guid}", web::delete().to(stage::stop))
        .route(
            "/apps/{app_guid}/stagings",
            web::get().to(stage::list_for_app),
        )
        .route("/apps/{app_guid}", web::delete().to(references::delete_app))
        .route("/references", web::put().to(references::sync))
        .route("/images", web::get().to(images::search))
        .route("/v1/staging/{staging_guid}", web::put().to(diego::stage))
        .route("/v1/staging/{staging_guid}", web::delete().to(diego::stop));
}

/// Unknown paths get the same JSON error shape as everything else.
pub async fn not_found(req: actix_web::HttpRequest) -> actix_web::HttpResponse {
    use actix_web::ResponseError;
    crate::error::ApiError::not_found(format!("no route for {} {}", req.method(), req.path()))
        .error_response()
}
