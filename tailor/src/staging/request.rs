//! A staging request, parsed: [`NewStaging::parse`] owns every rule a request must meet before
//! it is stored, whichever API it came through (`POST /stage`, the Diego stager's `PUT`), and
//! a [`NewStaging`] cannot be made any other way.

use std::time::Duration;

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::location::{SourceLocations, StagingSource};
use super::{Api, Mode};
use crate::code::Code;
use crate::egress::{Egress, Purpose};
use crate::platform::Platform;
use crate::reference::ImageReference;
use crate::registry::{Credentials, Registries};

/// The longest deadline a caller may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A staging request as it arrived, whichever API it came through.
pub struct Requested<'a> {
    pub staging_guid: Uuid,
    pub app_guid: Uuid,
    pub image: &'a str,
    pub platform: Option<&'a str>,
    pub credentials: Option<Credentials>,
    pub completion_callback: Option<String>,
    pub api: Api,
    /// The caller's deadline for it (the Diego request's `timeout`); the setting otherwise.
    pub timeout: Option<Duration>,
    /// `copy` or `pin` as the caller spelled it (`mode`, the Diego request's `TAILOR_MODE`);
    /// the setting otherwise.
    pub mode: Option<&'a str>,
}

/// What this stager's configuration says a request may be.
pub struct Rules<'a> {
    pub egress: &'a Egress,
    /// Which registries are plain HTTP (port 80 by default).
    pub registries: &'a Registries,
    /// The registry of a reference that names none (`redis`).
    pub default_registry: &'a str,
    /// Whether this stager can hold credentials (it has `TAILOR_CREDENTIALS_KEY`).
    pub accepts_credentials: bool,
    /// The deadline of a staging whose caller names none.
    pub default_timeout: Duration,
    /// The OCI layouts a staging may name as its image (`TAILOR_SOURCE_LOCATIONS`).
    pub source_locations: &'a SourceLocations,
    /// The mode of a staging whose caller names none (`TAILOR_DEFAULT_MODE`).
    pub default_mode: Mode,
}

/// Why a request cannot be a staging: a stable code and a message saying exactly what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidRequest {
    code: Code,
    message: String,
}

impl InvalidRequest {
    fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn code(&self) -> Code {
        self.code
    }
}

/// A staging request that met every rule ([`NewStaging::parse`]); the only way to make one.
#[derive(Debug, Clone)]
pub struct NewStaging {
    staging_guid: Uuid,
    app_guid: Uuid,
    image: StagingSource,
    platform: Platform,
    mode: Mode,
    credentials: Option<Credentials>,
    completion_callback: Option<String>,
    api: Api,
    /// How long the staging may take from now, queue time included.
    timeout: Duration,
}

impl NewStaging {
    /// Checks everything a staging needs, refusing at once what the egress policy obviously
    /// denies (an image on a loopback or metadata address, the internal registry, a callback
    /// to tailor itself); what only name resolution reveals fails the staging later, with the
    /// same code.
    pub fn parse(requested: Requested<'_>, rules: &Rules<'_>) -> Result<Self, InvalidRequest> {
        let image = if StagingSource::names_layout(requested.image) {
            rules
                .source_locations
                .resolve(requested.image)
                .map_err(|refused| InvalidRequest::new(refused.code(), refused.to_string()))?;
            if requested.credentials.is_some() {
                return Err(InvalidRequest::new(
                    Code::InvalidCredentials,
                    "an OCI layout takes no credentials; the workers reach it with their own",
                ));
            }
            StagingSource::Layout(requested.image.to_owned())
        } else {
            StagingSource::Image(Self::registry_image(requested.image, rules)?)
        };
        let mode = match requested.mode {
            Some(text) => {
                Mode::parse(text).map_err(|e| InvalidRequest::new(Code::InvalidMode, e))?
            }
            None => rules.default_mode,
        };
        // A layout has no upstream reference a runtime could pull by digest: it is copied,
        // or refused if the caller asked for pin (a default of pin does not apply to it).
        let mode = match (&image, mode, requested.mode) {
            (StagingSource::Layout(_), Mode::Pin, Some(_)) => {
                return Err(InvalidRequest::new(
                    Code::InvalidMode,
                    "an OCI layout cannot be pinned: no runtime can pull from it, so it is \
                     always copied (mode \"copy\")",
                ));
            }
            (StagingSource::Layout(_), _, _) => Mode::Copy,
            (StagingSource::Image(_), mode, _) => mode,
        };
        let platform = match requested.platform {
            Some(text) => Platform::parse(text)
                .map_err(|e| InvalidRequest::new(Code::InvalidPlatform, e.to_string()))?,
            None => Platform::default(),
        };
        if let Some(url) = &requested.completion_callback {
            check_callback(rules.egress, url)?;
        }
        if let Some(credentials) = &requested.credentials
            && (credentials.username.is_empty() || credentials.password.expose().is_empty())
        {
            return Err(InvalidRequest::new(
                Code::InvalidCredentials,
                "credentials need a non-empty username and password",
            ));
        }
        if requested.credentials.is_some() && !rules.accepts_credentials {
            return Err(InvalidRequest::new(
                Code::CredentialsNotAccepted,
                "this stager has no TAILOR_CREDENTIALS_KEY, so it cannot hold credentials",
            ));
        }
        let timeout = match requested.timeout {
            Some(timeout) if timeout.is_zero() || timeout > MAX_TIMEOUT => {
                return Err(InvalidRequest::new(
                    Code::InvalidTimeout,
                    format!(
                        "timeout must be between 1 and {} seconds",
                        MAX_TIMEOUT.as_secs()
                    ),
                ));
            }
            Some(timeout) => timeout,
            None => rules.default_timeout,
        };
        Ok(Self {
            staging_guid: requested.staging_guid,
            app_guid: requested.app_guid,
            image,
            platform,
            mode,
            credentials: requested.credentials,
            completion_callback: requested.completion_callback,
            api: requested.api,
            timeout,
        })
    }

