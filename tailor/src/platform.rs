//! Platforms (`os/arch[/variant]`) and how an index entry is chosen for one.

use std::fmt;

use crate::code::Code;

/// A target platform such as `linux/amd64` or `linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid platform {0:?}: expected os/arch or os/arch/variant, e.g. linux/amd64 or linux/arm64/v8"
)]
pub struct PlatformError(pub String);

impl PlatformError {
    pub fn code(&self) -> Code {
        Code::InvalidPlatform
    }
}

impl Default for Platform {
    fn default() -> Self {
        Self {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl Platform {
    pub fn parse(text: &str) -> Result<Self, PlatformError> {
        let parts: Vec<&str> = text.split('/').collect();
        let valid = |s: &&str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(valid) {
            return Err(PlatformError(text.to_owned()));
        }
        Ok(Self {
            os: parts[0].to_ascii_lowercase(),
            architecture: parts[1].to_ascii_lowercase(),
            variant: parts.get(2).map(|v| v.to_ascii_lowercase()),
        })
    }

    /// Whether an index entry for `os/architecture/variant` serves this platform. Without a
    /// requested variant any variant matches (the preferred one is chosen by [`Self::rank`]);
    /// `arm64` without a variant and `arm64/v8` are the same thing.
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        if self.os != os || self.architecture != architecture {
            return false;
        }
        match &self.variant {
            None => true,
            Some(wanted) => {
                normalise_variant(architecture, variant)
                    == normalise_variant(architecture, Some(wanted))
            }
        }
    }

    /// Lower is better among matching entries: an entry without a variant, or with the
    /// architecture's default variant, comes first.
    pub fn rank(&self, architecture: &str, variant: Option<&str>) -> u8 {
        match normalise_variant(architecture, variant) {
            None => 0,
            Some(v) if Some(v.as_str()) == default_variant(architecture) => 0,
            Some(_) => 1,
        }
    }
}

fn default_variant(architecture: &str) -> Option<&'static str> {
    match architecture {
        "arm64" => Some("v8"),
        "arm" => Some("v7"),
        _ => None,
    }
}

fn normalise_variant(architecture: &str, variant: Option<&str>) -> Option<String> {
    match (architecture, variant) {
        ("arm64", Some("v8")) | ("arm64", None) => None,
        (_, v) => v.map(str::to_ascii_lowercase),
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        assert_eq!(
            Platform::parse("linux/arm64/v8").unwrap().to_string(),
            "linux/arm64/v8"
        );
        assert_eq!(Platform::default().to_string(), "linux/amd64");
        for bad in ["linux", "linux/", "a/b/c/d", "linux/amd 64"] {
            assert!(Platform::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn variants_match_sensibly() {
        let arm64 = Platform::parse("linux/arm64").unwrap();
        assert!(arm64.matches("linux", "arm64", Some("v8")));
        assert!(arm64.matches("linux", "arm64", None));
        let armv7 = Platform::parse("linux/arm/v7").unwrap();
        assert!(armv7.matches("linux", "arm", Some("v7")));
        assert!(!armv7.matches("linux", "arm", Some("v6")));
        let arm = Platform::parse("linux/arm").unwrap();
        assert!(arm.rank("arm", Some("v7")) < arm.rank("arm", Some("v6")));
        assert!(!Platform::default().matches("windows", "amd64", None));
    }
}
