//! Persistent sessions and what a reconnecting device is owed: clean session 0 keeps every
//! subscription across reconnects, SIGTERM and `kill -9` restarts (session-present 1, no new
//! SUBSCRIBE), with C2D sent while away delivered and desired changes (removals as `null`)
//! sent on resume; clean session 1 starts empty; sessions of service connections; idle
//! sessions expire and go with their identity; SAS token expiry closes the connection;
//! methods to a device that cannot take them answer 404103 at once; MQTT 3.1.1 violations
//! that must close the connection.

use std::time::{Duration, Instant};

use reqwest::Method;
use rumqttc::QoS;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{connect_body, json_of, packet, temp_dir, unix_now, Client, Hub};

const DESIRED: &str = "$iothub/twin/PATCH/properties/desired/";
const C2D: &str = "devices/dev1/messages/devicebound/";
const SDK_FILTERS: [&str; 4] = [
    "devices/dev1/messages/devicebound/#",
    "$iothub/twin/res/#",
    "$iothub/twin/PATCH/properties/desired/#",
    "$iothub/methods/POST/#",
];

/// Connects `dev1` as the SDKs do: clean session 0. Returns the client and session-present.
async fn sdk_like(hub: &Hub, key: &str) -> (Client, bool) {
    let mut o = hub.options("dev1", &hub.sas("dev1", key));
    o.set_clean_session(false);
    Client::connect_session(o).await.expect("connects")
}

/// Invokes `method` on dev1 through the API and, concurrently, answers it from `client`.
async fn method_round_trip(hub: &Hub, client: &mut Client, method: &str) -> (u16, Value) {
    let call = hub.api(
        Method::POST,
        "/devices/dev1/methods",
        Some(json!({"methodName": method, "payload": {"n": 1}, "responseTimeoutInSeconds": 10})),
    );
    let answer = async {
        let p = client
            .next_publish_on("$iothub/methods/POST/", Duration::from_secs(10))
            .await
            .expect("method request reaches the resumed session");
        let rid = p.topic.split("$rid=").nth(1).unwrap().to_string();
        client
            .client
            .publish(
                format!("$iothub/methods/res/200/?$rid={rid}"),
                QoS::AtMostOnce,
                false,
                br#"{"ok":true}"#.to_vec(),
            )
            .await
            .unwrap();
    };
    let (result, ()) = tokio::join!(call, answer);
    result
}

async fn send_c2d(hub: &Hub, body: &str) {
    let (s, b) = hub
        .api(
            Method::POST,
            "/devices/dev1/messages",
            Some(json!({ "body": body })),
        )
        .await;
    assert_eq!(s, 202, "{b}");
}

