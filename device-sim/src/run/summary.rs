//! What a run measured: the progress line while it runs, and the summary (JSON, or text for
//! a person).

use std::time::Instant;

use serde_json::{json, Value};

use super::progress;
use crate::scenario::Plan;
use crate::stats::Stats;

/// Everything the summary reports besides the counters in [`Stats`].
pub struct Measured<'a> {
    pub plan: &'a Plan,
    pub stats: &'a Stats,
    /// Devices played (registered or from connection strings).
    pub devices: usize,
    /// Identities played.
    pub total: u64,
    pub connected_after_ramp: u64,
    pub connected_at_end: u64,
    pub connect_secs: f64,
    pub expected_sent: u64,
    pub send_secs: f64,
    pub memory_before: Option<u64>,
    pub memory_connected: Option<u64>,
    /// What the scenario's deployment follower saw.
    pub deployment: Option<Value>,
    /// Whether a simulated upstream took part.
    pub upstream: bool,
}

pub fn summarize(m: Measured<'_>) -> Value {
    let Measured {
        plan,
        stats,
        devices,
        total,
        connected_after_ramp,
        connected_at_end,
        connect_secs,
        expected_sent,
        send_secs,
        memory_before,
        memory_connected,
        deployment,
        upstream,
    } = m;
    let (count, p50, p99, max) = stats.latency.summary();
    let (desired_count, desired_p50, _, desired_max) = stats.desired_latency.summary();
    let (reported_count, reported_p50, _, reported_max) = stats.reported_latency.summary();
    let per_connection = match (memory_before, memory_connected) {
        (Some(b), Some(a)) if connected_after_ramp > 0 => {
            Some(a.saturating_sub(b) / connected_after_ramp)
        }
        _ => None,
    };
    let mut summary = json!({
        "scenario": plan.name,
        "devices": plan.devices.max(devices),
        "identities": total,
        "connected": connected_after_ramp,
        "peak_connected": stats.peak_connected.get(),
        "connected_at_end": connected_at_end,
        "connect_s": connect_secs,
        "sent": stats.sent.get(),
        "expected_sent": expected_sent,
        "acked": stats.acked.get(),
        "received": stats.received(),
        "received_by": stats.received_by(),
        "forwarded": stats.forwarded.get(),
        "errors": stats.errors.get(),
        "reconnects": stats.reconnects.get(),
        "methods_answered": stats.methods_answered.get(),
        "send_s": send_secs,
        "sent_per_s": stats.sent.get() as f64 / send_secs.max(1e-9),
        "latency_samples": count,
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": max,
        "desired": {
            "received": stats.desired_received.get(),
            "reported_success": stats.reported_success.get(),
            "reported_failed": stats.reported_failed.get(),
            "after_push_p50_ms": if desired_count > 0 { json!(desired_p50) } else { Value::Null },
            "after_push_max_ms": if desired_count > 0 { json!(desired_max) } else { Value::Null },
            "reported_after_push_p50_ms": if reported_count > 0 { json!(reported_p50) } else { Value::Null },
            "reported_after_push_max_ms": if reported_count > 0 { json!(reported_max) } else { Value::Null },
        },
        "hub_memory": {
            "before_bytes": memory_before,
            "connected_bytes": memory_connected,
            "per_connection_bytes": per_connection,
        },
    });
    if let Some(d) = deployment {
        summary["deployment"] = d;
    }
    if upstream {
        summary["upstream"] = json!({
            "received": stats.upstream_received.get(),
            "duplicates": stats.upstream_duplicates.get(),
            "missing": stats.acked.get().saturating_sub(stats.upstream_received.get()),
        });
    }
    summary
}

pub fn progress_line(stats: &Stats, start: Instant, total: u64, prev: (u64, u64)) -> (u64, u64) {
    let (sent, received) = (stats.sent.get(), stats.received());
    let (_, p50, p99, _) = stats.latency.summary();
    progress(format!(
        "[{:>4.0}s] connected {}/{}  sent {} ({}/s)  received {} ({}/s)  errors {}  p50 {:.1} ms  p99 {:.1} ms",
        start.elapsed().as_secs_f64(),
        stats.connected.get(),
        total,
        sent,
        sent - prev.0,
        received,
        received.saturating_sub(prev.1),
        stats.errors.get(),
        p50,
        p99
    ));
    (sent, received)
}

pub fn print_summary(s: &Value) {
    println!("scenario         {}", s["scenario"].as_str().unwrap_or(""));
    println!(
        "devices          {} ({} identities), connected {} in {:.1} s",
        s["devices"],
        s["identities"],
        s["connected"],
        s["connect_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "telemetry        sent {} (acked {}) in {:.1} s, {:.0}/s",
        s["sent"],
        s["acked"],
        s["send_s"].as_f64().unwrap_or(0.0),
        s["sent_per_s"].as_f64().unwrap_or(0.0)
    );
    println!("received         {} {}", s["received"], s["received_by"]);
    println!(
        "latency          p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        s["p50_ms"].as_f64().unwrap_or(0.0),
        s["p99_ms"].as_f64().unwrap_or(0.0),
        s["max_ms"].as_f64().unwrap_or(0.0)
    );
    println!("desired          {}", s["desired"]);
    println!(
        "errors           {} (reconnects {}), methods answered {}, forwarded {}",
        s["errors"], s["reconnects"], s["methods_answered"], s["forwarded"]
    );
    if let Some(per) = s["hub_memory"]["per_connection_bytes"].as_u64() {
        println!(
            "hub memory       {} MiB connected, {:.1} KiB per connection",
            s["hub_memory"]["connected_bytes"].as_u64().unwrap_or(0) / (1024 * 1024),
            per as f64 / 1024.0
        );
    }
    if !s["upstream"].is_null() {
        println!("upstream         {}", s["upstream"]);
    }
}
