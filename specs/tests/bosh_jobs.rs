//! The BOSH release's jobs: every template renders with Ruby's ERB through a harness that gives
//! templates what the director gives them (`bosh-release/tests/render.rb`), for the defaults
//! and for custom properties; what they render is then validated by the binaries themselves
//! (`check-config`, `docker-registry garbage-collect --dry-run`, `nginx -t`), so templates and
//! code cannot drift apart; bad properties fail at render time with a message that names them.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use specs::bosh::{
    check_config, job_spec, nginx_accepts, release_dir, render, render_job, ruby_yaml as yaml,
    templates,
};

const JOBS: [&str; 5] = [
    "stager-api",
    "tailor-worker",
    "tailor-pruner",
    "docker-registry",
    "registry-lb",
];
const TOKEN: &str = "bosh-token-0123456789abcdef";

fn release() -> PathBuf {
    release_dir()
}

fn registry_link(tls: bool) -> Value {
    let mut properties = json!({ "docker_registry": {
        "port": 5000,
        "users": [{ "name": "tailor", "password": "registry-pw", "bcrypt": "$2y$05$abcdefghijklmnopqrstuv" }],
    }});
    if tls {
        properties["docker_registry"]["tls"] = json!({ "certificate": "PEM" });
    }
    json!({ "address": "registry.tailor.internal", "properties": properties })
}

/// The docker-registry link as registry-lb consumes it: two instances (IP addresses, so that
/// `nginx -t`, which resolves upstream names, needs no DNS).
fn registry_instances_link(tls: bool) -> Value {
    let mut link = registry_link(tls);
    link["address"] = json!("q-s0.registry.default.tailor.bosh");
    link["instances"] = json!([{ "address": "10.0.1.11" }, { "address": "10.0.1.12" }]);
    link
}

/// The registry-lb link as tailor's jobs consume it.
fn registry_lb_link() -> Value {
    json!({
        "address": "q-s0.registry-lb.default.tailor.bosh",
        "properties": { "registry_lb": { "port": 443 } },
    })
}

fn postgres_link() -> Value {
    json!({
        "address": "postgres.tailor.internal",
        "properties": { "databases": {
            "port": 5524,
            "databases": [{ "name": "tailor" }],
            "roles": [{ "name": "tailor", "password": "p@ss/w:rd" }],
        }},
    })
}

/// The least each job needs: the defaults for everything else.
fn minimal(job: &str) -> Value {
    match job {
        "stager-api" => json!({
            "properties": {
                "stager_api": { "api_tokens": [TOKEN] },
                "tailor": { "database": { "url": "postgres://tailor:pw@db.example:5432/tailor" } },
            },
            "links": { "internal-registry": registry_link(false) },
        }),
        "tailor-worker" | "tailor-pruner" => json!({
            "properties": {},
            "links": { "database": postgres_link(), "internal-registry": registry_link(false) },
        }),
        "docker-registry" => json!({
            "properties": { "docker_registry": { "http_secret": "0123456789abcdef0123" } },
        }),
        "registry-lb" => {
            let (cert, key) = testkit::certs::self_signed(&["registry-lb.tailor.internal"]);
            json!({
                "properties": { "registry_lb": { "tls": { "certificate": cert, "private_key": key } } },
                "links": { "internal-registry": registry_instances_link(false) },
            })
        }
        other => panic!("unknown job {other}"),
    }
}

