//! Search over staged images (`GET /images?q=`): succeeded stagings whose image is still kept,
//! found by the words of their source reference (registry, repository path, tag), their digest
//! (whole or by prefix), their app GUID and their image's label values; newest first, in pages.
//!
//! - PostgreSQL does the searching: `search_words` is a generated `tsvector` column with a GIN
//!   index (migration `20261126000001_search.sql`), so a search is one index lookup whatever
//!   the number of stagings.
//! - A query is parsed into at most [`MAX_TERMS`] words of letters, digits, `-` and `_`, each
//!   matched as a prefix and all required; tailor writes the `tsquery` itself from those words
//!   only, so nothing a caller types is ever PostgreSQL query syntax.
//! - Pages are keyset pages: a cursor names the last staging of a page (its creation time and
//!   GUID), so a page is as fast as the first and never skips or repeats a row.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::code::Code;

/// Longest query accepted.
pub const MAX_QUERY_CHARS: usize = 256;
/// Most words in a query.
pub const MAX_TERMS: usize = 8;
/// Most results in a page.
pub const MAX_LIMIT: u32 = 100;
/// Results in a page when the caller names no limit.
pub const DEFAULT_LIMIT: u32 = 20;

/// Why a search request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSearch(String);

impl InvalidSearch {
    pub fn code(&self) -> Code {
        Code::InvalidQuery
    }
}

/// A parsed query: its words, and the `tsquery` text made of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchQuery {
    words: Vec<String>,
}

impl SearchQuery {
    /// Splits `q` into words as the stored words were split (on spaces and on a reference's
    /// `/`, `:`, `@` and `.`), lowercased; `sha256` alone is dropped (digests are stored by their
    /// hex). Anything but letters, digits, `-` and `_` separates words too.
    pub fn parse(q: &str) -> Result<Self, InvalidSearch> {
        if q.chars().count() > MAX_QUERY_CHARS {
            return Err(InvalidSearch(format!(
                "q is over {MAX_QUERY_CHARS} characters"
            )));
        }
        let words: Vec<String> = q
            .to_lowercase()
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .filter(|w| w.chars().any(|c| c.is_ascii_alphanumeric()) && *w != "sha256")
            .map(str::to_owned)
            .collect();
        if words.is_empty() {
            return Err(InvalidSearch(
                "q needs a word: part of an image reference, a digest, an app GUID or a label \
                 value"
                    .into(),
            ));
        }
        if words.len() > MAX_TERMS {
            return Err(InvalidSearch(format!(
                "q has {} words; at most {MAX_TERMS} are accepted",
                words.len()
            )));
        }
        Ok(Self { words })
    }

    /// The words, each matched as a prefix, all required: `'redis':* & '7':*`. Safe to hand to
    /// `to_tsquery`: every word is only letters, digits, `-` and `_`.
    pub fn tsquery(&self) -> String {
        self.words
            .iter()
            .map(|word| format!("'{word}':*"))
            .collect::<Vec<_>>()
            .join(" & ")
    }
}

/// Where a page starts: after this staging, in the newest-first order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    created_at: DateTime<Utc>,
    staging_guid: Uuid,
}

impl Cursor {
    /// Reads a cursor a previous page gave (`<microseconds since the epoch>.<staging GUID>`).
    pub fn parse(text: &str) -> Result<Self, InvalidSearch> {
        let invalid = || InvalidSearch("cursor is not one a previous page gave".into());
        let (micros, guid) = text.split_once('.').ok_or_else(invalid)?;
        // 1970 to 9999: what tailor writes, well inside what PostgreSQL can compare with.
        let created_at = micros
            .parse::<i64>()
            .ok()
            .filter(|m| (0..=253_402_300_799_999_999).contains(m))
            .and_then(DateTime::from_timestamp_micros)
            .ok_or_else(invalid)?;
        let staging_guid = Uuid::parse_str(guid).map_err(|_| invalid())?;
        Ok(Self {
            created_at,
            staging_guid,
        })
    }

