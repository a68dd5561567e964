//! The durable queue: a write-ahead log in front of redb.
//!
//! Why two layers: a sink that keeps up takes each message milliseconds after it arrived, so
//! most entries live far shorter than a B-tree insert and delete cost to make (redb's
//! copy-on-write pages made that the whole gap between routed and bare-broker throughput).
//! Appends therefore go to the [`log`] (one `write` and one `fdatasync` per group-committed
//! batch) and are served from memory; entries that outstay the memory budget (a sink offline
//! or slow) move to redb, where depth costs disk, not RAM. So memory stays bounded however
//! deep the queues get, and a backlog drains from redb exactly as before.
//!
//! Invariants the code relies on:
//! - every entry is in exactly one of: the log and memory (`hot`), or redb (`stored`);
//! - sequence numbers only grow, and entries move to redb a whole log generation at a time,
//!   oldest first, so every stored entry of a sink is older than its hot ones;
//! - an append's future resolves only after the batch holding it was synced; a removal is
//!   applied in memory at once (never handed out again) and logged with the next batch;
//! - at open, the log is replayed into redb and deleted: restart is a plain redb queue.

pub(super) mod log;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::*;

/// Key: (sink, priority, seq). Value: enqueued ms, expires ms, bag length (u32), bag, body.
const QUEUE: TableDefinition<(&str, u8, u64), &[u8]> = TableDefinition::new("queue");
/// `format`: the store's format version, as decimal text.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// The format this code writes. 0: before versions were recorded (the same layout). 2: the
/// events endpoint is no longer a sink here (the hub moves any `$events` entries into its own
/// log at start); same layout, recorded so an older binary refuses rather than miss them.
/// 3: log files hold generation frames and are written over when retired (see [`log`]); an
/// older binary would not read them.
pub const FORMAT: u32 = 3;
const MAX_BATCH: usize = 4096;
/// Sealed log generations kept before the oldest one's live entries move to redb. With the
/// one being written that is four generations of an eighth of `cache_bytes` each: half of it.
/// This, not the entries' own sizes, is what bounds the memory of entries served from the log:
/// their bodies are slices of the batch buffers written to these generations, and a buffer
/// stays while one of its entries waits (say, for an offline sink among fast ones).
const MAX_SEALED: usize = 3;

enum Job {
    Append {
        entries: Vec<NewEntry>,
        now_ms: u64,
        reply: oneshot::Sender<Result<(), AppendError>>,
    },
    /// Removals are waiting in the shared state.
    Wake,
}

/// An entry served from memory: synced to the log, not in redb.
#[derive(Clone)]
struct HotEntry {
    enqueued_ms: u64,
    expires_ms: u64,
    bag: String,
    body: Bytes,
    generation: u64,
}

/// Why an entry leaves redb, which decides what is counted once it is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaving {
    Delivered,
    Expired,
    /// A quota drop, counted when it was chosen.
    Counted,
}

/// What readers, removers and the writer share (one lock).
#[derive(Default)]
struct State {
    counters: Counters,
    /// Per sink, the entries served from memory, in delivery order (priority, seq).
    hot: HashMap<String, BTreeMap<(u8, u64), HotEntry>>,
    hot_bytes: u64,
    /// Per log generation, how many of its entries are still hot.
    live: BTreeMap<u64, u64>,
    /// Per sink, how many entries are in redb.
    stored: HashMap<String, u64>,
    /// Removal records to write with the next batch.
    log_removes: Vec<EntryKey>,
    /// redb entries to delete with the next batch.
    stored_removes: Vec<(EntryKey, Leaving)>,
    /// Stored keys leaving redb whose delete is not committed yet: never handed out again.
    removing: KeySet,
    /// The generation being copied into redb, if any, and the keys removed from memory
    /// meanwhile. Such a key may already be in redb (the copy commits before the move takes
    /// the lock), so it is hidden from readers through `removing` at once: a reader that
    /// reads redb in that window (the sink has older entries there) would otherwise hand out
    /// again an entry that was just delivered.
    spilling: Option<u64>,
    removed_while_spilling: Vec<EntryKey>,
}

impl State {
    /// Takes an entry out of memory (it leaves the queue, or moves to redb): the queue's
    /// counters are the caller's business.
    fn out_of_memory(&mut self, key: &EntryKey) -> Option<HotEntry> {
        let map = self.hot.get_mut(key.sink.as_str())?;
        let e = map.remove(&(key.priority, key.seq))?;
        if map.is_empty() {
            self.hot.remove(key.sink.as_str());
        }
        self.hot_bytes = self.hot_bytes.saturating_sub(entry_size(&e.bag, &e.body));
        if let Some(n) = self.live.get_mut(&e.generation) {
            *n = n.saturating_sub(1);
        }
        Some(e)
    }

    /// Takes a hot entry out of the queue, with its counters.
    fn take_hot(&mut self, key: &EntryKey) -> Option<HotEntry> {
        let e = self.out_of_memory(key)?;
        self.uncount(&key.sink, entry_size(&e.bag, &e.body));
        Some(e)
    }

    fn uncount(&mut self, sink: &str, size: u64) {
        self.counters.total = self.counters.total.saturating_sub(size);
        let s = self.counters.stat(sink);
        s.depth = s.depth.saturating_sub(1);
        s.bytes = s.bytes.saturating_sub(size);
    }

    fn stored_in(&self, sink: &str) -> u64 {
        self.stored.get(sink).copied().unwrap_or(0)
    }

