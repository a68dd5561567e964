//! One test list, run against every queue implementation.

use std::collections::HashSet;

use super::*;

fn entry(sink: &str, priority: u8, ttl_ms: u64, body: &str) -> NewEntry {
    NewEntry {
        sink: sink.into(),
        priority,
        ttl_ms,
        bag: format!("n={body}"),
        body: Bytes::copy_from_slice(body.as_bytes()),
    }
}

fn bodies(p: &Peeked) -> Vec<String> {
    p.entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.body).into_owned())
        .collect()
}

/// Appends `m0`, `m1`, … one by one to sink `s` (priority 0, long-lived).
async fn append_numbered(q: &dyn Queue, n: usize) {
    for i in 0..n {
        q.append(vec![entry("s", 0, 1_000_000, &format!("m{i}"))], 1)
            .await
            .unwrap();
    }
}

/// Waits until every earlier job is applied (an empty append goes through the same path).
async fn settle(q: &dyn Queue) {
    q.append(Vec::new(), 0).await.unwrap();
}

async fn priority_then_arrival(q: &dyn Queue) {
    q.append(
        vec![
            entry("s", 5, 60_000, "a"),
            entry("s", 0, 60_000, "b"),
            entry("s", 5, 60_000, "c"),
        ],
        1000,
    )
    .await
    .unwrap();
    q.append(
        vec![entry("s", 0, 60_000, "d"), entry("other", 0, 60_000, "x")],
        1000,
    )
    .await
    .unwrap();
    let p = q.peek("s", &KeySet::default(), 10, 2000).unwrap();
    assert_eq!(bodies(&p), ["b", "d", "a", "c"]);
}

async fn in_flight_is_skipped_and_live_high_priority_jumps_the_backlog(q: &dyn Queue) {
    for i in 0..5 {
        q.append(vec![entry("s", 5, 60_000, &format!("old{i}"))], 1000)
            .await
            .unwrap();
    }
    let first = q.peek("s", &KeySet::default(), 2, 2000).unwrap();
    assert_eq!(bodies(&first), ["old0", "old1"]);
    let in_flight: KeySet = first.entries.iter().map(|e| e.key.clone()).collect();
    q.append(vec![entry("s", 0, 60_000, "live")], 2000)
        .await
        .unwrap();
    let next = q.peek("s", &in_flight, 2, 2000).unwrap();
    assert_eq!(bodies(&next), ["live", "old2"]);
}

async fn cursor_continues_and_restart_finds_new_high_priority(q: &dyn Queue) {
    for i in 0..6 {
        q.append(vec![entry("s", 5, 60_000, &format!("b{i}"))], 1)
            .await
            .unwrap();
    }
    let none = KeySet::default();
    let first = q.peek_after("s", None, &none, 2, 2).unwrap();
    assert_eq!(bodies(&first), ["b0", "b1"]);
    let cursor = first.entries.last().unwrap().key.clone();
    let next = q.peek_after("s", Some(&cursor), &none, 2, 2).unwrap();
    assert_eq!(
        bodies(&next),
        ["b2", "b3"],
        "continues after the cursor, nothing skipped or repeated"
    );
    q.append(vec![entry("s", 0, 60_000, "urgent")], 3)
        .await
        .unwrap();
    let cursor = next.entries.last().unwrap().key.clone();
    assert_eq!(
        bodies(&q.peek_after("s", Some(&cursor), &none, 1, 3).unwrap()),
        ["b4"],
        "behind the cursor: not seen"
    );
    assert_eq!(
        bodies(&q.peek_after("s", None, &none, 1, 3).unwrap()),
        ["urgent"],
        "a restart from the head finds it"
    );
}

async fn removal_and_stats(q: &dyn Queue) {
    q.append(
        vec![entry("s", 0, 60_000, "a"), entry("s", 0, 60_000, "b")],
        1000,
    )
    .await
    .unwrap();
    let p = q.peek("s", &KeySet::default(), 10, 1500).unwrap();
    q.remove(vec![p.entries[0].key.clone()]);
    settle(q).await;
    let p = q.peek("s", &KeySet::default(), 10, 1500).unwrap();
    assert_eq!(bodies(&p), ["b"]);
    let stats = q.stats();
    let s = stats.iter().find(|s| s.sink == "s").unwrap();
    assert_eq!(s.depth, 1);
    assert_eq!(s.bytes, entry_size("n=b", b"b"));
    assert_eq!(s.oldest_ms, Some(1000));
}

