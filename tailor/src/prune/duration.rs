//! Durations as operators write them: `90s`, `15m`, `24h`, `7d`, `1h30m`, or `0`.

use std::time::Duration;

/// Parses `text` (whole numbers with units s, m, h, d; `0` alone is allowed).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let invalid = || {
        format!(
            "{text:?} is not a duration: use whole numbers with s, m, h or d, e.g. 90s, 24h, 7d, 1h30m"
        )
    };
    if text.is_empty() {
        return Err(invalid());
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(invalid()),
        };
        let value: u64 = number.parse().map_err(|_| invalid())?;
        number.clear();
        total = value
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("{text:?} is too long a duration"))?;
    }
    if !number.is_empty() {
        return Err(invalid());
    }
    // Postgres intervals and humans both stop making sense long before u64 does.
    if total > 100 * 365 * 86_400 {
        return Err(format!("{text:?} is too long a duration"));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_operators_write() {
        for (text, secs) in [
            ("0", 0),
            ("0s", 0),
            ("90s", 90),
            ("15m", 900),
            ("24h", 86_400),
            ("7d", 604_800),
            ("1h30m", 5_400),
            (" 2d ", 172_800),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
    }

    #[test]
    fn refuses_anything_else_with_the_input_in_the_message() {
        for text in [
            "",
            "24",
            "h",
            "1.5h",
            "-1h",
            "1w",
            "1h 30m",
            "99999999999999999999d",
        ] {
            let error = parse_duration(text).unwrap_err();
            assert!(error.contains(text.trim()), "{error}");
        }
    }
}
