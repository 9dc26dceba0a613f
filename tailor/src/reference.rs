//! Image references, parsed (not merely validated) into [`ImageReference`].
//!
//! The grammar is the distribution project's, with Docker's defaults: `redis` means
//! `docker.io/library/redis:latest`, and `docker.io` is served from `registry-1.docker.io`.
//! A first path component is a registry host when it contains `.` or `:` or is `localhost`.
//!
//! Why not `oci_spec::distribution::Reference` (which `oci-client` re-exports): a reference is
//! hostile input from a tenant, and the API answers a bad one with exactly what is wrong. That
//! type's errors name only a class ("invalid reference format", "invalid tag format"), not the
//! part or the limit, and it resolves `docker.io` to `index.docker.io`, the legacy name that
//! answers the distribution API only through redirects, where tailor speaks to
//! `registry-1.docker.io` directly. The grammar is the same; the tests below pin it.

use std::fmt;

use crate::code::Code;

/// Docker Hub's name in references and the host its API is served from.
pub const DOCKER_HUB: &str = "docker.io";
pub const DOCKER_HUB_ENDPOINT: &str = "registry-1.docker.io";
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// Why a string is not an image reference. The message says exactly what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {input:?}: {problem}")]
pub struct ReferenceError {
    pub input: String,
    pub problem: String,
}

impl ReferenceError {
    pub fn code(&self) -> Code {
        Code::InvalidReference
    }
}

/// A fully qualified image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageReference {
    /// Registry as named in references (`docker.io`, `ghcr.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository path (`library/redis`).
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

impl ImageReference {
    /// Parses `input`, resolving short names against `default_registry` (normally `docker.io`).
    pub fn parse_with_default(input: &str, default_registry: &str) -> Result<Self, ReferenceError> {
        let fail = |problem: String| ReferenceError {
            input: input.to_owned(),
            problem,
        };
        if input.is_empty() {
            return Err(fail("it is empty".into()));
        }
        if input.trim() != input || input.chars().any(char::is_whitespace) {
            return Err(fail("it contains whitespace".into()));
        }
        if input.contains("://") {
            return Err(fail(
                "a reference has no scheme; drop the http:// or https:// prefix".into(),
            ));
        }

        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => (rest, Some(parse_digest(digest).map_err(fail)?)),
            None => (input, None),
        };
        // A tag follows the last ':' unless that colon belongs to a host:port in the first component.
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i + 1..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(fail)?;
        }
        if name.is_empty() {
            return Err(fail("the repository name is missing".into()));
        }

        let (registry, repository) = match name.split_once('/') {
            Some((first, rest)) if looks_like_host(first) => (first.to_owned(), rest.to_owned()),
            _ => (default_registry.to_owned(), name.to_owned()),
        };
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_owned()
        } else {
            registry
        };
        validate_host(&registry).map_err(fail)?;
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        validate_repository(&repository).map_err(fail)?;
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(fail(format!(
                "the name is longer than {MAX_NAME_LEN} characters"
            )));
        }
        Ok(Self {
            registry,
            repository,
            tag: tag.map(str::to_owned),
            digest,
        })
    }

    /// Parses `input` with Docker Hub as the default registry.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        Self::parse_with_default(input, DOCKER_HUB)
    }

    /// The host:port the registry API is served from.
    pub fn endpoint(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_ENDPOINT
        } else {
            &self.registry
        }
    }

    /// What to ask the registry for: the digest if pinned, else the tag, else `latest`.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The tag, defaulting to `latest`.
    pub fn tag_or_latest(&self) -> &str {
        self.tag.as_deref().unwrap_or("latest")
    }

    /// `registry/repository`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The same repository pinned to `digest`.
    pub fn pinned(&self, digest: &str) -> String {
        format!("{}@{digest}", self.name())
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ImageReference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn looks_like_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// Checks `sha256:<64 lowercase hex>`; returns it unchanged.
pub fn parse_digest(digest: &str) -> Result<String, String> {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Err(format!(
            "digest {digest:?} must look like sha256:<64 hex digits>"
        ));
    };
    if algorithm != "sha256" {
        return Err(format!(
            "digest algorithm {algorithm:?} is not supported (only sha256)"
        ));
    }
    if hex.len() != 64
        || !hex
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        return Err(format!(
            "digest {digest:?} must have exactly 64 lowercase hex digits"
        ));
    }
    Ok(digest.to_owned())
}

