//! Targeted and layered deployments with real MQTT devices: priority and newest-wins,
//! layered merge, devices entering and leaving a target, the three onUnmatch policies,
//! status from reported lastDesiredStatus with custom metrics, `$edgeHub` content
//! reconfiguring the hub's routes, bad input refused whole, phased rollouts that advance and
//! that stop and roll back, and all of it across `kill -9`.

use std::time::{Duration, Instant};

use reqwest::Method;
use rumqttc::QoS;
use serde_json::{json, Value};

use crate::harness::{cli, json_of, Client, Hub};

const DESIRED: &str = "$iothub/twin/PATCH/properties/desired/";

async fn tag(hub: &Hub, device: &str, tags: Value) {
    let (s, b) = hub
        .api(
            Method::PATCH,
            &format!("/twins/{device}"),
            Some(json!({ "tags": tags })),
        )
        .await;
    assert_eq!(s, 200, "{b}");
}

async fn desired(hub: &Hub, device: &str) -> Value {
    let (_, t) = hub
        .api(Method::GET, &format!("/twins/{device}"), None)
        .await;
    t["properties"]["desired"].clone()
}

async fn create(hub: &Hub, body: Value) -> Value {
    let (s, b) = hub.api(Method::POST, "/deployments", Some(body)).await;
    assert_eq!(s, 201, "{b}");
    b
}

fn device_content(props: Value) -> Value {
    let mut m = serde_json::Map::new();
    for (k, v) in props.as_object().unwrap() {
        m.insert(format!("properties.desired.{k}"), v.clone());
    }
    json!({ "content": { "deviceContent": m } })
}

