//! A full disk degrades, never locks out: routed publishes stop at the disk's free-space
//! floor and are held unacknowledged on their connection, while devices keep connecting and
//! twins, methods and C2D keep working; everything resumes by itself, on the same
//! connections, once the sink drains and space returns.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::harness::{temp_dir, Hub, Seen};

/// Mounts a tmpfs of `mib` MiB at `dir`: root only. `false` when not possible (outside CI).
fn mount_tmpfs(dir: &std::path::Path, mib: u32) -> bool {
    std::fs::create_dir_all(dir).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !ok && std::env::var_os("CI").is_some() {
        panic!("CI runs as root: the full-disk test needs to mount a tmpfs");
    }
    ok
}

/// Unmounts on drop, after the hub is gone.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

fn free_bytes(dir: &std::path::Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_full_disk_degrades_and_recovers_by_itself() {
    let dir = temp_dir("fulldisk");
    let data = dir.join("data");
    if !mount_tmpfs(&data, 24) {
        eprintln!("skipped: cannot mount a tmpfs (not root)");
        return;
    }
    let mounted = Mounted(data.clone());
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        "[routes]\nsink = \"FROM /messages/* INTO BrokeredEndpoint(\\\"/modules/sink/inputs/in\\\")\"\n[store_and_forward]\nmin_free_bytes = 6291456\nmax_bytes = 0\n",
    )
    .unwrap();
    let mut hub = Hub::start_with(dir.clone(), &["--config", config.to_str().unwrap()]).await;
    let k1 = hub.create_device("d1").await;
    let k2 = hub.create_device("d2").await;
    let sink_key = hub.create_module("fleethub", "sink").await;

    // Routed 20 KB messages to an offline module until the floor holds them back.
    let mut d1 = hub.device("d1", &k1).await;
    let body = vec![b'x'; 20_000];
    let publish = |d: &rumqttc::AsyncClient, tag: String| {
        let d = d.clone();
        let body = body.clone();
        async move {
            d.publish(
                format!("devices/d1/messages/events/{tag}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                body,
            )
            .await
            .unwrap()
        }
    };
    let mut acked = 0usize;
    loop {
        publish(&d1.client, format!("seq={acked}")).await;
        match d1.next(Duration::from_secs(3)).await {
            Some(Seen::PubAck(_)) => acked += 1,
            Some(Seen::Disconnected(e)) => {
                panic!("the publisher was disconnected at the floor: {e}")
            }
            None => break,
            Some(_) => {}
        }
        assert!(acked < 5000, "the floor never held the publisher back");
    }
    assert!(acked > 100, "{acked} acknowledged before the floor");
    // More publishes are held too, and the device stays connected without their PUBACKs.
    for i in 0..4 {
        publish(&d1.client, format!("held={i}")).await;
    }
    let held = 5;
    match d1.next(Duration::from_secs(2)).await {
        None => {}
        other => panic!("a held publish must get nothing yet, not {other:?}"),
    }
    assert!(
        free_bytes(&data) > 4 * 1024 * 1024,
        "the floor keeps room: {}",
        free_bytes(&data)
    );
    let refused = hub.metric("fleethub_queue_refused_total").await;
    assert!(
        refused >= held as f64,
        "held publishes are counted: {refused}"
    );

    // Meanwhile the rest works: a device connects, its twin is written and read, C2D is
    // queued and delivered, a method is answered.
    let mut d2 = hub.device("d2", &k2).await;
    d2.subscribe_many(&[
        "devices/d2/messages/devicebound/#",
        "$iothub/methods/POST/#",
    ])
    .await;
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/twins/d2",
            Some(json!({ "properties": { "desired": { "during": 1 } } })),
        )
        .await;
    assert_eq!(s, 200, "a twin write on a full disk: {b}");
    let (s, b) = hub
        .api(
            Method::POST,
            "/devices/d2/messages",
            Some(json!({ "body": "hello" })),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    let p = d2
        .next_publish(Duration::from_secs(5))
        .await
        .expect("C2D arrives");
    assert!(
        p.topic.starts_with("devices/d2/messages/devicebound/"),
        "{}",
        p.topic
    );
    let call = {
        let client = hub.client.clone();
        tokio::spawn(async move {
            client
                .raw(
                    Method::POST,
                    "/devices/d2/methods",
                    Some(&json!({ "methodName": "ping", "responseTimeoutInSeconds": 10 })),
                )
                .await
        })
    };
    let request = d2
        .next_publish(Duration::from_secs(5))
        .await
        .expect("the method request");
    let rid = request.topic.rsplit_once("$rid=").unwrap().1.to_string();
    d2.client
        .publish(
            format!("$iothub/methods/res/200/?$rid={rid}"),
            rumqttc::QoS::AtMostOnce,
            false,
            "{\"pong\":true}",
        )
        .await
        .unwrap();
    let (s, answer) = call.await.unwrap().unwrap();
    assert_eq!(
        (s.as_u16(), answer["payload"]["pong"].as_bool()),
        (200, Some(true)),
        "{answer}"
    );

    // The sink drains: space returns, and the held publishes are stored and acknowledged on
    // the same connection, in order, by themselves.
    let mut sink = hub.device("fleethub/sink", &sink_key).await;
    sink.subscribe_many(&["devices/fleethub/modules/sink/inputs/#"])
        .await;
    let mut got = 0;
    while got < acked + held {
        match sink.next_publish(Duration::from_secs(10)).await {
            Some(_) => got += 1,
            None => break,
        }
    }
    assert_eq!(
        got,
        acked + held,
        "every acknowledged and every held message is delivered"
    );
    let mut late_acks = 0;
    while late_acks < held {
        match d1.next(Duration::from_secs(10)).await {
            Some(Seen::PubAck(_)) => late_acks += 1,
            Some(Seen::Disconnected(e)) => panic!("the publisher was disconnected: {e}"),
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(
        late_acks, held,
        "the withheld PUBACKs came on the same connection"
    );
    publish(&d1.client, "after=1".into()).await;
    assert!(
        matches!(d1.next(Duration::from_secs(5)).await, Some(Seen::PubAck(_))),
        "publishing goes on as before"
    );
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/twins/d2",
            Some(json!({ "properties": { "desired": { "after": 1 } } })),
        )
        .await;
    assert_eq!(s, 200, "the stores were never broken: {b}");

    // Something else fills the disk past the main store's floor (half the queues'): writes
    // are refused clearly, reads and connections go on, and writes come back with the room.
    let filler = data.join("filler");
    let room = free_bytes(&data);
    std::fs::write(&filler, vec![0u8; (room - 1024 * 1024) as usize]).unwrap();
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/twins/d2",
            Some(json!({ "properties": { "desired": { "full": 1 } } })),
        )
        .await;
    assert_eq!(s, 507, "a twin write with no room: {b}");
    assert_eq!(b["error"], "InsufficientStorage", "{b}");
    assert!(b["message"].as_str().unwrap().contains("disk"), "{b}");
    let (s, b) = hub
        .api(
            Method::POST,
            "/devices/d2/messages",
            Some(json!({ "body": "no room" })),
        )
        .await;
    assert_eq!(s, 507, "C2D with no room: {b}");
    let (s, twin) = hub.api(Method::GET, "/twins/d2", None).await;
    assert_eq!(
        (s, &twin["properties"]["desired"]["after"]),
        (200, &json!(1)),
        "{twin}"
    );
    // Over MQTT: a reported patch gets a 503 with the reason; the device stays connected.
    d2.subscribe_many(&["$iothub/twin/res/#"]).await;
    d2.client
        .publish(
            "$iothub/twin/PATCH/properties/reported/?$rid=7",
            rumqttc::QoS::AtMostOnce,
            false,
            "{\"x\":1}",
        )
        .await
        .unwrap();
    let res = d2
        .next_publish(Duration::from_secs(5))
        .await
        .expect("a twin response");
    assert!(
        res.topic.starts_with("$iothub/twin/res/503/"),
        "{}",
        res.topic
    );
    assert!(
        String::from_utf8_lossy(&res.payload).contains("disk"),
        "{:?}",
        res.payload
    );
    // A device connects with a persistent session and subscribes: not stored, still served.
    drop(d1);
    let mut opts = hub.options("d1", &hub.sas("d1", &k1));
    opts.set_clean_session(false);
    let mut d1 = crate::harness::Client::connect(opts)
        .await
        .expect("connects on a full disk");
    let codes = d1
        .subscribe_many(&["devices/d1/messages/devicebound/#"])
        .await;
    assert!(
        matches!(codes[..], [rumqttc::SubscribeReasonCode::Success(_)]),
        "{codes:?}"
    );
    assert!(hub.metric("fleethub_store_writes_refused_total").await >= 3.0);
    std::fs::remove_file(&filler).unwrap();
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/twins/d2",
            Some(json!({ "properties": { "desired": { "full": 2 } } })),
        )
        .await;
    assert_eq!(s, 200, "writes are back with the room: {b}");
    let (s, b) = hub
        .api(
            Method::POST,
            "/devices/d1/messages",
            Some(json!({ "body": "room again" })),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    let p = d1
        .next_publish(Duration::from_secs(5))
        .await
        .expect("C2D on the unstored subscription");
    assert_eq!(&p.payload[..], b"room again");
    hub.kill9();
    drop(mounted);
}
