//! Structured logging for the binaries.
//!
//! Logs go to stderr, as JSON when `TAILOR_LOG_FORMAT=json` (what a deployment should set) and
//! as human-readable text otherwise. `RUST_LOG` filters, defaulting to `info`. Spans carry the
//! staging GUID so that every line a staging produces can be found by it.
//!
//! One event is one line, whatever it quotes: text from upstreams is cleaned where it enters
//! ([`crate::text`]), and the writer below escapes any control character that still reaches
//! it, so no log line can end early or forge the next one. Colours only on a terminal.

use std::io::{IsTerminal, Write};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Installs the global subscriber with `info` unless `RUST_LOG` says otherwise. Call once,
/// first thing in `main`.
pub fn init() {
    init_with_default("info");
}

/// Installs the global subscriber with `default` as the filter unless `RUST_LOG` is set (a
/// command printing JSON on stdout keeps stderr quiet this way: `off`).
pub fn init_with_default(default: &str) {
    // The TLS verifier logs an ERROR for every certificate it refuses, which tailor reports
    // itself (as the staging's or the command's error, with the fix): an upstream's bad
    // certificate is not an error of this process.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default},rustls_platform_verifier=off")));
    let json = std::env::var("TAILOR_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let ansi = !json && std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(OneLinePerEvent { ansi });
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

/// Stderr, one event per line: control characters inside an event (but its final newline,
/// and the colour codes the formatter itself writes on a terminal) are escaped.
#[derive(Clone, Copy)]
struct OneLinePerEvent {
    ansi: bool,
}

impl<'a> MakeWriter<'a> for OneLinePerEvent {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> Self::Writer {
        EventWriter { ansi: self.ansi }
    }
}

struct EventWriter {
    ansi: bool,
}

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = one_line(&String::from_utf8_lossy(buf), self.ansi);
        std::io::stderr().lock().write_all(line.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// `event` with every control character but its final newline (and, with `ansi`, the colour
/// codes' escape) written as a visible escape.
fn one_line(event: &str, ansi: bool) -> String {
    let (body, newline) = match event.strip_suffix('\n') {
        Some(body) => (body, "\n"),
        None => (event, ""),
    };
    let mut line = String::with_capacity(body.len() + 1);
    for c in body.chars() {
        match c {
            '\u{1b}' if ansi => line.push(c),
            '\t' => line.push(c),
            c if crate::text::is_hostile(c) => {
                line.push_str(&crate::text::clean(c.encode_utf8(&mut [0; 4]), 1))
            }
            c => line.push(c),
        }
    }
    line.push_str(newline);
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_stays_one_line() {
        let event = "2026-11-23T00:00:00Z  INFO a\nforged\r\0line\u{1b}[31m\u{2028}\n";
        let line = one_line(event, false);
        assert_eq!(
            line,
            "2026-11-23T00:00:00Z  INFO a\\nforged\\r\\0line\\u{1b}[31m\\u{2028}\n"
        );
        assert_eq!(line.matches('\n').count(), 1);
        // On a terminal the formatter's own colours pass.
        assert_eq!(
            one_line("\u{1b}[2mtime\u{1b}[0m\n", true),
            "\u{1b}[2mtime\u{1b}[0m\n"
        );
    }
}
