//! The property bag per message, as the hub handles it on the telemetry path: parsed once at
//! the edge (`from_bag`), written back once for the queue (`to_bag`), with the system
//! properties the hub adds (connection ids, enqueued time).
//!
//! `cargo bench -p fleethub-router --bench bag`

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use fleethub_router::Message;

/// What the Azure IoT SDKs put in a telemetry topic: content type and encoding, a message id,
/// two application properties (one of them needing escapes).
const SDK_BAG: &str =
    "%24.ct=application%2Fjson&%24.ce=utf-8&%24.mid=6f1c2b0e-5a7d-4c1e-9b1a-0d9e8f7a6b5c&severity=high&site%20name=plant%2012";

fn bench(c: &mut Criterion) {
    let body = Bytes::from_static(br#"{"temperature": 31.5}"#);
    let mut g = c.benchmark_group("property bag per message");
    g.bench_function("from_bag (SDK telemetry bag)", |b| {
        b.iter(|| Message::from_bag(black_box(SDK_BAG), body.clone()))
    });
    let mut m = Message::from_bag(SDK_BAG, body.clone()).expect("the bench's bag parses");
    m.system.connection_device_id = Some("sensor-0042".into());
    m.system.enqueued_time = Some("2026-11-29T12:00:00.123Z".into());
    g.bench_function("to_bag (with the hub's system properties)", |b| {
        b.iter(|| black_box(&m).to_bag())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
