//! `device-sim bench` end to end on a tiny load: both brokers start, every message sent is
//! received, and the JSON summary carries the fields BENCHMARKS.md quotes.

use std::process::Command;

#[test]
fn bench_runs_both_targets_and_counts_every_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .args([
            "bench",
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
    assert_eq!(results.len(), 2);
    for r in results {
        assert_eq!(r["sent"], 600, "{r}");
        assert_eq!(r["received"], 600, "{r}");
        assert!(r["messages_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["p99_ms"].as_f64().unwrap() >= r["p50_ms"].as_f64().unwrap());
    }
    assert!(v["ratio_fleethub_to_rumqttd"].as_f64().unwrap() > 0.0);
}
