//! A Cloud Controller's view: the Diego stager's routes and the completion callback.

use std::time::Duration;

use serde_json::json;
use testkit::TestRegistry;
use testkit::callback_sink::CallbackSink;
use testkit::image::{ImageSpec, ManifestFormat};
use uuid::Uuid;

use crate::helpers::{spawn_app, spawn_app_with};

pub(crate) fn staging_request(app_id: Uuid, image: &str, callback: &str) -> serde_json::Value {
    // The shape of cc_messages.StagingRequestFromCC, with the fields tailor ignores filled in
    // as a real Cloud Controller would.
    json!({
        "app_id": app_id,
        "file_descriptors": 16384,
        "memory_mb": 1024,
        "disk_mb": 4096,
        "environment": [{ "name": "VCAP_APPLICATION", "value": "{}" }],
        "egress_rules": [],
        "timeout": 900,
        "log_guid": app_id,
        "lifecycle": "docker",
        "lifecycle_data": { "docker_image": image },
        "completion_callback": callback,
        "isolation_segment": "",
    })
}

#[tokio::test]
async fn a_cloud_controller_staging_calls_back_with_the_pinned_image() {
    let app = spawn_app().await;
    let cc = CallbackSink::start();
    let image = ImageSpec::seeded(ManifestFormat::Oci, 1100, 2, 8192).build();
    app.hub.push("cc/app:v3", &image).await;
    let (app_id, staging_guid) = (Uuid::new_v4(), Uuid::new_v4());
    let callback_path = format!("/internal/v3/staging/{staging_guid}/build_completed");

    let response = app
        .put(&format!("/v1/staging/{staging_guid}"))
        .json(&staging_request(
            app_id,
            &format!("{}/cc/app:v3", app.hub.host()),
            &cc.url(&callback_path),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);

    let body = cc
        .wait_for(&callback_path, Duration::from_secs(60))
        .await
        .expect("the callback arrived");
    let result = &body["result"];
    assert_eq!(result["lifecycle_type"], "docker");
    let pinned = format!("{}/tailor/{app_id}@{}", app.internal().host(), image.digest);
    assert_eq!(result["lifecycle_metadata"]["docker_image"], pinned);
    assert_eq!(result["process_types"]["web"], "/bin/app --port 8080");
    let metadata: serde_json::Value = serde_json::from_str(
        result["execution_metadata"]
            .as_str()
            .expect("a JSON string, not an object"),
    )
    .unwrap();
    assert_eq!(metadata["cmd"], json!(["--port", "8080"]));
    assert_eq!(
        metadata["ports"],
        json!([{ "Port": 8080, "Protocol": "tcp" }])
    );
    assert_eq!(metadata["user"], "1000");
    assert_eq!(
        testkit::skopeo::digest(&pinned, None).unwrap(),
        image.digest
    );
}

#[tokio::test]
async fn a_failed_staging_calls_back_with_a_staging_error_and_retries_delivery() {
    let app = spawn_app().await;
    let cc = CallbackSink::start();
    cc.fail_next(2);
    let staging_guid = Uuid::new_v4();
    let path = format!("/staging/{staging_guid}");
    let request = staging_request(
        Uuid::new_v4(),
        &format!("{}/no/such:image", app.hub.host()),
        &cc.url(&path),
    );
    let response = app
        .put(&format!("/v1/staging/{staging_guid}"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);

    let body = cc
        .wait_for(&path, Duration::from_secs(60))
        .await
        .expect("delivered after two failures");
    assert_eq!(body["error"]["id"], "StagingError");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("IMAGE_NOT_FOUND"),
        "{body}"
    );
    let attempts: i32 =
        sqlx::query_scalar("SELECT attempts FROM callbacks WHERE staging_guid = $1")
            .bind(staging_guid)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 3);
}

#[tokio::test]
async fn other_lifecycles_and_bad_lifecycle_data_are_refused() {
    let app = spawn_app_with(0, TestRegistry::anonymous()).await;
    let guid = Uuid::new_v4();
    let mut buildpack = staging_request(Uuid::new_v4(), "redis", "http://127.0.0.1:1/cb");
    buildpack["lifecycle"] = json!("buildpack");
    let mut no_image = staging_request(Uuid::new_v4(), "redis", "http://127.0.0.1:1/cb");
    no_image["lifecycle_data"] = json!({ "docker_user": "u" });
    let mut half_credentials = staging_request(Uuid::new_v4(), "redis", "http://127.0.0.1:1/cb");
    half_credentials["lifecycle_data"]["docker_user"] = json!("someone");
    for (body, code) in [
        (buildpack, "UNSUPPORTED_LIFECYCLE"),
        (no_image, "INVALID_LIFECYCLE_DATA"),
        (half_credentials, "INVALID_CREDENTIALS"),
    ] {
        let response = app
            .put(&format!("/v1/staging/{guid}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422);
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["code"], code, "{error}");
    }
}

#[tokio::test]
async fn private_images_from_a_cloud_controller_stage_with_their_credentials() {
    let hub = TestRegistry::htpasswd("cc-user", "cc-secret-pass");
    let app = spawn_app_with(1, hub).await;
    let cc = CallbackSink::start();
    let image = ImageSpec::seeded(ManifestFormat::Docker, 1120, 1, 4096).build();
    app.hub.push("private/cc:v1", &image).await;
    let staging_guid = Uuid::new_v4();
    let mut request = staging_request(
        Uuid::new_v4(),
        &format!("{}/private/cc:v1", app.hub.host()),
        &cc.url("/done"),
    );
    request["lifecycle_data"]["docker_login_server"] = json!(app.hub.host());
    request["lifecycle_data"]["docker_user"] = json!("cc-user");
    request["lifecycle_data"]["docker_password"] = json!("cc-secret-pass");
    let response = app
        .put(&format!("/v1/staging/{staging_guid}"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body = cc
        .wait_for("/done", Duration::from_secs(60))
        .await
        .expect("callback");
    assert!(
        body["result"]["lifecycle_metadata"]["docker_image"]
            .as_str()
            .unwrap()
            .ends_with(&image.digest)
    );
    assert!(!body.to_string().contains("cc-secret-pass"));
    let erased: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT encrypted_credentials FROM stagings WHERE staging_guid = $1")
            .bind(staging_guid)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(erased.is_none());
}
