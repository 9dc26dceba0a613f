//! skopeo as an independent client: what it reads from a registry is the ground truth.

use std::path::Path;
use std::process::Command;

/// A permissive signature policy, so skopeo needs no system-wide `/etc/containers/policy.json`.
/// A file of the repository's rather than a temporary one: a test process has no moment to
/// delete a file every test in it shares, and must leave nothing behind.
fn policy_path() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/skopeo-policy.json"))
}

/// A `skopeo` command with the permissive policy, for callers that need their own arguments.
pub fn skopeo() -> Command {
    let mut command = Command::new("skopeo");
    command.arg("--policy").arg(policy_path());
    command
}

fn run(mut command: Command) -> Result<Vec<u8>, String> {
    let output = command
        .output()
        .map_err(|e| format!("cannot run skopeo (is it installed?): {e}"))?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// The manifest bytes skopeo reads for `image` (`host:port/repo:tag` or `@digest`), over plain HTTP.
pub fn inspect_raw(image: &str, credentials: Option<(&str, &str)>) -> Result<Vec<u8>, String> {
    let mut command = skopeo();
    command.args(["inspect", "--raw", "--tls-verify=false"]);
    if let Some((user, password)) = credentials {
        command.arg("--creds").arg(format!("{user}:{password}"));
    }
    command.arg(format!("docker://{image}"));
    run(command)
}

/// The digest of the manifest skopeo reads for `image`.
pub fn digest(image: &str, credentials: Option<(&str, &str)>) -> Result<String, String> {
    inspect_raw(image, credentials).map(|raw| crate::sha256_digest(&raw))
}

/// Copies `image` into an OCI layout at `dir` (skopeo verifies every blob's digest on the way).
/// With `all_platforms`, every child of an index; otherwise the host's platform.
pub fn copy_to_oci_layout(
    image: &str,
    credentials: Option<(&str, &str)>,
    dir: &Path,
    all_platforms: bool,
) -> Result<(), String> {
    let mut command = skopeo();
    command.args(["copy", "--quiet", "--src-tls-verify=false"]);
    if all_platforms {
        command.arg("--all");
    }
    if let Some((user, password)) = credentials {
        command.arg("--src-creds").arg(format!("{user}:{password}"));
    }
    command
        .arg(format!("docker://{image}"))
        .arg(format!("oci:{}:copied", dir.display()));
    run(command).map(|_| ())
}

/// How skopeo reaches a registry that is not plain HTTP on loopback.
#[derive(Debug, Clone, Default)]
pub struct SkopeoOptions {
    /// Verify TLS against the certificates in this directory (`ca.crt` and friends, added to
    /// the system roots), instead of speaking plain HTTP without verification.
    pub cert_dir: Option<std::path::PathBuf>,
    /// `--retry-times`: how often skopeo tries a failed operation again.
    pub retry_times: u32,
}

impl SkopeoOptions {
    /// HTTPS verified against the CA in `cert_dir`, with a few retries.
    pub fn https(cert_dir: impl Into<std::path::PathBuf>) -> Self {
        Self {
            cert_dir: Some(cert_dir.into()),
            retry_times: 3,
        }
    }

    /// The TLS and retry flags, `prefix` being `""` (inspect) or `"src-"`/`"dest-"` (copy).
    fn apply(&self, command: &mut Command, prefix: &str) {
        match &self.cert_dir {
            Some(dir) => {
                command.arg(format!("--{prefix}tls-verify=true"));
                command.arg(format!("--{prefix}cert-dir")).arg(dir);
            }
            None => {
                command.arg(format!("--{prefix}tls-verify=false"));
            }
        }
        if self.retry_times > 0 {
            command.arg(format!("--retry-times={}", self.retry_times));
        }
    }
}

/// [`inspect_raw`] with TLS verified against a CA and retries.
pub fn inspect_raw_with(
    image: &str,
    credentials: Option<(&str, &str)>,
    options: &SkopeoOptions,
) -> Result<Vec<u8>, String> {
    let mut command = skopeo();
    command.args(["inspect", "--raw"]);
    options.apply(&mut command, "");
    if let Some((user, password)) = credentials {
        command.arg("--creds").arg(format!("{user}:{password}"));
    }
    command.arg(format!("docker://{image}"));
    run(command)
}

/// [`copy_to_oci_layout`] with TLS verified against a CA and retries.
pub fn copy_to_oci_layout_with(
    image: &str,
    credentials: Option<(&str, &str)>,
    dir: &Path,
    all_platforms: bool,
    options: &SkopeoOptions,
) -> Result<(), String> {
    let mut command = skopeo();
    command.args(["copy", "--quiet"]);
    options.apply(&mut command, "src-");
    if all_platforms {
        command.arg("--all");
    }
    if let Some((user, password)) = credentials {
        command.arg("--src-creds").arg(format!("{user}:{password}"));
    }
    command
        .arg(format!("docker://{image}"))
        .arg(format!("oci:{}:copied", dir.display()));
    run(command).map(|_| ())
}
