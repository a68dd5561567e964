//! Hardening against what an attacker or an unlucky operator does: file modes of the data
//! directory, deep conditions through every API that parses one, routes to a sink that
//! cannot deliver.

use std::os::unix::fs::PermissionsExt;

use reqwest::Method;
use serde_json::json;

use crate::harness::{temp_dir, Hub};

/// Every file and directory under `dir` with a mode wider than owner-only.
fn readable_by_others(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u32)> {
    let mut out = Vec::new();
    let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        out.push((dir.to_path_buf(), mode));
    }
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(readable_by_others(&path));
        } else {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                out.push((path, mode));
            }
        }
    }
    out
}

#[tokio::test]
async fn the_data_directory_is_readable_by_the_hub_user_only() {
    // A data directory left world-readable by an earlier version or a permissive umask.
    let dir = temp_dir("modes");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(data.join("notes.txt"), "x").unwrap();
    std::fs::set_permissions(
        data.join("notes.txt"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    // The test process's umask (022) is the hub's: without its own, files would be 0644.
    let hub = Hub::start_with(dir, &[]).await;
    let key = hub.create_device("d1").await;
    hub.create_module("d1", "m1").await;
    let d = hub.device("d1", &key).await;
    d.client
        .publish(
            "devices/d1/messages/events/",
            rumqttc::QoS::AtLeastOnce,
            false,
            "x",
        )
        .await
        .unwrap();
    let (s, _) = hub
        .api(
            Method::POST,
            "/images?name=app&version=1.0.0&kind=application",
            None,
        )
        .await;
    assert!(s == 201 || s == 400, "{s}");
    for f in [
        "fleethub.redb",
        "queues.redb",
        "admin-token",
        "endpoints.json",
        "tls",
    ] {
        assert!(data.join(f).exists(), "{f} exists");
    }
    let open = readable_by_others(&data);
    assert!(open.is_empty(), "readable by others: {open:?}");
}

/// A condition nested far too deep, through every API that parses one, then JSON nested far
/// too deep in a twin patch (API and MQTT): each a clear 400, and the hub stays up.
#[tokio::test]
async fn deep_nesting_gets_a_400_naming_the_limit_never_a_crash() {
    let hub = Hub::start("deep").await;
    let key = hub.create_device("d1").await;
    let deep = format!("{}tags.x = 1{}", "(".repeat(2000), ")".repeat(2000));
    let limit = format!("at most {} levels", fleethub_router::condition::MAX_DEPTH);
    let calls = [
        (
            Method::POST,
            "/twins/query",
            json!({ "query": format!("SELECT * FROM devices WHERE {deep}") }),
        ),
        (
            Method::POST,
            "/routes/check",
            json!({ "route": format!("FROM /messages/* WHERE {deep} INTO $upstream") }),
        ),
        (
            Method::PATCH,
            "/twins/fleethub/modules/$edgeHub",
            json!({ "properties": { "desired": { "routes": {
                "r": format!("FROM /messages/* WHERE {deep} INTO BrokeredEndpoint(\"/modules/m/inputs/i\")")
            } } } }),
        ),
        (
            Method::POST,
            "/deployments",
            json!({ "id": "deep", "targetCondition": deep, "content": { "content": { "deviceContent": { "properties.desired.x": 1 } } } }),
        ),
    ];
    for (method, path, body) in calls {
        let (s, b) = hub.api(method, path, Some(body)).await;
        assert_eq!(s, 400, "{path}: {b}");
        assert!(
            b["message"].as_str().unwrap_or("").contains(&limit),
            "{path}: {b}"
        );
    }

    // JSON nested 500 deep: refused by the JSON reader with where it stopped.
    let mut deep_json = json!(1);
    for _ in 0..500 {
        deep_json = json!({ "a": deep_json });
    }
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/twins/d1",
            Some(json!({ "properties": { "desired": deep_json } })),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["message"]
            .as_str()
            .unwrap_or("")
            .contains("recursion limit"),
        "{b}"
    );
    let mut d = hub.device("d1", &key).await;
    d.subscribe_many(&["$iothub/twin/res/#"]).await;
    let res = d
        .request(
            "$iothub/twin/PATCH/properties/reported/?$rid=7",
            deep_json.to_string().as_bytes(),
            "$iothub/twin/res/",
        )
        .await;
    assert!(
        res.topic.starts_with("$iothub/twin/res/400/"),
        "{}",
        res.topic
    );

    // Still serving.
    let (s, _) = hub.api(Method::GET, "/hub", None).await;
    assert_eq!(s, 200);
}

/// `INTO $upstream` while `[upstream]` is not enabled is kept (IoT Edge manifests carry such
/// routes) but never silent: the route is flagged in `GET /routes`, the CLI and a gauge, the
/// hub logs it, and every copy it drops is counted.
#[tokio::test]
async fn a_route_to_upstream_without_the_bridge_is_flagged_and_counted() {
    let hub = Hub::start("undeliverable").await;
    let key = hub.create_device("d1").await;
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/twins/fleethub/modules/$edgeHub",
            Some(json!({ "properties": { "desired": { "routes": { "up": "FROM /messages/* INTO $upstream" } } } })),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (_, routes) = hub.api(Method::GET, "/routes", None).await;
    let up = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "up")
        .cloned()
        .unwrap();
    assert!(
        up["undeliverable"]
            .as_str()
            .unwrap_or("")
            .contains("[upstream] is not enabled"),
        "{routes}"
    );
    assert_eq!(hub.metric("fleethub_routes_undeliverable").await, 1.0);
    let (ok, out, _) = hub.fleethub("route list");
    assert!(
        ok && out.contains("DROPPED: [upstream] is not enabled"),
        "{out}"
    );

    let mut d = hub.device("d1", &key).await;
    for _ in 0..5 {
        d.client
            .publish(
                "devices/d1/messages/events/",
                rumqttc::QoS::AtLeastOnce,
                false,
                "x",
            )
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < 5 {
        match d.next(std::time::Duration::from_secs(10)).await {
            Some(crate::harness::Seen::PubAck(_)) => acked += 1,
            Some(_) => {}
            None => panic!("{acked} acknowledged"),
        }
    }
    assert_eq!(
        hub.metric("fleethub_sink_messages_total{result=\"dropped\",sink=\"$upstream\"}")
            .await,
        5.0
    );
    let logs: String = std::fs::read_dir(&hub.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("hub-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(logs.contains("cannot deliver"), "{logs}");
}

/// The `refuse` quota policy with the unmodified Python SDK: a message the full store
/// refuses is not acknowledged but held on the connection, and the SDK's `send_message` does
/// not wait forever: once the sink has drained, the hub stores it and sends its PUBACK on the
/// same connection. Every message arrives, and the SDK never had to reconnect.
#[tokio::test]
async fn refuse_policy_with_the_sdk_never_leaves_send_message_waiting() {
    let Some(python) = crate::interop::python() else {
        return;
    };
    let ip = crate::interop::random_loopback();
    let dir = temp_dir("refuse-sdk");
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "[hub]\nhostname = \"{ip}\"\n[routes]\nsink = \"FROM /messages/* INTO BrokeredEndpoint(\\\"/modules/sink/inputs/in\\\")\"\n[store_and_forward]\nmax_bytes = 20000\nwhen_full = \"refuse\"\n"
        ),
    )
    .unwrap();
    let mqtts = format!("{ip}:8883");
    let hub = Hub::start_with(
        dir,
        &["--config", config.to_str().unwrap(), "--mqtts", &mqtts],
    )
    .await;
    let key = hub.create_device("dev").await;
    let sink_key = hub.create_module("fleethub", "sink").await;
    let cs = format!("HostName={ip};DeviceId=dev;SharedAccessKey={key}");
    let ca = hub.data_dir().join("tls/ca.pem");
    // 40 messages of 1,000 bytes: about 20 fit the 20,000-byte quota.
    let mut child = tokio::process::Command::new(python)
        .arg(crate::interop::script("refused_send.py"))
        .arg(&cs)
        .arg(&ca)
        .arg("40")
        .arg("1000")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Wait until the store refuses.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while hub.metric("fleethub_queue_refused_total").await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the quota never filled"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // The sink drains: space frees, and the SDK's pending send goes through.
    let mut sink = hub.device("fleethub/sink", &sink_key).await;
    sink.subscribe_many(&["devices/fleethub/modules/sink/inputs/#"])
        .await;
    let mut seqs = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    while seqs.len() < 40 && tokio::time::Instant::now() < deadline {
        if let Some(p) = sink.next_publish(std::time::Duration::from_secs(5)).await {
            let bag = p.topic.rsplit_once('/').unwrap().1;
            let m = fleethub_router::Message::from_bag(bag, bytes::Bytes::new()).unwrap();
            seqs.insert(m.property("seq").unwrap().parse::<u32>().unwrap());
        }
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        let _ = child.wait().await;
        let mut stdout = String::new();
        let mut stderr = String::new();
        use tokio::io::AsyncReadExt;
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_string(&mut stdout).await;
        }
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr).await;
        }
        (stdout, stderr)
    })
    .await
    .expect("send_message did not hang");
    assert!(out.0.contains("done"), "SDK output:\n{}\n{}", out.0, out.1);
    assert_eq!(seqs.len(), 40, "every message arrived: {seqs:?}");
    // One CONNECT for the SDK and one for the sink: nobody was disconnected.
    let connects = hub
        .metric("fleethub_connection_attempts_total{result=\"accepted\"}")
        .await;
    assert_eq!(connects, 2.0, "the SDK stayed on its connection");
}