    /// Removes an entry wherever it is; true when the writer has to be woken for it.
    fn remove(&mut self, key: EntryKey, leaving: Leaving) -> bool {
        let idle = self.log_removes.is_empty() && self.stored_removes.is_empty();
        if let Some(e) = self.take_hot(&key) {
            if leaving == Leaving::Expired {
                self.counters.stat(&key.sink).dropped_expired += 1;
            }
            if self.spilling == Some(e.generation) {
                self.removing.insert(key.clone());
                self.removed_while_spilling.push(key.clone());
            }
            self.log_removes.push(key);
        } else if self.stored_in(&key.sink) > 0 && !self.removing.contains(&key) {
            self.removing.insert(key.clone());
            self.stored_removes.push((key, leaving));
        } else {
            return false;
        }
        idle
    }
}

pub struct DiskQueue {
    db: Arc<Database>,
    state: Arc<Mutex<State>>,
    /// `None` once closing: dropping the sender ends the writer thread.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Set when the store could not be opened and was moved aside (shown to operators).
    pub recovered_from: Option<PathBuf>,
    /// Log records found damaged at open (each counted as a message dropped, reason
    /// `corrupt`), and where the damaged files were kept.
    pub corrupt_records: u64,
    pub damaged_logs: Vec<PathBuf>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn encode(enqueued_ms: u64, expires_ms: u64, bag: &str, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + bag.len() + body.len());
    v.extend_from_slice(&enqueued_ms.to_be_bytes());
    v.extend_from_slice(&expires_ms.to_be_bytes());
    v.extend_from_slice(&(bag.len() as u32).to_be_bytes());
    v.extend_from_slice(bag.as_bytes());
    v.extend_from_slice(body);
    v
}

fn decode(key: EntryKey, v: &[u8]) -> Option<Entry> {
    let enqueued_ms = u64::from_be_bytes(v.get(0..8)?.try_into().ok()?);
    let expires_ms = u64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
    let bag_len = u32::from_be_bytes(v.get(16..20)?.try_into().ok()?) as usize;
    let bag = std::str::from_utf8(v.get(20..20 + bag_len)?)
        .ok()?
        .to_string();
    let body = Bytes::copy_from_slice(v.get(20 + bag_len..)?);
    Some(Entry {
        key,
        enqueued_ms,
        expires_ms,
        bag,
        body,
    })
}

/// Writes one entry into redb's table (replay and moves from memory).
fn store(
    table: &mut redb::Table<(&str, u8, u64), &[u8]>,
    key: &EntryKey,
    enqueued_ms: u64,
    expires_ms: u64,
    bag: &str,
    body: &[u8],
) -> Result<(), QueueError> {
    let value = encode(enqueued_ms, expires_ms, bag, body);
    table
        .insert((key.sink.as_str(), key.priority, key.seq), value.as_slice())
        .map_err(err)?;
    Ok(())
}

/// Where the log of the store at `path` lives: a directory beside it.
fn log_dir(path: &Path) -> PathBuf {
    path.with_extension("log")
}

/// Opens redb, moving a damaged file aside.
fn open_store(path: &Path, cache_bytes: usize) -> Result<(Database, Option<PathBuf>), QueueError> {
    // redb asserts on some damaged files (a truncated one panics in its page manager):
    // at this boundary a panic is just another kind of damage, reported without a backtrace.
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| {
        redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)
    });
    std::panic::set_hook(previous_hook);
    let opened = opened.unwrap_or_else(|p| {
        let why = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic while opening".into());
        Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(
            why,
        )))
    });
    match opened {
        Ok(db) => match check(&db) {
            Ok(()) => Ok((db, None)),
            Err(e) => {
                drop(db);
                set_aside(path, &e.to_string(), cache_bytes)
            }
        },
        // Another process (or a queue not yet closed) holds it: never a reason to discard.
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(QueueError::Store(format!(
            "{} is already open",
            path.display()
        ))),
        Err(e) => set_aside(path, &e.to_string(), cache_bytes),
    }
}

/// Moves every entry the log holds into redb, then deletes the log: after a crash or a clean
/// stop alike, the queue starts with its entries in redb and an empty log. Returns the
/// highest sequence number seen and the next generation number.
/// What replaying the log found besides its records.
#[derive(Debug, Default)]
struct Replayed {
    max_seq: u64,
    next_gen: u64,
    /// Records that could not be read (damage, not a torn tail): each may have held an
    /// acknowledged message, so each counts as a drop with reason `corrupt`.
    corrupt_records: u64,
    /// Where damaged log files were kept.
    damaged_logs: Vec<PathBuf>,
}

