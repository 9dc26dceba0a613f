//! The example deployment and its ops files: each variant interpolates (ops applied the way
//! `bosh interpolate` applies them, by `bosh-release/tests/interpolate.rb`), names only
//! properties the jobs declare, and, with its variables filled in and its links resolved as
//! the director would, renders into configuration the binaries accept (and, for the HA
//! registry's load balancer, that Debian's `nginx -t` accepts).

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Map, Value, json};
use specs::bosh::{bpm_env, check_config, job_spec, nginx_accepts, release_dir, render};

fn release() -> PathBuf {
    release_dir()
}

const VARIANTS: [&[&str]; 8] = [
    &[],
    &["colocated-postgres.yml"],
    &["s3-storage.yml"],
    &["scale-workers.yml"],
    &[
        "colocated-postgres.yml",
        "s3-storage.yml",
        "scale-workers.yml",
    ],
    &["ha-registry.yml"],
    &["s3-storage.yml", "ha-registry.yml"],
    &[
        "colocated-postgres.yml",
        "s3-storage.yml",
        "ha-registry.yml",
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
    // One pair for every certificate variable, so each `.certificate` matches its
    // `.private_key` (nginx -t checks that they do).
    static PAIR: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    let (cert, key) = PAIR.get_or_init(|| testkit::certs::self_signed(&["tailor.bosh"]));
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

/// The instance group named `name`.
fn group(manifest: &Value, name: &str) -> Value {
    manifest["instance_groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// The links the director would resolve: the one provider of each type in the deployment, with
/// one instance per instance of its group (IP addresses, as `nginx -t` resolves upstreams).
fn links(manifest: &Value) -> Value {
    let mut links = Map::new();
    for (group_name, job) in jobs_of(manifest) {
        let address = format!("q-s0.{group_name}.default.tailor.bosh");
        let instances: Vec<Value> = (0..group(manifest, &group_name)["instances"]
            .as_u64()
            .unwrap_or(1))
            .map(|i| json!({ "address": format!("10.0.2.{}", 10 + i) }))
            .collect();
        match (job["release"].as_str(), job["name"].as_str()) {
            (Some("tailor"), Some("docker-registry")) => {
                let mut properties = job["properties"].clone();
                properties["docker_registry"]["port"] = json!(5000);
                links.insert(
                    "internal-registry".into(),
                    json!({ "address": address, "instances": instances, "properties": properties }),
                );
            }
            (Some("tailor"), Some("registry-lb")) => {
                let mut properties = job["properties"].clone();
                properties["registry_lb"]["port"] = json!(443);
                links.insert(
                    "internal-registry-lb".into(),
                    json!({ "address": address, "instances": instances, "properties": properties }),
                );
            }
            (Some("postgres"), Some("postgres")) => {
                links.insert(
                    "database".into(),
                    json!({ "address": address, "properties": job["properties"] }),
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
                if template == "bpm.yml.erb" && ["docker-registry", "registry-lb"].contains(&name) {
                    continue;
                }
                if template == "bpm.yml.erb" {
                    // TLS files are checked where the job renders them, not here.
                    let env: Vec<(String, String)> = bpm_env(&rendered)
                        .into_iter()
                        .filter(|(k, _)| !k.starts_with("STAGER_TLS_"))
                        .collect();
                    check_config(name, &env)
                        .unwrap_or_else(|e| panic!("{ops:?} {group}/{name}: {e}"));
                }
            }
            if name == "registry-lb" {
                let dir = tempfile::tempdir().unwrap();
                nginx_accepts(&context, dir.path())
                    .unwrap_or_else(|e| panic!("{ops:?} {group}/{name}: nginx -t: {e}"));
            }
            rendered_jobs += 1;
        }
        let expected = if ops.contains(&"ha-registry.yml") {
            5
        } else {
            4
        };
        assert_eq!(
            rendered_jobs, expected,
            "{ops:?}: every tailor job is deployed once"
        );
    }
}

#[test]
fn the_variants_change_what_they_say_they_change() {
    let base = interpolate(&[]);
    assert!(group(&base, "postgres").is_null());
    // The egress lists are shown, empty (the example needs no exceptions), and the same on the
    // API and the workers, as they must be.
    let egress = |g: &str| group(&base, g)["jobs"][1]["properties"]["tailor"]["egress"].clone();
    assert_eq!(egress("stager-api"), json!({ "allow": [], "deny": [] }));
    assert_eq!(egress("worker"), egress("stager-api"));

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

    for ops in [
        &["ha-registry.yml"][..],
        &["s3-storage.yml", "ha-registry.yml"][..],
    ] {
        let ha = interpolate(ops);
        let registry = group(&ha, "registry");
        assert!(
            registry["instances"].as_u64().unwrap() >= 2,
            "{ops:?}: two or more registry instances"
        );
        assert!(registry["persistent_disk_type"].is_null(), "{ops:?}");
        let storage = &registry["jobs"][1]["properties"]["docker_registry"]["storage"];
        assert_eq!(storage["type"], "s3", "{ops:?}: one shared bucket");
        assert_eq!(
            storage["redirect"]["disable"], true,
            "{ops:?}: reads stay behind the load balancer"
        );
        assert_eq!(
            registry["jobs"][1]["properties"]["docker_registry"]["http_secret"],
            "((registry_http_secret))",
            "{ops:?}: one http_secret variable for every instance"
        );
        let lb = group(&ha, "registry-lb");
        assert_eq!(lb["jobs"][1]["name"], "registry-lb", "{ops:?}");
        let tls_variable = ha["variables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "registry_lb_tls")
            .cloned()
            .unwrap_or(Value::Null);
        assert_eq!(tls_variable["type"], "certificate", "{ops:?}");
        assert_eq!(tls_variable["options"]["ca"], "tailor_ca", "{ops:?}");
    }
    // With the ops file, tailor's jobs name the load balancer as their internal registry.
    let mut ha = interpolate(&["ha-registry.yml"]);
    fill_variables(&mut ha);
    let links = links(&ha);
    let worker = group(&ha, "worker")["jobs"][1].clone();
    let context = json!({ "properties": worker["properties"], "links": links });
    let env = bpm_env(&render("tailor-worker", "bpm.yml.erb", &context).unwrap());
    let registry = env
        .iter()
        .find(|(k, _)| k == "TAILOR_INTERNAL_REGISTRY")
        .map(|(_, v)| v.as_str());
    assert_eq!(registry, Some("q-s0.registry-lb.default.tailor.bosh:443"));

    let scaled = interpolate(&["scale-workers.yml"]);
    assert_eq!(
        group(&scaled, "worker")["instances"],
        "((worker_instances))"
    );
}
