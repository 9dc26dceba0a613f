//! Resuming inside a blob: a layer cut part-way is continued from its last checkpointed chunk
//! (the upload session's bytes stay, the source is asked for the rest with `Range`), and where
//! either side cannot continue, the blob starts again cleanly. The upstream is a real registry
//! behind a proxy that cuts the connection, or a hostile server that serves no ranges; what was
//! read upstream is counted by the registry's own access log.

use serde_json::{Value, json};
use testkit::fault_proxy::{FaultProxy, Rule as ProxyRule};
use testkit::hostile_registry::{HostileRegistry, Misbehaviour, Rule};
use testkit::image::{BuiltImage, ImageSpec, ManifestFormat};
use testkit::{TestRegistry, skopeo};
use uuid::Uuid;

use crate::helpers::{AppOptions, TestApp, spawn};

const MIB: u64 = 1024 * 1024;

/// One layer of 12 MiB, uploaded in 1 MiB chunks.
fn big_image(seed: u64) -> BuiltImage {
    ImageSpec::seeded(ManifestFormat::Oci, seed, 1, 12 * MIB).build()
}

async fn app_with(hub: Option<TestRegistry>, insecure: Vec<String>) -> TestApp {
    spawn(
        AppOptions {
            workers: 1,
            hub,
            also_insecure: insecure,
            ..AppOptions::default()
        }
        .env("TAILOR_UPLOAD_CHUNK_MIB", "1"),
    )
    .await
}

async fn staged(app: &TestApp, image: &str) -> Value {
    let (status, body) = app
        .stage(json!({ "app_guid": Uuid::new_v4(), "image": image }))
        .await;
    assert_eq!(status, 202, "{body}");
    app.wait_finished(body["staging_guid"].as_str().unwrap())
        .await
}

async fn checkpoints(app: &TestApp) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM blob_uploads")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// Upload sessions the internal registry still keeps: `_uploads/<id>` directories holding
/// `data`. (distribution may write a cancelled session's `hashstates` once more after the
/// cancel, when the session's previous request closes late; its upload purge removes those.)
fn open_uploads(registry: &TestRegistry) -> usize {
    let root = registry
        .embedded()
        .storage_dir()
        .join("docker/registry/v2/repositories");
    let mut open = 0;
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_name() == "_uploads" {
                open += std::fs::read_dir(&path)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|session| session.path().join("data").exists())
                    .count();
            } else if path.is_dir() {
                dirs.push(path);
            }
        }
    }
    open
}

