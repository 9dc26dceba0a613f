//! Referrers: the signatures, SBOMs and attestations about an image, copied with it and
//! removed with it.
//!
//! Found in the source three ways, all of them read:
//! - the OCI 1.1 referrers API (`GET /v2/<name>/referrers/<digest>`), where the registry has it;
//! - otherwise the fallback tag schema: the index tagged `sha256-<hex>` listing them;
//! - cosign's tags, `sha256-<hex>.sig`, `.att` and `.sbom`, each one manifest.
//!
//! Each is copied with the copy engine's own guarantees (verified, byte-exact, only missing
//! blobs), one level deep, at most [`MAX_REFERRERS`] of them. A listed referrer is copied only
//! if its manifest names the image as its `subject` (a registry listing something else is
//! not believed). The destination gets them by the fallback tag schema (distribution 2.8 has
//! no referrers API): listed ones by digest and in the `sha256-<hex>` index (merged with what
//! is there), cosign's under their own tags. [`crate::registry::referrers::remove`] deletes
//! all of that again.

use serde::{Deserialize, Serialize};

use super::source::{Source, Wanted};
use super::{CopyOptions, CopyReport, PlatformChoice, StoredObject};
use crate::error::CopyError;
use crate::manifest::{self, RawManifest};
use crate::registry::referrers::{COSIGN_SUFFIXES, Listed, ListedIndex, fallback_tag};
use crate::registry::{RegistryError, Repository};

/// Most referrers copied with one image; more are left out and reported.
pub const MAX_REFERRERS: usize = 64;

/// A referrer's annotations larger than this (as JSON) are left out of the destination's
/// index (the manifest keeps them).
const MAX_ANNOTATION_BYTES: usize = 4096;

/// One artifact copied because it refers to the copied image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Referrer {
    pub digest: String,
    pub media_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub size: u64,
    /// The cosign tag it was found under and pushed as (`sha256-<hex>.sig`); `None` for one
    /// listed by the referrers API or the `sha256-<hex>` index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// The only part of a referrer's manifest read here: whom it is about.
#[derive(Deserialize)]
struct AboutSubject {
    subject: Option<SubjectDescriptor>,
}

#[derive(Deserialize)]
struct SubjectDescriptor {
    digest: String,
}

/// What copying the referrers did, to be folded into the image's report.
pub(super) struct Copied {
    pub referrers: Vec<Referrer>,
    pub reports: Vec<CopyReport>,
    /// The destination's `sha256-<hex>` index, when one was written.
    pub index: Option<StoredObject>,
    pub warnings: Vec<String>,
}

/// Copies the referrers of `subject` from `source` (a registry) into `dest`.
pub(super) async fn copy(
    source: &Source,
    dest: &Repository,
    subject: &str,
    options: &CopyOptions,
) -> Result<Copied, CopyError> {
    let Some(repository) = source.repository() else {
        return Err(CopyError::InvalidArgument(
            "referrers are copied from a registry only".into(),
        ));
    };
    let mut warnings = Vec::new();
    let (listed, tagged) = discover(repository, subject, &mut warnings).await?;
    // Nested copies of single manifests (an index is refused before): no runnable check, no
    // referrers of referrers, and no progress events (they would restate the image's plan).
    let nested = CopyOptions {
        platforms: PlatformChoice::All,
        runnable: None,
        referrers: false,
        progress: None,
        layout_annotations: Default::default(),
        ..options.clone()
    };
    let mut copied = Copied {
        referrers: Vec::new(),
        reports: Vec::new(),
        index: None,
        warnings: Vec::new(),
    };
    for digest in listed {
        let Some(manifest) = referrer_manifest(repository, &digest, &mut warnings).await? else {
            continue;
        };
        if about(&manifest).as_deref() != Some(subject) {
            warnings.push(format!(
                "referrer {digest} was listed for {subject} but is not about it; left out"
            ));
            continue;
        }
        let report = copy_one(source, repository, dest, &digest, &digest, &nested).await?;
        // Listed at once, so that a copy failing later leaves nothing the cleanup
        // (`registry::referrers::remove`) cannot find.
        copied.index = Some(write_index(dest, subject, describe(&manifest)).await?);
        copied.referrers.push(referrer(&manifest, None));
        copied.reports.push(report);
    }
    for tag in tagged {
        let Some(manifest) = referrer_manifest(repository, &tag, &mut warnings).await? else {
            continue;
        };
        if manifest.digest == subject {
            warnings.push(format!("{tag} names the image itself; left out"));
            continue;
        }
        // By digest, pushed under the tag: the tag may move upstream meanwhile.
        let report = copy_one(source, repository, dest, &manifest.digest, &tag, &nested).await?;
        copied.referrers.push(referrer(&manifest, Some(tag)));
        copied.reports.push(report);
    }
    for warning in &warnings {
        tracing::warn!("{warning}");
    }
    copied.warnings = warnings;
    Ok(copied)
}

