//! Synthetic, valid container images, deterministic from seeds.
//!
//! A layer is a gzip'ed tar holding one file of pseudo-random bytes derived from the layer's
//! seed, so equal `(seed, size)` means an identical blob and different seeds never collide:
//! that is how two images are made to share exactly k layers. The config's `rootfs.diff_ids`
//! are the sha256 of each uncompressed tar, as a real image's are. Layers above
//! [`IN_MEMORY_LIMIT`] are written to a temporary file while being hashed and are pushed from
//! it as a stream, so a GiB-sized image never sits in memory.

use std::io::{Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use flate2::Compression;
use serde_json::json;
use sha2::{Digest, Sha256};

/// Layers larger than this are built on disk rather than in memory.
pub const IN_MEMORY_LIMIT: u64 = 8 * 1024 * 1024;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Docker schema2 (and manifest lists) or OCI (and indexes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestFormat {
    Docker,
    Oci,
}

impl ManifestFormat {
    pub fn manifest_media_type(self) -> &'static str {
        match self {
            Self::Docker => DOCKER_MANIFEST,
            Self::Oci => OCI_MANIFEST,
        }
    }

    pub fn index_media_type(self) -> &'static str {
        match self {
            Self::Docker => DOCKER_MANIFEST_LIST,
            Self::Oci => OCI_INDEX,
        }
    }

    fn config_media_type(self) -> &'static str {
        match self {
            Self::Docker => DOCKER_CONFIG,
            Self::Oci => OCI_CONFIG,
        }
    }

    fn layer_media_type(self) -> &'static str {
        match self {
            Self::Docker => DOCKER_LAYER,
            Self::Oci => OCI_LAYER,
        }
    }
}

/// os/architecture[/variant].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn linux_amd64() -> Self {
        Self::parse("linux/amd64")
    }

    /// `os/arch[/variant]`; panics on anything else (test input is ours).
    pub fn parse(text: &str) -> Self {
        let parts: Vec<&str> = text.split('/').collect();
        assert!(
            (2..=3).contains(&parts.len()),
            "platform {text:?} is not os/arch[/variant]"
        );
        Self {
            os: parts[0].into(),
            architecture: parts[1].into(),
            variant: parts.get(2).map(|v| v.to_string()),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let mut value = json!({ "os": self.os, "architecture": self.architecture });
        if let Some(variant) = &self.variant {
            value["variant"] = json!(variant);
        }
        value
    }
}

/// One layer: `size` bytes of content determined by `seed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpec {
    pub seed: u64,
    pub size: u64,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub format: ManifestFormat,
    pub platform: Platform,
    pub layers: Vec<LayerSpec>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub exposed_ports: Vec<String>,
    pub user: Option<String>,
    pub working_dir: Option<String>,
}

impl ImageSpec {
    /// `n` layers of `size` bytes, seeded from `seed`, with a web-app-like config.
    pub fn seeded(format: ManifestFormat, seed: u64, n: usize, size: u64) -> Self {
        let layers = (0..n as u64)
            .map(|i| LayerSpec {
                seed: seed.wrapping_mul(1_000_003).wrapping_add(i),
                size,
            })
            .collect();
        Self {
            format,
            platform: Platform::linux_amd64(),
            layers,
            entrypoint: Some(vec!["/bin/app".into()]),
            cmd: Some(vec!["--port".into(), "8080".into()]),
            exposed_ports: vec!["8080/tcp".into()],
            user: Some("1000".into()),
            working_dir: Some("/srv".into()),
        }
    }

    /// Two images of `n` layers each whose first `shared` layers are identical and whose
    /// other layers all differ.
    pub fn sharing(
        format: ManifestFormat,
        seed: u64,
        n: usize,
        shared: usize,
        size: u64,
    ) -> (Self, Self) {
        assert!(shared <= n, "cannot share {shared} of {n} layers");
        let first = Self::seeded(format, seed, n, size);
        let mut second = first.clone();
        for (i, layer) in second.layers.iter_mut().enumerate().skip(shared) {
            layer.seed ^= 0x5eed_0000_0000_0000 ^ ((i as u64) << 32);
        }
        (first, second)
    }

    pub fn with_platform(mut self, platform: &str) -> Self {
        self.platform = Platform::parse(platform);
        self
    }

