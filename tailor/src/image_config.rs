//! What a platform needs to know of an image before it may run it, from its config blob:
//! that it is for the platform asked for, and how to start it (the start command and Diego's
//! execution metadata, `{"cmd": [...], "ports": [{"Port": 8080, "Protocol": "tcp"}], ...}`).
//!
//! The config comes from an upstream nobody vouches for, so what is kept of it is bounded
//! (one staging's record and callback stay small) and checked: a NUL or another control
//! character in a command, user or working directory cannot run anywhere and is refused,
//! never stored.

use serde_json::{Value, json};

use crate::code::Code;
use crate::platform::Platform;
use crate::text::{MESSAGE_CHARS, clean};

/// Longest start command kept (a Cloud Controller's limit for a process command).
pub const MAX_START_COMMAND_CHARS: usize = 4096;
/// Longest execution metadata kept.
pub const MAX_EXECUTION_METADATA_BYTES: usize = 16 * 1024;
/// Most exposed ports kept.
pub const MAX_PORTS: usize = 64;
/// Most words in `Entrypoint` or `Cmd`.
pub const MAX_COMMAND_WORDS: usize = 256;
/// Most labels kept (the first by key); labels are for finding an image, not for running it,
/// so an image with more still stages.
pub const MAX_LABELS: usize = 64;
/// Longest label key or value kept (cut at this many characters, then cleaned).
pub const MAX_LABEL_CHARS: usize = 256;

/// The run-time facts of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInfo {
    /// Entrypoint followed by Cmd, joined with spaces (Cloud Foundry's `process_types.web`).
    pub start_command: String,
    /// Diego's execution metadata, as the JSON *string* the Cloud Controller expects.
    pub execution_metadata: String,
    /// The config's `Labels`, cleaned and bounded, by key (what search finds an image by).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Why an image config cannot be staged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageConfigError {
    /// Malformed, or a field no runtime can use.
    #[error("invalid image config: {0}")]
    Invalid(String),
    /// Over a bound on what tailor stores for an image.
    #[error("image metadata too large: {0}")]
    TooLarge(String),
    /// Built for another os/architecture.
    #[error("platform mismatch: {0}")]
    PlatformMismatch(String),
}

impl ImageConfigError {
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid(_) => Code::ImageConfigInvalid,
            Self::TooLarge(_) => Code::ImageMetadataTooLarge,
            Self::PlatformMismatch(_) => Code::PlatformMismatch,
        }
    }
}

/// Checks that the config describes an image for `platform` and derives how to run it.
pub fn inspect(config_blob: &[u8], platform: &Platform) -> Result<RunInfo, ImageConfigError> {
    let value: Value = serde_json::from_slice(config_blob).map_err(|e| {
        ImageConfigError::Invalid(clean(&format!("it is not JSON: {e}"), MESSAGE_CHARS))
    })?;
    check_platform(&value, platform)?;
    run_info(&value)
}

/// Whether the config describes an image for `platform` (only that).
pub fn check_platform_of(config_blob: &[u8], platform: &Platform) -> Result<(), ImageConfigError> {
    let value: Value = serde_json::from_slice(config_blob).map_err(|e| {
        ImageConfigError::Invalid(clean(&format!("it is not JSON: {e}"), MESSAGE_CHARS))
    })?;
    check_platform(&value, platform)
}

fn check_platform(value: &Value, platform: &Platform) -> Result<(), ImageConfigError> {
    let field = |name: &str| value.get(name).and_then(Value::as_str);
    let (Some(os), Some(architecture)) = (field("os"), field("architecture")) else {
        return Err(ImageConfigError::PlatformMismatch(format!(
            "the image config declares no os and architecture; {platform} was asked for"
        )));
    };
    let variant = field("variant");
    if platform.matches(os, architecture, variant) {
        return Ok(());
    }
    let built_for = match variant {
        Some(v) => format!("{os}/{architecture}/{v}"),
        None => format!("{os}/{architecture}"),
    };
    Err(ImageConfigError::PlatformMismatch(format!(
        "the image is built for {}, not {platform}",
        clean(&built_for, 100)
    )))
}

/// A command word, user or directory: text a process is started with. NUL and control
/// characters other than tab and newline (which shell scripts use) cannot be.
fn runnable_text(field: &str, text: &str) -> Result<(), ImageConfigError> {
    match text
        .chars()
        .find(|c| crate::text::is_hostile(*c) && !matches!(c, '\t' | '\n'))
    {
        Some(c) => Err(ImageConfigError::Invalid(format!(
            "{field} contains the control character U+{:04X}, which no process can be started with",
            c as u32
        ))),
        None => Ok(()),
    }
}

