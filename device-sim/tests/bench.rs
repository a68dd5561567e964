//! `device-sim bench` end to end on a tiny load: every broker starts in its own process,
//! every message sent is received, idle connections are held and measured, and the JSON
//! summary carries the fields BENCHMARKS.md quotes.

use std::process::Command;

#[test]
fn bench_runs_every_broker_and_counts_every_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .args([
            "bench",
            "--devices",
            "3",
            "--messages",
            "200",
            "--hold",
            "50",
            "--segment-mib",
            "4",
            "--paced",
            "0.5",
            "--output",
            "json",
        ])
        .output()
        .expect("run device-sim");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    // mosquitto takes part when it is installed (.ci/run installs it); each broker's best
    // run is followed by one paced at half its rate.
    let mosquitto = std::path::Path::new("/usr/sbin/mosquitto").exists();
    let results = v["results"].as_array().unwrap();
    let names: Vec<&str> = results
        .iter()
        .filter_map(|r| r["target"].as_str())
        .collect();
    let mut expected = vec!["rumqttd", "rumqttd-paced", "fleethub", "fleethub-paced"];
    if mosquitto {
        expected.insert(2, "mosquitto");
        expected.insert(3, "mosquitto-paced");
    }
    assert_eq!(names, expected);
    for r in results {
        assert_eq!(r["qos"], 1, "{r}");
        assert_eq!(r["sent"], 600, "{r}");
        assert_eq!(r["received"], 600, "{r}");
        assert!(r["messages_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["p99_ms"].as_f64().unwrap() >= r["p50_ms"].as_f64().unwrap());
        // A single round has no earlier round whose messages could come again.
        assert_eq!(r["redelivered_from_earlier_rounds"], 0, "{r}");
        // Each broker is a process of its own: its CPU time is read from /proc.
        assert!(r["cpu_ns_per_message"].as_f64().unwrap() >= 0.0, "{r}");
    }
    // Paced at half the best rate, a device's 200th message cannot leave before 199
    // intervals of 3 / rate: a lower bound, whatever else the machine is doing.
    for pair in results.chunks(2) {
        let (best, paced) = (&pair[0], &pair[1]);
        let rate = best["messages_per_s"].as_f64().unwrap() * 0.5;
        let least = 199.0 * 3.0 / rate;
        let took = paced["elapsed_s"].as_f64().unwrap();
        assert!(
            took >= least * 0.99,
            "{paced}: {took} s, paced needs {least} s"
        );
    }
    let memory = v["memory"].as_array().unwrap();
    assert_eq!(memory.len(), expected.len() / 2, "{v}");
    for m in memory {
        assert_eq!(m["held"], 50, "{m}");
        assert!(m["rss_held_bytes"].as_u64().unwrap() > 0, "{m}");
        // Over 50 connections neither figure is a measurement (the allocator returns pages,
        // the registration's buffers are freed meanwhile); that they are taken is checked.
        if m["target"] == "fleethub" {
            assert!(m["heap_bytes_per_connection"].is_f64(), "{m}");
            assert!(m["heap_marginal_bytes_per_connection"].is_f64(), "{m}");
        }
    }
    assert!(v["ratios"][0]["fleethub_to_rumqttd"].as_f64().unwrap() > 0.0);
    if mosquitto {
        assert!(v["ratios"][0]["fleethub_to_mosquitto"].as_f64().unwrap() > 0.0);
    }
}

/// `--transports`: the same hub's devices over plain MQTT, TLS and WebSockets in turn, every
/// message counted on each, with the ratios to plain in the summary.
#[test]
fn bench_runs_fleethub_over_each_transport() {
    let out = Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .args([
            "bench",
            "--target",
            "fleethub",
            "--transports",
            "plain,tls,wss",
            "--devices",
            "3",
            "--messages",
            "200",
            "--segment-mib",
            "4",
            "--output",
            "json",
        ])
        .output()
        .expect("run device-sim");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    let results = v["results"].as_array().unwrap();
    let names: Vec<&str> = results
        .iter()
        .filter_map(|r| r["target"].as_str())
        .collect();
    assert_eq!(names, ["fleethub", "fleethub-tls", "fleethub-wss"]);
    for r in results {
        assert_eq!(r["sent"], 600, "{r}");
        assert_eq!(r["received"], 600, "{r}");
    }
    let ratios = &v["transport_ratios"][0];
    assert!(ratios["tls_to_plain"].as_f64().unwrap() > 0.0, "{v}");
    assert!(ratios["wss_to_plain"].as_f64().unwrap() > 0.0, "{v}");
}

/// `--backlog`: everything published and acknowledged first, then the events endpoint's
/// $Default group drained, every message counted.
#[test]
fn bench_drains_a_backlog_from_the_events_endpoint() {
    let out = Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .args([
            "bench",
            "--target",
            "fleethub",
            "--backlog",
            "--devices",
            "2",
            "--messages",
            "300",
            "--segment-mib",
            "4",
            "--output",
            "json",
        ])
        .output()
        .expect("run device-sim");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    let drain = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["target"] == "fleethub-drain")
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(drain["sent"], 600, "{drain}");
    assert_eq!(drain["received"], 600, "{drain}");
}

/// `bench-endpoints`: a real nats-server and PostgreSQL (both installed by .ci/run), a plain
/// client's writes and fleethub's through its endpoints, every message counted (the run
/// fails unless the stream and the table hold them all).
#[test]
fn bench_endpoints_writes_through_jetstream_and_postgres() {
    let installed = std::path::Path::new("/usr/sbin/nats-server").exists()
        && std::fs::read_dir("/usr/lib/postgresql").is_ok();
    if !installed {
        assert!(
            std::env::var_os("CI").is_none(),
            "nats-server and PostgreSQL must be installed under CI"
        );
        eprintln!("SKIPPED: nats-server or PostgreSQL is not installed");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .args([
            "bench-endpoints",
            "--devices",
            "2",
            "--messages",
            "300",
            "--json",
        ])
        .output()
        .expect("run device-sim");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    for endpoint in ["jetstream", "postgres"] {
        for key in ["plain_client_per_s", "fleethub_per_s"] {
            assert!(v[endpoint][key].as_f64().unwrap() > 0.0, "{v}");
        }
    }
}
