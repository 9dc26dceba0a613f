//! The OCI 1.1 referrers relation as a registry stores it without the referrers API (the
//! fallback tag schema, which distribution 2.8 needs): the index tagged `sha256-<hex>` listing
//! the manifests whose `subject` is `sha256:<hex>`, and cosign's `sha256-<hex>.sig`, `.att` and
//! `.sbom` tags. The API itself is [`Repository::referrers`].

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{Deleted, RegistryError, Repository};

/// cosign's tag suffixes: signatures, attestations, SBOMs.
pub const COSIGN_SUFFIXES: [&str; 3] = ["sig", "att", "sbom"];

/// An index entry, as a referrers list gives it.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Listed {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
pub struct ListedIndex {
    #[serde(default)]
    pub manifests: Vec<Listed>,
}

/// The fallback tag of `digest`'s referrers: `sha256-<hex>`.
pub fn fallback_tag(digest: &str) -> String {
    digest.replacen(':', "-", 1)
}

/// Deletes the referrers of `subject` from `dest`, as the copy engine writes them: every
/// manifest its `sha256-<hex>` index lists, the index, and what cosign's tags name; but never a
/// digest in `keep` (what the images still in use are made of: an upstream may have put a live
/// image's manifest under a cosign tag, and one SBOM attached to two images is one manifest).
/// Meant for when `subject` itself goes (the pruner) or never became an image (a failed
/// staging). Returns how many manifests went.
pub async fn remove(
    dest: &Repository,
    subject: &str,
    keep: &HashSet<String>,
) -> Result<usize, RegistryError> {
    let mut deleted = 0;
    let mut delete = async |digest: &str| -> Result<(), RegistryError> {
        if !keep.contains(digest) && dest.delete_manifest(digest).await? == Deleted::Deleted {
            deleted += 1;
        }
        Ok(())
    };
    let tag = fallback_tag(subject);
    if let Some(head) = dest.head_manifest(&tag).await? {
        let index = dest.get_manifest(&head.digest, Some(&head.digest)).await?;
        if let Ok(listed) = serde_json::from_slice::<ListedIndex>(&index.bytes) {
            for entry in listed.manifests {
                if crate::reference::parse_digest(&entry.digest).is_ok() {
                    delete(&entry.digest).await?;
                }
            }
        }
        delete(&head.digest).await?;
    }
    for suffix in COSIGN_SUFFIXES {
        if let Some(head) = dest.head_manifest(&format!("{tag}.{suffix}")).await? {
            delete(&head.digest).await?;
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fallback_tag_is_the_digest_with_a_dash() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(fallback_tag(&digest), format!("sha256-{}", "ab".repeat(32)));
    }
}