#[tokio::test]
async fn priority_layering_targets_and_unmatch_policies() {
    let mut hub = Hub::start("deploy-targeted").await;
    let k1 = hub.create_device("d1").await;
    for d in ["d2", "d3"] {
        hub.create_device(d).await;
    }
    tag(&hub, "d1", json!({ "env": "prod" })).await;
    tag(&hub, "d2", json!({ "env": "prod" })).await;
    tag(&hub, "d3", json!({ "env": "dev" })).await;
    let mut c1 = hub.device("d1", &k1).await;
    c1.subscribe_many(&["$iothub/twin/PATCH/properties/desired/#"])
        .await;

    // Equal priority: the newest wins, and the older is not merged in.
    create(
        &hub,
        json!({
            "id": "base-a", "targetCondition": "tags.env = 'prod'", "priority": 10,
            "content": device_content(json!({ "fw": { "version": "1.0", "channel": "stable" } })),
        }),
    )
    .await;
    create(
        &hub,
        json!({
            "id": "base-b", "targetCondition": "tags.env = 'prod'", "priority": 10,
            "content": device_content(json!({ "fw": { "version": "2.0" } })),
        }),
    )
    .await;
    // Lower priority: neither applied nor merged.
    create(
        &hub,
        json!({
            "id": "base-low", "targetCondition": "tags.env = 'prod'", "priority": 5,
            "content": device_content(json!({ "lowOnly": 1 })),
        }),
    )
    .await;
    let d = desired(&hub, "d1").await;
    assert_eq!(d["fw"], json!({ "version": "2.0" }), "{d}");
    assert!(d.get("lowOnly").is_none(), "{d}");
    // The device was told: its last desired patch carries the winner.
    let mut last = Value::Null;
    while let Some(p) = c1
        .next_publish_on(DESIRED, Duration::from_millis(300))
        .await
    {
        last = json_of(&p);
    }
    assert_eq!(last["fw"]["version"], "2.0", "{last}");

    // A layered deployment adds a path on top of the base.
    create(&hub, json!({
        "id": "layer-beta", "targetCondition": "tags.env = 'prod'", "priority": 1, "layered": true,
        "content": device_content(json!({ "fw.channel": "beta" })),
    }))
    .await;
    assert_eq!(
        desired(&hub, "d1").await["fw"],
        json!({ "version": "2.0", "channel": "beta" })
    );

    // Entering a target (tags change), and leaving it: fallback to the next best.
    create(
        &hub,
        json!({
            "id": "dev-default", "targetCondition": "tags.env = 'dev'", "priority": 1,
            "content": device_content(json!({ "fw": { "version": "0.1" } })),
        }),
    )
    .await;
    assert_eq!(desired(&hub, "d3").await["fw"]["version"], "0.1");
    tag(&hub, "d3", json!({ "env": "prod" })).await;
    assert_eq!(
        desired(&hub, "d3").await["fw"],
        json!({ "version": "2.0", "channel": "beta" })
    );
    tag(&hub, "d3", json!({ "env": "dev" })).await;
    assert_eq!(desired(&hub, "d3").await["fw"], json!({ "version": "0.1" }));

    // keep: a device that leaves keeps the content.
    create(&hub, json!({
        "id": "keeper", "targetCondition": "tags.ring = 'canary'", "priority": 50, "onUnmatch": "keep",
        "content": device_content(json!({ "fw": { "version": "3.0" } })),
    }))
    .await;
    tag(&hub, "d2", json!({ "ring": "canary" })).await;
    assert_eq!(desired(&hub, "d2").await["fw"]["version"], "3.0");
    tag(&hub, "d2", json!({ "ring": null })).await;
    assert_eq!(desired(&hub, "d2").await["fw"]["version"], "3.0", "kept");

    // remove: the content goes and lower-ranked deployments do not take over.
    create(&hub, json!({
        "id": "remover", "targetCondition": "tags.ring = 'test'", "priority": 60, "onUnmatch": "remove",
        "content": device_content(json!({ "fw": { "version": "4.0" } })),
    }))
    .await;
    tag(&hub, "d1", json!({ "ring": "test" })).await;
    assert_eq!(
        desired(&hub, "d1").await["fw"],
        json!({ "version": "4.0", "channel": "beta" })
    );
    tag(&hub, "d1", json!({ "ring": null })).await;
    assert_eq!(
        desired(&hub, "d1").await["fw"],
        json!({ "channel": "beta" }),
        "removed, base-b not back, the layer still there"
    );

    // Bad input is refused whole, with the reason; nothing is created.
    for (body, needle) in [
        (
            json!({ "id": "bad1", "targetCondition": "tags.env = ", "content": device_content(json!({"x": 1})) }),
            "column",
        ),
        (
            json!({ "id": "bad2", "targetCondition": "*", "content": { "content": { "modulesContent": { "m": { "propertiesdesired": {} } } } } }),
            "content.modulesContent.m.propertiesdesired",
        ),
        (
            json!({ "id": "bad3", "targetCondition": "*", "content": { "content": { "modulesContent": { "$edgeHub": { "properties.desired.routes.r": "FROM /messages/* INTO" } } } } }),
            "$edgeHub",
        ),
        (
            json!({ "id": "Bad Id", "targetCondition": "*", "content": device_content(json!({"x": 1})) }),
            "lowercase",
        ),
        (
            json!({ "id": "bad5", "targetCondition": "*", "content": device_content(json!({"x": 1})), "rollout": { "phases": [10, 50], "successThreshold": 90, "failureThreshold": 10 } }),
            "end at 100",
        ),
    ] {
        let (s, b) = hub
            .api(Method::POST, "/deployments", Some(body.clone()))
            .await;
        assert_eq!(s, 400, "{body}: {b}");
        assert!(
            b["message"].as_str().unwrap().contains(needle),
            "{needle}: {b}"
        );
    }
    let (s, _) = hub.api(Method::GET, "/deployments/bad1", None).await;
    assert_eq!(s, 404);
    let (s, b) = hub
        .api(Method::POST, "/deployments", Some(json!({ "id": "base-a", "targetCondition": "*", "content": device_content(json!({"x": 1})) })))
        .await;
    assert_eq!(s, 409, "{b}");
    // Content is immutable; the rest can change.
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/deployments/base-b",
            Some(json!({ "content": {} })),
        )
        .await;
    assert_eq!(s, 400);
    assert!(b["message"].as_str().unwrap().contains("immutable"), "{b}");

    // Raised above everything, base-low wins: its content replaces the kept and the
    // removed deployments' (so fw goes from d2, and d1 keeps only the layer's part).
    let (ok, _, err) = cli(
        &hub,
        &["deployment", "update", "base-low", "--priority", "70"],
    );
    assert!(ok, "{err}");
    let d = desired(&hub, "d2").await;
    assert_eq!(d["lowOnly"], 1, "{d}");
    assert_eq!(
        d["fw"],
        json!({ "channel": "beta" }),
        "keeper's version gone: {d}"
    );
    let d = desired(&hub, "d1").await;
    assert_eq!(d["lowOnly"], 1, "{d}");
    assert_eq!(d["fw"], json!({ "channel": "beta" }), "{d}");

    // kill -9: deployments, their effect and the unmatch history all survive.
    drop(c1);
    hub.kill9();
    let hub = hub.restart().await;
    let (ok, out, err) = cli(&hub, &["deployment", "list", "--output", "json"]);
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 7);
    assert_eq!(
        desired(&hub, "d1").await["fw"],
        json!({ "channel": "beta" })
    );
    // Deleting the layer removes what it added, and nothing else.
    let (ok, _, err) = cli(&hub, &["deployment", "delete", "layer-beta"]);
    assert!(ok, "{err}");
    assert!(desired(&hub, "d1").await.get("fw").is_none());
    assert_eq!(desired(&hub, "d3").await["fw"], json!({ "version": "0.1" }));
}

