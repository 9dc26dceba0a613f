//! The cloud metadata service is never reached: not as an image source, not through a
//! redirect or a token realm, not as a callback. The test runs in a private network namespace
//! where 169.254.169.254 and fd00:ec2::254 are bound to targets that count connections, so no
//! traffic to those addresses can leave the machine (a CI host may have a real one).

use std::time::Duration;

use serde_json::json;
use testkit::hostile_registry::{HostileRegistry, Misbehaviour, Rule};
use testkit::image::{ImageSpec, ManifestFormat};
use testkit::netns;
use testkit::tcp_target::TcpTarget;
use uuid::Uuid;

use crate::helpers::{AppOptions, spawn};

#[test]
fn metadata_addresses_are_refused_in_every_role_and_never_connected_to() {
    netns::run_isolated_async(|| async {
        let v4 = TcpTarget::bind(format!("{}:80", netns::METADATA_V4).parse().unwrap());
        let v6 = TcpTarget::bind(format!("[{}]:80", netns::METADATA_V6).parse().unwrap());
        let hostile = HostileRegistry::start();
        let realm = HostileRegistry::start();
        let image = ImageSpec::seeded(ManifestFormat::Docker, 6900, 1, 64 * 1024).build();
        for repository in ["meta/blob", "meta/manifest"] {
            hostile.add_image(repository, "v1", &image);
        }
        hostile.add_rule(Rule::new(
            &format!("/v2/meta/blob/blobs/{}", image.layers[0].digest),
            Misbehaviour::Redirect {
                status: 307,
                location: "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
                    .into(),
            },
        ));
        hostile.add_rule(Rule::new(
            "/v2/meta/manifest/manifests/",
            Misbehaviour::Redirect {
                status: 302,
                location: "http://[fd00:ec2::254]/latest/api/token".into(),
            },
        ));
        realm.add_image("meta/realm", "v1", &image);
        realm.require_token(Some("http://169.254.169.254/latest/meta-data/".into()));

        let app = spawn(AppOptions {
            workers: 2,
            also_insecure: vec![hostile.host(), realm.host()],
            database: Some(testkit::TestDatabase::private().await),
            ..AppOptions::default()
        })
        .await;

        // Refused at once: a source or a callback on a metadata address.
        for (field, value) in [
            ("image", "169.254.169.254/latest/meta:1".to_owned()),
            ("image", "[fd00:ec2::254]:80/latest/meta:1".to_owned()),
            (
                "completion_callback",
                "http://169.254.169.254/latest/meta-data/".to_owned(),
            ),
            (
                "completion_callback",
                "http://[fd00:ec2::254]/latest/meta-data/".to_owned(),
            ),
            (
                "completion_callback",
                "http://[::ffff:169.254.169.254]/".to_owned(),
            ),
        ] {
            let mut body = json!({
                "app_guid": Uuid::new_v4(),
                "image": format!("{}/meta/blob:v1", hostile.host()),
            });
            body[field] = json!(value);
            let (status, answer) = app.stage(body).await;
            assert_eq!(
                (status, answer["code"].as_str()),
                (422, Some("EGRESS_DENIED")),
                "{field}={value}: {answer}"
            );
        }
        // Refused when the upstream points there: a blob or manifest redirect, a token realm.
        for image in [
            format!("{}/meta/blob:v1", hostile.host()),
            format!("{}/meta/manifest:v1", hostile.host()),
            format!("{}/meta/realm:v1", realm.host()),
        ] {
            let (status, body) = app
                .stage(json!({ "app_guid": Uuid::new_v4(), "image": image }))
                .await;
            assert_eq!(status, 202, "{body}");
            let done = app
                .wait_finished(body["staging_guid"].as_str().unwrap())
                .await;
            assert_eq!(done["error"]["code"], "EGRESS_DENIED", "{image}: {done}");
        }
        assert_eq!(
            (v4.accepted(), v6.accepted()),
            (0, 0),
            "no connection reached a metadata address"
        );

        // The targets are reachable in this namespace: a deliberate connection is counted.
        reqwest::get(format!("http://{}/", netns::METADATA_V4))
            .await
            .unwrap();
        assert!(v4.wait_for_connections(1, Duration::from_secs(10)).await);
    });
}