fn run_info(value: &Value) -> Result<RunInfo, ImageConfigError> {
    let config = value
        .get("config")
        .or_else(|| value.get("container_config"))
        .cloned()
        .unwrap_or(Value::Null);
    let words = |field: &str| -> Result<Vec<String>, ImageConfigError> {
        let Some(items) = config.get(field).and_then(Value::as_array) else {
            return Ok(Vec::new());
        };
        if items.len() > MAX_COMMAND_WORDS {
            return Err(ImageConfigError::TooLarge(format!(
                "{field} has {} words; at most {MAX_COMMAND_WORDS} are accepted",
                items.len()
            )));
        }
        let words: Vec<String> = items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect();
        for (i, word) in words.iter().enumerate() {
            runnable_text(&format!("{field}[{i}]"), word)?;
        }
        Ok(words)
    };
    let entrypoint = words("Entrypoint")?;
    let cmd = words("Cmd")?;
    let start_command = entrypoint
        .iter()
        .chain(&cmd)
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    if start_command.chars().count() > MAX_START_COMMAND_CHARS {
        return Err(ImageConfigError::TooLarge(format!(
            "the start command (Entrypoint and Cmd) is {} characters; at most {MAX_START_COMMAND_CHARS} are accepted",
            start_command.chars().count()
        )));
    }
    let exposed = config.get("ExposedPorts").and_then(Value::as_object);
    if exposed.is_some_and(|p| p.len() > MAX_PORTS) {
        return Err(ImageConfigError::TooLarge(format!(
            "the image exposes {} ports; at most {MAX_PORTS} are accepted",
            exposed.map_or(0, |p| p.len())
        )));
    }
    let mut ports: Vec<Value> = exposed
        .map(|ports| {
            ports
                .keys()
                .filter_map(|key| {
                    let (port, protocol) = key.split_once('/').unwrap_or((key.as_str(), "tcp"));
                    let protocol = protocol.to_ascii_lowercase();
                    let known = matches!(protocol.as_str(), "tcp" | "udp" | "sctp");
                    port.parse::<u16>()
                        .ok()
                        .filter(|_| known)
                        .map(|p| json!({ "Port": p, "Protocol": protocol }))
                })
                .collect()
        })
        .unwrap_or_default();
    ports.sort_by_key(|p| p["Port"].as_u64());
    let mut metadata = json!({ "cmd": cmd, "ports": ports });
    if !entrypoint.is_empty() {
        metadata["entrypoint"] = json!(entrypoint);
    }
    for (field, key) in [("User", "user"), ("WorkingDir", "workdir")] {
        if let Some(text) = config
            .get(field)
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        {
            runnable_text(field, text)?;
            if text.chars().count() > 1024 {
                return Err(ImageConfigError::TooLarge(format!(
                    "{field} is over 1024 characters"
                )));
            }
            metadata[key] = json!(text);
        }
    }
    // serde_json escapes every control character, so the stored string is one clean line.
    let execution_metadata = metadata.to_string();
    if execution_metadata.len() > MAX_EXECUTION_METADATA_BYTES {
        return Err(ImageConfigError::TooLarge(format!(
            "the execution metadata is {} bytes; at most {MAX_EXECUTION_METADATA_BYTES} are accepted",
            execution_metadata.len()
        )));
    }
    Ok(RunInfo {
        start_command,
        execution_metadata,
        labels: labels(&config),
    })
}

/// The config's string labels: the first [`MAX_LABELS`] by key, keys and values cut to
/// [`MAX_LABEL_CHARS`] and cleaned.
fn labels(config: &Value) -> std::collections::BTreeMap<String, String> {
    let Some(labels) = config.get("Labels").and_then(Value::as_object) else {
        return Default::default();
    };
    let mut kept: Vec<(&String, &str)> = labels
        .iter()
        .filter_map(|(key, value)| Some((key, value.as_str()?)))
        .collect();
    kept.sort_unstable_by_key(|(key, _)| *key);
    kept.into_iter()
        .take(MAX_LABELS)
        .map(|(key, value)| (bounded(key), bounded(value)))
        .collect()
}

