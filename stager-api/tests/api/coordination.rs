//! How stagings share what they share: rate-limit budgets (per registry and account, so one
//! tenant's exhausted quota is not everyone's, and absurd `Retry-After`s are bounded), fetch
//! leases (per origin, so a crawling upstream holds back no one who pulls from elsewhere), and
//! the leases of one attempt (renewed from the claim to the recorded outcome, all released
//! at its end). Upstreams are real HTTP servers that misbehave on purpose.

use std::time::Duration;

use serde_json::{Value, json};
use testkit::hostile_registry::{HostileRegistry, Misbehaviour, Rule};
use testkit::image::{ImageSpec, ManifestFormat};
use uuid::Uuid;

use crate::helpers::{AppOptions, TestApp, spawn};

async fn app_with(upstreams: &[&HostileRegistry], workers: usize, env: &[(&str, &str)]) -> TestApp {
    let mut options = AppOptions {
        workers,
        also_insecure: upstreams.iter().map(|u| u.host()).collect(),
        ..AppOptions::default()
    };
    for (name, value) in env {
        options = options.env(name, value);
    }
    spawn(options).await
}

/// POSTs a staging (with `credentials` as `(user, password)` if given); returns its GUID.
async fn stage(app: &TestApp, image: &str, credentials: Option<(&str, &str)>) -> String {
    let mut request = json!({ "app_guid": Uuid::new_v4(), "image": image });
    if let Some((username, password)) = credentials {
        request["credentials"] = json!({ "username": username, "password": password });
    }
    let (status, body) = app.stage(request).await;
    assert_eq!(status, 202, "{image}: {body}");
    body["staging_guid"].as_str().unwrap().to_owned()
}

