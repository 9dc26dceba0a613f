//! `/openapi.json`: the API contract, served from `specs/openapi.yaml` compiled into the binary
//! so the two can never disagree.

use std::sync::OnceLock;

use actix_web::HttpResponse;

use crate::auth::Authenticated;

const CONTRACT_YAML: &str = include_str!("../../../specs/openapi.yaml");

/// The contract as JSON.
pub fn openapi_document() -> &'static serde_json::Value {
    static DOCUMENT: OnceLock<serde_json::Value> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        serde_yaml::from_str(CONTRACT_YAML).expect("specs/openapi.yaml is valid YAML")
    })
}

pub async fn serve(_: Authenticated) -> HttpResponse {
    HttpResponse::Ok().json(openapi_document())
}

#[cfg(test)]
mod tests {
    #[test]
    fn contract_parses_and_is_openapi_3() {
        let doc = super::openapi_document();
        assert!(
            doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
            "{doc}"
        );
        assert!(doc["paths"]["/_ping"].is_object());
    }
}
