//! Recognising and parsing manifests: what kind a manifest is, which blobs it needs, and
//! which we refuse (schema 1, unknown media types, anything over 4 MiB, malformed digests).
//!
//! Manifests are never re-serialised: the copy pushes the bytes it read, so digests survive.

use bytes::Bytes;
use oci_client::manifest::{ImageIndexEntry, OciDescriptor, OciImageIndex, OciImageManifest};

use crate::code::Code;
use crate::reference::parse_digest;
use crate::text::{MESSAGE_CHARS, clean};

/// A manifest tailor does not accept. Messages quote upstream text only cleaned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("invalid manifest: {0}")]
    Invalid(String),
    #[error("unsupported media type: {0}")]
    Unsupported(String),
}

impl ManifestError {
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid(_) => Code::ManifestInvalid,
            Self::Unsupported(_) => Code::UnsupportedMediaType,
        }
    }

    fn invalid(context: impl std::fmt::Display, error: impl std::fmt::Display) -> Self {
        // serde's messages quote the offending input, which is upstream text.
        Self::Invalid(clean(&format!("{context}: {error}"), MESSAGE_CHARS))
    }
}

/// The distribution registry's own limit, and ours.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const SCHEMA1: [&str; 3] = [
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
];
/// Layers that registries must not redistribute (Windows base layers and the like).
const FOREIGN_LAYERS: [&str; 4] = [
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
];

/// The `Accept` header for manifest requests: the four kinds we copy.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    DockerManifest,
    OciManifest,
    DockerList,
    OciIndex,
}

impl ManifestKind {
    pub fn is_index(self) -> bool {
        matches!(self, Self::DockerList | Self::OciIndex)
    }

    fn from_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            DOCKER_MANIFEST => Some(Self::DockerManifest),
            OCI_MANIFEST => Some(Self::OciManifest),
            DOCKER_MANIFEST_LIST => Some(Self::DockerList),
            OCI_INDEX => Some(Self::OciIndex),
            _ => None,
        }
    }
}

/// Manifest bytes exactly as the registry served them.
#[derive(Debug, Clone)]
pub struct RawManifest {
    pub bytes: Bytes,
    /// The media type to push them with.
    pub media_type: String,
    pub digest: String,
    pub kind: ManifestKind,
}

impl RawManifest {
    /// Recognises `bytes` served with `content_type`. The body's own `mediaType` wins over a
    /// generic content type; schema 1 and unknown types are refused.
    pub fn recognise(bytes: Bytes, content_type: Option<&str>) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::Invalid(format!(
                "manifest is {} bytes, over the {MAX_MANIFEST_BYTES}-byte limit",
                bytes.len()
            )));
        }
        let header_type = content_type.map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
        let probe: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ManifestError::invalid("manifest is not JSON", e))?;
        if probe.get("schemaVersion").and_then(|v| v.as_u64()) == Some(1) {
            return Err(ManifestError::Unsupported(
                "Docker schema 1 manifests are not supported; re-push the image with a current client".into(),
            ));
        }
        let body_type = probe
            .get("mediaType")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let kind = header_type
            .as_deref()
            .and_then(ManifestKind::from_media_type)
            .or_else(|| body_type.as_deref().and_then(ManifestKind::from_media_type))
            .or_else(|| {
                // OCI allows omitting mediaType; the shape then says what it is.
                let generic = header_type.as_deref().is_none_or(|t| SCHEMA1.contains(&t) || t == "text/plain");
                match (generic, probe.get("manifests"), probe.get("layers")) {
                    (true, Some(_), None) => Some(ManifestKind::OciIndex),
                    (true, None, Some(_)) => Some(ManifestKind::OciManifest),
                    _ => None,
                }
            })
            .ok_or_else(|| {
                let shown = header_type.clone().or(body_type.clone()).unwrap_or_else(|| "none".into());
                ManifestError::Unsupported(format!(
                    "manifest media type {:?} is not a Docker schema 2 manifest or list, nor an OCI manifest or index",
                    clean(&shown, 200)
                ))
            })?;
        let media_type = match kind {
            ManifestKind::DockerManifest => DOCKER_MANIFEST,
            ManifestKind::OciManifest => OCI_MANIFEST,
            ManifestKind::DockerList => DOCKER_MANIFEST_LIST,
            ManifestKind::OciIndex => OCI_INDEX,
        };
        Ok(Self {
            digest: crate::digest::sha256(&bytes),
            media_type: media_type.to_owned(),
            bytes,
            kind,
        })
    }

    /// The image manifest's config and layers.
    pub fn image(&self) -> Result<ImageManifest, ManifestError> {
        let parsed: OciImageManifest = serde_json::from_slice(&self.bytes).map_err(|e| {
            ManifestError::invalid(format_args!("image manifest {}", self.digest), e)
        })?;
        let config = Blob::from_descriptor(&parsed.config)?;
        let mut layers = Vec::new();
        let mut foreign = Vec::new();
        for layer in &parsed.layers {
            let blob = Blob::from_descriptor(layer)?;
            if FOREIGN_LAYERS.contains(&layer.media_type.as_str())
                || layer.urls.as_ref().is_some_and(|u| !u.is_empty())
            {
                foreign.push(blob);
            } else {
                layers.push(blob);
            }
        }
        Ok(ImageManifest {
            config,
            layers,
            foreign,
            artifact_type: parsed.artifact_type.as_deref().map(|t| clean(t, 255)),
        })
    }

    /// The index's entries.
    pub fn index(&self) -> Result<Vec<IndexEntry>, ManifestError> {
        let parsed: OciImageIndex = serde_json::from_slice(&self.bytes)
            .map_err(|e| ManifestError::invalid(format_args!("index {}", self.digest), e))?;
        parsed
            .manifests
            .iter()
            .map(IndexEntry::from_entry)
            .collect()
    }
}

