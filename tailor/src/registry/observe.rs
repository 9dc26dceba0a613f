//! What a registry says about its own limits, and who listens: the fleet's rate-limit budget
//! ([`crate::staging::budget`]) is told about every answer from an upstream registry and asked
//! before every request to it.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::HeaderMap;

/// Watches the requests a process sends to upstream registries.
pub trait RegistryObserver: Send + Sync {
    /// Before a request to `registry`: `Err(wait)` if nobody may send to it for `wait`.
    fn admit(&self, registry: &str) -> Result<(), Duration>;
    /// Every answer `registry` gave (its status and headers).
    fn observed(&self, registry: &str, status: StatusCode, headers: &HeaderMap);
}

/// Docker Hub's `ratelimit-limit` / `ratelimit-remaining` (`100;w=21600`): the count and the
/// window in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitHeaders {
    pub limit: Option<u32>,
    pub remaining: Option<u32>,
    pub window: Option<Duration>,
}

impl RateLimitHeaders {
    pub fn parse(headers: &HeaderMap) -> Option<Self> {
        let field = |name: &str| -> Option<(u32, Option<Duration>)> {
            let value = headers.get(name)?.to_str().ok()?;
            let mut parts = value.split(';');
            let count = parts.next()?.trim().parse().ok()?;
            let window = parts
                .filter_map(|p| p.trim().strip_prefix("w="))
                .find_map(|w| w.parse::<u64>().ok())
                .map(Duration::from_secs);
            Some((count, window))
        };
        let limit = field("ratelimit-limit");
        let remaining = field("ratelimit-remaining");
        if limit.is_none() && remaining.is_none() {
            return None;
        }
        Some(Self {
            limit: limit.map(|l| l.0),
            remaining: remaining.map(|r| r.0),
            window: remaining.and_then(|r| r.1).or(limit.and_then(|l| l.1)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
        headers.insert("ratelimit-remaining", "0;w=21600".parse().unwrap());
        assert_eq!(
            RateLimitHeaders::parse(&headers),
            Some(RateLimitHeaders {
                limit: Some(100),
                remaining: Some(0),
                window: Some(Duration::from_secs(21600)),
            })
        );
        assert_eq!(RateLimitHeaders::parse(&HeaderMap::new()), None);
        headers.insert("ratelimit-remaining", "lots".parse().unwrap());
        assert_eq!(RateLimitHeaders::parse(&headers).unwrap().remaining, None);
    }
}