fn validate_tag(tag: &str) -> Result<(), String> {
    let valid_start = tag
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if tag.is_empty() {
        return Err("the tag after ':' is empty".into());
    }
    if tag.len() > MAX_TAG_LEN {
        return Err(format!("tag is longer than {MAX_TAG_LEN} characters"));
    }
    if !valid_start
        || !tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(format!(
            "tag {tag:?} may contain only letters, digits, '_', '.', '-', and must not start with '.' or '-'"
        ));
    }
    Ok(())
}

fn validate_host(registry: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("registry {registry:?} has an unclosed '['"))?;
        (host, after.strip_prefix(':'))
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (registry, None),
        }
    };
    if let Some(port) = port
        && (port.is_empty() || port.parse::<u16>().is_err())
    {
        return Err(format!(
            "registry {registry:?} has an invalid port {port:?}"
        ));
    }
    let ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
        && !host.starts_with(['-', '.'])
        && !host.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "registry host {host:?} is not a valid hostname or IP address"
        ))
    }
}

fn validate_repository(repository: &str) -> Result<(), String> {
    for component in repository.split('/') {
        if component.is_empty() {
            return Err(format!(
                "repository {repository:?} has an empty path component"
            ));
        }
        if component.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(format!("repository {repository:?} must be lowercase"));
        }
        if !valid_path_component(component) {
            return Err(format!(
                "path component {component:?} must be [a-z0-9] separated by '.', '_', '__' or '-'"
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !bytes.first().is_some_and(|b| alnum(*b)) || !bytes.last().is_some_and(|b| alnum(*b)) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = matches!(separator, "." | "_" | "__") || separator.chars().all(|c| c == '-');
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(input: &str) -> (String, String, Option<String>, Option<String>) {
        let r = ImageReference::parse(input).unwrap();
        (r.registry, r.repository, r.tag, r.digest)
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_defaults() {
        assert_eq!(
            parts("redis"),
            ("docker.io".into(), "library/redis".into(), None, None)
        );
        let r = ImageReference::parse("redis").unwrap();
        assert_eq!(r.endpoint(), "registry-1.docker.io");
        assert_eq!(r.manifest_reference(), "latest");
        assert_eq!(
            parts("bitnami/redis:7"),
            (
                "docker.io".into(),
                "bitnami/redis".into(),
                Some("7".into()),
                None
            )
        );
    }

    #[test]
    fn hosts_ports_tags_and_digests() {
        assert_eq!(
            parts("127.0.0.1:5000/app/web:v1.2"),
            (
                "127.0.0.1:5000".into(),
                "app/web".into(),
                Some("v1.2".into()),
                None
            )
        );
        assert_eq!(parts("localhost/app").0, "localhost");
        assert_eq!(parts("ghcr.io/org/app").0, "ghcr.io");
        let r = ImageReference::parse(&format!("quay.io/org/app:v1@{D}")).unwrap();
        assert_eq!(
            (r.tag.as_deref(), r.digest.as_deref()),
            (Some("v1"), Some(D))
        );
        assert_eq!(r.manifest_reference(), D);
        assert_eq!(r.to_string(), format!("quay.io/org/app:v1@{D}"));
        assert_eq!(
            ImageReference::parse("index.docker.io/library/busybox")
                .unwrap()
                .registry,
            "docker.io"
        );
        assert_eq!(parts("[::1]:5000/app:v1").0, "[::1]:5000");
    }

    #[test]
    fn default_registry_can_be_overridden() {
        let r = ImageReference::parse_with_default("busybox:1", "127.0.0.1:5000").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("127.0.0.1:5000", "busybox")
        );
    }

    #[test]
    fn bad_input_is_rejected_precisely() {
        for (input, needle) in [
            ("", "empty"),
            ("Redis", "lowercase"),
            ("redis:", "tag after ':' is empty"),
            ("redis:-bad", "must not start"),
            ("https://docker.io/redis", "scheme"),
            ("redis@sha256:abc", "64 lowercase hex"),
            ("redis@md5:0123", "not supported"),
            ("a//b", "empty path component"),
            ("app/we..b", "path component"),
            ("localhost:99999/app", "invalid port"),
            ("red is", "whitespace"),
        ] {
            let err = ImageReference::parse(input).unwrap_err();
            assert!(err.to_string().contains(needle), "{input:?}: {err}");
            assert_eq!(err.code(), "INVALID_REFERENCE");
        }
    }

    #[test]
    fn path_components_follow_the_grammar() {
        for ok in ["a", "a.b", "a_b", "a__b", "a---b", "a1"] {
            assert!(valid_path_component(ok), "{ok}");
        }
        for bad in ["-a", "a-", "a..b", "a___b", "a._b", "_a"] {
            assert!(!valid_path_component(bad), "{bad}");
        }
    }
}
