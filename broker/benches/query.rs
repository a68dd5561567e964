//! Twin query evaluation over 100,000 twins: the parsed IoT Hub query (as `POST /twins/query`
//! runs it) beside a hand-written Rust filter doing the same comparisons, the floor.
//!
//! `cargo bench -p fleethub --bench query`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use fleethub::identity::IdentityKey;
use fleethub::twin::view::QueryView;
use fleethub::twin::Twin;
use fleethub_router::condition::query::Query;
use serde_json::{json, Map, Value};

const TWINS: usize = 100_000;

fn fleet() -> Vec<(IdentityKey, Twin)> {
    let regions = ["US", "EU", "APAC"];
    (0..TWINS)
        .map(|i| {
            let mut twin = Twin::new();
            let tags: Map<String, Value> =
                json!({"location": {"region": regions[i % 3], "plant": i % 17}})
                    .as_object()
                    .cloned()
                    .unwrap();
            twin.patch_tags(&tags);
            let reported = json!({"fw": (i % 5) as u64, "battery": 40 + i % 60})
                .as_object()
                .cloned()
                .unwrap();
            twin.reported
                .apply(&reported, "2026-01-01T00:00:00Z", false);
            (IdentityKey::parse(&format!("device-{i:06}")).unwrap(), twin)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let twins = fleet();
    let query = Query::parse(
        "SELECT * FROM devices WHERE tags.location.region = 'US' AND properties.reported.fw >= 2",
    )
    .unwrap();
    let expected = twins
        .iter()
        .filter(|(k, t)| {
            query.matches_with(&QueryView {
                key: k,
                twin: t,
                device_group: None,
            })
        })
        .count();
    assert!(expected > 10_000);

    let mut group = c.benchmark_group("twin query, 100k twins");
    group.sample_size(20);
    group.bench_function("fleethub query engine", |b| {
        b.iter(|| {
            twins
                .iter()
                .filter(|(k, t)| {
                    query.matches_with(&QueryView {
                        key: black_box(k),
                        twin: t,
                        device_group: None,
                    })
                })
                .count()
        })
    });
    group.bench_function("baseline: hand-written Rust filter", |b| {
        b.iter(|| {
            twins
                .iter()
                .filter(|(_, t)| {
                    let region = t
                        .tags
                        .get("location")
                        .and_then(|l| l.get("region"))
                        .and_then(|r| r.as_str());
                    let fw = t
                        .reported
                        .tree()
                        .get("fw")
                        .and_then(|f| f.as_leaf()?.as_f64());
                    region == Some("US") && fw.is_some_and(|f| f >= 2.0)
                })
                .count()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
