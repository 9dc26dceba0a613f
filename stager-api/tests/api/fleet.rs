//! Many stagings of one image: each upstream blob is fetched once, the rest are mounted; a
//! restage of an image already staged reads nothing from upstream.

use serde_json::json;
use testkit::TestRegistry;
use testkit::image::{ImageSpec, ManifestFormat};
use uuid::Uuid;

use crate::helpers::spawn_app_with;

#[tokio::test]
async fn concurrent_stagings_of_one_image_fetch_each_blob_once() {
    let app = spawn_app_with(4, TestRegistry::anonymous()).await;
    let image = ImageSpec::seeded(ManifestFormat::Docker, 1200, 4, 2 * 1024 * 1024).build();
    app.hub.push("shared/base:v1", &image).await;
    let source = format!("{}/shared/base:v1", app.hub.host());

    let posts = (0..8).map(|_| app.stage(json!({ "app_guid": Uuid::new_v4(), "image": source })));
    let guids: Vec<String> = futures_util::future::join_all(posts)
        .await
        .into_iter()
        .map(|(status, body)| {
            assert_eq!(status, 202);
            body["staging_guid"].as_str().unwrap().to_owned()
        })
        .collect();
    let mut mounted = 0;
    for guid in &guids {
        let done = app.wait_finished(guid).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_eq!(done["result"]["source_digest"], image.digest.as_str());
        mounted += done["result"]["blobs"]["mounted"].as_u64().unwrap();
    }
    assert_eq!(
        app.hub.blob_bytes_served(),
        image.blob_bytes(),
        "every upstream blob was read exactly once"
    );
    assert_eq!(
        mounted,
        7 * 5,
        "the seven later stagings mounted all five blobs"
    );

    // A restage of the same upstream image for an app that has it: zero blob bytes upstream.
    let served = app.hub.blob_bytes_served();
    let (_, first) = app
        .stage(json!({ "app_guid": Uuid::new_v4(), "image": source }))
        .await;
    let app_guid = first["app_guid"].as_str().unwrap().to_owned();
    app.wait_finished(first["staging_guid"].as_str().unwrap())
        .await;
    let (_, again) = app
        .stage(json!({ "app_guid": app_guid, "image": source }))
        .await;
    let done = app
        .wait_finished(again["staging_guid"].as_str().unwrap())
        .await;
    assert_eq!(done["result"]["blobs"]["skipped"], 5);
    assert_eq!(app.hub.blob_bytes_served(), served);
}
