//! Store-and-forward: a queue of routed messages per sink.
//!
//! Every routed message is appended to its sink's queue before the device's publish is
//! acknowledged, and leaves only when the sink acknowledged it or its time to live ran out.
//! Order within a sink is priority first (0 highest … 9), then arrival; an entry's key is
//! `(sink, priority, seq)` so both implementations simply iterate keys in order. Readers pass
//! the keys they have in flight to skip, so a high-priority message that arrives while a
//! backlog drains is the next one handed out.
//!
//! Two implementations run through the same tests: [`MemoryQueue`] and the durable
//! [`DiskQueue`] (a group-committed write-ahead log served from memory, with redb holding
//! backlogs that outgrow the memory budget).

mod disk;
mod memory;
mod retained;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

pub use disk::{format_of, free_bytes, DiskQueue, FORMAT};
pub use memory::MemoryQueue;
pub use retained::{RetainedLog, Retention};

/// A message to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    pub sink: String,
    pub priority: u8,
    pub ttl_ms: u64,
    /// The property bag the sink delivers.
    pub bag: String,
    pub body: Bytes,
}

/// Where an entry sits: ordered by sink, then priority, then arrival.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EntryKey {
    pub sink: String,
    pub priority: u8,
    pub seq: u64,
}

/// Hashes the position only: sets of keys hold one sink's entries in practice (a reader's
/// in-flight set, a queue's removals), so hashing the sink's name on every lookup bought
/// nothing; keys that differ only by sink still compare unequal.
impl std::hash::Hash for EntryKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.seq ^ ((self.priority as u64) << 56));
    }
}

/// A set of entry keys, hashed fast (they are looked up once per message delivered).
pub type KeySet = std::collections::HashSet<EntryKey, rustc_hash::FxBuildHasher>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: EntryKey,
    /// Wall-clock enqueue time (unix ms): TTL survives restarts.
    pub enqueued_ms: u64,
    pub expires_ms: u64,
    pub bag: String,
    pub body: Bytes,
}

impl Entry {
    /// What an entry counts against the quota.
    pub fn size(&self) -> u64 {
        entry_size(&self.bag, &self.body)
    }
}

pub(crate) fn entry_size(bag: &str, body: &[u8]) -> u64 {
    (bag.len() + body.len() + 32) as u64
}

/// What to do when the quota is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Drop the oldest messages of the lowest priority (counted) to make room.
    DropOldest,
    /// Refuse the new messages: the hub withholds the PUBACK (back-pressure).
    Refuse,
}

/// Size limits. 0 means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_sink_bytes: u64,
    pub when_full: WhenFull,
    /// What the disk queue may hold in memory however deep the queues get: half for entries
    /// served from memory, half for redb's page cache.
    pub cache_bytes: usize,
    /// Free space the disk holding the queues must keep: appends that would go below it are
    /// refused (0: no floor). The rest of the hub (registry, twins, sessions) keeps working
    /// on that room, instead of a store failing on a full disk.
    pub min_free_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            min_free_bytes: 0,
            max_bytes: 0,
            max_sink_bytes: 0,
            when_full: WhenFull::DropOldest,
            cache_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("the store-and-forward quota is full")]
    Full,
    #[error("store-and-forward store: {0}")]
    Store(String),
    /// The disk is down to its free-space floor: nothing more is queued until there is room.
    #[error("the disk holding the store-and-forward queues has {free} bytes free, at or below [store_and_forward] min_free_bytes ({floor}): nothing more is queued until there is room")]
    DiskFull { free: u64, floor: u64 },
    /// The store was written by a newer version: refused, and left as it is.
    #[error("store-and-forward store {path}: written in format {found} by a newer fleethub; this one reads formats up to {supported}. Nothing was changed: run the newer fleethub on it, or restore a backup made with this version")]
    NewerFormat {
        path: String,
        found: u32,
        supported: u32,
    },
}

/// A store failure, as the queues report it.
pub(crate) fn err(e: impl std::fmt::Display) -> QueueError {
    QueueError::Store(e.to_string())
}

/// Per-sink view for operators.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStats {
    pub sink: String,
    pub depth: u64,
    pub bytes: u64,
    /// Enqueue time of the oldest entry, unix ms.
    pub oldest_ms: Option<u64>,
    pub dropped_expired: u64,
    pub dropped_quota: u64,
}

