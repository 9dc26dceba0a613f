//! Stagings from OCI image layouts, for sites that ship images by bucket or by disk instead of
//! by registry: a request's image may be `oci:DIR[:TAG]` or `s3://BUCKET/PREFIX[:TAG]`, but
//! only under a location the operator enabled (`TAILOR_SOURCE_LOCATIONS`), never elsewhere.
//!
//! - A tenant names a layout, never where or how it is reached: a directory must be an
//!   absolute path without `.` or `..` under an enabled directory; a bucket location takes no
//!   query, and its endpoint, region and addressing come from the enabled entry it falls under
//!   (the workers' AWS credentials reach only what the operator pointed them at).
//! - The stored source is the tenant's text; each worker resolves it again against its own
//!   setting, so disabling a location stops stagings from it that are still queued.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use crate::code::Code;
use crate::layout::{Layout, LayoutError, OciDir, S3Layout, S3Location};
use crate::reference::ImageReference;

/// Longest layout source accepted.
pub const MAX_SOURCE_BYTES: usize = 1024;

/// What a staging copies from: a registry's image, or an image in an enabled OCI layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StagingSource {
    Image(ImageReference),
    /// `oci:DIR[:TAG]` or `s3://BUCKET/PREFIX[:TAG]`, as the request named it.
    Layout(String),
}

impl StagingSource {
    /// Whether `text` names a layout rather than a registry's image: `oci:` followed by an
    /// absolute path (so a registry host named `oci`, as in `oci:5000/team/app`, stays a
    /// registry), or `s3://`.
    pub fn names_layout(text: &str) -> bool {
        text.starts_with("oci:/") || text.starts_with("s3://")
    }

    /// A stored source read back (it was checked when it was stored).
    pub fn parse_stored(text: &str) -> Result<Self, String> {
        if Self::names_layout(text) {
            Ok(Self::Layout(text.to_owned()))
        } else {
            ImageReference::parse(text)
                .map(Self::Image)
                .map_err(|e| e.to_string())
        }
    }

    /// The registry's image, if the source is one.
    pub fn image(&self) -> Option<&ImageReference> {
        match self {
            Self::Image(image) => Some(image),
            Self::Layout(_) => None,
        }
    }
}

impl fmt::Display for StagingSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Image(image) => image.fmt(f),
            Self::Layout(text) => f.write_str(text),
        }
    }
}

/// Why a layout source is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct LocationRefused {
    code: Code,
    message: String,
}

impl LocationRefused {
    fn not_allowed(message: String) -> Self {
        Self {
            code: Code::LocationNotAllowed,
            message,
        }
    }

    fn invalid(message: String) -> Self {
        Self {
            code: Code::InvalidReference,
            message,
        }
    }

    pub fn code(&self) -> Code {
        self.code
    }
}

/// The layouts stagings may read (`TAILOR_SOURCE_LOCATIONS`): directories, and bucket
/// prefixes with how to reach them. Empty by default: no staging reads a layout.
#[derive(Debug, Clone, Default)]
pub struct SourceLocations {
    /// The setting's entries as written (what two settings are compared by).
    entries: Vec<String>,
    dirs: Vec<PathBuf>,
    /// An enabled bucket prefix (no tag), and its query (endpoint, region, path_style).
    buckets: Vec<(S3Location, String)>,
}

/// A layout source resolved against the enabled locations.
#[derive(Debug, Clone)]
pub enum Resolved {
    Dir { dir: PathBuf, tag: Option<String> },
    Bucket(S3Location),
}

impl Resolved {
    /// Opens the layout (it must exist), and the tag named, if any.
    pub async fn open(self) -> Result<(Layout, Option<String>), LayoutError> {
        match self {
            Self::Dir { dir, tag } => {
                let dir = tokio::task::spawn_blocking(move || OciDir::open(&dir))
                    .await
                    .expect("opening a layout does not panic")?;
                Ok((dir.into(), tag))
            }
            Self::Bucket(location) => {
                let tag = location.tag().map(str::to_owned);
                Ok((S3Layout::open(&location).await?.into(), tag))
            }
        }
    }
}

