//! The durable queue: redb, one writer thread.
//!
//! The writer takes every job waiting (appends from many connections, removals of delivered
//! and expired entries), applies them in one write transaction and commits once: one fsync
//! for the whole batch (group commit). An append's future resolves only after its commit, so
//! what the hub acknowledges is on disk. Readers use read transactions and never wait for the
//! writer. Counters (depth, bytes per sink) live in memory and are rebuilt by one scan at
//! open; message data never does, so memory stays flat however deep a queue gets.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::*;

/// Key: (sink, priority, seq). Value: enqueued ms, expires ms, bag length (u32), bag, body.
const QUEUE: TableDefinition<(&str, u8, u64), &[u8]> = TableDefinition::new("queue");
const MAX_BATCH: usize = 4096;

enum Job {
    Append {
        entries: Vec<NewEntry>,
        now_ms: u64,
        reply: oneshot::Sender<Result<(), QueueError>>,
    },
    Remove(Vec<EntryKey>),
    Expire(Vec<EntryKey>),
}

pub struct DiskQueue {
    db: Arc<Database>,
    /// `None` once closing: dropping the sender ends the writer thread.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Keys handed to `remove` whose removal is not committed yet: `peek` must not hand them
    /// out again meanwhile (that would be a duplicate delivery).
    removing: Arc<Mutex<HashSet<EntryKey>>>,
    counters: Arc<Mutex<Counters>>,
    /// Set when the store could not be opened and was moved aside (shown to operators).
    pub recovered_from: Option<PathBuf>,
}

fn err(e: impl std::fmt::Display) -> QueueError {
    QueueError::Store(e.to_string())
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

impl DiskQueue {
    /// Opens (or creates) the queue store at `path`. A file that cannot be opened (torn or
    /// truncated beyond what redb repairs) is moved aside and a new one started, so the hub
    /// always starts; `recovered_from` says where the old file went.
    pub fn open(path: &Path, limits: Limits) -> Result<DiskQueue, QueueError> {
        // redb asserts on some damaged files (a truncated one panics in its page manager):
        // at this boundary a panic is just another kind of damage.
        let opened = std::panic::catch_unwind(|| {
            redb::Builder::new()
                .set_cache_size(limits.cache_bytes)
                .create(path)
        })
        .unwrap_or_else(|p| {
            let why = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic while opening".into());
            Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(
                why,
            )))
        });
        let (db, recovered_from) = match opened {
            Ok(db) => match check(&db) {
                Ok(()) => (db, None),
                Err(e) => {
                    drop(db);
                    set_aside(path, &e.to_string(), limits.cache_bytes)?
                }
            },
            // Another process (or a queue not yet closed) holds it: never a reason to discard.
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(QueueError::Store(format!(
                    "{} is already open",
                    path.display()
                )));
            }
            Err(e) => set_aside(path, &e.to_string(), limits.cache_bytes)?,
        };
        let db = Arc::new(db);
        let mut counters = Counters::default();
        {
            let tx = db.begin_read().map_err(err)?;
            let table = tx.open_table(QUEUE).map_err(err)?;
            for row in table.iter().map_err(err)? {
                let (k, v) = row.map_err(err)?;
                let (sink, _, seq) = k.value();
                let entry_bytes = stored_size(v.value());
                counters.total += entry_bytes;
                counters.next_seq = counters.next_seq.max(seq);
                let s = counters.stat(sink);
                s.depth += 1;
                s.bytes += entry_bytes;
            }
        }
        let counters = Arc::new(Mutex::new(counters));
        let (tx, rx) = mpsc::channel();
        let (wdb, wcounters) = (db.clone(), counters.clone());
        let removing = Arc::new(Mutex::new(HashSet::new()));
        let wremoving = removing.clone();
        let handle = std::thread::Builder::new()
            .name("queue-writer".into())
            .spawn(move || writer(wdb, wcounters, rx, limits, wremoving))
            .map_err(err)?;
        Ok(DiskQueue {
            db,
            jobs: Mutex::new(Some(tx)),
            writer: Some(handle),
            removing,
            counters,
            recovered_from,
        })
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