    /// A staging brought back by `tailor import`: it succeeded elsewhere, so nothing is
    /// fetched from `image` (whose registry this site may not even reach; no egress rule is
    /// asked), no callback is owed and no credentials are kept. Its fingerprint is that of the
    /// same request made through `POST /stage` without credentials.
    pub fn imported(
        staging_guid: Uuid,
        app_guid: Uuid,
        image: StagingSource,
        platform: Platform,
    ) -> Self {
        Self {
            staging_guid,
            app_guid,
            image,
            platform,
            mode: Mode::Copy,
            credentials: None,
            completion_callback: None,
            api: Api::Stage,
            timeout: Duration::ZERO,
        }
    }

    /// A registry's image: parsed, and refused at once where the egress policy obviously
    /// denies it.
    fn registry_image(text: &str, rules: &Rules<'_>) -> Result<ImageReference, InvalidRequest> {
        let image = ImageReference::parse_with_default(text, rules.default_registry)
            .map_err(|e| InvalidRequest::new(Code::InvalidReference, e.to_string()))?;
        let default_port = if rules
            .registries
            .is_insecure(&image.registry, image.endpoint())
        {
            80
        } else {
            443
        };
        rules
            .egress
            .check_literal(image.endpoint(), default_port, Purpose::Source)
            .map_err(|denied| {
                InvalidRequest::new(denied.code(), format!("image {image}: {denied}"))
            })?;
        Ok(image)
    }

    pub fn staging_guid(&self) -> Uuid {
        self.staging_guid
    }

    pub fn app_guid(&self) -> Uuid {
        self.app_guid
    }

    pub fn image(&self) -> &StagingSource {
        &self.image
    }

    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    pub fn completion_callback(&self) -> Option<&str> {
        self.completion_callback.as_deref()
    }