/// Runs `fleethub` with `args` on `data`; returns success, stdout and stderr.
fn fleethub_on(data: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleethub"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .output()
        .expect("run fleethub");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A damaged main store (truncated, or not a store at all) stops the hub at start with an
/// error naming the file and the next step: no panic, no backtrace, a non-zero exit.
/// `fleethub store check` tells which store is damaged; on a healthy data directory it
/// reports every store readable.
#[tokio::test]
async fn a_damaged_store_gives_a_clear_start_up_error_and_store_check_finds_it() {
    let mut hub = Hub::start("damaged").await;
    hub.create_device("d1").await;
    assert!(hub.terminate().success());
    let data = hub.data_dir();
    let (ok, out, err) = fleethub_on(&data, &["store", "check"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("device registry") && out.contains("3 rows"),
        "{out}"
    );

    let store = data.join("fleethub.redb");
    let healthy = std::fs::read(&store).unwrap();
    for (how, bytes) in [
        ("truncated", healthy[..healthy.len() / 2].to_vec()),
        ("garbage", vec![0x5a; 4096]),
    ] {
        std::fs::write(&store, &bytes).unwrap();
        let serve = [
            "serve",
            "--mqtt",
            "127.0.0.1:0",
            "--mqtts",
            "off",
            "--api",
            "127.0.0.1:0",
        ];
        let (ok, _, err) = fleethub_on(&data, &serve);
        assert!(!ok, "{how}: the hub must not start");
        assert!(
            err.contains("fleethub.redb") && err.contains("store check"),
            "{how}: {err}"
        );
        assert!(
            !err.contains("panicked") && !err.contains("backtrace"),
            "{how}: {err}"
        );
        let (ok, out, err) = fleethub_on(&data, &["store", "check"]);
        assert!(!ok, "{how}: store check must fail");
        assert!(
            out.contains("BAD") && out.contains("main store"),
            "{how}: {out}{err}"
        );
        assert!(!err.contains("panicked"), "{how}: {err}");
    }
    // The file was left as it was: evidence, and the operator's to move.
    assert_eq!(std::fs::read(&store).unwrap(), vec![0x5a; 4096]);
}

/// Opens `n` sockets to `addr` and writes `prefix` on each (then nothing).
async fn flood(addr: std::net::SocketAddr, n: usize, prefix: &[u8]) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    // All at once: opened one after another on a loaded machine, the first ones could reach
    // their deadline and free their slots before the last ones arrived, and fewer would be
    // refused than the test expects.
    let opens = (0..n).map(|_| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let _ = s.write_all(prefix).await;
        Some(s)
    });
    futures_util::future::join_all(opens)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Every socket the hub did not close within `within`.
async fn still_open(socks: &mut [tokio::net::TcpStream], within: std::time::Duration) -> usize {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + within;
    let mut open = 0;
    for s in socks.iter_mut() {
        let mut buf = [0u8; 512];
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => {
                    open += 1;
                    break;
                }
            }
        }
    }
    open
}