/// At most [`MAX_LABEL_CHARS`] characters of `text`, control characters escaped.
fn bounded(text: &str) -> String {
    let cut: String = text.chars().take(MAX_LABEL_CHARS).collect();
    clean(&cut, MAX_LABEL_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linux() -> Platform {
        Platform::default()
    }

    fn config(inner: &str) -> Vec<u8> {
        format!(r#"{{"os":"linux","architecture":"amd64","config":{inner}}}"#).into_bytes()
    }

    #[test]
    fn labels_are_kept_bounded_and_clean_and_never_stop_a_staging() {
        let many: serde_json::Map<String, Value> = (0..100)
            .map(|i| (format!("k{i:03}"), json!(format!("v{i}"))))
            .collect();
        let mut inner = json!({ "Labels": many });
        inner["Labels"]["a.long"] = json!("x".repeat(10_000));
        inner["Labels"]["a.nul"] = json!("bad\u{0}value\nsecond line");
        inner["Labels"]["a.number"] = json!(7);
        let run = inspect(&config(&inner.to_string()), &linux()).unwrap();
        assert_eq!(run.labels.len(), MAX_LABELS);
        assert_eq!(run.labels["a.long"].chars().count(), MAX_LABEL_CHARS);
        assert!(
            !run.labels["a.nul"].contains(['\0', '\n']),
            "{:?}",
            run.labels["a.nul"]
        );
        assert!(!run.labels.contains_key("a.number"), "only string values");
        assert_eq!(
            run.labels.keys().last().unwrap(),
            "k061",
            "the first by key: a.long, a.nul, then k000 to k061"
        );
    }

    #[test]
    fn derives_command_ports_user_and_workdir() {
        let blob = config(
            r#"{"Entrypoint":["/bin/app"],"Cmd":["--port","8080"],"ExposedPorts":{"9090/udp":{},"8080/tcp":{}},"User":"1000","WorkingDir":"/srv"}"#,
        );
        let info = inspect(&blob, &linux()).unwrap();
        assert_eq!(info.start_command, "/bin/app --port 8080");
        let meta: Value = serde_json::from_str(&info.execution_metadata).unwrap();
        assert_eq!(meta["cmd"], json!(["--port", "8080"]));
        assert_eq!(meta["entrypoint"], json!(["/bin/app"]));
        assert_eq!(
            meta["ports"],
            json!([{"Port": 8080, "Protocol": "tcp"}, {"Port": 9090, "Protocol": "udp"}])
        );
        assert_eq!(
            (meta["user"].as_str(), meta["workdir"].as_str()),
            (Some("1000"), Some("/srv"))
        );
    }

    #[test]
    fn a_bare_config_gives_an_empty_command() {
        let info = inspect(br#"{"os":"linux","architecture":"amd64"}"#, &linux()).unwrap();
        assert_eq!(info.start_command, "");
        assert_eq!(
            inspect(b"nope", &linux()).unwrap_err().code(),
            "IMAGE_CONFIG_INVALID"
        );
    }

    #[test]
    fn other_platforms_and_missing_platforms_are_mismatches() {
        for (blob, needle) in [
            (
                r#"{"os":"windows","architecture":"amd64"}"#,
                "windows/amd64",
            ),
            (
                r#"{"os":"linux","architecture":"arm64","variant":"v8"}"#,
                "linux/arm64/v8",
            ),
            (r#"{"architecture":"amd64"}"#, "declares no os"),
        ] {
            let error = inspect(blob.as_bytes(), &linux()).unwrap_err();
            assert_eq!(error.code(), "PLATFORM_MISMATCH", "{blob}");
            assert!(error.to_string().contains(needle), "{error}");
        }
        let arm = Platform::parse("linux/arm64").unwrap();
        inspect(
            br#"{"os":"linux","architecture":"arm64","variant":"v8"}"#,
            &arm,
        )
        .unwrap();
    }

    #[test]
    fn control_characters_in_what_starts_a_process_are_refused() {
        for inner in [
            r#"{"Cmd":["sh","-c","a\u0000b"]}"#,
            r#"{"Entrypoint":["\u001b[31m"]}"#,
            r#"{"User":"root\r"}"#,
            r#"{"WorkingDir":"/srv\u2028x"}"#,
        ] {
            let error = inspect(&config(inner), &linux()).unwrap_err();
            assert_eq!(error.code(), "IMAGE_CONFIG_INVALID", "{inner}");
        }
        // Shell scripts use tabs and newlines.
        let info = inspect(
            &config(r#"{"Cmd":["sh","-c","set -e\n\techo hi"]}"#),
            &linux(),
        )
        .unwrap();
        assert_eq!(info.start_command, "sh -c set -e\n\techo hi");
        assert!(
            !info.execution_metadata.contains('\n'),
            "{}",
            info.execution_metadata
        );
    }

    #[test]
    fn metadata_is_bounded() {
        let long = format!(
            r#"{{"Cmd":["{}"]}}"#,
            "x".repeat(MAX_START_COMMAND_CHARS + 1)
        );
        assert_eq!(
            inspect(&config(&long), &linux()).unwrap_err().code(),
            "IMAGE_METADATA_TOO_LARGE"
        );
        let many_words = format!(
            r#"{{"Cmd":[{}]}}"#,
            vec!["\"a\""; MAX_COMMAND_WORDS + 1].join(",")
        );
        assert_eq!(
            inspect(&config(&many_words), &linux()).unwrap_err().code(),
            "IMAGE_METADATA_TOO_LARGE"
        );
        let ports: Vec<String> = (1..=MAX_PORTS + 1)
            .map(|p| format!(r#""{p}/tcp":{{}}"#))
            .collect();
        let many_ports = format!(r#"{{"ExposedPorts":{{{}}}}}"#, ports.join(","));
        assert_eq!(
            inspect(&config(&many_ports), &linux()).unwrap_err().code(),
            "IMAGE_METADATA_TOO_LARGE"
        );
    }
}
