//! Direct methods: a call reaches only the target device, its reply comes back through the
//! API and CLI; offline is 404, silence is 504.

use std::time::Duration;

use reqwest::Method;
use rumqttc::QoS;
use serde_json::json;

use crate::harness::{json_of, Hub};

#[tokio::test]
async fn a_method_call_round_trips_through_the_device() {
    let hub = Hub::start("method-ok").await;
    let ka = hub.create_device("a").await;
    let kb = hub.create_device("b").await;
    let mut a = hub.device("a", &ka).await;
    let mut b = hub.device("b", &kb).await;
    a.subscribe_many(&["$iothub/methods/POST/#"]).await;
    b.subscribe_many(&["$iothub/methods/POST/#"]).await;

    let call = {
        let (url, token) = (hub.api_url("/devices/a/methods"), hub.token.clone());
        tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .json(&json!({"methodName": "reboot", "payload": {"delay": 5}, "responseTimeoutInSeconds": 10}))
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        })
    };
    let req = a
        .next_publish_on("$iothub/methods/POST/", Duration::from_secs(5))
        .await
        .expect("method request");
    assert!(
        req.topic.starts_with("$iothub/methods/POST/reboot/?$rid="),
        "{}",
        req.topic
    );
    assert_eq!(json_of(&req), json!({"delay": 5}));
    let rid = req.topic.rsplit("$rid=").next().unwrap().to_string();
    a.client
        .publish(
            format!("$iothub/methods/res/201/?$rid={rid}"),
            QoS::AtLeastOnce,
            false,
            r#"{"rebooting": true}"#,
        )
        .await
        .unwrap();
    let (status, body) = call.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, json!({"status": 201, "payload": {"rebooting": true}}));
    assert!(
        b.next_publish(Duration::from_millis(300)).await.is_none(),
        "b never saw a's call"
    );
    assert_eq!(
        hub.metric("fleethub_method_calls_total{result=\"ok\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn offline_is_404_and_silence_is_504() {
    let hub = Hub::start("method-fail").await;
    let key = hub.create_device("dev1").await;
    let (s, b) = hub
        .api(
            Method::POST,
            "/devices/dev1/methods",
            Some(json!({"methodName": "ping", "responseTimeoutInSeconds": 1})),
        )
        .await;
    assert_eq!(s, 404);
    assert!(b["message"].as_str().unwrap().contains("not connected"));
    let mut d = hub.device("dev1", &key).await;
    d.subscribe_many(&["$iothub/methods/POST/#"]).await;
    let (s, b) = hub
        .api(
            Method::POST,
            "/devices/dev1/methods",
            Some(json!({"methodName": "ping", "responseTimeoutInSeconds": 1})),
        )
        .await;
    assert_eq!(s, 504, "{b}");
    let (s, _) = hub
        .api(
            Method::POST,
            "/devices/dev1/methods",
            Some(json!({"methodName": "a/b"})),
        )
        .await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn cli_invokes_a_module_method() {
    let hub = Hub::start("method-cli").await;
    hub.create_device("edge").await;
    let mk = hub.create_module("edge", "cam").await;
    let mut m = hub.device("edge/cam", &mk).await;
    m.subscribe_many(&["$iothub/methods/POST/#"]).await;
    // tokio's process API: the test runtime has one thread and must keep polling the
    // module's event loop while the CLI waits for the answer.
    let invoke = tokio::spawn(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_fleethub"))
            .arg("--data-dir")
            .arg(hub.data_dir())
            .args([
                "--output",
                "json",
                "method",
                "invoke",
                "edge",
                "snap",
                "--module",
                "cam",
                "--payload",
                r#"{"res": "hd"}"#,
            ])
            .output(),
    );
    let req = m
        .next_publish_on("$iothub/methods/POST/snap/", Duration::from_secs(10))
        .await
        .expect("request");
    let rid = req.topic.rsplit("$rid=").next().unwrap().to_string();
    m.client
        .publish(
            format!("$iothub/methods/res/200/?$rid={rid}"),
            QoS::AtMostOnce,
            false,
            r#""done""#,
        )
        .await
        .unwrap();
    let out = invoke.await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, json!({"status": 200, "payload": "done"}));
}