impl PartialEq for SourceLocations {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl Eq for SourceLocations {}

impl SourceLocations {
    /// Parses a comma-separated list of `oci:DIR` (absolute) and
    /// `s3://BUCKET/PREFIX[?endpoint=URL&region=R&path_style=BOOL]` entries, without tags.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut locations = Self::default();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            locations.entries.push(entry.to_owned());
            if let Some(dir) = entry.strip_prefix("oci:") {
                let dir = Path::new(dir);
                if !plain_absolute(dir) {
                    return Err(format!(
                        "{entry}: a directory is an absolute path without '.' or '..'"
                    ));
                }
                locations.dirs.push(dir.to_owned());
            } else if entry.starts_with("s3://") {
                let location = S3Location::parse(entry).map_err(|e| e.to_string())?;
                if location.tag().is_some() {
                    return Err(format!("{entry}: an enabled location names no tag"));
                }
                let query = entry.split_once('?').map(|(_, q)| q).unwrap_or("");
                locations.buckets.push((location, query.to_owned()));
            } else {
                return Err(format!(
                    "{entry}: write oci:/DIR or s3://BUCKET/PREFIX[?endpoint=URL&region=R]"
                ));
            }
        }
        Ok(locations)
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty() && self.buckets.is_empty()
    }

    /// Resolves a request's layout source, or says why it may not be read.
    pub fn resolve(&self, text: &str) -> Result<Resolved, LocationRefused> {
        let shown = crate::text::clean(text, 200);
        if text.len() > MAX_SOURCE_BYTES || text.chars().any(char::is_control) {
            return Err(LocationRefused::invalid(format!(
                "{shown}: a layout source is at most {MAX_SOURCE_BYTES} bytes without control \
                 characters"
            )));
        }
        if self.is_empty() {
            return Err(LocationRefused::not_allowed(format!(
                "{shown}: this stager reads images from registries only (no \
                 TAILOR_SOURCE_LOCATIONS)"
            )));
        }
        if let Some(rest) = text.strip_prefix("oci:") {
            let (dir, tag) = match rest.split_once(':') {
                Some((dir, tag)) => (dir, Some(tag)),
                None => (rest, None),
            };
            if let Some(tag) = tag {
                crate::layout::check_tag(tag)
                    .map_err(|e| LocationRefused::invalid(format!("{shown}: {e}")))?;
            }
            let dir = Path::new(dir);
            if !plain_absolute(dir) {
                return Err(LocationRefused::invalid(format!(
                    "{shown}: the directory must be an absolute path without '.' or '..'"
                )));
            }
            if !self.dirs.iter().any(|enabled| dir.starts_with(enabled)) {
                return Err(LocationRefused::not_allowed(format!(
                    "{shown}: not under a directory this stager reads from"
                )));
            }
            return Ok(Resolved::Dir {
                dir: dir.to_owned(),
                tag: tag.map(str::to_owned),
            });
        }
        if text.contains('?') {
            return Err(LocationRefused::invalid(format!(
                "{shown}: a staging's bucket location takes no query; the endpoint and region \
                 are the operator's"
            )));
        }
        let asked = S3Location::parse(text)
            .map_err(|e| LocationRefused::invalid(format!("{shown}: {e}")))?;
        let (_, query) = self
            .buckets
            .iter()
            .find(|(enabled, _)| {
                enabled.bucket() == asked.bucket()
                    && (enabled.prefix().is_empty()
                        || asked.prefix() == enabled.prefix()
                        || asked
                            .prefix()
                            .strip_prefix(enabled.prefix())
                            .is_some_and(|rest| rest.starts_with('/')))
            })
            .ok_or_else(|| {
                LocationRefused::not_allowed(format!(
                    "{shown}: not under a bucket prefix this stager reads from"
                ))
            })?;
        let tag = asked.tag().map(|t| format!(":{t}")).unwrap_or_default();
        let reached = format!("s3://{}/{}{tag}?{query}", asked.bucket(), asked.prefix());
        S3Location::parse(&reached)
            .map(Resolved::Bucket)
            .map_err(|e| LocationRefused::invalid(format!("{shown}: {e}")))
    }
}