/// A device that applies desired changes and reports like an IoT Edge agent: code 200, or
/// 500 when `fail` is set.
pub(crate) fn reporter(mut c: Client, fail: bool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        c.subscribe_many(&[
            "$iothub/twin/PATCH/properties/desired/#",
            "$iothub/twin/res/#",
        ])
        .await;
        // What was there before it subscribed.
        let mut rid = 1;
        let _ = c
            .client
            .publish(
                "$iothub/twin/GET/?$rid=0",
                QoS::AtLeastOnce,
                false,
                Vec::new(),
            )
            .await;
        loop {
            let Some(p) = c.next_publish(Duration::from_secs(60)).await else {
                return;
            };
            let version = if let Some(q) = p.topic.strip_prefix(DESIRED) {
                q.split("$version=")
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            } else if p.topic.starts_with("$iothub/twin/res/200/?$rid=0") {
                json_of(&p)["desired"]["$version"].as_u64()
            } else {
                None
            };
            let Some(v) = version.filter(|v| *v > 0) else {
                continue;
            };
            rid += 1;
            let report = json!({
                "lastDesiredVersion": v,
                "lastDesiredStatus": { "code": if fail { 500 } else { 200 } },
            });
            let _ = c
                .client
                .publish(
                    format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
                    QoS::AtLeastOnce,
                    false,
                    report.to_string(),
                )
                .await;
        }
    })
}

