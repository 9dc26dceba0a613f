//! `tailor copy` as a user runs it: exit codes, `--json`, and passwords kept off the command line.

use std::io::Write;
use std::process::{Command, Stdio};

use specs::binary;
use testkit::TestRegistry;
use testkit::image::{ImageSpec, ManifestFormat};

fn tailor_copy(
    args: &[&str],
    stdin: Option<&str>,
    env: &[(&str, &str)],
) -> (i32, serde_json::Value, String) {
    let mut command = Command::new(binary("tailor"));
    command
        .arg("copy")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let json = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    (
        output.status.code().unwrap_or(-1),
        json,
        format!("{stdout}{stderr}"),
    )
}

#[tokio::test]
async fn json_reports_success_and_failure_with_exit_codes() {
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let image = ImageSpec::seeded(ManifestFormat::Docker, 800, 2, 4096).build();
    hub.push("cli/app:v1", &image).await;
    let insecure = format!("{},{}", hub.host(), internal.host());
    let src = format!("{}/cli/app:v1", hub.host());
    let dst = format!("{}/t/cli:s", internal.host());

    let (code, json, output) =
        tailor_copy(&["--json", "--insecure", &insecure, &src, &dst], None, &[]);
    assert_eq!(code, 0, "{output}");
    assert_eq!(json["source_digest"], image.digest.as_str());
    assert_eq!(
        json["pinned"],
        format!("{}/t/cli@{}", internal.host(), image.digest)
    );
    assert_eq!(json["blobs"]["copied"], 3);
    assert_eq!(json["bytes_copied"], image.blob_bytes());
    assert!(
        !output.contains("[="),
        "no progress bars when not on a terminal"
    );

    let (code, json, _) = tailor_copy(&["--json", "--insecure", &insecure, &src, &dst], None, &[]);
    assert_eq!((code, json["blobs"]["skipped"].as_u64()), (0, Some(3)));

    let missing = format!("{}/cli/missing:v1", hub.host());
    let (code, json, _) = tailor_copy(
        &["--json", "--insecure", &insecure, &missing, &dst],
        None,
        &[],
    );
    assert_eq!(code, 1);
    assert_eq!(json["error"]["code"], "IMAGE_NOT_FOUND");

    let (code, json, _) = tailor_copy(&["--json", "Not/Valid:ref", &dst], None, &[]);
    assert_eq!(code, 1);
    assert_eq!(json["error"]["code"], "INVALID_REFERENCE");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("lowercase")
    );

    let (code, json, _) = tailor_copy(&["--json", "--platform", "linux", &src, &dst], None, &[]);
    assert_eq!(code, 1);
    assert_eq!(json["error"]["code"], "INVALID_ARGUMENT");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("os/arch")
    );
}

#[tokio::test]
async fn passwords_come_from_stdin_or_the_environment_and_are_never_printed() {
    let hub = TestRegistry::htpasswd("hub-user", "pa55-from-stdin");
    let internal = TestRegistry::anonymous();
    let image = ImageSpec::seeded(ManifestFormat::Oci, 810, 1, 2048).build();
    hub.push("private/cli:v1", &image).await;
    let insecure = format!("{},{}", hub.host(), internal.host());
    let src = format!("{}/private/cli:v1", hub.host());

    let dst = format!("{}/t/one:s", internal.host());
    let args = [
        "--json",
        "--insecure",
        &insecure,
        "--src-creds",
        "hub-user",
        "--src-password-stdin",
        &src,
        &dst,
    ];
    let (code, json, output) = tailor_copy(&args, Some("pa55-from-stdin\n"), &[]);
    assert_eq!(code, 0, "{output}");
    assert_eq!(json["source_digest"], image.digest.as_str());
    assert!(!output.contains("pa55-from-stdin"));

    let dst = format!("{}/t/two:s", internal.host());
    let args = [
        "--json",
        "--insecure",
        &insecure,
        "--src-creds",
        "hub-user",
        &src,
        &dst,
    ];
    let (code, _, output) = tailor_copy(&args, None, &[("TAILOR_SRC_PASSWORD", "pa55-from-stdin")]);
    assert_eq!(code, 0, "{output}");

    let (code, json, output) =
        tailor_copy(&args, None, &[("TAILOR_SRC_PASSWORD", "wrong-password")]);
    assert_eq!(code, 1);
    assert_eq!(json["error"]["code"], "UNAUTHORIZED");
    assert!(!output.contains("wrong-password"), "{output}");
}

