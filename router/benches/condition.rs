//! Route condition evaluation per message, as the hub runs it: a fresh message context per
//! message (so the JSON body is parsed once, inside the measurement), conditions compiled once.
//! Beside them, the same typical check written by hand in Rust (the floor).
//!
//! `cargo bench -p fleethub-router --bench condition`

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use fleethub_router::context::MessageContext;
use fleethub_router::route::RouteCondition;
use fleethub_router::{Message, SystemProperties};

fn message() -> Message {
    Message {
        body: Bytes::from_static(
            br#"{"temperature": 31.5, "humidity": 40, "name": "Pump-7", "delta": -0.75, "site": "plant-12", "readings": [10, 20, 30], "ok": true}"#,
        ),
        properties: vec![
            ("severity".into(), Some("high".into())),
            ("zone".into(), Some("north".into())),
        ],
        system: SystemProperties {
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            connection_device_id: Some("sensor-0042".into()),
            ..Default::default()
        },
    }
}

fn bench(c: &mut Criterion) {
    let m = message();
    // edgeHub's language has no IN: the same lists are written as OR.
    let props_only =
        RouteCondition::parse("severity = 'high' AND (zone = 'north' OR zone = 'east')").unwrap();
    let typical = RouteCondition::parse("$body.temperature > 30 AND severity = 'high'").unwrap();
    let heavy = RouteCondition::parse(
        "$body.temperature > 30 AND $body.humidity < 80 AND (severity = 'high' OR severity = 'critical' OR CONTAINS(LOWER($body.name), 'pump')) \
         AND $connectionDeviceId != 'test' AND ABS($body.delta) * 2 >= 1 AND STARTS_WITH($body.site, 'plant') AND $body.readings[2] = 30",
    )
    .unwrap();
    for c in [&props_only, &typical, &heavy] {
        assert!(c.matches(&MessageContext::new(&m, false, false)));
    }
    let mut g = c.benchmark_group("route condition per message");
    g.bench_function("properties only", |b| {
        b.iter(|| props_only.matches(&MessageContext::new(black_box(&m), false, false)))
    });
    g.bench_function("typical ($body + property)", |b| {
        b.iter(|| typical.matches(&MessageContext::new(black_box(&m), false, false)))
    });
    g.bench_function("heavy (7 clauses, functions)", |b| {
        b.iter(|| heavy.matches(&MessageContext::new(black_box(&m), false, false)))
    });
    g.bench_function("three routes on one message (body parsed once)", |b| {
        b.iter(|| {
            let ctx = MessageContext::new(black_box(&m), false, false);
            props_only.matches(&ctx) as u8 + typical.matches(&ctx) as u8 + heavy.matches(&ctx) as u8
        })
    });
    g.bench_function(
        "baseline: typical check hand-written (serde_json + compare)",
        |b| {
            b.iter(|| {
                let m = black_box(&m);
                let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap_or_default();
                body.get("temperature")
                    .and_then(|t| t.as_f64())
                    .is_some_and(|t| t > 30.0)
                    && m.property("severity") == Some("high")
            })
        },
    );
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
