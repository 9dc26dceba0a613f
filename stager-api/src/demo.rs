//! The demo image `stager-api embedded --demo` seeds a local upstream registry with, so that a
//! first staging works on a machine without the internet: one small file in one uncompressed
//! OCI layer, pushed through tailor's own registry API.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::json;
use tailor::manifest::{OCI_MANIFEST, RawManifest};
use tailor::registry::{Registry, RegistryError};

/// Repository and tag of the demo image in the demo registry.
pub const REPOSITORY: &str = "demo/hello";
pub const TAG: &str = "1.0";

/// The demo image's layer: a tar holding `/hello.txt`.
fn layer() -> Vec<u8> {
    let content = b"Hello from tailor's demo image.\n";
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    let mut archive = tar::Builder::new(Vec::new());
    archive
        .append_data(&mut header, "hello.txt", &content[..])
        .expect("a tar in memory");
    archive.into_inner().expect("a tar in memory")
}

/// Pushes the demo image into `registry`; returns its digest.
pub async fn seed(registry: &Arc<Registry>) -> Result<String, RegistryError> {
    let repository = registry.repository(REPOSITORY);
    let layer = Bytes::from(layer());
    let layer_digest = tailor::digest::sha256(&layer);
    let config = Bytes::from(
        json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Cmd": ["cat", "/hello.txt"],
                "WorkingDir": "/",
                "ExposedPorts": { "8080/tcp": {} },
            },
            "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        })
        .to_string(),
    );
    let config_digest = tailor::digest::sha256(&config);
    let manifest = Bytes::from(
        json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": layer.len(),
            }],
        })
        .to_string(),
    );
    for (digest, bytes) in [(&layer_digest, layer), (&config_digest, config)] {
        if repository.head_blob(digest).await?.is_none() {
            repository
                .start_upload()
                .await?
                .put_bytes(digest, bytes)
                .await?;
        }
    }
    let manifest = RawManifest::recognise(manifest, Some(OCI_MANIFEST))?;
    repository.put_manifest(TAG, &manifest).await?;
    Ok(manifest.digest)
}