/// Slowloris on the API and silent sockets on MQTT: each listener has its own budget, so a
/// flood of one leaves the other working; the flood's sockets are closed (at once past the
/// cap, after the header or CONNECT deadline within it), and the flooded listener serves
/// again afterwards.
#[tokio::test]
async fn floods_of_the_api_and_of_mqtt_leave_the_other_working() {
    let dir = temp_dir("flood");
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        "[mqtt]\nconnect_timeout_secs = 4\nmax_pending_connections = 50\n[api]\nmax_connections = 50\nheader_read_timeout_secs = 4\n",
    )
    .unwrap();
    let hub = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
    let key = hub.create_device("d1").await;

    // The API flooded with half-sent requests: devices connect and publish meanwhile.
    let mut api_flood = flood(
        hub.endpoints.api,
        300,
        b"GET /health HTTP/1.1\r\nHost: x\r\n",
    )
    .await;
    let mut d = hub.device("d1", &key).await;
    d.client
        .publish(
            "devices/d1/messages/events/",
            rumqttc::QoS::AtLeastOnce,
            false,
            "x",
        )
        .await
        .unwrap();
    assert!(
        matches!(
            d.next(std::time::Duration::from_secs(5)).await,
            Some(crate::harness::Seen::PubAck(_))
        ),
        "a device publishes while the API is flooded"
    );
    let refused = hub
        .metric_reaching(
            "fleethub_api_connections_refused_total",
            200.0,
            std::time::Duration::from_secs(10),
        )
        .await;
    assert!(
        refused >= 200.0,
        "fleethub_api_connections_refused_total = {refused}"
    );
    assert_eq!(
        still_open(&mut api_flood, std::time::Duration::from_secs(15)).await,
        0,
        "every half-sent request was closed"
    );
    let (s, _) = hub.api(Method::GET, "/health", None).await;
    assert_eq!(s, 200, "the API serves again");
    drop(d);

    // MQTT flooded with sockets that never send CONNECT: the API works meanwhile.
    let mqtt = hub.endpoints.mqtt.unwrap();
    let mut mqtt_flood = flood(mqtt, 300, b"").await;
    let (s, _) = hub.api(Method::GET, "/health", None).await;
    assert_eq!(s, 200, "the API works while MQTT is flooded");
    let refused = hub
        .metric_reaching(
            "fleethub_mqtt_pending_refused_total",
            200.0,
            std::time::Duration::from_secs(10),
        )
        .await;
    assert!(
        refused >= 200.0,
        "fleethub_mqtt_pending_refused_total = {refused}"
    );
    assert_eq!(
        still_open(&mut mqtt_flood, std::time::Duration::from_secs(15)).await,
        0,
        "every silent socket was closed"
    );
    let mut d = hub.device("d1", &key).await;
    d.client
        .publish(
            "devices/d1/messages/events/",
            rumqttc::QoS::AtLeastOnce,
            false,
            "y",
        )
        .await
        .unwrap();
    assert!(matches!(
        d.next(std::time::Duration::from_secs(5)).await,
        Some(crate::harness::Seen::PubAck(_))
    ));
}