/// Every property set, links the other way round (external database, TLS registry).
fn custom(job: &str, dir: &Path) -> Value {
    let (cert, key) = testkit::certs::self_signed(&["stager.tailor.internal"]);
    let key_hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let tailor = json!({
        "database": { "url": "postgres://tailor:secret@10.0.0.5:5432/tailor?sslmode=require" },
        "internal_registry": { "address": "registry.example.com:443", "username": "u", "password": "pw" },
        "repo_prefix": "cf/apps",
        "default_registry": "registry.example.com",
        "insecure_registries": ["10.1.0.9:5000"],
        "log_format": "text",
    });
    match job {
        "stager-api" => {
            let mut tailor = tailor;
            tailor["credentials_key"] = json!(key_hex);
            json!({
                "properties": {
                    "stager_api": {
                        "listen_address": "127.0.0.1",
                        "port": 8443,
                        "api_tokens": [TOKEN, "another-token-abcdefghij"],
                        "workers": 0,
                        "tls": { "certificate": cert, "private_key": key, "client_ca": cert },
                    },
                    "tailor": tailor,
                },
                "links": { "database": postgres_link() },
            })
        }
        "tailor-worker" => {
            let mut tailor = tailor;
            tailor["credentials_key"] = json!(key_hex);
            json!({
                "properties": {
                    "tailor_worker": {
                        "workers": 16, "copy_concurrency": 4, "lease_seconds": 60, "poll_seconds": 2,
                        "max_attempts": 8, "drain_seconds": 10, "read_only_retry_seconds": 30,
                    },
                    "tailor": tailor,
                },
                "links": { "internal-registry": registry_link(true) },
            })
        }
        "tailor-pruner" => json!({
            "properties": {
                "tailor_pruner": { "schedule": "*/30 2-5 * * 1-5", "grace": "7d", "dry_run": true },
                "tailor": tailor,
            },
        }),
        "docker-registry" => json!({
            "properties": { "docker_registry": {
                "listen_address": "127.0.0.1",
                "port": 5443,
                "http_secret": "0123456789abcdef0123",
                "storage": { "filesystem": { "root": dir.join("storage").display().to_string() } },
                "tls": { "certificate": cert, "private_key": key },
                "users": [
                    { "name": "tailor", "password": "pw", "bcrypt": "$2y$05$abcdefghijklmnopqrstuv" },
                    { "name": "ops", "password": "pw2", "bcrypt": "$2b$10$abcdefghijklmnopqrstuv" },
                ],
                "upload_purging": false,
            }},
        }),
        "registry-lb" => json!({
            "properties": { "registry_lb": {
                "listen_address": "127.0.0.1",
                "port": 8443,
                "tls": { "certificate": cert, "private_key": key },
                "upstream_tls": { "ca": cert, "server_name": "registry.tailor.internal" },
                "max_fails": 3,
                "fail_timeout": "10s",
                "connect_timeout": "500ms",
                "read_timeout": "15m",
                "worker_processes": 2,
                "worker_connections": 512,
            }},
            "links": { "internal-registry": registry_instances_link(true) },
        }),
        other => panic!("unknown job {other}"),
    }
}

fn env_value<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[test]
fn tailor_jobs_render_what_the_binaries_accept_with_defaults_and_custom_properties() {
    for job in ["stager-api", "tailor-worker", "tailor-pruner"] {
        for (label, manifest) in [
            ("defaults", minimal(job)),
            ("custom", custom(job, Path::new("/unused"))),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let env = render_job(job, &manifest, dir.path());
            check_config(job, &env).unwrap_or_else(|e| panic!("{job} ({label}): {e}"));
        }
    }
}