    /// Builds every blob and the manifest. CPU-bound; large images take seconds.
    pub fn build(&self) -> BuiltImage {
        let layers: Vec<(Blob, String)> = self
            .layers
            .iter()
            .map(|l| build_layer(*l, self.format))
            .collect();
        let diff_ids: Vec<&String> = layers.iter().map(|(_, diff_id)| diff_id).collect();
        let mut container_config = json!({ "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"] });
        if let Some(entrypoint) = &self.entrypoint {
            container_config["Entrypoint"] = json!(entrypoint);
        }
        if let Some(cmd) = &self.cmd {
            container_config["Cmd"] = json!(cmd);
        }
        if !self.exposed_ports.is_empty() {
            let ports: serde_json::Map<String, serde_json::Value> = self
                .exposed_ports
                .iter()
                .map(|p| (p.clone(), json!({})))
                .collect();
            container_config["ExposedPorts"] = json!(ports);
        }
        if let Some(user) = &self.user {
            container_config["User"] = json!(user);
        }
        if let Some(dir) = &self.working_dir {
            container_config["WorkingDir"] = json!(dir);
        }
        let mut config = json!({
            "created": "1970-01-01T00:00:00Z",
            "architecture": self.platform.architecture,
            "os": self.platform.os,
            "config": container_config,
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": self.layers.iter().map(|l| json!({
                "created": "1970-01-01T00:00:00Z",
                "created_by": format!("testkit layer seed={} size={}", l.seed, l.size),
            })).collect::<Vec<_>>(),
        });
        if let Some(variant) = &self.platform.variant {
            config["variant"] = json!(variant);
        }
        let config = Blob::in_memory(
            serde_json::to_vec(&config).expect("config serialises"),
            self.format.config_media_type(),
        );
        let layers: Vec<Blob> = layers.into_iter().map(|(blob, _)| blob).collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": self.format.manifest_media_type(),
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        // Pretty-printed on purpose: a client that re-serialises instead of copying the exact
        // bytes changes the digest and fails the tests.
        let manifest =
            Bytes::from(serde_json::to_vec_pretty(&manifest).expect("manifest serialises"));
        BuiltImage {
            digest: crate::sha256_digest(&manifest),
            media_type: self.format.manifest_media_type(),
            manifest,
            platform: self.platform.clone(),
            config,
            layers,
        }
    }
}

/// A multi-platform image: a Docker manifest list or an OCI index.
#[derive(Debug, Clone)]
pub struct IndexSpec {
    pub format: ManifestFormat,
    pub children: Vec<ImageSpec>,
}

impl IndexSpec {
    /// One child per platform, each with its own `n` layers of `size` bytes.
    pub fn seeded(
        format: ManifestFormat,
        seed: u64,
        platforms: &[&str],
        n: usize,
        size: u64,
    ) -> Self {
        let children = platforms
            .iter()
            .enumerate()
            .map(|(i, p)| {
                ImageSpec::seeded(format, seed.wrapping_add(i as u64 * 7919), n, size)
                    .with_platform(p)
            })
            .collect();
        Self { format, children }
    }

    pub fn build(&self) -> BuiltIndex {
        let children: Vec<BuiltImage> = self
            .children
            .iter()
            .map(|child| {
                ImageSpec {
                    format: self.format,
                    ..child.clone()
                }
                .build()
            })
            .collect();
        let index = json!({
            "schemaVersion": 2,
            "mediaType": self.format.index_media_type(),
            "manifests": children.iter().map(|c| json!({
                "mediaType": c.media_type,
                "size": c.manifest.len(),
                "digest": c.digest,
                "platform": c.platform.to_json(),
            })).collect::<Vec<_>>(),
        });
        let manifest = Bytes::from(serde_json::to_vec_pretty(&index).expect("index serialises"));
        BuiltIndex {
            digest: crate::sha256_digest(&manifest),
            media_type: self.format.index_media_type(),
            manifest,
            children,
        }
    }
}

/// Where a blob's bytes are.
#[derive(Debug, Clone)]
pub enum BlobData {
    Memory(Bytes),
    /// A temporary file, deleted when the last handle goes.
    File(Arc<tempfile::TempPath>),
}

/// A content-addressed blob ready to push.
#[derive(Debug, Clone)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
    pub media_type: &'static str,
    pub data: BlobData,
}

impl Blob {
    fn in_memory(bytes: Vec<u8>, media_type: &'static str) -> Self {
        Self {
            digest: crate::sha256_digest(&bytes),
            size: bytes.len() as u64,
            media_type,
            data: BlobData::Memory(Bytes::from(bytes)),
        }
    }

    /// The OCI descriptor `{mediaType, size, digest}`.
    pub fn descriptor(&self) -> serde_json::Value {
        json!({ "mediaType": self.media_type, "size": self.size, "digest": self.digest })
    }
}

/// A built single-platform image.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub manifest: Bytes,
    pub media_type: &'static str,
    pub digest: String,
    pub platform: Platform,
    pub config: Blob,
    pub layers: Vec<Blob>,
}

impl BuiltImage {
    /// Config plus layers.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(&self.layers)
    }

    /// Bytes of all blobs: what a cold copy must read.
    pub fn blob_bytes(&self) -> u64 {
        self.blobs().map(|b| b.size).sum()
    }
}

/// A built multi-platform image.
#[derive(Debug, Clone)]
pub struct BuiltIndex {
    pub manifest: Bytes,
    pub media_type: &'static str,
    pub digest: String,
    pub children: Vec<BuiltImage>,
}