async fn removed_entries_are_never_handed_out_again(q: &dyn Queue) {
    for i in 0..50 {
        q.append(vec![entry("s", 0, 60_000, &format!("m{i}"))], 1)
            .await
            .unwrap();
    }
    let mut seen = HashSet::new();
    // Deliver and remove one at a time without waiting for removals to be committed.
    for _ in 0..50 {
        let p = q.peek("s", &KeySet::default(), 1, 2).unwrap();
        let e = &p.entries[0];
        assert!(seen.insert(e.key.clone()), "{:?} handed out twice", e.key);
        q.remove(vec![e.key.clone()]);
    }
    settle(q).await;
    assert!(q
        .peek("s", &KeySet::default(), 10, 2)
        .unwrap()
        .entries
        .is_empty());
}

async fn expired_entries_are_never_handed_out(q: &dyn Queue) {
    q.append(
        vec![entry("s", 0, 100, "short"), entry("s", 0, 10_000, "long")],
        1000,
    )
    .await
    .unwrap();
    let p = q.peek("s", &KeySet::default(), 10, 1100).unwrap();
    assert_eq!(bodies(&p), ["long"]);
    assert_eq!(p.expired, 1);
    settle(q).await;
    let s = q.stats().into_iter().find(|s| s.sink == "s").unwrap();
    assert_eq!((s.depth, s.dropped_expired), (1, 1));
    assert!(bodies(&q.peek("s", &KeySet::default(), 10, 20_000).unwrap()).is_empty());
}

async fn quota_drops_oldest_of_lowest_priority(q: &dyn Queue) {
    // Limits: 4 entries' worth in total (see `limits_for_quota`).
    q.append(
        vec![
            entry("s", 0, 60_000, "h1"),
            entry("s", 9, 60_000, "l1"),
            entry("s", 9, 60_000, "l2"),
            entry("t", 0, 60_000, "h2"),
        ],
        1,
    )
    .await
    .unwrap();
    q.append(vec![entry("s", 0, 60_000, "h3")], 2)
        .await
        .unwrap();
    let s = bodies(&q.peek("s", &KeySet::default(), 10, 3).unwrap());
    assert_eq!(
        s,
        ["h1", "h3", "l2"],
        "l1, the oldest lowest-priority entry, made room"
    );
    let stats = q.stats();
    assert_eq!(stats.iter().map(|s| s.dropped_quota).sum::<u64>(), 1);
}

async fn refuse_policy_refuses_without_dropping(q: &dyn Queue) {
    q.append(
        vec![
            entry("s", 0, 60_000, "a"),
            entry("s", 0, 60_000, "b"),
            entry("s", 0, 60_000, "c"),
            entry("s", 0, 60_000, "d"),
        ],
        1,
    )
    .await
    .unwrap();
    // Refused whole, and handed back as it was so the caller can hold it and retry.
    let refused = q
        .append(vec![entry("s", 0, 60_000, "e")], 2)
        .await
        .unwrap_err();
    assert!(refused.is_refusal());
    assert_eq!(refused.error, QueueError::Full);
    assert_eq!(refused.entries, vec![entry("s", 0, 60_000, "e")]);
    assert_eq!(
        bodies(&q.peek("s", &KeySet::default(), 10, 3).unwrap()),
        ["a", "b", "c", "d"]
    );
    let p = q.peek("s", &KeySet::default(), 1, 3).unwrap();
    q.remove(vec![p.entries[0].key.clone()]);
    settle(q).await;
    q.append(vec![entry("s", 0, 60_000, "e")], 4).await.unwrap();
}

fn limits_for_quota(when_full: WhenFull) -> Limits {
    Limits {
        max_bytes: 4 * entry_size("n=h1", b"h1"),
        max_sink_bytes: 0,
        when_full,
        cache_bytes: 1 << 20,
        min_free_bytes: 0,
    }
}

fn temp_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "fh-queue-{name}-{}-{:x}",
        std::process::id(),
        rand_u32()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("queue.redb")
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    h.finish() as u32
}

macro_rules! for_each_queue {
    ($name:ident, $limits:expr) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn memory() {
                let q = MemoryQueue::new($limits);
                super::$name(&q).await;
            }

            #[tokio::test]
            async fn disk() {
                let path = temp_path(stringify!($name));
                let q = DiskQueue::open(&path, $limits).unwrap();
                super::$name(&q).await;
                let _ = std::fs::remove_dir_all(path.parent().unwrap());
            }
        }
    };
}