/// A referrer's manifest (`reference`: its digest, or a cosign tag), bounded and verified;
/// `None` (with a warning) if it is gone since it was listed, or is an index (whose children
/// would be an unbounded fan-out; no signing tool writes one).
async fn referrer_manifest(
    repository: &Repository,
    reference: &str,
    warnings: &mut Vec<String>,
) -> Result<Option<RawManifest>, CopyError> {
    let expected = reference.starts_with("sha256:").then_some(reference);
    let manifest = match repository.get_manifest(reference, expected).await {
        Ok(manifest) => manifest,
        Err(RegistryError::NotFound { .. }) => {
            warnings.push(format!("referrer {reference} is listed but gone; left out"));
            return Ok(None);
        }
        Err(error) => return Err(CopyError::Source(error)),
    };
    if manifest.kind.is_index() {
        warnings.push(format!("referrer {reference} is an index; left out"));
        return Ok(None);
    }
    Ok(Some(manifest))
}

/// Copies one referrer's manifest `digest` and its blobs into `dest` under `reference`.
async fn copy_one(
    source: &Source,
    repository: &Repository,
    dest: &Repository,
    digest: &str,
    reference: &str,
    nested: &CopyOptions,
) -> Result<CopyReport, CopyError> {
    let wanted = Wanted::digest(repository.name(), digest);
    // Boxed: a copy copies referrers, which are copies (one level deep).
    Box::pin(super::copy_from(source, &wanted, dest, reference, nested)).await
}

/// Whom a referrer's manifest says it is about (its `subject`).
fn about(manifest: &RawManifest) -> Option<String> {
    serde_json::from_slice::<AboutSubject>(&manifest.bytes)
        .ok()
        .and_then(|m| m.subject)
        .map(|s| s.digest)
}

