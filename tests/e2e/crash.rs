//! What the hub acknowledged survives `kill -9`: reported patches answered 204, desired
//! changes answered 200, C2D messages accepted with 202.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::harness::{json_of, Hub};

#[tokio::test]
async fn acknowledged_twin_and_c2d_writes_survive_kill_9() {
    let hub = Hub::start("crash-plane").await;
    let key = hub.create_device("dev1").await;
    let mut d = hub.device("dev1", &key).await;
    d.subscribe_many(&["$iothub/twin/res/#"]).await;
    for i in 0..20 {
        let topic = format!("$iothub/twin/PATCH/properties/reported/?$rid={i}");
        let r = d
            .request(
                &topic,
                json!({ format!("k{i}"): i }).to_string().as_bytes(),
                "$iothub/twin/res/",
            )
            .await;
        assert!(r.topic.starts_with("$iothub/twin/res/204/"), "{}", r.topic);
    }
    let (s, _) = hub
        .api(
            Method::PATCH,
            "/twins/dev1",
            Some(json!({"properties": {"desired": {"target": 21}}, "tags": {"site": "a"}})),
        )
        .await;
    assert_eq!(s, 200);
    for i in 0..5 {
        let (s, _) = hub
            .api(
                Method::POST,
                "/devices/dev1/messages",
                Some(json!({"body": format!("c2d-{i}")})),
            )
            .await;
        assert_eq!(s, 202);
    }
    drop(d);
    let mut hub = hub;
    hub.kill9();
    let hub = hub.restart().await;

    let (_, twin) = hub.api(Method::GET, "/twins/dev1", None).await;
    for i in 0..20 {
        assert_eq!(
            twin["properties"]["reported"][format!("k{i}")],
            i,
            "reported k{i}"
        );
    }
    // Version 1 for the new twin, then one per acknowledged patch.
    assert_eq!(twin["properties"]["reported"]["$version"], 21);
    assert_eq!(twin["properties"]["desired"]["target"], 21);
    assert_eq!(twin["tags"]["site"], "a");

    let mut d = hub.device("dev1", &key).await;
    d.subscribe_many(&["devices/dev1/messages/devicebound/#", "$iothub/twin/res/#"])
        .await;
    for i in 0..5 {
        let p = d
            .next_publish_on("devices/dev1/messages/devicebound/", Duration::from_secs(5))
            .await
            .expect("C2D after restart");
        assert_eq!(p.payload, format!("c2d-{i}").as_bytes(), "in order");
    }
    let r = d
        .request("$iothub/twin/GET/?$rid=x", b"", "$iothub/twin/res/")
        .await;
    assert_eq!(json_of(&r)["desired"]["target"], 21);
}
