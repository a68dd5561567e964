//! Cloud-to-device messages: queued durably while offline, delivered at QoS 1 with their
//! properties, removed only when acknowledged, dropped when expired, never to another device.

use std::time::Duration;

use reqwest::Method;
use rumqttc::QoS;
use serde_json::json;

use crate::harness::{cli, Client, Hub};

const C2D: &str = "devices/dev1/messages/devicebound/";

#[tokio::test]
async fn queued_while_offline_delivered_on_subscribe_with_properties() {
    let hub = Hub::start("c2d-offline").await;
    let key = hub.create_device("dev1").await;
    let kb = hub.create_device("other").await;
    let (s, b) = hub
        .api(
            Method::POST,
            "/devices/dev1/messages",
            Some(json!({"body": "open valve", "properties": {"prio": "high"}, "messageId": "m1"})),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    let (ok, _, err) = cli(
        &hub,
        &[
            "c2d",
            "send",
            "dev1",
            "--body",
            "second",
            "--property",
            "k=v",
        ],
    );
    assert!(ok, "{err}");

    let mut other = hub.device("other", &kb).await;
    other
        .subscribe_many(&["devices/other/messages/devicebound/#"])
        .await;
    let mut d = hub.device("dev1", &key).await;
    d.subscribe_many(&["devices/dev1/messages/devicebound/#"])
        .await;
    let p1 = d
        .next_publish_on(C2D, Duration::from_secs(5))
        .await
        .expect("first C2D");
    assert_eq!(&p1.payload[..], b"open valve");
    assert_eq!(p1.qos, QoS::AtLeastOnce);
    let bag = p1.topic.strip_prefix(C2D).unwrap();
    let msg = fleethub_router::Message::from_bag(bag, bytes::Bytes::new()).unwrap();
    assert_eq!(msg.property("prio"), Some("high"));
    assert_eq!(msg.system.message_id.as_deref(), Some("m1"));
    let p2 = d
        .next_publish_on(C2D, Duration::from_secs(5))
        .await
        .expect("second C2D");
    assert_eq!(&p2.payload[..], b"second");
    assert!(
        other
            .next_publish(Duration::from_millis(300))
            .await
            .is_none(),
        "never to another device"
    );

    // Acknowledged (rumqttc acks automatically): nothing comes again after a reconnect.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(d);
    let mut again = hub.device("dev1", &key).await;
    again
        .subscribe_many(&["devices/dev1/messages/devicebound/#"])
        .await;
    assert!(again
        .next_publish(Duration::from_millis(700))
        .await
        .is_none());
    assert_eq!(
        hub.metric("fleethub_c2d_messages_total{event=\"delivered\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn unacknowledged_messages_are_redelivered() {
    let hub = Hub::start("c2d-unacked").await;
    let key = hub.create_device("dev1").await;
    let mut o = hub.options("dev1", &hub.sas("dev1", &key));
    o.set_manual_acks(true);
    let mut d = Client::connect(o).await.unwrap();
    d.subscribe_many(&["devices/dev1/messages/devicebound/#"])
        .await;
    hub.api(
        Method::POST,
        "/devices/dev1/messages",
        Some(json!({"body": "keep me"})),
    )
    .await;
    let p = d
        .next_publish_on(C2D, Duration::from_secs(5))
        .await
        .expect("live delivery");
    assert_eq!(&p.payload[..], b"keep me");
    drop(d); // never acknowledged
    let mut d = hub.device("dev1", &key).await;
    d.subscribe_many(&["devices/dev1/messages/devicebound/#"])
        .await;
    let p = d
        .next_publish_on(C2D, Duration::from_secs(5))
        .await
        .expect("redelivered");
    assert_eq!(&p.payload[..], b"keep me");
}

#[tokio::test]
async fn expired_messages_are_dropped_and_counted() {
    let hub = Hub::start("c2d-expiry").await;
    let key = hub.create_device("dev1").await;
    hub.api(
        Method::POST,
        "/devices/dev1/messages",
        Some(json!({"body": "stale", "ttlSeconds": 1})),
    )
    .await;
    hub.api(
        Method::POST,
        "/devices/dev1/messages",
        Some(json!({"body": "fresh", "ttlSeconds": 600})),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut d = hub.device("dev1", &key).await;
    d.subscribe_many(&["devices/dev1/messages/devicebound/#"])
        .await;
    let p = d
        .next_publish_on(C2D, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(&p.payload[..], b"fresh");
    assert!(d.next_publish(Duration::from_millis(300)).await.is_none());
    assert_eq!(
        hub.metric("fleethub_c2d_messages_total{event=\"expired\"}")
            .await,
        1.0
    );
    let (s, _) = hub
        .api(
            Method::POST,
            "/devices/dev1/messages",
            Some(json!({"body": "x", "ttlSeconds": 0})),
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = hub
        .api(
            Method::POST,
            "/devices/ghost/messages",
            Some(json!({"body": "x"})),
        )
        .await;
    assert_eq!(s, 404);
}