fn replay(db: &Database, dir: &Path) -> Result<Replayed, QueueError> {
    let generations = log::generations(dir)?;
    let mut live: BTreeMap<u64, log::Record> = BTreeMap::new();
    let (mut max_seq, mut next_gen) = (0u64, 1u64);
    let newest = generations.last().map(|(id, _)| *id);
    let mut corrupt_records = 0u64;
    let mut damaged_files = Vec::new();
    let mut recyclable = Vec::new();
    // A new generation's number is above any a spare file ever had: its old records can
    // never pass for the new generation's.
    for (id, _) in log::spares(dir)? {
        next_gen = next_gen.max(id + 1);
    }
    for (id, path) in &generations {
        next_gen = next_gen.max(id + 1);
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(
                    "store-and-forward log {} could not be read ({e}); skipped",
                    path.display()
                );
                continue;
            }
        };
        let read = log::read_generation(&bytes, *id);
        if log::recyclable(&bytes) {
            recyclable.push(*id);
        }
        // Only the newest file can end torn (the batch being written at a crash, nothing of
        // it acknowledged); an unreadable end of an older, sealed file is damage.
        let torn = read.tail > 0 && Some(*id) == newest;
        let lost = read.damaged.len() as u64 + u64::from(read.tail > 0 && !torn);
        if torn {
            tracing::warn!(
                "store-and-forward log {}: {} bytes at its end are not a whole record (a write cut short; nothing in it was acknowledged); ignored",
                path.display(),
                read.tail
            );
        }
        if lost > 0 {
            corrupt_records += lost;
            damaged_files.push(path.clone());
            tracing::warn!(
                "store-and-forward log {} is damaged: {lost} record(s) could not be read (counted as dropped, reason corrupt; {} read)",
                path.display(),
                read.records.len()
            );
        }
        for r in read.records {
            match r {
                log::Record::Append { ref key, .. } => {
                    max_seq = max_seq.max(key.seq);
                    live.insert(key.seq, r);
                }
                log::Record::Remove(key) => {
                    live.remove(&key.seq);
                }
            }
        }
    }
    if !live.is_empty() {
        let tx = db.begin_write().map_err(err)?;
        {
            let mut table = tx.open_table(QUEUE).map_err(err)?;
            for r in live.values() {
                if let log::Record::Append {
                    key,
                    enqueued_ms,
                    expires_ms,
                    bag,
                    body,
                } = r
                {
                    store(&mut table, key, *enqueued_ms, *expires_ms, bag, body)?;
                }
            }
        }
        tx.commit().map_err(err)?;
    }
    // Replayed into the store: the files go, except damaged ones, kept as evidence.
    let mut damaged_logs = Vec::new();
    for (id, path) in &generations {
        if damaged_files.contains(path) {
            let aside_dir = dir.join("damaged");
            std::fs::create_dir_all(&aside_dir).map_err(err)?;
            let name = path
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_default();
            let aside =
                aside_dir.join(format!("{}.{}", name.to_string_lossy(), std::process::id()));
            std::fs::rename(path, &aside).map_err(err)?;
            damaged_logs.push(aside);
        } else {
            log::retire(dir, *id, recyclable.contains(id))?;
        }
    }
    if !generations.is_empty() {
        log::sync_dir(dir)?;
    }
    Ok(Replayed {
        max_seq,
        next_gen,
        corrupt_records,
        damaged_logs,
    })
}

