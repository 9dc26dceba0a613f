//! The `tailor` command line: one module per subcommand.

pub mod copy;
pub mod portable;
pub mod prune;
pub mod work;

use std::sync::Arc;

use tailor::config::{ConfigError, TailorSettings};
use tailor::registry::{Credentials, Registry};

/// The internal registry with tailor's credentials, as an operator's command reaches it (no
/// egress policy: the operator's own settings name it).
pub fn operator_internal_registry(settings: &TailorSettings) -> Result<Arc<Registry>, ConfigError> {
    let registries = settings.registries(tailor::egress::Egress::unrestricted())?;
    Ok(registries.internal(
        &settings.internal_registry,
        settings
            .internal_registry_credentials
            .as_ref()
            .map(|(user, password)| Credentials::new(user.clone(), password.expose())),
    ))
}
