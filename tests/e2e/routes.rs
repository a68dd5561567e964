//! Routing end to end: conditions on `$body` and properties to module inputs, module output
//! chaining, twin change notifications, `$upstream` to a parent fleethub, route sets refused
//! whole, and route changes under load that lose nothing.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::Method;
use rumqttc::QoS;
use serde_json::{json, Value};

use crate::harness::{cli, temp_dir, Client, Hub};

const EDGE_HUB_TWIN: &str = "/twins/fleethub/modules/$edgeHub";

async fn set_routes(hub: &Hub, routes: Value) -> (u16, Value) {
    hub.api(
        Method::PATCH,
        EDGE_HUB_TWIN,
        Some(json!({"properties": {"desired": {"schemaVersion": "1.1", "routes": routes}}})),
    )
    .await
}

fn bag_of(topic: &str, prefix: &str) -> fleethub_router::Message {
    let rest = topic
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{topic} under {prefix}"));
    fleethub_router::Message::from_bag(rest, bytes::Bytes::new()).unwrap()
}

#[tokio::test]
async fn telemetry_and_module_outputs_follow_conditions_to_module_inputs() {
    let hub = Hub::start("routes-pipeline").await;
    let sensor_key = hub.create_device("sensor1").await;
    let fk = hub.create_module("fleethub", "filter").await;
    let ak = hub.create_module("fleethub", "alerts").await;
    let (s, b) = set_routes(
        &hub,
        json!({
            "hot": "FROM /messages/* WHERE $connectionDeviceId = 'sensor1' AND $body.temperature > 30 INTO BrokeredEndpoint(\"/modules/filter/inputs/in1\")",
            "severe": {"route": "FROM /messages/* WHERE severity = 'high' INTO BrokeredEndpoint(\"/modules/alerts/inputs/high\")", "priority": 1},
            "chain": "FROM /messages/modules/filter/outputs/out1 INTO BrokeredEndpoint(\"/modules/alerts/inputs/fromFilter\")",
            "twin": "FROM /twinChangeNotifications WHERE $body.properties.reported.fw >= 2 INTO BrokeredEndpoint(\"/modules/alerts/inputs/twin\")"
        }),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let mut filter = hub.device("fleethub/filter", &fk).await;
    let mut alerts = hub.device("fleethub/alerts", &ak).await;
    filter
        .subscribe_many(&["devices/fleethub/modules/filter/inputs/#"])
        .await;
    alerts
        .subscribe_many(&["devices/fleethub/modules/alerts/inputs/#"])
        .await;
    let mut sensor = hub.device("sensor1", &sensor_key).await;
    let json_bag = "$.ct=application%2Fjson&$.ce=utf-8";

    // Hot reading: the body condition sends it to filter/in1 only.
    sensor
        .client
        .publish(
            format!("devices/sensor1/messages/events/{json_bag}&site=a"),
            QoS::AtLeastOnce,
            false,
            r#"{"temperature": 35}"#,
        )
        .await
        .unwrap();
    let p = filter
        .next_publish(Duration::from_secs(5))
        .await
        .expect("hot reading reaches filter");
    assert!(
        p.topic
            .starts_with("devices/fleethub/modules/filter/inputs/in1/"),
        "{}",
        p.topic
    );
    let m = bag_of(&p.topic, "devices/fleethub/modules/filter/inputs/in1/");
    assert_eq!(m.system.connection_device_id.as_deref(), Some("sensor1"));
    assert_eq!(m.system.content_type.as_deref(), Some("application/json"));
    assert_eq!(m.property("site"), Some("a"));
    assert_eq!(&p.payload[..], br#"{"temperature": 35}"#);
    assert!(alerts
        .next_publish(Duration::from_millis(300))
        .await
        .is_none());

    // Cool reading but high severity: alerts/high only.
    sensor
        .client
        .publish(
            format!("devices/sensor1/messages/events/{json_bag}&severity=high"),
            QoS::AtLeastOnce,
            false,
            r#"{"temperature": 20}"#,
        )
        .await
        .unwrap();
    let p = alerts
        .next_publish(Duration::from_secs(5))
        .await
        .expect("severe reading reaches alerts");
    assert!(p
        .topic
        .starts_with("devices/fleethub/modules/alerts/inputs/high/"));
    assert!(filter
        .next_publish(Duration::from_millis(300))
        .await
        .is_none());

    // Without a JSON content type, $body is undefined: no route to filter.
    sensor
        .client
        .publish(
            "devices/sensor1/messages/events/",
            QoS::AtLeastOnce,
            false,
            r#"{"temperature": 99}"#,
        )
        .await
        .unwrap();
    assert!(filter
        .next_publish(Duration::from_millis(500))
        .await
        .is_none());

    // Matched by two routes: one copy to each sink.
    sensor
        .client
        .publish(
            format!("devices/sensor1/messages/events/{json_bag}&severity=high"),
            QoS::AtLeastOnce,
            false,
            r#"{"temperature": 50}"#,
        )
        .await
        .unwrap();
    assert!(filter.next_publish(Duration::from_secs(5)).await.is_some());
    assert!(alerts.next_publish(Duration::from_secs(5)).await.is_some());
    assert!(
        filter
            .next_publish(Duration::from_millis(300))
            .await
            .is_none(),
        "once per route"
    );

    // The filter module's output is chained to alerts, with its ids and output name.
    filter.client.publish("devices/fleethub/modules/filter/messages/events/$.on=out1&$.ct=application%2Fjson&$.ce=utf-8", QoS::AtLeastOnce, false, r#"{"filtered": true}"#).await.unwrap();
    let p = alerts
        .next_publish(Duration::from_secs(5))
        .await
        .expect("filter output chained");
    let m = bag_of(
        &p.topic,
        "devices/fleethub/modules/alerts/inputs/fromFilter/",
    );
    assert_eq!(m.system.connection_module_id.as_deref(), Some("filter"));
    assert_eq!(m.system.output_name.as_deref(), Some("out1"));

    // Twin change notifications route on the reported patch.
    sensor.subscribe_many(&["$iothub/twin/res/#"]).await;
    sensor
        .request(
            "$iothub/twin/PATCH/properties/reported/?$rid=1",
            br#"{"fw": 2}"#,
            "$iothub/twin/res/",
        )
        .await;
    let p = alerts
        .next_publish(Duration::from_secs(5))
        .await
        .expect("twin change notification");
    assert!(p
        .topic
        .starts_with("devices/fleethub/modules/alerts/inputs/twin/"));
    let body: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(body["properties"]["reported"]["fw"], 2);

    assert_eq!(
        hub.metric("fleethub_route_matched_total{route=\"hot\"}")
            .await,
        2.0
    );
    assert!(
        hub.metric("fleethub_route_condition_errors_total{route=\"hot\"}")
            .await
            >= 1.0,
        "undefined $body counted"
    );
}

#[tokio::test]
async fn invalid_route_sets_are_refused_whole_and_the_old_table_stays() {
    let dir = temp_dir("routes-invalid");
    let config = dir.join("hub.toml");
    std::fs::write(&config, "[routes]\nfromConfig = \"FROM /messages/* INTO BrokeredEndpoint(\\\"/modules/sink/inputs/c\\\")\"\n").unwrap();
    let hub = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
    let sk = hub.create_module("fleethub", "sink").await;
    let dk = hub.create_device("d").await;
    let (s, _) = set_routes(
        &hub,
        json!({"good": "FROM /messages/* INTO BrokeredEndpoint(\"/modules/sink/inputs/t\")"}),
    )
    .await;
    assert_eq!(s, 200);
    let (_, table) = hub.api(Method::GET, "/routes", None).await;
    let sources: HashSet<(String, String)> = table["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["source"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        sources.contains(&("fromConfig".into(), "config".into()))
            && sources.contains(&("good".into(), "$edgeHub".into())),
        "{table}"
    );

    let (s, b) = set_routes(
        &hub,
        json!({
            "good": "FROM /messages/* INTO $upstream",
            "bad1": "FROM /messages/* WHERE a = INTO $upstream",
            "bad2": {"route": "FROM nowhere INTO $upstream", "priority": 3}
        }),
    )
    .await;
    assert_eq!(s, 400, "{b}");
    let names: Vec<&str> = b["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{b}");
    assert!(b["message"].as_str().unwrap().contains("column 28"), "{b}");
    let (_, after) = hub.api(Method::GET, "/routes", None).await;
    assert_eq!(after["routes"], table["routes"], "old table in force");
    let (_, twin) = hub.api(Method::GET, EDGE_HUB_TWIN, None).await;
    assert!(
        twin["properties"]["desired"]["routes"]
            .get("bad1")
            .is_none(),
        "the twin did not take the refused set"
    );

    // Still routing by the old table.
    let mut sink = hub.device("fleethub/sink", &sk).await;
    sink.subscribe_many(&["devices/fleethub/modules/sink/inputs/#"])
        .await;
    let d = hub.device("d", &dk).await;
    d.client
        .publish("devices/d/messages/events/", QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    let mut inputs = HashSet::new();
    for _ in 0..2 {
        let p = sink
            .next_publish(Duration::from_secs(5))
            .await
            .expect("routed by the old table");
        inputs.insert(p.topic.split('/').nth(5).unwrap().to_string());
    }
    assert_eq!(inputs, HashSet::from(["c".to_string(), "t".to_string()]));

    let (ok, _, err) = cli(
        &hub,
        &[
            "route",
            "check",
            "FROM /messages/* WHERE a = 1 INT0 $upstream",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("expected an operator or INTO at column 30"),
        "{err}"
    );
    let (ok, out, _) = cli(&hub, &["--output", "json", "route", "list"]);
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["routes"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn a_bad_config_route_stops_the_hub_from_starting_with_every_error() {
    let dir = temp_dir("routes-badconfig");
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        "[routes]\nr1 = \"FROM nope INTO $upstream\"\nr2 = \"FROM /* WHERE (x INTO $upstream\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleethub"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--mqtt",
            "127.0.0.1:0",
            "--mqtts",
            "off",
            "--api",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("route 'r1'") && err.contains("route 'r2'"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn route_changes_under_load_lose_nothing() {
    let hub = Hub::start("routes-live").await;
    let mk = hub.create_module("fleethub", "sink").await;
    let dk = hub.create_device("d").await;
    set_routes(
        &hub,
        json!({"v0": "FROM /messages/* INTO BrokeredEndpoint(\"/modules/sink/inputs/in\")"}),
    )
    .await;
    let mut sink = hub.device("fleethub/sink", &mk).await;
    sink.subscribe_many(&["devices/fleethub/modules/sink/inputs/#"])
        .await;
    let mut device = hub.device("d", &dk).await;

    const N: usize = 2000;
    let publisher = {
        let client = device.client.clone();
        tokio::spawn(async move {
            for i in 0..N {
                client
                    .publish(
                        format!("devices/d/messages/events/seq={i}"),
                        QoS::AtLeastOnce,
                        false,
                        i.to_string(),
                    )
                    .await
                    .unwrap();
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        })
    };
    // Replace the route set while messages flow: every set routes to the same input.
    for v in 1..=8 {
        let name = format!("v{v}");
        let (s, b) = set_routes(&hub, json!({ name: "FROM /messages/* INTO BrokeredEndpoint(\"/modules/sink/inputs/in\")", format!("v{}", v - 1): null })).await;
        assert_eq!(s, 200, "{b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publisher.await.unwrap();
    let mut seen = HashSet::new();
    while seen.len() < N {
        match sink.next_publish(Duration::from_secs(10)).await {
            Some(p) => {
                seen.insert(String::from_utf8_lossy(&p.payload).into_owned());
            }
            None => break,
        }
    }
    assert_eq!(
        seen.len(),
        N,
        "every message routed exactly through one route set"
    );
    assert!(
        device
            .next(Duration::from_millis(10))
            .await
            .is_none_or(|e| !matches!(e, crate::harness::Seen::Disconnected(_))),
        "the device stayed connected"
    );
    let (_, table) = hub.api(Method::GET, "/routes", None).await;
    assert_eq!(table["routes"][0]["name"], "v8");
    let _ = Client::connect;
}

#[tokio::test]
async fn nested_fleethub_forwards_upstream_with_original_ids() {
    // The parent: the child is a registered gateway device of it, and connects over TLS
    // trusting the parent's generated CA.
    let parent = Hub::start("routes-parent").await;
    let (s, rec) = parent
        .api(
            Method::POST,
            "/devices",
            Some(json!({"deviceId": "child", "capabilities": {"iotEdge": true}})),
        )
        .await;
    assert_eq!(s, 201);
    let child_key = rec["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    let mut monitor = parent.monitor().await;

    let dir = temp_dir("routes-child");
    let config = dir.join("child.toml");
    std::fs::write(
        &config,
        format!(
            "[hub]\nid = \"child\"\n[routes]\nup = \"FROM /messages/* INTO $upstream\"\n[upstream]\nenabled = true\naddress = \"{}\"\ntls = true\nca = \"{}\"\ndevice_key = \"{child_key}\"\nsas_hostname = \"localhost\"\n",
            parent.endpoints.mqtts.unwrap(),
            parent.data_dir().join("tls/ca.pem").display()
        ),
    )
    .unwrap();
    let child = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
    let leaf_key = child.create_device("leaf1").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while child.metric("fleethub_upstream_connected").await != 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "child never connected upstream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leaf = child.device("leaf1", &leaf_key).await;
    leaf.client
        .publish(
            "devices/leaf1/messages/events/$.ct=application%2Fjson&$.ce=utf-8&zone=7",
            QoS::AtLeastOnce,
            false,
            r#"{"t": 1}"#,
        )
        .await
        .unwrap();
    let p = monitor
        .next_publish(Duration::from_secs(10))
        .await
        .expect("forwarded to the parent");
    let event = fleethub::cli::describe_event(&p.topic, &p.payload).unwrap();
    assert_eq!(event["origin"], "leaf1", "{event}");
    assert_eq!(event["properties"]["system"]["$.cdid"], "leaf1");
    assert_eq!(event["properties"]["application"]["zone"], "7");
    assert_eq!(event["payload"]["t"], 1);

    // A device that is not a gateway cannot claim another sender's id at the parent.
    let plain_key = parent.create_device("plain").await;
    let plain = parent.device("plain", &plain_key).await;
    plain
        .client
        .publish(
            "devices/plain/messages/events/$.cdid=leaf1",
            QoS::AtLeastOnce,
            false,
            "spoof",
        )
        .await
        .unwrap();
    let p = monitor.next_publish(Duration::from_secs(5)).await.unwrap();
    let event = fleethub::cli::describe_event(&p.topic, &p.payload).unwrap();
    assert_eq!(event["origin"], "plain");
    assert_eq!(event["properties"]["system"]["$.cdid"], "plain");
}