#[test]
fn links_and_properties_land_where_the_binaries_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let env = render_job("tailor-worker", &minimal("tailor-worker"), dir.path());
    assert_eq!(
        env_value(&env, "DATABASE_URL"),
        Some("postgres://tailor:p%40ss%2Fw%3Ard@postgres.tailor.internal:5524/tailor"),
        "the postgres-release link, password URL-encoded"
    );
    assert_eq!(
        env_value(&env, "TAILOR_INTERNAL_REGISTRY"),
        Some("registry.tailor.internal:5000")
    );
    assert_eq!(
        env_value(&env, "TAILOR_INSECURE_REGISTRIES"),
        Some("registry.tailor.internal:5000"),
        "a registry without TLS is spoken to over HTTP"
    );
    assert_eq!(
        env_value(&env, "TAILOR_INTERNAL_REGISTRY_USER"),
        Some("tailor")
    );
    assert_eq!(env_value(&env, "TAILOR_DRAIN_SECONDS"), Some("15"));

    let dir = tempfile::tempdir().unwrap();
    let env = render_job(
        "tailor-worker",
        &custom("tailor-worker", dir.path()),
        dir.path(),
    );
    assert_eq!(
        env_value(&env, "TAILOR_INTERNAL_REGISTRY"),
        Some("registry.example.com:443"),
        "an explicit address wins over the link"
    );
    assert_eq!(
        env_value(&env, "TAILOR_INSECURE_REGISTRIES"),
        Some("10.1.0.9:5000")
    );
    assert_eq!(env_value(&env, "TAILOR_WORKERS"), Some("16"));

    let dir = tempfile::tempdir().unwrap();
    let env = render_job("stager-api", &custom("stager-api", dir.path()), dir.path());
    assert_eq!(env_value(&env, "STAGER_LISTEN"), Some("127.0.0.1:8443"));
    let cert = env_value(&env, "STAGER_TLS_CERT").unwrap();
    assert!(
        std::fs::read_to_string(cert)
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    assert!(env_value(&env, "STAGER_TLS_CLIENT_CA").is_some());

    let dir = tempfile::tempdir().unwrap();
    let env = render_job(
        "tailor-pruner",
        &custom("tailor-pruner", dir.path()),
        dir.path(),
    );
    assert_eq!(
        env_value(&env, "TAILOR_PRUNE_SCHEDULE"),
        Some("*/30 2-5 * * 1-5")
    );
    assert_eq!(env_value(&env, "TAILOR_PRUNE_DRY_RUN"), Some("true"));
    assert_eq!(
        env_value(&env, "TAILOR_CREDENTIALS_KEY"),
        None,
        "the pruner never holds the key"
    );
}

