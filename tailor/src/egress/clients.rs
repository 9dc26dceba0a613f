//! HTTP clients that connect only to addresses the egress policy checked.
//!
//! [`Egress::check_url`] resolves a name and checks its addresses for one port; the addresses
//! it allowed are then handed to the client that makes the connection. Each (host, port) gets
//! a `reqwest::Client` of its own, built with exactly those addresses (`resolve_to_addrs`) and
//! a resolver that refuses every name, so the client can never resolve a name by itself. What
//! the name resolves to a moment later (DNS rebinding), which addresses another port of the
//! same name was checked against, or how many names an attacker makes tailor check changes
//! nothing: the worst that a full or expired cache can cause is a client built again, after a
//! new check.
//!
//! A client lives [`CLIENT_TTL`]; after that the name is resolved and checked again, and the
//! client is kept (with its idle connections) only if the addresses are the same. While it
//! lives, its addresses are checked again before each request without resolving anything (a
//! protected endpoint's name may have resolved anew). At most [`MAX_CLIENTS`] are kept; the
//! oldest makes room. URLs whose host is an address need no resolution and share one client.
//!
//! Building a client is cheap because the TLS configuration (the system's roots, parsed once:
//! [`crate::tls::client_config`]) is part of the template, not of each client: a builder left
//! to itself would load and parse every system root again for each destination.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use reqwest::Url;

use super::{Checked, DenyReason, Egress, EgressDenied, Purpose};
use crate::code::Code;

/// How long a client built for a checked destination is used before the name is checked again.
pub const CLIENT_TTL: Duration = Duration::from_secs(60);
/// Most clients kept. Evicting one only means building it again after a new check.
pub const MAX_CLIENTS: usize = 1024;

/// Makes the builder every policed client starts from: user agent, timeouts, pool settings,
/// TLS. Whatever it sets about proxies, redirects and name resolution is overridden.
pub type ClientTemplate = Arc<dyn Fn() -> reqwest::ClientBuilder + Send + Sync>;

/// Why no client could be had for a URL.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The egress policy refused the destination (or its name does not resolve).
    #[error(transparent)]
    Denied(#[from] EgressDenied),
    /// The HTTP client could not be built (its configuration, not the destination).
    #[error("cannot set up an HTTP client for {target}: {detail}")]
    Setup { target: String, detail: String },
}

impl ClientError {
    /// The stable code: the denial's, or `HTTP_CLIENT_SETUP_FAILED`.
    pub fn code(&self) -> Code {
        match self {
            Self::Denied(denied) => denied.code(),
            Self::Setup { .. } => Code::HttpClientSetupFailed,
        }
    }
}

/// One client per checked destination, for one purpose (image sources, or callbacks).
pub struct PolicedClients {
    egress: Arc<Egress>,
    purpose: Purpose,
    template: ClientTemplate,
    /// For URLs whose host is an address literal, which no client resolves.
    literal: reqwest::Client,
    cache: Mutex<HashMap<(String, u16), Entry>>,
    ttl: Duration,
    capacity: usize,
}

struct Entry {
    client: reqwest::Client,
    checked: Checked,
    /// When the name was last resolved and checked.
    resolved_at: Instant,
}

impl std::fmt::Debug for PolicedClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicedClients")
            .field("purpose", &self.purpose)
            .field("egress", &self.egress)
            .finish()
    }
}

impl PolicedClients {
    pub fn new(
        egress: Arc<Egress>,
        purpose: Purpose,
        template: ClientTemplate,
    ) -> Result<Self, reqwest::Error> {
        let literal = policed(&template, purpose).build()?;
        Ok(Self {
            egress,
            purpose,
            template,
            literal,
            cache: Mutex::new(HashMap::new()),
            ttl: CLIENT_TTL,
            capacity: MAX_CLIENTS,
        })
    }

    pub fn egress(&self) -> &Arc<Egress> {
        &self.egress
    }

