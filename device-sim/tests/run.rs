//! `device-sim run` against a real hub (the fleethub library's `run`, serving on ephemeral
//! ports in a temp data directory), checked through the run's JSON summary and the hub's API.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

mod support;
use support::*;

/// A pipeline scenario: devices' even readings go to `filter`, which forwards them to `sink`;
/// device modules send too (and are kept out of the pipeline by the route). Mid-run the test
/// invokes a method and sends a C2D message, and the scenario pushes a desired property.
#[test]
fn a_pipeline_scenario_counts_what_the_routes_deliver() {
    let hub = Hub::start("");
    let path = scenario(
        &hub.dir,
        r#"
name = "pipeline"
[fleet]
devices = 4
modules_per_device = 1
id_prefix = "t-"
connect_rate = 100
c2d = true
[telemetry]
rate = "20/s"
duration = "3s"
qos = 1
[telemetry.body]
seq = { "$counter" = {} }
temp = { "$drift" = { start = 20.0, step = 1.0, min = 0.0, max = 40.0 } }
[desired]
apply_delay = "100ms"
[[desired.push]]
at = "1s"
properties = { mode = "eco" }
[[hub_modules]]
id = "filter"
forward_to = "out"
[[hub_modules]]
id = "sink"
[routes]
even = 'FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId) AND $body.seq % 2 = 0 INTO BrokeredEndpoint("/modules/filter/inputs/in")'
chain = 'FROM /messages/modules/filter/outputs/out INTO BrokeredEndpoint("/modules/sink/inputs/in")'
"#,
    );
    let data_dir = hub.data_dir();
    let mut child = run_scenario(&path, &data_dir, &[]);
    wait_connected(&hub, "t-2", &mut child);
    let (status, answer) = hub.call(
        reqwest::Method::POST,
        "/devices/t-2/methods",
        Some(
            json!({ "methodName": "ping", "payload": { "n": 7 }, "responseTimeoutInSeconds": 10 }),
        ),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(answer["payload"]["request"]["n"], 7, "{answer}");
    assert_eq!(answer["payload"]["method"], "ping", "{answer}");
    let (status, v) = hub.call(
        reqwest::Method::POST,
        "/devices/t-1/messages",
        Some(json!({ "body": "hello" })),
    );
    assert!(status < 300, "{status} {v}");

    let s = summary(child);
    // 8 senders (4 devices, 4 device modules) x 20/s x 3 s = 60 each.
    assert_eq!(s["identities"], 10, "{s}");
    assert_eq!(s["connected"], 10, "{s}");
    assert_eq!(s["sent"], 480, "{s}");
    // Telemetry and filter's forwards, all acknowledged.
    assert_eq!(s["acked"], 600, "{s}");
    assert_eq!(s["received_by"]["monitor"], 480, "{s}");
    // Devices' even readings: 4 x 30; each reaches filter and, forwarded, sink.
    assert_eq!(s["forwarded"], 120, "{s}");
    assert_eq!(s["received_by"]["inputs"], 240, "{s}");
    assert_eq!(s["received_by"]["c2d"], 1, "{s}");
    assert_eq!(s["methods_answered"], 1, "{s}");
    assert_eq!(s["errors"], 0, "{s}");
    assert_eq!(s["desired"]["received"], 4, "{s}");
    assert_eq!(s["desired"]["reported_success"], 4, "{s}");
    assert!(s["p99_ms"].as_f64().unwrap() >= s["p50_ms"].as_f64().unwrap());
    // Monitor and both inputs measure each arrival.
    assert_eq!(s["latency_samples"], 720, "{s}");
    // The devices really reported: the hub's twin carries their status for the pushed version.
    let (_, twin) = hub.call(reqwest::Method::GET, "/twins/t-3", None);
    let reported = &twin["properties"]["reported"];
    assert_eq!(reported["lastDesiredStatus"]["code"], 200, "{twin}");
    assert_eq!(
        reported["lastDesiredVersion"], twin["properties"]["desired"]["$version"],
        "{twin}"
    );
}

/// The outage scenario in small: every message goes upstream, the link is cut for 2 s, and
/// every message the hub acknowledged arrives upstream afterwards.
#[test]
fn an_upstream_outage_loses_nothing_the_hub_acknowledged() {
    let upstream = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let hub = Hub::start(&format!(
        "[routes]\nall = \"FROM /messages/* INTO $upstream\"\n[upstream]\nenabled = true\naddress = \"{upstream}\"\n"
    ));
    let path = scenario(
        &hub.dir,
        r#"
name = "outage"
[fleet]
devices = 5
id_prefix = "o-"
twin = false
[telemetry]
rate = "20/s"
duration = "5s"
[upstream]
listen = "127.0.0.1:18830"
[[upstream.outage]]
at = "1s"
for = "2s"
"#,
    );
    let data_dir = hub.data_dir();
    let upstream_arg = upstream.to_string();
    let child = run_scenario(&path, &data_dir, &["--upstream-listen", &upstream_arg]);
    let s = summary(child);
    assert_eq!(s["sent"], 500, "{s}");
    assert_eq!(s["acked"], 500, "{s}");
    assert_eq!(s["upstream"]["received"], 500, "{s}");
    assert_eq!(s["upstream"]["missing"], 0, "{s}");
    // During the outage messages waited: the slowest took at least most of the outage.
    assert!(s["max_ms"].as_f64().unwrap() > 1000.0, "{s}");
}

#[test]
fn a_bad_scenario_is_refused_with_the_field_named() {
    let dir = std::env::temp_dir().join(format!("device-sim-bad-{:x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = scenario(
        &dir,
        "[telemetry.body]\nt = { \"$drfit\" = { start = 1 } }\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .args(["run", "--scenario", path.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("telemetry.body.t.$drfit: unknown generator"),
        "{err}"
    );
}

/// Without the API: identities from connection strings, the MQTT address given, no token.
#[test]
fn connection_strings_run_a_fleet_without_the_api() {
    let hub = Hub::start("");
    let mut lines = String::from("# two devices registered elsewhere\n");
    for id in ["cs-a", "cs-b"] {
        let (status, v) = hub.call(
            reqwest::Method::POST,
            "/devices",
            Some(json!({ "deviceId": id })),
        );
        assert_eq!(status, 201, "{v}");
        let key = v["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap();
        lines.push_str(&format!(
            "HostName=localhost;DeviceId={id};SharedAccessKey={key}\n"
        ));
    }
    let strings = hub.dir.join("devices.txt");
    std::fs::write(&strings, lines).unwrap();
    let path = scenario(
        &hub.dir,
        "[fleet]\nmonitor = false\n[telemetry]\nrate = \"10/s\"\nduration = \"1s\"\n",
    );
    let endpoints: Value = serde_json::from_str(
        &std::fs::read_to_string(hub.data_dir().join("endpoints.json")).unwrap(),
    )
    .unwrap();
    let child = device_sim(&[
        "run",
        "--scenario",
        path.to_str().unwrap(),
        "--connection-strings",
        strings.to_str().unwrap(),
        "--mqtt",
        endpoints["mqtt"].as_str().unwrap(),
        // A data directory with no token in it: nothing may need the API.
        "--data-dir",
        hub.dir.to_str().unwrap(),
        "--output",
        "json",
    ]);
    let s = summary(child);
    assert_eq!(s["identities"], 2, "{s}");
    assert_eq!(s["connected"], 2, "{s}");
    assert_eq!(s["sent"], 20, "{s}");
    assert_eq!(s["acked"], 20, "{s}");
    assert_eq!(s["errors"], 0, "{s}");
    // The hub saw them: both devices have been active.
    for id in ["cs-a", "cs-b"] {
        let (_, v) = hub.call(reqwest::Method::GET, &format!("/devices/{id}"), None);
        assert!(v["lastActivityTime"].is_string(), "{v}");
    }
}

/// The hub goes away mid-run and comes back on the same address: every device reconnects
/// (with backoff) and finishes its telemetry; nothing the hub acknowledged is counted twice.
#[test]
fn devices_reconnect_when_the_hub_restarts() {
    let hub = Hub::start("");
    let path = scenario(
        &hub.dir,
        "[fleet]\ndevices = 5\nid_prefix = \"r-\"\nmonitor = false\n\
         [telemetry]\nrate = \"10/s\"\nduration = \"6s\"\n",
    );
    let data_dir = hub.data_dir();
    let mut child = run_scenario(&path, &data_dir, &[]);
    wait_connected(&hub, "r-4", &mut child);
    std::thread::sleep(Duration::from_secs(2));
    let hub = hub.restart_after(Duration::from_secs(1));
    let s = summary(child);
    assert_eq!(s["sent"], 300, "{s}");
    assert!(s["reconnects"].as_u64().unwrap() >= 5, "{s}");
    assert_eq!(s["connected_at_end"], 5, "{s}");
    // What was in flight when the hub stopped is sent again after the reconnect.
    assert!(s["acked"].as_u64().unwrap() >= 300, "{s}");
    let (_, v) = hub.call(reqwest::Method::GET, "/devices/r-0", None);
    assert_eq!(v["connectionState"], "Disconnected", "{v}");
}
