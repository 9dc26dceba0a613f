//! A failed copy resumes where it stopped; a cancelled one stops and leaves no upload behind.

use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;

use tailor::copy::{CopyOptions, Progress};
use testkit::TestRegistry;
use testkit::image::{ImageSpec, LayerSpec, ManifestFormat};

use crate::helpers::*;

#[tokio::test]
async fn a_retried_copy_skips_the_blobs_an_earlier_attempt_finished() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    let mut spec = ImageSpec::seeded(ManifestFormat::Oci, 700, 0, 0);
    // Blobs go largest first; with one at a time, the two large layers finish before the
    // small (corrupted) one fails.
    spec.layers = vec![
        LayerSpec {
            seed: 701,
            size: 512 * 1024,
        },
        LayerSpec {
            seed: 702,
            size: 384 * 1024,
        },
        LayerSpec {
            seed: 703,
            size: 16 * 1024,
        },
    ];
    let image = spec.build();
    hub.push("flaky/app:v1", &image).await;
    let victim = hub.blob_data_path(&image.layers[2].digest);
    let original = std::fs::read(&victim).unwrap();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap();
    file.seek(SeekFrom::Start(100)).unwrap();
    file.write_all(b"garbage").unwrap();
    drop(file);

    let (src, dst) = (
        format!("{}/flaky/app:v1", hub.host()),
        format!("{}/t/flaky:s", internal.host()),
    );
    let one_at_a_time = || CopyOptions {
        concurrency: 1,
        ..CopyOptions::default()
    };
    let error = copy_with(&registries, &src, &dst, one_at_a_time())
        .await
        .unwrap_err();
    assert_eq!(error.code(), "DIGEST_MISMATCH");

    std::fs::write(&victim, original).unwrap();
    let served = hub.blob_bytes_served_settled();
    let report = copy_with(&registries, &src, &dst, one_at_a_time())
        .await
        .unwrap();
    assert_eq!(
        (report.blobs.skipped, report.blobs.copied),
        (2, 2),
        "{report:?}"
    );
    assert_eq!(
        hub.blob_bytes_served() - served,
        image.layers[2].size + image.config.size
    );
    assert_eq!(skopeo_digest(&internal, "t/flaky:s").unwrap(), image.digest);
}

#[tokio::test]
async fn cancelling_stops_the_copy_and_cancels_its_upload_sessions() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Docker, 710, 2, 48 * 1024 * 1024).build();
    hub.push("slow/big:v1", &image).await;

    let options = CopyOptions::default();
    let cancel = options.cancel.clone();
    let options = CopyOptions {
        // Cancel as soon as bytes flow: uploads are open at that moment.
        progress: Some(Arc::new(move |event| {
            if matches!(event, Progress::BlobBytes { .. }) {
                cancel.cancel();
            }
        })),
        ..options
    };
    let error = copy_with(
        &registries,
        &format!("{}/slow/big:v1", hub.host()),
        &format!("{}/t/big:s", internal.host()),
        options,
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), "CANCELLED");

    let tag = reqwest::get(format!("{}/v2/t/big/manifests/s", internal.base_url()))
        .await
        .unwrap();
    assert_eq!(tag.status(), 404);
    // Every upload session the copy opened gets a DELETE. (Distribution 2.8 answers 204 yet
    // rewrites a hash-state file afterwards, and refuses to cancel a session whose PUT it is
    // still failing, so the storage directory is not the judge; the protocol is.)
    let uploads = internal
        .embedded()
        .storage_dir()
        .join("docker/registry/v2/repositories/t/big/_uploads");
    let opened: Vec<String> = std::fs::read_dir(&uploads)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !opened.is_empty(),
        "uploads had started when the copy was cancelled"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for session in &opened {
        loop {
            let deleted = internal.access_log().iter().any(|e| {
                e.method == "DELETE" && e.path.contains(&format!("/blobs/uploads/{session}"))
            });
            if deleted {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "upload session {session} was never cancelled"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
