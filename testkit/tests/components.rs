//! The test support itself, checked against the real components and an independent client:
//! what testkit pushes, skopeo reads back byte for byte.

use testkit::image::{ImageSpec, IndexSpec, ManifestFormat};
use testkit::{TestDatabase, TestRegistry, push_image, push_index, skopeo};

#[tokio::test]
async fn each_test_database_is_migrated_and_isolated() {
    let (a, b) = (TestDatabase::new().await, TestDatabase::new().await);
    assert_ne!(a.name, b.name);
    let (pa, pb) = (a.pool().await, b.pool().await);

    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pa)
        .await
        .unwrap();
    assert_eq!(applied as usize, tailor::db::MIGRATOR.iter().count());

    sqlx::query("INSERT INTO blobs (digest, size, media_type) VALUES ($1, 1, 'x')")
        .bind(format!("sha256:{}", "a".repeat(64)))
        .execute(&pa)
        .await
        .unwrap();
    let in_a: i64 = sqlx::query_scalar("SELECT count(*) FROM blobs")
        .fetch_one(&pa)
        .await
        .unwrap();
    let in_b: i64 = sqlx::query_scalar("SELECT count(*) FROM blobs")
        .fetch_one(&pb)
        .await
        .unwrap();
    assert_eq!((in_a, in_b), (1, 0));
}

#[tokio::test]
async fn docker_and_oci_images_round_trip_through_skopeo() {
    let registry = TestRegistry::anonymous();
    for (format, repo) in [
        (ManifestFormat::Docker, "library/docker-app"),
        (ManifestFormat::Oci, "oci/app"),
    ] {
        let image = ImageSpec::seeded(format, 11, 3, 64 * 1024).build();
        push_image(
            &registry.base_url(),
            repo,
            "v1",
            &image,
            &registry.push_auth(repo),
        )
        .await;

        let reference = format!("{}/{repo}:v1", registry.host());
        let raw = skopeo::inspect_raw(&reference, None).unwrap();
        assert_eq!(raw, image.manifest, "skopeo reads the exact manifest bytes");
        let layout = tempfile::tempdir().unwrap();
        skopeo::copy_to_oci_layout(&reference, None, layout.path(), false).unwrap();
    }
}

#[tokio::test]
async fn manifest_lists_and_oci_indexes_round_trip_with_every_platform() {
    let registry = TestRegistry::anonymous();
    let platforms = ["linux/amd64", "linux/arm64/v8", "linux/arm/v7"];
    for (format, repo) in [
        (ManifestFormat::Docker, "multi/list"),
        (ManifestFormat::Oci, "multi/index"),
    ] {
        let index = IndexSpec::seeded(format, 21, &platforms, 2, 16 * 1024).build();
        assert_eq!(index.children.len(), 3);
        push_index(
            &registry.base_url(),
            repo,
            "v1",
            &index,
            &registry.push_auth(repo),
        )
        .await;

        let reference = format!("{}/{repo}:v1", registry.host());
        assert_eq!(skopeo::digest(&reference, None).unwrap(), index.digest);
        for child in &index.children {
            let by_digest = format!("{}/{repo}@{}", registry.host(), child.digest);
            assert_eq!(skopeo::digest(&by_digest, None).unwrap(), child.digest);
        }
        let layout = tempfile::tempdir().unwrap();
        skopeo::copy_to_oci_layout(&reference, None, layout.path(), true).unwrap();
    }
}

#[tokio::test]
async fn images_can_share_exactly_k_layers_in_the_registry() {
    let registry = TestRegistry::anonymous();
    let (first, second) = ImageSpec::sharing(ManifestFormat::Docker, 5, 8, 7, 32 * 1024);
    let (first, second) = (first.build(), second.build());
    push_image(
        &registry.base_url(),
        "app/one",
        "v1",
        &first,
        &registry.push_auth("app/one"),
    )
    .await;
    push_image(
        &registry.base_url(),
        "app/one",
        "v2",
        &second,
        &registry.push_auth("app/one"),
    )
    .await;
    let shared = first
        .layers
        .iter()
        .filter(|l| second.layers.iter().any(|m| m.digest == l.digest))
        .count();
    assert_eq!(shared, 7);
    for (tag, image) in [("v1", &first), ("v2", &second)] {
        let reference = format!("{}/app/one:{tag}", registry.host());
        assert_eq!(skopeo::digest(&reference, None).unwrap(), image.digest);
    }
}

