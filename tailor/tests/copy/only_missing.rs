//! Blobs the destination has are never fetched again; blobs elsewhere in it are mounted.

use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use tailor::copy::{BlobLedger, FetchClaim};
use tailor::manifest::Blob;
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::{TestRegistry, skopeo};

use crate::helpers::*;

#[tokio::test]
async fn a_new_version_reads_only_its_new_layer_and_config_from_upstream() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    let (v1, v2) = ImageSpec::sharing(ManifestFormat::Docker, 500, 8, 7, 128 * 1024);
    let (v1, v2) = (v1.build(), v2.build());
    hub.push("team/app:v1", &v1).await;
    hub.push("team/app:v2", &v2).await;

    let dst = |tag: &str| format!("{}/tailor/app:{tag}", internal.host());
    copy(
        &registries,
        &format!("{}/team/app:v1", hub.host()),
        &dst("s1"),
    )
    .await
    .unwrap();
    let served_before = hub.blob_bytes_served();
    assert_eq!(
        served_before,
        v1.blob_bytes(),
        "a cold copy reads every blob once"
    );

    let report = copy(
        &registries,
        &format!("{}/team/app:v2", hub.host()),
        &dst("s2"),
    )
    .await
    .unwrap();
    assert_eq!((report.blobs.copied, report.blobs.skipped), (2, 7));
    let new_layer = v2.layers.last().unwrap().size;
    assert_eq!(
        hub.blob_bytes_served() - served_before,
        new_layer + v2.config.size,
        "per the upstream access log"
    );
    assert_eq!(
        skopeo_digest(&internal, "tailor/app:s2").unwrap(),
        v2.digest
    );
}

#[tokio::test]
async fn copying_again_reads_no_blob_bytes() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Oci, 510, 4, 64 * 1024).build();
    hub.push("team/same:v1", &image).await;
    let src = format!("{}/team/same:v1", hub.host());
    copy(
        &registries,
        &src,
        &format!("{}/t/same:one", internal.host()),
    )
    .await
    .unwrap();
    let served = hub.blob_bytes_served();

    let again = copy(
        &registries,
        &src,
        &format!("{}/t/same:two", internal.host()),
    )
    .await
    .unwrap();
    assert_eq!(again.blobs.skipped, 5);
    assert_eq!(again.bytes_copied, 0);
    assert_eq!(hub.blob_bytes_served(), served);
    assert_eq!(
        skopeo_digest(&internal, "t/same:two").unwrap(),
        image.digest
    );
}

/// A ledger that claims every blob is in one repository, and remembers what was recorded.
struct FixedLedger {
    repository: String,
    recorded: Mutex<Vec<(String, String)>>,
}

impl BlobLedger for FixedLedger {
    fn mount_sources<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async move { vec!["no/such-repo".to_owned(), self.repository.clone()] })
    }

    fn record<'a>(
        &'a self,
        blob: &'a Blob,
        repository: &'a str,
        _origin: &'a str,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.recorded
                .lock()
                .unwrap()
                .push((blob.digest.clone(), repository.to_owned()))
        })
    }
}

