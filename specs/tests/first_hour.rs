//! The first hour, as a newcomer lives it: the embedded default stages its demo image with no
//! network at all by the very commands it prints; connection failures name their cause and
//! the fix; a staging waiting to retry says why; `--json` output is JSON alone; a bad setting
//! is one line; `scripts/dev --help` answers without a toolchain; `check-config --probe` looks
//! at what the configuration points to.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use specs::{Service, TOKEN, binary, get, stage, stager_api};
use testkit::hostile_registry::{HostileRegistry, Misbehaviour, Rule};
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::{TestDatabase, TestRegistry, netns};
use uuid::Uuid;

/// Runs `script` in bash; returns its stdout, or panics with its stderr.
fn bash(script: &str) -> String {
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .output()
        .expect("run bash");
    assert!(
        output.status.success(),
        "{script}\nfailed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_demo_stages_offline_by_the_commands_it_prints() {
    // A private network namespace has nothing but loopback: no DNS, no route anywhere.
    netns::run_isolated(|| {
        let mut command = Command::new(binary("stager-api"));
        command
            .args(["embedded", "--demo", "--listen", "127.0.0.1:0"])
            .env_remove("STAGER_API_TOKENS")
            .env_remove("TAILOR_INSECURE_REGISTRIES")
            .stderr(Stdio::piped());
        let mut service = Service::start_quiet(command);
        let stderr = service.child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // The banner's next steps, as printed (indented lines after "tailor is ready").
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut steps = Vec::new();
        let mut ready = false;
        while !steps
            .last()
            .is_some_and(|l: &String| l.contains("skopeo inspect"))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no complete banner; got {steps:?}"));
            ready |= line.contains("tailor is ready");
            if ready && line.starts_with("  ") {
                steps.push(line.trim().to_owned());
            }
        }
        let exports: Vec<&String> = steps.iter().filter(|l| l.starts_with("export ")).collect();
        assert_eq!(exports.len(), 2, "TOKEN and TAILOR: {steps:?}");
        let prelude = exports
            .iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        // The first curl is printed over two lines (a trailing backslash).
        let post_start = steps
            .iter()
            .position(|l| l.starts_with("curl") && l.ends_with('\\'))
            .expect("the POST");
        let post = format!("{}\n{}", steps[post_start], steps[post_start + 1]);
        let answer: Value = serde_json::from_str(&bash(&format!("{prelude}\n{post}")))
            .expect("the POST answers JSON");
        let guid = answer["staging_guid"].as_str().expect("a staging GUID");

        let get = steps
            .iter()
            .find(|l| l.contains("<staging_guid from the answer>"))
            .expect("the GET")
            .replace("<staging_guid from the answer>", guid);
        let staging = loop {
            let staging: Value =
                serde_json::from_str(&bash(&format!("{prelude}\n{get}"))).expect("GET answers");
            if staging["state"] != "queued" && staging["state"] != "running" {
                break staging;
            }
            assert!(Instant::now() < deadline, "still {staging}");
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(staging["state"], "succeeded", "{staging}");
        let pinned = staging["result"]["pinned_image"].as_str().unwrap();

        let inspect = steps
            .last()
            .unwrap()
            .replace("<result.pinned_image from the staging>", pinned);
        let inspected: Value = serde_json::from_str(&bash(&inspect)).expect("skopeo's JSON");
        assert_eq!(
            inspected["Digest"].as_str(),
            pinned.split('@').nth(1),
            "{inspected}"
        );
        assert_eq!(
            service.signal_and_wait(libc::SIGINT, Duration::from_secs(60)),
            Some(0)
        );
    });
}

/// `tailor copy --json` with `args`; returns (exit code, stdout as JSON, stderr).
fn copy_json(args: &[&str]) -> (i32, Value, String) {
    let output = Command::new(binary("tailor"))
        .args(["copy", "--json"])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .expect("run tailor copy");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}"));
    (
        output.status.code().unwrap_or(-1),
        json,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Asserts a failed `--json` copy: exit 1, `code`, a message containing every one of
/// `phrases`, and nothing on stderr.
fn assert_fails(args: &[&str], code: &str, phrases: &[&str]) {
    let (exit, json, stderr) = copy_json(args);
    assert_eq!(exit, 1, "{json}");
    assert_eq!(json["error"]["code"], code, "{json}");
    let message = json["error"]["message"].as_str().unwrap_or_default();
    for phrase in phrases {
        assert!(message.contains(phrase), "{phrase:?} not in {message:?}");
    }
    assert_eq!(stderr, "", "--json keeps stderr quiet");
}

#[test]
fn each_connection_failure_names_its_cause_and_the_fix() {
    // Inside a private namespace: the unresolvable name fails at once and the same way on any
    // machine (no resolver is reachable), and nothing leaves the test.
    netns::run_isolated_async(|| async {
        let image = ImageSpec::seeded(ManifestFormat::Docker, 9100, 1, 4096).build();
        let internal = TestRegistry::anonymous();
        let dst = format!("{}/first/hour:copy", internal.host());

        // A port nobody listens on.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let src = format!("{closed}/app:v1");
        let insecure = format!("{closed},{}", internal.host());
        assert_fails(
            &["--insecure", &insecure, &src, &dst],
            "UPSTREAM_UNREACHABLE",
            &["connection refused"],
        );

        // A name that does not resolve.
        assert_fails(
            &[
                "--insecure",
                &internal.host(),
                "registry.invalid/app:v1",
                &dst,
            ],
            "UPSTREAM_UNREACHABLE",
            &["registry.invalid", "does not resolve"],
        );

        // A plain-HTTP registry spoken to over HTTPS: the hint says how to mark it.
        let plain = TestRegistry::anonymous();
        plain.push("app:v1", &image).await;
        assert_fails(
            &[
                "--insecure",
                &internal.host(),
                &format!("{}/app:v1", plain.host()),
                &dst,
            ],
            "UPSTREAM_UNREACHABLE",
            &["does not speak TLS", "TAILOR_INSECURE_REGISTRIES"],
        );

        // A certificate nobody vouches for; trusting its CA (what the message says to do)
        // makes the same copy work.
        let tls = HostileRegistry::start_tls();
        tls.add_image("app", "v1", &image);
        let src = format!("{}/app:v1", tls.host());
        assert_fails(
            &["--insecure", &internal.host(), &src, &dst],
            "UPSTREAM_UNREACHABLE",
            &["certificate", "not trusted", "TAILOR_CA_CERTIFICATES"],
        );
        let ca = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(ca.path(), tls.certificate_pem().unwrap()).unwrap();
        let (exit, json, stderr) = copy_json(&[
            "--insecure",
            &internal.host(),
            "--ca-certificates",
            ca.path().to_str().unwrap(),
            &src,
            &dst,
        ]);
        assert_eq!(exit, 0, "{json}");
        assert_eq!(json["source_digest"], image.digest.as_str());
        assert_eq!(
            stderr, "",
            "a successful --json copy prints nothing on stderr"
        );

        // A registry that never answers: a timeout, named as one.
        let hung = HostileRegistry::start();
        hung.add_rule(Rule::new("/v2/", Misbehaviour::Hang));
        let insecure = format!("{},{}", hung.host(), internal.host());
        assert_fails(
            &[
                "--insecure",
                &insecure,
                "--request-timeout",
                "1",
                &format!("{}/app:v1", hung.host()),
                &dst,
            ],
            "TIMEOUT",
            &["did not answer in time"],
        );

        // A URL where a host:port belongs.
        assert_fails(
            &["--insecure", "http://127.0.0.1:5000", &src, &dst],
            "INVALID_ARGUMENT",
            &["host:port, not a URL", "\"127.0.0.1:5000\""],
        );
    });
}

#[tokio::test]
async fn a_staging_waiting_to_retry_says_why_when_it_runs_next_and_how_often_it_tried() {
    let db = TestDatabase::new().await;
    let internal = TestRegistry::anonymous();
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let insecure = [internal.host(), closed.to_string()];
    let mut command = stager_api(
        &db.url,
        &internal.host(),
        &insecure,
        &[("TAILOR_LOG_FORMAT", "json")],
    );
    command.stderr(Stdio::piped());
    let mut api = Service::start_quiet(command);
    let logs = api.child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(logs).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });

    let app_guid = Uuid::new_v4();
    let staged = stage(
        &api,
        json!({ "app_guid": app_guid, "image": format!("{closed}/app:v1") }),
    )
    .await;
    let guid = staged["staging_guid"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let waiting = loop {
        let staging = get(&api, &guid).await;
        if staging["waiting"].is_object() {
            break staging;
        }
        assert!(Instant::now() < deadline, "never waiting: {staging}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(waiting["state"], "queued", "{waiting}");
    assert_eq!(waiting["waiting"]["reason"], "retry", "{waiting}");
    let last_error = waiting["waiting"]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        last_error.starts_with("UPSTREAM_UNREACHABLE") && last_error.contains("connection refused"),
        "{waiting}"
    );
    assert!(waiting["attempts"].as_u64() >= Some(1), "{waiting}");
    let next: chrono::DateTime<chrono::Utc> = waiting["waiting"]["next_attempt_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let created: chrono::DateTime<chrono::Utc> =
        waiting["created_at"].as_str().unwrap().parse().unwrap();
    assert!(next > created, "{waiting}");

    // The app's list shows the same.
    let list: Value = reqwest::Client::new()
        .get(format!("{}/apps/{app_guid}/stagings", api.base_url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = list["stagings"]
        .as_array()
        .and_then(|s| s.first())
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(listed["waiting"]["reason"], "retry", "{list}");

    // And so does the log line, with the staging's GUID and the attempt.
    let line = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("a log line about the retry");
        if line.contains("goes back to the queue") {
            break line;
        }
    };
    let event: Value = serde_json::from_str(&line).expect("JSON logs off a terminal");
    let text = event.to_string();
    assert!(text.contains(&guid), "{line}");
    assert!(text.contains("\"attempt\":1"), "{line}");
    assert!(text.contains("connection refused"), "{line}");
    assert!(!line.contains('\u{1b}'), "no colour off a terminal: {line}");
}

fn run(command: &mut Command) -> Output {
    command.output().expect("run the command")
}

#[test]
fn a_bad_setting_is_one_line_even_with_rust_backtrace_set() {
    for binary_name in ["tailor", "stager-api"] {
        let output = run(Command::new(binary(binary_name))
            .arg("check-config")
            .env_clear()
            .env("RUST_BACKTRACE", "1")
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env("TAILOR_INTERNAL_REGISTRY", "127.0.0.1:5000")
            .env("STAGER_API_TOKENS", TOKEN)
            .env("TAILOR_LEASE_SECONDS", "soon"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{binary_name}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{binary_name}: {stderr}");
        assert!(
            lines[0].starts_with("error: TAILOR_LEASE_SECONDS"),
            "{binary_name}: {stderr}"
        );
        assert!(!stderr.contains("backtrace") && !stderr.contains("panicked"));
    }
}

#[test]
fn scripts_dev_help_answers_without_a_toolchain_and_lists_every_embedded_option() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = run(Command::new("bash")
        .arg(root.join("scripts/dev"))
        .arg("--help")
        .env_clear()
        // No cargo, no rustc: only the system's tools.
        .env("PATH", "/usr/bin:/bin"));
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let embedded = run(Command::new(binary("stager-api")).args(["embedded", "--help"]));
    let flags: Vec<String> = String::from_utf8_lossy(&embedded.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_owned()
        })
        .collect();
    assert!(flags.len() >= 8, "{flags:?}");
    for flag in flags {
        assert!(
            help.contains(&flag),
            "scripts/dev --help lacks {flag}:\n{help}"
        );
    }
}

#[tokio::test]
async fn check_config_probe_looks_at_the_database_and_the_registry() {
    let db = TestDatabase::new().await;
    let internal = TestRegistry::anonymous();
    let probe = |registry: String| {
        let mut command = Command::new(binary("stager-api"));
        command
            .args(["check-config", "--probe"])
            .env_clear()
            .env("DATABASE_URL", &db.url)
            .env("TAILOR_INTERNAL_REGISTRY", &registry)
            .env("TAILOR_INSECURE_REGISTRIES", &registry)
            .env("STAGER_API_TOKENS", TOKEN);
        command
    };
    let output = run(&mut probe(internal.host()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("database: answers"), "{stdout}");
    assert!(stdout.contains(&internal.host()), "{stdout}");

    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let output = run(&mut probe(closed.to_string()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&closed.to_string()) && stderr.contains("connection refused"),
        "{stderr}"
    );
}