pub(crate) async fn wait_for(hub: &Hub, id: &str, what: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, d) = hub
            .api(Method::GET, &format!("/deployments/{id}"), None)
            .await;
        if what(&d) {
            return d;
        }
        assert!(Instant::now() < deadline, "timed out: {d}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn status_metrics_and_phased_rollouts() {
    let mut hub = Hub::start("deploy-rollout").await;
    let mut reporters = Vec::new();
    for i in 0..10 {
        let id = format!("r{i}");
        let key = hub.create_device(&id).await;
        tag(&hub, &id, json!({ "fleet": "x", "n": i })).await;
        reporters.push((id.clone(), key));
    }
    let mut tasks = Vec::new();
    for (id, key) in &reporters {
        // r9 reports failure for everything.
        tasks.push(reporter(hub.device(id, key).await, id == "r9"));
    }

    // Status with custom metrics: 10 targeted and applied, 9 success, 1 failure.
    let metrics = hub.data_dir().join("metrics.json");
    std::fs::write(
        &metrics,
        json!({ "queries": { "evens": "SELECT deviceId FROM devices WHERE tags.n % 2 = 0" } })
            .to_string(),
    )
    .unwrap();
    let content = hub.data_dir().join("v1.json");
    std::fs::write(
        &content,
        device_content(json!({ "app": { "version": "1" } })).to_string(),
    )
    .unwrap();
    let (ok, out, err) = cli(
        &hub,
        &[
            "deployment",
            "create",
            "app-v1",
            "--content",
            content.to_str().unwrap(),
            "--target-condition",
            "tags.fleet = 'x'",
            "--priority",
            "1",
            "--metrics",
            metrics.to_str().unwrap(),
            "--labels",
            "{\"team\": \"a\"}",
            "--output",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["labels"]["team"], "a");
    let d = wait_for(&hub, "app-v1", |d| {
        d["systemMetrics"]["reportedSuccessfulCount"] == 9
            && d["systemMetrics"]["reportedFailedCount"] == 1
    })
    .await;
    assert_eq!(d["systemMetrics"]["targetedCount"], 10);
    assert_eq!(d["systemMetrics"]["appliedCount"], 10);
    assert_eq!(d["customMetrics"]["evens"], 5);
    let (ok, out, err) = cli(
        &hub,
        &[
            "deployment",
            "show-metric",
            "app-v1",
            "reportedFailedCount",
            "--output",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let m: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(m["deviceIds"], json!(["r9"]));
    let (_, m) = hub
        .api(Method::GET, "/deployments/app-v1/metrics/evens", None)
        .await;
    assert_eq!(m["deviceIds"], json!(["r0", "r2", "r4", "r6", "r8"]));

    // A rollout over the nine healthy devices advances phase by phase to all of them.
    let rollout = json!({ "phases": [10, 50, 100], "successThreshold": 100, "failureThreshold": 20, "observeSecs": 0 });
    create(&hub, json!({
        "id": "app-v2", "targetCondition": "tags.fleet = 'x' AND deviceId != 'r9'", "priority": 2,
        "content": device_content(json!({ "app": { "version": "2" } })), "rollout": rollout,
    }))
    .await;
    let d = wait_for(&hub, "app-v2", |d| {
        d["rolloutState"]["status"] == "completed"
    })
    .await;
    assert_eq!(d["systemMetrics"]["appliedCount"], 9, "{d}");
    for i in 0..9 {
        assert_eq!(desired(&hub, &format!("r{i}")).await["app"]["version"], "2");
    }
    // A rollout of v3 over all ten, one canary first.
    create(&hub, json!({
        "id": "app-v3", "targetCondition": "tags.fleet = 'x'", "priority": 3,
        "content": device_content(json!({ "app": { "version": "3" } })),
        "rollout": { "phases": [10, 100], "successThreshold": 100, "failureThreshold": 10, "observeSecs": 30 },
    }))
    .await;
    // The canary is the first device in hash order (a rerun picks the same one). If it is
    // r9 it reports failure and the rollout stops itself; otherwise it is aborted by hand
    // while the phase is observed. Either way the canary goes back.
    let (_, v3) = hub.api(Method::GET, "/deployments/app-v3", None).await;
    let canary = v3["rolloutState"]["phaseMembers"][0]
        .as_str()
        .unwrap()
        .to_string();
    let ordered = {
        let mut ids: Vec<String> = (0..10).map(|i| format!("r{i}")).collect();
        ids.sort_by_key(|id| {
            let h = <sha2::Sha256 as sha2::Digest>::digest(id.as_bytes());
            (u64::from_be_bytes(h[..8].try_into().unwrap()), id.clone())
        });
        ids
    };
    assert_eq!(
        canary, ordered[0],
        "phase 1 is the first device in hash order"
    );
    if canary != "r9" {
        // A healthy canary reports success, so this rollout would advance; abort by hand
        // instead, which must roll the canary back the same way.
        let (ok, _, err) = cli(&hub, &["deployment", "abort", "app-v3"]);
        assert!(ok, "{err}");
    }
    let d = wait_for(&hub, "app-v3", |d| d["rolloutState"]["status"] == "aborted").await;
    assert!(d["rolloutState"]["reason"].is_string(), "{d}");
    for i in 0..10 {
        let id = format!("r{i}");
        let want = if id == "r9" { "1" } else { "2" };
        assert_eq!(
            desired(&hub, &id).await["app"]["version"],
            want,
            "{id} went back"
        );
    }

    // A rollout that auto-stops on failures: only r9 is targeted, and it fails.
    create(&hub, json!({
        "id": "app-v4", "targetCondition": "deviceId = 'r9'", "priority": 4,
        "content": device_content(json!({ "app": { "version": "4" } })),
        "rollout": { "phases": [100], "successThreshold": 100, "failureThreshold": 50, "observeSecs": 0 },
    }))
    .await;
    let d = wait_for(&hub, "app-v4", |d| d["rolloutState"]["status"] == "aborted").await;
    assert!(
        d["rolloutState"]["reason"]
            .as_str()
            .unwrap()
            .contains("reported failure"),
        "{d}"
    );
    assert_eq!(
        desired(&hub, "r9").await["app"]["version"],
        "1",
        "r9 rolled back"
    );

    // Pause and resume.
    create(&hub, json!({
        "id": "app-v5", "targetCondition": "tags.fleet = 'x' AND deviceId != 'r9'", "priority": 5,
        "content": device_content(json!({ "app": { "version": "5" } })),
        "rollout": { "phases": [50, 100], "successThreshold": 100, "failureThreshold": 50, "observeSecs": 2 },
    }))
    .await;
    let (ok, out, err) = cli(&hub, &["deployment", "pause", "app-v5"]);
    assert!(ok, "{err}");
    assert!(out.contains("paused"), "{out}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, d) = hub.api(Method::GET, "/deployments/app-v5", None).await;
    assert_eq!(d["rolloutState"]["phase"], 0, "paused: no advance {d}");
    let (ok, _, err) = cli(&hub, &["deployment", "resume", "app-v5"]);
    assert!(ok, "{err}");
    wait_for(&hub, "app-v5", |d| {
        d["rolloutState"]["status"] == "completed"
    })
    .await;
    for t in tasks {
        t.abort();
    }

    // Rollout state survives kill -9: the stopped one stays stopped, with its reason, and
    // its devices stay rolled back.
    hub.kill9();
    let hub = hub.restart().await;
    let (_, v4) = hub.api(Method::GET, "/deployments/app-v4", None).await;
    assert_eq!(v4["rolloutState"]["status"], "aborted", "{v4}");
    assert!(v4["rolloutState"]["reason"]
        .as_str()
        .unwrap()
        .contains("reported failure"));
    let (_, v2) = hub.api(Method::GET, "/deployments/app-v2", None).await;
    assert_eq!(v2["rolloutState"]["status"], "completed");
    assert_eq!(desired(&hub, "r9").await["app"]["version"], "1");
    assert_eq!(desired(&hub, "r0").await["app"]["version"], "5");
}

#[tokio::test]
async fn edge_hub_content_reconfigures_the_hubs_routes() {
    let hub = Hub::start("deploy-edgehub").await;
    hub.create_module("fleethub", "sink").await;
    create(&hub, json!({
        "id": "hub-routes", "targetCondition": "deviceId = 'fleethub'",
        "content": { "content": { "modulesContent": { "$edgeHub": {
            "properties.desired.routes.toSink": "FROM /messages/* WHERE $body.t > 1 INTO BrokeredEndpoint(\"/modules/sink/inputs/in\")"
        } } } },
    }))
    .await;
    let (_, routes) = hub.api(Method::GET, "/routes", None).await;
    let names: Vec<&str> = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(names.contains(&"toSink"), "{routes}");
}

/// The `$edgeHub` route rule is one rule for every writer: a deployment whose content would
/// leave an invalid route set is refused with the same answer the twin API gives for the same
/// change, and neither the route table nor the twin moves.
#[tokio::test]
async fn an_invalid_route_set_in_a_deployment_is_refused_like_one_from_the_api() {
    let hub = Hub::start("deploy-bad-routes").await;
    hub.create_module("fleethub", "sink").await;
    let good = "FROM /messages/* INTO BrokeredEndpoint(\"/modules/sink/inputs/in\")";
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/twins/fleethub/modules/$edgeHub",
            Some(json!({ "properties": { "desired": { "routes": { "good": good } } } })),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let before_twin = desired(&hub, "fleethub/modules/$edgeHub").await;
    let (_, before_routes) = hub.api(Method::GET, "/routes", None).await;

    let bad_routes =
        json!({ "good": good, "bad": "FROM /messages/* WHERE $body.t > INTO $upstream" });
    let (api_status, from_api) = hub
        .api(
            Method::PATCH,
            "/twins/fleethub/modules/$edgeHub",
            Some(json!({ "properties": { "desired": { "routes": bad_routes } } })),
        )
        .await;
    let (deploy_status, from_deployment) = hub
        .api(
            Method::POST,
            "/deployments",
            Some(json!({
                "id": "bad-routes", "targetCondition": "deviceId = 'fleethub'",
                "content": { "content": { "modulesContent": { "$edgeHub": {
                    "properties.desired.routes": bad_routes
                } } } },
            })),
        )
        .await;
    assert_eq!(api_status, 400, "{from_api}");
    assert_eq!(deploy_status, 400, "{from_deployment}");
    assert_eq!(from_deployment["error"], from_api["error"]);
    assert_eq!(from_deployment["message"], from_api["message"]);
    assert_eq!(
        from_deployment["errors"], from_api["errors"],
        "the same list of errors"
    );
    let errors = from_deployment["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{from_deployment}");
    assert_eq!(errors[0]["name"], "bad");
    assert_eq!(errors[0]["source"], "$edgeHub");
    assert!(errors[0]["column"].as_u64().is_some(), "{from_deployment}");

    // Nothing moved: no deployment, the same twin, the same routes.
    let (s, _) = hub.api(Method::GET, "/deployments/bad-routes", None).await;
    assert_eq!(s, 404);
    assert_eq!(
        desired(&hub, "fleethub/modules/$edgeHub").await,
        before_twin
    );
    let (_, after_routes) = hub.api(Method::GET, "/routes", None).await;
    assert_eq!(after_routes["routes"], before_routes["routes"]);
}

/// `device create --edge` makes the device's `$edgeAgent` and `$edgeHub` module identities as
/// IoT Hub does, so a module-content deployment (here in the bare `{"modulesContent": …}`
/// form) reaches a brand-new edge device and its agent reports status with no manual step.
#[tokio::test]
async fn a_new_edge_device_receives_module_content_and_reports_it() {
    let hub = Hub::start("deploy-edge-device").await;
    let (ok, out, err) = cli(
        &hub,
        &["--output", "json", "device", "create", "gw1", "--edge"],
    );
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["capabilities"]["iotEdge"], true, "{created}");
    let (s, modules) = hub.api(Method::GET, "/devices/gw1/modules", None).await;
    assert_eq!(s, 200, "{modules}");
    let names: Vec<&str> = modules["items"]
        .as_array()
        .or(modules.as_array())
        .unwrap()
        .iter()
        .map(|m| m["moduleId"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["$edgeAgent", "$edgeHub"], "{modules}");
    // A plain device gets no modules.
    hub.create_device("plain").await;
    let (_, plain) = hub.api(Method::GET, "/devices/plain/modules", None).await;
    assert_eq!(
        plain["items"]
            .as_array()
            .or(plain.as_array())
            .unwrap()
            .len(),
        0
    );
    tag(&hub, "gw1", json!({ "edge": true })).await;

    let content = hub.data_dir().join("edge.json");
    std::fs::write(
        &content,
        json!({ "modulesContent": {
            "$edgeAgent": { "properties.desired": {
                "schemaVersion": "1.1",
                "modules": { "sim": { "type": "docker", "settings": { "image": "sim:1" } } }
            } },
            "$edgeHub": { "properties.desired": {
                "schemaVersion": "1.1",
                "routes": { "up": "FROM /messages/* INTO $upstream" }
            } }
        } })
        .to_string(),
    )
    .unwrap();
    let (ok, _, err) = cli(
        &hub,
        &[
            "deployment",
            "create",
            "edge-v1",
            "--content",
            content.to_str().unwrap(),
            "--target-condition",
            "tags.edge = true",
            "--priority",
            "1",
        ],
    );
    assert!(ok, "{err}");
    // The agent connects with its own module identity, as IoT Edge's agent does, gets its
    // desired modules and reports how applying them went.
    let (_, agent) = hub
        .api(Method::GET, "/devices/gw1/modules/$edgeAgent", None)
        .await;
    let key = agent["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    let task = reporter(hub.device("gw1/$edgeAgent", &key).await, false);
    let d = wait_for(&hub, "edge-v1", |d| {
        d["systemMetrics"]["reportedSuccessfulCount"] == 1
    })
    .await;
    assert_eq!(d["systemMetrics"]["targetedCount"], 1, "{d}");
    let (_, twin) = hub
        .api(Method::GET, "/twins/gw1/modules/$edgeHub", None)
        .await;
    assert_eq!(
        twin["properties"]["desired"]["routes"]["up"],
        "FROM /messages/* INTO $upstream"
    );
    task.abort();
}

/// A deployment to more devices than one chunk of the reconcile's writes (1,024): every
/// device's twin gets it, and the status counts them all.
#[tokio::test]
async fn a_deployment_larger_than_one_write_chunk_reaches_every_device() {
    let hub = Hub::start("deploy-chunks").await;
    let ids: Vec<String> = (0..2_100).map(|i| format!("c-{i:04}")).collect();
    for chunk in ids.chunks(50) {
        let calls = chunk
            .iter()
            .map(|id| hub.api(Method::POST, "/devices", Some(json!({ "deviceId": id }))));
        for (status, body) in futures_util::future::join_all(calls).await {
            assert_eq!(status, 201, "{body}");
        }
    }
    let mut body = device_content(json!({ "firmware": { "version": "9" } }));
    body["id"] = json!("all");
    body["targetCondition"] = json!("STARTS_WITH(deviceId, 'c-')");
    body["priority"] = json!(1);
    let created = create(&hub, body).await;
    assert_eq!(created["twinsWritten"], 2_100, "{created}");
    for id in ["c-0000", "c-1023", "c-1024", "c-2047", "c-2048", "c-2099"] {
        assert_eq!(desired(&hub, id).await["firmware"]["version"], "9", "{id}");
    }
    let (_, d) = hub.api(Method::GET, "/deployments/all", None).await;
    assert_eq!(d["systemMetrics"]["targetedCount"], 2_100, "{d}");
    assert_eq!(d["systemMetrics"]["appliedCount"], 2_100, "{d}");
}
