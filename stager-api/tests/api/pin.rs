//! Pin-only stagings (`mode: pin`, `TAILOR_MODE`, `TAILOR_DEFAULT_MODE`): upstream's reference
//! pinned by digest after the checks a copy makes, nothing copied, and nothing of them ever
//! touched in the internal registry by the pruner or an export.

use std::time::Duration;

use serde_json::{Value, json};
use testkit::callback_sink::CallbackSink;
use testkit::image::{ArtifactSpec, ImageSpec, IndexSpec, ManifestFormat};
use testkit::skopeo;
use uuid::Uuid;

use crate::helpers::{AppOptions, TestApp, spawn, spawn_app};
use crate::prune::{manifest_exists, prune, release};

/// Stages `image` (under the hub) for `app_guid` in `mode` (the default when `None`) and waits
/// for its end.
async fn staged(app: &TestApp, app_guid: Uuid, image: &str, mode: Option<&str>) -> Value {
    let mut request =
        json!({ "app_guid": app_guid, "image": format!("{}/{image}", app.hub.host()) });
    if let Some(mode) = mode {
        request["mode"] = json!(mode);
    }
    let (status, body) = app.stage(request).await;
    assert_eq!(status, 202, "{body}");
    app.wait_finished(body["staging_guid"].as_str().unwrap())
        .await
}

#[tokio::test]
async fn a_pin_answers_upstreams_platform_digest_and_copies_nothing() {
    let app = spawn_app().await;
    let index = IndexSpec::seeded(
        ManifestFormat::Oci,
        4100,
        &["linux/amd64", "linux/arm64"],
        3,
        64 * 1024,
    )
    .build();
    app.hub.push_index("library/web:1.0", &index).await;
    let amd64 = index
        .children
        .iter()
        .find(|c| c.platform == testkit::image::Platform::linux_amd64())
        .unwrap();
    let app_guid = Uuid::new_v4();

    let done = staged(&app, app_guid, "library/web:1.0", Some("pin")).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["mode"], "pin");
    let result = &done["result"];
    // Upstream's reference, pinned to the platform's own manifest (as a copy pins it).
    let pinned = format!("{}/library/web@{}", app.hub.host(), amd64.digest);
    assert_eq!(result["pinned_image"], pinned.as_str());
    assert_eq!(result["source_digest"], amd64.digest.as_str());
    assert_eq!(result["tagged_image"], Value::Null);
    assert_eq!(
        result["blobs"],
        json!({ "copied": 0, "mounted": 0, "skipped": 0 })
    );
    assert_eq!(result["process_types"]["web"], "/bin/app --port 8080");
    assert_eq!(skopeo::digest(&pinned, None).unwrap(), amd64.digest);

    // Upstream served the platform's config and no layer; the internal registry saw nothing.
    let blob_gets: Vec<String> = app
        .hub
        .access_log()
        .into_iter()
        .filter(|e| e.is_blob_get())
        .map(|e| e.path)
        .collect();
    assert_eq!(
        blob_gets,
        vec![format!("/v2/library/web/blobs/{}", amd64.config.digest)]
    );
    let internal_requests: Vec<_> = app
        .internal()
        .access_log()
        .into_iter()
        .filter(|e| e.path != "/v2/")
        .collect();
    assert!(
        internal_requests.is_empty(),
        "a pin spoke to the internal registry: {internal_requests:?}"
    );
    assert!(
        app.internal_tags(&format!("tailor/{app_guid}"))
            .await
            .is_empty()
    );

    // The same request is the same staging; the same GUID asking for a copy is another request.
    let again = json!({
        "app_guid": app_guid,
        "staging_guid": done["staging_guid"],
        "image": format!("{}/library/web:1.0", app.hub.host()),
        "mode": "pin",
    });
    let (status, body) = app.stage(again.clone()).await;
    assert_eq!(
        (status, &body["staging_guid"]),
        (202, &done["staging_guid"]),
        "{body}"
    );
    let mut as_copy = again;
    as_copy["mode"] = json!("copy");
    let (status, body) = app.stage(as_copy).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("STAGING_CONFLICT")),
        "{body}"
    );

    // Nothing of it is in the internal registry, so there is nothing to export.
    let guid: Uuid = done["staging_guid"].as_str().unwrap().parse().unwrap();
    let refused = tailor::portable::select(&app.pool, tailor::portable::Selection::Guid(guid))
        .await
        .expect_err("a pin has no image to export");
    assert!(refused.to_string().contains("pinned-only"), "{refused}");
}