/// Polls the staging until `done` holds; panics after `within`.
async fn wait_until(
    app: &TestApp,
    guid: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let staging = app.staging(guid).await;
        if done(&staging) {
            return staging;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "staging {guid} never got there: {staging}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn one_accounts_rate_limit_stops_only_that_account_and_absurd_waits_are_bounded() {
    let upstream = HostileRegistry::start();
    let limited = ImageSpec::seeded(ManifestFormat::Docker, 7100, 1, 4096).build();
    let open = ImageSpec::seeded(ManifestFormat::Docker, 7101, 1, 4096).build();
    upstream.add_image("limited/app", "v1", &limited);
    upstream.add_image("open/app", "v1", &open);
    // Alice's pull meets a 429 whose Retry-After is the largest number there is.
    upstream.add_rule(Rule::new(
        "/v2/limited/app/manifests/",
        Misbehaviour::Respond {
            status: 429,
            headers: vec![("Retry-After".into(), u64::MAX.to_string().into_bytes())],
            body: br#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#.to_vec(),
        },
    ));
    let app = app_with(&[&upstream], 2, &[]).await;
    let host = upstream.host();

    let alice = stage(
        &app,
        &format!("{host}/limited/app:v1"),
        Some(("alice", "pw-a")),
    )
    .await;
    let failed = app.wait_finished(&alice).await;
    // Not a worker's overflow panic (INTERNAL_ERROR): a wait longer than the deadline.
    assert_eq!(failed["error"]["code"], "RATE_LIMITED", "{failed}");
    let (budgets, longest): (i64, f64) = sqlx::query_as(
        "SELECT count(*), max(extract(epoch FROM blocked_until - now()))::float8 \
         FROM registry_budgets WHERE blocked_until > now()",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(budgets, 1, "one budget blocked");
    assert!(longest <= 86_400.0, "a block is at most a day: {longest} s");

    // Alice's account is blocked for everything on that registry: her next staging waits...
    let alice_again = stage(
        &app,
        &format!("{host}/open/app:v1"),
        Some(("alice", "pw-a")),
    )
    .await;
    // ... while anonymous pulls and Bob's, asked for after hers, go ahead.
    let anonymous = stage(&app, &format!("{host}/open/app:v1"), None).await;
    let bob = stage(&app, &format!("{host}/open/app:v1"), Some(("bob", "pw-b"))).await;
    for guid in [&anonymous, &bob] {
        let done = app.wait_finished(guid).await;
        assert_eq!(done["state"], "succeeded", "{done}");
    }
    // Workers take the oldest claimable staging first: hers was never claimable.
    let waiting = app.staging(&alice_again).await;
    assert_eq!(waiting["state"], "queued", "{waiting}");
    assert_eq!(waiting["attempts"], 0, "{waiting}");

    // The metrics name the registry, never the account (not even hashed).
    let metrics = app
        .get_authed("/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("tailor_registry_rate_limited_seconds{"))
        .unwrap_or_else(|| panic!("no rate-limit gauge in:\n{metrics}"));
    assert!(line.contains(&format!("registry=\"{host}\"")), "{line}");
    assert!(!metrics.contains(&format!("{host}#")), "{line}");
}

#[tokio::test]
async fn a_crawling_upstream_holds_back_no_copy_of_the_same_blob_from_another_origin() {
    // The same image on two registries: one crawls (32 KiB/s, above the transfer floor, so
    // it is slow but legitimate), the other answers at once.
    let crawling = HostileRegistry::start();
    let prompt = HostileRegistry::start();
    let image = ImageSpec::seeded(ManifestFormat::Docker, 7200, 1, 2 * 1024 * 1024).build();
    crawling.add_image("app", "v1", &image);
    prompt.add_image("app", "v1", &image);
    let layer = image.layers[0].digest.clone();
    crawling.add_rule(Rule::new(
        &format!("/blobs/{layer}"),
        Misbehaviour::Trickle {
            bytes_per_second: 32 * 1024,
            body: None,
        },
    ));
    let app = app_with(&[&crawling, &prompt], 2, &[]).await;

    let slow = stage(&app, &format!("{}/app:v1", crawling.host()), None).await;
    // It holds the fetch lease of the layer once bytes flow.
    wait_until(&app, &slow, Duration::from_secs(60), |s| {
        s["progress"]["bytes_done"].as_i64().unwrap_or(0) > 0
    })
    .await;
    let fast = stage(&app, &format!("{}/app:v1", prompt.host()), None).await;
    let done = app.wait_finished(&fast).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    // Had it waited for the crawling fetch (a minute at that rate), that one would be over.
    let still = app.staging(&slow).await;
    assert_eq!(still["state"], "running", "{still}");

    let stopped = app.delete(&format!("/stage/{slow}")).send().await.unwrap();
    assert!(stopped.status().is_success(), "{}", stopped.status());
    let cancelled = app.wait_finished(&slow).await;
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
}

#[tokio::test]
async fn an_attempt_keeps_its_staging_while_it_waits_for_the_repository_and_leaves_no_lease() {
    let upstream = HostileRegistry::start();
    let image = ImageSpec::seeded(ManifestFormat::Docker, 7300, 1, 4096).build();
    upstream.add_image("app", "v1", &image);
    // Leases of 3 s: a staging whose lease were not renewed while it waits for the
    // repository would be taken over by the other worker within the wait.
    let app = app_with(&[&upstream], 2, &[("TAILOR_LEASE_SECONDS", "3")]).await;
    let app_guid = Uuid::new_v4();
    // "The pruner" holds the app's repository for 8 s.
    sqlx::query(
        "INSERT INTO leases (resource, holder, exclusive, expires_at) \
         VALUES ($1, 'test-pruner', true, now() + interval '8 seconds')",
    )
    .bind(format!("repository:tailor/{app_guid}"))
    .execute(&app.pool)
    .await
    .unwrap();
    let (status, body) = app
        .stage(json!({ "app_guid": app_guid, "image": format!("{}/app:v1", upstream.host()) }))
        .await;
    assert_eq!(status, 202, "{body}");
    let guid = body["staging_guid"].as_str().unwrap().to_owned();
    let done = app.wait_finished(&guid).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let (attempts, workers_lost): (i32, i32) =
        sqlx::query_as("SELECT attempts, workers_lost FROM stagings WHERE staging_guid = $1::uuid")
            .bind(&guid)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        (attempts, workers_lost),
        (1, 0),
        "one attempt, never taken over"
    );
    let left: Vec<(String, String)> = sqlx::query_as("SELECT resource, holder FROM leases")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert!(left.is_empty(), "leases left behind: {left:?}");
}
