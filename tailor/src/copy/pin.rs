//! Pinning without copying (a staging's `pin` mode): upstream's manifest for the platform,
//! resolved from its tag, checked and its config read exactly as a copy would check them, and
//! the answer upstream's own reference pinned by digest. No blob but the config is read, and
//! nothing is written anywhere.

use super::plan;
use super::source::{Source, Wanted};
use super::{CopyOptions, PlatformChoice};
use crate::error::CopyError;
use crate::image_config::{ImageConfigError, RunInfo};
use crate::platform::Platform;
use crate::reference::ImageReference;
use crate::registry::Repository;

/// What pinning found.
#[derive(Debug, Clone)]
pub struct Pinned {
    /// Upstream's digest of the platform's image manifest (the child, for an index).
    pub source_digest: String,
    /// `registry/repository@digest`, upstream's: what runtimes pull.
    pub pinned: String,
    pub media_type: String,
    pub config_digest: String,
    /// How to run it: its config checked for the platform and startable.
    pub run: RunInfo,
}

/// Resolves `src` in `source` (its repository upstream) for `platform` and checks that it is a
/// container image that runs there, reading its manifests (bounded, verified against their
/// digests) and its config (bounded, verified). The refusals are a copy's, with its codes:
/// `PLATFORM_MISMATCH`, `NOT_A_CONTAINER_IMAGE`, `IMAGE_CONFIG_INVALID`, `DIGEST_MISMATCH`.
pub async fn pin(
    source: &Repository,
    src: &ImageReference,
    platform: &Platform,
    options: &CopyOptions,
) -> Result<Pinned, CopyError> {
    let options = CopyOptions {
        platforms: PlatformChoice::One(platform.clone()),
        runnable: Some(platform.clone()),
        ..options.clone()
    };
    super::cancellable(&options, async {
        let plan = plan::plan(
            &Source::registry(source.clone()),
            &Wanted::image(src),
            &options,
        )
        .await?;
        let config = &plan.images[0].config;
        let limit = source.registry().limits().config_bytes;
        if config.size > limit {
            return Err(CopyError::ImageConfig(ImageConfigError::TooLarge(format!(
                "the image config is {} bytes; at most {limit} are accepted",
                config.size
            ))));
        }
        let bytes = source
            .get_blob_bytes(&config.digest, limit)
            .await
            .map_err(CopyError::Source)?;
        let run = crate::image_config::inspect(&bytes, platform)?;
        Ok(Pinned {
            source_digest: plan.tagged.digest.clone(),
            pinned: src.pinned(&plan.tagged.digest),
            media_type: plan.tagged.media_type.clone(),
            config_digest: config.digest.clone(),
            run,
        })
    })
    .await
}