async fn patch_desired(hub: &Hub, desired: Value) {
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/twins/dev1",
            Some(json!({"properties": {"desired": desired}})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
}

/// Every publish that arrives until none has for `quiet`.
async fn drain(client: &mut Client, quiet: Duration) -> Vec<rumqttc::Publish> {
    let mut all = Vec::new();
    while let Some(p) = client.next_publish(quiet).await {
        all.push(p);
    }
    all
}

/// Applies the desired patches among `publishes` as JSON merge patches (what the SDKs and
/// IoT Edge's agent do) to `doc`; returns how many there were.
fn apply_patches(publishes: &[rumqttc::Publish], doc: &mut Map<String, Value>) -> usize {
    let mut n = 0;
    for p in publishes.iter().filter(|p| p.topic.starts_with(DESIRED)) {
        let Value::Object(mut patch) = json_of(p) else {
            panic!("patch not an object")
        };
        patch.remove("$version");
        fleethub::twin::doc::merge_plain(doc, &patch);
        n += 1;
    }
    n
}

/// After each way the connection can end (the client going, SIGTERM, `kill -9`), the same
/// session resumes with no SUBSCRIBE: C2D sent while away arrives, the desired change made
/// while away arrives with its removals, and a method call is answered.
#[tokio::test]
async fn clean_session_0_survives_reconnects_and_restarts() {
    let mut hub = Hub::start("sessions-resume").await;
    let key = hub.create_device("dev1").await;
    patch_desired(
        &hub,
        json!({"cws": {"temperature": 38, "pressure": 78}, "keep": 1}),
    )
    .await;

    let (mut d, present) = sdk_like(&hub, &key).await;
    assert!(!present, "a first connection has no session");
    let codes = d.subscribe_many(&SDK_FILTERS).await;
    assert!(codes
        .iter()
        .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))));
    let mut doc = hub.desired_document("/twins/dev1").await;

    for (round, how) in ["reconnect", "sigterm", "kill9"].into_iter().enumerate() {
        drop(d);
        match how {
            "reconnect" => tokio::time::sleep(Duration::from_millis(200)).await,
            "sigterm" => {
                assert!(hub.terminate().success());
                hub = hub.restart().await;
            }
            _ => {
                hub.kill9();
                hub = hub.restart().await;
            }
        }
        // While the device is away: a C2D message and a desired change that removes a key.
        send_c2d(&hub, &format!("away-{round}")).await;
        patch_desired(
            &hub,
            json!({"cws": {"pressure": null, "temperature": 40 + round}, "round": round}),
        )
        .await;
        if round == 1 {
            patch_desired(&hub, json!({"cws": {"pressure": 1}})).await;
            patch_desired(&hub, json!({"cws": {"pressure": null}})).await;
        }

        let (mut again, present) = sdk_like(&hub, &key).await;
        assert!(present, "{how}: session-present 1");
        // No SUBSCRIBE from here on.
        let got = drain(&mut again, Duration::from_millis(1500)).await;
        let c2d = got
            .iter()
            .find(|p| p.topic.starts_with(C2D))
            .unwrap_or_else(|| panic!("{how}: C2D sent while away"));
        assert_eq!(&c2d.payload[..], format!("away-{round}").as_bytes());
        assert_eq!(c2d.qos, QoS::AtLeastOnce);
        assert_eq!(
            apply_patches(&got, &mut doc),
            1,
            "{how}: one desired patch on resume"
        );
        assert_eq!(
            doc,
            hub.desired_document("/twins/dev1").await,
            "{how}: device equals its twin"
        );
        assert!(doc["cws"].get("pressure").is_none(), "{how}: {doc:?}");

        let (status, body) = method_round_trip(&hub, &mut again, "reboot").await;
        assert_eq!(status, 200, "{how}: {body}");
        assert_eq!(body["payload"], json!({"ok": true}));

        // A twin GET is answered on the restored `$iothub/twin/res/#`.
        let r = again
            .request("$iothub/twin/GET/?$rid=g", b"", "$iothub/twin/res/")
            .await;
        assert!(r.topic.starts_with("$iothub/twin/res/200/"), "{}", r.topic);
        d = again;
    }
    // Live patches after all that still carry removals.
    patch_desired(&hub, json!({"keep": null})).await;
    let got = drain(&mut d, Duration::from_millis(700)).await;
    assert_eq!(apply_patches(&got, &mut doc), 1);
    assert_eq!(doc, hub.desired_document("/twins/dev1").await);
    assert!(!doc.contains_key("keep"));
    assert!(hub.metric("fleethub_sessions_resumed_total").await >= 1.0);
}

/// Clean session 1 discards the stored session: session-present 0, nothing delivered
/// without subscribing, and the next clean-session-0 connection starts fresh too.
#[tokio::test]
async fn clean_session_1_discards_the_session() {
    let hub = Hub::start("sessions-clean").await;
    let key = hub.create_device("dev1").await;
    let (mut d, _) = sdk_like(&hub, &key).await;
    d.subscribe_many(&SDK_FILTERS).await;
    drop(d);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let o = hub.options("dev1", &hub.sas("dev1", &key));
    let (mut clean, present) = Client::connect_session(o).await.unwrap();
    assert!(!present);
    send_c2d(&hub, "queued").await;
    assert!(
        clean
            .next_publish(Duration::from_millis(700))
            .await
            .is_none(),
        "nothing without a subscription"
    );
    let (s, b) = hub
        .api(
            Method::POST,
            "/devices/dev1/methods",
            Some(json!({"methodName": "m", "responseTimeoutInSeconds": 30})),
        )
        .await;
    assert_eq!(s, 404, "{b}");
    assert_eq!(b["errorCode"], 404103);
    drop(clean);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (mut d, present) = sdk_like(&hub, &key).await;
    assert!(!present, "the session ended with clean session 1");
    // The C2D message was acknowledged by the API, so it is kept (fleethub's choice, see
    // README): it arrives once the device subscribes.
    d.subscribe_many(&["devices/dev1/messages/devicebound/#"])
        .await;
    let p = d
        .next_publish_on(C2D, Duration::from_secs(5))
        .await
        .expect("queued C2D kept");
    assert_eq!(&p.payload[..], b"queued");
}

