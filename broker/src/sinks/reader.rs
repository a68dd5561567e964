//! A consumer's position in sink queues: what it has in flight, where its next read goes on,
//! and what it acknowledged since the last flush. Both drivers read through it.

use std::collections::HashMap;

use fleethub_router::queue::{Entry, EntryKey, Queue, QueueError};

use crate::metrics::Metrics;

/// Reads entries within a window and removes them once acknowledged.
///
/// Entries stay in the queue until acknowledged, so a consumer that goes away leaves them
/// there for the next; the reader only remembers what not to hand out twice.
pub struct QueueReader {
    window: usize,
    in_flight: fleethub_router::queue::KeySet,
    /// Per queue, the last key handed out: reads after an acknowledgement go on from there;
    /// a wake (new entries, perhaps of a higher priority) starts again from the head.
    cursor: HashMap<String, EntryKey>,
    /// Acknowledged since the last flush: removed together, once per batch.
    acked: Vec<EntryKey>,
}

impl QueueReader {
    pub fn new(window: usize) -> QueueReader {
        QueueReader {
            window,
            in_flight: Default::default(),
            cursor: HashMap::new(),
            acked: Vec::new(),
        }
    }

    /// New entries were committed: the next reads start from the head of each queue.
    pub fn rewind(&mut self) {
        self.cursor.clear();
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Room left in the window.
    pub fn room(&self) -> usize {
        self.window.saturating_sub(self.in_flight.len())
    }

    /// Up to the room left of `queue`'s live entries in delivery order, now in flight.
    pub fn read<Q: Queue + ?Sized>(
        &mut self,
        queues: &Q,
        queue: &str,
        now_ms: u64,
    ) -> Result<Vec<Entry>, QueueError> {
        let room = self.room();
        if room == 0 {
            return Ok(Vec::new());
        }
        let peeked =
            queues.peek_after(queue, self.cursor.get(queue), &self.in_flight, room, now_ms)?;
        if let Some(last) = peeked.entries.last() {
            self.cursor.insert(queue.to_string(), last.key.clone());
        }
        for e in &peeked.entries {
            self.in_flight.insert(e.key.clone());
        }
        Ok(peeked.entries)
    }

    /// Entries read but not handed out after all: out of the window, and the next read
    /// starts from the head again so they are not passed over.
    pub fn release(&mut self, keys: impl IntoIterator<Item = EntryKey>) {
        for key in keys {
            self.in_flight.remove(&key);
        }
        self.cursor.clear();
    }

    /// The consumer acknowledged `key`: it leaves the window and waits for [`Self::flush`].
    pub fn acked(&mut self, key: EntryKey) {
        if self.in_flight.remove(&key) {
            self.acked.push(key);
        }
    }

    /// Whether acknowledgements wait for [`Self::flush`].
    pub fn has_acked(&self) -> bool {
        !self.acked.is_empty()
    }

    /// Removes the acknowledged entries from their queues (one call) and counts them as
    /// delivered (one metric update per queue). Returns how many.
    pub fn flush<Q: Queue + ?Sized>(&mut self, queues: &Q, metrics: &Metrics) -> usize {
        if self.acked.is_empty() {
            return 0;
        }
        let mut acked = std::mem::take(&mut self.acked);
        acked.sort_by(|a, b| a.sink.cmp(&b.sink));
        for run in acked.chunk_by(|a, b| a.sink == b.sink) {
            metrics
                .sink_messages
                .with_label_values(&[&run[0].sink, "delivered"])
                .inc_by(run.len() as u64);
        }
        let n = acked.len();
        queues.remove(acked);
        n
    }
}
