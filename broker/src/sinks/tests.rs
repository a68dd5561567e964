//! The queue reader every driver delivers through (pure logic, over the memory queue). The
//! drivers themselves share one end-to-end test list: `tests/e2e/sinks.rs`.

use fleethub_router::queue::{Limits, MemoryQueue, NewEntry, Queue};

use super::{QueueReader, SinkId};
use crate::metrics::Metrics;

fn queue_with(sink: &str, n: usize) -> MemoryQueue {
    let q = MemoryQueue::new(Limits::default());
    let entries = (0..n)
        .map(|i| NewEntry {
            sink: sink.to_string(),
            priority: 0,
            ttl_ms: 3_600_000,
            bag: format!("seq={i}"),
            body: bytes::Bytes::from(i.to_string()),
        })
        .collect();
    appended(q.append(entries, 1));
    q
}

/// The memory queue's append completes at once.
fn appended(f: fleethub_router::queue::AppendFuture) {
    use std::task::{Context, Poll, Waker};
    let mut f = f;
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r.expect("append"),
        Poll::Pending => panic!("the memory queue appends at once"),
    }
}

fn bags(entries: &[fleethub_router::queue::Entry]) -> Vec<&str> {
    entries.iter().map(|e| e.bag.as_str()).collect()
}

#[test]
fn reads_within_the_window_and_goes_on_after_acknowledgements() {
    let q = queue_with("s", 5);
    let mut r = QueueReader::new(2);
    let first = r.read(&q, "s", 2).unwrap();
    assert_eq!(bags(&first), ["seq=0", "seq=1"]);
    assert_eq!(r.room(), 0);
    assert!(r.read(&q, "s", 2).unwrap().is_empty(), "the window is full");
    r.acked(first[0].key.clone());
    assert_eq!(r.room(), 1);
    assert_eq!(bags(&r.read(&q, "s", 2).unwrap()), ["seq=2"]);
}

#[test]
fn acknowledged_entries_leave_the_queue_only_at_flush_and_are_counted() {
    let q = queue_with("s", 3);
    let metrics = Metrics::new();
    let mut r = QueueReader::new(10);
    let read = r.read(&q, "s", 2).unwrap();
    for e in &read[..2] {
        r.acked(e.key.clone());
    }
    assert!(r.has_acked());
    assert_eq!(
        q.sinks(),
        vec![("s".to_string(), 3)],
        "nothing removed before the flush"
    );
    assert_eq!(r.flush(&q, &metrics), 2);
    assert_eq!(q.sinks(), vec![("s".to_string(), 1)]);
    assert_eq!(
        metrics
            .sink_messages
            .with_label_values(&["s", "delivered"])
            .get(),
        2
    );
    assert_eq!(r.flush(&q, &metrics), 0, "a second flush has nothing to do");
}

#[test]
fn an_acknowledgement_for_something_not_in_flight_is_ignored() {
    let q = queue_with("s", 1);
    let metrics = Metrics::new();
    let mut r = QueueReader::new(10);
    let other = queue_with("s", 1)
        .peek("s", &Default::default(), 1, 2)
        .unwrap();
    r.acked(other.entries[0].key.clone());
    assert!(!r.has_acked());
    assert_eq!(r.flush(&q, &metrics), 0);
}

#[test]
fn released_entries_are_read_again_and_a_rewind_starts_from_the_head() {
    let q = queue_with("s", 4);
    let mut r = QueueReader::new(10);
    let read = r.read(&q, "s", 2).unwrap();
    assert_eq!(read.len(), 4);
    // The last two could not be handed out.
    r.release(read[2..].iter().map(|e| e.key.clone()));
    assert_eq!(r.in_flight(), 2);
    assert_eq!(bags(&r.read(&q, "s", 2).unwrap()), ["seq=2", "seq=3"]);
    // Nothing new after the cursor; a rewind looks from the head, skipping what is in flight.
    assert!(r.read(&q, "s", 2).unwrap().is_empty());
    r.rewind();
    assert!(
        r.read(&q, "s", 2).unwrap().is_empty(),
        "all four are in flight"
    );
}

#[test]
fn sink_ids_name_their_queues_as_iot_edge_does() {
    use fleethub_router::route::Sink;
    let m = SinkId::from_route(&Sink::ModuleInput {
        module: "filter".into(),
        input: "in1".into(),
    })
    .unwrap();
    assert_eq!(m.to_string(), "/modules/filter/inputs/in1");
    assert_eq!(
        SinkId::from_route(&Sink::Upstream).unwrap().to_string(),
        "$upstream"
    );
    assert!(
        SinkId::from_route(&Sink::ModuleInput {
            module: "not a module".into(),
            input: "x".into(),
        })
        .is_err(),
        "a module name that can never connect is no sink"
    );
}