#[tokio::test]
async fn the_default_mode_is_the_operators_and_an_app_opts_out_of_it() {
    let app = spawn(
        AppOptions {
            workers: 2,
            ..AppOptions::default()
        }
        .env("TAILOR_DEFAULT_MODE", "pin"),
    )
    .await;
    let image = ImageSpec::seeded(ManifestFormat::Docker, 4200, 2, 16 * 1024).build();
    app.hub.push("team/api:2", &image).await;
    let app_guid = Uuid::new_v4();

    let by_default = staged(&app, app_guid, "team/api:2", None).await;
    assert_eq!(by_default["mode"], "pin", "{by_default}");
    assert_eq!(
        by_default["result"]["pinned_image"],
        format!("{}/team/api@{}", app.hub.host(), image.digest)
    );
    assert!(
        app.internal_tags(&format!("tailor/{app_guid}"))
            .await
            .is_empty()
    );

    let copied = staged(&app, app_guid, "team/api:2", Some("copy")).await;
    assert_eq!(copied["mode"], "copy", "{copied}");
    let internal = app.internal().host();
    assert_eq!(
        copied["result"]["pinned_image"],
        format!("{internal}/tailor/{app_guid}@{}", image.digest)
    );
    assert_eq!(copied["result"]["blobs"]["copied"], 3);
    assert_eq!(
        app.internal_tags(&format!("tailor/{app_guid}")).await,
        vec![copied["staging_guid"].as_str().unwrap().to_owned()]
    );
}

