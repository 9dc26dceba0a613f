//! The binaries as an operator runs them.

use std::process::Command;
use std::time::Duration;

use specs::{Service, TOKEN, alive, binary, children_of};
use testkit::{TestDatabase, TestRegistry};

fn configured(db: &TestDatabase, registry: &TestRegistry) -> Command {
    specs::stager_api(&db.url, &registry.host(), &[registry.host()], &[])
}

#[tokio::test]
async fn stager_api_serves_from_environment_configuration() {
    let db = TestDatabase::new().await;
    let registry = TestRegistry::anonymous();
    let mut service = Service::start(configured(&db, &registry));

    let ping = reqwest::get(format!("{}/_ping", service.base_url))
        .await
        .unwrap();
    assert_eq!(ping.status(), 200);
    let status = reqwest::Client::new()
        .get(format!("{}/_status", service.base_url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), 200, "{:?}", status.text().await);

    assert_eq!(
        service.signal_and_wait(libc::SIGTERM, Duration::from_secs(30)),
        Some(0)
    );
}

#[tokio::test]
async fn missing_or_bad_configuration_stops_start_up_naming_the_setting() {
    let db = TestDatabase::new().await;
    let registry = TestRegistry::anonymous();
    let cases = [
        ("DATABASE_URL", None),
        ("TAILOR_INTERNAL_REGISTRY", Some("http://registry.example")),
        ("STAGER_API_TOKENS", Some("short")),
        ("STAGER_LISTEN", Some("everywhere")),
    ];
    for (setting, value) in cases {
        let mut command = configured(&db, &registry);
        match value {
            Some(value) => command.env(setting, value),
            None => command.env_remove(setting),
        };
        let output = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{setting}: started anyway");
        assert!(
            stderr.contains(setting),
            "{setting}: stderr does not name it: {stderr}"
        );
        assert!(
            !stderr.contains("short\""),
            "the bad token is echoed: {stderr}"
        );
    }
}

#[tokio::test]
async fn check_config_validates_without_starting() {
    let db = TestDatabase::new().await;
    let registry = TestRegistry::anonymous();
    let mut command = configured(&db, &registry);
    let output = command.arg("check-config").output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let mut command = configured(&db, &registry);
    let output = command
        .env("TAILOR_REPO_PREFIX", "Not/Valid")
        .arg("check-config")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("TAILOR_REPO_PREFIX"));
}

#[tokio::test]
async fn tailor_migrate_is_idempotent() {
    let db = TestDatabase::new().await;
    for _ in 0..2 {
        let output = Command::new(binary("tailor"))
            .args(["migrate"])
            .env("DATABASE_URL", &db.url)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(String::from_utf8_lossy(&output.stdout).contains("up to date"));
    }
}

#[tokio::test]
async fn embedded_mode_serves_and_ctrl_c_leaves_nothing_behind() {
    let mut command = Command::new(binary("stager-api"));
    command
        .args(["embedded", "--listen", "127.0.0.1:0"])
        .env_remove("STAGER_API_TOKENS");
    let mut service = Service::start(command);
    let pid = service.pid();

    let ping = reqwest::get(format!("{}/_ping", service.base_url))
        .await
        .unwrap();
    assert_eq!(ping.status(), 200);
    let children = children_of(pid);
    assert!(
        children.len() >= 2,
        "expected postgres and the registry as children, got {children:?}"
    );
    let dirs: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            std::fs::read_to_string(p.join("owner.pid")).is_ok_and(|o| o.trim() == pid.to_string())
        })
        .collect();
    assert_eq!(
        dirs.len(),
        2,
        "one directory each for postgres and the registry: {dirs:?}"
    );

    assert_eq!(
        service.signal_and_wait(libc::SIGINT, Duration::from_secs(60)),
        Some(0)
    );
    for child in children {
        assert!(!alive(child), "child {child} survived Ctrl-C");
    }
    for dir in dirs {
        assert!(!dir.exists(), "{} survived Ctrl-C", dir.display());
    }
}

#[test]
fn tailor_check_config_refuses_what_work_and_prune_would_naming_the_variable() {
    // check-config builds `work`'s and `prune`'s arguments as those commands do (clap, from
    // the environment), so it refuses exactly what they would, and names the variable.
    let base = [
        ("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none"),
        ("TAILOR_INTERNAL_REGISTRY", "127.0.0.1:5000"),
    ];
    for (setting, value, only_for) in [
        ("TAILOR_WORKERS", "0", "work"),
        ("TAILOR_PRUNE_DRY_RUN", "maybe", "prune"),
        ("TAILOR_PRUNE_GRACE", "soon", "prune"),
        ("TAILOR_PRUNE_SCHEDULE", "0 0 * * 8", "prune"),
    ] {
        let check = |role: Option<&str>| {
            let mut command = std::process::Command::new(specs::binary("tailor"));
            command
                .arg("check-config")
                .env_clear()
                .envs(base)
                .env(setting, value);
            if let Some(role) = role {
                command.args(["--for", role]);
            }
            command.output().unwrap()
        };
        for role in [None, Some(only_for)] {
            let output = check(role);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(
                output.status.code(),
                Some(1),
                "{setting} {role:?}: {stderr}"
            );
            assert!(
                stderr.starts_with(&format!("error: {setting} is invalid"))
                    && stderr.contains(value)
                    && stderr.contains("CONFIG_INVALID"),
                "{setting}: {stderr}"
            );
        }
        let other = if only_for == "work" { "prune" } else { "work" };
        let output = check(Some(other));
        assert!(
            output.status.success(),
            "{setting} is not {other}'s: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
