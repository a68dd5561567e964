//! The built-in events endpoint: every acknowledged message kept for its consumer groups,
//! each reading from its own checkpoint; competing readers in one group; retention by time
//! and size; the fallback route and `INTO $events`; `kill -9` loses nothing acknowledged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use reqwest::Method;
use rumqttc::{MqttOptions, QoS};
use serde_json::{json, Value};

use crate::harness::{temp_dir, Client, Hub};

/// A service connection reading the endpoint through `filter` (`$fleethub/events/#` for
/// `$Default`, `$share/{g}/$fleethub/events/#` for group g).
async fn reader(hub: &Hub, id: &str, filter: &str) -> Client {
    let addr = hub.endpoints.mqtt.unwrap();
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_credentials("$service", hub.token.clone());
    o.set_max_packet_size(1024 * 1024, 1024 * 1024);
    o.set_inflight(1000);
    let mut c = Client::connect(o).await.expect("reader connects");
    let codes = c.subscribe_many(&[filter]).await;
    assert!(
        matches!(codes[0], rumqttc::SubscribeReasonCode::Success(_)),
        "{filter}: {codes:?}"
    );
    c
}

/// Publishes messages `{device}-{i}` at QoS 1 and waits for every PUBACK.
async fn publish_acked(device: &mut Client, name: &str, from: usize, n: usize) {
    let name = name.to_string();
    device
        .publish_acked(from, n, move |i| {
            (
                format!("devices/{name}/messages/events/"),
                format!("{name}-{i}"),
            )
        })
        .await;
}

/// What a reader received: per device, the message numbers in arrival order.
#[derive(Default)]
struct Received {
    by_device: BTreeMap<String, Vec<usize>>,
    distinct: BTreeSet<(String, usize)>,
    total: usize,
}

impl Received {
    fn add(&mut self, payload: &[u8]) {
        let text = std::str::from_utf8(payload).unwrap();
        let (device, i) = text.rsplit_once('-').unwrap();
        let i: usize = i.parse().unwrap();
        self.by_device
            .entry(device.to_string())
            .or_default()
            .push(i);
        self.distinct.insert((device.to_string(), i));
        self.total += 1;
    }

    fn distinct(&self) -> &BTreeSet<(String, usize)> {
        &self.distinct
    }
}

/// Reads until `want` distinct messages arrived or nothing came for `quiet`.
async fn read_until(c: &mut Client, got: &mut Received, want: usize, quiet: Duration) {
    while got.distinct().len() < want {
        let Some(p) = c.next_publish(quiet).await else {
            break;
        };
        assert!(p.topic.starts_with("$fleethub/events/"), "{}", p.topic);
        got.add(&p.payload);
    }
}

async fn devices(hub: &Hub, n: usize) -> Vec<(String, Client)> {
    let mut out = Vec::new();
    for i in 0..n {
        let name = format!("dev{i}");
        let key = hub.create_device(&name).await;
        let mut o = hub.options(&name, &hub.sas(&name, &key));
        o.set_inflight(100);
        out.push((name, Client::connect(o).await.unwrap()));
    }
    out
}

#[tokio::test]
async fn one_hundred_thousand_acknowledged_messages_all_reach_a_consumer_in_order() {
    let hub = Hub::start("events-100k").await;
    let mut consumer = reader(&hub, "backend", "$fleethub/events/#").await;
    let mut fleet = devices(&hub, 4).await;
    let mut senders = Vec::new();
    for (name, mut c) in fleet.drain(..) {
        senders.push(tokio::spawn(async move {
            publish_acked(&mut c, &name, 0, 25_000).await;
            c
        }));
    }
    let mut got = Received::default();
    read_until(&mut consumer, &mut got, 100_000, Duration::from_secs(30)).await;
    for s in senders {
        s.await.unwrap();
    }
    assert_eq!(got.distinct().len(), 100_000, "received == acknowledged");
    assert_eq!(got.total, 100_000, "no duplicates without a crash");
    for (device, seq) in &got.by_device {
        assert!(
            seq.windows(2).all(|w| w[0] < w[1]),
            "{device}: per-device order"
        );
    }
    let fallback = hub.metric("fleethub_events_fallback_total").await;
    assert_eq!(fallback, 100_000.0);
}

