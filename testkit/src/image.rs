//! Synthetic, valid container images, deterministic from seeds.
//!
//! A layer is a gzip'ed tar holding one file of pseudo-random bytes derived from the layer's
//! seed, so equal `(seed, size)` means an identical blob and different seeds never collide:
//! that is how two images are made to share exactly k layers. The config's `rootfs.diff_ids`
//! are the sha256 of each uncompressed tar, as a real image's are. Layers above
//! [`IN_MEMORY_LIMIT`] are written to a temporary file while being hashed and are pushed from
//! it as a stream, so a GiB-sized image never sits in memory.
//!
//! For tests of what an upstream may send, an [`ImageSpec`] can also carry crafted config
//! fields (any JSON, NUL and newlines included), other media types, extra manifest fields and
//! non-distributable (foreign) layers; [`ArtifactSpec`] builds OCI artifacts whose config and
//! layers are not an image's at all (a Helm chart, an SBOM).

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
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const DOCKER_FOREIGN_LAYER: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
pub const OCI_NON_DISTRIBUTABLE_LAYER: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
pub const HELM_CONFIG: &str = "application/vnd.cncf.helm.config.v1+json";
pub const HELM_CHART_CONTENT: &str = "application/vnd.cncf.helm.chart.content.v1.tar+gzip";
pub const SPDX_JSON: &str = "application/spdx+json";

/// Whether a layer of this media type is, by its type, not distributed through registries
/// (Windows base layers: Docker's "foreign" and OCI's deprecated "nondistributable" types).
pub fn is_non_distributable(media_type: &str) -> bool {
    media_type.contains(".foreign.") || media_type.contains(".nondistributable.")
}

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

    fn foreign_layer_media_type(self) -> &'static str {
        match self {
            Self::Docker => DOCKER_FOREIGN_LAYER,
            Self::Oci => OCI_NON_DISTRIBUTABLE_LAYER,
        }
    }
}

/// A `'static` copy of `text`, made once per distinct string.
///
/// [`Blob::media_type`] and [`BuiltImage::media_type`] are `&'static str` and callers across
/// the workspace rely on that; custom media types are few and small, so leaking one copy of
/// each keeps those fields as they are.
fn intern(text: &str) -> &'static str {
    static INTERNED: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut interned = INTERNED.lock().expect("intern table");
    if let Some(found) = interned.iter().find(|known| **known == text) {
        return found;
    }
    let leaked: &'static str = Box::leak(text.to_owned().into_boxed_str());
    interned.push(leaked);
    leaked
}