/// Waits (10 s at most) until the internal registry keeps no upload session.
async fn no_open_uploads(registry: &TestRegistry) -> usize {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let open = open_uploads(registry);
        if open == 0 || tokio::time::Instant::now() > deadline {
            return open;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_layer_cut_part_way_resumes_from_its_last_chunk_not_its_first_byte() {
    let hub = TestRegistry::anonymous();
    let image = big_image(7100);
    hub.push("library/big:1", &image).await;
    let proxy = FaultProxy::start(&hub.base_url());
    let layer = &image.layers[0];
    // Cut half-way through the 8th chunk: seven chunks are checkpointed.
    proxy.add(ProxyRule::cut_after(&layer.digest, 7 * MIB + MIB / 2).times(1));
    let app = app_with(Some(hub), vec![proxy.host()]).await;

    let done = staged(&app, &format!("{}/library/big:1", proxy.host())).await;

    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(proxy.answered().len(), 1, "the cut happened");
    let pinned = done["result"]["pinned_image"].as_str().unwrap();
    assert_eq!(skopeo::digest(pinned, None).unwrap(), image.digest);
    let layout = tempfile::tempdir().unwrap();
    skopeo::copy_to_oci_layout(pinned, None, layout.path(), false).unwrap();
    // The rest was asked for by range, and upstream served the layer about once in all.
    let ranged: Vec<_> = app
        .hub
        .access_log()
        .into_iter()
        .filter(|e| e.is_blob_get() && e.path.contains(&layer.digest) && e.status == 206)
        .collect();
    assert_eq!(ranged.len(), 1, "{ranged:?}");
    assert_eq!(
        ranged[0].bytes,
        layer.size - 7 * MIB,
        "the rest from the last checkpoint, and only that"
    );
    let layer_reads = app
        .hub
        .access_log()
        .into_iter()
        .filter(|e| e.is_blob_get() && e.path.contains(&layer.digest))
        .count();
    assert_eq!(
        layer_reads, 2,
        "the cut read and the rest; never the layer again whole"
    );
    assert_eq!(
        checkpoints(&app).await,
        0,
        "the done blob's checkpoint is gone"
    );
    assert_eq!(no_open_uploads(app.internal()).await, 0);
}

#[tokio::test]
async fn a_source_that_serves_no_ranges_has_the_blob_read_again_whole() {
    let hostile = HostileRegistry::start();
    let image = big_image(7200);
    hostile.add_image("library/big", "1", &image);
    let layer = image.layers[0].clone();
    hostile.add_rule(
        Rule::new(
            &layer.digest,
            Misbehaviour::CloseMidBody {
                after_bytes: 7 * MIB + MIB / 2,
            },
        )
        .method("GET")
        .times(1),
    );
    let app = app_with(None, vec![hostile.host()]).await;

    let done = staged(&app, &format!("{}/library/big:1", hostile.host())).await;

    assert_eq!(done["state"], "succeeded", "{done}");
    let pinned = done["result"]["pinned_image"].as_str().unwrap();
    assert_eq!(skopeo::digest(pinned, None).unwrap(), image.digest);
    let layout = tempfile::tempdir().unwrap();
    skopeo::copy_to_oci_layout(pinned, None, layout.path(), false).unwrap();
    let gets = hostile
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.contains(&layer.digest))
        .count();
    assert_eq!(gets, 2, "the cut read, then the whole blob once");
    // The checkpointed session was cancelled, not left behind, and nothing is left to resume.
    assert_eq!(checkpoints(&app).await, 0);
    assert_eq!(no_open_uploads(app.internal()).await, 0);
}

/// An upstream registry behind a proxy that cuts the layer's first read in its 8th chunk
/// (seven checkpointed) and answers the layer's next requests with `then`, in order.
async fn cut_then(
    seed: u64,
    then: impl Fn(&testkit::image::Blob) -> Vec<ProxyRule>,
) -> (TestApp, FaultProxy, BuiltImage) {
    let hub = TestRegistry::anonymous();
    let image = big_image(seed);
    hub.push("library/big:1", &image).await;
    let proxy = FaultProxy::start(&hub.base_url());
    let layer = &image.layers[0];
    proxy.add(ProxyRule::cut_after(&layer.digest, 7 * MIB + MIB / 2).times(1));
    for rule in then(layer) {
        proxy.add(rule.times(1));
    }
    let app = app_with(Some(hub), vec![proxy.host()]).await;
    (app, proxy, image)
}

/// A canned answer for the layer: `status`, `content-range` (if any), and `body`.
fn canned(
    layer: &testkit::image::Blob,
    status: u16,
    range: Option<String>,
    body: Vec<u8>,
) -> ProxyRule {
    let rule = ProxyRule::new(&layer.digest, status).body(body);
    match range {
        Some(range) => rule.header("content-range", &range),
        None => rule,
    }
}

/// The rest from the checkpoint (byte 7 MiB on), as asked, but not the layer's bytes.
fn wrong_rest(layer: &testkit::image::Blob) -> ProxyRule {
    let from = 7 * MIB;
    let range = format!("bytes {from}-{}/{}", layer.size - 1, layer.size);
    canned(
        layer,
        206,
        Some(range),
        vec![0u8; (layer.size - from) as usize],
    )
}

#[tokio::test]
async fn a_rest_that_does_not_continue_the_uploaded_bytes_is_caught_and_the_layer_read_whole() {
    let (app, proxy, image) = cut_then(7300, |layer| vec![wrong_rest(layer)]).await;

    let done = staged(&app, &format!("{}/library/big:1", proxy.host())).await;

    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(proxy.answered().len(), 2, "the cut, then the wrong rest");
    let pinned = done["result"]["pinned_image"].as_str().unwrap();
    let layout = tempfile::tempdir().unwrap();
    skopeo::copy_to_oci_layout(pinned, None, layout.path(), false).unwrap();
    let layer = &image.layers[0];
    // The registry saw the cut read and one more from byte 0 (the wrong rest was the proxy's).
    // How many bytes it logged for the cut one depends on socket buffers, so statuses count.
    let reads: Vec<u16> = app
        .hub
        .access_log()
        .into_iter()
        .filter(|e| e.is_blob_get() && e.path.contains(&layer.digest))
        .map(|e| e.status)
        .collect();
    assert_eq!(
        reads,
        vec![200, 200],
        "after the rest failed to verify, one read from byte 0"
    );
    assert_eq!(checkpoints(&app).await, 0);
    assert_eq!(
        no_open_uploads(app.internal()).await,
        0,
        "the bad session was cancelled"
    );
}

#[tokio::test]
async fn a_source_that_lies_after_a_resume_fails_the_staging_and_leaves_nothing() {
    let (app, proxy, _) = cut_then(7400, |layer| {
        let mut lie = vec![0u8; layer.size as usize];
        lie[0] = 1;
        vec![wrong_rest(layer), canned(layer, 200, None, lie)]
    })
    .await;

    let done = staged(&app, &format!("{}/library/big:1", proxy.host())).await;

    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "DIGEST_MISMATCH", "{done}");
    assert_eq!(
        proxy.answered().len(),
        3,
        "the cut, the wrong rest, the wrong whole"
    );
    assert_eq!(
        checkpoints(&app).await,
        0,
        "no checkpoint of bytes that do not verify"
    );
    assert_eq!(
        no_open_uploads(app.internal()).await,
        0,
        "every session was cancelled"
    );
}

#[tokio::test]
async fn a_source_that_refuses_the_range_has_the_layer_read_again_whole() {
    let (app, proxy, image) =
        cut_then(7500, |layer| vec![canned(layer, 416, None, Vec::new())]).await;

    let done = staged(&app, &format!("{}/library/big:1", proxy.host())).await;

    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(proxy.answered().len(), 2, "the cut, then the refused range");
    let pinned = done["result"]["pinned_image"].as_str().unwrap();
    assert_eq!(skopeo::digest(pinned, None).unwrap(), image.digest);
    let layout = tempfile::tempdir().unwrap();
    skopeo::copy_to_oci_layout(pinned, None, layout.path(), false).unwrap();
    assert_eq!(checkpoints(&app).await, 0);
    assert_eq!(
        no_open_uploads(app.internal()).await,
        0,
        "the checkpoint's session was cancelled"
    );
}