/// A referrer's descriptor, from its verified manifest (never from a listing's say-so): its
/// `artifactType`, or its config's media type as the referrers API reports one without it,
/// cleaned and cut; its annotations if small.
fn describe(manifest: &RawManifest) -> Listed {
    #[derive(Deserialize)]
    struct Fields {
        #[serde(rename = "artifactType")]
        artifact_type: Option<String>,
        config: Option<ConfigType>,
        annotations: Option<std::collections::BTreeMap<String, String>>,
    }
    #[derive(Deserialize)]
    struct ConfigType {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    let fields = serde_json::from_slice::<Fields>(&manifest.bytes).ok();
    let artifact_type = fields.as_ref().and_then(|f| {
        f.artifact_type
            .clone()
            .or_else(|| f.config.as_ref().and_then(|c| c.media_type.clone()))
    });
    let annotations = fields
        .and_then(|f| f.annotations)
        .filter(|a| serde_json::to_vec(a).is_ok_and(|json| json.len() <= MAX_ANNOTATION_BYTES));
    Listed {
        media_type: manifest.media_type.clone(),
        digest: manifest.digest.clone(),
        size: manifest.bytes.len() as u64,
        artifact_type: artifact_type.map(|t| crate::text::clean(&t, 255)),
        annotations,
    }
}

/// What `GET /stage` lists for a referrer copied from `manifest`.
fn referrer(manifest: &RawManifest, tag: Option<String>) -> Referrer {
    let described = describe(manifest);
    Referrer {
        digest: described.digest,
        media_type: described.media_type,
        artifact_type: described.artifact_type,
        size: described.size,
        tag,
    }
}

/// The referrers of `subject` in `repository`: the digests listed (API, else fallback index)
/// and cosign's tags that exist; at most [`MAX_REFERRERS`] in all.
async fn discover(
    repository: &Repository,
    subject: &str,
    warnings: &mut Vec<String>,
) -> Result<(Vec<String>, Vec<String>), CopyError> {
    // A registry without the API answers 404, as the spec says, or in practice 400, 401,
    // 403 or 405 on a path it does not know: all of those mean "use the fallback tag". Only
    // what would fail any request (a rate limit, an outage, a timeout) is an error.
    let api = match repository.referrers(subject).await {
        Ok(listing) => listing,
        Err(
            error @ (RegistryError::RateLimited { .. }
            | RegistryError::Unavailable { .. }
            | RegistryError::Unreachable { .. }
            | RegistryError::Timeout { .. }),
        ) => {
            return Err(CopyError::Source(error));
        }
        Err(error) => {
            tracing::debug!(%error, "no referrers API; reading the fallback tag");
            None
        }
    };
    let listing = match api {
        Some(bytes) => Some(bytes),
        None => {
            let tag = fallback_tag(subject);
            match repository
                .head_manifest(&tag)
                .await
                .map_err(CopyError::Source)?
            {
                Some(_) => Some(
                    repository
                        .get_manifest(&tag, None)
                        .await
                        .map_err(CopyError::Source)?
                        .bytes,
                ),
                None => None,
            }
        }
    };
    // Each entry on its own: one malformed entry does not hide the others, and a listing that
    // is no index at all hides only itself.
    #[derive(Deserialize)]
    struct Entries {
        #[serde(default)]
        manifests: Vec<serde_json::Value>,
    }
    let entries = match listing.map(|bytes| serde_json::from_slice::<Entries>(&bytes)) {
        Some(Ok(entries)) => entries.manifests,
        Some(Err(error)) => {
            warnings.push(format!(
                "the referrers of {subject} are not an index ({error}); none listed are copied"
            ));
            Vec::new()
        }
        None => Vec::new(),
    };
    let mut seen = std::collections::HashSet::new();
    let mut unusable = 0usize;
    let mut listed = Vec::new();
    for entry in entries {
        match serde_json::from_value::<Listed>(entry) {
            Ok(entry)
                if crate::reference::parse_digest(&entry.digest).is_ok()
                    && entry.digest != subject
                    && (entry.media_type == manifest::OCI_MANIFEST
                        || entry.media_type == manifest::DOCKER_MANIFEST) =>
            {
                if seen.insert(entry.digest.clone()) {
                    listed.push(entry.digest);
                }
            }
            _ => unusable += 1,
        }
    }
    if unusable > 0 {
        warnings.push(format!(
            "{unusable} entries listed as referrers of {subject} are not image manifests \
             tailor can copy; left out"
        ));
    }
    let mut tagged = Vec::new();
    for suffix in COSIGN_SUFFIXES {
        let tag = format!("{}.{suffix}", fallback_tag(subject));
        if repository
            .head_manifest(&tag)
            .await
            .map_err(CopyError::Source)?
            .is_some()
        {
            tagged.push(tag);
        }
    }
    let room = MAX_REFERRERS.saturating_sub(tagged.len());
    if listed.len() > room {
        warnings.push(format!(
            "{subject} has {} referrers; the first {MAX_REFERRERS} are copied",
            listed.len() + tagged.len()
        ));
        listed.truncate(room);
    }
    Ok((listed, tagged))
}

/// Writes the destination's `sha256-<hex>` index: what it listed already, and `added`.
/// Entries read back that do not parse are dropped (the index is tailor's own).
async fn write_index(
    dest: &Repository,
    subject: &str,
    added: Listed,
) -> Result<StoredObject, CopyError> {
    let tag = fallback_tag(subject);
    let mut entries = match dest
        .head_manifest(&tag)
        .await
        .map_err(CopyError::Destination)?
    {
        Some(_) => {
            let existing = dest
                .get_manifest(&tag, None)
                .await
                .map_err(CopyError::Destination)?;
            serde_json::from_slice::<ListedIndex>(&existing.bytes)
                .map(|index| index.manifests)
                .unwrap_or_default()
        }
        None => Vec::new(),
    };
    entries.retain(|e| e.digest != added.digest);
    entries.push(added);
    let bytes = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest::OCI_INDEX,
        "manifests": entries,
    }))
    .expect("an index serialises");
    let index = RawManifest::recognise(bytes.into(), Some(manifest::OCI_INDEX))?;
    dest.put_manifest(&tag, &index)
        .await
        .map_err(CopyError::Destination)?;
    Ok(StoredObject {
        digest: index.digest.clone(),
        size: index.bytes.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_referrer_lists_as_its_descriptor_and_nothing_more() {
        let referrer = Referrer {
            digest: format!("sha256:{}", "cd".repeat(32)),
            media_type: manifest::OCI_MANIFEST.into(),
            artifact_type: Some("application/spdx+json".into()),
            size: 512,
            tag: None,
        };
        let json = serde_json::to_value(&referrer).unwrap();
        assert_eq!(json["artifact_type"], "application/spdx+json");
        assert!(json.get("tag").is_none(), "{json}");
    }
}