/// A service connection (monitor-events) with clean session 0 keeps its telemetry
/// subscription across a reconnect.
#[tokio::test]
async fn service_sessions_resume_their_router_subscriptions() {
    let hub = Hub::start("sessions-service").await;
    let key = hub.create_device("dev1").await;
    let addr = hub.endpoints.mqtt.unwrap();
    let options = || {
        let mut o = rumqttc::MqttOptions::new("backend-1", addr.ip().to_string(), addr.port());
        o.set_credentials("$service", hub.token.clone());
        o.set_clean_session(false);
        o
    };
    let (mut m, present) = Client::connect_session(options()).await.unwrap();
    assert!(!present);
    m.subscribe_many(&["$fleethub/events/#"]).await;
    drop(m);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut m, present) = Client::connect_session(options()).await.unwrap();
    assert!(present);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dev = hub.device("dev1", &key).await;
    dev.client
        .publish(
            "devices/dev1/messages/events/",
            QoS::AtLeastOnce,
            false,
            b"hello".to_vec(),
        )
        .await
        .unwrap();
    let p = m
        .next_publish_on("$fleethub/events/dev1/", Duration::from_secs(5))
        .await
        .expect("telemetry without a new SUBSCRIBE");
    let event = fleethub::cli::describe_event(&p.topic, &p.payload).unwrap();
    assert_eq!(event["payload"], "hello");
}

/// Sessions idle past `session_expiry_secs` are forgotten; deleting an identity removes
/// its session at once.
#[tokio::test]
async fn sessions_expire_and_go_with_their_identity() {
    let dir = temp_dir("sessions-expiry");
    let config = dir.join("hub.toml");
    std::fs::write(&config, "[mqtt]\nsession_expiry_secs = 1\n").unwrap();
    let hub = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
    let key = hub.create_device("dev1").await;
    let (mut d, _) = sdk_like(&hub, &key).await;
    d.subscribe_many(&SDK_FILTERS).await;
    drop(d);
    let deadline = Instant::now() + Duration::from_secs(15);
    while hub.metric("fleethub_sessions_expired_total").await < 1.0 {
        assert!(Instant::now() < deadline, "session never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (mut d, present) = sdk_like(&hub, &key).await;
    assert!(!present, "expired");
    d.subscribe_many(&SDK_FILTERS).await;
    drop(d);

    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, _) = hub.api(Method::DELETE, "/devices/dev1", None).await;
    assert_eq!(s, 204);
    let key = hub.create_device("dev1").await;
    let (_d, present) = sdk_like(&hub, &key).await;
    assert!(
        !present,
        "a re-created identity does not inherit the old session"
    );
}

/// A connection is closed when its SAS token expires, and counted.
#[tokio::test]
async fn expired_tokens_close_their_connection() {
    let hub = Hub::start("sessions-token").await;
    let key = hub.create_device("dev1").await;
    let id = fleethub::identity::IdentityKey::parse("dev1").unwrap();
    let token = fleethub::sas::generate(
        &fleethub::sas::resource_for(&hub.hostname, &id),
        &key,
        unix_now() + 3,
    )
    .unwrap();
    let started = Instant::now();
    let mut d = Client::connect(hub.options("dev1", &token)).await.unwrap();
    let reason = d.disconnected(Duration::from_secs(15)).await;
    assert!(reason.is_some(), "closed at expiry");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(hub.metric("fleethub_token_expirations_total").await, 1.0);
}

/// A method to a connected device that never subscribed to methods is answered 404103 at
/// once (IoT Hub's DeviceNotOnline), as is one to a device that is not connected.
#[tokio::test]
async fn methods_nobody_listens_for_fail_fast() {
    let hub = Hub::start("sessions-methods").await;
    let key = hub.create_device("dev1").await;
    let call = || {
        hub.api(
            Method::POST,
            "/devices/dev1/methods",
            Some(json!({"methodName": "m", "responseTimeoutInSeconds": 60})),
        )
    };
    let (s, b) = call().await;
    assert_eq!((s, b["errorCode"].clone()), (404, json!(404103)), "{b}");
    let mut d = hub.device("dev1", &key).await;
    d.subscribe_many(&["devices/dev1/messages/devicebound/#"])
        .await;
    let started = Instant::now();
    let (s, b) = call().await;
    assert_eq!((s, b["errorCode"].clone()), (404, json!(404103)), "{b}");
    assert!(
        b["message"].as_str().unwrap().contains("not subscribed"),
        "{b}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "not a timeout");
    d.subscribe_many(&["$iothub/methods/POST/#"]).await;
    let (s, b) = method_round_trip(&hub, &mut d, "m").await;
    assert_eq!(s, 200, "{b}");
}

/// Reads until the hub closes the socket; returns what it sent first, or panics if it
/// stays open.
async fn closed_after(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return all,
            Ok(Ok(n)) => all.extend(&buf[..n]),
            Err(_) => panic!("connection still open"),
        }
    }
}