    /// The client to send a request to `url` with, after the egress policy's check of its
    /// destination. It connects to nothing but the addresses checked for `url`'s host and
    /// port, so use it for `url` (or another URL with the same host and port) only.
    pub async fn client_for(&self, url: &Url) -> Result<reqwest::Client, ClientError> {
        let port = url.port_or_known_default().unwrap_or(0);
        let key = match url.host() {
            Some(url::Host::Domain(host)) => (host.to_owned(), port),
            // An address literal is checked as it is, every time, and needs no resolution.
            _ => {
                self.egress.check_url(url, self.purpose).await?;
                return Ok(self.literal.clone());
            }
        };
        if let Some(cached) = self.fresh(&key) {
            // The addresses were resolved a moment ago; the policy may see them differently
            // now (a protected endpoint's name resolved anew), so they are checked again.
            match self.egress.recheck(&cached.checked, self.purpose).await {
                Ok(checked) if same_destination(&checked, &cached.checked) => {
                    return Ok(cached.client);
                }
                // Fewer addresses allowed than the client has: resolve and check afresh.
                Ok(_) => self.forget(&key),
                Err(denied) => {
                    self.forget(&key);
                    return Err(denied.into());
                }
            }
        }
        match self.egress.check_url(url, self.purpose).await? {
            Some(checked) => self.store(key, checked),
            // A domain host is never checked as a literal; refuse rather than guess.
            None => Err(ClientError::Denied(EgressDenied {
                target: format!("{}:{port}", key.0),
                reason: DenyReason::Unchecked,
                purpose: self.purpose,
            })),
        }
    }

    /// The cached entry for `key` if its name was resolved less than the TTL ago.
    fn fresh(&self, key: &(String, u16)) -> Option<Fresh> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache
            .get(key)
            .filter(|e| e.resolved_at.elapsed() < self.ttl)
            .map(|e| Fresh {
                client: e.client.clone(),
                checked: e.checked.clone(),
            })
    }

    fn forget(&self, key: &(String, u16)) {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }

    /// The client for a destination just resolved and checked: the cached one if it was built
    /// for the same addresses (its idle connections are to them), else a new one.
    fn store(&self, key: (String, u16), checked: Checked) -> Result<reqwest::Client, ClientError> {
        {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = cache.get_mut(&key)
                && same_destination(&entry.checked, &checked)
            {
                entry.resolved_at = Instant::now();
                return Ok(entry.client.clone());
            }
        }
        // Built outside the lock: other destinations need not wait for it.
        let mut builder = policed(&self.template, self.purpose);
        // The name as the URL spells it is what the client looks up; `name.` and `name` are
        // one name, whichever form the connection code passes.
        for spelling in [checked.host.as_str(), checked.host.trim_end_matches('.')] {
            builder = builder.resolve_to_addrs(spelling, &checked.addrs);
        }
        let client = builder.build().map_err(|e| ClientError::Setup {
            target: format!("{}:{}", checked.host, checked.port),
            detail: crate::text::clean(&e.to_string(), crate::text::MESSAGE_CHARS),
        })?;
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= self.capacity && !cache.contains_key(&key) {
            let ttl = self.ttl;
            cache.retain(|_, e| e.resolved_at.elapsed() < ttl);
            while cache.len() >= self.capacity {
                let oldest = cache
                    .iter()
                    .min_by_key(|(_, e)| e.resolved_at)
                    .map(|(k, _)| k.clone());
                match oldest {
                    Some(oldest) => cache.remove(&oldest),
                    None => break,
                };
            }
        }
        cache.insert(
            key,
            Entry {
                client: client.clone(),
                checked,
                resolved_at: Instant::now(),
            },
        );
        Ok(client)
    }

    /// Shortens the clients' life and the cache's bound, for tests.
    #[cfg(test)]
    pub(super) fn with_limits(mut self, ttl: Duration, capacity: usize) -> Self {
        self.ttl = ttl;
        self.capacity = capacity;
        self
    }

    #[cfg(test)]
    pub(super) fn cached(&self) -> usize {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Whether two checks of one destination allowed the same addresses, in whatever order (a
/// resolver may rotate them).
fn same_destination(a: &Checked, b: &Checked) -> bool {
    let sorted = |c: &Checked| {
        let mut addrs = c.addrs.clone();
        addrs.sort();
        addrs
    };
    a.host == b.host && a.port == b.port && sorted(a) == sorted(b)
}

struct Fresh {
    client: reqwest::Client,
    checked: Checked,
}

/// The template with what makes a client policed: no proxy (a proxy would resolve names where
/// the policy cannot see them), no redirect (each hop is checked by whoever follows it), and a
/// resolver that refuses every name it was not given addresses for.
fn policed(template: &ClientTemplate, purpose: Purpose) -> reqwest::ClientBuilder {
    template()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(RefuseAll(purpose))
}

/// A resolver that resolves nothing. Names with checked addresses never reach it (the
/// client's overrides answer for them), and address literals need no resolution.
#[derive(Debug, Clone, Copy)]
struct RefuseAll(Purpose);

impl reqwest::dns::Resolve for RefuseAll {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let denied = EgressDenied {
            target: crate::text::clean(name.as_str(), 253),
            reason: DenyReason::Unchecked,
            purpose: self.0,
        };
        Box::pin(std::future::ready(Err(
            Box::new(denied) as Box<dyn std::error::Error + Send + Sync>
        )))
    }
}
