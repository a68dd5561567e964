//! Telemetry: device events and module outputs at QoS 0 and 1, their property bags parsed
//! into the message model and seen by a service connection and `fleethub monitor-events`.

use std::time::Duration;

use fleethub_router::Message;
use rumqttc::QoS;

use crate::harness::{Hub, Seen};

fn parse(topic: &str, payload: &[u8]) -> (String, String, Message) {
    let rest = topic
        .strip_prefix("$fleethub/events/")
        .expect("service topic");
    let mut parts = rest.splitn(3, '/');
    let d = parts.next().unwrap().to_string();
    let m = parts.next().unwrap().to_string();
    let bag = parts.next().unwrap_or("");
    (
        d,
        m,
        Message::from_bag(bag, bytes::Bytes::copy_from_slice(payload)).unwrap(),
    )
}

#[tokio::test]
async fn device_telemetry_reaches_monitor_with_properties() {
    let hub = Hub::start("tel-props").await;
    let key = hub.create_device("dev1").await;
    let mut monitor = hub.monitor().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut d1 = hub.device("dev1", &key).await;
    // A device trying to spoof its connection id gets it overwritten.
    let topic = "devices/dev1/messages/events/$.ct=application%2Fjson&$.ce=utf-8&$.mid=m-1&temp%20unit=C&$.cdid=evil";
    d1.client
        .publish(topic, QoS::AtLeastOnce, false, r#"{"t":21.5}"#)
        .await
        .unwrap();
    assert!(
        matches!(d1.next(Duration::from_secs(5)).await, Some(Seen::PubAck(_))),
        "QoS 1 is acknowledged"
    );
    let p = monitor
        .next_publish(Duration::from_secs(5))
        .await
        .expect("monitor sees telemetry");
    let (d, m, msg) = parse(&p.topic, &p.payload);
    assert_eq!((d.as_str(), m.as_str()), ("dev1", "~"));
    assert_eq!(&msg.body[..], br#"{"t":21.5}"#);
    assert_eq!(msg.property("temp unit"), Some("C"));
    assert_eq!(msg.system.content_type.as_deref(), Some("application/json"));
    assert_eq!(msg.system.content_encoding.as_deref(), Some("utf-8"));
    assert_eq!(msg.system.message_id.as_deref(), Some("m-1"));
    assert_eq!(msg.system.connection_device_id.as_deref(), Some("dev1"));
    assert!(msg.system.enqueued_time.is_some());

    d1.client
        .publish(
            "devices/dev1/messages/events/",
            QoS::AtMostOnce,
            false,
            "qos0",
        )
        .await
        .unwrap();
    let p = monitor
        .next_publish(Duration::from_secs(5))
        .await
        .expect("QoS 0 telemetry");
    assert_eq!(&p.payload[..], b"qos0");
    assert_eq!(hub.metric("fleethub_telemetry_messages_total").await, 2.0);
    assert_eq!(hub.metric("fleethub_telemetry_bytes_total").await, 14.0);
}

#[tokio::test]
async fn module_output_carries_output_name_and_module_id() {
    let hub = Hub::start("tel-module").await;
    hub.create_device("edge1").await;
    let key = hub.create_module("edge1", "sensor").await;
    let mut monitor = hub.monitor().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = hub.device("edge1/sensor", &key).await;
    m.client
        .publish(
            "devices/edge1/modules/sensor/messages/events/$.on=temperatureOutput",
            QoS::AtLeastOnce,
            false,
            "42",
        )
        .await
        .unwrap();
    let p = monitor
        .next_publish(Duration::from_secs(5))
        .await
        .expect("module output");
    let (d, module, msg) = parse(&p.topic, &p.payload);
    assert_eq!((d.as_str(), module.as_str()), ("edge1", "sensor"));
    assert_eq!(msg.system.output_name.as_deref(), Some("temperatureOutput"));
    assert_eq!(msg.system.connection_module_id.as_deref(), Some("sensor"));
}

#[tokio::test]
async fn oversized_payload_closes_the_connection() {
    let hub = Hub::start("tel-size").await;
    let key = hub.create_device("dev1").await;
    let mut d1 = hub.device("dev1", &key).await;
    let big = vec![b'x'; 256 * 1024 + 1];
    d1.client
        .publish(
            "devices/dev1/messages/events/",
            QoS::AtLeastOnce,
            false,
            big,
        )
        .await
        .unwrap();
    assert!(d1.disconnected(Duration::from_secs(5)).await.is_some());
    assert_eq!(
        hub.metric("fleethub_protocol_errors_total{reason=\"payload_too_large\"}")
            .await,
        1.0
    );
    // Exactly 256 KiB is fine.
    let mut d1 = hub.device("dev1", &key).await;
    d1.client
        .publish(
            "devices/dev1/messages/events/",
            QoS::AtLeastOnce,
            false,
            vec![b'x'; 256 * 1024],
        )
        .await
        .unwrap();
    assert!(matches!(
        d1.next(Duration::from_secs(5)).await,
        Some(Seen::PubAck(_))
    ));
}

#[tokio::test]
async fn malformed_property_bag_closes_the_connection_but_not_the_hub() {
    let hub = Hub::start("tel-bag").await;
    let key = hub.create_device("dev1").await;
    let mut d1 = hub.device("dev1", &key).await;
    d1.client
        .publish(
            "devices/dev1/messages/events/a=%FF",
            QoS::AtLeastOnce,
            false,
            "x",
        )
        .await
        .unwrap();
    assert!(d1.disconnected(Duration::from_secs(5)).await.is_some());
    hub.device("dev1", &key).await;
}

#[tokio::test]
async fn monitor_events_cli_prints_telemetry() {
    let hub = Hub::start("tel-cli").await;
    let key = hub.create_device("dev1").await;
    let data = hub.data_dir();
    let watcher = std::thread::spawn(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_fleethub"))
            .arg("--data-dir")
            .arg(data)
            .args([
                "monitor-events",
                "--device",
                "dev1",
                "--count",
                "1",
                "--timeout",
                "20s",
                "--output",
                "json",
            ])
            .output()
            .unwrap()
    });
    let d1 = hub.device("dev1", &key).await;
    // Keep publishing until the monitor has subscribed and caught one.
    for _ in 0..100 {
        d1.client
            .publish(
                "devices/dev1/messages/events/level=high",
                QoS::AtLeastOnce,
                false,
                r#"{"v":1}"#,
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        if watcher.is_finished() {
            break;
        }
    }
    let out = watcher.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let event: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(event["origin"], "dev1");
    assert_eq!(event["payload"]["v"], 1);
    assert_eq!(event["properties"]["application"]["level"], "high");
}

/// The live view reaches the router through one shared link: devices that publish while a
/// service connection watches open none of their own (a link costs about 230 KB; one per
/// device grew a 10,000-device hub by 2.3 GB). Each device's messages stay in order.
#[tokio::test]
async fn watched_devices_share_one_router_link_and_keep_their_order() {
    let hub = Hub::start("tel-links").await;
    let mut monitor = hub.monitor().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut devices = Vec::new();
    for i in 0..20 {
        let name = format!("d{i}");
        let key = hub.create_device(&name).await;
        devices.push((name.clone(), hub.device(&name, &key).await));
    }
    for (name, d) in &devices {
        for n in 0..5 {
            d.client
                .publish(
                    format!("devices/{name}/messages/events/"),
                    QoS::AtLeastOnce,
                    false,
                    format!("{n}"),
                )
                .await
                .unwrap();
        }
    }
    let mut seen: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for _ in 0..100 {
        let p = monitor
            .next_publish(Duration::from_secs(5))
            .await
            .expect("the monitor sees every message");
        let (d, _, msg) = parse(&p.topic, &p.payload);
        let n = std::str::from_utf8(&msg.body).unwrap().parse().unwrap();
        seen.entry(d).or_default().push(n);
    }
    assert_eq!(seen.len(), 20);
    for (d, ns) in &seen {
        assert_eq!(*ns, vec![0, 1, 2, 3, 4], "{d}: in order");
    }
    // The monitor's own link and the live view's: nothing per device.
    assert_eq!(hub.metric("fleethub_router_links_opened_total").await, 2.0);
    assert_eq!(hub.metric("fleethub_live_view_dropped_total").await, 0.0);
}
