//! When and how long to wait before trying a registry request again.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};

/// The retries a registry client makes itself: only what is safe at its level (a connection
/// that failed before any answer, a 5xx or 408 on an idempotent request), a few times, with
/// exponential backoff and full jitter. Everything else is the caller's (a blob transfer's,
/// or the staging queue's) to retry.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total tries of one request, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    /// Longest wait between tries; a `Retry-After` longer than this is handed to the caller.
    pub max_delay: Duration,
    /// How many 429s the client itself waits out (0 for workers: the queue schedules them).
    pub rate_limit_waits: u32,
    /// The longest `Retry-After` the client itself waits out.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
            rate_limit_waits: 0,
            max_retry_after: Duration::ZERO,
        }
    }
}

impl RetryPolicy {
    /// For a one-off command with nobody to reschedule it (`tailor copy`): also waits out a
    /// few 429s of up to a minute each.
    pub fn patient() -> Self {
        Self {
            max_attempts: 5,
            max_delay: Duration::from_secs(10),
            rate_limit_waits: 5,
            max_retry_after: Duration::from_secs(60),
            ..Self::default()
        }
    }

    /// The wait before retry number `retry` (counting from 1): a random duration between zero
    /// and `base * 2^(retry-1)`, capped at `max_delay`, so that many clients do not retry in step.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1).min(16);
        let ceiling = self
            .base_delay
            .saturating_mul(1u32 << exponent)
            .min(self.max_delay);
        ceiling.mul_f64(fastrand::f64())
    }
}

/// Whether a response status is worth retrying: 408, 429 and 5xx.
pub fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// The longest `Retry-After` taken at its word: beyond it a value is capped (it is added to
/// clock readings, and `u64::MAX` seconds overflows them).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The server's `Retry-After`, as seconds or an HTTP date, at most [`MAX_RETRY_AFTER`].
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = if let Ok(seconds) = value.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        let when = httpdate::parse_http_date(value).ok()?;
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_but_stays_bounded() {
        let policy = RetryPolicy::default();
        // 200 ms, 400 ms, 800 ms, 1.6 s, then the 2 s cap: each retry's ceiling, written out.
        let ceilings_ms = [200, 400, 800, 1600, 2000, 2000, 2000];
        for (retry, ceiling) in (1..).zip(ceilings_ms) {
            let waits: Vec<Duration> = (0..200).map(|_| policy.backoff(retry)).collect();
            let max = waits.iter().max().unwrap();
            assert!(
                *max <= Duration::from_millis(ceiling),
                "retry {retry}: {max:?}"
            );
            // Full jitter: over 200 draws the largest comes near the ceiling.
            assert!(
                *max >= Duration::from_millis(ceiling / 2),
                "retry {retry}: {max:?}"
            );
        }
        assert!(policy.backoff(1000) <= Duration::from_secs(2));
    }

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        headers.insert(RETRY_AFTER, httpdate::fmt_http_date(later).parse().unwrap());
        let wait = retry_after(&headers).unwrap();
        assert!(
            wait > Duration::from_secs(100) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
        headers.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
        // Absurd values are capped, not added to a clock to overflow it.
        headers.insert(RETRY_AFTER, u64::MAX.to_string().parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(86_400)));
        headers.insert(
            RETRY_AFTER,
            "Fri, 31 Dec 9999 23:59:59 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(86_400)));
    }

    #[test]
    fn retryable_statuses() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(
                is_retryable_status(StatusCode::from_u16(code).unwrap()),
                "{code}"
            );
        }
        for code in [400, 401, 403, 404, 409] {
            assert!(
                !is_retryable_status(StatusCode::from_u16(code).unwrap()),
                "{code}"
            );
        }
    }
}
