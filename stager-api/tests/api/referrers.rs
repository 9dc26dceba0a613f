//! Signatures, SBOMs and attestations travel with a staged image: found through the OCI 1.1
//! referrers API, its fallback tag and cosign's tags, written into the internal registry
//! (distribution 2.8, no referrers API) by the fallback tags, listed by `GET /stage`, and
//! removed with their image by the pruner or a failed staging's cleanup.

use serde_json::{Value, json};
use testkit::hostile_registry::{HostileRegistry, Lie, Misbehaviour, Rule};
use testkit::image::{ArtifactSpec, BuiltImage, CosignKind, ImageSpec, ManifestFormat, OCI_INDEX};
use testkit::skopeo;
use uuid::Uuid;

use crate::helpers::{AppOptions, TestApp, spawn, spawn_app};
use crate::prune::{manifest_exists, prune, release};

/// Stages `image` (a full reference) for `app_guid` and waits for its end.
async fn staged(app: &TestApp, app_guid: Uuid, image: &str) -> Value {
    let (status, body) = app
        .stage(json!({ "app_guid": app_guid, "image": image }))
        .await;
    assert_eq!(status, 202, "{body}");
    app.wait_finished(body["staging_guid"].as_str().unwrap())
        .await
}

/// The internal registry's manifest `reference` in `repository`: its status, and its JSON.
async fn internal_manifest(app: &TestApp, repository: &str, reference: &str) -> (u16, Value) {
    let response = app
        .client
        .get(format!(
            "{}/v2/{repository}/manifests/{reference}",
            app.internal().base_url()
        ))
        .header(
            "accept",
            "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json",
        )
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The app with workers, speaking plain HTTP to `hostile` as its upstream.
async fn app_reading(hostile: &HostileRegistry) -> TestApp {
    spawn(AppOptions {
        workers: 2,
        also_insecure: vec![hostile.host()],
        ..AppOptions::default()
    })
    .await
}

fn fallback_tag(digest: &str) -> String {
    digest.replacen(':', "-", 1)
}

#[tokio::test]
async fn signatures_sboms_and_attestations_travel_with_the_image_and_go_with_it() {
    let app = spawn_app().await;
    let image = ImageSpec::seeded(ManifestFormat::Oci, 5100, 2, 16 * 1024).build();
    let hub = app.hub.host();
    app.hub.push("library/web:1.0", &image).await;
    // cosign's tags, and an OCI 1.1 SBOM by the fallback tag schema (distribution 2.8 has no
    // referrers API) beside an entry that claims to be a referrer but is about another image.
    let signature = testkit::image::cosign_artifact(
        &image,
        &format!("{hub}/library/web"),
        CosignKind::Signature,
    );
    let attestation = testkit::image::cosign_artifact(
        &image,
        &format!("{hub}/library/web"),
        CosignKind::Attestation,
    );
    for (artifact, kind) in [
        (&signature, CosignKind::Signature),
        (&attestation, CosignKind::Attestation),
    ] {
        app.hub
            .push(
                &format!("library/web:{}", kind.tag(&image.digest)),
                artifact,
            )
            .await;
    }
    let sbom = ArtifactSpec::sbom("web").about(&image).build();
    let elsewhere = ImageSpec::seeded(ManifestFormat::Oci, 5101, 1, 1024).build();
    let stray = ArtifactSpec::sbom("other").about(&elsewhere).build();
    app.hub
        .push_referrers("library/web", &image.digest, &[sbom.clone(), stray.clone()])
        .await;

    let app_guid = Uuid::new_v4();
    let done = staged(&app, app_guid, &format!("{hub}/library/web:1.0")).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let mut listed: Vec<(String, Value, Value)> = done["result"]["referrers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["digest"].as_str().unwrap().to_owned(),
                r["tag"].clone(),
                r["artifact_type"].clone(),
            )
        })
        .collect();
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    let mut expected = vec![
        (
            sbom.digest.clone(),
            Value::Null,
            json!("application/spdx+json"),
        ),
        // Without an artifactType, a manifest's config type stands for it (as the referrers
        // API reports one).
        (
            signature.digest.clone(),
            json!(CosignKind::Signature.tag(&image.digest)),
            json!("application/vnd.oci.image.config.v1+json"),
        ),
        (
            attestation.digest.clone(),
            json!(CosignKind::Attestation.tag(&image.digest)),
            json!("application/vnd.oci.image.config.v1+json"),
        ),
    ];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(listed, expected, "{done}");

    // In the internal registry, byte-exact, by the tags cosign and OCI 1.1 clients look up.
    let internal = app.internal().host();
    let repository = format!("tailor/{app_guid}");
    for (reference, digest) in [
        (
            format!(
                "{internal}/{repository}:{}",
                CosignKind::Signature.tag(&image.digest)
            ),
            &signature.digest,
        ),
        (
            format!(
                "{internal}/{repository}:{}",
                CosignKind::Attestation.tag(&image.digest)
            ),
            &attestation.digest,
        ),
        (
            format!("{internal}/{repository}@{}", sbom.digest),
            &sbom.digest,
        ),
    ] {
        assert_eq!(
            &skopeo::digest(&reference, None).unwrap(),
            digest,
            "{reference}"
        );
        let dir = tempfile::tempdir().unwrap();
        skopeo::copy_to_oci_layout(&reference, None, dir.path(), false)
            .unwrap_or_else(|e| panic!("{reference}: every blob is there: {e}"));
    }
    let (status, index) = internal_manifest(&app, &repository, &fallback_tag(&image.digest)).await;
    assert_eq!(status, 200);
    assert_eq!(index["mediaType"], OCI_INDEX);
    let entries: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["digest"].as_str().unwrap())
        .collect();
    assert_eq!(
        entries,
        vec![sbom.digest.as_str()],
        "the stray entry is left out"
    );
    assert_eq!(
        index["manifests"][0]["artifactType"],
        "application/spdx+json"
    );

    // A newer image for the app; the old one released and pruned takes its referrers along.
    let newer = ImageSpec::seeded(ManifestFormat::Oci, 5102, 1, 1024).build();
    app.hub.push("library/web:2.0", &newer).await;
    let current = staged(&app, app_guid, &format!("{hub}/library/web:2.0")).await;
    assert_eq!(current["state"], "succeeded", "{current}");
    release(&app, &done).await;
    let report = prune(&app, false).await;
    assert_eq!(report.images_pruned, 1, "{report:?}");
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(!manifest_exists(&app, &done).await);
    assert!(manifest_exists(&app, &current).await);
    for reference in [
        fallback_tag(&image.digest),
        CosignKind::Signature.tag(&image.digest),
        CosignKind::Attestation.tag(&image.digest),
        sbom.digest.clone(),
        signature.digest.clone(),
    ] {
        let (status, _) = internal_manifest(&app, &repository, &reference).await;
        assert_eq!(status, 404, "{reference} outlived its image");
    }
}