#[tokio::test]
async fn copies_into_and_out_of_an_oci_layout_directory_and_refuses_unusable_ones() {
    let hub = TestRegistry::anonymous();
    let image = ImageSpec::seeded(ManifestFormat::Oci, 801, 2, 4096).build();
    hub.push("cli/layout:v1", &image).await;
    let src = format!("docker://{}/cli/layout:v1", hub.host());
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("images");
    let dst = format!("oci:{}:v1", layout.display());

    let (code, json, output) = tailor_copy(
        &["--json", "--insecure", &hub.host(), &src, &dst],
        None,
        &[],
    );
    assert_eq!(code, 0, "{output}");
    assert_eq!(json["source_digest"], image.digest.as_str());
    assert_eq!(json["tagged"], format!("oci:{}:v1", layout.display()));
    assert_eq!(json["blobs"]["copied"], 3);
    let raw = testkit::skopeo::skopeo()
        .args(["inspect", "--raw", &dst])
        .output()
        .unwrap();
    assert_eq!(
        raw.stdout,
        image.manifest.as_ref(),
        "skopeo reads upstream's bytes back"
    );

    let (code, json, _) = tailor_copy(
        &["--json", "--insecure", &hub.host(), &src, &dst],
        None,
        &[],
    );
    assert_eq!((code, json["blobs"]["skipped"].as_u64()), (0, Some(3)));

    // And back out of the layout into another registry (the bootstrap of an empty one):
    // the same digest, which skopeo pulls from there.
    let fresh = TestRegistry::anonymous();
    let (code, json, output) = tailor_copy(
        &[
            "--json",
            "--insecure",
            &fresh.host(),
            &dst,
            &format!("docker://{}/restored/layout:v1", fresh.host()),
        ],
        None,
        &[],
    );
    assert_eq!(code, 0, "{output}");
    assert_eq!(json["source_digest"], image.digest.as_str());
    assert_eq!(json["blobs"]["copied"], 3);
    let pulled = testkit::skopeo::skopeo()
        .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
        .arg(format!("docker://{}/restored/layout:v1", fresh.host()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&pulled.stdout).trim(), image.digest);
    let (code, json, _) = tailor_copy(
        &[
            "--json",
            "--src-creds",
            "someone:secret",
            &dst,
            &format!("docker://{}/restored/layout:v2", fresh.host()),
        ],
        None,
        &[],
    );
    assert_eq!(
        (code, json["error"]["code"].as_str()),
        (1, Some("INVALID_ARGUMENT")),
        "a layout takes no credentials"
    );

    // A directory that holds something else is not written into.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("oci-layout"), "not json").unwrap();
    let (code, json, _) = tailor_copy(
        &[
            "--json",
            "--insecure",
            &hub.host(),
            &src,
            &format!("oci:{}:v1", other.display()),
        ],
        None,
        &[],
    );
    assert_eq!(
        (code, json["error"]["code"].as_str()),
        (1, Some("LAYOUT_INVALID"))
    );
    let written: Vec<_> = std::fs::read_dir(&other)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(written, ["oci-layout"], "nothing is written into it");
    let (code, json, _) = tailor_copy(
        &[
            "--json",
            "--insecure",
            &hub.host(),
            &src,
            &format!("oci:{}:../x", layout.display()),
        ],
        None,
        &[],
    );
    assert_eq!(
        (code, json["error"]["code"].as_str()),
        (1, Some("INVALID_ARGUMENT"))
    );
}

#[tokio::test]
async fn copies_into_and_out_of_a_bucket_with_credentials_from_the_environment() {
    let s3 = testkit::s3::S3Server::start();
    let hub = TestRegistry::anonymous();
    let image = ImageSpec::seeded(ManifestFormat::Oci, 802, 2, 4096).build();
    hub.push("cli/bucket:v1", &image).await;
    let src = format!("docker://{}/cli/bucket:v1", hub.host());
    let bucket = format!(
        "s3://{}/exports/cli:v1?endpoint={}&region={}",
        s3.bucket(),
        s3.endpoint(),
        s3.region()
    );
    let env = [
        ("AWS_ACCESS_KEY_ID", s3.access_key()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key().expose()),
    ];

    let (code, json, output) = tailor_copy(
        &["--json", "--insecure", &hub.host(), &src, &bucket],
        None,
        &env,
    );
    assert_eq!(code, 0, "{output}");
    assert_eq!(json["source_digest"], image.digest.as_str());
    assert_eq!(
        json["tagged"],
        format!("s3://{}/exports/cli:v1", s3.bucket())
    );
    let refs = s3.list_objects("exports/cli/refs").await;
    assert_eq!(refs.len(), 1, "{refs:?}");

    let fresh = TestRegistry::anonymous();
    let (code, json, output) = tailor_copy(
        &[
            "--json",
            "--insecure",
            &fresh.host(),
            &bucket,
            &format!("docker://{}/restored/bucket:v1", fresh.host()),
        ],
        None,
        &env,
    );
    assert_eq!(code, 0, "{output}");
    assert_eq!(json["source_digest"], image.digest.as_str());
    assert_eq!(json["blobs"]["copied"], 3);

    // A refused secret: a stable code, and the secret nowhere in what is printed.
    let wrong = "not-the-secret-4c1f";
    let (code, json, output) = tailor_copy(
        &[
            "--json",
            &bucket,
            &format!("docker://{}/restored/bucket:v2", fresh.host()),
        ],
        None,
        &[
            ("AWS_ACCESS_KEY_ID", s3.access_key()),
            ("AWS_SECRET_ACCESS_KEY", wrong),
        ],
    );
    assert_eq!(
        (code, json["error"]["code"].as_str()),
        (1, Some("LOCATION_DENIED")),
        "{output}"
    );
    assert!(!output.contains(wrong), "{output}");
}

