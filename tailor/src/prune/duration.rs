//! Durations as operators write them (`90s`, `15m`, `24h`, `7d`, `1h30m`, `2w`, or `0`), parsed
//! by `humantime`, with a message that repeats the input and shows the form, and a bound.

use std::time::Duration;

/// Longer than this and PostgreSQL intervals (and humans) stop making sense.
const LONGEST: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Parses `text` (surrounding blanks ignored).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let duration = humantime::parse_duration(text).map_err(|e| {
        format!("{text:?} is not a duration ({e}): write e.g. 90s, 15m, 24h, 7d or 1h30m")
    })?;
    if duration > LONGEST {
        return Err(format!("{text:?} is too long a duration"));
    }
    Ok(duration)
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
            ("2w", 1_209_600),
            ("1h30m", 5_400),
            ("1h 30m", 5_400),
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
            "-1h",
            "1 fortnight",
            "200y",
            "99999999999999999999d",
        ] {
            let error = parse_duration(text).unwrap_err();
            assert!(error.contains(&format!("{:?}", text.trim())), "{error}");
        }
    }
}