    pub fn api(&self) -> Api {
        self.api
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whose rate-limit budget the staging spends: anonymous pulls share the registry's (the
    /// fleet's addresses are what it counts), pulls with credentials their account's, so one
    /// tenant's exhausted quota blocks only that tenant. The account is named by a hash, so
    /// no user name reaches metrics or logs through it.
    /// A layout source has no rate limit; its key is its scheme (`oci:`, `s3:`), as the
    /// `source_registry` column reads it.
    pub fn budget_key(&self) -> String {
        let image = match &self.image {
            StagingSource::Image(image) => image,
            StagingSource::Layout(text) => {
                return text.split('/').next().unwrap_or_default().to_owned();
            }
        };
        match &self.credentials {
            None => image.registry.clone(),
            Some(credentials) => {
                let account = Sha256::new()
                    .chain_update(b"tailor-budget\0")
                    .chain_update(image.registry.as_bytes())
                    .chain_update(b"\0")
                    .chain_update(credentials.username.as_bytes())
                    .finalize();
                format!("{}#{}", image.registry, &hex::encode(account)[..16])
            }
        }
    }

    /// What makes two requests "the same" for idempotency. The password is left out: a hash
    /// of it at rest would be a way to guess it. The mode counts only when it is `pin`, so a
    /// request repeated across the upgrade that added modes is still the same request.
    pub fn fingerprint(&self) -> Vec<u8> {
        let mut hasher = Sha256::new();
        for part in [
            self.app_guid.to_string(),
            self.image.to_string(),
            self.platform.to_string(),
            self.completion_callback.clone().unwrap_or_default(),
            self.api.as_str().to_owned(),
            self.credentials
                .as_ref()
                .map(|c| c.username.clone())
                .unwrap_or_default(),
        ]
        .into_iter()
        .chain((self.mode != Mode::Copy).then(|| self.mode.as_str().to_owned()))
        {
            hasher.update(part.len().to_le_bytes());
            hasher.update(part.as_bytes());
        }
        hasher.finalize().to_vec()
    }
}

/// A completion callback must be an http(s) URL, without credentials, to a host the egress
/// policy does not obviously deny.
fn check_callback(egress: &Egress, url: &str) -> Result<(), InvalidRequest> {
    let invalid = |message: String| InvalidRequest::new(Code::InvalidCallback, message);
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| invalid(format!("completion_callback {url:?} is not a URL: {e}")))?;
    let (Some(host), Some(port)) = (parsed.host_str(), parsed.port_or_known_default()) else {
        return Err(invalid(
            "completion_callback must be an http(s) URL with a host".into(),
        ));
    };
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(
            "completion_callback must be an http(s) URL with a host".into(),
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid(
            "completion_callback must not carry credentials in its URL".into(),
        ));
    }
    egress
        .check_literal(&format!("{host}:{port}"), port, Purpose::Callback)
        .map_err(|denied| {
            InvalidRequest::new(Code::EgressDenied, format!("completion_callback: {denied}"))
        })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::egress::EgressPolicy;
    use crate::registry::Limits;

    struct Stager {
        egress: Arc<Egress>,
        registries: Registries,
        source_locations: SourceLocations,
    }

    /// A stager with the default egress policy (loopback, private and metadata addresses denied).
    fn stager() -> Stager {
        let egress = Egress::new(EgressPolicy::new(Vec::new(), Vec::new()));
        let registries =
            Registries::new(Vec::<String>::new(), egress.clone(), Limits::default(), &[]).unwrap();
        Stager {
            egress,
            registries,
            source_locations: SourceLocations::default(),
        }
    }

    fn rules(stager: &Stager, accepts_credentials: bool) -> Rules<'_> {
        Rules {
            egress: &stager.egress,
            registries: &stager.registries,
            default_registry: "docker.io",
            accepts_credentials,
            default_timeout: Duration::from_secs(900),
            source_locations: &stager.source_locations,
            default_mode: Mode::Copy,
        }
    }

    fn requested(image: &str) -> Requested<'_> {
        Requested {
            staging_guid: Uuid::new_v4(),
            app_guid: Uuid::new_v4(),
            image,
            platform: None,
            credentials: None,
            completion_callback: None,
            api: Api::Stage,
            timeout: None,
            mode: None,
        }
    }

    #[test]
    fn a_bare_name_gets_the_default_registry_platform_and_deadline() {
        let stager = stager();
        let new = NewStaging::parse(requested("redis"), &rules(&stager, false)).unwrap();
        assert_eq!(new.image().to_string(), "docker.io/library/redis");
        assert_eq!(new.platform().to_string(), "linux/amd64");
        assert_eq!(new.timeout(), Duration::from_secs(900));
        assert_eq!(new.completion_callback(), None);
    }

    #[test]
    fn each_broken_rule_answers_with_its_own_code_and_never_the_password() {
        let stager = stager();
        let with = |change: &dyn Fn(&mut Requested<'static>)| {
            let mut request = requested("registry.example.com/team/app:v1");
            change(&mut request);
            request
        };
        let credentials = |username: &str, password: &str| {
            Some(Credentials::new(username.to_owned(), password.to_owned()))
        };
        let cases: Vec<(&str, Requested<'static>, bool, &str)> = vec![
            (
                "uppercase name",
                requested("Team/App"),
                false,
                "INVALID_REFERENCE",
            ),
            (
                "loopback image",
                requested("127.0.0.1:5000/app"),
                false,
                "EGRESS_DENIED",
            ),
            (
                "metadata image",
                requested("169.254.169.254/app"),
                false,
                "EGRESS_DENIED",
            ),
            (
                "unknown platform",
                with(&|r| r.platform = Some("linux/amd64/v9/extra")),
                false,
                "INVALID_PLATFORM",
            ),
            (
                "callback not http",
                with(&|r| r.completion_callback = Some("ftp://cc.example.com/done".into())),
                false,
                "INVALID_CALLBACK",
            ),
            (
                "callback not a URL",
                with(&|r| r.completion_callback = Some("cc.example.com/done".into())),
                false,
                "INVALID_CALLBACK",
            ),
            (
                "callback with credentials",
                with(&|r| {
                    r.completion_callback = Some("https://cc:hunter2@cc.example.com/done".into())
                }),
                false,
                "INVALID_CALLBACK",
            ),
            (
                "callback to loopback",
                with(&|r| r.completion_callback = Some("http://127.0.0.1:9022/done".into())),
                false,
                "EGRESS_DENIED",
            ),
            (
                "callback with only a password",
                with(&|r| {
                    r.completion_callback = Some("https://:hunter2@cc.example.com/done".into())
                }),
                false,
                "INVALID_CALLBACK",
            ),
            (
                "callback with only a username",
                with(&|r| r.completion_callback = Some("https://cc@cc.example.com/done".into())),
                false,
                "INVALID_CALLBACK",
            ),
            (
                "empty username",
                with(&|r| r.credentials = credentials("", "hunter2")),
                true,
                "INVALID_CREDENTIALS",
            ),
            (
                "empty password",
                with(&|r| r.credentials = credentials("robot", "")),
                true,
                "INVALID_CREDENTIALS",
            ),
            (
                "credentials without a key",
                with(&|r| r.credentials = credentials("robot", "hunter2")),
                false,
                "CREDENTIALS_NOT_ACCEPTED",
            ),
            (
                "unknown mode",
                with(&|r| r.mode = Some("mirror")),
                false,
                "INVALID_MODE",
            ),
            (
                "zero timeout",
                with(&|r| r.timeout = Some(Duration::ZERO)),
                false,
                "INVALID_TIMEOUT",
            ),
            (
                "timeout over a day",
                with(&|r| r.timeout = Some(MAX_TIMEOUT + Duration::from_secs(1))),
                false,
                "INVALID_TIMEOUT",
            ),
        ];
        for (what, request, accepts_credentials, code) in cases {
            let error =
                NewStaging::parse(request, &rules(&stager, accepts_credentials)).expect_err(what);
            assert_eq!(error.code(), code, "{what}: {error}");
            assert!(!error.to_string().contains("hunter2"), "{what}: {error}");
        }
        // The same request with everything right is accepted.
        let fine = with(&|r| {
            r.credentials = credentials("robot", "hunter2");
            r.completion_callback = Some("https://cc.example.com/done".into());
            r.timeout = Some(MAX_TIMEOUT);
        });
        let new = NewStaging::parse(fine, &rules(&stager, true)).unwrap();
        assert_eq!(new.timeout(), MAX_TIMEOUT);
        assert_eq!(new.credentials().unwrap().username, "robot");
    }

    #[test]
    fn the_mode_is_the_callers_or_the_settings_and_a_layout_is_always_copied() {
        let mut stager = stager();
        stager.source_locations = SourceLocations::parse("oci:/srv/layouts").unwrap();
        let mut pin_by_default = rules(&stager, false);
        pin_by_default.default_mode = Mode::Pin;
        let parse = |image, mode, rules: &Rules<'_>| {
            let mut request = requested(image);
            request.mode = mode;
            NewStaging::parse(request, rules)
        };
        let copy_by_default = rules(&stager, false);
        let mode_of = |image, mode, rules| parse(image, mode, rules).unwrap().mode();
        assert_eq!(mode_of("redis", None, &copy_by_default), Mode::Copy);
        assert_eq!(mode_of("redis", None, &pin_by_default), Mode::Pin);
        assert_eq!(mode_of("redis", Some("PIN"), &copy_by_default), Mode::Pin);
        assert_eq!(mode_of("redis", Some("copy"), &pin_by_default), Mode::Copy);
        // A layout under a pin default is copied; asked to pin, it is refused.
        assert_eq!(
            mode_of("oci:/srv/layouts/app", None, &pin_by_default),
            Mode::Copy
        );
        let refused = parse("oci:/srv/layouts/app", Some("pin"), &copy_by_default).unwrap_err();
        assert_eq!(refused.code(), "INVALID_MODE", "{refused}");
        let unknown = parse("redis", Some(" pin"), &copy_by_default).unwrap_err();
        assert_eq!(unknown.code(), "INVALID_MODE", "{unknown}");
    }

    #[test]
    fn a_pin_request_is_another_request_than_the_same_copy() {
        let stager = stager();
        let guids = (Uuid::new_v4(), Uuid::new_v4());
        let fingerprint = |mode| {
            let mut request = requested("redis");
            (request.staging_guid, request.app_guid, request.mode) = (guids.0, guids.1, mode);
            NewStaging::parse(request, &rules(&stager, false))
                .unwrap()
                .fingerprint()
        };
        // Copy, named or by default, is what every request before modes was: the same bytes.
        assert_eq!(fingerprint(None), fingerprint(Some("copy")));
        assert_ne!(fingerprint(None), fingerprint(Some("pin")));
    }
}