    fn after(found: &Found) -> Self {
        Self {
            created_at: found.created_at,
            staging_guid: found.staging_guid,
        }
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.{}",
            self.created_at.timestamp_micros(),
            self.staging_guid
        )
    }
}

/// A staged image search found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Found {
    pub staging_guid: Uuid,
    pub app_guid: Uuid,
    pub image: String,
    pub platform: String,
    pub source_digest: Option<String>,
    pub pinned_image: Option<String>,
    /// The image config's labels (bounded and cleaned when staged); `{}` if none.
    pub labels: Value,
    pub created_at: DateTime<Utc>,
}

/// One page of results, and the cursor of the next one if there is more.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Page {
    pub images: Vec<Found>,
    pub next_cursor: Option<String>,
}

/// The staged images `query` finds, newest first: at most `limit`, after `after`.
pub async fn search(
    pool: &PgPool,
    query: &SearchQuery,
    limit: u32,
    after: Option<Cursor>,
) -> Result<Page, sqlx::Error> {
    let limit = limit.clamp(1, MAX_LIMIT);
    let mut images = sqlx::query_as!(
        Found,
        r#"SELECT staging_guid, app_guid, source_image AS image, platform, source_digest,
               pinned_image, coalesce(image_labels, '{}'::jsonb) AS "labels!", created_at
           FROM stagings
           WHERE state = 'succeeded' AND pruned_at IS NULL
             AND search_words @@ to_tsquery('simple', $1)
             AND ($2::timestamptz IS NULL OR (created_at, staging_guid) < ($2, $3))
           ORDER BY created_at DESC, staging_guid DESC
           LIMIT $4"#,
        query.tsquery(),
        after.map(|c| c.created_at),
        after.map(|c| c.staging_guid).unwrap_or_default(),
        i64::from(limit) + 1,
    )
    .fetch_all(pool)
    .await?;
    let more = images.len() > limit as usize;
    images.truncate(limit as usize);
    let next_cursor = more
        .then(|| images.last().map(|last| Cursor::after(last).to_string()))
        .flatten();
    Ok(Page {
        images,
        next_cursor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_becomes_prefix_words_and_never_query_syntax() {
        let words = |q: &str| SearchQuery::parse(q).map(|q| q.tsquery());
        assert_eq!(
            words("docker.io/library/Redis:7").unwrap(),
            "'docker':* & 'io':* & 'library':* & 'redis':* & '7':*"
        );
        assert_eq!(words("sha256:ab12").unwrap(), "'ab12':*");
        assert_eq!(
            words("x' | !y & (z) <-> w:*").unwrap(),
            "'x':* & 'y':* & 'z':* & 'w':*",
            "operators and quotes only separate words"
        );
        for refused in ["", "  ", "sha256", "--", "a b c d e f g h i"] {
            assert_eq!(
                SearchQuery::parse(refused).unwrap_err().code(),
                Code::InvalidQuery,
                "{refused:?}"
            );
        }
        assert!(SearchQuery::parse(&"a".repeat(MAX_QUERY_CHARS + 1)).is_err());
    }

    #[test]
    fn a_cursor_reads_back_what_it_wrote_and_nothing_else() {
        let cursor = Cursor {
            created_at: DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap(),
            staging_guid: Uuid::new_v4(),
        };
        assert_eq!(Cursor::parse(&cursor.to_string()).unwrap(), cursor);
        let guid = Uuid::new_v4();
        for bad in [
            "".to_owned(),
            "12".into(),
            "x.y".into(),
            "12.not-a-guid".into(),
            "9999999999999999999.0".into(),
            format!("-8000000000000000000.{guid}"),
            format!("253402300800000000.{guid}"),
        ] {
            assert!(Cursor::parse(&bad).is_err(), "{bad:?}");
        }
    }
}