#[tokio::test]
async fn a_pin_refuses_what_a_copy_refuses_and_a_bad_mode_stores_nothing() {
    // Layouts are enabled, so that pinning one is refused for its mode, not its location.
    let layouts = tempfile::tempdir().unwrap();
    let app = spawn(
        AppOptions {
            workers: 2,
            ..AppOptions::default()
        }
        .env(
            "TAILOR_SOURCE_LOCATIONS",
            &format!("oci:{}", layouts.path().display()),
        ),
    )
    .await;
    app.hub
        .push(
            "charts/web:1.0.0",
            &ArtifactSpec::helm_chart("web", "1.0.0").build(),
        )
        .await;
    let arm = ImageSpec::seeded(ManifestFormat::Oci, 4300, 1, 4096)
        .with_platform("linux/arm64")
        .build();
    app.hub.push("team/arm:1", &arm).await;

    let chart = staged(&app, Uuid::new_v4(), "charts/web:1.0.0", Some("pin")).await;
    assert_eq!(chart["state"], "failed", "{chart}");
    assert_eq!(chart["error"]["code"], "NOT_A_CONTAINER_IMAGE", "{chart}");
    let other_platform = staged(&app, Uuid::new_v4(), "team/arm:1", Some("pin")).await;
    assert_eq!(
        other_platform["error"]["code"], "PLATFORM_MISMATCH",
        "{other_platform}"
    );

    for (what, image, mode) in [
        (
            "an unknown mode",
            format!("{}/team/arm:1", app.hub.host()),
            json!("mirror"),
        ),
        (
            "a mode that is not a string",
            format!("{}/team/arm:1", app.hub.host()),
            json!(1),
        ),
        (
            "a layout pinned",
            format!("oci:{}/app", layouts.path().display()),
            json!("pin"),
        ),
    ] {
        let staging_guid = Uuid::new_v4();
        let (status, body) = app
            .stage(json!({
                "app_guid": Uuid::new_v4(),
                "staging_guid": staging_guid,
                "image": image,
                "mode": mode,
            }))
            .await;
        assert!(status == 422 || status == 400, "{what}: {status} {body}");
        let expected = if status == 400 {
            "MALFORMED_JSON"
        } else {
            "INVALID_MODE"
        };
        assert_eq!(body["code"], expected, "{what}: {body}");
        let stored = app
            .get_authed(&format!("/stage/{staging_guid}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(stored, 404, "{what}: stored anyway");
    }
}

#[tokio::test]
async fn a_cloud_controller_app_pins_with_tailor_mode_in_its_environment() {
    let app = spawn_app().await;
    let cc = CallbackSink::start();
    let image = ImageSpec::seeded(ManifestFormat::Oci, 4400, 2, 8192).build();
    app.hub.push("cc/app:v4", &image).await;
    let (app_id, staging_guid) = (Uuid::new_v4(), Uuid::new_v4());
    let callback_path = format!("/internal/v3/staging/{staging_guid}/build_completed");
    // What a Cloud Controller sends, with the app's TAILOR_MODE among its variables.
    let mut request = crate::diego::staging_request(
        app_id,
        &format!("{}/cc/app:v4", app.hub.host()),
        &cc.url(&callback_path),
    );
    request["environment"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "TAILOR_MODE", "value": "pin" }));
    let response = app
        .put(&format!("/v1/staging/{staging_guid}"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body = cc
        .wait_for(&callback_path, Duration::from_secs(60))
        .await
        .expect("the callback arrived");
    assert_eq!(
        body["result"]["lifecycle_metadata"]["docker_image"],
        format!("{}/cc/app@{}", app.hub.host(), image.digest),
        "{body}"
    );
    assert_eq!(
        body["result"]["process_types"]["web"],
        "/bin/app --port 8080"
    );
    assert!(
        app.internal_tags(&format!("tailor/{app_id}"))
            .await
            .is_empty()
    );
}

/// A pin's upstream path can spell an internal repository's name (`<hub>/tailor/<app>`); the
/// pruner must neither delete through it nor keep a copy alive because of it.
#[tokio::test]
async fn the_pruner_leaves_pins_alone_even_one_spelling_an_internal_repository() {
    let app = spawn(AppOptions {
        workers: 2,
        ..AppOptions::default()
    })
    .await;
    let x = ImageSpec::seeded(ManifestFormat::Docker, 4500, 2, 8192).build();
    let y = ImageSpec::seeded(ManifestFormat::Docker, 4501, 2, 8192).build();
    app.hub.push("library/x:1", &x).await;
    app.hub.push("library/y:1", &y).await;
    let victim = Uuid::new_v4();
    let old_copy = staged(&app, victim, "library/x:1", None).await;
    let new_copy = staged(&app, victim, "library/y:1", None).await;

    // Another tenant pins the same images, published upstream under the victim's internal path.
    app.hub.push(&format!("tailor/{victim}:v1"), &x).await;
    app.hub.push(&format!("tailor/{victim}:v2"), &y).await;
    let tenant = Uuid::new_v4();
    let old_pin = staged(&app, tenant, &format!("tailor/{victim}:v1"), Some("pin")).await;
    let new_pin = staged(&app, tenant, &format!("tailor/{victim}:v2"), Some("pin")).await;
    for pin in [&old_pin, &new_pin] {
        assert_eq!(pin["state"], "succeeded", "{pin}");
    }

    // The old pin is released (as prunable as a staging gets); so is the victim's old copy,
    // which only the old pin's spelling could keep.
    release(&app, &old_pin).await;
    release(&app, &old_copy).await;
    let report = prune(&app, false).await;
    assert_eq!(report.images_pruned, 1, "{report:?}");
    assert!(
        !manifest_exists(&app, &old_copy).await,
        "the released copy stayed"
    );
    assert!(manifest_exists(&app, &new_copy).await, "the live copy went");
    let old_pin = app.staging(old_pin["staging_guid"].as_str().unwrap()).await;
    assert_eq!(old_pin["pruned_at"], Value::Null, "{old_pin}");
    // Upstream is not the pruner's business either.
    assert_eq!(
        skopeo::digest(old_pin["result"]["pinned_image"].as_str().unwrap(), None).unwrap(),
        x.digest
    );
}