#[test]
fn the_registry_config_is_accepted_by_the_registry_itself() {
    for (label, manifest_of) in [("defaults", false), ("custom", true)] {
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = if manifest_of {
            custom("docker-registry", dir.path())
        } else {
            minimal("docker-registry")
        };
        // The registry needs a storage root it can write in a test.
        manifest["properties"]["docker_registry"]["storage"]["filesystem"]["root"] =
            json!(dir.path().join("storage").display().to_string());
        let config = render("docker-registry", "config.yml.erb", &manifest).unwrap();
        let rendered = yaml(&config);
        assert_eq!(rendered["storage"]["delete"]["enabled"], true, "{label}");
        assert_eq!(
            rendered["storage"]["maintenance"]["readonly"]["enabled"], false,
            "registry-gc needs the readonly block ({label})"
        );
        let path = dir.path().join("config.yml");
        std::fs::write(&path, &config).unwrap();
        // An empty store, as a fresh deployment has after its first push.
        for kind in ["repositories", "blobs"] {
            std::fs::create_dir_all(dir.path().join("storage/docker/registry/v2").join(kind))
                .unwrap();
        }
        let output = Command::new("docker-registry")
            .args(["garbage-collect", "--dry-run"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{label}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let manifest = custom("docker-registry", dir.path());
    let htpasswd = render("docker-registry", "htpasswd.erb", &manifest).unwrap();
    assert_eq!(
        htpasswd.lines().collect::<Vec<_>>(),
        [
            "tailor:$2y$05$abcdefghijklmnopqrstuv",
            "ops:$2b$10$abcdefghijklmnopqrstuv"
        ]
    );
    let gc = render("docker-registry", "bin/registry-gc.erb", &manifest).unwrap();
    assert!(gc.contains("--url 'https://10.0.0.10:5443'"), "{gc}");
    let syntax = Command::new("bash")
        .arg("-n")
        .arg("-c")
        .arg(&gc)
        .status()
        .unwrap();
    assert!(syntax.success());
}

#[test]
fn the_load_balancer_config_is_accepted_by_nginx_itself() {
    let dir = tempfile::tempdir().unwrap();
    let config = nginx_accepts(&minimal("registry-lb"), dir.path())
        .unwrap_or_else(|e| panic!("defaults: {e}"));
    for line in [
        "listen 0.0.0.0:443 ssl;",
        "server 10.0.1.11:5000 max_fails=1 fail_timeout=5s;",
        "server 10.0.1.12:5000 max_fails=1 fail_timeout=5s;",
        "proxy_pass http://registry;",
        "proxy_request_buffering off;",
        "proxy_buffering off;",
        "client_max_body_size 0;",
        "proxy_set_header X-Forwarded-Proto https;",
        "proxy_next_upstream error timeout http_502 http_503;",
    ] {
        assert!(config.contains(line), "defaults: no `{line}` in\n{config}");
    }
    assert!(!config.contains("proxy_ssl_verify"), "plain HTTP upstreams");
    let bpm = yaml(&std::fs::read_to_string(dir.path().join("config/bpm.yml")).unwrap());
    assert_eq!(
        bpm["processes"][0]["capabilities"],
        json!(["NET_BIND_SERVICE"]),
        "port 443 as vcap needs the capability"
    );

    let dir = tempfile::tempdir().unwrap();
    let config = nginx_accepts(&custom("registry-lb", dir.path()), dir.path())
        .unwrap_or_else(|e| panic!("custom: {e}"));
    for line in [
        "listen 127.0.0.1:8443 ssl;",
        "worker_processes 2;",
        "worker_connections 512;",
        "server 10.0.1.11:5000 max_fails=3 fail_timeout=10s;",
        "proxy_pass https://registry;",
        "proxy_ssl_verify on;",
        "proxy_ssl_name registry.tailor.internal;",
        "proxy_connect_timeout 500ms;",
        "proxy_read_timeout 15m;",
    ] {
        assert!(config.contains(line), "custom: no `{line}` in\n{config}");
    }
    let bpm = yaml(&std::fs::read_to_string(dir.path().join("config/bpm.yml")).unwrap());
    assert!(
        bpm["processes"][0]["capabilities"].is_null(),
        "8443 needs no capability"
    );

    // Upstreams given as a property win over the link; TLS to them follows from a CA.
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = minimal("registry-lb");
    manifest["properties"]["registry_lb"]["upstreams"] = json!(["127.0.0.1:5001", "[::1]:5002"]);
    manifest["links"] = json!({});
    let config = nginx_accepts(&manifest, dir.path()).unwrap_or_else(|e| panic!("upstreams: {e}"));
    assert!(
        config.contains("server 127.0.0.1:5001 max_fails=1"),
        "{config}"
    );
    assert!(config.contains("server [::1]:5002 max_fails=1"), "{config}");
    // The link's address is what the registries' certificates are checked against by default.
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = custom("registry-lb", dir.path());
    manifest["properties"]["registry_lb"]["upstream_tls"]
        .as_object_mut()
        .unwrap()
        .remove("server_name");
    let config = nginx_accepts(&manifest, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        config.contains("proxy_ssl_name q-s0.registry.default.tailor.bosh;"),
        "{config}"
    );
}

#[test]
fn tailor_jobs_use_the_load_balancer_when_the_deployment_has_one() {
    for job in ["stager-api", "tailor-worker", "tailor-pruner"] {
        let mut manifest = minimal(job);
        manifest["links"]["internal-registry"] = registry_link(false);
        manifest["links"]["internal-registry-lb"] = registry_lb_link();
        let dir = tempfile::tempdir().unwrap();
        let env = render_job(job, &manifest, dir.path());
        assert_eq!(
            env_value(&env, "TAILOR_INTERNAL_REGISTRY"),
            Some("q-s0.registry-lb.default.tailor.bosh:443"),
            "{job}: the load balancer is the internal registry"
        );
        assert_eq!(
            env_value(&env, "TAILOR_INSECURE_REGISTRIES"),
            None,
            "{job}: the load balancer speaks HTTPS, whatever the instances do"
        );
        assert_eq!(
            env_value(&env, "TAILOR_INTERNAL_REGISTRY_USER"),
            Some("tailor"),
            "{job}: users still come from the registry's link"
        );
        check_config(job, &env).unwrap_or_else(|e| panic!("{job}: {e}"));

        // An explicit address still wins.
        manifest["properties"]["tailor"]["internal_registry"] =
            json!({ "address": "registry.example.com:443" });
        let dir = tempfile::tempdir().unwrap();
        let env = render_job(job, &manifest, dir.path());
        assert_eq!(
            env_value(&env, "TAILOR_INTERNAL_REGISTRY"),
            Some("registry.example.com:443"),
            "{job}"
        );
    }
}

#[test]
fn missing_or_contradictory_properties_fail_at_render_time_with_their_names() {
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        (
            "stager-api",
            "bpm.yml.erb",
            json!({ "properties": { "tailor": { "database": { "url": "postgres://x@h/d" } } },
                    "links": { "internal-registry": registry_link(false) } }),
            "stager_api.api_tokens",
        ),
        (
            "stager-api",
            "bpm.yml.erb",
            json!({ "properties": { "stager_api": { "api_tokens": [TOKEN] } },
                    "links": { "internal-registry": registry_link(false) } }),
            "tailor.database.url",
        ),
        (
            "stager-api",
            "bpm.yml.erb",
            json!({ "properties": { "stager_api": { "api_tokens": [TOKEN] },
                                    "tailor": { "database": { "url": "postgres://x@h/d" } } } }),
            "tailor.internal_registry.address",
        ),
        (
            "stager-api",
            "bpm.yml.erb",
            {
                let mut m = minimal("stager-api");
                m["properties"]["stager_api"]["tls"] = json!({ "certificate": "PEM" });
                m
            },
            "stager_api.tls.private_key",
        ),
        (
            "stager-api",
            "bpm.yml.erb",
            {
                let mut m = minimal("stager-api");
                m["properties"]["stager_api"]["tls"] = json!({ "client_ca": "PEM" });
                m
            },
            "stager_api.tls.client_ca",
        ),
        (
            "stager-api",
            "bpm.yml.erb",
            {
                let mut m = minimal("stager-api");
                m["properties"]["stager_api"]["api_tokens"] = json!([]);
                m
            },
            "stager_api.api_tokens",
        ),
        (
            "tailor-worker",
            "bpm.yml.erb",
            {
                let mut m = minimal("tailor-worker");
                m["properties"]["tailor"] = json!({ "database": { "role": "nobody" } });
                m
            },
            "tailor.database.role",
        ),
        (
            "tailor-worker",
            "bpm.yml.erb",
            {
                let mut m = minimal("tailor-worker");
                m["properties"]["tailor_worker"] = json!({ "drain_seconds": 60 });
                m
            },
            "tailor_worker.drain_seconds",
        ),
        (
            "docker-registry",
            "config.yml.erb",
            json!({ "properties": {} }),
            "docker_registry.http_secret",
        ),
        (
            "docker-registry",
            "config.yml.erb",
            {
                let mut m = minimal("docker-registry");
                m["properties"]["docker_registry"]["storage"] = json!({ "type": "s3" });
                m
            },
            "docker_registry.storage.s3.bucket",
        ),
        (
            "docker-registry",
            "config.yml.erb",
            {
                let mut m = minimal("docker-registry");
                m["properties"]["docker_registry"]["storage"] = json!({ "type": "nfs" });
                m
            },
            "docker_registry.storage.type",
        ),
        (
            "docker-registry",
            "htpasswd.erb",
            {
                let mut m = minimal("docker-registry");
                m["properties"]["docker_registry"]["users"] =
                    json!([{ "name": "tailor", "password": "pw" }]);
                m
            },
            "docker_registry.users[0] needs bcrypt",
        ),
        (
            "docker-registry",
            "bpm.yml.erb",
            {
                let mut m = minimal("docker-registry");
                m["properties"]["docker_registry"]["storage"] =
                    json!({ "filesystem": { "root": "/data/registry" } });
                m
            },
            "docker_registry.storage.filesystem.root",
        ),
        (
            "registry-lb",
            "nginx.conf.erb",
            json!({ "properties": {},
                    "links": { "internal-registry": registry_instances_link(false) } }),
            "registry_lb.tls.certificate",
        ),
        (
            "registry-lb",
            "nginx.conf.erb",
            {
                let mut m = minimal("registry-lb");
                m["properties"]["registry_lb"]["tls"]
                    .as_object_mut()
                    .unwrap()
                    .remove("private_key");
                m
            },
            "registry_lb.tls.private_key",
        ),
        (
            "registry-lb",
            "nginx.conf.erb",
            {
                let mut m = minimal("registry-lb");
                m["links"]["internal-registry"]["instances"] = json!([]);
                m
            },
            "registry_lb.upstreams",
        ),
        (
            "registry-lb",
            "nginx.conf.erb",
            {
                let mut m = minimal("registry-lb");
                m["links"] = json!({});
                m
            },
            "registry_lb.upstreams",
        ),
        (
            "registry-lb",
            "nginx.conf.erb",
            {
                let mut m = minimal("registry-lb");
                m["properties"]["registry_lb"]["upstreams"] = json!(["10.0.1.11:5000; evil"]);
                m
            },
            "registry_lb.upstreams",
        ),
        (
            "registry-lb",
            "nginx.conf.erb",
            {
                let mut m = minimal("registry-lb");
                m["links"]["internal-registry"] = registry_instances_link(true);
                m
            },
            "registry_lb.upstream_tls.ca",
        ),
        (
            "registry-lb",
            "nginx.conf.erb",
            {
                let mut m = minimal("registry-lb");
                m["properties"]["registry_lb"]["upstream_tls"] = json!({ "ca": "PEM" });
                m
            },
            "registry_lb.upstream_tls.ca",
        ),
        (
            "registry-lb",
            "nginx.conf.erb",
            {
                let mut m = minimal("registry-lb");
                m["properties"]["registry_lb"]["fail_timeout"] = json!("five seconds");
                m
            },
            "registry_lb.fail_timeout",
        ),
        (
            "registry-lb",
            "bpm.yml.erb",
            {
                let mut m = minimal("registry-lb");
                m["properties"]["registry_lb"]["port"] = json!(70000);
                m
            },
            "registry_lb.port",
        ),
    ];
    for (job, template, manifest, needle) in cases {
        let error = render(job, template, &manifest).err().unwrap_or_else(|| {
            panic!("{job}/{template} rendered; expected an error about {needle}")
        });
        assert!(error.contains(needle), "{job}/{template}: {error}");
    }
}

#[test]
fn values_only_the_binaries_can_judge_are_refused_by_check_config() {
    for (job, patch, setting) in [
        (
            "tailor-pruner",
            json!({ "tailor_pruner": { "schedule": "61 * * * *" } }),
            "TAILOR_PRUNE_SCHEDULE",
        ),
        (
            "tailor-pruner",
            json!({ "tailor_pruner": { "grace": "soon" } }),
            "TAILOR_PRUNE_GRACE",
        ),
        (
            "tailor-worker",
            json!({ "tailor_worker": { "workers": 0 } }),
            "TAILOR_WORKERS",
        ),
        (
            "tailor-worker",
            json!({ "tailor": { "credentials_key": "too-short" } }),
            "TAILOR_CREDENTIALS_KEY",
        ),
        (
            "stager-api",
            json!({ "stager_api": { "api_tokens": ["short"] } }),
            "STAGER_API_TOKENS",
        ),
        (
            "stager-api",
            json!({ "tailor": { "repo_prefix": "Not/Valid" } }),
            "TAILOR_REPO_PREFIX",
        ),
    ] {
        let mut manifest = minimal(job);
        for (section, values) in patch.as_object().unwrap() {
            for (key, value) in values.as_object().unwrap() {
                manifest["properties"][section][key] = value.clone();
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let env = render_job(job, &manifest, dir.path());
        let error = check_config(job, &env).expect_err(setting);
        assert!(error.contains(setting), "{job}: {error}");
    }
}

#[test]
fn the_release_layout_is_complete() {
    let mut provided_types = std::collections::HashMap::new();
    for job in JOBS {
        let spec = job_spec(job);
        assert_eq!(spec["name"], job);
        let root = release().join("jobs").join(job);
        let listed: Vec<String> = templates(job).into_iter().map(|(s, _)| s).collect();
        for source in &listed {
            assert!(
                root.join("templates").join(source).is_file(),
                "{job}: {source} is listed but missing"
            );
        }
        let mut stack = vec![root.join("templates")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                if entry.path().is_dir() {
                    stack.push(entry.path());
                    continue;
                }
                let relative = entry
                    .path()
                    .strip_prefix(root.join("templates"))
                    .unwrap()
                    .display()
                    .to_string();
                assert!(
                    listed.contains(&relative),
                    "{job}: templates/{relative} is not in the spec"
                );
            }
        }
        let monit = std::fs::read_to_string(root.join("monit")).unwrap();
        assert!(
            monit.contains(&format!("check process {job}"))
                && monit.contains(&format!("/var/vcap/sys/run/bpm/{job}/{job}.pid"))
                && monit.contains(&format!("bpm start {job}")),
            "{job}: monit must supervise the bpm process {job}:\n{monit}"
        );
        for package in spec["packages"].as_array().unwrap() {
            let package = package.as_str().unwrap();
            assert!(
                release()
                    .join("packages")
                    .join(package)
                    .join("spec")
                    .is_file(),
                "{job} needs package {package}, which does not exist"
            );
        }
        for provided in spec["provides"].as_array().into_iter().flatten() {
            provided_types.insert(
                provided["type"].as_str().unwrap().to_owned(),
                provided["properties"].clone(),
            );
        }
    }
    // Every consumed tailor link type is provided by a job of this release, and the
    // properties templates read through it are ones the provider shares.
    for job in JOBS {
        for consumed in job_spec(job)["consumes"].as_array().into_iter().flatten() {
            let kind = consumed["type"].as_str().unwrap();
            if kind.starts_with("tailor-") {
                assert!(
                    provided_types.contains_key(kind),
                    "{job} consumes {kind}, which no job provides"
                );
            }
        }
    }
    let shared = provided_types["tailor-registry"].to_string();
    for property in [
        "docker_registry.port",
        "docker_registry.tls.certificate",
        "docker_registry.users",
    ] {
        assert!(
            shared.contains(property),
            "the internal-registry link must share {property}"
        );
    }
    assert!(
        provided_types["tailor-registry-lb"]
            .to_string()
            .contains("registry_lb.port"),
        "the internal-registry-lb link must share registry_lb.port"
    );
}

#[test]
fn s3_storage_can_keep_blob_reads_on_the_registry() {
    let mut manifest = minimal("docker-registry");
    manifest["properties"]["docker_registry"]["storage"] = json!({
        "type": "s3",
        "s3": { "bucket": "b", "region": "us-east-1", "endpoint": "https://s3.example.com" },
    });
    let config = yaml(&render("docker-registry", "config.yml.erb", &manifest).unwrap());
    assert!(
        config["storage"]["redirect"].is_null(),
        "distribution's default (redirects) unless asked"
    );
    manifest["properties"]["docker_registry"]["storage"]["redirect"] = json!({ "disable": true });
    let config = yaml(&render("docker-registry", "config.yml.erb", &manifest).unwrap());
    assert_eq!(config["storage"]["redirect"]["disable"], true);
    assert_eq!(config["storage"]["s3"]["bucket"], "b");
}

#[test]
fn the_three_tailor_jobs_share_one_settings_block_word_for_word() {
    let block = |job: &str| {
        let text = std::fs::read_to_string(
            release()
                .join("jobs")
                .join(job)
                .join("templates/bpm.yml.erb"),
        )
        .unwrap();
        let start = text
            .find("# --- The settings every tailor process shares")
            .unwrap();
        let end = text.find("# --- end of the shared block.").unwrap();
        text[start..end].to_owned()
    };
    let reference = block("stager-api");
    for job in ["tailor-worker", "tailor-pruner"] {
        assert_eq!(block(job), reference, "{job} drifted from stager-api");
    }
}