/// One byte damaged in the middle of a store-and-forward log file, at several places of a
/// record (its marker, its length, its body): exactly that record is lost and counted
/// (reason `corrupt`, in `/queues`, the metric and the log), every other acknowledged message
/// is recovered and delivered, and the damaged file is kept.
#[tokio::test]
async fn a_damaged_byte_in_the_queue_log_costs_one_counted_record() {
    // The queue's generation frames: marker, length, checksum, generation, payload.
    const MARKER: [u8; 4] = [0xF1, 0xEE, 0x7A, 0x52];
    for (place, delta) in [
        ("marker", 1usize),
        ("length", 6),
        ("generation", 15),
        ("body", 40),
    ] {
        let dir = temp_dir("log-damage");
        let config = dir.join("hub.toml");
        std::fs::write(
            &config,
            "[routes]\nsink = \"FROM /messages/* INTO BrokeredEndpoint(\\\"/modules/sink/inputs/in\\\")\"\n",
        )
        .unwrap();
        let mut hub = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
        let key = hub.create_device("dev").await;
        let sink_key = hub.create_module("fleethub", "sink").await;
        let mut d = hub.device("dev", &key).await;
        for i in 0..100 {
            d.client
                .publish(
                    format!("devices/dev/messages/events/seq={i}"),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    format!("message number {i} with some body text"),
                )
                .await
                .unwrap();
        }
        let mut acked = 0;
        while acked < 100 {
            match d.next(std::time::Duration::from_secs(10)).await {
                Some(crate::harness::Seen::PubAck(_)) => acked += 1,
                Some(_) => {}
                None => panic!("{acked} acknowledged"),
            }
        }
        hub.kill9();

        // Damage the 50th record of the log.
        let log_dir = hub.data_dir().join("queues.log");
        let file = std::fs::read_dir(&log_dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .expect("a log file");
        let mut bytes = std::fs::read(&file).unwrap();
        let markers: Vec<usize> = bytes
            .windows(4)
            .enumerate()
            .filter(|(_, w)| *w == MARKER)
            .map(|(i, _)| i)
            .collect();
        assert!(markers.len() >= 100, "{} records in the log", markers.len());
        bytes[markers[50] + delta] ^= 0x5a;
        std::fs::write(&file, &bytes).unwrap();

        let hub = hub.restart().await;
        let (_, queues) = hub.api(Method::GET, "/queues", None).await;
        assert_eq!(queues["corruptRecords"], 1, "{place}: {queues}");
        assert_eq!(queues["items"][0]["depth"], 99, "{place}: {queues}");
        assert_eq!(
            queues["damagedLogs"].as_array().unwrap().len(),
            1,
            "{place}: {queues}"
        );
        let kept = std::path::PathBuf::from(queues["damagedLogs"][0].as_str().unwrap());
        assert_eq!(
            std::fs::read(&kept).unwrap(),
            bytes,
            "{place}: the damaged file is kept as it was"
        );
        assert_eq!(
            hub.metric("fleethub_queue_dropped_total{reason=\"corrupt\",sink=\"(unreadable)\"}")
                .await,
            1.0,
            "{place}"
        );
        let mut sink = hub.device("fleethub/sink", &sink_key).await;
        sink.subscribe_many(&["devices/fleethub/modules/sink/inputs/#"])
            .await;
        let mut got = std::collections::BTreeSet::new();
        while let Some(p) = sink.next_publish(std::time::Duration::from_secs(3)).await {
            let bag = p.topic.rsplit_once('/').unwrap().1;
            let m = fleethub_router::Message::from_bag(bag, bytes::Bytes::new()).unwrap();
            got.insert(m.property("seq").unwrap().parse::<u32>().unwrap());
            if got.len() == 99 {
                break;
            }
        }
        assert_eq!(got.len(), 99, "{place}: every other message delivered");
        assert!(
            !got.contains(&50),
            "{place}: the damaged one is the one lost"
        );
    }
}

/// `fleethub backup` while a device publishes (routed to an offline module and to the events
/// endpoint) and twins are written, then `kill -9`, then a hub started on the copy: every
/// identity and key, every twin write and every message acknowledged before the backup
/// began is there, in the module's queue and in the events endpoint.
#[tokio::test]
async fn backup_under_load_then_kill_9_then_restore() {
    let dir = temp_dir("backup");
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        "[routes]\nsink = \"FROM /messages/* INTO BrokeredEndpoint(\\\"/modules/sink/inputs/in\\\")\"\narchive = \"FROM /messages/* INTO $events\"\n",
    )
    .unwrap();
    let mut hub = Hub::start_with(dir, &["--config", config.to_str().unwrap()]).await;
    let key = hub.create_device("dev").await;
    let sink_key = hub.create_module("fleethub", "sink").await;
    let (s, b) = hub
        .api(
            Method::PATCH,
            "/twins/dev",
            Some(json!({ "tags": { "site": "plant 7" }, "properties": { "desired": { "mark": "before" } } })),
        )
        .await;
    assert_eq!(s, 200, "{b}");

    // Load: QoS 1 telemetry as fast as acknowledged, counted.
    let mut d = hub.device("dev", &key).await;
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let publisher = {
        let client = d.client.clone();
        tokio::spawn(async move {
            for i in 0.. {
                if client
                    .publish(
                        format!("devices/dev/messages/events/seq={i}"),
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        "x",
                    )
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        })
    };
    let counter = {
        let acked = acked.clone();
        tokio::spawn(async move {
            while let Some(seen) = d.next(std::time::Duration::from_secs(30)).await {
                if let crate::harness::Seen::PubAck(_) = seen {
                    acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        })
    };
    while acked.load(std::sync::atomic::Ordering::SeqCst) < 200 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The hub acknowledges in order: the first `before` messages are 0..before.
    let before = acked.load(std::sync::atomic::Ordering::SeqCst);
    let restore_dir = temp_dir("restored");
    let copy = restore_dir.join("data");
    let (ok, out, err) = hub.fleethub(&format!("--output json backup {}", copy.display()));
    assert!(ok, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        report["queuedEntries"].as_u64().unwrap() >= before as u64,
        "{report}"
    );
    assert!(
        report["eventsEntries"].as_u64().unwrap() >= before as u64,
        "{report}"
    );
    assert!(
        report["tables"]["identities"].as_u64().unwrap() >= 3,
        "{report}"
    );
    // Writes after the backup began are not in it: that is fine.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    hub.kill9();
    publisher.abort();
    counter.abort();

    let restored = Hub::start_with(restore_dir, &["--config", config.to_str().unwrap()]).await;
    let (_, twin) = restored.api(Method::GET, "/twins/dev", None).await;
    assert_eq!(twin["properties"]["desired"]["mark"], "before", "{twin}");
    assert_eq!(twin["tags"]["site"], "plant 7", "{twin}");
    // The same keys: the device connects with its old key.
    let _ = restored.device("dev", &key).await;
    let mut sink = restored.device("fleethub/sink", &sink_key).await;
    sink.subscribe_many(&["devices/fleethub/modules/sink/inputs/#"])
        .await;
    let mut got = std::collections::BTreeSet::new();
    while let Some(p) = sink.next_publish(std::time::Duration::from_secs(3)).await {
        let bag = p.topic.rsplit_once('/').unwrap().1;
        let m = fleethub_router::Message::from_bag(bag, bytes::Bytes::new()).unwrap();
        got.insert(m.property("seq").unwrap().parse::<usize>().unwrap());
    }
    let missing: Vec<usize> = (0..before).filter(|s| !got.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged before the backup, missing after restore: {missing:?}"
    );

    // The events endpoint's copy: read from the start by the HTTP batch reader.
    let mut events = std::collections::BTreeSet::new();
    let mut after = 0;
    loop {
        let (s, page) = restored
            .api(
                Method::GET,
                &format!("/consumerGroups/$Default/events?max=1000&after={after}"),
                None,
            )
            .await;
        assert_eq!(s, 200, "{page}");
        let items = page["events"].as_array().unwrap();
        let Some(last) = items.last() else {
            break;
        };
        after = last["sequenceNumber"].as_u64().unwrap();
        for e in items {
            let seq = e["properties"]["seq"].as_str().unwrap();
            events.insert(seq.parse::<usize>().unwrap());
        }
    }
    let missing: Vec<usize> = (0..before).filter(|s| !events.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "events acknowledged before the backup, missing after restore: {missing:?}"
    );
}