/// Moves a damaged store aside and starts a new one, so the hub always starts.
fn set_aside(
    path: &Path,
    reason: &str,
    cache_bytes: usize,
) -> Result<(Database, Option<PathBuf>), QueueError> {
    let aside = path.with_extension(format!("corrupt-{}", std::process::id()));
    std::fs::rename(path, &aside).map_err(err)?;
    eprintln!(
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
    entry_size_raw(bag_len, v.len().saturating_sub(20 + bag_len))
}

fn entry_size_raw(bag_len: usize, body_len: usize) -> u64 {
    (bag_len + body_len + 32) as u64
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

/// The oldest entry of the lowest priority, in one sink or in all.
fn victim(
    table: &redb::Table<(&str, u8, u64), &[u8]>,
    counters: &Counters,
    sink: Option<&str>,
) -> Option<(EntryKey, u64)> {
    for p in (0..=9u8).rev() {
        let mut best: Option<(EntryKey, u64)> = None;
        for s in counters
            .sinks
            .values()
            .filter(|s| s.depth > 0 && sink.is_none_or(|x| x == s.sink))
        {
            let mut range = table
                .range((s.sink.as_str(), p, 0u64)..=(s.sink.as_str(), p, u64::MAX))
                .ok()?;
            if let Some(Ok((k, v))) = range.next() {
                let (sk, pr, seq) = k.value();
                let size = stored_size(v.value());
                if best.as_ref().is_none_or(|(b, _)| seq < b.seq) {
                    best = Some((
                        EntryKey {
                            sink: sk.to_string(),
                            priority: pr,
                            seq,
                        },
                        size,
                    ));
                }
            }
        }
        if best.is_some() {
            return best;
        }
    }
    None
}

fn writer(
    db: Arc<Database>,
    shared: Arc<Mutex<Counters>>,
    rx: mpsc::Receiver<Job>,
    limits: Limits,
    removing: Arc<Mutex<HashSet<EntryKey>>>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let mut c = shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut replies = Vec::new();
        let removed: Vec<EntryKey> = batch
            .iter()
            .filter_map(|j| match j {
                Job::Remove(keys) => Some(keys.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        let result = (|| -> Result<(), QueueError> {
            let tx = db.begin_write().map_err(err)?;
            {
                let mut table = tx.open_table(QUEUE).map_err(err)?;
                for job in batch {
                    match job {
                        Job::Remove(keys) | Job::Expire(keys) if keys.is_empty() => {}
                        Job::Remove(keys) => {
                            for k in keys {
                                remove(&mut table, &mut c, &k, false)?;
                            }
                        }
                        Job::Expire(keys) => {
                            for k in keys {
                                remove(&mut table, &mut c, &k, true)?;
                            }
                        }
                        Job::Append {
                            entries,
                            now_ms,
                            reply,
                        } => match append(&mut table, &mut c, entries, now_ms, &limits) {
                            // A store error mid-append aborts the whole batch: nothing half-written.
                            Err(QueueError::Store(e)) => return Err(QueueError::Store(e)),
                            outcome => replies.push((reply, outcome)),
                        },
                    }
                }
            }
            tx.commit().map_err(err)
        })();
        match result {
            Ok(()) => {
                *shared.lock().unwrap_or_else(|e| e.into_inner()) = c;
                let mut pending = removing.lock().unwrap_or_else(|e| e.into_inner());
                for k in &removed {
                    pending.remove(k);
                }
                drop(pending);
                for (reply, outcome) in replies {
                    let _ = reply.send(outcome);
                }
            }
            Err(e) => {
                for (reply, _) in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn remove(
    table: &mut redb::Table<(&str, u8, u64), &[u8]>,
    c: &mut Counters,
    k: &EntryKey,
    expired: bool,
) -> Result<(), QueueError> {
    let removed = table
        .remove((k.sink.as_str(), k.priority, k.seq))
        .map_err(err)?;
    if let Some(v) = removed {
        let v = v.value();
        let size = stored_size(v);
        c.total = c.total.saturating_sub(size);
        let s = c.stat(&k.sink);
        s.depth = s.depth.saturating_sub(1);
        s.bytes = s.bytes.saturating_sub(size);
        if expired {
            s.dropped_expired += 1;
        }
    }
    Ok(())
}

fn append(
    table: &mut redb::Table<(&str, u8, u64), &[u8]>,
    c: &mut Counters,
    entries: Vec<NewEntry>,
    now_ms: u64,
    limits: &Limits,
) -> Result<(), QueueError> {
    let over = |c: &Counters, sink: Option<&str>, add: u64| c.over(limits, sink, add);
    if limits.when_full == WhenFull::Refuse {
        let incoming: u64 = entries.iter().map(|e| entry_size(&e.bag, &e.body)).sum();
        let sink_over = entries
            .iter()
            .any(|e| over(c, Some(&e.sink), entry_size(&e.bag, &e.body)));
        if over(c, None, incoming) || sink_over {
            return Err(QueueError::Full);
        }
    }
    for e in entries {
        let size = entry_size(&e.bag, &e.body);
        while over(c, Some(&e.sink), size) {
            let Some((v, _)) = victim(table, c, Some(&e.sink)) else {
                break;
            };
            remove(table, c, &v, false)?;
            c.stat(&v.sink).dropped_quota += 1;
        }
        while over(c, None, size) {
            let Some((v, _)) = victim(table, c, None) else {
                break;
            };
            remove(table, c, &v, false)?;
            c.stat(&v.sink).dropped_quota += 1;
        }
        c.next_seq += 1;
        let seq = c.next_seq;
        let value = encode(now_ms, now_ms.saturating_add(e.ttl_ms), &e.bag, &e.body);
        table
            .insert((e.sink.as_str(), e.priority, seq), value.as_slice())
            .map_err(err)?;
        c.total += size;
        let s = c.stat(&e.sink);
        s.depth += 1;
        s.bytes += size;
    }
    Ok(())
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
                return Err(QueueError::Store("queue writer stopped".into()));
            }
            rx.await
                .map_err(|_| QueueError::Store("queue writer stopped".into()))?
        })
    }

    fn peek_after(
        &self,
        sink: &str,
        after: Option<&EntryKey>,
        skip: &HashSet<EntryKey>,
        limit: usize,
        now_ms: u64,
    ) -> Result<Peeked, QueueError> {
        // Pending removals, held for the scan (the writer takes this lock only briefly after
        // a commit): a key listed here is never handed out again.
        let removing = self.removing.lock().unwrap_or_else(|e| e.into_inner());
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(QUEUE).map_err(err)?;
        let mut out = Peeked::default();
        let mut expired = Vec::new();
        let (p0, s0) = after
            .map(|k| (k.priority, k.seq.saturating_add(1)))
            .unwrap_or((0, 0));
        for row in table
            .range((sink, p0, s0)..=(sink, u8::MAX, u64::MAX))
            .map_err(err)?
        {
            if out.entries.len() >= limit {
                break;
            }
            let (k, v) = row.map_err(err)?;
            let (s, priority, seq) = k.value();
            let key = EntryKey {
                sink: s.to_string(),
                priority,
                seq,
            };
            if skip.contains(&key) || removing.contains(&key) {
                continue;
            }
            let Some(entry) = decode(key.clone(), v.value()) else {
                expired.push(key);
                continue;
            };
            if entry.expires_ms <= now_ms {
                expired.push(key);
            } else {
                out.entries.push(entry);
            }
        }
        out.expired = expired.len() as u64;
        if !expired.is_empty() {
            self.send(Job::Expire(expired));
        }
        Ok(out)
    }

    fn remove(&self, keys: Vec<EntryKey>) {
        self.removing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(keys.iter().cloned());
        self.send(Job::Remove(keys));
    }

    fn sinks(&self) -> Vec<(String, u64)> {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .nonempty()
    }

    fn stats(&self) -> Vec<SinkStats> {
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out: Vec<SinkStats> = counters.sinks.into_values().collect();
        if let Ok(tx) = self.db.begin_read() {
            if let Ok(table) = tx.open_table(QUEUE) {
                for s in &mut out {
                    s.oldest_ms = (0..=9u8)
                        .filter_map(|p| {
                            let mut r = table
                                .range((s.sink.as_str(), p, 0u64)..=(s.sink.as_str(), p, u64::MAX))
                                .ok()?;
                            let (_, v) = r.next()?.ok()?;
                            Some(u64::from_be_bytes(v.value().get(0..8)?.try_into().ok()?))
                        })
                        .min();
                }
            }
        }
        out.sort_by(|a, b| a.sink.cmp(&b.sink));
        out
    }
}