for_each_queue!(priority_then_arrival, Limits::default());
for_each_queue!(
    in_flight_is_skipped_and_live_high_priority_jumps_the_backlog,
    Limits::default()
);
for_each_queue!(removal_and_stats, Limits::default());
for_each_queue!(
    cursor_continues_and_restart_finds_new_high_priority,
    Limits::default()
);
for_each_queue!(
    removed_entries_are_never_handed_out_again,
    Limits::default()
);
for_each_queue!(expired_entries_are_never_handed_out, Limits::default());
for_each_queue!(
    quota_drops_oldest_of_lowest_priority,
    limits_for_quota(WhenFull::DropOldest)
);
for_each_queue!(
    refuse_policy_refuses_without_dropping,
    limits_for_quota(WhenFull::Refuse)
);
#[tokio::test]
async fn disk_entries_survive_reopen_with_ttl_by_wall_clock() {
    let path = temp_path("reopen");
    {
        let q = DiskQueue::open(&path, Limits::default()).unwrap();
        q.append(
            vec![
                entry("s", 3, 1_000, "soon"),
                entry("s", 1, 1_000_000, "later"),
            ],
            10_000,
        )
        .await
        .unwrap();
    }
    let q = DiskQueue::open(&path, Limits::default()).unwrap();
    let s = q.stats().into_iter().find(|s| s.sink == "s").unwrap();
    assert_eq!(s.depth, 2, "counters rebuilt at open");
    // After the restart the clock moved past the first one's expiry.
    let p = q.peek("s", &KeySet::default(), 10, 12_000).unwrap();
    assert_eq!(bodies(&p), ["later"]);
    assert_eq!(p.expired, 1);
    // New entries get new sequence numbers after the old ones.
    q.append(vec![entry("s", 1, 1_000_000, "new")], 12_000)
        .await
        .unwrap();
    assert_eq!(
        bodies(&q.peek("s", &KeySet::default(), 10, 12_000).unwrap()),
        ["later", "new"]
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// Below the free-space floor appends are refused and handed back whole; removals still go
/// through (they make room), and what was stored before stays readable.
#[tokio::test]
async fn disk_below_its_free_space_floor_refuses_appends_and_hands_them_back() {
    let path = temp_path("floor");
    let q = DiskQueue::open(&path, Limits::default()).unwrap();
    append_numbered(&q, 3).await;
    drop(q);
    let floor = Limits {
        min_free_bytes: u64::MAX / 2,
        ..Limits::default()
    };
    let q = DiskQueue::open(&path, floor).unwrap();
    let refused = q
        .append(vec![entry("s", 0, 1_000_000, "late")], 2)
        .await
        .unwrap_err();
    assert!(refused.is_refusal(), "{refused}");
    assert!(
        matches!(refused.error, QueueError::DiskFull { .. }),
        "{refused}"
    );
    assert_eq!(refused.entries, vec![entry("s", 0, 1_000_000, "late")]);
    let p = q.peek("s", &KeySet::default(), 10, 2).unwrap();
    assert_eq!(bodies(&p), ["m0", "m1", "m2"]);
    q.remove(vec![p.entries[0].key.clone()]);
    settle(&q).await;
    assert_eq!(
        bodies(&q.peek("s", &KeySet::default(), 10, 2).unwrap()),
        ["m1", "m2"]
    );
    drop(q);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test]
async fn disk_store_that_cannot_be_opened_is_set_aside() {
    let path = temp_path("truncated");
    {
        let q = DiskQueue::open(&path, Limits::default()).unwrap();
        append_numbered(&q, 200).await;
    }
    // Reopening moves what the log held into redb: the file to damage.
    drop(DiskQueue::open(&path, Limits::default()).unwrap());
    // Cut the file in the middle.
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let q = DiskQueue::open(&path, Limits::default()).expect("the hub must start");
    // Either redb repaired it, or it was moved aside and the queue starts empty.
    let depth = q.stats().iter().map(|s| s.depth).sum::<u64>();
    assert!(q.recovered_from.is_some() || depth <= 200);
    q.append(vec![entry("s", 0, 1_000_000, "after")], 2)
        .await
        .unwrap();
    assert!(
        bodies(&q.peek("s", &KeySet::default(), 1000, 3).unwrap()).contains(&"after".to_string())
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test]
async fn disk_removals_survive_reopen() {
    let path = temp_path("removals");
    {
        let q = DiskQueue::open(&path, Limits::default()).unwrap();
        append_numbered(&q, 10).await;
        let p = q.peek("s", &KeySet::default(), 4, 2).unwrap();
        q.remove(p.entries.into_iter().map(|e| e.key).collect());
    }
    let q = DiskQueue::open(&path, Limits::default()).unwrap();
    assert_eq!(
        bodies(&q.peek("s", &KeySet::default(), 100, 2).unwrap()),
        ["m4", "m5", "m6", "m7", "m8", "m9"],
        "a clean stop logs the last removals: nothing delivered twice"
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test]
async fn disk_log_with_a_torn_tail_keeps_every_whole_record() {
    let path = temp_path("torn");
    {
        let q = DiskQueue::open(&path, Limits::default()).unwrap();
        append_numbered(&q, 3).await;
    }
    let dir = path.with_extension("log");
    let log = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::metadata(p).unwrap().len() > 0)
        .expect("a log file with the entries");
    // A crash mid-write: the last record is cut short, then garbage follows it.
    let mut bytes = std::fs::read(&log).unwrap();
    bytes.truncate(bytes.len() - 5);
    bytes.extend_from_slice(&[0xff; 11]);
    std::fs::write(&log, bytes).unwrap();
    let q = DiskQueue::open(&path, Limits::default()).expect("the hub must start");
    assert_eq!(
        bodies(&q.peek("s", &KeySet::default(), 100, 2).unwrap()),
        ["m0", "m1"]
    );
    q.append(vec![entry("s", 0, 1_000_000, "after")], 2)
        .await
        .unwrap();
    assert_eq!(
        bodies(&q.peek("s", &KeySet::default(), 100, 2).unwrap()),
        ["m0", "m1", "after"]
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// A memory budget so small that nearly every batch moves entries from the log to redb.
fn tiny_memory() -> Limits {
    Limits {
        cache_bytes: 2048,
        ..Limits::default()
    }
}

#[tokio::test]
async fn disk_backlog_moved_to_redb_keeps_priority_order_and_removals() {
    let path = temp_path("spill");
    let q = DiskQueue::open(&path, tiny_memory()).unwrap();
    for i in 0..300 {
        let p = (i % 3) as u8;
        q.append(vec![entry("s", p, 1_000_000, &format!("p{p}-{i:03}"))], 1)
            .await
            .unwrap();
    }
    let (stored, hot) = q.layers();
    assert!(
        stored > 0 && hot > 0,
        "both layers hold entries: {stored} stored, {hot} hot"
    );
    // Remove every other priority-0 entry, some from redb, some from memory.
    let first = q.peek("s", &KeySet::default(), 100, 2).unwrap();
    let gone: Vec<&Entry> = first.entries.iter().step_by(2).collect();
    let gone_bodies: HashSet<String> = gone
        .iter()
        .map(|e| String::from_utf8_lossy(&e.body).into_owned())
        .collect();
    q.remove(gone.iter().map(|e| e.key.clone()).collect());
    settle(&q).await;
    for i in 300..330 {
        q.append(vec![entry("s", 0, 1_000_000, &format!("p0-{i:03}"))], 1)
            .await
            .unwrap();
    }
    let all = bodies(&q.peek("s", &KeySet::default(), 1000, 2).unwrap());
    // Priority first, then arrival (the zero-padded number).
    let mut expected: Vec<String> = (0..330)
        .map(|i| format!("p{}-{i:03}", if i < 300 { i % 3 } else { 0 }))
        .filter(|b| !gone_bodies.contains(b))
        .collect();
    expected.sort();
    assert_eq!(all, expected);
    let depth: u64 = q.stats().iter().map(|s| s.depth).sum();
    assert_eq!(depth, expected.len() as u64);
    // Retired log files were kept to be written over, not deleted and made anew.
    let spares = std::fs::read_dir(path.with_extension("log"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "spare"))
        })
        .count();
    assert!(spares > 0, "spare log files kept for recycling");
    drop(q);
    let q = DiskQueue::open(&path, tiny_memory()).unwrap();
    assert_eq!(
        bodies(&q.peek("s", &KeySet::default(), 1000, 2).unwrap()),
        expected
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[derive(Debug, Clone)]
enum Op {
    Append { sink: u8, priority: u8, count: u8 },
    Deliver { sink: u8, count: u8 },
    Reopen,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0u8..2, 0u8..3, 1u8..20).prop_map(|(sink, priority, count)| Op::Append { sink, priority, count }),
        3 => (0u8..2, 1u8..40).prop_map(|(sink, count)| Op::Deliver { sink, count }),
        1 => Just(Op::Reopen),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// The disk queue (memory budget tiny: entries move to redb, log files rotate and go)
    /// hands out exactly what the in-memory model does, across reopens.
    #[test]
    fn disk_queue_behaves_like_the_memory_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let path = temp_path("model");
        rt.block_on(async {
            let model = MemoryQueue::new(Limits::default());
            let mut disk = Some(DiskQueue::open(&path, tiny_memory()).unwrap());
            let mut n = 0;
            for op in ops {
                let q = disk.as_ref().unwrap();
                match op {
                    Op::Append { sink, priority, count } => {
                        let batch: Vec<NewEntry> = (0..count)
                            .map(|_| {
                                n += 1;
                                entry(&format!("s{sink}"), priority, 1_000_000, &format!("m{n}"))
                            })
                            .collect();
                        model.append(batch.clone(), 1).await.unwrap();
                        q.append(batch, 1).await.unwrap();
                    }
                    Op::Deliver { sink, count } => {
                        let sink = format!("s{sink}");
                        let none = KeySet::default();
                        let want = model.peek(&sink, &none, count as usize, 2).unwrap();
                        let got = q.peek(&sink, &none, count as usize, 2).unwrap();
                        assert_eq!(bodies(&got), bodies(&want));
                        model.remove(want.entries.into_iter().map(|e| e.key).collect());
                        q.remove(got.entries.into_iter().map(|e| e.key).collect());
                    }
                    Op::Reopen => {
                        drop(disk.take());
                        disk = Some(DiskQueue::open(&path, tiny_memory()).unwrap());
                    }
                }
                let q = disk.as_ref().unwrap();
                settle(q).await;
                let depth = |q: &dyn Queue| {
                    let mut d: Vec<(String, u64)> = q.stats().into_iter().map(|s| (s.sink, s.depth)).filter(|(_, d)| *d > 0).collect();
                    d.sort();
                    d
                };
                assert_eq!(depth(q), depth(&model));
            }
            let q = disk.as_ref().unwrap();
            for sink in ["s0", "s1"] {
                let none = KeySet::default();
                assert_eq!(
                    bodies(&q.peek(sink, &none, 10_000, 2).unwrap()),
                    bodies(&model.peek(sink, &none, 10_000, 2).unwrap())
                );
            }
        });
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}

/// A log reader's lag counts entries after its position in memory and in redb alike, and
/// raised sequence numbers stay above positions a reader passed before a reopen.
#[tokio::test]
async fn disk_counts_entries_after_a_position_and_keeps_sequence_numbers_rising() {
    let path = temp_path("count-after");
    let q = DiskQueue::open(&path, tiny_memory()).unwrap();
    for i in 0..200 {
        q.append(vec![entry("$log", 0, 1_000_000, &format!("e{i}"))], 1)
            .await
            .unwrap();
    }
    let p = q.peek("$log", &KeySet::default(), 200, 2).unwrap();
    let keys: Vec<u64> = p.entries.iter().map(|e| e.key.seq).collect();
    assert_eq!(keys.len(), 200);
    assert!(q.layers().0 > 0, "some entries moved to redb");
    assert_eq!(q.count_after("$log", 0, 0).unwrap(), 200);
    assert_eq!(q.count_after("$log", 0, keys[49]).unwrap(), 150);
    assert_eq!(q.count_after("$log", 0, keys[199]).unwrap(), 0);
    assert_eq!(q.count_after("other", 0, 0).unwrap(), 0);
    let last = q.last_seq();
    q.remove(p.entries.iter().map(|e| e.key.clone()).collect());
    settle(&q).await;
    drop(q);
    let q = DiskQueue::open(&path, tiny_memory()).unwrap();
    q.raise_seq(last);
    q.append(vec![entry("$log", 0, 1_000_000, "next")], 3)
        .await
        .unwrap();
    let p = q.peek("$log", &KeySet::default(), 10, 4).unwrap();
    assert!(p.entries[0].key.seq > last, "{:?}", p.entries[0].key);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// `EntryKey` hashes its position only: keys of two sinks at the same position are still two
/// keys in a set.
#[test]
fn keys_that_differ_only_by_sink_stay_apart_in_a_key_set() {
    let key = |sink: &str| EntryKey {
        sink: sink.into(),
        priority: 0,
        seq: 7,
    };
    let mut set = KeySet::default();
    assert!(set.insert(key("a")));
    assert!(set.insert(key("b")));
    assert!(!set.insert(key("a")));
    assert!(set.contains(&key("b")) && !set.contains(&key("c")));
    assert!(set.remove(&key("a")) && set.len() == 1);
}
