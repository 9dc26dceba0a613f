//! `GET /images?q=`: staged images found by their reference's words, digest, app and label
//! values; newest first in keyset pages; pruned and unfinished stagings never listed; a bad
//! query refused with INVALID_QUERY.

use serde_json::{Value, json};
use testkit::image::{ImageSpec, ManifestFormat};
use uuid::Uuid;

use crate::helpers::{TestApp, spawn_app};

async fn search(app: &TestApp, query: &str) -> (u16, Value) {
    let response = app
        .get_authed(&format!("/images?{query}"))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

fn guids(page: &Value) -> Vec<String> {
    page["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["staging_guid"].as_str().unwrap().to_owned())
        .collect()
}

/// Stages `repository:tag` (with `labels`) for `app_guid` and waits for its success.
async fn staged(app: &TestApp, app_guid: Uuid, reference: &str, seed: u64, labels: Value) -> Value {
    let image = ImageSpec::seeded(ManifestFormat::Oci, seed, 1, 4096)
        .with_container_config(json!({ "Labels": labels }))
        .build();
    app.hub.push(reference, &image).await;
    let (status, body) = app
        .stage(json!({ "app_guid": app_guid, "image": format!("{}/{reference}", app.hub.host()) }))
        .await;
    assert_eq!(status, 202, "{body}");
    let done = app
        .wait_finished(body["staging_guid"].as_str().unwrap())
        .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    done
}

#[tokio::test]
async fn staged_images_are_found_by_name_tag_digest_app_and_label() {
    let app = spawn_app().await;
    let (shop, blog) = (Uuid::new_v4(), Uuid::new_v4());
    let redis = staged(
        &app,
        shop,
        "library/redis:7.2",
        7000,
        json!({ "org.opencontainers.image.vendor": "Acme Storage", "team": "payments" }),
    )
    .await;
    let nginx = staged(
        &app,
        blog,
        "library/nginx:1.27",
        7001,
        json!({ "team": "web", "org.opencontainers.image.version": "4.5.6-beta7",
                "org.opencontainers.image.source": "https://github.com/nginx/nginx" }),
    )
    .await;
    let worker = staged(
        &app,
        shop,
        "shop/worker:v3",
        7002,
        json!({ "team": "payments" }),
    )
    .await;
    let guid = |staging: &Value| staging["staging_guid"].as_str().unwrap().to_owned();

    for (query, expected) in [
        ("q=redis", vec![guid(&redis)]),
        ("q=library", vec![guid(&nginx), guid(&redis)]),
        ("q=library/redis:7.2", vec![guid(&redis)]),
        ("q=nginx%201.27", vec![guid(&nginx)]),
        ("q=acme", vec![guid(&redis)]),
        ("q=4.5.6-beta7", vec![guid(&nginx)]),
        ("q=github.com/nginx", vec![guid(&nginx)]),
        ("q=payments", vec![guid(&worker), guid(&redis)]),
        ("q=payments%20worker", vec![guid(&worker)]),
        (&*format!("q={shop}"), vec![guid(&worker), guid(&redis)]),
        (
            &*format!(
                "q=sha256:{}",
                &nginx["result"]["source_digest"].as_str().unwrap()[7..19]
            ),
            vec![guid(&nginx)],
        ),
        ("q=postgres", vec![]),
    ] {
        let (status, page) = search(&app, query).await;
        assert_eq!(status, 200, "{query}: {page}");
        assert_eq!(guids(&page), expected, "{query}: {page}");
    }
    let (_, page) = search(&app, "q=acme").await;
    let found = &page["images"][0];
    assert_eq!(found["labels"]["team"], "payments");
    assert_eq!(found["app_guid"], shop.to_string());
    assert_eq!(found["source_digest"], redis["result"]["source_digest"]);
    assert_eq!(found["pinned_image"], redis["result"]["pinned_image"]);
    assert_eq!(page["next_cursor"], Value::Null);

    // Pages: newest first, each page after the last one's cursor, nothing skipped or repeated.
    let (_, first) = search(&app, "q=library%20OR%20shop&limit=2").await;
    assert!(guids(&first).is_empty(), "every word must match: {first}");
    let (_, first) = search(&app, &format!("q={shop}&limit=1")).await;
    assert_eq!(guids(&first), [guid(&worker)]);
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, second) = search(&app, &format!("q={shop}&limit=1&cursor={cursor}")).await;
    assert_eq!(guids(&second), [guid(&redis)]);
    assert_eq!(second["next_cursor"], Value::Null);

    // A pruned image is gone from search.
    sqlx::query(
        "UPDATE stagings SET pruned_at = now(), released_at = now() WHERE staging_guid = $1",
    )
    .bind(Uuid::parse_str(&guid(&redis)).unwrap())
    .execute(&app.pool)
    .await
    .unwrap();
    let (_, page) = search(&app, "q=redis").await;
    assert!(guids(&page).is_empty(), "{page}");
}

#[tokio::test]
async fn a_malformed_search_is_refused_with_its_reason() {
    let app = spawn_app().await;
    for query in [
        "",
        "q=",
        "q=%20%3A%2F",
        "q=a%20b%20c%20d%20e%20f%20g%20h%20i",
        "q=redis&limit=0",
        "q=redis&limit=101",
        "q=redis&limit=ten",
        "q=redis&cursor=yesterday",
        "q=redis&order=asc",
        "q=redis&q=nginx",
    ] {
        let (status, body) = search(&app, query).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("INVALID_QUERY")),
            "{query}: {body}"
        );
        assert!(!body["message"].as_str().unwrap().is_empty());
    }
    let (status, body) = search(&app, &format!("q={}", "a".repeat(300))).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("INVALID_QUERY"))
    );
    let unauthenticated = app.get("/images?q=redis").send().await.unwrap();
    assert_eq!(unauthenticated.status(), 401);
}
