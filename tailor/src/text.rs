//! Text that came from someone we do not trust (an upstream registry's error message, a header
//! value, an image config field), made safe to store, log and return.
//!
//! [`clean`] is applied where such text enters tailor (the registry client, the image config
//! reader), so that everything downstream (PostgreSQL, log lines, API responses, callbacks)
//! only ever sees one line of printable text of bounded length:
//!
//! - control characters (C0, DEL, C1), line and paragraph separators and the bidirectional
//!   overrides are written as visible escapes (`\n`, `\0`, `\u{202e}`), so no upstream text can
//!   end a log line, forge the next one, recolour a terminal, or reach PostgreSQL as a NUL;
//! - the result is cut at a character boundary after `max_chars` characters, saying how much
//!   was left out.
//!
//! [`store_safe`] is the last line of defence at the database boundary: it only removes NUL,
//! which PostgreSQL's `text` cannot hold, so that recording an outcome never fails because of
//! what it says.

use std::fmt::Write;

/// A sensible bound for a message quoted from an upstream (one log line's worth).
pub const MESSAGE_CHARS: usize = 512;

/// Whether `c` must not appear raw in a stored or logged line.
pub fn is_hostile(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}')
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// One printable line of at most `max_chars` characters (plus a short note of what was cut).
pub fn clean(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars * 2));
    let mut chars = text.chars();
    for c in chars.by_ref().take(max_chars) {
        push_escaped(&mut out, c);
    }
    let rest = chars.count();
    if rest > 0 {
        let _ = write!(out, "… ({rest} more characters)");
    }
    out
}

/// [`clean`] for bytes that may not be UTF-8 (a response body, a header value).
pub fn clean_bytes(bytes: &[u8], max_chars: usize) -> String {
    clean(&String::from_utf8_lossy(bytes), max_chars)
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\0' => out.push_str("\\0"),
        c if is_hostile(c) => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}

/// Removes NUL, which PostgreSQL cannot store in `text`, leaving everything else as it is.
pub fn store_safe(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\\0"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_visible_escapes() {
        let forged = "denied\n2026-11-23T00:00:00Z  INFO staging succeeded\0\x1b[31m\u{202e}";
        let cleaned = clean(forged, 200);
        assert!(!cleaned.chars().any(is_hostile), "{cleaned:?}");
        assert_eq!(
            cleaned,
            "denied\\n2026-11-23T00:00:00Z  INFO staging succeeded\\0\\u{1b}[31m\\u{202e}"
        );
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary_and_says_so() {
        let long = "é".repeat(1000);
        let cleaned = clean(&long, 10);
        assert!(cleaned.starts_with(&"é".repeat(10)));
        assert!(cleaned.ends_with("(990 more characters)"), "{cleaned}");
        assert_eq!(clean("short", 10), "short");
    }

    #[test]
    fn invalid_utf8_is_replaced_not_refused() {
        assert_eq!(clean_bytes(b"a\xffb\n", 10), "a\u{fffd}b\\n");
    }

    #[test]
    fn store_safe_only_touches_nul() {
        assert_eq!(store_safe("a\nb"), "a\nb");
        assert_eq!(store_safe("a\0b"), "a\\0b");
    }
}
