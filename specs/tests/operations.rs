//! The operator's view (`ops/`), checked against the real thing: the alerting rules load in
//! promtool and pass their unit tests; the dashboard is well-formed Grafana JSON whose every
//! query is valid PromQL; and every metric the dashboard or the alerts use is one a live
//! stager-api serves, in a scrape promtool's linter accepts.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use specs::{Service, binary, stage, stager_api, wait_finished};
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::{TestDatabase, TestRegistry};
use uuid::Uuid;

fn ops() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops")
}

/// Runs promtool (from Debian's prometheus package, which scripts/test installs).
fn promtool(args: &[&str], cwd: &Path, stdin: Option<&str>) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/test installs Debian's prometheus package)");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn assert_ok(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn dashboard() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(ops().join("grafana/tailor-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON")
}

/// Every PromQL expression of the dashboard's panels.
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect()
}

/// Every alerting rule's expression.
fn alert_exprs() -> Vec<String> {
    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(ops().join("prometheus/tailor-alerts.yml")).unwrap(),
    )
    .unwrap();
    rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().clone())
        .map(|r| r["expr"].as_str().unwrap().to_owned())
        .collect()
}

/// The `tailor_*` metric names an expression uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("tailor_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

#[test]
fn the_alerting_rules_load_and_pass_their_unit_tests() {
    let dir = ops().join("prometheus");
    assert_ok(
        &promtool(&["check", "rules", "tailor-alerts.yml"], &dir, None),
        "promtool check rules",
    );
    assert_ok(
        &promtool(&["test", "rules", "tailor-alerts.test.yml"], &dir, None),
        "promtool test rules",
    );
    // Every alert says what it is about and what it means (docs/OPERATIONS.md says what to do).
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("tailor-alerts.yml")).unwrap())
            .unwrap();
    let operations = std::fs::read_to_string(ops().join("../docs/OPERATIONS.md")).unwrap();
    for rule in rules["groups"][0]["rules"].as_sequence().unwrap() {
        let name = rule["alert"].as_str().unwrap();
        assert!(rule["annotations"]["summary"].is_string(), "{name}");
        assert!(rule["annotations"]["description"].is_string(), "{name}");
        assert!(
            ["critical", "warning"].contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
            "{name}"
        );
        assert!(
            operations.contains(name),
            "docs/OPERATIONS.md says nothing of {name}"
        );
    }
}

#[test]
fn the_dashboard_is_well_formed_grafana_json_with_valid_queries() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "tailor-overview");
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a Prometheus data source variable, so the import asks which"
    );

    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut rows = 0;
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "{panel}");
        assert!(
            ids.insert(panel["id"].as_u64().expect("a numeric id")),
            "duplicate id: {title}"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(
            grid["y"].is_u64() && grid["h"].as_u64().unwrap() > 0,
            "{title}"
        );
        assert!(x + w <= 24, "{title} overflows the 24-column grid");
        match panel["type"].as_str().unwrap() {
            "row" => rows += 1,
            "timeseries" | "stat" | "gauge" | "bargauge" | "table" => {
                assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
                let targets = panel["targets"].as_array().expect("targets");
                assert!(!targets.is_empty(), "{title} has no query");
                let refs: BTreeSet<&str> = targets
                    .iter()
                    .map(|t| t["refId"].as_str().unwrap())
                    .collect();
                assert_eq!(refs.len(), targets.len(), "{title}: refIds repeat");
            }
            other => panic!("{title}: unexpected panel type {other}"),
        }
    }
    assert_eq!(
        rows, 5,
        "stagings, queue, bytes and upstreams, callbacks, pruning"
    );

    // Every query is valid PromQL: promtool checks them as recording rules.
    let rules = json!({ "groups": [{ "name": "dashboard", "rules":
        dashboard_exprs(&dashboard).iter().enumerate()
            .map(|(n, expr)| json!({ "record": format!("dashboard:query_{n}"), "expr": expr }))
            .collect::<Vec<_>>() }] });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("queries.yml"), rules.to_string()).unwrap();
    assert_ok(
        &promtool(&["check", "rules", "queries.yml"], dir.path(), None),
        "the dashboard's queries",
    );
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_use_is_served() {
    let db = TestDatabase::new().await;
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let image = ImageSpec::seeded(ManifestFormat::Docker, 9300, 1, 4096).build();
    hub.push("ops/app:v1", &image).await;
    let insecure = [hub.host(), internal.host()];
    let api = Service::start(stager_api(&db.url, &internal.host(), &insecure, &[]));
    // A success, a failure, and a prune run: every family has something to say.
    for image in ["ops/app:v1", "ops/missing:v1"] {
        let staged = stage(
            &api,
            json!({ "app_guid": Uuid::new_v4(), "image": format!("{}/{image}", hub.host()) }),
        )
        .await;
        wait_finished(
            &api,
            staged["staging_guid"].as_str().unwrap(),
            Duration::from_secs(60),
        )
        .await;
    }
    let pruned = Command::new(binary("tailor"))
        .arg("prune")
        .env("DATABASE_URL", &db.url)
        .env("TAILOR_INTERNAL_REGISTRY", internal.host())
        .env("TAILOR_INSECURE_REGISTRIES", internal.host())
        .output()
        .unwrap();
    assert!(
        matches!(pruned.status.code(), Some(0 | 3)),
        "{}",
        String::from_utf8_lossy(&pruned.stderr)
    );

    let scrape = specs::metrics(&api).await;
    assert_ok(
        &promtool(&["check", "metrics"], Path::new("."), Some(&scrape)),
        "promtool's lint of a live scrape",
    );
    let mut served = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let mut parts = declared.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            served.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    served.insert(format!("{name}{suffix}"));
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            served.insert(name);
        }
    }
    assert!(
        scrape.contains("tailor_stagings_failed_total{code=\"IMAGE_NOT_FOUND\"} 1"),
        "{scrape}"
    );
    let used: BTreeSet<String> = dashboard_exprs(&dashboard())
        .iter()
        .chain(alert_exprs().iter())
        .flat_map(|e| metric_names(e))
        .collect();
    assert!(used.len() >= 12, "{used:?}");
    let missing: Vec<&String> = used.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "used but not served: {missing:?}\n{scrape}"
    );
}
