//! `tailor export` and `tailor import`: an environment rebuilt from its exported stagings with
//! the upstream registry gone, through a directory, a tar file and a bucket; a second import
//! changes nothing, and what is not a tailor export is named and skipped.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};
use specs::{Service, binary, get, stage, stager_api, wait_finished};
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::{TestDatabase, TestRegistry, skopeo};
use uuid::Uuid;

/// `tailor <args>` against the stager whose database and internal registry are given.
fn tailor(db_url: &str, internal: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(binary("tailor"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db_url)
        .env("TAILOR_INTERNAL_REGISTRY", internal)
        .env("TAILOR_INSECURE_REGISTRIES", internal)
        .envs(env.iter().copied())
        .output()
        .expect("run tailor")
}

fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// A stager on a fresh database and internal registry.
struct Site {
    db: TestDatabase,
    internal: TestRegistry,
    api: Service,
}

impl Site {
    async fn start(upstreams: &[String]) -> Self {
        let db = TestDatabase::new().await;
        let internal = TestRegistry::anonymous();
        let mut insecure = upstreams.to_vec();
        insecure.push(internal.host());
        let api = Service::start(stager_api(
            &db.url,
            &internal.host(),
            &insecure,
            &[("STAGER_WORKERS", "2")],
        ));
        Self { db, internal, api }
    }

    fn tailor(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        tailor(&self.db.url, &self.internal.host(), args, env)
    }

    async fn staged(&self, app_guid: Uuid, image: &str) -> Value {
        let staged = stage(&self.api, json!({ "app_guid": app_guid, "image": image })).await;
        let guid = staged["staging_guid"].as_str().unwrap().to_owned();
        let done = wait_finished(&self.api, &guid, Duration::from_secs(60)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        done
    }
}

fn guids(report: &Value, key: &str) -> Vec<String> {
    let mut guids: Vec<String> = report[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["staging_guid"].as_str().unwrap().to_owned())
        .collect();
    guids.sort();
    guids
}

#[tokio::test]
async fn a_site_is_rebuilt_from_its_export_without_the_upstream_registry() {
    let hub = TestRegistry::anonymous();
    let site = Site::start(&[hub.host()]).await;
    let (app_a, app_b) = (Uuid::new_v4(), Uuid::new_v4());
    let (mut stagings, mut images) = (Vec::new(), Vec::new());
    // Docker and OCI manifests alike (skopeo reads only OCI-typed entries of a layout back).
    for (seed, app, format) in [
        (6100u64, app_a, ManifestFormat::Docker),
        (6101, app_a, ManifestFormat::Docker),
        (6102, app_b, ManifestFormat::Oci),
    ] {
        let image = ImageSpec::seeded(format, seed, 2, 32 * 1024).build();
        hub.push(&format!("site/app:{seed}"), &image).await;
        images.push(image);
        let done = site
            .staged(app, &format!("{}/site/app:{seed}", hub.host()))
            .await;
        stagings.push(done);
    }
    let guid = |i: usize| stagings[i]["staging_guid"].as_str().unwrap().to_owned();
    let mut all: Vec<String> = (0..3).map(guid).collect();
    all.sort();

    let dir = tempfile::tempdir().unwrap();
    let layout = format!("oci:{}", dir.path().join("site").display());
    let export = site.tailor(&["export", "--all", "--json", &layout], &[]);
    assert_eq!(export.status.code(), Some(0), "{export:?}");
    let report = json_of(&export);
    assert_eq!(guids(&report, "done"), all);
    assert!(report["failed"].as_array().unwrap().is_empty());
    // Again: every blob is in the layout already, so nothing is read from the registry.
    let again = json_of(&site.tailor(&["export", "--all", "--json", &layout], &[]));
    let copied: u64 = again["done"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["bytes_copied"].as_u64().unwrap())
        .sum();
    assert_eq!(copied, 0, "{again}");
    // Each image is an ordinary OCI image, tagged with its staging GUID, byte for byte.
    let raw = skopeo::skopeo()
        .args(["inspect", "--raw", &format!("{layout}:{}", guid(2))])
        .output()
        .unwrap();
    assert_eq!(raw.stdout, images[2].manifest.as_ref(), "{raw:?}");

    // An app's live stagings, or one staging, by GUID.
    let by_app = site.tailor(
        &[
            "export",
            "--json",
            &app_a.to_string(),
            &format!("oci:{}", dir.path().join("app-a").display()),
        ],
        &[],
    );
    assert_eq!(guids(&json_of(&by_app), "done"), {
        let mut two = vec![guid(0), guid(1)];
        two.sort();
        two
    });
    let unknown = site.tailor(
        &["export", "--json", &Uuid::new_v4().to_string(), &layout],
        &[],
    );
    assert_eq!(unknown.status.code(), Some(1));
    assert_eq!(json_of(&unknown)["error"]["code"], "NOT_FOUND");

    // The upstream registry is gone; a new site is fed from the directory alone.
    drop(hub);
    let rebuilt = Site::start(&[]).await;
    let import = rebuilt.tailor(&["import", "--json", &layout], &[]);
    assert_eq!(import.status.code(), Some(0), "{import:?}");
    let imported = json_of(&import);
    assert_eq!(guids(&imported, "done"), all);
    for (i, original) in stagings.iter().enumerate() {
        let here = get(&rebuilt.api, &guid(i)).await;
        assert_eq!(here["state"], "succeeded", "{here}");
        assert_eq!(here["app_guid"], original["app_guid"]);
        assert_eq!(here["image"], original["image"]);
        assert_eq!(
            here["result"]["source_digest"],
            original["result"]["source_digest"]
        );
        assert_eq!(
            here["result"]["process_types"],
            original["result"]["process_types"]
        );
        let pinned = here["result"]["pinned_image"].as_str().unwrap();
        assert!(pinned.starts_with(&rebuilt.internal.host()), "{pinned}");
        assert_eq!(
            skopeo::digest(pinned, None).unwrap(),
            original["result"]["source_digest"].as_str().unwrap(),
            "the new internal registry serves the same image"
        );
    }
    // Importing again changes nothing.
    let again = rebuilt.tailor(&["import", "--json", &layout], &[]);
    assert_eq!(again.status.code(), Some(0), "{again:?}");
    let twice = json_of(&again);
    assert_eq!(guids(&twice, "done"), all);
    assert!(twice["failed"].as_array().unwrap().is_empty(), "{twice}");
    assert!(
        twice["done"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["outcome"] == "already_present"),
        "{twice}"
    );
}

#[tokio::test]
async fn stagings_travel_by_tar_file_and_by_bucket_and_foreign_entries_are_named() {
    let s3 = testkit::s3::S3Server::start();
    let hub = TestRegistry::anonymous();
    let site = Site::start(&[hub.host()]).await;
    let image = ImageSpec::seeded(ManifestFormat::Oci, 6110, 2, 32 * 1024).build();
    hub.push("travel/app:v1", &image).await;
    let done = site
        .staged(Uuid::new_v4(), &format!("{}/travel/app:v1", hub.host()))
        .await;
    let guid = done["staging_guid"].as_str().unwrap().to_owned();
    let aws = [
        ("AWS_ACCESS_KEY_ID", s3.access_key()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key().expose()),
    ];
    let bucket = format!(
        "s3://{}/sites/a?endpoint={}&region={}",
        s3.bucket(),
        s3.endpoint(),
        s3.region()
    );
    let dir = tempfile::tempdir().unwrap();
    let archive = format!("oci-archive:{}", dir.path().join("site.tar").display());
    for destination in [&bucket, &archive] {
        let export = site.tailor(&["export", "--json", &guid, destination], &aws);
        assert_eq!(export.status.code(), Some(0), "{export:?}");
    }
    // Something `tailor copy` put in the same bucket is an image but not a staging.
    let copied = site.tailor(
        &[
            "copy",
            "--json",
            "--insecure",
            &hub.host(),
            &format!("docker://{}/travel/app:v1", hub.host()),
            &bucket.replace("sites/a?", "sites/a:by-hand?"),
        ],
        &aws,
    );
    assert_eq!(copied.status.code(), Some(0), "{copied:?}");

    for source in [&archive, &bucket] {
        let target = Site::start(&[]).await;
        let import = target.tailor(&["import", "--json", source], &aws);
        let report = json_of(&import);
        assert_eq!(
            guids(&report, "done"),
            std::slice::from_ref(&guid),
            "{report}"
        );
        let here = get(&target.api, &guid).await;
        assert_eq!(here["result"]["source_digest"], image.digest.as_str());
        if source == &bucket {
            assert_eq!(
                import.status.code(),
                Some(1),
                "a failed entry fails the run"
            );
            assert_eq!(report["failed"][0]["staging"], "by-hand");
            assert_eq!(report["failed"][0]["error"]["code"], "LAYOUT_INVALID");
        } else {
            assert_eq!(import.status.code(), Some(0), "{import:?}");
        }
    }

    // A site whose staging GUID already means another image refuses, and keeps its own.
    let other = ImageSpec::seeded(ManifestFormat::Oci, 6111, 1, 4096).build();
    let clash = Site::start(&[hub.host()]).await;
    hub.push("travel/other:v1", &other).await;
    let mine = stage(
        &clash.api,
        json!({ "staging_guid": guid, "app_guid": Uuid::new_v4(),
                "image": format!("{}/travel/other:v1", hub.host()) }),
    )
    .await;
    assert_eq!(mine["staging_guid"], guid.as_str());
    wait_finished(&clash.api, &guid, Duration::from_secs(60)).await;
    let refused = clash.tailor(&["import", "--json", &archive], &[]);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        json_of(&refused)["failed"][0]["error"]["code"],
        "STAGING_CONFLICT"
    );
    assert_eq!(
        get(&clash.api, &guid).await["result"]["source_digest"],
        other.digest.as_str()
    );
}

#[tokio::test]
async fn a_damaged_export_imports_nothing_of_that_staging() {
    let hub = TestRegistry::anonymous();
    let site = Site::start(&[hub.host()]).await;
    let image = ImageSpec::seeded(ManifestFormat::Oci, 6120, 2, 32 * 1024).build();
    hub.push("damaged/app:v1", &image).await;
    let app_guid = Uuid::new_v4();
    let done = site
        .staged(app_guid, &format!("{}/damaged/app:v1", hub.host()))
        .await;
    let guid = done["staging_guid"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let layout = format!("oci:{}", dir.path().display());
    let export = site.tailor(&["export", &guid, &layout], &[]);
    assert_eq!(export.status.code(), Some(0), "{export:?}");
    let table = String::from_utf8_lossy(&export.stdout);
    assert!(
        table.contains(&guid) && table.contains("exported"),
        "{table}"
    );

    // One byte of the second layer changes on disk (same size: only the digest can tell).
    let hex = image.layers[1].digest.trim_start_matches("sha256:");
    let path = dir.path().join("blobs/sha256").join(hex);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let target = Site::start(&[]).await;
    let import = target.tailor(&["import", "--json", &layout], &[]);
    assert_eq!(import.status.code(), Some(1), "{import:?}");
    let report = json_of(&import);
    assert_eq!(report["failed"][0]["staging"], guid.as_str());
    assert_eq!(report["failed"][0]["error"]["code"], "DIGEST_MISMATCH");
    // No staging, and no tag in the internal registry.
    let status = reqwest::Client::new()
        .get(format!("{}/stage/{guid}", target.api.base_url))
        .bearer_auth(specs::TOKEN)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 404);
    assert!(
        skopeo::digest(
            &format!("{}/tailor/{app_guid}:{guid}", target.internal.host()),
            None
        )
        .is_err()
    );
}
