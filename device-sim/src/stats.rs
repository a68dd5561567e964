//! What a run counts, shared by every simulated identity. Counters are atomics (thousands of
//! tasks bump them); latencies go into HDR histograms, which keep percentiles exact to three
//! significant digits in fixed memory however long the run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Microseconds since the UNIX epoch: what a message carries as its send time
/// (`simSentUs`), comparable wherever this process receives it.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Latencies in microseconds, 1 µs to 1 hour.
pub struct Latency(Mutex<Histogram<u64>>);

impl Latency {
    fn new() -> Latency {
        Latency(Mutex::new(
            Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
        ))
    }

    pub fn record_since(&self, sent_us: u64) {
        self.record(now_us().saturating_sub(sent_us));
    }

    pub fn record(&self, micros: u64) {
        if let Ok(mut h) = self.0.lock() {
            h.saturating_record(micros.max(1));
        }
    }

    /// (count, p50, p99, max) in milliseconds.
    pub fn summary(&self) -> (u64, f64, f64, f64) {
        match self.0.lock() {
            Ok(h) if !h.is_empty() => (
                h.len(),
                h.value_at_quantile(0.50) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
                h.max() as f64 / 1000.0,
            ),
            _ => (0, 0.0, 0.0, 0.0),
        }
    }
}

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub struct Stats {
    /// Identities connected right now.
    pub connected: Counter,
    /// Highest `connected` seen.
    pub peak_connected: Counter,
    /// Telemetry published (handed to the connection).
    pub sent: Counter,
    /// QoS 1 telemetry the hub acknowledged.
    pub acked: Counter,
    /// The fleet's telemetry seen at the hub's service endpoint.
    pub monitor_received: Counter,
    /// Messages arriving on module inputs (device modules and hub modules).
    pub input_received: Counter,
    pub c2d_received: Counter,
    /// Messages hub modules republished on their output.
    pub forwarded: Counter,
    pub errors: Counter,
    pub reconnects: Counter,
    pub methods_answered: Counter,
    /// Desired patches that arrived at devices after a push.
    pub desired_received: Counter,
    pub reported_success: Counter,
    pub reported_failed: Counter,
    /// Distinct messages the simulated upstream received, and repeats of them.
    pub upstream_received: Counter,
    pub upstream_duplicates: Counter,
    /// Telemetry send → arrival (monitor, module inputs, upstream).
    pub latency: Latency,
    /// Desired push started → patch arrived at the device.
    pub desired_latency: Latency,
    /// Desired push started → the hub acknowledged the device's success report.
    pub reported_latency: Latency,
    /// When the latest desired push started.
    pub push_started: Mutex<Option<Instant>>,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            connected: Counter::default(),
            peak_connected: Counter::default(),
            sent: Counter::default(),
            acked: Counter::default(),
            monitor_received: Counter::default(),
            input_received: Counter::default(),
            c2d_received: Counter::default(),
            forwarded: Counter::default(),
            errors: Counter::default(),
            reconnects: Counter::default(),
            methods_answered: Counter::default(),
            desired_received: Counter::default(),
            reported_success: Counter::default(),
            reported_failed: Counter::default(),
            upstream_received: Counter::default(),
            upstream_duplicates: Counter::default(),
            latency: Latency::new(),
            desired_latency: Latency::new(),
            reported_latency: Latency::new(),
            push_started: Mutex::new(None),
        }
    }

    pub fn connected(&self) {
        let now = self.connected.0.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_connected.0.fetch_max(now, Ordering::Relaxed);
    }

    /// Everything that arrived anywhere this process listens.
    pub fn received(&self) -> u64 {
        self.monitor_received.get()
            + self.input_received.get()
            + self.c2d_received.get()
            + self.upstream_received.get()
    }

    pub fn desired_arrived(&self) {
        self.desired_received.inc();
        let started = self.push_started.lock().ok().and_then(|s| *s);
        if let Some(started) = started {
            self.desired_latency
                .record(started.elapsed().as_micros() as u64);
        }
    }

    /// A success report was acknowledged.
    pub fn reported_ok(&self) {
        self.reported_success.inc();
        let started = self.push_started.lock().ok().and_then(|s| *s);
        if let Some(started) = started {
            self.reported_latency
                .record(started.elapsed().as_micros() as u64);
        }
    }

    pub fn received_by(&self) -> Value {
        json!({
            "monitor": self.monitor_received.get(),
            "inputs": self.input_received.get(),
            "c2d": self.c2d_received.get(),
            "upstream": self.upstream_received.get(),
        })
    }
}
