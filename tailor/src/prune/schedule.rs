//! Cron schedules (`minute hour day-of-month month day-of-week`, in UTC) for `tailor prune
//! --schedule`, so a deployment runs the pruner as one supervised process rather than a crontab.

use chrono::{DateTime, Datelike, Duration, Timelike, Utc};

/// A parsed five-field cron expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    text: String,
    minutes: Vec<bool>,
    hours: Vec<bool>,
    days: Vec<bool>,
    months: Vec<bool>,
    weekdays: Vec<bool>,
    /// Cron's rule (Vixie cron, cronie): when a day field starts with `*` (`*`, `*/2`), a day
    /// must match both fields; otherwise a day matching either one counts.
    days_starred: bool,
    weekdays_starred: bool,
}

impl Schedule {
    /// Parses `*`, `*/n`, `a`, `a-b`, `a-b/n` and comma lists of them in each field; days of
    /// the week are 0-7 (0 and 7 are Sunday).
    pub fn parse(text: &str) -> Result<Self, String> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "{text:?} is not a cron schedule: expected 5 fields (minute hour day-of-month month day-of-week), got {}",
                fields.len()
            ));
        }
        let field = |index: usize, name: &str, min: u32, max: u32| {
            parse_field(fields[index], min, max)
                .map_err(|problem| format!("{text:?}: the {name} field {problem}"))
        };
        let mut weekdays = field(4, "day-of-week", 0, 7)?;
        if weekdays[7] {
            weekdays[0] = true;
        }
        weekdays.truncate(7);
        let schedule = Self {
            text: text.trim().to_owned(),
            minutes: field(0, "minute", 0, 59)?,
            hours: field(1, "hour", 0, 23)?,
            days: field(2, "day-of-month", 1, 31)?,
            months: field(3, "month", 1, 12)?,
            weekdays,
            days_starred: fields[2].starts_with('*'),
            weekdays_starred: fields[4].starts_with('*'),
        };
        let leap_year_start = DateTime::from_timestamp(946_684_800, 0).expect("2000-01-01");
        if schedule.next_after(leap_year_start).is_none() {
            return Err(format!("{text:?} never fires (no such date)"));
        }
        Ok(schedule)
    }

    /// The first matching minute strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut t = after.with_second(0)?.with_nanosecond(0)? + Duration::minutes(1);
        // Any valid schedule fires within four years (29 February on a Monday, say).
        let limit = after + Duration::days(4 * 366 + 7);
        while t <= limit {
            if !self.months[t.month() as usize] || !self.day_matches(t) {
                t = (t + Duration::days(1)).with_hour(0)?.with_minute(0)?;
                continue;
            }
            if !self.hours[t.hour() as usize] {
                t = (t + Duration::hours(1)).with_minute(0)?;
                continue;
            }
            if self.minutes[t.minute() as usize] {
                return Some(t);
            }
            t += Duration::minutes(1);
        }
        None
    }

    fn day_matches(&self, t: DateTime<Utc>) -> bool {
        let day = self.days[t.day() as usize];
        let weekday = self.weekdays[t.weekday().num_days_from_sunday() as usize];
        if self.days_starred || self.weekdays_starred {
            day && weekday
        } else {
            day || weekday
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// A field as a table indexed by value (`0..=max`), true where it matches.
fn parse_field(text: &str, min: u32, max: u32) -> Result<Vec<bool>, String> {
    let mut set = vec![false; max as usize + 1];
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("has a bad step in {part:?}"))?;
                (range, step)
            }
            None => (part, 1),
        };
        let number = |s: &str| {
            s.parse::<u32>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| format!("has {s:?}, outside {min}-{max}"))
        };
        let (low, high) = match range {
            "*" => (min, max),
            _ => match range.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None if step > 1 => (number(range)?, max),
                None => {
                    let n = number(range)?;
                    (n, n)
                }
            },
        };
        if low > high {
            return Err(format!("has the empty range {range:?}"));
        }
        for value in (low..=high).step_by(step as usize) {
            set[value as usize] = true;
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    #[test]
    fn finds_the_next_run() {
        let cases = [
            (
                "* * * * *",
                at(2026, 11, 23, 10, 5),
                at(2026, 11, 23, 10, 6),
            ),
            (
                "0 * * * *",
                at(2026, 11, 23, 10, 5),
                at(2026, 11, 23, 11, 0),
            ),
            (
                "*/15 * * * *",
                at(2026, 11, 23, 10, 5),
                at(2026, 11, 23, 10, 15),
            ),
            (
                "30 3 * * *",
                at(2026, 11, 23, 10, 5),
                at(2026, 11, 24, 3, 30),
            ),
            ("0 4 * * 0", at(2026, 11, 23, 10, 5), at(2026, 11, 29, 4, 0)),
            ("0 4 * * 7", at(2026, 11, 23, 10, 5), at(2026, 11, 29, 4, 0)),
            ("0 0 1 1 *", at(2026, 11, 23, 10, 5), at(2027, 1, 1, 0, 0)),
            ("0 0 29 2 *", at(2026, 11, 23, 10, 5), at(2028, 2, 29, 0, 0)),
            (
                "0 9-17/4 * * 1-5",
                at(2026, 11, 23, 10, 5),
                at(2026, 11, 23, 13, 0),
            ),
            // Day of month or day of week, as cron does when both are set.
            ("0 0 1 * 1", at(2026, 11, 23, 10, 5), at(2026, 11, 30, 0, 0)),
        ];
        for (text, after, expected) in cases {
            let schedule = Schedule::parse(text).unwrap();
            assert_eq!(schedule.next_after(after), Some(expected), "{text}");
        }
    }

    #[test]
    fn refuses_malformed_schedules_with_a_message_that_names_the_field() {
        for (text, needle) in [
            ("* * * *", "expected 5 fields"),
            ("60 * * * *", "minute field"),
            ("* 24 * * *", "hour field"),
            ("* * 0 * *", "day-of-month field"),
            ("* * * 13 *", "month field"),
            ("* * * * 8", "day-of-week field"),
            ("*/0 * * * *", "bad step"),
            ("5-1 * * * *", "empty range"),
            ("@hourly", "expected 5 fields"),
            ("a * * * *", "minute field"),
        ] {
            let error = Schedule::parse(text).unwrap_err();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }

    /// What Vixie cron and cronie do with both day fields, written out by hand for November and
    /// December 2026 (Monday 23 November is odd, Monday 30 November even, 7 December odd).
    #[test]
    fn the_day_fields_combine_as_in_cron() {
        let at = |text: &str| {
            DateTime::parse_from_rfc3339(text)
                .unwrap()
                .with_timezone(&Utc)
        };
        let monday_23 = at("2026-11-23T00:00:00Z");
        for (schedule, next) in [
            // A field starting with `*` makes the two fields both apply: odd-dated Mondays.
            ("0 0 */2 * 1", "2026-12-07T00:00:00Z"),
            ("0 0 * * 1", "2026-11-30T00:00:00Z"),
            ("0 0 1-31/2 * *", "2026-11-25T00:00:00Z"),
            // Both restricted without `*`: either one (the 1st or 15th, or a Monday).
            ("0 0 1,15 * 1", "2026-11-30T00:00:00Z"),
            ("0 0 1,15 * 3", "2026-11-25T00:00:00Z"),
            ("0 0 1 * 4-5", "2026-11-26T00:00:00Z"),
            ("0 0 1 12 0", "2026-12-01T00:00:00Z"),
        ] {
            let parsed = Schedule::parse(schedule).unwrap();
            assert_eq!(
                parsed.next_after(monday_23),
                Some(at(next)),
                "{schedule} after Monday 23 November 2026"
            );
        }
    }

    #[test]
    fn a_schedule_that_can_never_fire_is_refused() {
        let error = Schedule::parse("0 0 31 2 *").unwrap_err();
        assert!(error.contains("never fires"), "{error}");
    }
}
