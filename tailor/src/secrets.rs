//! Registry credentials at rest: AES-256-GCM under a key from configuration
//! (`TAILOR_CREDENTIALS_KEY`), stored as `nonce || ciphertext` only while a staging is active.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;

use crate::config::ConfigError;
use crate::registry::Credentials;

const NONCE_LEN: usize = 12;

/// The 256-bit key credentials are encrypted with.
#[derive(Clone)]
pub struct CredentialsKey(Aes256Gcm);

impl std::fmt::Debug for CredentialsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialsKey(***)")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("stored credentials cannot be decrypted (was TAILOR_CREDENTIALS_KEY changed?)")]
pub struct DecryptError;

impl CredentialsKey {
    /// Parses 32 bytes given as 64 hex digits or as base64 (e.g. `openssl rand -base64 32`).
    pub fn parse(setting: &'static str, text: &str) -> Result<Self, ConfigError> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()) {
            hex::decode(text).ok()
        } else {
            base64::engine::general_purpose::STANDARD.decode(text).ok()
        };
        match bytes {
            Some(bytes) if bytes.len() == 32 => Ok(Self(
                Aes256Gcm::new_from_slice(&bytes).expect("32-byte key"),
            )),
            _ => Err(ConfigError::Invalid {
                setting,
                problem:
                    "must be 32 bytes as 64 hex digits or base64 (try `openssl rand -base64 32`)"
                        .into(),
            }),
        }
    }

    /// `TAILOR_CREDENTIALS_KEY` read through `lookup`; `None` when unset or empty.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, ConfigError> {
        lookup("TAILOR_CREDENTIALS_KEY")
            .filter(|k| !k.trim().is_empty())
            .map(|k| Self::parse("TAILOR_CREDENTIALS_KEY", &k))
            .transpose()
    }

    /// A random key, for the embedded single-node mode.
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the OS random number generator");
        Self(Aes256Gcm::new_from_slice(&key).expect("32-byte key"))
    }

    pub fn encrypt(&self, credentials: &Credentials) -> Vec<u8> {
        let plaintext = serde_json::to_vec(&serde_json::json!({
            "username": credentials.username,
            "password": credentials.password.expose(),
        }))
        .expect("credentials serialise");
        // A fresh random 96-bit nonce for every encryption.
        let mut nonce_bytes = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce_bytes).expect("the OS random number generator");
        let nonce = Nonce::from(nonce_bytes);
        let mut sealed = nonce_bytes.to_vec();
        sealed.extend(
            self.0
                .encrypt(&nonce, plaintext.as_slice())
                .expect("AES-GCM encryption"),
        );
        sealed
    }

    pub fn decrypt(&self, sealed: &[u8]) -> Result<Credentials, DecryptError> {
        if sealed.len() <= NONCE_LEN {
            return Err(DecryptError);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| DecryptError)?;
        let plaintext = self
            .0
            .decrypt(&Nonce::from(nonce), ciphertext)
            .map_err(|_| DecryptError)?;
        let value: serde_json::Value =
            serde_json::from_slice(&plaintext).map_err(|_| DecryptError)?;
        let field = |name: &str| {
            value
                .get(name)
                .and_then(|v| v.as_str())
                .map(str::to_owned)
                .ok_or(DecryptError)
        };
        Ok(Credentials::new(field("username")?, field("password")?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_hides_the_password() {
        let key = CredentialsKey::generate();
        let sealed = key.encrypt(&Credentials::new("alice", "correct horse"));
        assert!(!String::from_utf8_lossy(&sealed).contains("correct horse"));
        let opened = key.decrypt(&sealed).unwrap();
        assert_eq!(
            (opened.username.as_str(), opened.password.expose()),
            ("alice", "correct horse")
        );
        assert!(
            CredentialsKey::generate().decrypt(&sealed).is_err(),
            "another key cannot open it"
        );
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(key.decrypt(&tampered).is_err());
    }

    #[test]
    fn keys_parse_from_hex_or_base64_only_at_32_bytes() {
        assert!(CredentialsKey::parse("K", &"ab".repeat(32)).is_ok());
        assert!(CredentialsKey::parse("K", "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=").is_ok());
        let err = CredentialsKey::parse("TAILOR_CREDENTIALS_KEY", "short").unwrap_err();
        assert_eq!(err.setting(), "TAILOR_CREDENTIALS_KEY");
    }
}