/// A blob a manifest refers to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

impl Blob {
    fn from_descriptor(descriptor: &OciDescriptor) -> Result<Self, ManifestError> {
        // The digest goes into URLs: it must be exactly sha256:<hex>, nothing a path could abuse.
        let digest = parse_digest(&descriptor.digest)
            .map_err(|e| ManifestError::Invalid(clean(&e, MESSAGE_CHARS)))?;
        let size = u64::try_from(descriptor.size)
            .map_err(|_| ManifestError::Invalid(format!("blob {digest} has a negative size")))?;
        Ok(Self {
            digest,
            size,
            media_type: clean(&descriptor.media_type, 255),
        })
    }
}

/// What an image manifest needs.
#[derive(Debug, Clone)]
pub struct ImageManifest {
    pub config: Blob,
    /// Distributable layers, copied.
    pub layers: Vec<Blob>,
    /// Non-distributable layers, left out and reported.
    pub foreign: Vec<Blob>,
    /// An OCI 1.1 artifact's declared type.
    pub artifact_type: Option<String>,
}

/// Config media types of images a container runtime can run.
pub const IMAGE_CONFIG_TYPES: [&str; 2] = [
    "application/vnd.docker.container.image.v1+json",
    "application/vnd.oci.image.config.v1+json",
];

/// Layer media types a container runtime unpacks.
const RUNNABLE_LAYER_TYPES: [&str; 8] = [
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
];

impl ImageManifest {
    /// Why this manifest is not a container image a runtime can run (an artifact: a Helm
    /// chart, an SBOM, a signature), or `None` if it is one.
    pub fn artifact_problem(&self) -> Option<String> {
        if let Some(kind) = &self.artifact_type {
            return Some(format!("it is an OCI artifact of type {kind:?}"));
        }
        if !IMAGE_CONFIG_TYPES.contains(&self.config.media_type.as_str()) {
            return Some(format!(
                "its config has media type {:?}, not an image config",
                self.config.media_type
            ));
        }
        self.layers
            .iter()
            .chain(&self.foreign)
            .find(|l| !RUNNABLE_LAYER_TYPES.contains(&l.media_type.as_str()))
            .map(|l| {
                format!(
                    "layer {} has media type {:?}, not a filesystem layer",
                    l.digest, l.media_type
                )
            })
    }
}

/// One entry of an index.
#[derive(Debug, Clone)]
pub struct IndexEntry {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    pub os: Option<String>,
    pub architecture: Option<String>,
    pub variant: Option<String>,
}

