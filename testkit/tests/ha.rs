//! The internal registry's HA shape, end to end with real components: two distribution
//! instances on one SeaweedFS bucket behind an nginx TLS load balancer. Images pushed through
//! the load balancer are read back byte for byte by skopeo, through it and from each instance
//! directly; losing either instance (SIGKILL) loses neither pushes nor pulls; and the bucket
//! holds each blob exactly once however many instances and images wrote it.

use std::collections::BTreeMap;
use std::path::Path;

use testkit::image::{BlobData, BuiltImage, ImageSpec, ManifestFormat};
use testkit::skopeo::{self, SkopeoOptions};
use testkit::{HaRegistry, PushAuth, PushOptions, push_image_with};

/// Several layers of a few hundred KiB to 1.5 MiB: a few MiB per image, with the first two
/// layers of `first` and `second` shared (so the same blob is pushed through both instances).
fn images() -> [(&'static str, BuiltImage); 3] {
    const LAYER: u64 = 1536 * 1024;
    let (first, second) = ImageSpec::sharing(ManifestFormat::Oci, 41, 4, 2, LAYER);
    let mut third = ImageSpec::seeded(ManifestFormat::Oci, 42, 3, LAYER / 3);
    third.layers[0] = first.layers[0];
    [
        ("ha/first:v1", first.build()),
        ("ha/second:v1", second.build()),
        ("ha/third:v1", third.build()),
    ]
}

async fn push(ha: &HaRegistry, repository_tag: &str, image: &BuiltImage) {
    let (repository, tag) = repository_tag.rsplit_once(':').unwrap();
    let digest = push_image_with(
        &ha.base_url(),
        repository,
        tag,
        image,
        &PushAuth::Anonymous,
        &PushOptions::https(ha.ca_pem_path()),
    )
    .await;
    assert_eq!(digest, image.digest);
}

/// skopeo copies `host/repository_tag` into an OCI layout (verifying every digest on the way);
/// the layout must then hold exactly the manifest, config and layer bytes that were pushed.
fn assert_pulls_byte_exact(
    host: &str,
    repository_tag: &str,
    image: &BuiltImage,
    options: &SkopeoOptions,
) {
    let reference = format!("{host}/{repository_tag}");
    let raw = skopeo::inspect_raw_with(&reference, None, options)
        .unwrap_or_else(|e| panic!("inspect {reference}: {e}"));
    assert!(
        raw == image.manifest,
        "{reference}: skopeo read other manifest bytes"
    );
    let layout = tempfile::tempdir().unwrap();
    skopeo::copy_to_oci_layout_with(&reference, None, layout.path(), false, options)
        .unwrap_or_else(|e| panic!("pull {reference}: {e}"));
    let blob_path = |digest: &str| {
        layout
            .path()
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap())
    };
    assert_eq!(
        std::fs::read(blob_path(&image.digest)).unwrap(),
        image.manifest,
        "{reference}: the layout's manifest"
    );
    for blob in image.blobs() {
        let pulled = std::fs::read(blob_path(&blob.digest))
            .unwrap_or_else(|e| panic!("{reference}: blob {} not pulled: {e}", blob.digest));
        assert!(
            pulled == pushed_bytes(&blob.data),
            "{reference}: blob {} differs from what was pushed",
            blob.digest
        );
    }
}

fn pushed_bytes(data: &BlobData) -> Vec<u8> {
    match data {
        BlobData::Memory(bytes) => bytes.to_vec(),
        BlobData::File(path) => std::fs::read(AsRef::<Path>::as_ref(path.as_ref())).unwrap(),
    }
}

/// Requests the load balancer failed over from `dead` (`host:port`) to another instance,
/// among its access log lines from `from_line` on.
fn failovers_from(ha: &HaRegistry, dead: &str, from_line: usize) -> Vec<String> {
    ha.load_balancer()
        .access_log_lines()
        .into_iter()
        .skip(from_line)
        .filter(|line| {
            line.split("upstream=")
                .nth(1)
                .is_some_and(|upstreams| upstreams.starts_with(&format!("{dead}, ")))
        })
        .collect()
}

