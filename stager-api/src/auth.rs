//! Bearer-token authentication for every endpoint except `/_ping`.
//!
//! Handlers that need a caller to be authenticated take an [`Authenticated`] argument; the
//! extractor rejects the request with a JSON 401 before the handler runs.

use std::future::{Ready, ready};

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, web};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// The tokens callers may present, stored as SHA-256 digests so that comparing them takes the
/// same time whatever the token's length or content.
#[derive(Clone)]
pub struct ApiTokens {
    digests: Vec<[u8; 32]>,
}

impl ApiTokens {
    pub fn new<'a>(tokens: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            digests: tokens
                .into_iter()
                .map(|t| Sha256::digest(t.as_bytes()).into())
                .collect(),
        }
    }

    /// Whether `candidate` is one of the configured tokens; every token is compared, in constant time.
    pub fn accepts(&self, candidate: &str) -> bool {
        let candidate: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |found, digest| {
                found | digest.ct_eq(&candidate)
            })
            .into()
    }
}

/// Proof that the request carried a valid bearer token.
#[derive(Debug, Clone, Copy)]
pub struct Authenticated;

impl FromRequest for Authenticated {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(req))
    }
}

fn authenticate(req: &HttpRequest) -> Result<Authenticated, ApiError> {
    // Under mutual TLS the handshake already verified the client's certificate.
    if req
        .conn_data::<crate::tls::VerifiedClientCertificate>()
        .is_some()
    {
        return Ok(Authenticated);
    }
    let tokens = req
        .app_data::<web::Data<ApiTokens>>()
        .expect("ApiTokens are registered by startup");
    let header = req.headers().get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthorized("missing Authorization header; send `Authorization: Bearer <token>`")
    })?;
    let value = header
        .to_str()
        .map_err(|_| ApiError::unauthorized("Authorization header is not valid ASCII"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| ApiError::unauthorized("Authorization header must use the Bearer scheme"))?;
    if tokens.accepts(token.trim()) {
        Ok(Authenticated)
    } else {
        Err(ApiError::unauthorized("invalid API token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_configured_tokens() {
        let tokens = ApiTokens::new(["first-token-0123456789", "second-token-0123456789"]);
        assert!(tokens.accepts("first-token-0123456789"));
        assert!(tokens.accepts("second-token-0123456789"));
        assert!(!tokens.accepts("first-token-012345678"));
        assert!(!tokens.accepts(""));
    }

    #[test]
    fn no_tokens_accepts_nothing() {
        assert!(!ApiTokens::new([]).accepts("anything"));
    }
}
