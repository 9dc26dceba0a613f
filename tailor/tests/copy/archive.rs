//! `oci-archive:FILE[:TAG]`: an OCI image layout in a tar file, the form that boots a first
//! registry. skopeo reads what tailor writes and tailor reads what skopeo writes; a failed
//! export leaves the target file as it was; a damaged blob inside the tar is refused.

use std::path::Path;

use tailor::copy::{CopyOptions, Source, Wanted, copy_from, copy_to_archive};
use tailor::layout::{Layout, OciArchive};
use testkit::hostile_registry::{HostileRegistry, Lie, Misbehaviour, Rule};
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::{TestRegistry, skopeo};

use crate::helpers::*;

async fn export_archive(
    registries: &Registries,
    src: &str,
    target: &Path,
    tag: &str,
) -> Result<tailor::copy::CopyReport, tailor::error::CopyError> {
    let src = reference(src);
    copy_to_archive(
        &Source::registry(registries.repository(&src)),
        &Wanted::image(&src),
        target,
        tag,
        &CopyOptions::default(),
    )
    .await
}

async fn import_archive(
    registries: &Registries,
    archive: &Path,
    tag: Option<&str>,
    dst: &str,
) -> Result<tailor::copy::CopyReport, tailor::error::CopyError> {
    let layout: Layout = OciArchive::open(archive).unwrap().into();
    let dst = reference(dst);
    copy_from(
        &Source::layout(layout.clone()),
        &Wanted::in_layout(&layout, tag),
        &registries.repository(&dst),
        dst.tag_or_latest(),
        &CopyOptions::default(),
    )
    .await
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn skopeo_ok(args: &[&str]) -> Vec<u8> {
    let out = skopeo::skopeo().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[tokio::test]
async fn skopeo_reads_the_archive_tailor_writes_byte_exact() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Oci, 540, 3, 64 * 1024).build();
    hub.push("team/app:v1", &image).await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("app.tar");

    let report = export_archive(
        &registries,
        &format!("{}/team/app:v1", hub.host()),
        &archive,
        "v1",
    )
    .await
    .unwrap();
    assert_eq!(report.source_digest, image.digest);
    assert_eq!(
        report.pinned,
        format!("oci-archive:{}@{}", archive.display(), image.digest)
    );
    assert_eq!(names(dir.path()), ["app.tar"], "no working files are left");

    // skopeo's own reader: the manifest is our bytes, and a copy into a registry keeps the digest.
    let location = format!("oci-archive:{}:v1", archive.display());
    let raw = skopeo_ok(&["inspect", "--raw", &location]);
    assert_eq!(raw, image.manifest.as_ref());
    skopeo_ok(&[
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--preserve-digests",
        &location,
        &format!("docker://{}/from/skopeo:v1", internal.host()),
    ]);
    assert_eq!(
        skopeo_digest(&internal, "from/skopeo:v1").unwrap(),
        image.digest
    );

    // And tailor reads it back, by its only image: the registry has every blob, so none is read.
    let back = import_archive(
        &registries,
        &archive,
        None,
        &format!("{}/from/skopeo:again", internal.host()),
    )
    .await
    .unwrap();
    assert_eq!(back.source_digest, image.digest);
    assert_eq!((back.blobs.copied, back.blobs.skipped), (0, 4));

    // Writing the same image again gives the same bytes: the archive is reproducible.
    let first = std::fs::read(&archive).unwrap();
    export_archive(
        &registries,
        &format!("{}/team/app:v1", hub.host()),
        &archive,
        "v1",
    )
    .await
    .unwrap();
    let second = std::fs::read(&archive).unwrap();
    assert!(second == first);
}

#[tokio::test]
async fn tailor_reads_the_archive_skopeo_writes() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Oci, 541, 2, 48 * 1024).build();
    hub.push("team/app:v2", &image).await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("skopeo.tar");
    skopeo_ok(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--preserve-digests",
        &format!("docker://{}/team/app:v2", hub.host()),
        &format!("oci-archive:{}:v2", archive.display()),
    ]);

    let report = import_archive(
        &registries,
        &archive,
        Some("v2"),
        &format!("{}/restored/app:v2", internal.host()),
    )
    .await
    .unwrap();
    assert_eq!(report.source_digest, image.digest);
    assert_eq!(report.blobs.copied, 3);
    assert_eq!(report.bytes_copied, image.blob_bytes());
    assert_eq!(
        skopeo_digest(&internal, "restored/app:v2").unwrap(),
        image.digest
    );
    let missing = import_archive(
        &registries,
        &archive,
        Some("v3"),
        &format!("{}/restored/app:v3", internal.host()),
    )
    .await
    .unwrap_err();
    assert_eq!(
        missing.code(),
        tailor::code::Code::ImageNotFound,
        "{missing}"
    );
}

#[tokio::test]
async fn a_failed_export_leaves_the_target_as_it_was_and_nothing_beside_it() {
    let hostile = HostileRegistry::start();
    let registries = registries(&[hostile.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Oci, 542, 3, 64 * 1024).build();
    hostile.add_image("team/bad", "v1", &image);
    hostile.add_rule(Rule::new(
        &format!("/blobs/{}", image.layers[2].digest),
        Misbehaviour::Lie(Lie::WrongContent),
    ));
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("site.tar");
    std::fs::write(&archive, b"yesterday's archive").unwrap();

    let error = export_archive(
        &registries,
        &format!("{}/team/bad:v1", hostile.host()),
        &archive,
        "v1",
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), tailor::code::Code::DigestMismatch, "{error}");
    assert_eq!(std::fs::read(&archive).unwrap(), b"yesterday's archive");
    assert_eq!(names(dir.path()), ["site.tar"], "no working files are left");

    // A directory is not an archive: refused before anything is read.
    let refused = export_archive(
        &registries,
        &format!("{}/team/bad:v1", hostile.host()),
        dir.path(),
        "v1",
    )
    .await
    .unwrap_err();
    assert!(refused.to_string().contains("a directory"), "{refused}");
}

#[tokio::test]
async fn a_damaged_blob_inside_the_archive_is_refused_on_import() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Oci, 543, 2, 64 * 1024).build();
    hub.push("team/app:v1", &image).await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("app.tar");
    export_archive(
        &registries,
        &format!("{}/team/app:v1", hub.host()),
        &archive,
        "v1",
    )
    .await
    .unwrap();

    // One byte inside the second layer's member changes; the tar itself stays well-formed.
    let mut tar = std::fs::read(&archive).unwrap();
    let testkit::image::BlobData::Memory(layer) = &image.layers[1].data else {
        panic!("a small layer is held in memory");
    };
    let at = tar
        .windows(layer.len())
        .position(|w| w == layer.as_ref())
        .expect("the layer's bytes are in the tar");
    tar[at + layer.len() / 2] ^= 0x01;
    std::fs::write(&archive, &tar).unwrap();

    let dst = format!("{}/restored/app:v1", internal.host());
    let error = import_archive(&registries, &archive, Some("v1"), &dst)
        .await
        .unwrap_err();
    assert_eq!(error.code(), tailor::code::Code::DigestMismatch, "{error}");
    assert!(
        skopeo_digest(&internal, "restored/app:v1").is_err(),
        "nothing is tagged"
    );

    // Not a tar at all, or a tar without a layout: a clear refusal.
    std::fs::write(&archive, b"not a tar").unwrap();
    let error = OciArchive::open(&archive).unwrap_err();
    assert!(error.to_string().contains("not"), "{error}");
}