impl DiskQueue {
    /// Opens (or creates) the queue store at `path` and its log beside it. A store file that
    /// cannot be opened (torn or truncated beyond what redb repairs) is moved aside and a new
    /// one started, so the hub always starts; `recovered_from` says where the old file went.
    pub fn open(path: &Path, limits: Limits) -> Result<DiskQueue, QueueError> {
        // Half the memory budget is redb's page cache, half the entries served from the log.
        let cache = limits.cache_bytes / 2;
        let (db, recovered_from) = open_store(path, cache)?;
        migrate(&db, path)?;
        let dir = log_dir(path);
        std::fs::create_dir_all(&dir).map_err(err)?;
        let Replayed {
            max_seq: log_max_seq,
            next_gen,
            corrupt_records,
            damaged_logs,
        } = replay(&db, &dir)?;
        let db = Arc::new(db);
        let mut st = State::default();
        {
            let tx = db.begin_read().map_err(err)?;
            let table = tx.open_table(QUEUE).map_err(err)?;
            for row in table.iter().map_err(err)? {
                let (k, v) = row.map_err(err)?;
                let (sink, _, seq) = k.value();
                let entry_bytes = stored_size(v.value());
                st.counters.total += entry_bytes;
                st.counters.next_seq = st.counters.next_seq.max(seq);
                let s = st.counters.stat(sink);
                s.depth += 1;
                s.bytes += entry_bytes;
                *st.stored.entry(sink.to_string()).or_default() += 1;
            }
        }
        st.counters.next_seq = st.counters.next_seq.max(log_max_seq);
        let active = log::Active::create_recycling(&dir, next_gen)?;
        st.live.insert(active.id, 0);
        let state = Arc::new(Mutex::new(st));
        let (tx, rx) = mpsc::channel();
        let hot_budget = cache as u64;
        let writer = Writer {
            db: db.clone(),
            state: state.clone(),
            limits,
            dir,
            sealed: VecDeque::new(),
            active,
            hot_budget,
            segment_bytes: (hot_budget / (MAX_SEALED as u64 + 1)).clamp(4 * 1024, 16 * 1024 * 1024),
            at_floor: false,
        };
        let handle = std::thread::Builder::new()
            .name("queue-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(err)?;
        Ok(DiskQueue {
            db,
            state,
            jobs: Mutex::new(Some(tx)),
            writer: Some(handle),
            recovered_from,
            corrupt_records,
            damaged_logs,
        })
    }

    /// Removes `keys` under the lock held, then wakes the writer (without the lock) if it has
    /// new work: removal records to log or redb deletes.
    fn remove_under(&self, mut st: MutexGuard<'_, State>, keys: Vec<EntryKey>, leaving: Leaving) {
        let mut wake = false;
        for k in keys {
            wake |= st.remove(k, leaving);
        }
        drop(st);
        if wake {
            self.send(Job::Wake);
        }
    }

    /// Writes a consistent copy of every queued entry (from memory and from redb, in one
    /// view under the queue's lock) to a new store file at `dest`, which a hub can open as its
    /// own. Entries keep their keys, priorities, enqueue times and expiries. Returns how many
    /// entries were copied.
    pub fn backup(&self, dest: &Path) -> Result<u64, QueueError> {
        let mut copy: Vec<(EntryKey, u64, u64, String, bytes::Bytes)> = Vec::new();
        {
            let st = lock(&self.state);
            for (sink, map) in &st.hot {
                for (&(priority, seq), e) in map {
                    let key = EntryKey {
                        sink: sink.clone(),
                        priority,
                        seq,
                    };
                    copy.push((
                        key,
                        e.enqueued_ms,
                        e.expires_ms,
                        e.bag.clone(),
                        e.body.clone(),
                    ));
                }
            }
            let hot: HashSet<(String, u8, u64)> = copy
                .iter()
                .map(|(k, ..)| (k.sink.clone(), k.priority, k.seq))
                .collect();
            let tx = self.db.begin_read().map_err(err)?;
            let table = tx.open_table(QUEUE).map_err(err)?;
            for row in table.iter().map_err(err)? {
                let (k, v) = row.map_err(err)?;
                let (sink, priority, seq) = k.value();
                let key = EntryKey {
                    sink: sink.to_string(),
                    priority,
                    seq,
                };
                if st.removing.contains(&key) || hot.contains(&(key.sink.clone(), priority, seq)) {
                    continue;
                }
                if let Some(e) = decode(key.clone(), v.value()) {
                    copy.push((key, e.enqueued_ms, e.expires_ms, e.bag, e.body));
                }
            }
        }
        let db = redb::Builder::new().create(dest).map_err(err)?;
        let tx = db.begin_write().map_err(err)?;
        {
            let mut table = tx.open_table(QUEUE).map_err(err)?;
            for (key, enqueued_ms, expires_ms, bag, body) in &copy {
                store(&mut table, key, *enqueued_ms, *expires_ms, bag, body)?;
            }
        }
        tx.commit().map_err(err)?;
        Ok(copy.len() as u64)
    }

    /// How many entries of `sink` at `priority` have a sequence number above `after`: a
    /// log reader's lag. Counts memory and redb (a range read: cost grows with the answer,
    /// so it is for metrics, not the delivery path); an entry leaving at that moment may be
    /// counted.
    pub fn count_after(&self, sink: &str, priority: u8, after: u64) -> Result<u64, QueueError> {
        let (hot, stored) = {
            let st = lock(&self.state);
            let hot = st
                .hot
                .get(sink)
                .map(|m| {
                    m.range((priority, after + 1)..=(priority, u64::MAX))
                        .count() as u64
                })
                .unwrap_or(0);
            (hot, st.stored_in(sink))
        };
        if stored == 0 {
            return Ok(hot);
        }
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(QUEUE).map_err(err)?;
        let range = table
            .range((sink, priority, after + 1)..=(sink, priority, u64::MAX))
            .map_err(err)?;
        Ok(hot + range.count() as u64)
    }

    /// The last sequence number handed to an entry (of any sink).
    pub fn last_seq(&self) -> u64 {
        lock(&self.state).counters.next_seq
    }

    /// Makes every later entry's sequence number larger than `floor`. Sequence numbers
    /// resume after the largest one stored, so a queue emptied and reopened would hand out
    /// numbers again that a reader keeping positions (the events log's consumer groups)
    /// has already passed; such a reader raises the floor to its positions at start.
    pub fn raise_seq(&self, floor: u64) {
        let mut st = lock(&self.state);
        st.counters.next_seq = st.counters.next_seq.max(floor);
    }

    /// Entries in redb, and entries served from memory (tests check both layers are used).
    #[cfg(test)]
    pub(crate) fn layers(&self) -> (u64, u64) {
        let st = lock(&self.state);
        let hot = st.hot.values().map(|m| m.len() as u64).sum();
        (st.stored.values().sum(), hot)
    }

    fn send(&self, job: Job) -> bool {
        match self.jobs.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(tx) => tx.send(job).is_ok(),
            None => false,
        }
    }
}