impl IndexEntry {
    fn from_entry(entry: &ImageIndexEntry) -> Result<Self, ManifestError> {
        let digest = parse_digest(&entry.digest)
            .map_err(|e| ManifestError::Invalid(clean(&e, MESSAGE_CHARS)))?;
        let size = u64::try_from(entry.size).map_err(|_| {
            ManifestError::Invalid(format!("index entry {digest} has a negative size"))
        })?;
        let short = |s: &str| clean(s, 64);
        Ok(Self {
            digest,
            size,
            media_type: clean(&entry.media_type, 255),
            os: entry.platform.as_ref().map(|p| short(&p.os.to_string())),
            architecture: entry
                .platform
                .as_ref()
                .map(|p| short(&p.architecture.to_string())),
            variant: entry
                .platform
                .as_ref()
                .and_then(|p| p.variant.as_deref().map(short)),
        })
    }

    pub fn platform_text(&self) -> String {
        let mut text = format!(
            "{}/{}",
            self.os.as_deref().unwrap_or("?"),
            self.architecture.as_deref().unwrap_or("?")
        );
        if let Some(variant) = &self.variant {
            text.push('/');
            text.push_str(variant);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn manifest(media_type: Option<&str>, extra_layer: &str) -> Bytes {
        let mt = media_type
            .map(|m| format!(r#""mediaType":"{m}","#))
            .unwrap_or_default();
        Bytes::from(format!(
            r#"{{"schemaVersion":2,{mt}"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","size":2,"digest":"{D}"}},"layers":[{extra_layer}]}}"#
        ))
    }

    #[test]
    fn recognises_by_header_body_or_shape() {
        let m = RawManifest::recognise(
            manifest(Some(DOCKER_MANIFEST), ""),
            Some("application/json"),
        )
        .unwrap();
        assert_eq!(m.kind, ManifestKind::DockerManifest);
        let m = RawManifest::recognise(manifest(None, ""), None).unwrap();
        assert_eq!(m.kind, ManifestKind::OciManifest);
        let m = RawManifest::recognise(
            manifest(None, ""),
            Some(&format!("{OCI_MANIFEST}; charset=utf-8")),
        )
        .unwrap();
        assert_eq!(m.media_type, OCI_MANIFEST);
    }

    #[test]
    fn refuses_schema1_unknown_and_oversized() {
        let schema1 = Bytes::from_static(br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#);
        let err = RawManifest::recognise(
            schema1,
            Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
        )
        .unwrap_err();
        assert_eq!(err.code(), "UNSUPPORTED_MEDIA_TYPE");
        let err = RawManifest::recognise(
            manifest(Some("application/vnd.cncf.helm.chart"), ""),
            Some("application/vnd.cncf.helm.chart"),
        )
        .unwrap_err();
        assert_eq!(err.code(), "UNSUPPORTED_MEDIA_TYPE");
        let big = Bytes::from(vec![b' '; MAX_MANIFEST_BYTES + 1]);
        assert_eq!(
            RawManifest::recognise(big, Some(OCI_MANIFEST))
                .unwrap_err()
                .code(),
            "MANIFEST_INVALID"
        );
        let err = RawManifest::recognise(Bytes::from_static(b"not json"), Some(OCI_MANIFEST))
            .unwrap_err();
        assert_eq!(err.code(), "MANIFEST_INVALID");
    }

    #[test]
    fn separates_foreign_layers_and_rejects_hostile_digests() {
        let foreign = format!(
            r#"{{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","size":5,"digest":"{D}","urls":["https://example.com/x"]}}"#
        );
        let image = RawManifest::recognise(manifest(Some(DOCKER_MANIFEST), &foreign), None)
            .unwrap()
            .image()
            .unwrap();
        assert_eq!((image.layers.len(), image.foreign.len()), (0, 1));

        let hostile = r#"{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","size":5,"digest":"sha256:../../etc/passwd"}"#;
        let err = RawManifest::recognise(manifest(Some(OCI_MANIFEST), hostile), None)
            .unwrap()
            .image()
            .unwrap_err();
        assert_eq!(err.code(), "MANIFEST_INVALID");
    }
}