/// Deep-merges `patch` into `target`: objects key by key, recursively; anything else, `null`
/// included, replaces what was there (so a test can set a field to `null`, which JSON Merge
/// Patch would treat as a deletion).
pub fn merge_json(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(target), serde_json::Value::Object(patch)) => {
            for (key, value) in patch {
                match target.get_mut(key) {
                    Some(existing) => merge_json(existing, value),
                    None => {
                        target.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (target, patch) => *target = patch.clone(),
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

/// A layer listed as non-distributable, with `urls` to fetch it from instead of the registry,
/// as Windows base layers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignLayer {
    /// Which of [`ImageSpec::layers`].
    pub index: usize,
    /// The descriptor's `urls`; `{digest}` in a URL is replaced by the layer's digest.
    pub urls: Vec<String>,
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
    /// Merged into the generated config last (see [`merge_json`]): any field, any value, e.g.
    /// `{"config": {"Env": ["A=\u0000"]}, "os": "linux\n"}`. `rootfs.diff_ids` stay right
    /// unless overridden too; the manifest's platform in an index is still [`Self::platform`].
    pub config_overrides: Option<serde_json::Value>,
    /// Replaces the format's config media type.
    pub config_media_type: Option<String>,
    /// Replaces the format's layer media type on every layer not in [`Self::foreign_layers`].
    pub layer_media_type: Option<String>,
    /// Merged into the generated manifest last (`artifactType`, `annotations`, `subject`...).
    pub manifest_overrides: Option<serde_json::Value>,
    /// Layers listed with a non-distributable media type and `urls`.
    pub foreign_layers: Vec<ForeignLayer>,
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
            config_overrides: None,
            config_media_type: None,
            layer_media_type: None,
            manifest_overrides: None,
            foreign_layers: Vec::new(),
        }
    }

    /// A Windows image (`windows/amd64`, an `os.version`) whose first layer is a foreign base
    /// layer listed with `url_template` (`{digest}` replaced), as Microsoft's base images are.
    /// Point the URL at a [`crate::tcp_target::TcpTarget`] to see whether a client follows it.
    pub fn windows(format: ManifestFormat, seed: u64, url_template: &str) -> Self {
        Self::seeded(format, seed, 2, 4096)
            .with_platform("windows/amd64")
            .with_config(json!({ "os.version": "10.0.17763.5830" }))
            .with_foreign_layer(0, vec![url_template.to_owned()])
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

    /// Adds config fields (merged with earlier overrides, see [`Self::config_overrides`]).
    pub fn with_config(mut self, overrides: serde_json::Value) -> Self {
        merge_json(
            self.config_overrides.get_or_insert_with(|| json!({})),
            &overrides,
        );
        self
    }

    /// Sets fields of the container config (`Cmd`, `Env`, `Labels`...): shorthand for
    /// `with_config(json!({"config": fields}))`.
    pub fn with_container_config(self, fields: serde_json::Value) -> Self {
        self.with_config(json!({ "config": fields }))
    }

    pub fn with_config_media_type(mut self, media_type: &str) -> Self {
        self.config_media_type = Some(media_type.to_owned());
        self
    }

    pub fn with_layer_media_type(mut self, media_type: &str) -> Self {
        self.layer_media_type = Some(media_type.to_owned());
        self
    }

    /// Adds manifest fields (merged with earlier ones, see [`merge_json`]).
    pub fn with_manifest_fields(mut self, fields: serde_json::Value) -> Self {
        merge_json(
            self.manifest_overrides.get_or_insert_with(|| json!({})),
            &fields,
        );
        self
    }

    /// Lists layer `index` as non-distributable with `urls` (`{digest}` replaced).
    pub fn with_foreign_layer(mut self, index: usize, urls: Vec<String>) -> Self {
        assert!(
            index < self.layers.len(),
            "no layer {index} among {}",
            self.layers.len()
        );
        self.foreign_layers.push(ForeignLayer { index, urls });
        self
    }

    /// Builds every blob and the manifest. CPU-bound; large images take seconds.
    pub fn build(&self) -> BuiltImage {
        let layers: Vec<(Blob, String)> = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let media_type = if self.foreign_layers.iter().any(|f| f.index == i) {
                    self.format.foreign_layer_media_type()
                } else {
                    self.layer_media_type
                        .as_deref()
                        .map_or(self.format.layer_media_type(), intern)
                };
                build_layer(*l, media_type)
            })
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
        if let Some(overrides) = &self.config_overrides {
            merge_json(&mut config, overrides);
        }
        let config = Blob::in_memory(
            serde_json::to_vec(&config).expect("config serialises"),
            self.config_media_type
                .as_deref()
                .map_or(self.format.config_media_type(), intern),
        );
        let layers: Vec<Blob> = layers.into_iter().map(|(blob, _)| blob).collect();
        let layer_descriptors: Vec<serde_json::Value> = layers
            .iter()
            .enumerate()
            .map(|(i, layer)| {
                let mut descriptor = layer.descriptor();
                for foreign in self.foreign_layers.iter().filter(|f| f.index == i) {
                    let urls: Vec<String> = foreign
                        .urls
                        .iter()
                        .map(|url| url.replace("{digest}", &layer.digest))
                        .collect();
                    descriptor["urls"] = json!(urls);
                }
                descriptor
            })
            .collect();
        let mut manifest = json!({
            "schemaVersion": 2,
            "mediaType": self.format.manifest_media_type(),
            "config": config.descriptor(),
            "layers": layer_descriptors,
        });
        if let Some(overrides) = &self.manifest_overrides {
            merge_json(&mut manifest, overrides);
        }
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

/// An OCI artifact: a manifest whose config and layers are whatever the artifact's tool puts
/// there rather than an image's (OCI image-spec 1.1's `artifactType`, the empty config).
#[derive(Debug, Clone)]
pub struct ArtifactSpec {
    /// The manifest's `artifactType`, if any.
    pub artifact_type: Option<String>,
    pub config: ArtifactBlob,
    pub layers: Vec<ArtifactBlob>,
    /// The manifest's `annotations`, if any.
    pub annotations: Option<serde_json::Value>,
    /// The manifest's `subject` (the image an SBOM or signature is about), if any.
    pub subject: Option<serde_json::Value>,
}

/// A config or layer of an artifact: its media type and exact bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactBlob {
    pub media_type: String,
    pub bytes: Vec<u8>,
}

impl ArtifactBlob {
    pub fn new(media_type: &str, bytes: impl Into<Vec<u8>>) -> Self {
        Self {
            media_type: media_type.to_owned(),
            bytes: bytes.into(),
        }
    }

    /// OCI's empty descriptor content: `{}` as `application/vnd.oci.empty.v1+json`.
    pub fn empty_config() -> Self {
        Self::new(OCI_EMPTY, b"{}".to_vec())
    }
}

impl ArtifactSpec {
    /// A Helm chart as `helm push` stores it: a Helm config and one gzip'ed tar of the chart.
    pub fn helm_chart(name: &str, version: &str) -> Self {
        let chart_yaml = format!(
            "apiVersion: v2\nname: {name}\nversion: {version}\ndescription: testkit chart\n"
        );
        let mut tar = tar::Builder::new(Vec::new());
        append_file(
            &mut tar,
            &format!("{name}/Chart.yaml"),
            chart_yaml.len() as u64,
            chart_yaml.as_bytes(),
        );
        let mut gzip = flate2::GzBuilder::new()
            .mtime(0)
            .write(Vec::new(), Compression::fast());
        gzip.write_all(&tar.into_inner().expect("finish the chart tar"))
            .expect("gzip the chart");
        let content = gzip.finish().expect("finish the chart gzip");
        let config = json!({
            "apiVersion": "v2",
            "name": name,
            "version": version,
            "description": "testkit chart",
        });
        Self {
            artifact_type: None,
            config: ArtifactBlob::new(
                HELM_CONFIG,
                serde_json::to_vec(&config).expect("config serialises"),
            ),
            layers: vec![ArtifactBlob::new(HELM_CHART_CONTENT, content)],
            annotations: None,
            subject: None,
        }
    }

    /// An SPDX SBOM as an artifact: `artifactType` `application/spdx+json`, the empty config,
    /// and one `application/spdx+json` layer holding the document (JSON, not a tar).
    pub fn sbom(document_name: &str) -> Self {
        let document = json!({
            "spdxVersion": "SPDX-2.3",
            "dataLicense": "CC0-1.0",
            "SPDXID": "SPDXRef-DOCUMENT",
            "name": document_name,
            "documentNamespace": format!("https://testkit.invalid/spdx/{document_name}"),
            "creationInfo": { "created": "1970-01-01T00:00:00Z", "creators": ["Tool: testkit"] },
            "packages": [],
        });
        Self {
            artifact_type: Some(SPDX_JSON.to_owned()),
            config: ArtifactBlob::empty_config(),
            layers: vec![ArtifactBlob::new(
                SPDX_JSON,
                serde_json::to_vec_pretty(&document).expect("document serialises"),
            )],
            annotations: None,
            subject: None,
        }
    }

    /// Names `image` as the `subject` (the OCI referrers relation).
    pub fn about(mut self, image: &BuiltImage) -> Self {
        self.subject = Some(json!({
            "mediaType": image.media_type,
            "size": image.manifest.len(),
            "digest": image.digest,
        }));
        self
    }

    /// An OCI image manifest for the artifact ([`artifact_manifest`]).
    pub fn build(&self) -> BuiltImage {
        let config = Blob::from_bytes(self.config.bytes.clone(), &self.config.media_type);
        let layers: Vec<Blob> = self
            .layers
            .iter()
            .map(|layer| Blob::from_bytes(layer.bytes.clone(), &layer.media_type))
            .collect();
        let mut manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        if let Some(artifact_type) = &self.artifact_type {
            manifest["artifactType"] = json!(artifact_type);
        }
        if let Some(annotations) = &self.annotations {
            manifest["annotations"] = annotations.clone();
        }
        if let Some(subject) = &self.subject {
            manifest["subject"] = subject.clone();
        }
        let manifest = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        artifact_manifest(manifest, config, layers)
    }
}

/// An artifact's OCI image manifest, as `bytes`: it has no platform, so `platform` says
/// `unknown/unknown`, as BuildKit marks attestations in an index.
fn artifact_manifest(bytes: Vec<u8>, config: Blob, layers: Vec<Blob>) -> BuiltImage {
    let manifest = Bytes::from(bytes);
    BuiltImage {
        digest: crate::sha256_digest(&manifest),
        media_type: OCI_MANIFEST,
        manifest,
        platform: Platform::parse("unknown/unknown"),
        config,
        layers,
    }
}

/// What `cosign sign` stores under the tag `sha256-<hex>.sig` (and `cosign attest` under
/// `.att`): an OCI image manifest with cosign's placeholder config and one layer, the signed
/// payload, whose signature rides in the layer's annotations. For a signature the payload is
/// the simple-signing JSON naming `image`'s digest; for an attestation, an in-toto statement
/// in a DSSE envelope. Nothing here is cryptographically valid: tailor copies signatures, it
/// does not verify them.
pub fn cosign_artifact(image: &BuiltImage, docker_reference: &str, kind: CosignKind) -> BuiltImage {
    use base64::Engine;
    let payload = match kind {
        CosignKind::Signature => serde_json::to_vec(&json!({
            "critical": {
                "identity": { "docker-reference": docker_reference },
                "image": { "docker-manifest-digest": image.digest },
                "type": "cosign container image signature",
            },
            "optional": null,
        })),
        CosignKind::Attestation => {
            let statement = serde_json::to_vec(&json!({
                "_type": "https://in-toto.io/Statement/v0.1",
                "predicateType": "https://slsa.dev/provenance/v0.2",
                "subject": [{
                    "name": docker_reference,
                    "digest": { "sha256": image.digest.trim_start_matches("sha256:") },
                }],
                "predicate": { "builder": { "id": "https://testkit.invalid/builder" } },
            }))
            .expect("statement serialises");
            serde_json::to_vec(&json!({
                "payloadType": "application/vnd.in-toto+json",
                "payload": base64::engine::general_purpose::STANDARD.encode(statement),
                "signatures": [{ "keyid": "", "sig": "MEUCIQDtestkit" }],
            }))
        }
    }
    .expect("payload serialises");
    let layer_type = match kind {
        CosignKind::Signature => "application/vnd.dev.cosign.simplesigning.v1+json",
        CosignKind::Attestation => "application/vnd.dsse.envelope.v1+json",
    };
    let layer = Blob::from_bytes(payload, layer_type);
    let config = Blob::from_bytes(
        serde_json::to_vec(&json!({
            "architecture": "",
            "created": "0001-01-01T00:00:00Z",
            "history": [{ "created": "0001-01-01T00:00:00Z" }],
            "os": "",
            "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
            "config": {},
        }))
        .expect("config serialises"),
        OCI_CONFIG,
    );
    let mut layer_descriptor = layer.descriptor();
    layer_descriptor["annotations"] = match kind {
        CosignKind::Signature => json!({
            "dev.cosignproject.cosign/signature": "MEUCIQDtestkitsignature",
        }),
        CosignKind::Attestation => json!({ "predicateType": "https://slsa.dev/provenance/v0.2" }),
    };
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer_descriptor],
    });
    let manifest = serde_json::to_vec(&manifest).expect("manifest serialises");
    artifact_manifest(manifest, config, vec![layer])
}

