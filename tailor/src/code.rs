//! The one vocabulary of error codes: what the library's errors report, what a failed staging
//! records, what the HTTP API answers in `{"code", "message"}` and what the CLI prints with
//! `--json`.
//!
//! A code is a stable identifier clients branch on; the message beside it is for humans and
//! may change. `specs/openapi.yaml` lists every code (`ErrorCode`) and which ones each
//! operation answers; a test keeps that list equal to [`Code::ALL`], and stager-api counts any
//! answer the contract does not document. New codes may be added (the enum is
//! `#[non_exhaustive]`); a published code is never renamed.

use std::fmt;
use std::str::FromStr;

macro_rules! codes {
    ($($(#[$doc:meta])* $variant:ident = $text:literal: $meaning:literal,)+) => {
        /// A stable error code (see the module documentation).
        #[non_exhaustive]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, sqlx::Type)]
        #[sqlx(type_name = "text")]
        pub enum Code {
            $($(#[$doc])* #[doc = $meaning] #[serde(rename = $text)] #[sqlx(rename = $text)] $variant,)+
        }

        impl Code {
            /// Every code, in the order `specs/openapi.yaml` lists them.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)+];

            /// The code as clients see it (`IMAGE_NOT_FOUND`).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Code::$variant => $text,)+
                }
            }

            /// What the code means, in one sentence (the contract's description of it).
            pub fn meaning(self) -> &'static str {
                match self {
                    $(Code::$variant => $meaning,)+
                }
            }
        }
    };
}

codes! {
    // A staging's source and its image.
    ImageNotFound = "IMAGE_NOT_FOUND": "The image, tag or blob is not on its registry.",
    Unauthorized = "UNAUTHORIZED": "Credentials were missing or refused: the API's bearer token, or a registry's login.",
    Denied = "DENIED": "The registry refused access to the image (403).",
    RateLimited = "RATE_LIMITED": "The source registry is rate limiting, and its wait does not fit before the staging's deadline.",
    UpstreamUnreachable = "UPSTREAM_UNREACHABLE": "The source registry could not be reached or kept failing (5xx).",
    Timeout = "TIMEOUT": "Something did not finish in time: a registry's answer, a transfer below the throughput floor, or the staging before its deadline.",
    ResponseTooLarge = "RESPONSE_TOO_LARGE": "A registry's answer was over its size limit and was refused unread.",
    UpstreamProtocolError = "UPSTREAM_PROTOCOL_ERROR": "The source registry answered something the distribution protocol does not allow.",
    DigestMismatch = "DIGEST_MISMATCH": "Content did not match the digest it was fetched by; none of it was kept.",
    ManifestInvalid = "MANIFEST_INVALID": "A manifest or index that does not parse or breaks the OCI rules.",
    UnsupportedMediaType = "UNSUPPORTED_MEDIA_TYPE": "A media type tailor does not accept: a manifest's, or a request body's Content-Type.",
    PlatformMismatch = "PLATFORM_MISMATCH": "The image has nothing for the staging's platform, or its config names another one.",
    NotAContainerImage = "NOT_A_CONTAINER_IMAGE": "An artifact (a Helm chart, an SBOM, a signature), not an image a runtime can run.",
    ImageConfigInvalid = "IMAGE_CONFIG_INVALID": "The image's config blob does not parse as an image configuration.",
    ImageMetadataTooLarge = "IMAGE_METADATA_TOO_LARGE": "The image's config holds more metadata (command, ports) than a staging result may carry.",
    // Where tailor may and may not go.
    EgressDenied = "EGRESS_DENIED": "The egress policy refused a destination: an image's registry, a token realm, a redirect or a callback.",
    InternalSourceRefused = "INTERNAL_SOURCE_REFUSED": "The image names tailor's internal registry, under some spelling; tenants may not read from it.",
    // The internal registry.
    InternalRegistryError = "INTERNAL_REGISTRY_ERROR": "The internal registry failed; the tenant did nothing wrong.",
    InternalRegistryReadOnly = "INTERNAL_REGISTRY_READ_ONLY": "The internal registry is in a read-only maintenance window.",
    // How a staging ended other than by its copy's own error.
    Cancelled = "CANCELLED": "The staging was cancelled before it finished.",
    AttemptsExhausted = "ATTEMPTS_EXHAUSTED": "Every attempt the staging was allowed failed with a transient error.",
    CredentialsUnavailable = "CREDENTIALS_UNAVAILABLE": "The staging's stored credentials could not be decrypted by the worker that ran it.",
    InternalError = "INTERNAL_ERROR": "An unexpected failure inside tailor; the details are in its log.",
    // Requests.
    InvalidReference = "INVALID_REFERENCE": "The image reference does not parse.",
    InvalidPlatform = "INVALID_PLATFORM": "The platform is not os/arch or os/arch/variant.",
    InvalidCredentials = "INVALID_CREDENTIALS": "The credentials are incomplete: an empty username or password, or one without the other.",
    InvalidTimeout = "INVALID_TIMEOUT": "The requested deadline is outside 1 second to 24 hours.",
    InvalidCallback = "INVALID_CALLBACK": "The completion callback is not an http(s) URL with a host, or it carries credentials.",
    InvalidGuid = "INVALID_GUID": "A GUID in the path or the body does not parse.",
    InvalidQuery = "INVALID_QUERY": "A query parameter is unknown or malformed.",
    InvalidMode = "INVALID_MODE": "The staging mode is neither copy nor pin, or pin was asked for an OCI layout (which has no upstream reference to pin).",
    InvalidLifecycleData = "INVALID_LIFECYCLE_DATA": "The Cloud Controller's lifecycle_data is malformed.",
    UnsupportedLifecycle = "UNSUPPORTED_LIFECYCLE": "The Cloud Controller asked for a lifecycle other than docker.",
    CredentialsNotAccepted = "CREDENTIALS_NOT_ACCEPTED": "This stager has no key to hold credentials (TAILOR_CREDENTIALS_KEY).",
    StagingConflict = "STAGING_CONFLICT": "The staging GUID already names a staging with a different request.",
    MalformedJson = "MALFORMED_JSON": "The request body is not JSON of the expected shape.",
    PayloadTooLarge = "PAYLOAD_TOO_LARGE": "The request body is over its size limit.",
    NotFound = "NOT_FOUND": "No such route, staging or app.",
    TooManyReferenceSyncs = "TOO_MANY_REFERENCE_SYNCS": "Too many reference syncs are being read at once; retry after the Retry-After delay.",
    SuspiciousReferenceList = "SUSPICIOUS_REFERENCE_LIST": "A reference sync would unreference most stagings in use; it was refused and nothing changed.",
    DatabaseUnavailable = "DATABASE_UNAVAILABLE": "PostgreSQL could not be reached; nothing was written.",
    // Operators' tools: the CLI, configuration, start-up.
    InvalidArgument = "INVALID_ARGUMENT": "A command-line argument is invalid.",
    ConfigMissing = "CONFIG_MISSING": "A required setting is not set.",
    ConfigInvalid = "CONFIG_INVALID": "A setting does not parse or is out of range.",
    MigrationFailed = "MIGRATION_FAILED": "The database schema could not be migrated.",
    DatabaseError = "DATABASE_ERROR": "A database statement failed.",
    PruneAlreadyRunning = "PRUNE_ALREADY_RUNNING": "Another prune run holds the prune lock.",
    HttpClientSetupFailed = "HTTP_CLIENT_SETUP_FAILED": "An HTTP client could not be built from the configuration (its TLS roots, its proxy).",
    ComponentNotInstalled = "COMPONENT_NOT_INSTALLED": "An embedded component (PostgreSQL, the registry) is not installed.",
    ComponentStartFailed = "COMPONENT_START_FAILED": "An embedded component did not start.",
    ComponentIoError = "COMPONENT_IO_ERROR": "An embedded component's files could not be written or read.",
    LayoutInvalid = "LAYOUT_INVALID": "A location is not an OCI image layout that can be used, or its entries contradict themselves.",
    LocationIoError = "LOCATION_IO_ERROR": "Reading or writing a location (an OCI layout's directory or bucket) failed.",
    LocationNotFound = "LOCATION_NOT_FOUND": "A location's bucket does not exist.",
    LocationDenied = "LOCATION_DENIED": "The object store refused the credentials, or access to the bucket.",
    LocationNotAllowed = "LOCATION_NOT_ALLOWED": "A staging's image names an OCI layout outside the locations the operator enabled (TAILOR_SOURCE_LOCATIONS).",
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not one of the codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an error code")]
pub struct UnknownCode(String);

impl FromStr for Code {
    type Err = UnknownCode;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Code::ALL
            .iter()
            .copied()
            .find(|code| code.as_str() == text)
            .ok_or_else(|| UnknownCode(text.to_owned()))
    }
}

/// Lets tests and callers compare with the wire form: `assert_eq!(error.code(), "TIMEOUT")`.
impl PartialEq<&str> for Code {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_code_is_screaming_snake_case_and_unique() {
        let mut seen = HashSet::new();
        for code in Code::ALL {
            let text = code.as_str();
            assert!(
                text.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
                    && !text.starts_with('_')
                    && !text.ends_with('_'),
                "{text}"
            );
            assert!(seen.insert(text), "{text} twice");
            assert!(code.meaning().ends_with('.'), "{text}: {}", code.meaning());
        }
        assert!(Code::ALL.len() >= 40, "{} codes", Code::ALL.len());
    }

    #[test]
    fn the_wire_form_is_the_same_in_json_in_text_and_after_parsing() {
        for &code in Code::ALL {
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json, serde_json::Value::String(code.as_str().into()));
            assert_eq!(serde_json::from_value::<Code>(json).unwrap(), code);
            assert_eq!(code.to_string().parse::<Code>().unwrap(), code);
        }
        assert_eq!(
            "image_not_found".parse::<Code>(),
            Err(UnknownCode("image_not_found".into()))
        );
        assert!(serde_json::from_str::<Code>("\"NO_SUCH_CODE\"").is_err());
    }
}