/// A registry with the referrers API (a real HTTP server answering it) is asked through it,
/// and its fallback tag is never read.
#[tokio::test]
async fn the_referrers_api_is_used_where_the_source_has_it() {
    let hostile = HostileRegistry::start();
    let app = app_reading(&hostile).await;
    let image = ImageSpec::seeded(ManifestFormat::Oci, 5200, 1, 8192).build();
    hostile.add_image("team/app", "v1", &image);
    let sbom = ArtifactSpec::sbom("app").about(&image).build();
    hostile.add_image("team/app", &sbom.digest, &sbom);
    // An artifact type no database column may hold, and an index listed as a referrer (whose
    // children would be a fan-out without end): the first is cleaned, the second left out.
    let mut odd = ArtifactSpec::sbom("odd").about(&image);
    odd.artifact_type = Some("application/x-\u{0}evil".into());
    let odd = odd.build();
    hostile.add_image("team/app", &odd.digest, &odd);
    let listing = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": sbom.media_type,
                "digest": sbom.digest,
                "size": sbom.manifest.len(),
                // What a listing says is not believed: the manifest's own type is used.
                "artifactType": "application/x-lie",
            },
            { "mediaType": odd.media_type, "digest": odd.digest, "size": odd.manifest.len() },
            { "mediaType": OCI_INDEX, "digest": image.digest, "size": 1 },
            { "mediaType": OCI_INDEX, "digest": format!("sha256:{}", "0".repeat(64)), "size": 1 },
        ],
    }))
    .unwrap();
    hostile.add_rule(Rule::new(
        &format!("/v2/team/app/referrers/{}", image.digest),
        Misbehaviour::Respond {
            status: 200,
            headers: vec![("content-type".into(), OCI_INDEX.as_bytes().to_vec())],
            body: listing,
        },
    ));

    let app_guid = Uuid::new_v4();
    let done = staged(&app, app_guid, &format!("{}/team/app:v1", hostile.host())).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        done["result"]["referrers"][0],
        json!({
            "digest": sbom.digest,
            "media_type": sbom.media_type,
            "artifact_type": "application/spdx+json",
            "size": sbom.manifest.len(),
        })
    );
    assert_eq!(
        done["result"]["referrers"][1]["digest"],
        odd.digest.as_str()
    );
    let odd_type = done["result"]["referrers"][1]["artifact_type"]
        .as_str()
        .unwrap();
    assert!(
        !odd_type.contains('\0') && odd_type.starts_with("application/x-"),
        "{odd_type:?}"
    );
    assert_eq!(
        done["result"]["referrers"].as_array().unwrap().len(),
        2,
        "{done}"
    );
    let paths: Vec<String> = hostile.requests().into_iter().map(|r| r.path).collect();
    assert!(paths.iter().any(|p| p.contains("/referrers/")), "{paths:?}");
    assert!(
        !paths
            .iter()
            .any(|p| p.ends_with(&format!("/manifests/{}", fallback_tag(&image.digest)))),
        "the fallback tag was read though the API answered: {paths:?}"
    );
    let (status, index) = internal_manifest(
        &app,
        &format!("tailor/{app_guid}"),
        &fallback_tag(&image.digest),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(index["manifests"][0]["digest"], sbom.digest.as_str());
}

