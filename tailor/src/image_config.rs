//! What a platform needs to run an image, derived from its config blob: the start command and
//! Diego's execution metadata (`{"cmd": [...], "ports": [{"Port": 8080, "Protocol": "tcp"}], ...}`).

use serde_json::{Value, json};

/// The run-time facts of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInfo {
    /// Entrypoint followed by Cmd, joined with spaces (Cloud Foundry's `process_types.web`).
    pub start_command: String,
    /// Diego's execution metadata, as the JSON *string* the Cloud Controller expects.
    pub execution_metadata: String,
}

/// Derives [`RunInfo`] from an image config blob. Missing fields are simply absent.
pub fn run_info(config_blob: &[u8]) -> Result<RunInfo, String> {
    let value: Value = serde_json::from_slice(config_blob)
        .map_err(|e| format!("image config is not JSON: {e}"))?;
    let config = value
        .get("config")
        .or_else(|| value.get("container_config"))
        .cloned()
        .unwrap_or(Value::Null);
    let strings = |field: &str| -> Vec<String> {
        config
            .get(field)
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let entrypoint = strings("Entrypoint");
    let cmd = strings("Cmd");
    let full: Vec<String> = entrypoint.iter().chain(&cmd).cloned().collect();
    let mut ports: Vec<Value> = config
        .get("ExposedPorts")
        .and_then(Value::as_object)
        .map(|ports| {
            ports
                .keys()
                .filter_map(|key| {
                    let (port, protocol) = key.split_once('/').unwrap_or((key.as_str(), "tcp"));
                    port.parse::<u16>()
                        .ok()
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
            metadata[key] = json!(text);
        }
    }
    Ok(RunInfo {
        start_command: full.join(" "),
        execution_metadata: metadata.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_command_ports_user_and_workdir() {
        let config = br#"{"config":{"Entrypoint":["/bin/app"],"Cmd":["--port","8080"],"ExposedPorts":{"9090/udp":{},"8080/tcp":{}},"User":"1000","WorkingDir":"/srv"}}"#;
        let info = run_info(config).unwrap();
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
        let info = run_info(br#"{"architecture":"amd64"}"#).unwrap();
        assert_eq!(info.start_command, "");
        assert!(run_info(b"nope").is_err());
    }
}