/// Finishes pending writes and releases the store file.
impl Drop for DiskQueue {
    fn drop(&mut self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

/// Bytes free for an unprivileged writer on the filesystem holding `dir`; `None` when the
/// filesystem cannot say.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: statvfs writes only into the struct passed, from a NUL-terminated path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return None;
        }
        #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
        Some(st.f_bavail as u64 * st.f_frsize as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

/// Brings the store to [`FORMAT`], one transaction per step; refuses a newer one untouched.
fn migrate(db: &Database, path: &Path) -> Result<(), QueueError> {
    let found = format_of(db)?;
    if found > FORMAT {
        return Err(QueueError::NewerFormat {
            path: path.display().to_string(),
            found,
            supported: FORMAT,
        });
    }
    if found < FORMAT {
        // 0 -> 1 -> 2: the layout is the same; the version is recorded from now on.
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(META)
            .map_err(err)?
            .insert("format", FORMAT.to_string().as_bytes())
            .map_err(err)?;
        tx.commit().map_err(err)?;
        tracing::info!(
            store = %path.display(),
            from = found,
            to = FORMAT,
            "store-and-forward store format recorded (0: a new store, or one from before formats were recorded)"
        );
    }
    Ok(())
}

/// The format version recorded in a queue store file (0: none recorded), read only.
pub fn format_of(db: &Database) -> Result<u32, QueueError> {
    let tx = db.begin_read().map_err(err)?;
    match tx.open_table(META) {
        Ok(t) => Ok(t
            .get("format")
            .map_err(err)?
            .and_then(|v| std::str::from_utf8(v.value()).ok()?.parse::<u32>().ok())
            .unwrap_or(0)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(err(e)),
    }
}

/// Moves a damaged store aside and starts a new one, so the hub always starts.
fn set_aside(
    path: &Path,
    reason: &str,
    cache_bytes: usize,
) -> Result<(Database, Option<PathBuf>), QueueError> {
    let aside = path.with_extension(format!("corrupt-{}", std::process::id()));
    std::fs::rename(path, &aside).map_err(err)?;
    tracing::warn!(
        "store-and-forward store {} could not be opened ({reason}); moved to {} and started empty",
        path.display(),
        aside.display()
    );
    let db = redb::Builder::new()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(err)?;
    check(&db)?;
    Ok((db, Some(aside)))
}

/// What a stored value counts against the quota (as [`entry_size`] of its bag and body).
fn stored_size(v: &[u8]) -> u64 {
    let bag_len = v
        .get(16..20)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .unwrap_or(0);
    (bag_len + v.len().saturating_sub(20 + bag_len) + 32) as u64
}

/// Opens the table once so a damaged file shows up at open, not later.
fn check(db: &Database) -> Result<(), QueueError> {
    let tx = db.begin_write().map_err(err)?;
    tx.open_table(QUEUE).map_err(err)?;
    tx.commit().map_err(err)?;
    let tx = db.begin_read().map_err(err)?;
    let table = tx.open_table(QUEUE).map_err(err)?;
    for row in table.iter().map_err(err)? {
        row.map_err(err)?;
    }
    Ok(())
}

/// The next entry to drop for the quota: the oldest of the lowest priority, in one sink or
/// in all, wherever it is (redb, memory, or this batch).
#[derive(Debug)]
enum Victim {
    Stored(EntryKey, u64),
    Hot(EntryKey),
    Staged(usize),
}

/// The writer thread's own state: the log files and the limits.
struct Writer {
    db: Arc<Database>,
    state: Arc<Mutex<State>>,
    limits: Limits,
    dir: PathBuf,
    /// Sealed generations, oldest first.
    sealed: VecDeque<u64>,
    active: log::Active,
    hot_budget: u64,
    segment_bytes: u64,
    /// Appends are being refused at the free-space floor: logged when it starts and ends.
    at_floor: bool,
}

/// Entries of the batch being written, with where each body sits in the log buffer: once
/// synced they are served from memory with their bodies sliced out of that buffer, so a
/// queued body holds no socket read buffer (of which it may be a small part) alive.
type Staged = Vec<(EntryKey, HotEntry, std::ops::Range<usize>)>;

impl Writer {
    /// `Some((free, floor))` when appending `incoming` bytes would take the disk below the
    /// free-space floor.
    fn below_floor(&self, incoming: u64) -> Option<(u64, u64)> {
        let floor = self.limits.min_free_bytes;
        if floor == 0 {
            return None;
        }
        let free = free_bytes(&self.dir)?;
        (free < floor.saturating_add(incoming)).then_some((free, floor))
    }

    fn run(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            self.apply(batch);
            if let Err(e) = self.maintain() {
                tracing::warn!(error = %e, "store-and-forward log maintenance failed");
            }
        }
        // Closing: log the last removals, so a clean stop delivers nothing twice.
        self.apply(Vec::new());
        let _ = self.active.write(&[], true);
    }

    /// One group commit: removals, then appends, one write and one sync.
    fn apply(&mut self, batch: Vec<Job>) {
        let mut buf = Vec::new();
        let mut staged: Staged = Vec::new();
        let mut replies = Vec::new();
        // Below the free-space floor nothing is appended (removals still are: they make room).
        let incoming: u64 = batch
            .iter()
            .map(|j| match j {
                Job::Append { entries, .. } => entries
                    .iter()
                    .map(|e| entry_size(&e.bag, &e.body))
                    .sum::<u64>(),
                Job::Wake => 0,
            })
            .sum();
        let mut low = if incoming > 0 {
            self.below_floor(incoming)
        } else {
            None
        };
        // Spare log files are the first thing to give up at the floor.
        if low.is_some() && log::drop_spares(&self.dir).is_ok_and(|n| n > 0) {
            low = self.below_floor(incoming);
        }
        if incoming > 0 && low.is_some() != self.at_floor {
            self.at_floor = low.is_some();
            match low {
                Some((free, floor)) => tracing::warn!(
                    free,
                    floor,
                    "the disk is at the store-and-forward free-space floor: routed publishes are held unacknowledged until there is room"
                ),
                None => tracing::info!("the disk has room again: routed publishes are stored"),
            }
        }
        let stored_removes = {
            let mut st = lock(&self.state);
            for job in batch {
                if let Job::Append {
                    entries,
                    now_ms,
                    reply,
                } = job
                {
                    let outcome = match low {
                        Some((free, floor)) => Err(AppendError {
                            error: QueueError::DiskFull { free, floor },
                            entries,
                        }),
                        None => self.append(&mut st, entries, now_ms, &mut buf, &mut staged),
                    };
                    replies.push((reply, outcome));
                }
            }
            for k in st.log_removes.drain(..) {
                log::encode_remove(&mut buf, Some(self.active.id), &k);
            }
            std::mem::take(&mut st.stored_removes)
        };
        if !stored_removes.is_empty() {
            self.delete_stored(stored_removes);
        }
        let buf = Bytes::from(buf);
        match self.active.write(&buf, !staged.is_empty()) {
            Ok(()) => {
                let mut st = lock(&self.state);
                let generation = self.active.id;
                *st.live.entry(generation).or_default() += staged.len() as u64;
                for (key, mut e, body) in staged {
                    e.generation = generation;
                    e.body = buf.slice(body);
                    st.hot_bytes += entry_size(&e.bag, &e.body);
                    st.hot
                        .entry(key.sink)
                        .or_default()
                        .insert((key.priority, key.seq), e);
                }
                drop(st);
                for (reply, outcome) in replies {
                    let _ = reply.send(outcome);
                }
            }
            Err(e) => {
                let mut st = lock(&self.state);
                for (key, e, _) in &staged {
                    st.uncount(&key.sink, entry_size(&e.bag, &e.body));
                }
                drop(st);
                for (reply, outcome) in replies {
                    let _ = reply.send(outcome.and(Err(AppendError::from(e.clone()))));
                }
            }
        }
    }

    /// Stages one append: quota first, then the records in `buf`.
    fn append(
        &self,
        st: &mut State,
        entries: Vec<NewEntry>,
        now_ms: u64,
        buf: &mut Vec<u8>,
        staged: &mut Staged,
    ) -> Result<(), AppendError> {
        let limits = &self.limits;
        if limits.when_full == WhenFull::Refuse {
            let incoming: u64 = entries.iter().map(|e| entry_size(&e.bag, &e.body)).sum();
            let sink_over = entries.iter().any(|e| {
                st.counters
                    .over(limits, Some(&e.sink), entry_size(&e.bag, &e.body))
            });
            if st.counters.over(limits, None, incoming) || sink_over {
                return Err(AppendError {
                    error: QueueError::Full,
                    entries,
                });
            }
        }
        for e in entries {
            let size = entry_size(&e.bag, &e.body);
            for scope in [Some(e.sink.as_str()), None] {
                while st.counters.over(limits, scope, size) {
                    let Some(v) = self.victim(st, staged, scope) else {
                        break;
                    };
                    self.drop_victim(st, staged, v, buf);
                }
            }
            st.counters.next_seq += 1;
            let key = EntryKey {
                sink: e.sink,
                priority: e.priority,
                seq: st.counters.next_seq,
            };
            let expires_ms = now_ms.saturating_add(e.ttl_ms);
            log::encode_append(
                buf,
                Some(self.active.id),
                &key,
                now_ms,
                expires_ms,
                &e.bag,
                &e.body,
            );
            let body = buf.len() - e.body.len()..buf.len();
            st.counters.total += size;
            let s = st.counters.stat(&key.sink);
            s.depth += 1;
            s.bytes += size;
            staged.push((
                key,
                HotEntry {
                    enqueued_ms: now_ms,
                    expires_ms,
                    bag: e.bag,
                    body: e.body,
                    generation: 0,
                },
                body,
            ));
        }
        Ok(())
    }

    /// The oldest entry of the lowest priority (9 first), in one sink or in all.
    fn victim(&self, st: &State, staged: &Staged, sink: Option<&str>) -> Option<Victim> {
        let in_scope = |s: &str| sink.is_none_or(|x| x == s);
        for p in (0..=9u8).rev() {
            // (seq, victim): the smallest seq wins.
            let mut best: Option<(u64, Victim)> = None;
            let mut offer = |seq: u64, v: Victim| {
                if best.as_ref().is_none_or(|(b, _)| seq < *b) {
                    best = Some((seq, v));
                }
            };
            for (s, n) in &st.stored {
                if *n == 0 || !in_scope(s) {
                    continue;
                }
                if let Some((key, size)) = self.first_stored(st, s, p) {
                    offer(key.seq, Victim::Stored(key, size));
                }
            }
            for (s, map) in &st.hot {
                if !in_scope(s) {
                    continue;
                }
                if let Some((&(_, seq), _)) = map.range((p, 0)..=(p, u64::MAX)).next() {
                    let key = EntryKey {
                        sink: s.clone(),
                        priority: p,
                        seq,
                    };
                    offer(seq, Victim::Hot(key));
                }
            }
            if let Some(i) = staged
                .iter()
                .position(|(k, _, _)| k.priority == p && in_scope(&k.sink))
            {
                offer(staged[i].0.seq, Victim::Staged(i));
            }
            if let Some((_, v)) = best {
                return Some(v);
            }
        }
        None
    }

    /// The oldest stored entry of `sink` at priority `p` not already leaving.
    fn first_stored(&self, st: &State, sink: &str, p: u8) -> Option<(EntryKey, u64)> {
        let tx = self.db.begin_read().ok()?;
        let table = tx.open_table(QUEUE).ok()?;
        let range = table.range((sink, p, 0u64)..=(sink, p, u64::MAX)).ok()?;
        for row in range {
            let (k, v) = row.ok()?;
            let (s, priority, seq) = k.value();
            let key = EntryKey {
                sink: s.to_string(),
                priority,
                seq,
            };
            if !st.removing.contains(&key) {
                return Some((key, stored_size(v.value())));
            }
        }
        None
    }

    fn drop_victim(&self, st: &mut State, staged: &mut Staged, v: Victim, buf: &mut Vec<u8>) {
        let sink = match v {
            Victim::Stored(key, size) => {
                st.uncount(&key.sink, size);
                let sink = key.sink.clone();
                st.removing.insert(key.clone());
                st.stored_removes.push((key, Leaving::Counted));
                sink
            }
            Victim::Hot(key) => {
                st.take_hot(&key);
                let sink = key.sink.clone();
                st.log_removes.push(key);
                sink
            }
            Victim::Staged(i) => {
                let (key, e, _) = staged.remove(i);
                st.uncount(&key.sink, entry_size(&e.bag, &e.body));
                // Its append record is already in the buffer: cancel it in the same batch.
                log::encode_remove(buf, Some(self.active.id), &key);
                key.sink
            }
        };
        st.counters.stat(&sink).dropped_quota += 1;
    }

    /// Deletes entries from redb in one transaction. Failed deletes are retried with the next
    /// batch (their keys stay in `removing`, so they are not handed out meanwhile).
    fn delete_stored(&self, removes: Vec<(EntryKey, Leaving)>) {
        let result = (|| -> Result<Vec<Option<u64>>, QueueError> {
            let tx = self.db.begin_write().map_err(err)?;
            let mut sizes = Vec::with_capacity(removes.len());
            {
                let mut table = tx.open_table(QUEUE).map_err(err)?;
                for (k, _) in &removes {
                    let old = table
                        .remove((k.sink.as_str(), k.priority, k.seq))
                        .map_err(err)?;
                    sizes.push(old.map(|v| stored_size(v.value())));
                }
            }
            tx.commit().map_err(err)?;
            Ok(sizes)
        })();
        let mut st = lock(&self.state);
        match result {
            Ok(sizes) => {
                for ((k, leaving), size) in removes.into_iter().zip(sizes) {
                    st.removing.remove(&k);
                    let Some(size) = size else { continue };
                    if let Some(n) = st.stored.get_mut(&k.sink) {
                        *n = n.saturating_sub(1);
                    }
                    match leaving {
                        Leaving::Counted => {}
                        Leaving::Delivered => st.uncount(&k.sink, size),
                        Leaving::Expired => {
                            st.uncount(&k.sink, size);
                            st.counters.stat(&k.sink).dropped_expired += 1;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "store-and-forward store: removals not committed; retrying");
                st.stored_removes.extend(removes);
            }
        }
    }

    /// Starts a new log generation when the current one is full, deletes generations whose
    /// entries are all gone, and moves the oldest generation's live entries to redb when
    /// memory or the log's length is over budget.
    fn maintain(&mut self) -> Result<(), QueueError> {
        if self.active.len >= self.segment_bytes {
            self.rotate()?;
        }
        loop {
            let mut deleted = false;
            while let Some(&oldest) = self.sealed.front() {
                let live = lock(&self.state).live.get(&oldest).copied().unwrap_or(0);
                if live > 0 {
                    break;
                }
                self.delete_generation(oldest)?;
                deleted = true;
            }
            if deleted {
                log::sync_dir(&self.dir)?;
            }
            let over_memory = lock(&self.state).hot_bytes > self.hot_budget;
            if !over_memory && self.sealed.len() <= MAX_SEALED {
                return Ok(());
            }
            if self.sealed.is_empty() {
                if self.active.len == 0 {
                    return Ok(());
                }
                self.rotate()?;
            }
            if let Some(&oldest) = self.sealed.front() {
                self.spill(oldest)?;
            }
        }
    }

    fn rotate(&mut self) -> Result<(), QueueError> {
        // The next file first: if it cannot be made, the current one goes on taking appends,
        // so it must not be sealed yet (reading stops at the end record).
        let next = log::Active::create_recycling(&self.dir, self.active.id + 1)?;
        // The end record only spares a reader from telling an earlier life of a written-over
        // file from damage; without it (a failed write) every record still reads.
        if let Err(e) = self.active.seal() {
            tracing::warn!(error = %e, "store-and-forward log: could not seal a full generation");
        }
        lock(&self.state).live.entry(next.id).or_default();
        let old = std::mem::replace(&mut self.active, next);
        self.sealed.push_back(old.id);
        Ok(())
    }

    /// Deletes the oldest sealed generation (none of its entries is hot any more).
    fn delete_generation(&mut self, id: u64) -> Result<(), QueueError> {
        // Written by this process: generation frames only.
        log::retire(&self.dir, id, true)?;
        self.sealed.pop_front();
        lock(&self.state).live.remove(&id);
        Ok(())
    }

    /// Moves the live entries of generation `id` (the oldest) into redb, then deletes it.
    fn spill(&mut self, id: u64) -> Result<(), QueueError> {
        let moving: Vec<(EntryKey, HotEntry)> = {
            let mut st = lock(&self.state);
            st.spilling = Some(id);
            st.hot
                .iter()
                .flat_map(|(sink, map)| {
                    map.iter()
                        .filter(|(_, e)| e.generation == id)
                        .map(|(&(priority, seq), e)| {
                            let key = EntryKey {
                                sink: sink.clone(),
                                priority,
                                seq,
                            };
                            (key, e.clone())
                        })
                })
                .collect()
        };
        let copied = (|| -> Result<(), QueueError> {
            if moving.is_empty() {
                return Ok(());
            }
            let tx = self.db.begin_write().map_err(err)?;
            {
                let mut table = tx.open_table(QUEUE).map_err(err)?;
                for (k, e) in &moving {
                    store(&mut table, k, e.enqueued_ms, e.expires_ms, &e.bag, &e.body)?;
                }
            }
            tx.commit().map_err(err)
        })();
        let mut st = lock(&self.state);
        st.spilling = None;
        let removed = std::mem::take(&mut st.removed_while_spilling);
        if let Err(e) = copied {
            // Nothing reached redb: what was removed meanwhile is simply gone.
            for k in &removed {
                st.removing.remove(k);
            }
            return Err(e);
        }
        let mut vanished = Vec::new();
        for (k, _) in moving {
            *st.stored.entry(k.sink.clone()).or_default() += 1;
            if st.out_of_memory(&k).is_none() {
                // Removed while it was being copied: it must leave redb too. Its counters
                // were settled when it was removed.
                st.removing.insert(k.clone());
                vanished.push((k, Leaving::Counted));
            }
        }
        drop(st);
        if !vanished.is_empty() {
            self.delete_stored(vanished);
        }
        self.delete_generation(id)?;
        log::sync_dir(&self.dir)
    }
}

impl Queue for DiskQueue {
    fn append(&self, entries: Vec<NewEntry>, now_ms: u64) -> AppendFuture {
        let (reply, rx) = oneshot::channel();
        let sent = self.send(Job::Append {
            entries,
            now_ms,
            reply,
        });
        Box::pin(async move {
            if !sent {
                return Err(QueueError::Store("queue writer stopped".into()).into());
            }
            rx.await
                .map_err(|_| AppendError::from(QueueError::Store("queue writer stopped".into())))?
        })
    }

    fn peek_after(
        &self,
        sink: &str,
        after: Option<&EntryKey>,
        skip: &KeySet,
        limit: usize,
        now_ms: u64,
    ) -> Result<Peeked, QueueError> {
        // The lock is held for the whole read, redb included: a removal or a move to redb
        // cannot slip between the two halves.
        let st = lock(&self.state);
        let start = after
            .map(|k| (k.priority, k.seq.saturating_add(1)))
            .unwrap_or((0, 0));
        let mut expired = Vec::new();
        let mut hot = Vec::new();
        if let Some(map) = st.hot.get(sink) {
            for (&(priority, seq), e) in map.range(start..) {
                if hot.len() >= limit {
                    break;
                }
                let key = EntryKey {
                    sink: sink.to_string(),
                    priority,
                    seq,
                };
                if skip.contains(&key) {
                    continue;
                }
                if e.expires_ms <= now_ms {
                    expired.push(key);
                } else {
                    hot.push(Entry {
                        key,
                        enqueued_ms: e.enqueued_ms,
                        expires_ms: e.expires_ms,
                        bag: e.bag.clone(),
                        body: e.body.clone(),
                    });
                }
            }
        }
        let mut stored = Vec::new();
        if st.stored_in(sink) > 0 {
            let tx = self.db.begin_read().map_err(err)?;
            let table = tx.open_table(QUEUE).map_err(err)?;
            for row in table
                .range((sink, start.0, start.1)..=(sink, u8::MAX, u64::MAX))
                .map_err(err)?
            {
                if stored.len() >= limit {
                    break;
                }
                let (k, v) = row.map_err(err)?;
                let (s, priority, seq) = k.value();
                let key = EntryKey {
                    sink: s.to_string(),
                    priority,
                    seq,
                };
                if skip.contains(&key) || st.removing.contains(&key) {
                    continue;
                }
                match decode(key.clone(), v.value()) {
                    Some(entry) if entry.expires_ms > now_ms => stored.push(entry),
                    _ => expired.push(key),
                }
            }
        }
        // Both halves are in delivery order; merge them.
        let mut out = Peeked {
            entries: Vec::with_capacity(limit.min(hot.len() + stored.len())),
            expired: expired.len() as u64,
        };
        let (mut hot, mut stored) = (hot.into_iter().peekable(), stored.into_iter().peekable());
        while out.entries.len() < limit {
            let next = match (hot.peek(), stored.peek()) {
                // Just moved to redb and not yet out of memory (the move commits before it
                // takes the lock): the same entry, once.
                (Some(h), Some(s)) if s.key.seq == h.key.seq => {
                    stored.next();
                    continue;
                }
                (Some(h), Some(s)) if (s.key.priority, s.key.seq) < (h.key.priority, h.key.seq) => {
                    stored.next()
                }
                (Some(_), _) => hot.next(),
                (None, _) => stored.next(),
            };
            match next {
                Some(e) => out.entries.push(e),
                None => break,
            }
        }
        self.remove_under(st, expired, Leaving::Expired);
        Ok(out)
    }

    fn remove(&self, keys: Vec<EntryKey>) {
        self.remove_under(lock(&self.state), keys, Leaving::Delivered);
    }

    fn sinks(&self) -> Vec<(String, u64)> {
        lock(&self.state).counters.nonempty()
    }

    fn stats(&self) -> Vec<SinkStats> {
        let (mut out, hot_oldest, stored_sinks) = {
            let st = lock(&self.state);
            let out: Vec<SinkStats> = st.counters.sinks.values().cloned().collect();
            // Within a priority entries are in arrival order: the first of each is enough.
            let hot_oldest: HashMap<String, u64> = st
                .hot
                .iter()
                .filter_map(|(s, map)| {
                    let oldest = (0..=9u8)
                        .filter_map(|p| map.range((p, 0)..=(p, u64::MAX)).next())
                        .map(|(_, e)| e.enqueued_ms)
                        .min()?;
                    Some((s.clone(), oldest))
                })
                .collect();
            let stored: HashSet<String> = st
                .stored
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(s, _)| s.clone())
                .collect();
            (out, hot_oldest, stored)
        };
        let tx = self.db.begin_read().ok();
        let table = tx.as_ref().and_then(|tx| tx.open_table(QUEUE).ok());
        for s in &mut out {
            let stored_oldest = table
                .as_ref()
                .filter(|_| stored_sinks.contains(&s.sink))
                .and_then(|table| {
                    (0..=9u8)
                        .filter_map(|p| {
                            let mut r = table
                                .range((s.sink.as_str(), p, 0u64)..=(s.sink.as_str(), p, u64::MAX))
                                .ok()?;
                            let (_, v) = r.next()?.ok()?;
                            Some(u64::from_be_bytes(v.value().get(0..8)?.try_into().ok()?))
                        })
                        .min()
                });
            s.oldest_ms = [stored_oldest, hot_oldest.get(&s.sink).copied()]
                .into_iter()
                .flatten()
                .min();
        }
        out.sort_by(|a, b| a.sink.cmp(&b.sink));
        out
    }
}