impl SourceLocations {
    /// Where `dir` (resolved already) really is, symbolic links followed, refused unless that
    /// too is under an enabled directory (really is): a link inside an enabled directory
    /// cannot lead a staging elsewhere. A directory that cannot be resolved (it is missing)
    /// is returned as it is, for opening it to say what is wrong. Blocking.
    pub fn real_dir(&self, dir: &Path) -> Result<PathBuf, LocationRefused> {
        let shown = dir.display();
        let Ok(real) = std::fs::canonicalize(dir) else {
            return Ok(dir.to_owned());
        };
        let allowed = self
            .dirs
            .iter()
            .filter_map(|enabled| std::fs::canonicalize(enabled).ok())
            .any(|enabled| real.starts_with(enabled));
        if !allowed {
            return Err(LocationRefused::not_allowed(format!(
                "{shown}: leads outside the directories this stager reads from"
            )));
        }
        Ok(real)
    }
}

/// An absolute path of plain names only.
fn plain_absolute(path: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> SourceLocations {
        SourceLocations::parse(
            "oci:/srv/images, s3://images/site-a?endpoint=http://127.0.0.1:8333&region=r1",
        )
        .unwrap()
    }

    #[test]
    fn only_layouts_under_an_enabled_location_resolve() {
        let locations = enabled();
        assert!(matches!(
            locations.resolve("oci:/srv/images/app:v1").unwrap(),
            Resolved::Dir { dir, tag } if dir == Path::new("/srv/images/app") && tag.as_deref() == Some("v1")
        ));
        let Resolved::Bucket(bucket) = locations.resolve("s3://images/site-a/app:v2").unwrap()
        else {
            panic!("a bucket")
        };
        assert_eq!(
            (bucket.bucket(), bucket.prefix(), bucket.tag()),
            ("images", "site-a/app", Some("v2"))
        );
        for (text, code) in [
            ("oci:/srv/images/a\u{0}b", Code::InvalidReference),
            (
                &*format!("oci:/srv/images/{}", "a".repeat(2000)),
                Code::InvalidReference,
            ),
            ("oci:/srv/imagesX/app", Code::LocationNotAllowed),
            ("oci:/srv/images/../etc", Code::InvalidReference),
            ("oci:relative/app", Code::InvalidReference),
            ("oci:/etc", Code::LocationNotAllowed),
            ("s3://images/site-b/app", Code::LocationNotAllowed),
            ("s3://images/site-ab", Code::LocationNotAllowed),
            ("s3://other/site-a", Code::LocationNotAllowed),
            (
                "s3://images/site-a?endpoint=http://169.254.169.254",
                Code::InvalidReference,
            ),
        ] {
            assert_eq!(locations.resolve(text).unwrap_err().code(), code, "{text}");
        }
        assert_eq!(
            SourceLocations::default()
                .resolve("oci:/srv/images")
                .unwrap_err()
                .code(),
            Code::LocationNotAllowed
        );
    }

    #[test]
    fn a_symbolic_link_cannot_lead_out_of_an_enabled_directory() {
        let (enabled, outside) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::create_dir(enabled.path().join("real")).unwrap();
        std::os::unix::fs::symlink(outside.path(), enabled.path().join("escape")).unwrap();
        let locations =
            SourceLocations::parse(&format!("oci:{}", enabled.path().display())).unwrap();
        let real = enabled.path().join("real");
        assert_eq!(
            locations.real_dir(&real).unwrap(),
            std::fs::canonicalize(&real).unwrap()
        );
        assert_eq!(
            locations
                .real_dir(&enabled.path().join("escape"))
                .unwrap_err()
                .code(),
            Code::LocationNotAllowed
        );
        assert!(!StagingSource::names_layout("oci:5000/team/app"));
    }

    #[test]
    fn the_setting_refuses_what_it_cannot_enforce() {
        for list in [
            "oci:relative",
            "oci:/a/../b",
            "s3://images/p:tag",
            "docker://x",
        ] {
            assert!(SourceLocations::parse(list).is_err(), "{list}");
        }
        assert!(SourceLocations::parse("").unwrap().is_empty());
    }
}
