//! Copies out of an OCI image layout into a registry (the import side of an export, and the
//! bootstrap of a first registry): byte-exact, only what the registry lacks, and a layout's
//! bad bytes refused before anything is tagged.

use tailor::copy::{
    CopyOptions, CopyReport, PlatformChoice, Source, Wanted, copy_from, copy_to_layout,
};
use tailor::error::CopyError;
use tailor::layout::{Layout, OciDir};
use testkit::image::{ImageSpec, IndexSpec, ManifestFormat};
use testkit::{TestRegistry, skopeo};

use crate::helpers::*;

/// Exports `src` from `registries` into `layout` under `tag`.
pub async fn export(
    registries: &Registries,
    src: &str,
    layout: &(impl Clone + Into<Layout>),
    tag: &str,
    options: &CopyOptions,
) {
    let src = reference(src);
    copy_to_layout(
        &Source::registry(registries.repository(&src)),
        &Wanted::image(&src),
        &layout.clone().into(),
        tag,
        options,
    )
    .await
    .unwrap();
}

/// Imports `<layout>[:tag]` into `dst` (`host/repository:tag`).
pub async fn import(
    registries: &Registries,
    layout: &(impl Clone + Into<Layout>),
    tag: Option<&str>,
    dst: &str,
    options: &CopyOptions,
) -> Result<CopyReport, CopyError> {
    let dst = reference(dst);
    let layout: Layout = layout.clone().into();
    copy_from(
        &Source::layout(layout.clone()),
        &Wanted::in_layout(&layout, tag),
        &registries.repository(&dst),
        dst.tag_or_latest(),
        options,
    )
    .await
}