/// MQTT 3.1.1 §3.1.2.3, §3.3.2.1, §3.8.1, §3.10.1: violations close the connection.
#[tokio::test]
async fn protocol_violations_close_the_connection() {
    let hub = Hub::start("sessions-protocol").await;
    let key = hub.create_device("dev1").await;
    let addr = hub.endpoints.mqtt.unwrap();
    let (user, pass) = (hub.username("dev1"), hub.sas("dev1", &key));

    // Reserved connect flag set: no CONNACK, closed.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&packet(
        0x10,
        &connect_body(0b1100_0011, "dev1", &user, &pass),
    ))
    .await
    .unwrap();
    assert!(closed_after(&mut s).await.is_empty(), "no CONNACK");

    let connected = || async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&packet(
            0x10,
            &connect_body(0b1100_0010, "dev1", &user, &pass),
        ))
        .await
        .unwrap();
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).await.unwrap();
        assert_eq!(ack, [0x20, 2, 0, 0], "CONNACK accepted");
        s
    };
    let topic_body = |topic: &str, qos1: bool| {
        let mut b = (topic.len() as u16).to_be_bytes().to_vec();
        b.extend(topic.as_bytes());
        if qos1 {
            b.extend([0, 7]);
        }
        b.extend(b"x");
        b
    };
    for topic in [
        "devices/dev1/messages/events/a+b",
        "devices/dev1/messages/events/#",
    ] {
        let mut s = connected().await;
        s.write_all(&packet(0x32, &topic_body(topic, true)))
            .await
            .unwrap();
        let sent = closed_after(&mut s).await;
        assert!(sent.is_empty(), "{topic}: no PUBACK, closed ({sent:?})");
    }
    // SUBSCRIBE with flags 0000 and UNSUBSCRIBE with flags 0000.
    let sub = {
        let filter = b"$iothub/methods/POST/#";
        let mut b = vec![0, 9];
        b.extend((filter.len() as u16).to_be_bytes());
        b.extend(filter);
        b.push(1);
        b
    };
    for first in [0x80, 0x82 | 0x01, 0xa0] {
        let mut s = connected().await;
        s.write_all(&packet(first, &sub)).await.unwrap();
        let sent = closed_after(&mut s).await;
        assert!(
            sent.is_empty(),
            "{first:#x}: closed without an ack ({sent:?})"
        );
    }
    assert!(
        hub.metric("fleethub_protocol_errors_total{reason=\"malformed\"}")
            .await
            >= 5.0
    );
    // The hub still serves.
    let mut s = connected().await;
    s.write_all(&packet(0x82, &sub)).await.unwrap();
    let mut ack = [0u8; 5];
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack[0], 0x90, "SUBACK for a well-formed SUBSCRIBE");
}
