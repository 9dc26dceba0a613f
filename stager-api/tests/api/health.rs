//! Liveness, dependency health, the API contract and authentication of every route.

use crate::helpers::{TOKEN, spawn_app};

#[tokio::test]
async fn ping_answers_without_a_token() {
    let app = spawn_app().await;
    let response = app.get("/_ping").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");
}

#[tokio::test]
async fn status_needs_a_valid_bearer_token() {
    let app = spawn_app().await;
    for request in [
        app.get("/_status"),
        app.get("/_status").bearer_auth("wrong-token-0123456789"),
        app.get("/_status").basic_auth("user", Some(TOKEN)),
    ] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        assert!(response.headers().contains_key("www-authenticate"));
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["code"], "UNAUTHORIZED", "{body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}

#[tokio::test]
async fn status_reports_healthy_postgres_and_registry() {
    let app = spawn_app().await;
    let response = app.get_authed("/_status").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["database"]["status"], "ok", "{body}");
    assert_eq!(body["internal_registry"]["status"], "ok", "{body}");
}

#[tokio::test]
async fn status_is_503_with_retry_after_when_the_registry_is_down() {
    let mut app = spawn_app().await;
    drop(app.internal_registry.take());
    let response = app.get_authed("/_status").send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["database"]["status"], "ok");
    assert_eq!(body["internal_registry"]["status"], "unavailable", "{body}");
}

#[tokio::test]
async fn unknown_routes_get_a_json_404() {
    let app = spawn_app().await;
    let response = app.get_authed("/no/such/thing").send().await.unwrap();
    assert_eq!(response.status(), 404);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], "NOT_FOUND");
    assert!(body["message"].as_str().unwrap().contains("/no/such/thing"));
}

#[tokio::test]
async fn a_method_no_route_takes_gets_the_json_404_the_contract_documents() {
    // Load balancers send HEAD /_ping; a client may GET /references. Neither is an operation:
    // they get the unrouted answer, which the contract check (run when `app` drops) accepts.
    let app = spawn_app().await;
    for (method, path) in [
        ("HEAD", "/_ping"),
        ("GET", "/references"),
        ("PUT", "/stage"),
    ] {
        let response = app
            .client
            .request(method.parse().unwrap(), format!("{}{path}", app.address))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{method} {path}");
        if method != "HEAD" {
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["code"], "NOT_FOUND", "{method} {path}");
        }
    }
    assert_eq!(stager_api::contract::undocumented_answers(), 0);
}

#[tokio::test]
async fn served_openapi_equals_the_contract_file() {
    let app = spawn_app().await;
    let response = app.get_authed("/openapi.json").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let served: serde_json::Value = response.json().await.unwrap();
    let file = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../specs/openapi.yaml"
    ))
    .unwrap();
    let contract: serde_json::Value = serde_yaml::from_str(&file).unwrap();
    assert_eq!(served, contract);
}

#[tokio::test]
async fn every_documented_operation_is_routed() {
    let app = spawn_app().await;
    let contract = stager_api::routes::openapi_document();
    let mut checked = 0;
    for (path, item) in contract["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{staging_guid}", &uuid::Uuid::new_v4().to_string())
            .replace("{app_guid}", &uuid::Uuid::new_v4().to_string());
        for method in ["get", "post", "put", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            let request = app
                .client
                .request(
                    method.to_uppercase().parse().unwrap(),
                    format!("{}{concrete}", app.address),
                )
                .bearer_auth(TOKEN)
                .json(&serde_json::json!({}));
            let body = request.send().await.unwrap().text().await.unwrap();
            assert!(
                !body.contains("no route for"),
                "{method} {path} is documented but not routed"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 13);
}
