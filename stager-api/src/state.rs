//! The state every handler shares, in a module of its own: `startup` builds it and `routes`
//! read it, and neither depends on the other for it.

use std::sync::Arc;

use sqlx::PgPool;
use tailor::config::TailorSettings;
use tailor::egress::Egress;
use tailor::registry::{Registries, Registry};

/// Shared, read-only state handed to every handler.
pub struct AppState {
    pub db: PgPool,
    /// How this process reaches registries (the internal one for `/_status`).
    pub registries: Registries,
    /// The internal registry, with tailor's credentials.
    pub internal: Arc<Registry>,
    /// Where tenants' images and callbacks may point.
    pub egress: Arc<Egress>,
    pub tailor: TailorSettings,
    /// Encrypts credentials of private images while their staging is active.
    pub credentials_key: Option<tailor::secrets::CredentialsKey>,
    /// Admits a bounded number of large `PUT /references` bodies at a time.
    pub reference_syncs: Arc<tokio::sync::Semaphore>,
}
