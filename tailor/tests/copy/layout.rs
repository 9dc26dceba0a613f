//! Copies into an OCI image layout on disk: byte-exact (skopeo reads the layout back and
//! pushes it), only missing blobs read, nothing half-written after a failure.

use tailor::copy::{CopyOptions, Source, Wanted, copy_to_layout};
use tailor::layout::OciDir;
use testkit::hostile_registry::{HostileRegistry, Lie, Misbehaviour, Rule};
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::{TestRegistry, skopeo};

use crate::helpers::*;

async fn copy_into(
    registries: &Registries,
    src: &str,
    layout: &OciDir,
    tag: &str,
) -> Result<tailor::copy::CopyReport, tailor::error::CopyError> {
    let src = reference(src);
    copy_to_layout(
        &Source::registry(registries.repository(&src)),
        &Wanted::image(&src),
        &layout.clone().into(),
        tag,
        &CopyOptions::default(),
    )
    .await
}

/// Every file under the layout's `blobs/` and `refs/`, by name.
fn files(layout: &OciDir, under: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(layout.root().join(under))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_layout_copy_is_byte_exact_and_a_second_one_reads_no_blob() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Oci, 520, 4, 96 * 1024).build();
    hub.push("team/app:v1", &image).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = OciDir::create(dir.path()).unwrap();
    let src = format!("{}/team/app:v1", hub.host());

    let report = copy_into(&registries, &src, &layout, "v1").await.unwrap();
    assert_eq!(report.blobs.copied, 5);
    assert_eq!(report.source_digest, image.digest);
    assert_eq!(hub.blob_bytes_served(), image.blob_bytes());

    // skopeo, an independent reader, finds upstream's exact manifest under the tag, and can
    // push the whole image out of the layout (verifying every blob on the way).
    let at = format!("oci:{}:v1", dir.path().display());
    let raw = skopeo::skopeo()
        .args(["inspect", "--raw", &at])
        .output()
        .unwrap();
    assert!(
        raw.status.success(),
        "{}",
        String::from_utf8_lossy(&raw.stderr)
    );
    assert_eq!(raw.stdout, image.manifest.as_ref());
    let pushed = skopeo::skopeo()
        .args(["copy", "--quiet", "--dest-tls-verify=false", &at])
        .arg(format!("docker://{}/out/app:v1", internal.host()))
        .output()
        .unwrap();
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    assert_eq!(
        skopeo_digest(&internal, "out/app:v1").unwrap(),
        image.digest
    );

    let again = copy_into(&registries, &src, &layout, "again")
        .await
        .unwrap();
    assert_eq!((again.blobs.copied, again.blobs.skipped), (0, 5));
    assert_eq!(
        hub.blob_bytes_served(),
        image.blob_bytes(),
        "per the upstream access log, the second copy read no blob bytes"
    );
    assert_eq!(files(&layout, "refs"), ["again", "v1"]);
}

#[tokio::test]
async fn a_docker_manifest_keeps_its_bytes_and_its_digest() {
    // skopeo would convert it to OCI (a new digest); the pinned digest is upstream's.
    let hub = TestRegistry::anonymous();
    let registries = registries(&[hub.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Docker, 523, 2, 16 * 1024).build();
    hub.push("team/docker:v1", &image).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = OciDir::create(dir.path()).unwrap();
    copy_into(
        &registries,
        &format!("{}/team/docker:v1", hub.host()),
        &layout,
        "v1",
    )
    .await
    .unwrap();
    let tagged = layout.resolve("v1").await.unwrap().unwrap();
    assert_eq!(tagged.digest, image.digest);
    assert_eq!(tagged.media_type, image.media_type);
    let stored = std::fs::read(layout.blob_path(&image.digest).unwrap()).unwrap();
    assert_eq!(stored, image.manifest.as_ref());
}

#[tokio::test]
async fn a_corrupt_blob_is_never_named_and_nothing_is_tagged() {
    let hostile = HostileRegistry::start();
    let registries = registries(&[hostile.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Oci, 521, 3, 64 * 1024).build();
    hostile.add_image("team/bad", "v1", &image);
    let corrupt = &image.layers[1].digest;
    hostile.add_rule(Rule::new(
        &format!("/blobs/{corrupt}"),
        Misbehaviour::Lie(Lie::WrongContent),
    ));
    let dir = tempfile::tempdir().unwrap();
    let layout = OciDir::create(dir.path()).unwrap();

    let error = copy_into(
        &registries,
        &format!("{}/team/bad:v1", hostile.host()),
        &layout,
        "v1",
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), tailor::code::Code::DigestMismatch, "{error}");
    let blobs = files(&layout, "blobs/sha256");
    assert!(
        !blobs.iter().any(|name| corrupt.ends_with(name.as_str())),
        "the corrupt blob has no file: {blobs:?}"
    );
    assert!(
        blobs.iter().all(|name| !name.starts_with(".tmp")),
        "no temporary file is left: {blobs:?}"
    );
    assert!(files(&layout, "refs").is_empty());
    assert!(layout.tags().unwrap().is_empty());

    // The source mends its ways: the copy completes, reading only what the layout lacks.
    hostile.clear_rules();
    let report = copy_into(
        &registries,
        &format!("{}/team/bad:v1", hostile.host()),
        &layout,
        "v1",
    )
    .await
    .unwrap();
    assert_eq!(report.blobs.copied + report.blobs.skipped, 4);
    assert!(report.blobs.copied >= 1);
    assert_eq!(
        layout.resolve("v1").await.unwrap().unwrap().digest,
        image.digest
    );
}

#[tokio::test]
async fn an_interrupted_copy_resumes_with_what_is_missing() {
    let hostile = HostileRegistry::start();
    let registries = registries(&[hostile.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Oci, 522, 4, 64 * 1024).build();
    hostile.add_image("team/cut", "v1", &image);
    let cut = &image.layers[2];
    hostile.add_rule(Rule::new(
        &format!("/blobs/{}", cut.digest),
        Misbehaviour::CloseMidBody {
            after_bytes: cut.size / 2,
        },
    ));
    let dir = tempfile::tempdir().unwrap();
    let layout = OciDir::create(dir.path()).unwrap();
    let src = format!("{}/team/cut:v1", hostile.host());

    copy_into(&registries, &src, &layout, "v1")
        .await
        .unwrap_err();
    assert!(layout.tags().unwrap().is_empty(), "no tag on a failed copy");
    assert!(
        files(&layout, "blobs/sha256")
            .iter()
            .all(|name| !name.starts_with(".tmp") && !cut.digest.ends_with(name.as_str())),
    );

    hostile.clear_rules();
    let report = copy_into(&registries, &src, &layout, "v1").await.unwrap();
    assert_eq!(report.blobs.copied, 1, "only the cut layer is read again");
    assert_eq!(report.blobs.skipped, 4);
}