/// Entries handed out by [`Queue::peek`], and how many expired ones it removed on the way.
#[derive(Debug, Default)]
pub struct Peeked {
    pub entries: Vec<Entry>,
    pub expired: u64,
}

/// An append that was not stored. A refusal (the quota under `refuse`, the disk at its
/// floor) hands the entries back, so the caller can hold them and try again once there is
/// room instead of losing them or dropping its client; a store failure has none to give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct AppendError {
    pub error: QueueError,
    /// The refused entries, in order; empty when the store failed after taking them.
    pub entries: Vec<NewEntry>,
}

impl AppendError {
    /// Nothing of the append is stored and it may be tried again as it is.
    pub fn is_refusal(&self) -> bool {
        matches!(self.error, QueueError::Full | QueueError::DiskFull { .. })
    }
}

impl From<QueueError> for AppendError {
    fn from(error: QueueError) -> Self {
        AppendError {
            error,
            entries: Vec::new(),
        }
    }
}

impl From<AppendError> for QueueError {
    fn from(e: AppendError) -> Self {
        e.error
    }
}

pub type AppendFuture = Pin<Box<dyn Future<Output = Result<(), AppendError>> + Send>>;

pub trait Queue: Send + Sync {
    /// Appends entries as one unit; the future resolves once they are stored (for the disk
    /// queue: committed). Entries submitted one after another keep that order.
    fn append(&self, entries: Vec<NewEntry>, now_ms: u64) -> AppendFuture;
    /// Up to `limit` live entries of `sink` in delivery order, skipping `skip` (in flight);
    /// expired entries met on the way are removed and counted.
    fn peek(
        &self,
        sink: &str,
        skip: &KeySet,
        limit: usize,
        now_ms: u64,
    ) -> Result<Peeked, QueueError> {
        self.peek_after(sink, None, skip, limit, now_ms)
    }
    /// As [`Queue::peek`], starting after `after` (a reader's cursor: what it handed out
    /// last). Readers start again from `None` when new entries arrived, so a new
    /// high-priority entry is not passed over.
    fn peek_after(
        &self,
        sink: &str,
        after: Option<&EntryKey>,
        skip: &KeySet,
        limit: usize,
        now_ms: u64,
    ) -> Result<Peeked, QueueError>;
    /// Removes delivered entries.
    fn remove(&self, keys: Vec<EntryKey>);
    /// Sinks with entries or counters (with the oldest entry's age: reads the store).
    fn stats(&self) -> Vec<SinkStats>;
    /// Sinks that have entries and how many, from counters only: cheap enough per delivery.
    fn sinks(&self) -> Vec<(String, u64)>;
}

/// The counters both implementations keep: per-sink stats, total bytes, the last sequence.
#[derive(Debug, Default, Clone)]
pub(crate) struct Counters {
    pub(crate) sinks: HashMap<String, SinkStats, rustc_hash::FxBuildHasher>,
    pub(crate) total: u64,
    pub(crate) next_seq: u64,
}

impl Counters {
    /// The sink's counters, created on first use. Called per message: the name is copied
    /// only when the sink is new.
    pub(crate) fn stat(&mut self, sink: &str) -> &mut SinkStats {
        if !self.sinks.contains_key(sink) {
            let stats = SinkStats {
                sink: sink.to_string(),
                ..Default::default()
            };
            self.sinks.insert(sink.to_string(), stats);
        }
        self.sinks
            .get_mut(sink)
            .expect("the sink's counters were inserted just above")
    }

    /// Whether adding `add` bytes breaks the total limit (`sink` None) or that sink's limit.
    pub(crate) fn over(&self, limits: &Limits, sink: Option<&str>, add: u64) -> bool {
        match sink {
            None => limits.max_bytes > 0 && self.total + add > limits.max_bytes,
            Some(s) => {
                let bytes = self.sinks.get(s).map(|x| x.bytes).unwrap_or(0);
                limits.max_sink_bytes > 0 && bytes + add > limits.max_sink_bytes
            }
        }
    }

    /// Sinks with entries, and how many.
    pub(crate) fn nonempty(&self) -> Vec<(String, u64)> {
        self.sinks
            .values()
            .filter(|s| s.depth > 0)
            .map(|s| (s.sink.clone(), s.depth))
            .collect()
    }
}