/// Which cosign artifact [`cosign_artifact`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CosignKind {
    /// `cosign sign`: tag suffix `.sig`.
    Signature,
    /// `cosign attest`: tag suffix `.att`.
    Attestation,
}

impl CosignKind {
    /// The tag cosign stores it under for `subject` (`sha256-<hex>.sig`).
    pub fn tag(self, subject: &str) -> String {
        let suffix = match self {
            Self::Signature => "sig",
            Self::Attestation => "att",
        };
        format!("{}.{suffix}", subject.replacen(':', "-", 1))
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
    /// A blob held in memory (`media_type` is interned, see [`BuiltImage::media_type`]).
    pub fn from_bytes(bytes: impl Into<Vec<u8>>, media_type: &str) -> Self {
        Self::in_memory(bytes.into(), intern(media_type))
    }

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

fn build_layer(spec: LayerSpec, media_type: &'static str) -> (Blob, String) {
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

    /// Existing specs must keep their exact digests: other suites pin them.
    #[test]
    fn digests_of_plain_specs_are_unchanged() {
        assert_eq!(
            ImageSpec::seeded(ManifestFormat::Oci, 7, 2, 1000)
                .build()
                .digest,
            "sha256:7487cb6e8b2fc888e180c1fd3dcc322807453623dfc53785ae99ed44edb2051c"
        );
        assert_eq!(
            ImageSpec::seeded(ManifestFormat::Docker, 8, 1, 4096)
                .with_platform("linux/arm/v7")
                .build()
                .digest,
            "sha256:9d3327206bfa2dbe9b667edfd5edb5d6e3e2f5ee42009a73f5bd6fdaad890016"
        );
        let index = IndexSpec::seeded(
            ManifestFormat::Oci,
            21,
            &["linux/amd64", "linux/arm64/v8"],
            2,
            1024,
        );
        assert_eq!(
            index.build().digest,
            "sha256:2c4e6fb50b13921d811d1f8b349a78837e9b1df9edd70798daeab5d2828a482b"
        );
    }

    fn config_json(image: &BuiltImage) -> serde_json::Value {
        match &image.config.data {
            BlobData::Memory(bytes) => serde_json::from_slice(bytes).unwrap(),
            BlobData::File(_) => unreachable!("configs are small"),
        }
    }

    fn manifest_json(image: &BuiltImage) -> serde_json::Value {
        serde_json::from_slice(&image.manifest).unwrap()
    }

    #[test]
    fn crafted_config_fields_are_merged_and_diff_ids_stay_right() {
        let hostile = "a\u{0}b\nc\r\u{1b}[31md";
        let plain = ImageSpec::seeded(ManifestFormat::Oci, 4, 2, 512);
        let crafted = plain
            .clone()
            .with_container_config(json!({
                "Cmd": [hostile],
                "Entrypoint": [hostile],
                "Env": [format!("X={hostile}")],
                "WorkingDir": hostile,
                "User": hostile,
                "ExposedPorts": { hostile: {} },
                "Labels": { hostile: hostile },
            }))
            .with_config(json!({ "os": hostile, "architecture": hostile, "variant": null }))
            .with_config_media_type("application/vnd.example.config+json")
            .build();
        let config = config_json(&crafted);
        assert_eq!(config["config"]["Cmd"][0], hostile);
        assert_eq!(config["config"]["Labels"][hostile], hostile);
        assert_eq!(config["config"]["ExposedPorts"][hostile], json!({}));
        assert_eq!(config["os"], hostile);
        assert!(config["variant"].is_null() && config.get("variant").is_some());
        // The generated fields a test did not touch are still there.
        assert_eq!(
            config["config"]["Env"].as_array().unwrap().len(),
            1,
            "arrays are replaced, not appended to"
        );
        assert_eq!(
            config["rootfs"]["diff_ids"],
            config_json(&plain.build())["rootfs"]["diff_ids"]
        );
        assert_eq!(
            manifest_json(&crafted)["config"]["mediaType"],
            "application/vnd.example.config+json"
        );
        assert_eq!(
            crafted.config.media_type,
            "application/vnd.example.config+json"
        );
    }

    #[test]
    fn windows_images_list_their_base_layer_as_foreign() {
        let image = ImageSpec::windows(
            ManifestFormat::Docker,
            5,
            "https://foreign.invalid/blobs/{digest}",
        )
        .build();
        let manifest = manifest_json(&image);
        let base = &manifest["layers"][0];
        assert_eq!(base["mediaType"], DOCKER_FOREIGN_LAYER);
        assert_eq!(
            base["urls"][0],
            format!("https://foreign.invalid/blobs/{}", image.layers[0].digest)
        );
        assert!(is_non_distributable(image.layers[0].media_type));
        assert_eq!(manifest["layers"][1]["mediaType"], DOCKER_LAYER);
        assert!(manifest["layers"][1].get("urls").is_none());
        let config = config_json(&image);
        assert_eq!(
            (config["os"].as_str(), config["os.version"].as_str()),
            (Some("windows"), Some("10.0.17763.5830"))
        );
        assert_eq!(image.platform, Platform::parse("windows/amd64"));
    }

    #[test]
    fn artifacts_carry_their_own_media_types() {
        let image = ImageSpec::seeded(ManifestFormat::Oci, 6, 1, 64).build();
        let sbom = ArtifactSpec::sbom("app").about(&image).build();
        let manifest = manifest_json(&sbom);
        assert_eq!(manifest["artifactType"], SPDX_JSON);
        assert_eq!(manifest["config"]["mediaType"], OCI_EMPTY);
        assert_eq!(
            manifest["config"]["digest"],
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(manifest["layers"][0]["mediaType"], SPDX_JSON);
        assert_eq!(manifest["subject"]["digest"], image.digest.as_str());

        let chart = ArtifactSpec::helm_chart("web", "1.2.3").build();
        let manifest = manifest_json(&chart);
        assert_eq!(manifest["config"]["mediaType"], HELM_CONFIG);
        assert_eq!(manifest["layers"][0]["mediaType"], HELM_CHART_CONTENT);
        let BlobData::Memory(content) = &chart.layers[0].data else {
            unreachable!()
        };
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&content[..]));
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["web/Chart.yaml"]);
    }

    #[test]
    fn merge_json_merges_objects_and_replaces_the_rest() {
        let mut target = json!({ "a": { "b": 1, "c": [1, 2] }, "d": "x" });
        merge_json(
            &mut target,
            &json!({ "a": { "c": [3], "e": null }, "d": { "f": true } }),
        );
        assert_eq!(
            target,
            json!({ "a": { "b": 1, "c": [3], "e": null }, "d": { "f": true } })
        );
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
