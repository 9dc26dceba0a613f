//! The HA internal registry: two distribution instances on one S3 bucket (SeaweedFS) with one
//! `http.secret`, behind an nginx TLS load balancer, with tailor and every puller talking to
//! the load balancer. Fifty stagings and fifty pulls run while one instance is killed and
//! restarted, then the other: nothing fails, every pinned image pulls byte-exact from either
//! instance, and the bucket holds each blob once.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::json;
use specs::fleet::{Fleet, FleetOptions};
use specs::{stage, wait_finished};
use testkit::image::{BuiltImage, ImageSpec, ManifestFormat};
use testkit::skopeo::{self, SkopeoOptions};
use testkit::{HaRegistry, TestDatabase, TestRegistry};
use uuid::Uuid;

const KIB: u64 = 1024;

async fn stage_all(fleet: &Fleet, hub: &TestRegistry, images: usize, count: usize) -> Vec<String> {
    let mut guids = Vec::new();
    for n in 0..count {
        let body = json!({ "app_guid": Uuid::new_v4(), "image": format!("{}/ha/app{}:v1", hub.host(), n % images) });
        guids.push(
            stage(&fleet.api, body).await["staging_guid"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    guids
}

#[tokio::test]
async fn stagings_and_pulls_go_on_while_either_registry_instance_dies() {
    let db = TestDatabase::new().await;
    let hub = TestRegistry::anonymous();
    let mut ha = HaRegistry::start(2);
    let images: Vec<BuiltImage> = (0..10)
        .map(|i| ImageSpec::seeded(ManifestFormat::Docker, 9400 + i, 2, 512 * KIB).build())
        .collect();
    for (i, image) in images.iter().enumerate() {
        hub.push(&format!("ha/app{i}:v1"), image).await;
    }
    let ca = ha.ca_pem_path().to_str().unwrap().to_owned();
    let tls = [("TAILOR_CA_CERTIFICATES".to_owned(), ca)];
    let fleet = Fleet::start(FleetOptions {
        database_url: db.url.clone(),
        internal: ha.host(),
        insecure: vec![hub.host()],
        worker_processes: 2,
        api_env: tls.to_vec(),
        worker_env: tls.to_vec(),
    });

    // Ten images staged through the load balancer before the trouble starts.
    let mut pinned = Vec::new();
    for guid in stage_all(&fleet, &hub, images.len(), 10).await {
        let done = wait_finished(&fleet.api, &guid, Duration::from_secs(120)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        pinned.push(done["result"]["pinned_image"].as_str().unwrap().to_owned());
    }

    // Fifty stagings and fifty pulls while instance 0 dies and comes back, then instance 1.
    let guids = stage_all(&fleet, &hub, images.len(), 50).await;
    let cert_dir = ha.cert_dir().to_owned();
    let pulls: Vec<_> = (0..50)
        .map(|n| {
            let (image, options) = (
                pinned[n % pinned.len()].clone(),
                SkopeoOptions::https(&cert_dir),
            );
            // A runtime retries a pull cut short by an instance that died under it (the load
            // balancer cannot replay a response already under way); each retry is counted.
            // Spread over the whole window in which the instances die and come back.
            tokio::task::spawn_blocking(move || {
                std::thread::sleep(Duration::from_millis(250 * n as u64));
                let mut failures = Vec::new();
                for attempt in 0..3u64 {
                    std::thread::sleep(Duration::from_secs(attempt * attempt));
                    let layout = tempfile::tempdir().unwrap();
                    match skopeo::copy_to_oci_layout_with(
                        &image,
                        None,
                        layout.path(),
                        false,
                        &options,
                    ) {
                        Ok(()) => return Ok(failures.len()),
                        Err(e) => failures.push(format!("{image}: {e}")),
                    }
                }
                Err(failures)
            })
        })
        .collect();
    // One at a time: the restarted instance is back in the load balancer's rotation (its
    // fail_timeout, 2 s, has passed) before the other one dies.
    tokio::time::sleep(Duration::from_millis(800)).await;
    for instance in [0, 1] {
        ha.kill(instance);
        tokio::time::sleep(Duration::from_secs(3)).await;
        ha.restart(instance);
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    let mut retried = 0;
    for pull in pulls {
        retried += pull
            .await
            .unwrap()
            .expect("a pull through the load balancer, within 3 tries");
    }
    eprintln!("50 pulls through the load balancer completed; {retried} of them needed a retry");
    for guid in &guids {
        let done = wait_finished(&fleet.api, guid, Duration::from_secs(300)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        pinned.push(done["result"]["pinned_image"].as_str().unwrap().to_owned());
    }

    // Every pinned image pulls from either instance, digest and bytes verified by skopeo.
    let expected: HashMap<&str, &str> = images
        .iter()
        .map(|i| (i.digest.as_str(), i.digest.as_str()))
        .collect();
    for (n, image) in pinned.iter().enumerate() {
        let (_, digest) = image.rsplit_once('@').unwrap();
        assert!(
            expected.contains_key(digest),
            "{image} is pinned to an upstream digest"
        );
        for instance in 0..2 {
            let direct = image.replacen(&ha.host(), &ha.instance_host(instance), 1);
            if n % 6 == 0 {
                let layout = tempfile::tempdir().unwrap();
                skopeo::copy_to_oci_layout(&direct, None, layout.path(), false)
                    .unwrap_or_else(|e| panic!("{direct}: {e}"));
            } else {
                assert_eq!(skopeo::digest(&direct, None).unwrap(), digest, "{direct}");
            }
        }
    }

    // The bucket holds each blob exactly once.
    let stored = ha.blob_data_objects().await;
    let mut seen = HashSet::new();
    for (digest, _) in &stored {
        assert!(seen.insert(digest.clone()), "{digest} is stored twice");
    }
    let wanted: HashSet<String> = images
        .iter()
        .flat_map(|i| i.blobs().map(|b| b.digest.clone()))
        .collect();
    assert!(wanted.is_subset(&seen), "every blob is in the bucket");
}

/// A layer cut part-way resumes on the HA registry as on one instance: the session lives in the
/// bucket, and whichever instance the load balancer picks for the status, the next chunks and
/// the commit accepts the session's signed state (one `http.secret`). Chunks of 8 MiB: above
/// S3's 5 MiB minimum part, which distribution's S3 driver appends by.
#[tokio::test]
async fn a_layer_cut_part_way_resumes_through_the_load_balancer_on_s3() {
    const MIB: u64 = 1024 * KIB;
    let db = TestDatabase::new().await;
    let hub = TestRegistry::anonymous();
    let ha = HaRegistry::start(2);
    let image = ImageSpec::seeded(ManifestFormat::Oci, 9500, 1, 40 * MIB).build();
    hub.push("ha/big:v1", &image).await;
    let layer = &image.layers[0];
    let link = testkit::fault_proxy::FaultProxy::start(&hub.base_url());
    // Cut in the fourth chunk: three are checkpointed.
    link.add(testkit::fault_proxy::Rule::cut_after(&layer.digest, 28 * MIB).times(1));
    let ca = ha.ca_pem_path().to_str().unwrap().to_owned();
    let tls = [("TAILOR_CA_CERTIFICATES".to_owned(), ca)];
    let mut worker_env = tls.to_vec();
    worker_env.push(("TAILOR_UPLOAD_CHUNK_MIB".into(), "8".into()));
    let fleet = Fleet::start(FleetOptions {
        database_url: db.url.clone(),
        internal: ha.host(),
        insecure: vec![link.host()],
        worker_processes: 1,
        api_env: tls.to_vec(),
        worker_env,
    });

    let body = json!({ "app_guid": Uuid::new_v4(), "image": format!("{}/ha/big:v1", link.host()) });
    let guid = stage(&fleet.api, body).await["staging_guid"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = wait_finished(&fleet.api, &guid, Duration::from_secs(300)).await;

    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(link.answered().len(), 1, "the cut happened");
    let ranged: Vec<u64> = hub
        .access_log()
        .iter()
        .filter(|e| e.is_blob_get() && e.path.contains(&layer.digest) && e.status == 206)
        .map(|e| e.bytes)
        .collect();
    assert_eq!(
        ranged,
        vec![layer.size - 24 * MIB],
        "the rest after three chunks"
    );
    let pinned = done["result"]["pinned_image"].as_str().unwrap();
    for instance in 0..2 {
        let direct = pinned.replacen(&ha.host(), &ha.instance_host(instance), 1);
        let layout = tempfile::tempdir().unwrap();
        skopeo::copy_to_oci_layout(&direct, None, layout.path(), false)
            .unwrap_or_else(|e| panic!("{direct}: {e}"));
    }
}
