//! Reading a registry's access log: an independent count of what clients read from it.
//!
//! The distribution registry writes one Apache combined-format line per request:
//! `127.0.0.1 - - [time] "GET /v2/app/blobs/sha256:... HTTP/1.1" 200 1048576 "" "ua"`.

use std::path::Path;

/// One request as the registry logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// Response body bytes sent.
    pub bytes: u64,
}

impl AccessLogEntry {
    /// A blob read (`GET .../blobs/<digest>`), which is what a copy pays for.
    pub fn is_blob_get(&self) -> bool {
        self.method == "GET" && self.path.contains("/blobs/sha256:")
    }
}

/// Parses one line; `None` for anything that is not an access-log line.
pub fn parse_line(line: &str) -> Option<AccessLogEntry> {
    let open = line.find('"')?;
    let close = open + 1 + line[open + 1..].find('"')?;
    let mut request = line[open + 1..close].split_whitespace();
    let method = request.next()?.to_owned();
    let path = request.next()?.to_owned();
    request.next()?.strip_prefix("HTTP/")?;
    let mut rest = line[close + 1..].split_whitespace();
    let status = rest.next()?.parse().ok()?;
    let bytes = match rest.next()? {
        "-" => 0,
        n => n.parse().ok()?,
    };
    Some(AccessLogEntry {
        method,
        path,
        status,
        bytes,
    })
}

/// Every request in the log file at `path` (other lines are skipped).
pub fn read(path: &Path) -> Vec<AccessLogEntry> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(parse_line)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_combined_format() {
        let line = r#"127.0.0.1 - - [23/Nov/2026:14:00:00 +0000] "GET /v2/lib/app/blobs/sha256:abcd HTTP/1.1" 200 1048576 "" "skopeo/1.9""#;
        let entry = parse_line(line).unwrap();
        assert_eq!(entry.method, "GET");
        assert_eq!(entry.path, "/v2/lib/app/blobs/sha256:abcd");
        assert_eq!(entry.status, 200);
        assert_eq!(entry.bytes, 1_048_576);
        assert!(entry.is_blob_get());
    }

    #[test]
    fn dash_means_no_bytes_and_noise_is_skipped() {
        let line =
            r#"127.0.0.1 - - [23/Nov/2026:14:00:00 +0000] "HEAD /v2/ HTTP/1.1" 401 - "" "curl""#;
        assert_eq!(parse_line(line).unwrap().bytes, 0);
        assert_eq!(parse_line("time=... level=info msg=\"listening\""), None);
    }
}
