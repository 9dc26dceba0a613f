//! Shared set-up for the copy tests: registries with quick retries, copying by reference text
//! with each registry's credentials, as `tailor copy` does.

use std::collections::HashMap;
use std::sync::Arc;

use tailor::copy::{BlobLedger, CopyOptions, CopyReport, PlatformChoice, copy_image};
use tailor::error::CopyError;
use tailor::platform::Platform;
use tailor::reference::ImageReference;
use tailor::registry::{Credentials, RetryPolicy};
use testkit::TestRegistry;

/// The registries a test copies between, with credentials per registry host.
#[derive(Clone)]
pub struct Registries {
    inner: tailor::registry::Registries,
    credentials: HashMap<String, Credentials>,
}

impl Registries {
    pub fn with_credentials(mut self, registry: &str, credentials: Credentials) -> Self {
        self.credentials.insert(registry.to_owned(), credentials);
        self
    }

    pub fn repository(&self, reference: &ImageReference) -> tailor::registry::Repository {
        self.inner
            .source(
                &reference.registry,
                reference.endpoint(),
                self.credentials.get(&reference.registry).cloned(),
                None,
            )
            .repository(&reference.repository)
    }
}

/// Registries for a test: every loopback host given is plain HTTP; retries are quick, and a
/// 429 is waited out as the CLI does.
pub fn registries(hosts: &[String]) -> Registries {
    testkit::init();
    let inner =
        tailor::registry::Registries::unrestricted(hosts.iter().cloned()).with_retry(RetryPolicy {
            base_delay: std::time::Duration::from_millis(20),
            ..RetryPolicy::patient()
        });
    Registries {
        inner,
        credentials: HashMap::new(),
    }
}

pub fn with_creds(registries: Registries, registry: &TestRegistry) -> Registries {
    let (user, password) = registry.credentials().expect("registry has credentials");
    registries.with_credentials(&registry.host(), Credentials::new(user, password))
}

pub fn reference(text: &str) -> ImageReference {
    ImageReference::parse(text).unwrap()
}

pub async fn copy(registries: &Registries, src: &str, dst: &str) -> Result<CopyReport, CopyError> {
    copy_with(registries, src, dst, CopyOptions::default()).await
}

pub async fn copy_with(
    registries: &Registries,
    src: &str,
    dst: &str,
    options: CopyOptions,
) -> Result<CopyReport, CopyError> {
    let (src, dst) = (reference(src), reference(dst));
    copy_image(
        &registries.repository(&src),
        &src,
        &registries.repository(&dst),
        dst.tag_or_latest(),
        &options,
    )
    .await
}

pub fn all_platforms() -> CopyOptions {
    CopyOptions {
        platforms: PlatformChoice::All,
        ..CopyOptions::default()
    }
}

pub fn platform(text: &str) -> CopyOptions {
    CopyOptions {
        platforms: PlatformChoice::One(Platform::parse(text).unwrap()),
        ..CopyOptions::default()
    }
}

pub fn with_ledger(ledger: Arc<dyn BlobLedger>) -> CopyOptions {
    CopyOptions {
        ledger,
        ..CopyOptions::default()
    }
}

/// What skopeo sees at `reference` in `registry`, as a digest.
pub fn skopeo_digest(registry: &TestRegistry, reference: &str) -> Result<String, String> {
    testkit::skopeo::digest(
        &format!("{}/{reference}", registry.host()),
        registry.credentials(),
    )
}
