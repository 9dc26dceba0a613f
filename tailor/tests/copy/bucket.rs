//! Copies into and out of an OCI image layout in an S3 bucket, against a real S3 server
//! (SeaweedFS, started by the test): byte-exact both ways, only missing blobs read, a damaged
//! object refused, racing writers losing no tag, and clear errors for a bucket that is missing
//! or refuses the credentials.

use tailor::copy::CopyOptions;
use tailor::layout::{Layout, S3Layout, S3Location};
use testkit::TestRegistry;
use testkit::hostile_registry::{HostileRegistry, Misbehaviour, Rule};
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::s3::S3Server;

use crate::helpers::*;
use crate::layout_import::{export, import};

async fn bucket_layout(s3: &S3Server, prefix: &str) -> Layout {
    S3Layout::create(&s3.layout_location(prefix))
        .await
        .unwrap()
        .into()
}

/// The keys under `prefix`, relative to it.
async fn keys(s3: &S3Server, prefix: &str) -> Vec<String> {
    s3.list_objects(prefix)
        .await
        .into_iter()
        .map(|(key, _)| key.strip_prefix(&format!("{prefix}/")).unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn an_export_to_a_bucket_imports_back_byte_exact_and_a_reexport_reads_no_blob() {
    let s3 = S3Server::start();
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    // Two layers over one part (8 MiB): multipart uploads; the config goes up in one PUT.
    let image = ImageSpec::seeded(ManifestFormat::Docker, 540, 2, 9 * 1024 * 1024).build();
    hub.push("team/app:v1", &image).await;
    let layout = bucket_layout(&s3, "exports/site-a").await;
    let src = format!("{}/team/app:v1", hub.host());
    let defaults = CopyOptions::default();

    export(&registries, &src, &layout, "v1", &defaults).await;
    let mut expected: Vec<String> = image
        .blobs()
        .map(|b| &b.digest)
        .chain([&image.digest])
        .map(|d| format!("blobs/sha256/{}", d.strip_prefix("sha256:").unwrap()))
        .chain(["index.json", "oci-layout", "refs/v1"].map(str::to_owned))
        .collect();
    expected.sort();
    assert_eq!(keys(&s3, "exports/site-a").await, expected);
    let manifest_key = format!(
        "exports/site-a/blobs/sha256/{}",
        image.digest.strip_prefix("sha256:").unwrap()
    );
    assert_eq!(s3.get_object(&manifest_key).await, image.manifest.as_ref());

    // Again under another tag: nothing read upstream, per the registry's own log.
    let served = hub.blob_bytes_served();
    export(&registries, &src, &layout, "v2", &defaults).await;
    assert_eq!(hub.blob_bytes_served(), served, "no blob byte read again");
    for tag in ["v1", "v2"] {
        let tagged = layout.resolve(tag).await.unwrap().unwrap();
        assert_eq!(tagged.digest, image.digest);
    }

    // Into an empty registry from a fresh reader of the bucket: the same digest, and skopeo
    // pulls it.
    let reader: Layout = S3Layout::open(&s3.layout_location("exports/site-a"))
        .await
        .unwrap()
        .into();
    let report = import(
        &registries,
        &reader,
        Some("v1"),
        &format!("{}/restored/app:v1", internal.host()),
        &defaults,
    )
    .await
    .unwrap();
    assert_eq!(report.source_digest, image.digest);
    assert_eq!(report.bytes_copied, image.blob_bytes());
    assert_eq!(
        skopeo_digest(&internal, "restored/app:v1").unwrap(),
        image.digest
    );
}

#[tokio::test]
async fn a_damaged_object_in_the_bucket_is_refused_on_import_and_nothing_is_tagged() {
    let s3 = S3Server::start();
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Oci, 541, 2, 64 * 1024).build();
    hub.push("team/app:v1", &image).await;
    let layout = bucket_layout(&s3, "damaged").await;
    let defaults = CopyOptions::default();
    export(
        &registries,
        &format!("{}/team/app:v1", hub.host()),
        &layout,
        "v1",
        &defaults,
    )
    .await;

    let key = format!(
        "damaged/blobs/sha256/{}",
        image.layers[1].digest.strip_prefix("sha256:").unwrap()
    );
    let mut bytes = s3.get_object(&key).await;
    bytes[100] ^= 0x80;
    s3.put_object(&key, bytes).await;
    let dst = format!("{}/restored/app:v1", internal.host());
    let error = import(&registries, &layout, Some("v1"), &dst, &defaults)
        .await
        .unwrap_err();
    assert_eq!(error.code().as_str(), "DIGEST_MISMATCH", "{error}");
    assert!(
        error.to_string().contains(&image.layers[1].digest),
        "{error}"
    );
    assert!(
        skopeo_digest(&internal, "restored/app:v1").is_err(),
        "a failed import leaves no tag"
    );
}

#[tokio::test]
async fn an_interrupted_export_leaves_no_object_of_the_cut_blob_and_resumes() {
    let s3 = S3Server::start();
    let hostile = HostileRegistry::start();
    let registries = registries(&[hostile.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Oci, 542, 3, 9 * 1024 * 1024).build();
    hostile.add_image("team/cut", "v1", &image);
    let cut = &image.layers[1];
    // Cut past the first part: a multipart upload is under way when the source fails.
    hostile.add_rule(Rule::new(
        &format!("/blobs/{}", cut.digest),
        Misbehaviour::CloseMidBody {
            after_bytes: cut.size - 1024,
        },
    ));
    let layout = bucket_layout(&s3, "cut").await;
    let src = format!("{}/team/cut:v1", hostile.host());
    let defaults = CopyOptions::default();

    let src_ref = reference(&src);
    let error = tailor::copy::copy_to_layout(
        &tailor::copy::Source::registry(registries.repository(&src_ref)),
        &tailor::copy::Wanted::image(&src_ref),
        &layout,
        "v1",
        &defaults,
    )
    .await
    .unwrap_err();
    assert_eq!(error.code().as_str(), "UPSTREAM_UNREACHABLE", "{error}");
    let after_failure = keys(&s3, "cut").await;
    let cut_key = format!(
        "blobs/sha256/{}",
        cut.digest.strip_prefix("sha256:").unwrap()
    );
    assert!(!after_failure.contains(&cut_key), "{after_failure:?}");
    assert!(
        !after_failure.iter().any(|k| k.starts_with("refs/")),
        "no tag on a failed export: {after_failure:?}"
    );
    assert_eq!(layout.resolve("v1").await.unwrap(), None);

    hostile.clear_rules();
    let served = hostile.served_bytes();
    export(&registries, &src, &layout, "v1", &defaults).await;
    let reread = hostile.served_bytes() - served;
    assert!(
        reread < 2 * cut.size,
        "only the cut layer (and the manifest) is read again: {reread} bytes"
    );
    assert!(keys(&s3, "cut").await.contains(&cut_key));
}

#[tokio::test]
async fn exports_racing_into_one_prefix_lose_no_tag() {
    let s3 = S3Server::start();
    let hub = TestRegistry::anonymous();
    let registries = registries(&[hub.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Oci, 543, 1, 4096).build();
    hub.push("team/app:v1", &image).await;
    let src = format!("{}/team/app:v1", hub.host());
    let layout = bucket_layout(&s3, "raced").await;
    export(&registries, &src, &layout, "first", &CopyOptions::default()).await;

    // Sixteen writers, each with its own client, tag the same prefix at once: every blob is
    // there already, so they all reach index.json together.
    let writers: Vec<_> = (0..16)
        .map(|n| {
            let (registries, src) = (registries.clone(), src.clone());
            let location = s3.layout_location("raced");
            tokio::spawn(async move {
                let layout: Layout = S3Layout::open(&location).await.unwrap().into();
                export(
                    &registries,
                    &src,
                    &layout,
                    &format!("t{n}"),
                    &CopyOptions::default(),
                )
                .await;
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let mut listed = Vec::new();
    for n in 0..16 {
        // Through index.json alone (refs/ would answer for a lost entry too).
        let index: serde_json::Value =
            serde_json::from_slice(&s3.get_object("raced/index.json").await).unwrap();
        let tag = format!("t{n}");
        if index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag.as_str())
        {
            listed.push(tag);
        }
    }
    assert_eq!(listed.len(), 16, "index.json lists every tag: {listed:?}");
}

#[tokio::test]
async fn a_missing_bucket_refused_credentials_and_a_foreign_prefix_get_clear_errors() {
    let s3 = S3Server::start();
    let endpoint = s3.endpoint();

    let missing = S3Location::parse(&format!(
        "s3://no-such-bucket/x?endpoint={endpoint}&region=us-east-1"
    ))
    .unwrap()
    .with_credentials(s3.access_key(), s3.secret_key().expose());
    let error = S3Layout::create(&missing).await.unwrap_err();
    assert_eq!(error.code().as_str(), "LOCATION_NOT_FOUND", "{error}");
    assert!(error.to_string().contains("no-such-bucket"), "{error}");

    let wrong_secret = "wrong-secret-0123456789";
    let refused = s3
        .layout_location("x")
        .with_credentials(s3.access_key(), wrong_secret);
    for error in [
        S3Layout::create(&refused).await.unwrap_err(),
        S3Layout::open(&refused).await.unwrap_err(),
    ] {
        assert_eq!(error.code().as_str(), "LOCATION_DENIED", "{error}");
        assert!(
            error.to_string().contains("AWS_SECRET_ACCESS_KEY"),
            "{error}"
        );
        assert!(!error.to_string().contains(wrong_secret), "{error}");
    }

    s3.put_object("foreign/notes.txt", b"not a layout".to_vec())
        .await;
    let error = S3Layout::create(&s3.layout_location("foreign"))
        .await
        .unwrap_err();
    assert_eq!(error.code().as_str(), "LAYOUT_INVALID", "{error}");
    assert_eq!(keys(&s3, "foreign").await, ["notes.txt"], "nothing written");
    let error = S3Layout::open(&s3.layout_location("empty"))
        .await
        .unwrap_err();
    assert_eq!(error.code().as_str(), "LAYOUT_INVALID", "{error}");
}
