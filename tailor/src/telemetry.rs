//! Structured logging for the binaries.
//!
//! Logs go to stderr, as JSON when `TAILOR_LOG_FORMAT=json` (what a deployment should set) and
//! as human-readable text otherwise. `RUST_LOG` filters, defaulting to `info`. Spans carry the
//! staging GUID so that every line a staging produces can be found by it.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("TAILOR_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init: tests may call this more than once per process.
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    } else {
        builder.try_init()
    };
}
