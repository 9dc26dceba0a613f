//! Every manifest kind copies byte-exact, and skopeo pulls the copy back.

use testkit::image::{ImageSpec, IndexSpec, ManifestFormat};
use testkit::{TestRegistry, skopeo};

use crate::helpers::*;

#[tokio::test]
async fn docker_and_oci_images_copy_byte_exact() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    for (format, name) in [
        (ManifestFormat::Docker, "library/web"),
        (ManifestFormat::Oci, "org/api"),
    ] {
        let image = ImageSpec::seeded(format, 100, 3, 200 * 1024).build();
        hub.push(&format!("{name}:1.0"), &image).await;

        let report = copy(
            &registries,
            &format!("{}/{name}:1.0", hub.host()),
            &format!("{}/apps/{name}:g1", internal.host()),
        )
        .await
        .unwrap();
        assert_eq!(report.source_digest, image.digest);
        assert_eq!(
            report.pinned,
            format!("{}/apps/{name}@{}", internal.host(), image.digest)
        );
        assert_eq!(report.blobs.copied, 4);
        assert_eq!(report.bytes_copied, image.blob_bytes());
        assert_eq!(
            report.config_digest.as_deref(),
            Some(image.config.digest.as_str())
        );

        let raw =
            skopeo::inspect_raw(&format!("{}/apps/{name}:g1", internal.host()), None).unwrap();
        assert_eq!(
            raw, image.manifest,
            "the copy is the exact bytes upstream published"
        );
        let pinned_digest = skopeo::digest(&report.pinned, None).unwrap();
        assert_eq!(pinned_digest, image.digest);
        let layout = tempfile::tempdir().unwrap();
        skopeo::copy_to_oci_layout(&report.pinned, None, layout.path(), false).unwrap();
    }
}

#[tokio::test]
async fn from_an_index_the_default_platform_is_pinned_to_upstreams_platform_digest() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    let platforms = [
        "linux/arm64/v8",
        "linux/amd64",
        "linux/arm/v7",
        "linux/arm/v6",
    ];
    for (format, name) in [
        (ManifestFormat::Docker, "multi/list"),
        (ManifestFormat::Oci, "multi/index"),
    ] {
        let index = IndexSpec::seeded(format, 200, &platforms, 2, 8 * 1024).build();
        hub.push_index(&format!("{name}:v1"), &index).await;
        let src = format!("{}/{name}:v1", hub.host());

        let report = copy(
            &registries,
            &src,
            &format!("{}/a/{name}:amd", internal.host()),
        )
        .await
        .unwrap();
        let amd64 = &index.children[1];
        assert_eq!(report.source_digest, amd64.digest);
        assert_eq!(
            skopeo_digest(&internal, &format!("a/{name}:amd")).unwrap(),
            amd64.digest
        );
        assert_eq!(
            report.blobs.copied, 3,
            "only the amd64 image's config and layers"
        );

        let arm = copy_with(
            &registries,
            &src,
            &format!("{}/a/{name}:arm", internal.host()),
            platform("linux/arm/v6"),
        )
        .await
        .unwrap();
        assert_eq!(
            arm.source_digest, index.children[3].digest,
            "variant-aware selection"
        );
        let arm64 = copy_with(
            &registries,
            &src,
            &format!("{}/a/{name}:arm64", internal.host()),
            platform("linux/arm64"),
        )
        .await
        .unwrap();
        assert_eq!(
            arm64.source_digest, index.children[0].digest,
            "arm64 means arm64/v8"
        );

        let missing = copy_with(
            &registries,
            &src,
            &format!("{}/a/{name}:s390x", internal.host()),
            platform("linux/s390x"),
        )
        .await
        .unwrap_err();
        assert_eq!(missing.code(), "PLATFORM_MISMATCH");
        assert!(
            missing.to_string().contains("linux/arm/v7"),
            "lists what is available: {missing}"
        );
    }
}

#[tokio::test]
async fn all_platforms_copies_the_index_and_every_child() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    let index = IndexSpec::seeded(
        ManifestFormat::Oci,
        300,
        &["linux/amd64", "linux/arm64"],
        2,
        4096,
    )
    .build();
    hub.push_index("multi/all:v1", &index).await;

    let report = copy_with(
        &registries,
        &format!("{}/multi/all:v1", hub.host()),
        &format!("{}/all/app:g", internal.host()),
        all_platforms(),
    )
    .await
    .unwrap();
    assert_eq!(report.source_digest, index.digest);
    assert_eq!(report.blobs.copied, 6);
    assert_eq!(
        report.config_digest.as_deref(),
        Some(index.children[0].config.digest.as_str())
    );
    assert_eq!(skopeo_digest(&internal, "all/app:g").unwrap(), index.digest);
    for child in &index.children {
        assert_eq!(
            skopeo_digest(&internal, &format!("all/app@{}", child.digest)).unwrap(),
            child.digest
        );
    }
    let layout = tempfile::tempdir().unwrap();
    skopeo::copy_to_oci_layout(
        &format!("{}/all/app:g", internal.host()),
        None,
        layout.path(),
        true,
    )
    .unwrap();
}

#[tokio::test]
async fn a_digest_reference_is_verified_and_a_wrong_one_is_refused() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Docker, 400, 1, 1024).build();
    hub.push("pinned/app:v1", &image).await;

    let by_digest = format!("{}/pinned/app@{}", hub.host(), image.digest);
    let report = copy(
        &registries,
        &by_digest,
        &format!("{}/p/app:x", internal.host()),
    )
    .await
    .unwrap();
    assert_eq!(report.source_digest, image.digest);

    let wrong = format!("{}/pinned/app@sha256:{}", hub.host(), "0".repeat(64));
    let error = copy(&registries, &wrong, &format!("{}/p/app:y", internal.host()))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "IMAGE_NOT_FOUND");
}