#[tokio::test]
async fn consumer_groups_read_independently_from_their_own_checkpoints() {
    let hub = Hub::start("events-groups").await;
    // Created before the burst from "end": it starts at the burst. Nobody reads it yet.
    let (s, b) = hub
        .api(
            Method::POST,
            "/consumerGroups",
            Some(json!({"name": "archive", "from": "end"})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let mut live = reader(&hub, "backend", "$fleethub/events/#").await;
    let (name, mut dev) = devices(&hub, 1).await.pop().unwrap();
    publish_acked(&mut dev, &name, 0, 2_000).await;
    let mut got = Received::default();
    read_until(&mut live, &mut got, 2_000, Duration::from_secs(10)).await;
    assert_eq!(got.distinct().len(), 2_000);

    // The group offline for the whole burst reads everything from its checkpoint, and a
    // group created now from the start reads it again, independently.
    let (ok, out, err) = hub.fleethub("--output json consumer-group list");
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    let archive = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "archive")
        .unwrap()
        .clone();
    assert_eq!(archive["lagMessages"], 2_000, "{archive}");
    assert!(archive["lagSeconds"].as_f64().unwrap() > 0.0, "{archive}");
    let lag = "fleethub_events_consumer_lag_messages{group=\"archive\"}";
    assert_eq!(hub.metric(lag).await, 2_000.0);
    let (ok, _, err) = hub.fleethub("consumer-group create replay --from start");
    assert!(ok, "{err}");
    for group in ["archive", "replay"] {
        let mut r = reader(&hub, group, &format!("$share/{group}/$fleethub/events/#")).await;
        let mut got = Received::default();
        read_until(&mut r, &mut got, 2_000, Duration::from_secs(10)).await;
        assert_eq!(got.distinct().len(), 2_000, "{group}");
        assert_eq!(
            got.by_device[&name],
            (0..2_000).collect::<Vec<_>>(),
            "{group}"
        );
    }
    // Acknowledged: the checkpoints moved (stored a moment later) and the lag is gone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(hub.metric(lag).await, 0.0);
    let (_, g) = hub.api(Method::GET, "/consumerGroups/archive", None).await;
    assert_eq!(g["lagMessages"], 0, "{g}");

    // A group that does not exist is refused at SUBSCRIBE.
    let addr = hub.endpoints.mqtt.unwrap();
    let mut o = MqttOptions::new("nobody", addr.ip().to_string(), addr.port());
    o.set_credentials("$service", hub.token.clone());
    let mut c = Client::connect(o).await.unwrap();
    let codes = c
        .subscribe_many(&["$share/missing/$fleethub/events/#"])
        .await;
    assert_eq!(codes, vec![rumqttc::SubscribeReasonCode::Failure]);

    // HTTP batch reads: a page after the checkpoint, then an explicit checkpoint.
    let (ok, _, err) = hub.fleethub("consumer-group create batch");
    assert!(ok, "{err}");
    let (s, page) = hub
        .api(Method::GET, "/consumerGroups/batch/events?max=500", None)
        .await;
    assert_eq!(s, 200, "{page}");
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 500);
    assert_eq!(events[0]["body"], format!("{name}-0"));
    assert_eq!(events[0]["deviceId"], name.as_str());
    let last = page["lastSequenceNumber"].as_u64().unwrap();
    let (s, b) = hub
        .api(
            Method::POST,
            "/consumerGroups/batch/checkpoint",
            Some(json!({"sequenceNumber": last})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (_, page) = hub
        .api(Method::GET, "/consumerGroups/batch/events?max=1", None)
        .await;
    assert_eq!(page["events"][0]["body"], format!("{name}-500"));
    let (_, g) = hub.api(Method::GET, "/consumerGroups/batch", None).await;
    assert_eq!(g["lagMessages"], 1_500, "{g}");
    // Deleting: gone, and $Default stays.
    let (ok, _, _) = hub.fleethub("consumer-group delete batch");
    assert!(ok);
    let (s, _) = hub.api(Method::GET, "/consumerGroups/batch", None).await;
    assert_eq!(s, 404);
    let (s, _) = hub
        .api(Method::DELETE, "/consumerGroups/$Default", None)
        .await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn two_readers_in_one_group_split_the_stream() {
    let hub = Hub::start("events-competing").await;
    let (ok, _, err) = hub.fleethub("consumer-group create workers");
    assert!(ok, "{err}");
    let filter = "$share/workers/$fleethub/events/#";
    let mut a = reader(&hub, "worker-a", filter).await;
    let mut b = reader(&hub, "worker-b", filter).await;
    let (name, mut dev) = devices(&hub, 1).await.pop().unwrap();
    publish_acked(&mut dev, &name, 0, 5_000).await;
    let (mut got_a, mut got_b) = (Received::default(), Received::default());
    loop {
        tokio::select! {
            p = a.next_publish(Duration::from_secs(5)) => match p {
                Some(p) => got_a.add(&p.payload),
                None => break,
            },
            p = b.next_publish(Duration::from_secs(5)) => match p {
                Some(p) => got_b.add(&p.payload),
                None => break,
            },
        }
        if got_a.total + got_b.total == 5_000 {
            break;
        }
    }
    let (da, db) = (got_a.distinct(), got_b.distinct());
    assert_eq!(da.len() + db.len(), 5_000, "{} + {}", da.len(), db.len());
    assert!(da.is_disjoint(db), "no message went to both");
    assert!(!da.is_empty() && !db.is_empty(), "both took a share");
}

#[tokio::test]
async fn a_reader_that_leaves_unacknowledged_hands_its_messages_to_the_next() {
    let hub = Hub::start("events-handover").await;
    let (name, mut dev) = devices(&hub, 1).await.pop().unwrap();
    publish_acked(&mut dev, &name, 0, 300).await;
    // A reader that never acknowledges (manual acks, none sent), then goes away.
    let addr = hub.endpoints.mqtt.unwrap();
    let mut o = MqttOptions::new("stuck", addr.ip().to_string(), addr.port());
    o.set_credentials("$service", hub.token.clone());
    o.set_manual_acks(true);
    let mut stuck = Client::connect(o).await.unwrap();
    stuck.subscribe_many(&["$fleethub/events/#"]).await;
    let mut held = 0;
    while held < 300 {
        if stuck.next_publish(Duration::from_secs(5)).await.is_none() {
            break;
        }
        held += 1;
    }
    assert_eq!(held, 300);
    drop(stuck);
    let mut next = reader(&hub, "next", "$fleethub/events/#").await;
    let mut got = Received::default();
    read_until(&mut next, &mut got, 300, Duration::from_secs(10)).await;
    assert_eq!(got.distinct().len(), 300);
}

#[tokio::test]
async fn retention_by_time_and_by_size_drops_the_oldest_and_counts_them() {
    let dir = temp_dir("events-retention");
    let config = dir.join("hub.toml");
    std::fs::write(&config, "[events]\nretention_secs = 2\n").unwrap();
    let hub = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
    let (name, mut dev) = devices(&hub, 1).await.pop().unwrap();
    publish_acked(&mut dev, &name, 0, 50).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let expired = "fleethub_queue_dropped_total{reason=\"expired\",sink=\"$events\"}";
    assert_eq!(hub.metric(expired).await, 50.0);
    let mut r = reader(&hub, "late", "$fleethub/events/#").await;
    assert!(r.next_publish(Duration::from_secs(1)).await.is_none());
    drop(hub);

    // 100 messages of a few hundred bytes each (property bag, body, frame) into 4 KiB: the
    // newest stay, in order, as whole segments of an eighth of it each.
    let dir = temp_dir("events-retention-size");
    let config = dir.join("hub.toml");
    std::fs::write(&config, "[events]\nretention_bytes = 4096\n").unwrap();
    let hub = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
    let (name, mut dev) = devices(&hub, 1).await.pop().unwrap();
    publish_acked(&mut dev, &name, 0, 100).await;
    let mut r = reader(&hub, "late", "$fleethub/events/#").await;
    let mut got = Received::default();
    read_until(&mut r, &mut got, 100, Duration::from_secs(2)).await;
    let kept = &got.by_device[&name];
    assert!(kept.len() >= 5 && kept.len() < 100, "{}", kept.len());
    let bytes = "fleethub_queue_bytes{sink=\"$events\"}";
    let stored = hub.metric(bytes).await;
    assert!(stored > 2048.0 && stored <= 4096.0, "{stored} bytes kept");
    assert_eq!(
        *kept,
        ((100 - kept.len())..100).collect::<Vec<_>>(),
        "the newest kept, oldest dropped first"
    );
    let dropped = "fleethub_queue_dropped_total{reason=\"quota\",sink=\"$events\"}";
    assert_eq!(hub.metric(dropped).await, (100 - kept.len()) as f64);
}

#[tokio::test]
async fn routes_decide_what_the_endpoint_gets() {
    let dir = temp_dir("events-routes");
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        r#"[routes]
hot = "FROM /messages/* WHERE temp = 'high' INTO BrokeredEndpoint(\"/modules/alarm/inputs/in\")"
keep = "FROM /messages/* WHERE keep = 'yes' INTO $events"
"#,
    )
    .unwrap();
    let hub = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
    let mut r = reader(&hub, "backend", "$fleethub/events/#").await;
    let key = hub.create_device("d").await;
    let d = hub.device("d", &key).await;
    for (props, body) in [
        ("temp=low", "fallback"),
        ("temp=high", "routed-away"),
        ("temp=high&keep=yes", "routed-both"),
    ] {
        d.client
            .publish(
                format!("devices/d/messages/events/{props}"),
                QoS::AtLeastOnce,
                false,
                body,
            )
            .await
            .unwrap();
    }
    let mut bodies = Vec::new();
    while let Some(p) = r.next_publish(Duration::from_secs(3)).await {
        bodies.push(String::from_utf8(p.payload.to_vec()).unwrap());
    }
    // The fallback takes what matched no route; a route into the endpoint takes its own.
    assert_eq!(bodies, ["fallback", "routed-both"]);
}

#[tokio::test]
async fn kill_9_mid_stream_loses_nothing_acknowledged() {
    let hub = Hub::start("events-crash").await;
    let (name, mut dev) = devices(&hub, 1).await.pop().unwrap();
    publish_acked(&mut dev, &name, 0, 20_000).await;
    drop(dev);
    // The reader acknowledges the first 8,000 only (rumqttc would acknowledge everything
    // it receives): the rest stays unacknowledged in its window when the hub dies.
    let addr = hub.endpoints.mqtt.unwrap();
    let mut o = MqttOptions::new("backend", addr.ip().to_string(), addr.port());
    o.set_credentials("$service", hub.token.clone());
    o.set_manual_acks(true);
    o.set_inflight(1000);
    let mut r = Client::connect(o).await.unwrap();
    r.subscribe_many(&["$fleethub/events/#"]).await;
    let mut got = Received::default();
    while got.total < 8_000 {
        let p = r
            .next_publish(Duration::from_secs(10))
            .await
            .expect("events");
        r.client.ack(&p).await.unwrap();
        got.add(&p.payload);
    }
    let mut hub = hub;
    hub.kill9();
    drop(r);
    let hub = hub.restart().await;
    let mut r = reader(&hub, "backend", "$fleethub/events/#").await;
    read_until(&mut r, &mut got, 20_000, Duration::from_secs(15)).await;
    assert_eq!(got.distinct().len(), 20_000, "nothing acknowledged lost");
    let duplicates = got.total - 20_000;
    // At most a moment of checkpoints not yet stored (acknowledged, then redelivered).
    assert!(duplicates <= 8_000, "{duplicates} duplicates");
    let per_device: HashMap<_, _> = got.by_device.iter().map(|(d, v)| (d, v.len())).collect();
    assert_eq!(per_device.len(), 1);
}

/// Events an earlier version kept in the store-and-forward queue (its `$events` sink) move
/// into the endpoint's own log at start with their positions, so checkpoints stay valid;
/// moving is done once, and the other queues keep their entries.
#[tokio::test]
async fn events_an_earlier_version_kept_in_the_queue_move_into_the_log() {
    use fleethub_router::queue::{DiskQueue, Limits, NewEntry, Queue};
    let mut hub = Hub::start("events-move").await;
    let (s, b) = hub
        .api(
            Method::POST,
            "/consumerGroups",
            Some(json!({ "name": "archive", "from": "start" })),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert!(hub.terminate().success());
    let path = hub.data_dir().join("queues.redb");
    let positions: Vec<u64> = {
        let q = DiskQueue::open(&path, Limits::default()).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let entry = |sink: &str, i: usize| {
            let message = fleethub_router::Message {
                body: format!("old-{i}").into(),
                properties: Vec::new(),
                system: fleethub_router::SystemProperties {
                    connection_device_id: Some("old".into()),
                    ..Default::default()
                },
            };
            NewEntry {
                sink: sink.into(),
                priority: 0,
                ttl_ms: 86_400_000,
                bag: message.to_bag(),
                body: message.body,
            }
        };
        let mut entries: Vec<NewEntry> = (0..10).map(|i| entry("$events", i)).collect();
        entries.insert(3, entry("$upstream", 99));
        q.append(entries, now).await.unwrap();
        let none = Default::default();
        q.peek("$events", &none, 100, now)
            .unwrap()
            .entries
            .iter()
            .map(|e| e.key.seq)
            .collect()
    };
    assert_eq!(positions.len(), 10);

    // The second start comes after a `kill -9`: whatever of the move was not recorded in
    // the queue is moved again, and must not be stored twice.
    let mut hub = hub.restart().await;
    for round in 0..2 {
        let (_, page) = hub
            .api(Method::GET, "/consumerGroups/archive/events?max=100", None)
            .await;
        let got: Vec<(u64, String)> = page["events"]
            .as_array()
            .unwrap_or_else(|| panic!("{page}"))
            .iter()
            .map(|e| {
                (
                    e["sequenceNumber"].as_u64().unwrap(),
                    e["body"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let want: Vec<(u64, String)> = positions
            .iter()
            .enumerate()
            .map(|(i, p)| (*p, format!("old-{i}")))
            .collect();
        assert_eq!(got, want, "round {round}: moved once, positions kept");
        let (_, queues) = hub.api(Method::GET, "/queues", None).await;
        let depth = |sink: &str| -> Vec<u64> {
            queues["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|q| q["sink"] == sink)
                .map(|q| q["depth"].as_u64().unwrap())
                .collect()
        };
        assert_eq!(depth("$events"), [10], "{queues}");
        assert_eq!(depth("$upstream"), [1], "{queues}");
        hub = hub.restart().await;
    }
}