/// A referrer whose bytes do not match its digest fails the staging, which leaves neither its
/// tag nor any referrer's behind.
#[tokio::test]
async fn a_corrupt_referrer_fails_the_staging_and_leaves_nothing() {
    let hostile = HostileRegistry::start();
    let app = app_reading(&hostile).await;
    let image = ImageSpec::seeded(ManifestFormat::Oci, 5300, 1, 8192).build();
    hostile.add_image("team/signed", "v1", &image);
    let sbom = ArtifactSpec::sbom("signed").about(&image).build();
    hostile.add_image(
        "team/signed",
        &fallback_tag(&image.digest),
        &index_of(&image, &sbom),
    );
    hostile.add_image("team/signed", &sbom.digest, &sbom);
    let signature = testkit::image::cosign_artifact(
        &image,
        &format!("{}/team/signed", hostile.host()),
        CosignKind::Signature,
    );
    hostile.add_image(
        "team/signed",
        &CosignKind::Signature.tag(&image.digest),
        &signature,
    );
    hostile.add_rule(Rule::new(
        &format!("/blobs/{}", signature.layers[0].digest),
        Misbehaviour::Lie(Lie::WrongContent),
    ));

    let app_guid = Uuid::new_v4();
    let done = staged(
        &app,
        app_guid,
        &format!("{}/team/signed:v1", hostile.host()),
    )
    .await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "DIGEST_MISMATCH", "{done}");
    let tags = app.internal_tags(&format!("tailor/{app_guid}")).await;
    assert!(tags.is_empty(), "left behind: {tags:?}");
    let (status, _) = internal_manifest(&app, &format!("tailor/{app_guid}"), &sbom.digest).await;
    assert_eq!(status, 404, "the SBOM copied before the failure stayed");
}

/// `sbom` listed in a fallback index, as a [`BuiltImage`] the hostile registry can serve.
fn index_of(_subject: &BuiltImage, sbom: &BuiltImage) -> BuiltImage {
    let manifest = bytes::Bytes::from(
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{
                "mediaType": sbom.media_type,
                "digest": sbom.digest,
                "size": sbom.manifest.len(),
                "artifactType": "application/spdx+json",
            }],
        }))
        .unwrap(),
    );
    BuiltImage {
        digest: testkit::sha256_digest(&manifest),
        media_type: OCI_INDEX,
        manifest,
        platform: testkit::image::Platform::parse("unknown/unknown"),
        config: sbom.config.clone(),
        layers: Vec::new(),
    }
}

/// An upstream that puts a live image's manifest under a cosign tag of another image cannot get
/// the live image deleted when that other image is pruned.
#[tokio::test]
async fn removing_referrers_never_deletes_a_live_image() {
    let app = spawn_app().await;
    let hub = app.hub.host();
    let live = ImageSpec::seeded(ManifestFormat::Oci, 5400, 1, 4096).build();
    let doomed = ImageSpec::seeded(ManifestFormat::Oci, 5401, 1, 4096).build();
    let newest = ImageSpec::seeded(ManifestFormat::Oci, 5402, 1, 4096).build();
    let app_guid = Uuid::new_v4();
    app.hub.push("library/live:1", &live).await;
    let live_staging = staged(&app, app_guid, &format!("{hub}/library/live:1")).await;
    assert_eq!(live_staging["state"], "succeeded", "{live_staging}");

    app.hub.push("library/doomed:1", &doomed).await;
    app.hub
        .push(
            &format!(
                "library/doomed:{}",
                CosignKind::Signature.tag(&doomed.digest)
            ),
            &live,
        )
        .await;
    let doomed_staging = staged(&app, app_guid, &format!("{hub}/library/doomed:1")).await;
    assert_eq!(doomed_staging["state"], "succeeded", "{doomed_staging}");
    assert_eq!(
        doomed_staging["result"]["referrers"][0]["digest"],
        live.digest.as_str()
    );
    app.hub.push("library/newest:1", &newest).await;
    let newest_staging = staged(&app, app_guid, &format!("{hub}/library/newest:1")).await;
    assert_eq!(newest_staging["state"], "succeeded", "{newest_staging}");

    release(&app, &doomed_staging).await;
    let report = prune(&app, false).await;
    assert_eq!(report.images_pruned, 1, "{report:?}");
    assert!(!manifest_exists(&app, &doomed_staging).await);
    assert!(
        manifest_exists(&app, &live_staging).await,
        "the live image went with the pruned image's 'signature'"
    );
    let pinned = live_staging["result"]["pinned_image"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    skopeo::copy_to_oci_layout(pinned, None, dir.path(), false).unwrap();
}
