//! Stagings from OCI layouts, for sites that ship images by disk or bucket: `POST /stage` with
//! `oci:DIR[:TAG]` or `s3://BUCKET/PREFIX[:TAG]` under a location the operator enabled
//! (`TAILOR_SOURCE_LOCATIONS`), refused anywhere else, and verified like any other source.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use specs::{Service, TOKEN, binary, stage, stager_api, wait_finished};
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::{TestDatabase, TestRegistry, skopeo};
use uuid::Uuid;

/// `tailor copy SRC DST` (plain HTTP to `hub`), asserting success.
fn tailor_copy(hub: &TestRegistry, src: &str, dst: &str, env: &[(&str, &str)]) {
    let out = Command::new(binary("tailor"))
        .args(["copy", "--json", "--insecure", &hub.host(), src, dst])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// `POST /stage` expecting a refusal: (status, code).
async fn refused(api: &Service, image: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(format!("{}/stage", api.base_url))
        .bearer_auth(TOKEN)
        .json(&json!({ "app_guid": Uuid::new_v4(), "image": image }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (status, body["code"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn stagings_read_enabled_layouts_and_nothing_else() {
    let s3 = testkit::s3::S3Server::start();
    let hub = TestRegistry::anonymous();
    let image = ImageSpec::seeded(ManifestFormat::Oci, 6200, 2, 32 * 1024).build();
    hub.push("shipped/app:v1", &image).await;
    let images = tempfile::tempdir().unwrap();
    let dir = images.path().join("team");
    let aws = [
        ("AWS_ACCESS_KEY_ID", s3.access_key()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key().expose()),
    ];
    let src = format!("docker://{}/shipped/app:v1", hub.host());
    tailor_copy(&hub, &src, &format!("oci:{}:v1", dir.display()), &[]);
    // A second copy, which a disk error will damage below (the first one's blobs, once staged,
    // are mount sources for later stagings from that same layout, so it would not be read).
    let damaged = images.path().join("damaged");
    tailor_copy(&hub, &src, &format!("oci:{}:v1", damaged.display()), &[]);
    tailor_copy(
        &hub,
        &src,
        &format!(
            "s3://{}/shipped/team:v1?endpoint={}&region={}",
            s3.bucket(),
            s3.endpoint(),
            s3.region()
        ),
        &aws,
    );
    // The hub goes away: the site's images come by disk and bucket only.
    drop(hub);

    let db = TestDatabase::new().await;
    let internal = TestRegistry::anonymous();
    let enabled = format!(
        "oci:{},s3://{}/shipped?endpoint={}&region={}",
        images.path().display(),
        s3.bucket(),
        s3.endpoint(),
        s3.region()
    );
    let mut settings = vec![("TAILOR_SOURCE_LOCATIONS", enabled.as_str())];
    settings.extend(aws);
    let api = Service::start(stager_api(
        &db.url,
        &internal.host(),
        &[internal.host()],
        &settings,
    ));

    for source in [
        format!("oci:{}:v1", dir.display()),
        format!("s3://{}/shipped/team:v1", s3.bucket()),
    ] {
        let staged = stage(&api, json!({ "app_guid": Uuid::new_v4(), "image": source })).await;
        let guid = staged["staging_guid"].as_str().unwrap();
        let done = wait_finished(&api, guid, Duration::from_secs(60)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_eq!(done["image"], source.as_str());
        assert_eq!(done["result"]["source_digest"], image.digest.as_str());
        let pinned = done["result"]["pinned_image"].as_str().unwrap();
        assert_eq!(skopeo::digest(pinned, None).unwrap(), image.digest);
    }

    // Outside the enabled locations, or reached some other way: refused before it is queued.
    for (source, code) in [
        ("oci:/etc/images:v1".to_owned(), "LOCATION_NOT_ALLOWED"),
        (
            format!("oci:{}/../elsewhere:v1", images.path().display()),
            "INVALID_REFERENCE",
        ),
        (
            format!("s3://{}/other/team:v1", s3.bucket()),
            "LOCATION_NOT_ALLOWED",
        ),
        (
            format!(
                "s3://{}/shipped/team:v1?endpoint=http://169.254.169.254",
                s3.bucket()
            ),
            "INVALID_REFERENCE",
        ),
    ] {
        assert_eq!(
            refused(&api, &source).await,
            (422, code.to_owned()),
            "{source}"
        );
    }

    // A damaged blob in a layout fails the staging, and nothing is tagged.
    let layer = damaged
        .join("blobs/sha256")
        .join(image.layers[0].digest.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&layer).unwrap();
    bytes[10] ^= 0x01;
    std::fs::write(&layer, &bytes).unwrap();
    let app_guid = Uuid::new_v4();
    let staged = stage(
        &api,
        json!({ "app_guid": app_guid, "image": format!("oci:{}:v1", damaged.display()) }),
    )
    .await;
    let guid = staged["staging_guid"].as_str().unwrap();
    let done = wait_finished(&api, guid, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "DIGEST_MISMATCH");
    assert!(
        skopeo::digest(
            &format!("{}/tailor/{app_guid}:{guid}", internal.host()),
            None
        )
        .is_err()
    );
}

#[tokio::test]
async fn a_stager_reads_no_layout_unless_the_operator_enables_one() {
    let db = TestDatabase::new().await;
    let internal = TestRegistry::anonymous();
    let api = Service::start(stager_api(
        &db.url,
        &internal.host(),
        &[internal.host()],
        &[],
    ));
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        refused(&api, &format!("oci:{}:v1", dir.path().display())).await,
        (422, "LOCATION_NOT_ALLOWED".to_owned())
    );
    assert_eq!(
        refused(&api, "s3://bucket/prefix:v1").await,
        (422, "LOCATION_NOT_ALLOWED".to_owned())
    );
}