#[tokio::test]
async fn images_pushed_through_the_load_balancer_survive_losing_either_instance() {
    let mut ha = HaRegistry::start(2);
    let [first, second, third] = images();
    let via_lb = SkopeoOptions::https(ha.cert_dir());
    let direct = SkopeoOptions::default();

    // Pushed through the load balancer, readable through it and from each instance alone:
    // they share one bucket, and uploads opened on one were finished on the other.
    push(&ha, first.0, &first.1).await;
    assert_pulls_byte_exact(&ha.host(), first.0, &first.1, &via_lb);
    for i in 0..ha.instances() {
        assert_pulls_byte_exact(&ha.instance_host(i), first.0, &first.1, &direct);
    }
    let served: Vec<usize> = ha.access_logs().iter().map(Vec::len).collect();
    assert!(
        served.iter().all(|&requests| requests > 0),
        "the load balancer spread requests over both instances: {served:?}"
    );

    // Instance 0 dies: pushes and pulls through the load balancer carry on, on instance 1.
    let dead = ha.instance_host(0);
    let lines_before = ha.load_balancer().access_log_lines().len();
    ha.kill(0);
    push(&ha, second.0, &second.1).await;
    for (name, image) in [&first, &second] {
        assert_pulls_byte_exact(&ha.host(), name, image, &via_lb);
    }
    assert!(
        !failovers_from(&ha, &dead, lines_before).is_empty(),
        "requests sent to the dead instance were passed to the live one:\n{}",
        ha.load_balancer().access_log_lines()[lines_before..].join("\n")
    );

    // Instance 0 comes back and serves what was pushed while it was down; then instance 1 dies.
    ha.restart(0);
    assert_pulls_byte_exact(&ha.instance_host(0), second.0, &second.1, &direct);
    let dead = ha.instance_host(1);
    let lines_before = ha.load_balancer().access_log_lines().len();
    ha.kill(1);
    push(&ha, third.0, &third.1).await;
    for (name, image) in [&first, &second, &third] {
        assert_pulls_byte_exact(&ha.host(), name, image, &via_lb);
    }
    assert!(
        !failovers_from(&ha, &dead, lines_before).is_empty(),
        "requests sent to the dead instance were passed to the live one"
    );
    ha.restart(1);
    assert_pulls_byte_exact(&ha.instance_host(1), third.0, &third.1, &direct);

    // Every blob is in the bucket once, at its size, and nothing else is: shared layers pushed
    // through both instances were stored once, and the failovers left no stray blob. The
    // registry keeps manifests in the blob store too.
    let expected: BTreeMap<String, u64> = [&first, &second, &third]
        .iter()
        .flat_map(|(_, image)| {
            let manifest = (image.digest.clone(), image.manifest.len() as u64);
            image
                .blobs()
                .map(|b| (b.digest.clone(), b.size))
                .chain(std::iter::once(manifest))
        })
        .collect();
    let stored = ha.blob_data_objects().await;
    let stored_once: BTreeMap<String, u64> = stored.iter().cloned().collect();
    assert_eq!(
        stored.len(),
        stored_once.len(),
        "a blob stored twice: {stored:?}"
    );
    assert_eq!(stored_once, expected, "the bucket's blob data objects");
}

#[tokio::test]
async fn upload_locations_point_back_at_the_load_balancer_over_https() {
    let ha = HaRegistry::start(2);
    let client = PushOptions::https(ha.ca_pem_path()).client();
    // Two sessions opened and cancelled: four requests, which round robin spreads over both
    // instances, so sessions are cancelled by an instance that did not open them.
    for _ in 0..2 {
        let started = client
            .post(format!("{}/v2/ha/location/blobs/uploads/", ha.base_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(started.status(), reqwest::StatusCode::ACCEPTED);
        let location = started.headers()["location"].to_str().unwrap().to_owned();
        assert!(
            location.starts_with(&format!("{}/v2/ha/location/blobs/uploads/", ha.base_url())),
            "an upload Location must send the client back to the load balancer over HTTPS: \
             {location}"
        );
        // Cancelling through the load balancer works whichever instance takes it.
        let cancelled = client.delete(&location).send().await.unwrap();
        assert_eq!(cancelled.status(), reqwest::StatusCode::NO_CONTENT);
    }
    let served: Vec<usize> = ha.access_logs().iter().map(Vec::len).collect();
    assert!(
        served.iter().all(|&requests| requests > 0),
        "round robin spread the four requests over both instances: {served:?}"
    );
}

#[tokio::test]
async fn the_s3_server_serves_only_signed_requests_with_its_keys() {
    use futures_util::TryStreamExt;
    use object_store::ObjectStore;

    let s3 = testkit::s3::S3Server::start();
    assert_eq!(s3.list_objects("").await, Vec::new(), "a new, empty bucket");
    let wrong_secret = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(s3.endpoint())
        .with_region(s3.region())
        .with_bucket_name(s3.bucket())
        .with_access_key_id(s3.access_key())
        .with_secret_access_key("not-the-secret")
        .with_allow_http(true)
        .build()
        .unwrap();
    let refused = wrong_secret
        .list(None)
        .try_collect::<Vec<_>>()
        .await
        .expect_err("a listing signed with the wrong secret");
    assert!(
        refused.to_string().contains("SignatureDoesNotMatch")
            || refused.to_string().contains("403"),
        "{refused}"
    );
}