#[tokio::test]
async fn blobs_held_by_another_internal_repository_are_mounted_not_fetched() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    let (a, b) = ImageSpec::sharing(ManifestFormat::Oci, 520, 4, 3, 64 * 1024);
    let (a, b) = (a.build(), b.build());
    hub.push("base/a:v1", &a).await;
    hub.push("base/b:v1", &b).await;
    copy(
        &registries,
        &format!("{}/base/a:v1", hub.host()),
        &format!("{}/apps/one:s", internal.host()),
    )
    .await
    .unwrap();
    let served = hub.blob_bytes_served();

    let ledger = Arc::new(FixedLedger {
        repository: "apps/one".into(),
        recorded: Mutex::new(Vec::new()),
    });
    let report = copy_with(
        &registries,
        &format!("{}/base/b:v1", hub.host()),
        &format!("{}/apps/two:s", internal.host()),
        with_ledger(ledger.clone()),
    )
    .await
    .unwrap();
    // A declined mount (from a repository without the blob) fell back to an upload session.
    assert_eq!(
        (report.blobs.mounted, report.blobs.copied),
        (3, 2),
        "{report:?}"
    );
    let fetched = b.config.size + b.layers[3].size;
    assert_eq!(hub.blob_bytes_served() - served, fetched);
    assert_eq!(ledger.recorded.lock().unwrap().len(), 5);
    let mounts = internal
        .access_log()
        .iter()
        .filter(|e| e.method == "POST" && e.path.contains("mount=") && e.status == 201)
        .count();
    assert_eq!(
        mounts, 3,
        "the internal registry saw three successful mounts"
    );
    assert_eq!(skopeo_digest(&internal, "apps/two:s").unwrap(), b.digest);
    let layout = tempfile::tempdir().unwrap();
    skopeo::copy_to_oci_layout(
        &format!("{}/apps/two:s", internal.host()),
        None,
        layout.path(),
        false,
    )
    .unwrap();
}

/// A ledger in which another copy finishes fetching each blob (and records it in `repository`)
/// exactly between this copy's first look at the index and its claim to fetch the blob.
struct LateLedger {
    repository: String,
    claimed: Mutex<std::collections::HashSet<String>>,
}

impl BlobLedger for LateLedger {
    fn mount_sources<'a>(&'a self, digest: &'a str, _: &'a str) -> BoxFuture<'a, Vec<String>> {
        let finished = self.claimed.lock().unwrap().contains(digest);
        Box::pin(async move {
            if finished {
                vec![self.repository.clone()]
            } else {
                Vec::new()
            }
        })
    }

    fn record<'a>(&'a self, _: &'a Blob, _: &'a str, _: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    fn claim_fetch<'a>(&'a self, digest: &'a str, _: &'a str) -> BoxFuture<'a, FetchClaim> {
        self.claimed.lock().unwrap().insert(digest.to_owned());
        Box::pin(async { FetchClaim::Mine(Box::new(())) })
    }
}

#[tokio::test]
async fn a_blob_another_copy_recorded_just_before_this_copys_claim_is_mounted_not_fetched_again() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let registries = registries(&[hub.host(), internal.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Oci, 540, 3, 64 * 1024).build();
    hub.push("base/late:v1", &image).await;
    let src = format!("{}/base/late:v1", hub.host());
    copy(
        &registries,
        &src,
        &format!("{}/apps/first:s", internal.host()),
    )
    .await
    .unwrap();
    let served = hub.blob_bytes_served();

    let ledger = Arc::new(LateLedger {
        repository: "apps/first".into(),
        claimed: Mutex::new(Default::default()),
    });
    let report = copy_with(
        &registries,
        &src,
        &format!("{}/apps/second:s", internal.host()),
        with_ledger(ledger),
    )
    .await
    .unwrap();
    assert_eq!(
        (report.blobs.mounted, report.blobs.copied),
        (4, 0),
        "{report:?}"
    );
    // The source is asked whether it has each blob (HEAD), never for its bytes.
    assert_eq!(hub.blob_bytes_served(), served);
    assert_eq!(
        skopeo_digest(&internal, "apps/second:s").unwrap(),
        image.digest
    );
}

#[tokio::test]
async fn within_one_registry_blobs_are_mounted_from_the_source_repository() {
    let registry = TestRegistry::anonymous();
    let registries = registries(&[registry.host()]);
    let image = ImageSpec::seeded(ManifestFormat::Docker, 530, 2, 4096).build();
    registry.push("src/app:v1", &image).await;

    let report = copy(
        &registries,
        &format!("{}/src/app:v1", registry.host()),
        &format!("{}/dst/app:v1", registry.host()),
    )
    .await
    .unwrap();
    assert_eq!(report.blobs.mounted, 3);
    // Nothing is fetched to copy; the config alone is read back, to check its platform.
    assert_eq!(registry.blob_bytes_served_settled(), image.config.size);
}
