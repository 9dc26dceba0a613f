//! The reference record over HTTP: `PUT /references` and `DELETE /apps/{guid}`, including the
//! lists it must refuse so that a bug upstream cannot wipe the registry.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, spawn_app_with};

/// Inserts a succeeded staging, finished an hour ago, directly: these tests are about the
/// ledger, not copying.
async fn succeeded(app: &TestApp, app_guid: Uuid) -> Uuid {
    let guid = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO stagings (staging_guid, app_guid, source_image, platform, request_fingerprint, \
         state, pinned_image, tagged_image, source_digest, started_at, finished_at) \
         VALUES ($1, $2, 'docker.io/library/x:1', 'linux/amd64', '\\x00', 'succeeded', \
         'r/tailor/' || $2 || '@sha256:' || repeat('a', 64), 'r/tailor/' || $2 || ':' || $1, \
         'sha256:' || repeat('a', 64), now() - interval '1 hour', now() - interval '1 hour')",
    )
    .bind(guid)
    .bind(app_guid)
    .execute(&app.pool)
    .await
    .unwrap();
    guid
}

async fn put_references(app: &TestApp, query: &str, body: Value) -> (u16, Value) {
    let response = app
        .put(&format!("/references{query}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn unreferenced(app: &TestApp) -> Vec<Uuid> {
    sqlx::query_scalar(
        "SELECT staging_guid FROM stagings WHERE unreferenced_at IS NOT NULL ORDER BY staging_guid",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_sync_unreferences_what_it_does_not_list_and_rereferences_what_it_lists_again() {
    let app = spawn_app_with(0, testkit::TestRegistry::anonymous()).await;
    let (a, b, c) = (
        succeeded(&app, Uuid::new_v4()).await,
        succeeded(&app, Uuid::new_v4()).await,
        succeeded(&app, Uuid::new_v4()).await,
    );
    let stranger = Uuid::new_v4();
    let (status, body) =
        put_references(&app, "", json!({ "staging_guids": [a, b, stranger, a] })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({ "listed": 2, "unknown": 1, "rereferenced": 0, "unreferenced": 1 })
    );
    assert_eq!(unreferenced(&app).await, vec![c]);
    let staging = app.staging(&c.to_string()).await;
    assert!(staging["unreferenced_at"].is_string(), "{staging}");

    let (status, body) = put_references(&app, "", json!({ "staging_guids": [a, b, c] })).await;
    assert_eq!(status, 200);
    assert_eq!(body["rereferenced"], 1);
    assert!(unreferenced(&app).await.is_empty());
}

#[tokio::test]
async fn an_empty_or_mostly_missing_list_is_refused_unless_forced() {
    let app = spawn_app_with(0, testkit::TestRegistry::anonymous()).await;
    let mut guids = Vec::new();
    for _ in 0..12 {
        guids.push(succeeded(&app, Uuid::new_v4()).await);
    }
    let (status, body) = put_references(&app, "", json!({ "staging_guids": [] })).await;
    assert_eq!(status, 422);
    assert_eq!(body["code"], "SUSPICIOUS_REFERENCE_LIST");
    assert!(
        body["message"].as_str().unwrap().contains("12 of the 12"),
        "{body}"
    );
    // A truncated list (a paging bug upstream) is as dangerous as an empty one.
    let (status, _) =
        put_references(&app, "", json!({ "staging_guids": guids[..4].to_vec() })).await;
    assert_eq!(status, 422);
    assert!(
        unreferenced(&app).await.is_empty(),
        "a refused list changes nothing"
    );

    // A few missing is ordinary churn.
    let (status, body) =
        put_references(&app, "", json!({ "staging_guids": guids[..9].to_vec() })).await;
    assert_eq!((status, body["unreferenced"].as_i64()), (200, Some(3)));

    let (status, body) = put_references(&app, "?force=true", json!({ "staging_guids": [] })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(unreferenced(&app).await.len(), 12);
}

#[tokio::test]
async fn malformed_reference_lists_get_precise_errors_and_change_nothing() {
    let app = spawn_app_with(0, testkit::TestRegistry::anonymous()).await;
    let a = succeeded(&app, Uuid::new_v4()).await;
    for (query, body, status, code, needle) in [
        (
            "",
            json!({ "staging_guids": [a, "nope"] }),
            422,
            "INVALID_GUID",
            "staging_guids[1]",
        ),
        ("", json!({ "guids": [a] }), 400, "MALFORMED_JSON", "guids"),
        ("", json!([a]), 400, "MALFORMED_JSON", ""),
        (
            "?force=yes",
            json!({ "staging_guids": [] }),
            400,
            "INVALID_QUERY",
            "force",
        ),
        (
            "?forse=true",
            json!({ "staging_guids": [] }),
            400,
            "INVALID_QUERY",
            "forse",
        ),
    ] {
        let (got, response) = put_references(&app, query, body).await;
        assert_eq!(
            (got, response["code"].as_str()),
            (status, Some(code)),
            "{response}"
        );
        assert!(
            response["message"].as_str().unwrap().contains(needle),
            "{response}"
        );
    }
    let response = app
        .put("/references")
        .header("content-type", "application/json")
        .body("{\"staging_guids\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let unauthenticated = app
        .client
        .put(format!("{}/references", app.address))
        .json(&json!({ "staging_guids": [a] }))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    assert!(unreferenced(&app).await.is_empty());
}

#[tokio::test]
async fn a_list_the_size_of_a_large_foundation_is_accepted() {
    let app = spawn_app_with(0, testkit::TestRegistry::anonymous()).await;
    let kept = succeeded(&app, Uuid::new_v4()).await;
    let mut guids: Vec<Uuid> = (0..100_000).map(|_| Uuid::new_v4()).collect();
    guids.push(kept);
    let (status, body) = put_references(&app, "", json!({ "staging_guids": guids })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["listed"].as_i64(), body["unknown"].as_i64()),
        (Some(1), Some(100_000))
    );
}

#[tokio::test]
async fn deleting_an_app_releases_its_stagings_and_cancels_queued_ones() {
    let app = spawn_app_with(0, testkit::TestRegistry::anonymous()).await;
    let app_guid = Uuid::new_v4();
    let done = succeeded(&app, app_guid).await;
    let other = succeeded(&app, Uuid::new_v4()).await;
    let (status, queued) = app
        .stage(json!({ "app_guid": app_guid, "image": format!("{}/q/app:v1", app.hub.host()) }))
        .await;
    assert_eq!(status, 202);

    let response = app
        .delete(&format!("/apps/{app_guid}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({ "app_guid": app_guid, "released": 2, "cancelled": 1 })
    );
    let released: Vec<Uuid> = sqlx::query_scalar(
        "SELECT staging_guid FROM stagings WHERE released_at IS NOT NULL ORDER BY staging_guid",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let queued_guid: Uuid = queued["staging_guid"].as_str().unwrap().parse().unwrap();
    let mut expected = vec![done, queued_guid];
    expected.sort();
    assert_eq!(
        released, expected,
        "the other app's staging is untouched: {other}"
    );
    let cancelled = app.staging(queued["staging_guid"].as_str().unwrap()).await;
    assert_eq!(cancelled["state"], "cancelled");

    // Idempotent, and precise about what it does not know.
    let again: Value = app
        .delete(&format!("/apps/{app_guid}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (again["released"].as_i64(), again["cancelled"].as_i64()),
        (Some(0), Some(0))
    );
    let unknown = app
        .delete(&format!("/apps/{}", Uuid::new_v4()))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let bad = app.delete("/apps/not-a-guid").send().await.unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn a_list_naming_no_known_staging_is_refused_like_an_empty_one() {
    let app = spawn_app_with(0, testkit::TestRegistry::anonymous()).await;
    succeeded(&app, Uuid::new_v4()).await;
    succeeded(&app, Uuid::new_v4()).await;
    // Droplet GUIDs, or another foundation's stagings: nothing tailor knows.
    let strangers: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    let (status, body) = put_references(&app, "", json!({ "staging_guids": strangers })).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("SUSPICIOUS_REFERENCE_LIST"))
    );
    assert!(unreferenced(&app).await.is_empty());
}

#[tokio::test]
async fn a_sync_leaves_alone_stagings_the_platform_may_not_have_recorded_yet() {
    let app = spawn_app_with(0, testkit::TestRegistry::anonymous()).await;
    let listed = succeeded(&app, Uuid::new_v4()).await;
    let settled = succeeded(&app, Uuid::new_v4()).await;
    let just_finished = succeeded(&app, Uuid::new_v4()).await;
    sqlx::query("UPDATE stagings SET finished_at = now() WHERE staging_guid = $1")
        .bind(just_finished)
        .execute(&app.pool)
        .await
        .unwrap();
    let callback_pending = succeeded(&app, Uuid::new_v4()).await;
    sqlx::query(
        "INSERT INTO callbacks (staging_guid, url, payload) VALUES ($1, 'http://127.0.0.1:9/cb', '{}')",
    )
    .bind(callback_pending)
    .execute(&app.pool)
    .await
    .unwrap();

    let (status, body) = put_references(&app, "", json!({ "staging_guids": [listed] })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        unreferenced(&app).await,
        vec![settled],
        "only the settled, unlisted staging"
    );
}