#[tokio::test]
async fn htpasswd_registry_needs_the_right_credentials() {
    let registry = TestRegistry::htpasswd("hub-user", "hub-pass");
    let image = ImageSpec::seeded(ManifestFormat::Oci, 31, 1, 1024).build();
    push_image(
        &registry.base_url(),
        "private/app",
        "v1",
        &image,
        &registry.push_auth("private/app"),
    )
    .await;

    let reference = format!("{}/private/app:v1", registry.host());
    assert!(
        skopeo::digest(&reference, None).is_err(),
        "anonymous read must fail"
    );
    assert!(skopeo::digest(&reference, Some(("hub-user", "wrong"))).is_err());
    assert_eq!(
        skopeo::digest(&reference, registry.credentials()).unwrap(),
        image.digest
    );
}

#[tokio::test]
async fn token_registry_runs_the_bearer_challenge_flow() {
    let registry = TestRegistry::token_default();
    let image = ImageSpec::seeded(ManifestFormat::Docker, 41, 2, 1024).build();
    push_image(
        &registry.base_url(),
        "private/app",
        "v1",
        &image,
        &registry.push_auth("private/app"),
    )
    .await;

    // Without a token the registry challenges with the issuer's realm.
    let challenge = reqwest::get(format!(
        "{}/v2/private/app/manifests/v1",
        registry.base_url()
    ))
    .await
    .unwrap();
    assert_eq!(challenge.status(), 401);
    let header = challenge.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(header.starts_with("Bearer realm=\""), "{header}");
    assert!(
        header.contains("scope=\"repository:private/app:pull\""),
        "{header}"
    );

    let reference = format!("{}/private/app:v1", registry.host());
    let issued_before = registry.issuer().unwrap().issued();
    assert!(skopeo::digest(&reference, Some(("tailor", "wrong-pass"))).is_err());
    assert_eq!(
        skopeo::digest(&reference, registry.credentials()).unwrap(),
        image.digest
    );
    assert!(
        registry.issuer().unwrap().issued() > issued_before,
        "skopeo got its token from the issuer"
    );
}

#[tokio::test]
async fn access_log_counts_the_blob_bytes_a_client_read() {
    let registry = TestRegistry::anonymous();
    let image = ImageSpec::seeded(ManifestFormat::Oci, 51, 3, 256 * 1024).build();
    push_image(
        &registry.base_url(),
        "counted/app",
        "v1",
        &image,
        &registry.push_auth("counted/app"),
    )
    .await;
    assert_eq!(registry.blob_bytes_served(), 0, "pushing reads no blobs");

    let layout = tempfile::tempdir().unwrap();
    let reference = format!("{}/counted/app:v1", registry.host());
    skopeo::copy_to_oci_layout(&reference, None, layout.path(), false).unwrap();
    assert_eq!(registry.blob_bytes_served(), image.blob_bytes());
}

#[tokio::test]
async fn large_layers_are_built_on_disk_and_streamed() {
    let registry = TestRegistry::anonymous();
    let size = 3 * testkit::image::IN_MEMORY_LIMIT;
    let image = ImageSpec::seeded(ManifestFormat::Oci, 61, 1, size).build();
    assert!(matches!(
        image.layers[0].data,
        testkit::image::BlobData::File(_)
    ));
    assert!(
        image.layers[0].size > size,
        "stored deflate adds framing, never shrinks random data"
    );
    push_image(
        &registry.base_url(),
        "big/app",
        "v1",
        &image,
        &registry.push_auth("big/app"),
    )
    .await;

    let layout = tempfile::tempdir().unwrap();
    let reference = format!("{}/big/app:v1", registry.host());
    skopeo::copy_to_oci_layout(&reference, None, layout.path(), false).unwrap();
    let hex = image.layers[0].digest.trim_start_matches("sha256:");
    let copied = std::fs::metadata(layout.path().join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(copied.len(), image.layers[0].size);
}