#[tokio::test]
async fn boots_an_empty_registry_from_an_oci_archive() {
    let hub = TestRegistry::anonymous();
    let image = ImageSpec::seeded(ManifestFormat::Oci, 803, 2, 4096).build();
    hub.push("library/registry:2", &image).await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("registry.tar");
    let (code, json, output) = tailor_copy(
        &[
            "--json",
            "--insecure",
            &hub.host(),
            &format!("docker://{}/library/registry:2", hub.host()),
            &format!("oci-archive:{}:2", archive.display()),
        ],
        None,
        &[],
    );
    assert_eq!(code, 0, "{output}");
    assert_eq!(
        json["tagged"],
        format!("oci-archive:{}:2", archive.display())
    );

    // The first registry of a site, loaded from the file alone.
    let fresh = TestRegistry::anonymous();
    let (code, json, output) = tailor_copy(
        &[
            "--json",
            "--insecure",
            &fresh.host(),
            &format!("oci-archive:{}", archive.display()),
            &format!("docker://{}/library/registry:2", fresh.host()),
        ],
        None,
        &[],
    );
    assert_eq!(code, 0, "{output}");
    assert_eq!(json["source_digest"], image.digest.as_str());
    let pulled = testkit::skopeo::skopeo()
        .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
        .arg(format!("docker://{}/library/registry:2", fresh.host()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&pulled.stdout).trim(), image.digest);

    // A file that is not an archive is refused by name, and left alone.
    let bogus = dir.path().join("bogus.tar");
    std::fs::write(&bogus, "not a tar").unwrap();
    let (code, json, _) = tailor_copy(
        &[
            "--json",
            "--insecure",
            &fresh.host(),
            &format!("oci-archive:{}", bogus.display()),
            &format!("docker://{}/library/bogus:1", fresh.host()),
        ],
        None,
        &[],
    );
    assert_eq!(
        (code, json["error"]["code"].as_str()),
        (1, Some("LAYOUT_INVALID"))
    );
    assert_eq!(std::fs::read(&bogus).unwrap(), b"not a tar");
}

#[tokio::test]
async fn referrers_travel_registry_to_registry_with_the_flag_only() {
    use testkit::image::{ArtifactSpec, CosignKind, cosign_artifact};
    let (hub, internal) = (TestRegistry::anonymous(), TestRegistry::anonymous());
    let image = ImageSpec::seeded(ManifestFormat::Oci, 810, 1, 4096).build();
    hub.push("cli/signed:v1", &image).await;
    let signature = cosign_artifact(
        &image,
        &format!("{}/cli/signed", hub.host()),
        CosignKind::Signature,
    );
    let signature_tag = CosignKind::Signature.tag(&image.digest);
    hub.push(&format!("cli/signed:{signature_tag}"), &signature)
        .await;
    let sbom = ArtifactSpec::sbom("signed").about(&image).build();
    hub.push_referrers("cli/signed", &image.digest, std::slice::from_ref(&sbom))
        .await;
    let insecure = format!("{},{}", hub.host(), internal.host());
    let src = format!("{}/cli/signed:v1", hub.host());

    // Without the flag, the image alone.
    let plain = format!("{}/t/plain:v1", internal.host());
    let (code, json, output) = tailor_copy(
        &["--json", "--insecure", &insecure, &src, &plain],
        None,
        &[],
    );
    assert_eq!(code, 0, "{output}");
    assert_eq!(json["referrers"], serde_json::json!([]));
    assert!(
        testkit::skopeo::digest(
            &format!("{}/t/plain:{signature_tag}", internal.host()),
            None
        )
        .is_err()
    );

    let dst = format!("{}/t/signed:v1", internal.host());
    let (code, json, output) = tailor_copy(
        &["--json", "--referrers", "--insecure", &insecure, &src, &dst],
        None,
        &[],
    );
    assert_eq!(code, 0, "{output}");
    let mut digests: Vec<&str> = json["referrers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["digest"].as_str().unwrap())
        .collect();
    digests.sort();
    let mut expected = vec![signature.digest.as_str(), sbom.digest.as_str()];
    expected.sort();
    assert_eq!(digests, expected, "{json}");
    assert_eq!(
        testkit::skopeo::digest(
            &format!("{}/t/signed:{signature_tag}", internal.host()),
            None
        )
        .unwrap(),
        signature.digest
    );
    assert_eq!(
        testkit::skopeo::digest(
            &format!("{}/t/signed@{}", internal.host(), sbom.digest),
            None
        )
        .unwrap(),
        sbom.digest
    );

    // Into a layout, refused before anything is read.
    let layout = tempfile::tempdir().unwrap();
    let target = format!("oci:{}", layout.path().display());
    let (code, json, _) = tailor_copy(
        &[
            "--json",
            "--referrers",
            "--insecure",
            &insecure,
            &src,
            &target,
        ],
        None,
        &[],
    );
    assert_eq!(code, 1);
    assert_eq!(json["error"]["code"], "INVALID_ARGUMENT", "{json}");
}
