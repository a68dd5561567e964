//! The in-memory queue: the same semantics as the disk queue without durability (tests, and
//! a reference for the disk implementation).

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::*;

#[derive(Default)]
struct State {
    entries: BTreeMap<EntryKey, Entry>,
    c: Counters,
}

pub struct MemoryQueue {
    state: Mutex<State>,
    limits: Limits,
}

impl MemoryQueue {
    pub fn new(limits: Limits) -> MemoryQueue {
        MemoryQueue {
            state: Mutex::new(State::default()),
            limits,
        }
    }
}

impl State {
    fn take(&mut self, key: &EntryKey) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        self.c.total -= e.size();
        let s = self.c.stat(&key.sink);
        s.depth -= 1;
        s.bytes -= e.size();
        Some(e)
    }

    /// The oldest entry of the lowest priority, overall (never the log sink's) or in one
    /// sink.
    fn victim(&self, sink: Option<&str>) -> Option<EntryKey> {
        self.entries
            .keys()
            .filter(|k| sink.is_none_or(|s| k.sink == s))
            .max_by(|a, b| a.priority.cmp(&b.priority).then(b.seq.cmp(&a.seq)))
            .cloned()
    }
}

impl Queue for MemoryQueue {
    fn append(&self, entries: Vec<NewEntry>, now_ms: u64) -> AppendFuture {
        let result = (|| {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let over =
                |st: &State, sink: Option<&str>, add: u64| st.c.over(&self.limits, sink, add);
            if self.limits.when_full == WhenFull::Refuse {
                let incoming: u64 = entries.iter().map(|e| entry_size(&e.bag, &e.body)).sum();
                let sink_over = entries
                    .iter()
                    .any(|e| over(&st, Some(&e.sink), entry_size(&e.bag, &e.body)));
                if over(&st, None, incoming) || sink_over {
                    return Err(AppendError {
                        error: QueueError::Full,
                        entries,
                    });
                }
            }
            for e in entries {
                let size = entry_size(&e.bag, &e.body);
                while over(&st, Some(&e.sink), size) {
                    let Some(v) = st.victim(Some(&e.sink)) else {
                        break;
                    };
                    st.take(&v);
                    st.c.stat(&v.sink).dropped_quota += 1;
                }
                while over(&st, None, size) {
                    let Some(v) = st.victim(None) else {
                        break;
                    };
                    st.take(&v);
                    st.c.stat(&v.sink).dropped_quota += 1;
                }
                st.c.next_seq += 1;
                let key = EntryKey {
                    sink: e.sink.clone(),
                    priority: e.priority,
                    seq: st.c.next_seq,
                };
                let entry = Entry {
                    key: key.clone(),
                    enqueued_ms: now_ms,
                    expires_ms: now_ms.saturating_add(e.ttl_ms),
                    bag: e.bag,
                    body: e.body,
                };
                st.c.total += size;
                let s = st.c.stat(&e.sink);
                s.depth += 1;
                s.bytes += size;
                st.entries.insert(key, entry);
            }
            Ok(())
        })();
        Box::pin(async move { result })
    }

    fn peek_after(
        &self,
        sink: &str,
        after: Option<&EntryKey>,
        skip: &KeySet,
        limit: usize,
        now_ms: u64,
    ) -> Result<Peeked, QueueError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Peeked::default();
        let mut expired = Vec::new();
        let start = match after {
            Some(k) => EntryKey {
                sink: sink.to_string(),
                priority: k.priority,
                seq: k.seq.saturating_add(1),
            },
            None => EntryKey {
                sink: sink.to_string(),
                priority: 0,
                seq: 0,
            },
        };
        for (k, e) in st.entries.range(start..) {
            if k.sink != sink || out.entries.len() >= limit {
                break;
            }
            if e.expires_ms <= now_ms {
                expired.push(k.clone());
            } else if !skip.contains(k) {
                out.entries.push(e.clone());
            }
        }
        for k in &expired {
            st.take(k);
        }
        out.expired = expired.len() as u64;
        if out.expired > 0 {
            st.c.stat(sink).dropped_expired += out.expired;
        }
        Ok(out)
    }

    fn remove(&self, keys: Vec<EntryKey>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for k in keys {
            st.take(&k);
        }
    }

    fn sinks(&self) -> Vec<(String, u64)> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .c
            .nonempty()
    }

    fn stats(&self) -> Vec<SinkStats> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<SinkStats> =
            st.c.sinks
                .values()
                .map(|s| {
                    let mut s = s.clone();
                    s.oldest_ms = st
                        .entries
                        .iter()
                        .filter(|(k, _)| k.sink == s.sink)
                        .map(|(_, e)| e.enqueued_ms)
                        .min();
                    s
                })
                .collect();
        v.sort_by(|a, b| a.sink.cmp(&b.sink));
        v
    }
}
