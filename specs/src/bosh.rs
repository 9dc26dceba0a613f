//! Driving the BOSH release's test harnesses: YAML read by Ruby (as BOSH reads it), job specs,
//! templates rendered by `bosh-release/tests/render.rb`, the binaries' `check-config`, and
//! Debian's `nginx -t` for the load balancer's configuration.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// `bosh-release/` in this repository.
pub fn release_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bosh-release")
}

/// `text` parsed by Ruby's YAML, handed over as JSON.
pub fn ruby_yaml(text: &str) -> Value {
    use std::io::Write;
    let output = Command::new("ruby")
        .args([
            "-ryaml",
            "-rjson",
            "-e",
            "puts JSON.generate(YAML.safe_load(STDIN.read))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child
                .stdin
                .take()
                .expect("piped stdin")
                .write_all(text.as_bytes())?;
            child.wait_with_output()
        })
        .expect("ruby (scripts/test installs it)");
    assert!(output.status.success(), "not YAML:\n{text}");
    serde_json::from_slice(&output.stdout).expect("Ruby prints JSON")
}

/// A job's `spec`.
pub fn job_spec(job: &str) -> Value {
    let path = release_dir().join("jobs").join(job).join("spec");
    ruby_yaml(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// Renders `template` of `job` with `manifest` (`{properties, links, spec}`); the harness's
/// error message when the template refuses.
pub fn render(job: &str, template: &str, manifest: &Value) -> Result<String, String> {
    let file = tempfile::NamedTempFile::new().expect("a temp file");
    std::fs::write(file.path(), manifest.to_string()).expect("write the manifest");
    let output = Command::new("ruby")
        .arg(release_dir().join("tests/render.rb"))
        .arg(release_dir().join("jobs").join(job))
        .arg(template)
        .arg(file.path())
        .output()
        .expect("run the render harness");
    if output.status.success() {
        Ok(String::from_utf8(output.stdout).expect("UTF-8"))
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// The environment of a rendered `bpm.yml`'s process.
pub fn bpm_env(rendered: &str) -> Vec<(String, String)> {
    let bpm = ruby_yaml(rendered);
    bpm["processes"][0]["env"]
        .as_object()
        .map(|env| {
            env.iter()
                .map(|(k, v)| {
                    let value = v.as_str().expect("bpm env values are strings");
                    (k.clone(), value.to_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Asks the binary `job` runs whether `env` is a valid configuration.
pub fn check_config(job: &str, env: &[(String, String)]) -> Result<(), String> {
    let program = if job == "stager-api" {
        "stager-api"
    } else {
        "tailor"
    };
    let mut command = Command::new(crate::binary(program));
    command.arg("check-config");
    // The pruner's settings are checked as `tailor prune` reads them (a worker needs more
    // database connections than a pruner).
    if job == "tailor-pruner" {
        command.args(["--for", "prune"]);
    }
    let output = command
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run check-config");
    if output.status.success() {
        assert!(String::from_utf8_lossy(&output.stdout).contains("configuration is valid"));
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// A job's templates, as (source, destination under the job directory).
pub fn templates(job: &str) -> Vec<(String, String)> {
    job_spec(job)["templates"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(source, destination)| (source.clone(), destination.as_str().unwrap().to_owned()))
        .collect()
}

/// Renders every template of `job` into `dir` as BOSH lays them out under
/// /var/vcap/jobs/<job>; returns the bpm process's env with /var/vcap/jobs/<job> mapped to `dir`.
pub fn render_job(job: &str, manifest: &Value, dir: &Path) -> Vec<(String, String)> {
    for (source, destination) in templates(job) {
        let rendered = render(job, &source, manifest)
            .unwrap_or_else(|e| panic!("{job}/{source} does not render: {e}"));
        let path = dir.join(&destination);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, rendered).unwrap();
    }
    let rendered = std::fs::read_to_string(dir.join("config/bpm.yml")).unwrap();
    assert_eq!(
        ruby_yaml(&rendered)["processes"][0]["name"],
        job,
        "bpm names its process after the job (monit's pidfile)"
    );
    let job_root = format!("/var/vcap/jobs/{job}");
    bpm_env(&rendered)
        .into_iter()
        .map(|(k, v)| (k, v.replace(&job_root, &dir.display().to_string())))
        .collect()
}

/// Renders registry-lb into `dir` and asks Debian's nginx whether the configuration is valid
/// (`nginx -t` parses it, loads the certificates and resolves the upstreams), with the job's
/// /var/vcap directories mapped into `dir`; returns the configuration as tested.
pub fn nginx_accepts(manifest: &Value, dir: &Path) -> Result<String, String> {
    render_job("registry-lb", manifest, dir);
    let (data, logs) = (dir.join("data"), dir.join("log"));
    for made in [&data, &logs] {
        std::fs::create_dir_all(made).unwrap();
    }
    let config = std::fs::read_to_string(dir.join("config/nginx.conf"))
        .unwrap()
        .replace("/var/vcap/jobs/registry-lb", &dir.display().to_string())
        .replace("/var/vcap/data/registry-lb", &data.display().to_string())
        .replace("/var/vcap/sys/log/registry-lb", &logs.display().to_string());
    assert!(!config.contains("/var/vcap"), "an unmapped path:\n{config}");
    let path = dir.join("nginx-test.conf");
    std::fs::write(&path, &config).unwrap();
    let output = Command::new(testkit::load_balancer::find_nginx_binary())
        .arg("-t")
        .arg("-p")
        .arg(&data)
        .arg("-c")
        .arg(&path)
        .args(["-e", "stderr"])
        .output()
        .expect("run nginx -t (scripts/test installs nginx)");
    if output.status.success() {
        Ok(config)
    } else {
        Err(format!(
            "{}\n{config}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}
