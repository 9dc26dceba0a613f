//! Planning a copy: which manifests to push (children first, the tagged one last) and which
//! blobs they need, read from the source and checked before anything moves.

use std::collections::HashSet;

use super::source::{Source, Wanted};
use super::{CopyOptions, PlatformChoice};
use crate::error::CopyError;
use crate::manifest::{Blob, ImageManifest, IndexEntry, ManifestError, RawManifest};
use crate::platform::Platform;

/// What a copy will move.
pub(super) struct Plan {
    /// Manifests pushed by digest before the tag (an index's children).
    pub children: Vec<RawManifest>,
    /// The manifest pushed under the tag.
    pub tagged: RawManifest,
    /// The image manifests copied (one, or every child of an index).
    pub images: Vec<ImageManifest>,
    /// Configs and distributable layers, deduplicated, largest first (the long transfers
    /// start early and the tail is short).
    pub blobs: Vec<Blob>,
    /// Non-distributable layers, left out.
    pub foreign: Vec<String>,
    pub config_digest: Option<String>,
    /// The source was an index and the image was chosen from it by platform.
    pub from_index: bool,
}

pub(super) async fn plan(
    source: &Source,
    src: &Wanted,
    options: &CopyOptions,
) -> Result<Plan, CopyError> {
    let top = source.top_manifest(src).await?;

    let mut children: Vec<RawManifest> = Vec::new();
    let mut images = Vec::new();
    let from_index = top.kind.is_index();
    let tagged = if top.kind.is_index() {
        let entries = top.index()?;
        match &options.platforms {
            PlatformChoice::All => {
                for entry in &entries {
                    let child = fetch_child(source, &top, entry).await?;
                    images.push(child.image()?);
                    children.push(child);
                }
                top
            }
            PlatformChoice::One(platform) => {
                let entry = select_platform(&entries, platform).ok_or_else(|| {
                    CopyError::PlatformMismatch(format!(
                        "{src} has no {platform} image (it has: {})",
                        platforms_listed(&entries)
                    ))
                })?;
                let child = fetch_child(source, &top, entry).await?;
                images.push(child.image()?);
                child
            }
        }
    } else {
        images.push(top.image()?);
        top
    };
    if images.is_empty() {
        return Err(
            ManifestError::Invalid(format!("index {} lists no manifests", tagged.digest)).into(),
        );
    }
    if options.runnable.is_some()
        && let Some(problem) = images[0].artifact_problem()
    {
        return Err(CopyError::NotAContainerImage(format!("{src}: {problem}")));
    }

    let config_digest = match &options.platforms {
        PlatformChoice::All if tagged.kind.is_index() => {
            let entries = tagged.index()?;
            let default = select_platform(&entries, &Platform::default()).map(|e| e.digest.clone());
            children
                .iter()
                .zip(&images)
                .find(|(c, _)| Some(&c.digest) == default.as_ref())
                .map(|(_, i)| i.config.digest.clone())
        }
        _ => images.first().map(|i| i.config.digest.clone()),
    };
    let mut blobs: Vec<Blob> = Vec::new();
    let mut seen = HashSet::new();
    let mut foreign = Vec::new();
    for image in &images {
        for blob in std::iter::once(&image.config).chain(&image.layers) {
            if seen.insert(blob.digest.clone()) {
                blobs.push(blob.clone());
            }
        }
        foreign.extend(image.foreign.iter().map(|b| b.digest.clone()));
    }
    for digest in &foreign {
        tracing::warn!(%digest, "non-distributable layer left out of the copy");
    }
    blobs.sort_by_key(|b| std::cmp::Reverse(b.size));
    Ok(Plan {
        children,
        tagged,
        images,
        blobs,
        foreign,
        config_digest,
        from_index,
    })
}

/// The best index entry for `platform`, if any.
pub fn select_platform<'a>(
    entries: &'a [IndexEntry],
    platform: &Platform,
) -> Option<&'a IndexEntry> {
    entries
        .iter()
        .filter(|e| match (&e.os, &e.architecture) {
            (Some(os), Some(arch)) => platform.matches(os, arch, e.variant.as_deref()),
            _ => false,
        })
        .min_by_key(|e| {
            platform.rank(
                e.architecture.as_deref().unwrap_or(""),
                e.variant.as_deref(),
            )
        })
}

async fn fetch_child(
    source: &Source,
    index: &RawManifest,
    entry: &IndexEntry,
) -> Result<RawManifest, CopyError> {
    if entry.digest == index.digest {
        return Err(ManifestError::Invalid(format!(
            "index {} lists itself as an entry",
            index.digest
        ))
        .into());
    }
    let child = source.manifest(&entry.digest).await?;
    if child.kind.is_index() {
        return Err(ManifestError::Unsupported(format!(
            "index entry {} is itself an index; nested indexes are not supported",
            entry.digest
        ))
        .into());
    }
    Ok(child)
}

/// The platforms an index offers, for a message: each once, at most [`LISTED_PLATFORMS`] of
/// them (an index is the upstream's to write, and may list thousands), each cut short.
fn platforms_listed(entries: &[IndexEntry]) -> String {
    let mut seen = std::collections::BTreeSet::new();
    let mut listed: Vec<String> = Vec::new();
    for entry in entries {
        let text = crate::text::clean(&entry.platform_text(), 64);
        if seen.insert(text.clone()) && listed.len() < LISTED_PLATFORMS {
            listed.push(text);
        }
    }
    if seen.len() > listed.len() {
        listed.push(format!("and {} more", seen.len() - listed.len()));
    }
    listed.join(", ")
}

/// How many platforms a mismatch message names.
const LISTED_PLATFORMS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(arch: &str) -> IndexEntry {
        IndexEntry {
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 1,
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            os: Some("linux".into()),
            architecture: Some(arch.into()),
            variant: None,
        }
    }

    #[test]
    fn a_mismatch_names_a_bounded_number_of_platforms_once_each() {
        let mut entries: Vec<IndexEntry> = (0..40).map(|n| entry(&format!("arch{n}"))).collect();
        entries.push(entry("arch0"));
        entries.push(entry(&"x".repeat(10_000)));
        let listed = platforms_listed(&entries);
        assert!(listed.starts_with("linux/arch0, linux/arch1,"), "{listed}");
        assert_eq!(listed.matches("linux/").count(), 16, "{listed}");
        assert!(listed.ends_with("and 25 more"), "{listed}");
        assert!(listed.len() < 16 * 70 + 20, "{} chars", listed.len());
        assert_eq!(platforms_listed(&[entry("amd64")]), "linux/amd64");
    }
}