#[tokio::test]
async fn an_imported_image_is_byte_exact_and_a_second_import_copies_nothing() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Docker, 530, 3, 64 * 1024).build();
    hub.push("team/app:v1", &image).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = OciDir::create(dir.path()).unwrap();
    let defaults = CopyOptions::default();
    export(
        &registries,
        &format!("{}/team/app:v1", hub.host()),
        &layout,
        "v1",
        &defaults,
    )
    .await;

    // Into an empty registry, by the layout's only image (no tag named).
    let dst = format!("{}/restored/app:v1", internal.host());
    let report = import(&registries, &layout, None, &dst, &defaults)
        .await
        .unwrap();
    assert_eq!(
        report.source_digest, image.digest,
        "the Docker manifest's own digest"
    );
    assert_eq!(report.blobs.copied, 4);
    assert_eq!(report.bytes_copied, image.blob_bytes());
    assert_eq!(
        report.pinned,
        format!("{}/restored/app@{}", internal.host(), image.digest)
    );
    // skopeo, an independent client, pulls it back out of the registry, verifying every blob.
    assert_eq!(
        skopeo_digest(&internal, "restored/app:v1").unwrap(),
        image.digest
    );
    let pulled = tempfile::tempdir().unwrap();
    let out = skopeo::skopeo()
        .args([
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--preserve-digests",
        ])
        .arg(format!("docker://{dst}"))
        .arg(format!("oci:{}:pulled", pulled.path().display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Again, under another tag: every blob is already there, so none is read from the layout.
    let again = import(
        &registries,
        &layout,
        Some("v1"),
        &format!("{}/restored/app:again", internal.host()),
        &defaults,
    )
    .await
    .unwrap();
    assert_eq!((again.blobs.copied, again.blobs.skipped), (0, 4));
    assert_eq!(again.source_digest, image.digest);
}

#[tokio::test]
async fn a_multi_platform_index_imports_whole_or_by_platform() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    let index = IndexSpec::seeded(
        ManifestFormat::Oci,
        531,
        &["linux/amd64", "linux/arm64"],
        2,
        8 * 1024,
    )
    .build();
    hub.push_index("multi/app:v1", &index).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = OciDir::create(dir.path()).unwrap();
    export(
        &registries,
        &format!("{}/multi/app:v1", hub.host()),
        &layout,
        "v1",
        &all_platforms(),
    )
    .await;

    // The children are not listed in index.json: the layout reader finds them by digest.
    let whole = import(
        &registries,
        &layout,
        Some("v1"),
        &format!("{}/multi/app:all", internal.host()),
        &CopyOptions {
            platforms: PlatformChoice::All,
            ..CopyOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(whole.source_digest, index.digest);
    assert_eq!(
        skopeo_digest(&internal, "multi/app:all").unwrap(),
        index.digest
    );
    let arm = import(
        &registries,
        &layout,
        Some("v1"),
        &format!("{}/multi/app:arm", internal.host()),
        &platform("linux/arm64"),
    )
    .await
    .unwrap();
    assert_eq!(arm.source_digest, index.children[1].digest);
}

#[tokio::test]
async fn a_corrupt_or_truncated_blob_in_the_layout_is_refused_and_nothing_is_tagged() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Oci, 532, 2, 32 * 1024).build();
    hub.push("team/app:v1", &image).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = OciDir::create(dir.path()).unwrap();
    export(
        &registries,
        &format!("{}/team/app:v1", hub.host()),
        &layout,
        "v1",
        &CopyOptions::default(),
    )
    .await;
    let layer = layout.blob_path(&image.layers[0].digest).unwrap();
    let original = std::fs::read(&layer).unwrap();

    // One byte changed, same size: only the digest can tell.
    let mut flipped = original.clone();
    flipped[1000] ^= 0x01;
    std::fs::write(&layer, &flipped).unwrap();
    let error = import(
        &registries,
        &layout,
        Some("v1"),
        &format!("{}/restored/app:v1", internal.host()),
        &CopyOptions::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(error.code().as_str(), "DIGEST_MISMATCH", "{error}");
    assert!(
        error.to_string().contains(&image.layers[0].digest),
        "{error}"
    );
    // Cut short: refused by its size before it is read.
    std::fs::write(&layer, &original[..original.len() - 10]).unwrap();
    let error = import(
        &registries,
        &layout,
        Some("v1"),
        &format!("{}/restored/app:v1", internal.host()),
        &CopyOptions::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(error.code().as_str(), "DIGEST_MISMATCH", "{error}");

    assert!(
        skopeo_digest(&internal, "restored/app:v1").is_err(),
        "a failed import leaves no tag"
    );
    // Repaired, the same import goes through.
    std::fs::write(&layer, &original).unwrap();
    let report = import(
        &registries,
        &layout,
        Some("v1"),
        &format!("{}/restored/app:v1", internal.host()),
        &CopyOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(report.source_digest, image.digest);
}

#[tokio::test]
async fn a_layout_source_names_its_image_or_says_what_it_holds() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Oci, 533, 1, 1024).build();
    hub.push("team/app:v1", &image).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = OciDir::create(dir.path()).unwrap();
    let dst = format!("{}/restored/app:v1", internal.host());
    let defaults = CopyOptions::default();

    let error = import(&registries, &layout, None, &dst, &defaults)
        .await
        .unwrap_err();
    assert_eq!(error.code().as_str(), "IMAGE_NOT_FOUND", "{error}");
    assert!(error.to_string().contains("holds no image"), "{error}");

    let src = format!("{}/team/app:v1", hub.host());
    export(&registries, &src, &layout, "one", &defaults).await;
    export(&registries, &src, &layout, "two", &defaults).await;
    let error = import(&registries, &layout, None, &dst, &defaults)
        .await
        .unwrap_err();
    assert_eq!(error.code().as_str(), "INVALID_ARGUMENT", "{error}");
    assert!(error.to_string().contains("holds 2 images"), "{error}");
    assert!(error.to_string().contains("one, two"), "{error}");

    let error = import(&registries, &layout, Some("three"), &dst, &defaults)
        .await
        .unwrap_err();
    assert_eq!(error.code().as_str(), "IMAGE_NOT_FOUND", "{error}");
    assert!(error.to_string().contains("no tag \"three\""), "{error}");
    import(&registries, &layout, Some("two"), &dst, &defaults)
        .await
        .unwrap();
}