/// Passes bytes through while hashing and counting them.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    fn finish(self) -> (W, String, u64) {
        (
            self.inner,
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.written,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `remaining` pseudo-random bytes; byte `i` depends only on `(seed, i)`.
struct SeededBytes {
    seed: u64,
    position: u64,
    remaining: u64,
}

impl Read for SeededBytes {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.remaining as usize);
        let mut filled = 0;
        while filled < n {
            let word =
                splitmix64(self.seed ^ (self.position / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15))
                    .to_le_bytes();
            let offset = (self.position % 8) as usize;
            let take = (8 - offset).min(n - filled);
            buf[filled..filled + take].copy_from_slice(&word[offset..offset + take]);
            filled += take;
            self.position += take as u64;
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Writes the layer's gzip'ed tar into `sink`; returns the sink, diff_id, digest and size.
fn write_layer<W: Write>(spec: LayerSpec, sink: W, level: Compression) -> (W, String, String, u64) {
    let compressed = HashingWriter::new(sink);
    // A fixed gzip header (no name, mtime 0) keeps the blob's digest reproducible.
    let gzip = flate2::GzBuilder::new().mtime(0).write(compressed, level);
    let mut tar = tar::Builder::new(HashingWriter::new(gzip));
    let dir = format!("layer-{:016x}", spec.seed);
    let note = format!("testkit layer, seed {}, {} bytes\n", spec.seed, spec.size);
    append_file(
        &mut tar,
        &format!("{dir}/README"),
        note.len() as u64,
        note.as_bytes(),
    );
    append_file(
        &mut tar,
        &format!("{dir}/data.bin"),
        spec.size,
        SeededBytes {
            seed: spec.seed,
            position: 0,
            remaining: spec.size,
        },
    );
    let uncompressed = tar.into_inner().expect("finish the tar");
    let (gzip, diff_id, _) = uncompressed.finish();
    let compressed: HashingWriter<W> = gzip.finish().expect("finish the gzip stream");
    let (sink, digest, size) = compressed.finish();
    (sink, diff_id, digest, size)
}

fn append_file<W: Write>(tar: &mut tar::Builder<W>, path: &str, size: u64, data: impl Read) {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, path, data)
        .expect("append to the tar");
}

fn build_layer(spec: LayerSpec, format: ManifestFormat) -> (Blob, String) {
    let media_type = format.layer_media_type();
    if spec.size <= IN_MEMORY_LIMIT {
        let (bytes, diff_id, digest, size) = write_layer(spec, Vec::new(), Compression::fast());
        let blob = Blob {
            digest,
            size,
            media_type,
            data: BlobData::Memory(Bytes::from(bytes)),
        };
        return (blob, diff_id);
    }
    // Large layers: stored (level 0) deflate keeps building a GiB fast; it is still valid gzip.
    let file = tempfile::NamedTempFile::new().expect("temporary layer file");
    let (file, path) = file.into_parts();
    let (writer, diff_id, digest, size) = write_layer(
        spec,
        std::io::BufWriter::with_capacity(1 << 20, file),
        Compression::none(),
    );
    writer
        .into_inner()
        .expect("flush the layer file")
        .sync_all()
        .ok();
    let blob = Blob {
        digest,
        size,
        media_type,
        data: BlobData::File(Arc::new(path)),
    };
    (blob, diff_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_are_reproducible() {
        let spec = ImageSpec::seeded(ManifestFormat::Oci, 7, 2, 1000);
        assert_eq!(spec.build().digest, spec.build().digest);
    }

    #[test]
    fn sharing_shares_exactly_k_layers() {
        let (a, b) = ImageSpec::sharing(ManifestFormat::Docker, 1, 5, 3, 2048);
        let (a, b) = (a.build(), b.build());
        let shared = a
            .layers
            .iter()
            .filter(|l| b.layers.iter().any(|m| m.digest == l.digest))
            .count();
        assert_eq!(shared, 3);
    }

    #[test]
    fn diff_ids_match_the_uncompressed_layers() {
        let image = ImageSpec::seeded(ManifestFormat::Docker, 3, 2, 4096).build();
        let config: serde_json::Value = match &image.config.data {
            BlobData::Memory(bytes) => serde_json::from_slice(bytes).unwrap(),
            BlobData::File(_) => unreachable!(),
        };
        for (layer, diff_id) in image
            .layers
            .iter()
            .zip(config["rootfs"]["diff_ids"].as_array().unwrap())
        {
            let BlobData::Memory(bytes) = &layer.data else {
                unreachable!()
            };
            let mut tar = Vec::new();
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_end(&mut tar)
                .unwrap();
            assert_eq!(crate::sha256_digest(&tar), diff_id.as_str().unwrap());
            assert_eq!(crate::sha256_digest(bytes), layer.digest);
        }
    }

    #[test]
    fn seeded_bytes_do_not_depend_on_read_sizes() {
        let mut whole = vec![0u8; 100];
        SeededBytes {
            seed: 9,
            position: 0,
            remaining: 100,
        }
        .read_exact(&mut whole)
        .unwrap();
        let mut pieces = Vec::new();
        let mut reader = SeededBytes {
            seed: 9,
            position: 0,
            remaining: 100,
        };
        let mut buf = [0u8; 3];
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            pieces.extend_from_slice(&buf[..n]);
        }
        assert_eq!(whole, pieces);
    }
}
