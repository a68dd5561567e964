//! Per-connection authorization: a device subscribes and publishes only on its own topics,
//! and `$iothub/...` answers never reach another device.

use std::time::Duration;

use reqwest::Method;
use rumqttc::{QoS, SubscribeReasonCode};

use crate::harness::Hub;

#[tokio::test]
async fn foreign_filters_fail_in_suback_while_own_succeed() {
    let hub = Hub::start("authz-sub").await;
    let key = hub.create_device("dev1").await;
    hub.create_device("dev2").await;
    let mut d1 = hub.device("dev1", &key).await;
    let codes = d1
        .subscribe_many(&[
            "devices/dev1/messages/devicebound/#",
            "devices/dev2/messages/devicebound/#",
            "$iothub/twin/res/#",
            "devices/+/messages/events/#",
            "#",
            "$iothub/methods/POST/#",
        ])
        .await;
    assert_eq!(
        codes,
        vec![
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
        ]
    );
    assert_eq!(
        hub.metric("fleethub_authorization_denials_total{action=\"subscribe\"}")
            .await,
        3.0
    );
    // Still connected after refused filters.
    d1.client
        .publish(
            "devices/dev1/messages/events/",
            QoS::AtLeastOnce,
            false,
            "x",
        )
        .await
        .unwrap();
    assert!(matches!(
        d1.next(Duration::from_secs(5)).await,
        Some(crate::harness::Seen::PubAck(_))
    ));
}

#[tokio::test]
async fn publishing_as_another_device_disconnects() {
    let hub = Hub::start("authz-pub").await;
    let key = hub.create_device("dev1").await;
    hub.create_device("dev2").await;
    let mut monitor = hub.monitor().await;
    let mut d1 = hub.device("dev1", &key).await;
    d1.client
        .publish(
            "devices/dev2/messages/events/",
            QoS::AtLeastOnce,
            false,
            "spoof",
        )
        .await
        .unwrap();
    assert!(d1.disconnected(Duration::from_secs(5)).await.is_some());
    assert_eq!(
        hub.metric("fleethub_authorization_denials_total{action=\"publish\"}")
            .await,
        1.0
    );
    assert!(
        monitor
            .next_publish(Duration::from_millis(500))
            .await
            .is_none(),
        "nothing reached the monitor"
    );

    // Publishing to another device's C2D topic is refused the same way.
    let mut d1 = hub.device("dev1", &key).await;
    d1.client
        .publish(
            "devices/dev2/messages/devicebound/x",
            QoS::AtMostOnce,
            false,
            "x",
        )
        .await
        .unwrap();
    assert!(d1.disconnected(Duration::from_secs(5)).await.is_some());
}

#[tokio::test]
async fn twin_answers_go_only_to_the_asking_device() {
    let hub = Hub::start("authz-twin").await;
    let k1 = hub.create_device("dev1").await;
    let k2 = hub.create_device("dev2").await;
    let mut d1 = hub.device("dev1", &k1).await;
    let mut d2 = hub.device("dev2", &k2).await;
    d1.subscribe_many(&["$iothub/twin/res/#"]).await;
    d2.subscribe_many(&["$iothub/twin/res/#"]).await;
    d1.client
        .publish("$iothub/twin/GET/?$rid=42", QoS::AtMostOnce, false, "")
        .await
        .unwrap();
    let answer = d1
        .next_publish(Duration::from_secs(5))
        .await
        .expect("dev1 gets its answer");
    assert!(
        answer.topic.starts_with("$iothub/twin/res/"),
        "{}",
        answer.topic
    );
    assert!(answer.topic.ends_with("?$rid=42"), "{}", answer.topic);
    assert!(
        d2.next_publish(Duration::from_millis(500)).await.is_none(),
        "dev2 sees nothing"
    );
    let (_, rec) = hub.api(Method::GET, "/devices/dev2", None).await;
    assert_eq!(rec["connectionState"], "Connected");
}
