//! The example deployment and its ops files: each variant interpolates (ops applied the way
//! `bosh interpolate` applies them, by `bosh-release/tests/interpolate.rb`), names only
//! properties the jobs declare, and, with its variables filled in and its links resolved as
//! the director would, renders into configuration the binaries accept.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Map, Value, json};
use specs::bosh::{bpm_env, check_config, job_spec, release_dir, render};

fn release() -> PathBuf {
    release_dir()
}

const VARIANTS: [&[&str]; 5] = [
    &[],
    &["colocated-postgres.yml"],
    &["s3-storage.yml"],
    &["scale-workers.yml"],
    &[
        "colocated-postgres.yml",
        "s3-storage.yml",
        "scale-workers.yml",
    ],
];

fn interpolate(ops: &[&str]) -> Value {
    let mut command = Command::new("ruby");
    command
        .arg(release().join("tests/interpolate.rb"))
        .arg(release().join("manifests/tailor.yml"));
    for op in ops {
        command.arg(release().join("manifests/operations").join(op));
    }
    let output = command.output().expect("ruby (scripts/test installs it)");
    assert!(
        output.status.success(),
        "{ops:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// What a director with CredHub and the operator's `-v` flags would put for `((name))`.
fn variable(name: &str) -> Value {
    let (cert, key) = testkit::certs::self_signed(&["tailor.bosh"]);
    match name {
        "database_url" => json!("postgres://tailor:pw@db.example.com:5432/tailor?sslmode=require"),
        "credentials_key" => {
            json!("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
        }
        "registry_password_bcrypt" => json!("$2y$05$abcdefghijklmnopqrstuv"),
        "worker_instances" => json!(4),
        "workers_per_instance" => json!(8),
        "s3_endpoint" => json!("https://minio.example.com"),
        n if n.ends_with(".certificate") || n.ends_with(".ca") => json!(cert),
        n if n.ends_with(".private_key") => json!(key),
        n => json!(format!("generated-{n}-0123456789abcdef")),
    }
}

fn fill_variables(value: &mut Value) {
    match value {
        Value::String(text) if text.starts_with("((") && text.ends_with("))") => {
            *value = variable(&text[2..text.len() - 2]);
        }
        Value::String(text) => assert!(!text.contains("(("), "a partial variable in {text:?}"),
        Value::Array(items) => items.iter_mut().for_each(fill_variables),
        Value::Object(map) => map.values_mut().for_each(fill_variables),
        _ => {}
    }
}

/// Every leaf of `properties` must be (under) a property the job declares.
fn undeclared(properties: &Value, declared: &Map<String, Value>, prefix: &str) -> Vec<String> {
    let Value::Object(map) = properties else {
        return vec![prefix.to_owned()];
    };
    map.iter()
        .flat_map(|(key, value)| {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            if declared.contains_key(&path) {
                Vec::new()
            } else {
                undeclared(value, declared, &path)
            }
        })
        .collect()
}

fn jobs_of(manifest: &Value) -> Vec<(String, Value)> {
    manifest["instance_groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| {
            let group_name = group["name"].as_str().unwrap().to_owned();
            group["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |job| (group_name.clone(), job.clone()))
        })
        .collect()
}

/// The links the director would resolve: the one provider of each type in the deployment.
fn links(manifest: &Value) -> Value {
    let mut links = Map::new();
    for (group, job) in jobs_of(manifest) {
        match (job["release"].as_str(), job["name"].as_str()) {
            (Some("tailor"), Some("docker-registry")) => {
                let mut properties = job["properties"].clone();
                properties["docker_registry"]["port"] = json!(5000);
                links.insert(
                    "internal-registry".into(),
                    json!({ "address": format!("q-s0.{group}.default.tailor.bosh"), "properties": properties }),
                );
            }
            (Some("postgres"), Some("postgres")) => {
                links.insert(
                    "database".into(),
                    json!({ "address": format!("q-s0.{group}.default.tailor.bosh"), "properties": job["properties"] }),
                );
            }
            _ => {}
        }
    }
    Value::Object(links)
}

#[test]
fn every_variant_names_only_declared_properties_and_renders_what_the_binaries_accept() {
    for ops in VARIANTS {
        let mut manifest = interpolate(ops);
        fill_variables(&mut manifest);
        let links = links(&manifest);
        assert!(
            links.get("internal-registry").is_some(),
            "{ops:?}: no internal registry"
        );
        let mut rendered_jobs = 0;
        for (group, job) in jobs_of(&manifest) {
            if job["release"] != "tailor" {
                continue;
            }
            let name = job["name"].as_str().unwrap();
            let spec = job_spec(name);
            let declared = spec["properties"].as_object().unwrap();
            let unknown = undeclared(&job["properties"], declared, "");
            assert!(
                unknown.is_empty(),
                "{ops:?} {group}/{name}: undeclared properties {unknown:?}"
            );
            let context = json!({ "properties": job["properties"], "links": links });
            for template in spec["templates"].as_object().unwrap().keys() {
                let rendered = render(name, template, &context)
                    .unwrap_or_else(|e| panic!("{ops:?} {group}/{name}: {e}"));
                if template == "bpm.yml.erb" && name != "docker-registry" {
                    // TLS files are checked where the job renders them, not here.
                    let env: Vec<(String, String)> = bpm_env(&rendered)
                        .into_iter()
                        .filter(|(k, _)| !k.starts_with("STAGER_TLS_"))
                        .collect();
                    check_config(name, &env)
                        .unwrap_or_else(|e| panic!("{ops:?} {group}/{name}: {e}"));
                }
            }
            rendered_jobs += 1;
        }
        assert_eq!(
            rendered_jobs, 4,
            "{ops:?}: every tailor job is deployed once"
        );
    }
}

#[test]
fn the_variants_change_what_they_say_they_change() {
    let base = interpolate(&[]);
    let group = |manifest: &Value, name: &str| -> Value {
        manifest["instance_groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert!(group(&base, "postgres").is_null());

    let postgres = interpolate(&["colocated-postgres.yml"]);
    assert_eq!(group(&postgres, "postgres")["jobs"][0]["name"], "postgres");
    for (g, job) in [
        ("stager-api", "stager-api"),
        ("worker", "tailor-worker"),
        ("pruner", "tailor-pruner"),
    ] {
        let properties = &group(&postgres, g)["jobs"][1]["properties"];
        assert_eq!(
            properties["tailor"]["database"],
            Value::Null,
            "{job} falls back to the link"
        );
    }

    let s3 = interpolate(&["s3-storage.yml"]);
    let registry = group(&s3, "registry");
    assert_eq!(
        registry["jobs"][1]["properties"]["docker_registry"]["storage"]["type"],
        "s3"
    );
    assert!(registry["persistent_disk_type"].is_null());

    let scaled = interpolate(&["scale-workers.yml"]);
    assert_eq!(
        group(&scaled, "worker")["instances"],
        "((worker_instances))"
    );
}
