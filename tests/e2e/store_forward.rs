//! Store-and-forward: what the hub acknowledged survives `kill -9` and reaches its sink once
//! the sink is back — at least once, in priority order, never after its time to live.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::Method;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;

use crate::harness::{free_port, start_bare_broker, temp_dir, Hub, Seen};

/// Publishes `total` QoS 1 messages (`seq`, `prio` properties) and kills the hub with -9 once
/// `kill_after` of them were acknowledged. Returns how many were acknowledged.
async fn publish_then_kill(
    hub: &mut Hub,
    device: &str,
    key: &str,
    plan: &[(&str, usize)],
    kill_after: usize,
) -> Vec<(usize, String)> {
    let mut d = hub.device(device, key).await;
    let mut sent: Vec<(usize, String)> = Vec::new();
    let mut seq = 0;
    for (prio, n) in plan {
        for _ in 0..*n {
            sent.push((seq, prio.to_string()));
            seq += 1;
        }
    }
    let publisher = {
        let client = d.client.clone();
        let device = device.to_string();
        let sent = sent.clone();
        tokio::spawn(async move {
            for (seq, prio) in sent {
                let topic = format!("devices/{device}/messages/events/seq={seq}&prio={prio}");
                if client
                    .publish(topic, QoS::AtLeastOnce, false, seq.to_string())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    // The hub acknowledges in order, so the first k PUBACKs cover messages 0..k.
    let mut acked = 0;
    while acked < kill_after {
        match d.next(Duration::from_secs(20)).await {
            Some(Seen::PubAck(_)) => acked += 1,
            Some(Seen::Disconnected(e)) => panic!("device dropped: {e}"),
            Some(_) => {}
            None => panic!("no PUBACK after {acked}"),
        }
    }
    hub.kill9();
    publisher.abort();
    // Anything acknowledged in between counts too.
    while let Some(Seen::PubAck(_)) = d.next(Duration::from_millis(50)).await {
        acked += 1;
    }
    sent.truncate(acked);
    sent
}

/// A hub with device `dev`, the hub's module `sink`, and `routes` set through the `$edgeHub`
/// twin; returns the device's and the module's keys.
async fn hub_routing_to_sink(name: &str, routes: serde_json::Value) -> (Hub, String, String) {
    hub_routing_to_sink_with(name, routes, None).await
}

/// [`hub_routing_to_sink`] with a config file's `toml` (none: the embedded defaults).
async fn hub_routing_to_sink_with(
    name: &str,
    routes: serde_json::Value,
    toml: Option<&str>,
) -> (Hub, String, String) {
    let hub = match toml {
        None => Hub::start(name).await,
        Some(toml) => {
            let dir = temp_dir(name);
            let config = dir.join("hub.toml");
            std::fs::write(&config, toml).unwrap();
            Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await
        }
    };
    let dk = hub.create_device("dev").await;
    let mk = hub.create_module("fleethub", "sink").await;
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/twins/fleethub/modules/$edgeHub",
            Some(json!({"properties": {"desired": {"routes": routes}}})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    (hub, dk, mk)
}

#[tokio::test]
async fn module_input_backlog_survives_kill_9_in_priority_order_and_ttl() {
    let (mut hub, dk, mk) = hub_routing_to_sink(
        "snf-module",
        json!({
            "high": {"route": "FROM /messages/* WHERE prio = 'high' INTO BrokeredEndpoint(\"/modules/sink/inputs/in\")", "priority": 0},
            "low": {"route": "FROM /messages/* WHERE prio = 'low' INTO BrokeredEndpoint(\"/modules/sink/inputs/in\")", "priority": 5},
            "short": {"route": "FROM /messages/* WHERE prio = 'short' INTO BrokeredEndpoint(\"/modules/sink/inputs/in\")", "priority": 0, "timeToLiveSecs": 1}
        }),
    )
    .await;
    let acked = publish_then_kill(
        &mut hub,
        "dev",
        &dk,
        &[("low", 400), ("short", 50), ("high", 150)],
        560,
    )
    .await;
    assert!(acked.len() >= 560);
    let mut hub = hub.restart().await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // the short-lived ones expire meanwhile

    let (_, queues) = hub.api(Method::GET, "/queues", None).await;
    let depth = queues["items"][0]["depth"].as_u64().unwrap();
    // The operator's view through the CLI says the same.
    let (ok, out, err) = crate::harness::cli(
        &hub,
        &[
            "--output",
            "json",
            "queue",
            "show",
            "/modules/sink/inputs/in",
        ],
    );
    assert!(ok, "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["depth"].as_u64(), Some(depth));
    assert!(shown["oldestAgeSeconds"].as_f64().unwrap() >= 1.0);
    assert!(
        depth as usize >= acked.iter().filter(|(_, p)| p != "short").count(),
        "{queues}"
    );

    let mut sink = hub.device("fleethub/sink", &mk).await;
    sink.subscribe_many(&["devices/fleethub/modules/sink/inputs/#"])
        .await;
    let mut got: Vec<(usize, String)> = Vec::new();
    while let Some(p) = sink.next_publish(Duration::from_secs(3)).await {
        let bag = p
            .topic
            .strip_prefix("devices/fleethub/modules/sink/inputs/in/")
            .unwrap();
        let m = fleethub_router::Message::from_bag(bag, bytes::Bytes::new()).unwrap();
        got.push((
            m.property("seq").unwrap().parse().unwrap(),
            m.property("prio").unwrap().to_string(),
        ));
    }
    let mut counts: HashMap<usize, usize> = HashMap::new();
    for (seq, _) in &got {
        *counts.entry(*seq).or_default() += 1;
    }
    for (seq, prio) in &acked {
        if prio != "short" {
            assert!(
                counts.contains_key(seq),
                "acknowledged message {seq} ({prio}) lost"
            );
        }
    }
    assert!(
        got.iter().all(|(_, p)| p != "short"),
        "nothing after its time to live"
    );
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    assert!(
        duplicates * 1000 <= got.len(),
        "{duplicates} duplicates of {}",
        got.len()
    );
    // Priority: every high message comes before the first low one.
    let first_low = got.iter().position(|(_, p)| p == "low").unwrap();
    let last_high = got.iter().rposition(|(_, p)| p == "high").unwrap_or(0);
    assert!(last_high < first_low, "high priority drained first");
    hub.terminate();
    let _ = &mut hub;
}

/// The `seq` property of a routed message delivered to a module input.
fn seq_of(p: &rumqttc::Publish) -> usize {
    let bag = p
        .topic
        .strip_prefix("devices/fleethub/modules/sink/inputs/in/")
        .unwrap();
    let m = fleethub_router::Message::from_bag(bag, bytes::Bytes::new()).unwrap();
    m.property("seq").unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_consuming_module_across_kill_9_loses_nothing_and_gets_few_duplicates() {
    consume_across_kill_9("snf-live", None).await;
}

/// The same with log generations of 8 KiB: hundreds are sealed, retired and written over
/// while the module consumes, so the kill finds files holding earlier generations' records
/// past their current end (whether spares are left at that moment depends on how far the
/// module lags; `records_of_log_files_written_over_never_come_back` checks them for sure).
#[tokio::test]
async fn a_consuming_module_across_kill_9_with_log_files_written_over() {
    consume_across_kill_9(
        "snf-recycled",
        Some("[store_and_forward]\ncache_bytes = 65536\n"),
    )
    .await;
}

/// The `seq` of every message the hub's module `sink` (key `mk`) is given until 3 s pass
/// without one.
async fn sink_takes_all(hub: &Hub, mk: &str) -> Vec<usize> {
    let mut sink = hub.device("fleethub/sink", mk).await;
    sink.subscribe_many(&["devices/fleethub/modules/sink/inputs/#"])
        .await;
    let mut got = Vec::new();
    while let Some(p) = sink.next_publish(Duration::from_secs(3)).await {
        got.push(seq_of(&p));
    }
    got
}

/// Generations written over hold an earlier life's records past their current end. Here the
/// module takes 2,000 messages (hundreds of 8 KiB generations sealed, retired and written
/// over), goes away, 30 more are acknowledged into files written over, and the hub is
/// killed: after the restart the module gets exactly those 30, and nothing of the 2,000.
#[tokio::test]
async fn records_of_log_files_written_over_never_come_back() {
    let (mut hub, dk, mk) = hub_routing_to_sink_with(
        "snf-stale",
        json!({"all": "FROM /messages/* INTO BrokeredEndpoint(\"/modules/sink/inputs/in\")"}),
        Some("[store_and_forward]\ncache_bytes = 65536\n"),
    )
    .await;
    let mut sink = hub.device("fleethub/sink", &mk).await;
    sink.subscribe_many(&["devices/fleethub/modules/sink/inputs/#"])
        .await;
    let mut d = hub.device("dev", &dk).await;
    let publish = |d: &AsyncClient, tag: String| {
        let d = d.clone();
        async move {
            d.publish(
                format!("devices/dev/messages/events/{tag}"),
                QoS::AtLeastOnce,
                false,
                "an earlier life of the file",
            )
            .await
            .unwrap()
        }
    };
    for seq in 0..2000 {
        publish(&d.client, format!("seq={seq}")).await;
    }
    let mut consumed = std::collections::HashSet::new();
    while consumed.len() < 2000 {
        let p = sink
            .next_publish(Duration::from_secs(10))
            .await
            .expect("the module takes all 2,000");
        consumed.insert(seq_of(&p));
    }
    // Its acknowledgements reach the queue before it goes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, queues) = hub.api(Method::GET, "/queues", None).await;
        if queues["items"][0]["depth"] == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{queues}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(sink);
    for seq in 5000..5030 {
        publish(&d.client, format!("seq={seq}")).await;
    }
    let mut acked = 0;
    while acked < 2030 {
        match d.next(Duration::from_secs(10)).await {
            Some(Seen::PubAck(_)) => acked += 1,
            Some(_) => {}
            None => panic!("{acked} acknowledged"),
        }
    }
    hub.kill9();
    let spares = std::fs::read_dir(hub.data_dir().join("queues.log"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "spare"))
        })
        .count();
    assert!(spares > 0, "log files were retired to be written over");
    let mut hub = hub.restart().await;
    let mut after = sink_takes_all(&hub, &mk).await;
    after.sort();
    assert_eq!(after, (5000..5030).collect::<Vec<_>>());
    hub.terminate();
    let _ = &mut hub;
}

async fn consume_across_kill_9(name: &str, toml: Option<&str>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let (mut hub, dk, mk) = hub_routing_to_sink_with(
        name,
        json!({"all": "FROM /messages/* INTO BrokeredEndpoint(\"/modules/sink/inputs/in\")"}),
        toml,
    )
    .await;
    let mut sink = hub.device("fleethub/sink", &mk).await;
    sink.subscribe_many(&["devices/fleethub/modules/sink/inputs/#"])
        .await;
    let consumed = Arc::new(AtomicUsize::new(0));
    let collector = {
        let consumed = consumed.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(p) = sink.next_publish(Duration::from_secs(10)).await {
                got.push(seq_of(&p));
                consumed.fetch_add(1, Ordering::Relaxed);
            }
            got
        })
    };
    let mut d = hub.device("dev", &dk).await;
    let client = d.client.clone();
    let publisher = tokio::spawn(async move {
        for seq in 0..8000 {
            let topic = format!("devices/dev/messages/events/seq={seq}");
            if client
                .publish(topic, QoS::AtLeastOnce, false, "x")
                .await
                .is_err()
            {
                return;
            }
        }
    });
    // The hub acknowledges in order: the first k PUBACKs cover messages 0..k.
    let acks = tokio::spawn(async move {
        let mut acked = 0;
        while let Some(seen) = d.next(Duration::from_secs(20)).await {
            match seen {
                Seen::PubAck(_) => acked += 1,
                Seen::Disconnected(_) => break,
                _ => {}
            }
        }
        acked
    });
    // Kill while the module is busy: thousands consumed, more in flight and queued.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while consumed.load(Ordering::Relaxed) < 3000 {
        assert!(tokio::time::Instant::now() < deadline, "the module stalled");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    hub.kill9();
    publisher.abort();
    let acked = acks.await.unwrap();
    let before = collector.await.unwrap();

    let mut hub = hub.restart().await;
    let after = sink_takes_all(&hub, &mk).await;
    let mut counts: HashMap<usize, usize> = HashMap::new();
    for seq in before.iter().chain(&after) {
        *counts.entry(*seq).or_default() += 1;
    }
    for seq in 0..acked {
        assert!(counts.contains_key(&seq), "acknowledged message {seq} lost");
    }
    // What comes again was in flight to the module at the kill: never a message it had
    // acknowledged long before (an earlier generation's record read back as current).
    let delivered: std::collections::HashSet<usize> = before.iter().copied().collect();
    let recent: std::collections::HashSet<usize> = before[before.len().saturating_sub(1100)..]
        .iter()
        .copied()
        .collect();
    for seq in &after {
        assert!(
            !delivered.contains(seq) || recent.contains(seq),
            "message {seq}, consumed long before the kill, came back"
        );
    }
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    eprintln!(
        "acked {acked}, delivered before the kill {}, after {}, duplicates {duplicates}",
        before.len(),
        after.len()
    );
    // What comes again is what was in flight to the module (its window is 1000) or
    // acknowledged by it just before the kill; what it had acknowledged earlier does not.
    assert!(
        duplicates <= 1100 && duplicates < before.len() / 2,
        "{duplicates} duplicates; {} delivered before the kill",
        before.len()
    );
    hub.terminate();
    let _ = &mut hub;
}

#[tokio::test]
async fn upstream_backlog_survives_kill_9_and_drains_when_upstream_returns() {
    let port = free_port();
    let dir = temp_dir("snf-upstream");
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        format!("[hub]\nid = \"edge\"\n[routes]\nup = \"FROM /messages/* INTO $upstream\"\n[upstream]\nenabled = true\naddress = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    let mut hub = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
    let dk = hub.create_device("dev").await;
    let acked = publish_then_kill(&mut hub, "dev", &dk, &[("x", 2000)], 1500).await;
    let hub = hub.restart().await;

    // The upstream comes back, with a subscriber that counts what arrives.
    start_bare_broker(port);
    let mut o = MqttOptions::new("upstream-watcher", "127.0.0.1", port);
    o.set_max_packet_size(1024 * 1024, 1024 * 1024);
    let (watcher, mut events) = AsyncClient::new(o, 100);
    watcher
        .subscribe("devices/edge/messages/events/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut counts: HashMap<usize, usize> = HashMap::new();
    let mut total = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while counts.len() < acked.len() && tokio::time::Instant::now() < deadline {
        if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
            tokio::time::timeout(Duration::from_secs(5), events.poll()).await
        {
            let bag = p
                .topic
                .strip_prefix("devices/edge/messages/events/")
                .unwrap();
            let m = fleethub_router::Message::from_bag(bag, bytes::Bytes::new()).unwrap();
            assert_eq!(m.system.connection_device_id.as_deref(), Some("dev"));
            *counts
                .entry(m.property("seq").unwrap().parse().unwrap())
                .or_default() += 1;
            total += 1;
        }
    }
    for (seq, _) in &acked {
        assert!(
            counts.contains_key(seq),
            "acknowledged message {seq} never reached the upstream ({} of {})",
            counts.len(),
            acked.len()
        );
    }
    let duplicates = total - counts.len();
    assert!(
        duplicates * 1000 <= total,
        "{duplicates} duplicates of {total}"
    );
    let (_, queues) = hub.api(Method::GET, "/queues", None).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut depth = queues["items"][0]["depth"].as_u64().unwrap_or(0);
    while depth > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, q) = hub.api(Method::GET, "/queues", None).await;
        depth = q["items"][0]["depth"].as_u64().unwrap_or(0);
    }
    assert_eq!(depth, 0, "the queue drained");
}

/// A hub with one route to an (offline) module input and the given quota settings.
async fn quota_hub(name: &str, when_full: &str) -> (Hub, String) {
    let dir = temp_dir(name);
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "[routes]\nsink = \"FROM /messages/* INTO BrokeredEndpoint(\\\"/modules/sink/inputs/in\\\")\"\n[store_and_forward]\nmax_bytes = 20000\nwhen_full = \"{when_full}\"\n"
        ),
    )
    .unwrap();
    let hub = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
    let key = hub.create_device("dev").await;
    (hub, key)
}

/// Publishes 300 QoS 1 messages of ~100 bytes (64-byte bodies) from `dev`; returns how many
/// the hub acknowledged.
async fn publish_300_and_count_acks(hub: &Hub, key: &str) -> usize {
    let mut d = hub.device("dev", key).await;
    for i in 0..300 {
        d.client
            .publish(
                format!("devices/dev/messages/events/seq={i}"),
                QoS::AtLeastOnce,
                false,
                vec![b'x'; 64],
            )
            .await
            .unwrap();
    }
    let mut acked = 0;
    while let Some(Seen::PubAck(_)) = d.next(Duration::from_secs(2)).await {
        acked += 1;
    }
    acked
}

#[tokio::test]
async fn refuse_policy_withholds_pubacks_when_the_quota_is_full() {
    let (hub, key) = quota_hub("snf-refuse", "refuse").await;
    // ~100 bytes each: the 20,000-byte quota holds fewer than 200 of them.
    let acked = publish_300_and_count_acks(&hub, &key).await;
    assert!(
        acked > 50 && acked < 300,
        "{acked} acknowledged: the quota stopped the rest"
    );
    assert!(hub.metric("fleethub_queue_refused_total").await >= 1.0);
    let (_, queues) = hub.api(Method::GET, "/queues", None).await;
    assert!(
        queues["items"][0]["bytes"].as_u64().unwrap() <= 20000,
        "{queues}"
    );
    assert_eq!(
        queues["items"][0]["dropped"]["quota"], 0,
        "refuse never drops"
    );
}

#[tokio::test]
async fn drop_oldest_policy_keeps_the_quota_and_counts_the_drops() {
    let (hub, key) = quota_hub("snf-drop", "drop_oldest").await;
    let acked = publish_300_and_count_acks(&hub, &key).await;
    assert_eq!(acked, 300, "drop_oldest keeps acknowledging");
    let (_, queues) = hub.api(Method::GET, "/queues", None).await;
    let q = &queues["items"][0];
    assert!(q["bytes"].as_u64().unwrap() <= 20000, "{queues}");
    let dropped = q["dropped"]["quota"].as_u64().unwrap();
    assert_eq!(
        dropped + q["depth"].as_u64().unwrap(),
        300,
        "every message is either queued or a counted drop"
    );
    assert!(
        hub.metric(
            "fleethub_queue_dropped_total{reason=\"quota\",sink=\"/modules/sink/inputs/in\"}"
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn a_truncated_queue_store_does_not_stop_the_hub() {
    let (mut hub, key) = quota_hub("snf-truncated", "drop_oldest").await;
    let d = hub.device("dev", &key).await;
    for i in 0..200 {
        d.client
            .publish(
                format!("devices/dev/messages/events/seq={i}"),
                QoS::AtLeastOnce,
                false,
                vec![b'x'; 32],
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(d);
    let depth = |q: &serde_json::Value| q["items"][0]["depth"].as_u64().unwrap_or(0);
    let (_, before) = hub.api(Method::GET, "/queues", None).await;
    hub.kill9();
    // The entries are in the write-ahead log: tear its last record (a crash mid-write) and
    // leave garbage after it.
    let log = std::fs::read_dir(hub.data_dir().join("queues.log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::metadata(p).unwrap().len() > 0)
        .max()
        .expect("a log file holding the entries");
    let mut bytes = std::fs::read(&log).unwrap();
    bytes.truncate(bytes.len() - 7);
    bytes.extend_from_slice(&[0xa5; 13]);
    std::fs::write(&log, bytes).unwrap();
    let mut hub = hub.restart().await;
    let (s, after) = hub.api(Method::GET, "/queues", None).await;
    assert_eq!(s, 200);
    // The torn record is the last append (one entry fewer) or the removal of the quota's
    // last victim (that one is back): every whole record before it is kept either way.
    assert!(
        depth(&after).abs_diff(depth(&before)) == 1,
        "only the torn record is lost: {before} {after}"
    );
    // Restarting moved them into redb: now damage that file.
    hub.kill9();
    let path = hub.data_dir().join("queues.redb");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let hub = hub.restart().await;
    let (s, queues) = hub.api(Method::GET, "/queues", None).await;
    assert_eq!(s, 200);
    // Either redb repaired the file, or it was set aside (and the operator is told).
    let recovered = queues["recoveredFrom"].as_str();
    if let Some(aside) = recovered {
        assert!(std::path::Path::new(aside).exists(), "{queues}");
    }
    // And it keeps working.
    let d = hub.device("dev", &key).await;
    d.client
        .publish(
            "devices/dev/messages/events/after=1",
            QoS::AtLeastOnce,
            false,
            "x",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, queues) = hub.api(Method::GET, "/queues", None).await;
    assert!(
        queues["items"][0]["depth"].as_u64().unwrap() >= 1,
        "{queues}"
    );
}
