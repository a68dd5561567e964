//! Group deployments with real MQTT devices: a group's image set arrives in each device's
//! desired `groupDeployment`, application images only where the group takes application
//! updates, `name:latest` following new versions, a new deployment replacing the old (with
//! history), a device moved to another group carrying only the new group's images, bad image
//! references refused with nothing applied, and all of it surviving `kill -9`.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::{cli, json_of, Client, Hub};

const DESIRED: &str = "$iothub/twin/PATCH/properties/desired/";

pub(crate) async fn upload(hub: &Hub, name: &str, version: &str, kind: &str, body: &str) -> String {
    let resp = reqwest::Client::new()
        .post(hub.api_url(&format!(
            "/images?name={name}&version={version}&kind={kind}"
        )))
        .bearer_auth(&hub.token)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let v: Value = resp.json().await.unwrap();
    v["id"].as_str().unwrap().to_string()
}

/// `name:version` of each image in a `groupDeployment` value.
pub(crate) fn images(v: &Value) -> Vec<String> {
    v["images"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    format!(
                        "{}:{}",
                        i["name"].as_str().unwrap(),
                        i["version"].as_str().unwrap()
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) async fn next_desired(d: &mut Client) -> Value {
    let p = d
        .next_publish_on(DESIRED, Duration::from_secs(5))
        .await
        .expect("a desired patch");
    json_of(&p)
}

async fn twin_state(hub: &Hub, device: &str) -> Value {
    let (_, t) = hub
        .api(Method::GET, &format!("/twins/{device}"), None)
        .await;
    t["properties"]["desired"]["groupDeployment"].clone()
}

#[tokio::test]
async fn group_deployments_reach_devices_follow_latest_and_move_with_them() {
    let mut hub = Hub::start("deploy-group").await;
    hub.api(Method::POST, "/products", Some(json!({ "name": "Coffee" })))
        .await;
    let app1 = upload(&hub, "brew", "1.0.0", "application", "brew one").await;
    upload(&hub, "board", "2.0.0", "board-config", "board two").await;
    let k1 = hub.create_device("c1").await;
    let k2 = hub.create_device("c2").await;
    for line in [
        "device update c1 --device-group 'Coffee/Field Test'",
        "device update c2 --device-group Coffee/Development",
    ] {
        let (ok, _, err) = hub.fleethub(line);
        assert!(ok, "{line}: {err}");
    }
    let mut c1 = hub.device("c1", &k1).await;
    let mut c2 = hub.device("c2", &k2).await;
    c1.subscribe_many(&["$iothub/twin/PATCH/properties/desired/#"])
        .await;
    c2.subscribe_many(&["$iothub/twin/PATCH/properties/desired/#"])
        .await;

    // Field Test follows brew:latest; Development has application updates off.
    let (ok, out, err) = cli(
        &hub,
        &[
            "device-group",
            "deployment",
            "create",
            "Coffee/Field Test",
            "--images",
            "brew:latest",
            "board:2.0.0",
            "--output",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let dep: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(dep["devicesUpdated"], 1);
    let patch = next_desired(&mut c1).await;
    assert_eq!(
        images(&patch["groupDeployment"]),
        ["board:2.0.0", "brew:1.0.0"]
    );
    assert_eq!(patch["groupDeployment"]["deviceGroup"], "Coffee/Field Test");
    assert_eq!(patch["groupDeployment"]["images"][1]["id"], app1.as_str());

    let (s, b) = hub
        .api(
            Method::POST,
            "/products/Coffee/groups/Development/deployments",
            Some(json!({ "images": ["brew:latest", "board:latest"] })),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let patch = next_desired(&mut c2).await;
    assert_eq!(
        images(&patch["groupDeployment"]),
        ["board:2.0.0"],
        "Development takes no application images"
    );

    // A new version of a followed image reaches Field Test, not Development.
    upload(&hub, "brew", "1.1.0", "application", "brew one one").await;
    let patch = next_desired(&mut c1).await;
    assert_eq!(
        images(&patch["groupDeployment"]),
        ["board:2.0.0", "brew:1.1.0"]
    );
    assert!(c2
        .next_publish_on(DESIRED, Duration::from_millis(500))
        .await
        .is_none());

    // Bad references are refused and nothing changes.
    let (s, b) = hub
        .api(
            Method::POST,
            "/products/Coffee/groups/Field%20Test/deployments",
            Some(json!({ "images": ["brew:latest", "nope:1.0.0"] })),
        )
        .await;
    assert_eq!(s, 404, "{b}");
    assert!(b["message"].as_str().unwrap().contains("nope:1.0.0"), "{b}");
    let (s, _) = hub
        .api(
            Method::POST,
            "/products/Coffee/groups/Field%20Test/deployments",
            Some(json!({ "images": [] })),
        )
        .await;
    assert_eq!(s, 400);
    assert!(c1
        .next_publish_on(DESIRED, Duration::from_millis(300))
        .await
        .is_none());

    // A new deployment replaces the current one; history keeps both.
    let (ok, _, err) = cli(
        &hub,
        &[
            "device-group",
            "deployment",
            "create",
            "Coffee/Field Test",
            "--images",
            "brew:1.0.0",
        ],
    );
    assert!(ok, "{err}");
    let patch = next_desired(&mut c1).await;
    assert_eq!(images(&patch["groupDeployment"]), ["brew:1.0.0"]);
    let (ok, out, err) = cli(
        &hub,
        &[
            "device-group",
            "deployment",
            "list",
            "Coffee/Field Test",
            "--output",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let history: Value = serde_json::from_str(&out).unwrap();
    let items = history["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["current"], true);
    assert_eq!(
        items[1]["images"],
        json!(["brew:latest", items[1]["images"][1].clone()])
    );

    // Moving a device: it carries only the new group's images (Production has none: the
    // property goes away; Development: board configurations only).
    let (ok, _, err) = cli(
        &hub,
        &[
            "device",
            "update",
            "c1",
            "--device-group",
            "Coffee/Production",
        ],
    );
    assert!(ok, "{err}");
    let patch = next_desired(&mut c1).await;
    assert_eq!(patch["groupDeployment"], Value::Null, "{patch}");
    assert_eq!(twin_state(&hub, "c1").await, Value::Null);
    let (ok, _, err) = cli(
        &hub,
        &[
            "device",
            "update",
            "c1",
            "--device-group",
            "Coffee/Development",
        ],
    );
    assert!(ok, "{err}");
    let patch = next_desired(&mut c1).await;
    assert_eq!(images(&patch["groupDeployment"]), ["board:2.0.0"]);

    // Turning application updates on for Development brings its application images.
    let (s, _) = hub
        .api(
            Method::PATCH,
            "/products/Coffee/groups/Development",
            Some(json!({ "applicationUpdates": true })),
        )
        .await;
    assert_eq!(s, 200);
    let patch = next_desired(&mut c1).await;
    assert_eq!(
        images(&patch["groupDeployment"]),
        ["board:2.0.0", "brew:1.1.0"]
    );

    // Versions move only when content changes: re-creating the same state writes nothing.
    let (_, before) = hub.api(Method::GET, "/twins/c2", None).await;
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/products/Coffee/groups/Development",
            Some(json!({ "description": "only the description" })),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (_, after) = hub.api(Method::GET, "/twins/c2", None).await;
    assert_eq!(
        before["properties"]["desired"]["$version"],
        after["properties"]["desired"]["$version"]
    );

    // kill -9: the state is in the twins, and a device connecting later gets it.
    drop(c1);
    drop(c2);
    hub.kill9();
    let hub = hub.restart().await;
    assert_eq!(
        images(&twin_state(&hub, "c2").await),
        ["board:2.0.0", "brew:1.1.0"]
    );
    let mut c2 = hub.device("c2", &k2).await;
    c2.subscribe_many(&["$iothub/twin/res/#"]).await;
    let r = c2
        .request("$iothub/twin/GET/?$rid=7", b"", "$iothub/twin/res/")
        .await;
    let twin = json_of(&r);
    assert_eq!(
        images(&twin["desired"]["groupDeployment"]),
        ["board:2.0.0", "brew:1.1.0"]
    );
}
