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

/// The settings of the processes that copy images and deliver callbacks (stager-api's
/// in-process workers and tailor-worker), each away from its default.
fn custom_copying() -> Value {
    json!({
        "min_transfer_rate": "1MiB",
        "min_transfer_window": "1m",
        "callback": { "timeout": "30s", "retry_for": "2d" },
        "source_locations": ["oci:/var/vcap/store/images", "s3://images/site-a?endpoint=https://s3.example&region=r1"],
        "source_locations_s3": { "access_key_id": "AKIA1", "secret_access_key": "s3cret" },
        "egress": {
            "allow": ["10.1.0.0/16", "registry.corp", "harbor.corp:8443", "[fd00::5]:5000", "127.0.0.1"],
            "deny": ["10.244.0.0/16", "192.168.50.7", " api.system.example.com:443 "],
        },
    })
}

/// Every property set, links the other way round (external database, TLS registry).
fn custom(job: &str, dir: &Path) -> Value {
    let (cert, key) = testkit::certs::self_signed(&["stager.tailor.internal"]);
    let (ca, _) = testkit::certs::self_signed(&["tailor-ca"]);
    let key_hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let tailor = json!({
        "database": { "url": "postgres://tailor:secret@10.0.0.5:5432/tailor?sslmode=require" },
        "internal_registry": { "address": "registry.example.com:443", "username": "u", "password": "pw" },
        "repo_prefix": "cf/apps",
        "default_registry": "registry.example.com",
        "insecure_registries": ["10.1.0.9:5000"],
        "log_format": "text",
        // A bundle of two certificates, as an internal CA's chain is.
        "ca_certificates": format!("{ca}{cert}"),
        "request_timeout": "90s",
    });
    let with_copying = |mut tailor: Value| {
        for (key, value) in custom_copying().as_object().unwrap() {
            tailor[key] = value.clone();
        }
        tailor["credentials_key"] = json!(key_hex);
        tailor
    };
    match job {
        "stager-api" => {
            let mut tailor = with_copying(tailor);
            tailor["database"]["connections"] = json!(16);
            json!({
                "properties": {
                    "stager_api": {
                        "listen_address": "127.0.0.1",
                        "port": 8443,
                        "api_tokens": [TOKEN, "another-token-abcdefghij"],
                        "workers": 0,
                        "staging_timeout": "1h30m",
                        "default_mode": "pin",
                        "tls": { "certificate": cert, "private_key": key, "client_ca": cert },
                    },
                    "tailor": tailor,
                },
                "links": { "database": postgres_link() },
            })
        }
        "tailor-worker" => {
            let mut tailor = with_copying(tailor);
            tailor["database"]["connections"] = json!("6");
            json!({
                "properties": {
                    "tailor_worker": {
                        "workers": 16, "copy_concurrency": 4, "lease_seconds": 60, "poll_seconds": 2,
                        "max_attempts": 8, "drain_seconds": 10, "read_only_retry_seconds": 30,
                        "retry_max_seconds": 600,
                    },
                    "tailor": tailor,
                },
                "links": { "internal-registry": registry_link(true) },
            })
        }
        "tailor-pruner" => {
            let mut tailor = tailor;
            tailor["database"]["connections"] = json!(1);
            // Plain seconds, as a YAML integer.
            tailor["request_timeout"] = json!(120);
            json!({
                "properties": {
                    "tailor_pruner": { "schedule": "*/30 2-5 * * 1-5", "grace": "7d", "dry_run": true },
                    "tailor": tailor,
                },
            })
        }
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
fn limits_egress_and_trust_land_where_the_binaries_read_them() {
    // Defaults: what the spec defaults say, and nothing where the binary's default applies.
    for job in ["stager-api", "tailor-worker", "tailor-pruner"] {
        let dir = tempfile::tempdir().unwrap();
        let env = render_job(job, &minimal(job), dir.path());
        assert_eq!(
            env_value(&env, "TAILOR_REQUEST_TIMEOUT"),
            Some("60s"),
            "{job}"
        );
        for unset in [
            "TAILOR_CA_CERTIFICATES",
            "TAILOR_DATABASE_CONNECTIONS",
            "TAILOR_EGRESS_ALLOW",
            "TAILOR_EGRESS_DENY",
            "TAILOR_SOURCE_LOCATIONS",
            "AWS_ACCESS_KEY_ID",
        ] {
            assert_eq!(env_value(&env, unset), None, "{job}: {unset}");
        }
        assert_eq!(
            std::fs::read_to_string(dir.path().join("config/ca_certificates.pem"))
                .unwrap()
                .trim(),
            "",
            "{job}: an empty bundle, which nothing points at"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let env = render_job("tailor-worker", &minimal("tailor-worker"), dir.path());
    for (setting, value) in [
        ("TAILOR_MAX_ATTEMPTS", "20"),
        ("TAILOR_RETRY_MAX_SECONDS", "300"),
        ("TAILOR_UPLOAD_CHUNK_MIB", "16"),
        ("TAILOR_MIN_TRANSFER_RATE", "16KiB"),
        ("TAILOR_MIN_TRANSFER_WINDOW", "30s"),
        ("TAILOR_CALLBACK_TIMEOUT", "10s"),
        ("TAILOR_CALLBACK_RETRY_FOR", "24h"),
    ] {
        assert_eq!(env_value(&env, setting), Some(value), "tailor-worker");
    }
    let dir = tempfile::tempdir().unwrap();
    let env = render_job("stager-api", &minimal("stager-api"), dir.path());
    assert_eq!(env_value(&env, "TAILOR_STAGING_TIMEOUT"), Some("15m"));
    assert_eq!(env_value(&env, "TAILOR_DEFAULT_MODE"), Some("copy"));
    assert_eq!(
        env_value(&env, "TAILOR_DRAIN_SECONDS"),
        Some("10"),
        "in-process workers drain within bpm's 20 s, after the last requests are answered"
    );

    // Custom: lists joined with commas, the bundle in a file of the job's config directory.
    for job in ["stager-api", "tailor-worker"] {
        let dir = tempfile::tempdir().unwrap();
        let env = render_job(job, &custom(job, dir.path()), dir.path());
        assert_eq!(
            env_value(&env, "TAILOR_EGRESS_ALLOW"),
            Some("10.1.0.0/16,registry.corp,harbor.corp:8443,[fd00::5]:5000,127.0.0.1"),
            "{job}"
        );
        assert_eq!(
            env_value(&env, "TAILOR_EGRESS_DENY"),
            if job == "tailor-worker" {
                // Its internal registry is given by address, yet it consumes the registry's
                // link: that registry's instances are denied too.
                Some(
                    "10.244.0.0/16,192.168.50.7,api.system.example.com:443,registry.tailor.internal:5000",
                )
            } else {
                Some("10.244.0.0/16,192.168.50.7,api.system.example.com:443")
            },
            "{job}: entries trimmed"
        );
        for (setting, value) in [
            (
                "TAILOR_SOURCE_LOCATIONS",
                "oci:/var/vcap/store/images,s3://images/site-a?endpoint=https://s3.example&region=r1",
            ),
            ("AWS_ACCESS_KEY_ID", "AKIA1"),
            ("AWS_SECRET_ACCESS_KEY", "s3cret"),
            ("TAILOR_MIN_TRANSFER_RATE", "1MiB"),
            ("TAILOR_MIN_TRANSFER_WINDOW", "1m"),
            ("TAILOR_CALLBACK_TIMEOUT", "30s"),
            ("TAILOR_CALLBACK_RETRY_FOR", "2d"),
            ("TAILOR_REQUEST_TIMEOUT", "90s"),
        ] {
            assert_eq!(env_value(&env, setting), Some(value), "{job}");
        }
    }
    for (job, connections) in [
        ("stager-api", "16"),
        ("tailor-worker", "6"),
        ("tailor-pruner", "1"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let env = render_job(job, &custom(job, dir.path()), dir.path());
        assert_eq!(
            env_value(&env, "TAILOR_DATABASE_CONNECTIONS"),
            Some(connections),
            "{job}"
        );
        let bundle = env_value(&env, "TAILOR_CA_CERTIFICATES").expect(job);
        assert_eq!(
            Path::new(bundle),
            dir.path().join("config/ca_certificates.pem"),
            "{job}: under the job's config directory"
        );
        let pem = std::fs::read_to_string(bundle).unwrap();
        assert_eq!(
            pem.matches("-----BEGIN CERTIFICATE-----").count(),
            2,
            "{job}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let env = render_job("stager-api", &custom("stager-api", dir.path()), dir.path());
    assert_eq!(env_value(&env, "TAILOR_STAGING_TIMEOUT"), Some("1h30m"));
    assert_eq!(env_value(&env, "TAILOR_DEFAULT_MODE"), Some("pin"));
    let dir = tempfile::tempdir().unwrap();
    let env = render_job(
        "tailor-worker",
        &custom("tailor-worker", dir.path()),
        dir.path(),
    );
    assert_eq!(env_value(&env, "TAILOR_RETRY_MAX_SECONDS"), Some("600"));
    let dir = tempfile::tempdir().unwrap();
    let env = render_job(
        "tailor-pruner",
        &custom("tailor-pruner", dir.path()),
        dir.path(),
    );
    assert_eq!(env_value(&env, "TAILOR_REQUEST_TIMEOUT"), Some("120"));

    // The pruner reaches only the internal registry, never a tenant's destination, and applies
    // no egress policy (`tailor prune` connects unrestricted): it takes no egress lists, no
    // transfer floor (it streams no blobs) and no callback settings (it delivers none).
    let declared = job_spec("tailor-pruner")["properties"].to_string();
    for absent in ["tailor.egress", "tailor.min_transfer", "tailor.callback"] {
        assert!(
            !declared.contains(absent),
            "tailor-pruner declares {absent}"
        );
    }
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
fn behind_a_load_balancer_the_registry_instances_are_denied_to_tenants() {
    for job in ["stager-api", "tailor-worker"] {
        let mut manifest = minimal(job);
        manifest["links"]["internal-registry"] = registry_instances_link(false);
        manifest["properties"]["tailor"]["egress"] = json!({ "deny": ["10.244.0.0/16"] });
        let dir = tempfile::tempdir().unwrap();
        let env = render_job(job, &manifest, dir.path());
        assert_eq!(
            env_value(&env, "TAILOR_EGRESS_DENY"),
            Some("10.244.0.0/16"),
            "{job}: the registry in use is the link's own, which tailor protects by itself"
        );

        manifest["links"]["internal-registry-lb"] = registry_lb_link();
        let env = render_job(job, &manifest, dir.path());
        assert_eq!(
            env_value(&env, "TAILOR_EGRESS_DENY"),
            Some(
                "10.244.0.0/16,q-s0.registry.default.tailor.bosh:5000,10.0.1.11:5000,10.0.1.12:5000"
            ),
            "{job}: the instances behind the load balancer, by name and by address"
        );
        check_config(job, &env).unwrap_or_else(|e| panic!("{job}: {e}"));
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
            "stager-api",
            "bpm.yml.erb",
            {
                let mut m = minimal("stager-api");
                m["properties"]["stager_api"]["drain_seconds"] = json!(20);
                m
            },
            "stager_api.drain_seconds",
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
    // The limits, trust and egress settings: what the template can judge by itself, named with
    // the property. Egress entries that are empty or hold a comma would be silently dropped or
    // split in two by the binary, so only the template can catch them.
    let (ca, ca_key) = testkit::certs::self_signed(&["tailor-ca"]);
    let new_cases: Vec<(&str, &str, Value, &str)> = vec![
        (
            "stager-api",
            "tailor.egress.allow",
            json!(["10.0.0.0/8", ""]),
            "tailor.egress.allow[1] is empty",
        ),
        (
            "tailor-worker",
            "tailor.egress.deny",
            json!([null]),
            "tailor.egress.deny[0] is empty",
        ),
        (
            "tailor-worker",
            "tailor.egress.allow",
            json!(["10.0.0.0/8,registry.corp"]),
            "tailor.egress.allow[0]",
        ),
        (
            "stager-api",
            "tailor.egress.deny",
            json!(["https://api.example.com"]),
            "tailor.egress.deny[0]",
        ),
        (
            "tailor-worker",
            "tailor.egress.deny",
            json!(["registry.corp/v2"]),
            "tailor.egress.deny[0]",
        ),
        (
            "tailor-worker",
            "tailor.egress.allow",
            json!(["registry corp"]),
            "tailor.egress.allow[0]",
        ),
        (
            "tailor-worker",
            "tailor.egress.allow",
            json!([{ "cidr": "10.0.0.0/8" }]),
            "tailor.egress.allow[0]",
        ),
        (
            "stager-api",
            "tailor.egress.allow",
            json!("10.0.0.0/8"),
            "tailor.egress.allow must be a list",
        ),
        (
            "tailor-pruner",
            "tailor.database.connections",
            json!(0),
            "tailor.database.connections",
        ),
        (
            "stager-api",
            "tailor.database.connections",
            json!(1001),
            "tailor.database.connections",
        ),
        (
            "tailor-worker",
            "tailor.database.connections",
            json!("eight"),
            "tailor.database.connections",
        ),
        (
            "tailor-pruner",
            "tailor.ca_certificates",
            json!("/etc/ssl/certs/ca.pem"),
            "tailor.ca_certificates holds no PEM",
        ),
        (
            "stager-api",
            "tailor.ca_certificates",
            json!(format!("{ca}{ca_key}")),
            "tailor.ca_certificates holds a private key",
        ),
        (
            "stager-api",
            "stager_api.staging_timeout",
            json!("15 minutes"),
            "stager_api.staging_timeout",
        ),
        (
            "stager-api",
            "stager_api.staging_timeout",
            json!("1.5h"),
            "stager_api.staging_timeout",
        ),
        (
            "stager-api",
            "stager_api.default_mode",
            json!("mirror"),
            "stager_api.default_mode must be copy or pin",
        ),
        (
            "tailor-pruner",
            "tailor.request_timeout",
            json!("2h"),
            "tailor.request_timeout",
        ),
        (
            "tailor-worker",
            "tailor.min_transfer_rate",
            json!("fast"),
            "tailor.min_transfer_rate",
        ),
        (
            "stager-api",
            "tailor.min_transfer_rate",
            json!("16GiB"),
            "tailor.min_transfer_rate",
        ),
        (
            "tailor-worker",
            "tailor.min_transfer_window",
            json!("0"),
            "tailor.min_transfer_window",
        ),
        (
            "stager-api",
            "tailor.callback.timeout",
            json!("1h"),
            "tailor.callback.timeout",
        ),
        (
            "tailor-worker",
            "tailor.callback.retry_for",
            json!("30s"),
            "tailor.callback.retry_for",
        ),
        (
            "tailor-worker",
            "tailor_worker.retry_max_seconds",
            json!("5m"),
            "tailor_worker.retry_max_seconds",
        ),
        (
            "tailor-worker",
            "tailor_worker.max_attempts",
            json!(0),
            "tailor_worker.max_attempts",
        ),
    ]
    .into_iter()
    .map(|(job, property, value, needle)| {
        (
            job,
            "bpm.yml.erb",
            with_property(minimal(job), property, &value),
            needle,
        )
    })
    .collect();
    for (job, template, manifest, needle) in cases.into_iter().chain(new_cases) {
        let error = render(job, template, &manifest).err().unwrap_or_else(|| {
            panic!("{job}/{template} rendered; expected an error about {needle}")
        });
        assert!(error.contains(needle), "{job}/{template}: {error}");
    }
}

#[test]
fn processes_with_workers_need_a_database_connection_besides_the_listen_one() {
    // Workers hold one of the pool's connections for LISTEN/NOTIFY; with a pool of one, their
    // claims wait for a connection until they time out, over and over. The binaries accept 1
    // (the pruner needs no more), so the templates refuse it where workers run.
    let connections =
        |job: &str, n: u32| with_property(minimal(job), "tailor.database.connections", &json!(n));
    for (job, manifest) in [
        ("tailor-worker", connections("tailor-worker", 1)),
        ("stager-api", connections("stager-api", 1)),
    ] {
        let error = render(job, "bpm.yml.erb", &manifest).expect_err(job);
        assert!(
            error.contains("tailor.database.connections must be at least 2"),
            "{job}: {error}"
        );
    }
    for (job, manifest) in [
        ("tailor-worker", connections("tailor-worker", 2)),
        ("stager-api", connections("stager-api", 2)),
        (
            "stager-api",
            with_property(
                connections("stager-api", 1),
                "stager_api.workers",
                &json!(0),
            ),
        ),
        ("tailor-pruner", connections("tailor-pruner", 1)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let env = render_job(job, &manifest, dir.path());
        check_config(job, &env).unwrap_or_else(|e| panic!("{job}: {e}"));
    }
}

/// `manifest` with the property at `path` (under `properties`) set to `value`.
fn with_property(mut manifest: Value, path: &str, value: &Value) -> Value {
    let mut node = &mut manifest["properties"];
    for key in path.split('.') {
        node = &mut node[key];
    }
    *node = value.clone();
    manifest
}

#[test]
fn the_templates_bounds_are_the_binaries_bounds() {
    // For each new setting the template judges: values at its bounds render and the binary
    // accepts them; values just past them fail at render time with the property's name, and
    // the binary, given them directly, refuses them too. So the template refuses nothing the
    // binary would take, and lets nothing through that it would refuse.
    // (job, property, setting, values accepted, values refused)
    type Case<'a> = (&'a str, &'a str, &'a str, &'a [Value], &'a [Value]);
    let cases: &[Case] = &[
        (
            "stager-api",
            "stager_api.staging_timeout",
            "TAILOR_STAGING_TIMEOUT",
            &[json!("10s"), json!("24h"), json!(600), json!("1h30m")],
            &[json!("9s"), json!("24h1s"), json!("0")],
        ),
        (
            "tailor-pruner",
            "tailor.request_timeout",
            "TAILOR_REQUEST_TIMEOUT",
            &[json!("1s"), json!("1h"), json!(3600)],
            &[json!("0s"), json!(3601), json!("60m1s")],
        ),
        (
            "tailor-worker",
            "tailor.min_transfer_window",
            "TAILOR_MIN_TRANSFER_WINDOW",
            &[json!(1), json!("60m")],
            &[json!("0"), json!("1h1s")],
        ),
        (
            "tailor-worker",
            "tailor.callback.timeout",
            "TAILOR_CALLBACK_TIMEOUT",
            &[json!("1s"), json!("10m")],
            &[json!("0s"), json!("601s")],
        ),
        (
            "stager-api",
            "tailor.callback.retry_for",
            "TAILOR_CALLBACK_RETRY_FOR",
            &[json!("1m"), json!("30d"), json!("2d12h")],
            &[json!("59s"), json!("30d1s")],
        ),
        (
            "tailor-worker",
            "tailor.min_transfer_rate",
            "TAILOR_MIN_TRANSFER_RATE",
            &[
                json!(0),
                json!("16 KiB/s"),
                json!("512k"),
                json!("2MB"),
                json!("18446744073709551615"),
            ],
            &[
                json!("18446744073709551616"),
                json!("17592186044416MiB"),
                json!("16 GiB"),
                json!("-1"),
                json!("1.5MiB"),
            ],
        ),
        (
            "tailor-pruner",
            "tailor.database.connections",
            "TAILOR_DATABASE_CONNECTIONS",
            &[json!(1), json!(1000), json!("20")],
            &[json!(0), json!(1001), json!("-4")],
        ),
        (
            "tailor-worker",
            "tailor_worker.retry_max_seconds",
            "TAILOR_RETRY_MAX_SECONDS",
            &[json!(1), json!(86_400)],
            &[json!(0), json!(86_401)],
        ),
        (
            "tailor-worker",
            "tailor_worker.upload_chunk_mib",
            "TAILOR_UPLOAD_CHUNK_MIB",
            &[json!(0), json!(256), json!("32")],
            &[json!(-1), json!(257), json!("16MiB")],
        ),
        (
            "tailor-worker",
            "tailor_worker.max_attempts",
            "TAILOR_MAX_ATTEMPTS",
            &[json!(1), json!(1000)],
            &[json!(0), json!(1001)],
        ),
    ];
    for (job, property, setting, accepted, refused) in cases {
        let mut valid_env = None;
        for value in *accepted {
            let dir = tempfile::tempdir().unwrap();
            let env = render_job(
                job,
                &with_property(minimal(job), property, value),
                dir.path(),
            );
            check_config(job, &env).unwrap_or_else(|e| panic!("{job} {property}={value}: {e}"));
            valid_env = Some(env);
        }
        let valid_env = valid_env.unwrap();
        for value in *refused {
            let manifest = with_property(minimal(job), property, value);
            let error = render(job, "bpm.yml.erb", &manifest)
                .err()
                .unwrap_or_else(|| panic!("{job} {property}={value} rendered"));
            assert!(
                error.contains(property),
                "{job} {property}={value}: {error}"
            );
            let text = match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            let env: Vec<(String, String)> = valid_env
                .iter()
                .filter(|(k, _)| k != setting)
                .cloned()
                .chain([(setting.to_string(), text)])
                .collect();
            let error = check_config(job, &env)
                .expect_err(&format!("{job}: the binary accepts {setting}={value}"));
            assert!(error.contains(setting), "{job} {setting}={value}: {error}");
        }
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
        // Well-formed list entries the egress policy's own parser refuses.
        (
            "stager-api",
            json!({ "tailor": { "egress": { "allow": ["10.0.0.0/33"] } } }),
            "TAILOR_EGRESS_ALLOW",
        ),
        (
            "tailor-worker",
            json!({ "tailor": { "egress": { "deny": ["registry.corp:99999"] } } }),
            "TAILOR_EGRESS_DENY",
        ),
        (
            "tailor-worker",
            json!({ "tailor": { "egress": { "allow": ["under_score.corp"] } } }),
            "TAILOR_EGRESS_ALLOW",
        ),
        // PEM armour around something that is not a certificate.
        (
            "tailor-pruner",
            json!({ "tailor": { "ca_certificates":
                "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n" } }),
            "TAILOR_CA_CERTIFICATES",
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

fn template_block(job: &str, start: &str, end: &str) -> Option<String> {
    let text = std::fs::read_to_string(
        release()
            .join("jobs")
            .join(job)
            .join("templates/bpm.yml.erb"),
    )
    .unwrap();
    let start = text.find(start)?;
    let end = text.find(end).expect("the block's end");
    Some(text[start..end].to_owned())
}

#[test]
fn the_three_tailor_jobs_share_one_settings_block_word_for_word() {
    let block = |job: &str| {
        template_block(
            job,
            "# --- The settings every tailor process shares",
            "# --- end of the shared block.",
        )
        .unwrap()
    };
    let reference = block("stager-api");
    for job in ["tailor-worker", "tailor-pruner"] {
        assert_eq!(block(job), reference, "{job} drifted from stager-api");
    }
    // The egress policy, the transfer floor and callbacks: the same in both processes that
    // copy images and deliver callbacks; the pruner does neither.
    let copying = |job: &str| {
        template_block(
            job,
            "# --- The settings of the processes that copy images",
            "# --- end of the copying block.",
        )
    };
    assert_eq!(
        copying("tailor-worker").expect("tailor-worker has the copying block"),
        copying("stager-api").expect("stager-api has the copying block"),
        "tailor-worker drifted from stager-api"
    );
    assert_eq!(copying("tailor-pruner"), None);
}
