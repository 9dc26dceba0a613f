//! Shared set-up for the copy tests: registries with quick retries, copying by reference text.

use std::sync::Arc;

use tailor::copy::{BlobLedger, CopyOptions, CopyReport, PlatformChoice, Registries, copy_image};
use tailor::error::CopyError;
use tailor::platform::Platform;
use tailor::reference::ImageReference;
use tailor::registry::{Credentials, RetryPolicy};
use testkit::TestRegistry;

/// Registries for a test: every loopback host given is plain HTTP; retries are quick.
pub fn registries(hosts: &[String]) -> Registries {
    testkit::init();
    let mut registries = Registries::new(hosts.iter().cloned());
    registries.retry = RetryPolicy {
        base_delay: std::time::Duration::from_millis(20),
        ..RetryPolicy::default()
    };
    registries
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
    copy_image(registries, &reference(src), &reference(dst), &options).await
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
