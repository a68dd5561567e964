//! The retained log: a stream kept by time and size and read by position (the events
//! endpoint's storage), beside the queues rather than in them.
//!
//! Why not a queue sink: a queue's entries leave when their reader takes them, so the queue
//! keeps them in memory and moves what outstays its budget into redb. Retained entries never
//! leave that way: every one of them was written twice (log, then redb) before retention
//! could drop it, which cost half the endpoint's throughput. Here the log *is* the store:
//! appends are frames at the end of the newest segment file (one `write` and one
//! `fdatasync` per group-committed batch, the queue log's frame format), a sealed segment is
//! never rewritten, and retention deletes whole segments, oldest first. Readers hold
//! positions (sequence numbers); the newest entries are also served from memory, so readers
//! that keep up never touch the files.
//!
//! Invariants:
//! - sequence numbers only grow across segments, and a segment file is named by the number
//!   the log was at when it was created, so a restart never hands out a number twice, even
//!   when retention deleted every entry;
//! - an append's future resolves only after its batch was synced; readers see an entry only
//!   then (memory and segment lengths are updated after the sync);
//! - segments are read only up to the length last synced, so a read never meets a frame
//!   being written; at open the newest is cut back to its last whole frame (a torn tail held
//!   nothing acknowledged).

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use super::disk::log::{self, Active, Record, Scan};
use super::*;

/// Index one position per this many bytes of a segment: a read by position scans at most
/// this far before its first entry, for an index of a few MB per GB retained.
const INDEX_EVERY: u64 = 4096;
/// Segments are an eighth of the size limit (so size retention keeps at least seven eighths
/// of it), within these bounds.
const MAX_SEGMENT: u64 = 64 * 1024 * 1024;
const MIN_SEGMENT: u64 = 256;
/// How often the writer looks at retention when no appends come.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// A cold read takes this much of a segment at a time.
const READ_CHUNK: usize = 1024 * 1024;

/// What the log keeps and where it stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Entries leave this long after they were appended (0: no time limit).
    pub time_ms: u64,
    /// The segments' total size at most; the oldest leave first (0: no size limit).
    pub bytes: u64,
    /// The newest entries also kept in memory, for readers that keep up.
    pub cache_bytes: usize,
    /// Free disk space appends must leave (0: no floor); below it they are refused.
    pub min_free_bytes: u64,
}

/// One segment file.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// Synced length: readers read up to here.
    bytes: u64,
    count: u64,
    first_seq: Option<u64>,
    last_seq: u64,
    first_ms: u64,
    last_ms: u64,
    /// (seq, offset of its frame), one per [`INDEX_EVERY`] bytes, ascending.
    index: Vec<(u64, u64)>,
}

impl Segment {
    fn new(path: PathBuf) -> Segment {
        Segment {
            path,
            bytes: 0,
            count: 0,
            first_seq: None,
            last_seq: 0,
            first_ms: 0,
            last_ms: 0,
            index: Vec::new(),
        }
    }

    /// Accounts an entry whose frame starts at `offset` and ends at `end`.
    fn add(&mut self, seq: u64, enqueued_ms: u64, offset: u64, end: u64) {
        if self.first_seq.is_none() {
            self.first_seq = Some(seq);
            self.first_ms = enqueued_ms;
        }
        if self
            .index
            .last()
            .is_none_or(|&(_, at)| offset >= at + INDEX_EVERY)
        {
            self.index.push((seq, offset));
        }
        self.count += 1;
        self.last_seq = seq;
        self.last_ms = self.last_ms.max(enqueued_ms);
        self.bytes = end;
    }

    /// Where to start scanning for the first entry after `after`.
    fn offset_for(&self, after: u64) -> u64 {
        let i = self.index.partition_point(|&(seq, _)| seq <= after);
        if i == 0 {
            0
        } else {
            self.index[i - 1].1
        }
    }
}

#[derive(Default)]
struct State {
    /// By file id (the sequence number the log was at when it was created); the last one is
    /// being written.
    segments: BTreeMap<u64, Segment>,
    /// The newest entries, contiguous up to the last one appended.
    tail: VecDeque<Entry>,
    tail_bytes: usize,
    next_seq: u64,
    dropped_expired: u64,
    dropped_quota: u64,
}

impl State {
    fn total_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.bytes).sum()
    }

    fn count(&self) -> u64 {
        self.segments.values().map(|s| s.count).sum()
    }
}

enum Job {
    Append {
        entries: Vec<NewEntry>,
        now_ms: u64,
        reply: oneshot::Sender<Result<(), AppendError>>,
    },
    /// Entries that already have their positions (moved from elsewhere): kept as they are,
    /// skipping any at or below the last position (moved before).
    Import {
        entries: Vec<Entry>,
        reply: oneshot::Sender<Result<u64, QueueError>>,
    },
}

/// The retained log. Appends go through one writer thread (group commit); reads run on the
/// caller's thread.
pub struct RetainedLog {
    name: String,
    dir: PathBuf,
    state: Arc<Mutex<State>>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Records found damaged at open (each a lost entry), for the operator.
    pub corrupt_records: u64,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn segment_bytes(retention: &Retention) -> u64 {
    if retention.bytes == 0 {
        MAX_SEGMENT
    } else {
        (retention.bytes / 8).clamp(MIN_SEGMENT, MAX_SEGMENT)
    }
}

impl RetainedLog {
    /// Opens (or creates) the log in `dir`; entries are handed out under sink `name`.
    pub fn open(dir: &Path, name: &str, retention: Retention) -> Result<RetainedLog, QueueError> {
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut st = State::default();
        let mut corrupt = 0;
        let files = log::generations(dir)?;
        let newest = files.last().map(|(id, _)| *id);
        let mut active_len = 0;
        for (id, path) in files {
            let bytes = std::fs::read(&path).map_err(err)?;
            let mut seg = Segment::new(path);
            let mut scan = Scan::new(&bytes, 0);
            for (at, record) in scan.by_ref() {
                if let Record::Append {
                    key, enqueued_ms, ..
                } = record
                {
                    seg.add(key.seq, enqueued_ms, at as u64, 0);
                }
            }
            corrupt += scan.damaged;
            // Everything up to the last whole frame; beyond it a torn tail (newest file) or
            // damage at the end (counted).
            seg.bytes = scan.at as u64;
            if scan.at < bytes.len() && Some(id) != newest {
                corrupt += 1;
            }
            st.next_seq = st.next_seq.max(id).max(seg.last_seq + 1);
            if Some(id) == newest {
                active_len = seg.bytes;
            }
            st.segments.insert(id, seg);
        }
        st.next_seq = st.next_seq.max(1);
        let active = match newest {
            Some(id) => Active::reopen(dir, id, active_len)?,
            None => {
                let id = st.next_seq;
                st.segments.insert(id, Segment::new(log::gen_path(dir, id)));
                Active::create(dir, id)?
            }
        };
        let state = Arc::new(Mutex::new(st));
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            retention,
            segment_bytes: segment_bytes(&retention),
            state: state.clone(),
            active,
        };
        let handle = std::thread::Builder::new()
            .name("events-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(err)?;
        Ok(RetainedLog {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            state,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            corrupt_records: corrupt,
        })
    }

    fn send(&self, job: Job) -> bool {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok())
    }

    /// Appends entries as one unit (their sinks are ignored: the log is one stream); the
    /// future resolves once they are synced. A refusal (disk at its floor) hands them back.
    pub fn append(&self, entries: Vec<NewEntry>, now_ms: u64) -> AppendFuture {
        let (reply, rx) = oneshot::channel();
        if !self.send(Job::Append {
            entries,
            now_ms,
            reply,
        }) {
            return Box::pin(async {
                Err(QueueError::Store("the events log is closed".into()).into())
            });
        }
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(QueueError::Store("the events log stopped".into()).into()))
        })
    }

    /// Stores entries that already have positions, in order, skipping those at or below the
    /// log's last position; resolves to how many were stored, once they are synced.
    pub fn import(
        &self,
        entries: Vec<Entry>,
    ) -> impl std::future::Future<Output = Result<u64, QueueError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self.send(Job::Import { entries, reply });
        async move {
            if !sent {
                return Err(QueueError::Store("the events log is closed".into()));
            }
            rx.await
                .unwrap_or_else(|_| Err(QueueError::Store("the events log stopped".into())))
        }
    }

    /// The last position handed out (0: none yet).
    pub fn last_seq(&self) -> u64 {
        lock(&self.state).next_seq.saturating_sub(1)
    }

    /// Positions from now on are above `floor` (readers' checkpoints survive retention
    /// deleting everything).
    pub fn raise_seq(&self, floor: u64) {
        let mut st = lock(&self.state);
        st.next_seq = st.next_seq.max(floor + 1);
    }

    /// Up to `limit` entries after position `after`, oldest first, skipping those past
    /// retention time.
    pub fn read_after(
        &self,
        after: u64,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<Entry>, QueueError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        // What is still to be read from files: (path, from offset, to offset).
        let plan: Vec<(PathBuf, u64, u64)> = {
            let st = lock(&self.state);
            let from_tail = st.tail.front().is_some_and(|e| e.key.seq <= after + 1);
            if from_tail {
                let start = st.tail.partition_point(|e| e.key.seq <= after);
                out.extend(
                    st.tail
                        .range(start..)
                        .filter(|e| e.expires_ms > now_ms)
                        .take(limit)
                        .cloned(),
                );
                return Ok(out);
            }
            st.segments
                .values()
                .filter(|s| s.count > 0 && s.last_seq > after)
                .map(|s| (s.path.clone(), s.offset_for(after + 1), s.bytes))
                .collect()
        };
        for (path, from, to) in plan {
            self.read_segment(&path, (from, to), after, |e| {
                if e.expires_ms > now_ms {
                    out.push(e);
                }
                out.len() < limit
            })?;
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Hands `visit` each entry of a segment after position `after` in `from..to` (bytes),
    /// until it returns false.
    fn read_segment(
        &self,
        path: &Path,
        (from, to): (u64, u64),
        after: u64,
        mut visit: impl FnMut(Entry) -> bool,
    ) -> Result<(), QueueError> {
        let mut file = match std::fs::File::open(path) {
            Ok(f) => f,
            // Deleted by retention since the plan was made: nothing of it to read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(err(e)),
        };
        let mut at = from;
        let mut chunk = READ_CHUNK;
        let mut buf = Vec::new();
        while at < to {
            let want = chunk.min((to - at) as usize);
            buf.resize(want, 0);
            file.seek(SeekFrom::Start(at)).map_err(err)?;
            file.read_exact(&mut buf).map_err(err)?;
            let mut scan = Scan::new(&buf, 0);
            for (_, record) in scan.by_ref() {
                let Record::Append {
                    key,
                    enqueued_ms,
                    expires_ms,
                    bag,
                    body,
                } = record
                else {
                    continue;
                };
                if key.seq <= after {
                    continue;
                }
                let more = visit(Entry {
                    key: EntryKey {
                        sink: self.name.clone(),
                        priority: 0,
                        seq: key.seq,
                    },
                    enqueued_ms,
                    expires_ms,
                    bag,
                    body,
                });
                if !more {
                    return Ok(());
                }
            }
            if scan.at == 0 {
                if want == (to - at) as usize {
                    // Damage up to the end of what was synced: nothing more here.
                    return Ok(());
                }
                // A record longer than the chunk: take more at once.
                chunk = chunk.saturating_mul(2);
                continue;
            }
            at += scan.at as u64;
        }
        Ok(())
    }

    /// How many retained entries lie after position `after`: from the segments' counters,
    /// reading only a segment that holds `after` and whose positions have gaps (entries
    /// imported from the queue, or lost to damage).
    pub fn count_after(&self, after: u64) -> Result<u64, QueueError> {
        let mut count = 0;
        let mut scan = Vec::new();
        {
            let st = lock(&self.state);
            for s in st.segments.values() {
                let Some(first) = s.first_seq.filter(|_| s.last_seq > after) else {
                    continue;
                };
                if first > after {
                    count += s.count;
                } else if s.last_seq - first + 1 == s.count {
                    count += s.last_seq - after;
                } else {
                    scan.push((s.path.clone(), s.offset_for(after + 1), s.bytes));
                }
            }
        }
        for (path, from, to) in scan {
            self.read_segment(&path, (from, to), after, |_| {
                count += 1;
                true
            })?;
        }
        Ok(count)
    }

    /// The position just before the first retained entry appended at or after `t` (unix ms).
    pub fn seq_before(&self, t: u64, now_ms: u64) -> Result<u64, QueueError> {
        let start = {
            let st = lock(&self.state);
            st.segments
                .values()
                .find(|s| s.count > 0 && s.last_ms >= t)
                .and_then(|s| s.first_seq)
        };
        let Some(first) = start else {
            return Ok(self.last_seq());
        };
        let mut after = first - 1;
        loop {
            let page = self.read_after(after, 1024, now_ms)?;
            let Some(last) = page.last() else {
                return Ok(self.last_seq());
            };
            if let Some(e) = page.iter().find(|e| e.enqueued_ms >= t) {
                return Ok(e.key.seq - 1);
            }
            after = last.key.seq;
        }
    }

    /// Depth, size, oldest entry and what retention dropped, as a queue sink's stats.
    pub fn stats(&self) -> SinkStats {
        let st = lock(&self.state);
        SinkStats {
            sink: self.name.clone(),
            depth: st.count(),
            bytes: st.total_bytes(),
            oldest_ms: st
                .segments
                .values()
                .find(|s| s.count > 0)
                .map(|s| s.first_ms),
            dropped_expired: st.dropped_expired,
            dropped_quota: st.dropped_quota,
        }
    }

    /// Copies the synced part of every segment into `dest` (a directory, created); returns
    /// the entries copied.
    pub fn backup(&self, dest: &Path) -> Result<u64, QueueError> {
        let plan: Vec<(PathBuf, u64, u64)> = {
            let st = lock(&self.state);
            st.segments
                .values()
                .map(|s| (s.path.clone(), s.bytes, s.count))
                .collect()
        };
        std::fs::create_dir_all(dest).map_err(err)?;
        let mut entries = 0;
        for (path, bytes, count) in plan {
            let Some(name) = path.file_name() else {
                continue;
            };
            let mut from = match std::fs::File::open(&path) {
                Ok(f) => f.take(bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(err(e)),
            };
            let mut to = std::fs::File::create(dest.join(name)).map_err(err)?;
            std::io::copy(&mut from, &mut to).map_err(err)?;
            to.sync_all().map_err(err)?;
            entries += count;
        }
        log::sync_dir(dest)?;
        Ok(entries)
    }

    /// The directory holding the segments.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Finishes what was submitted and stops the writer.
    pub fn close(&self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}

impl Drop for RetainedLog {
    fn drop(&mut self) {
        self.close();
    }
}

struct Writer {
    dir: PathBuf,
    name: String,
    retention: Retention,
    segment_bytes: u64,
    state: Arc<Mutex<State>>,
    active: Active,
}

/// An entry encoded into a chunk, to account once the chunk is synced.
struct Written {
    entry: Entry,
    start: u64,
    end: u64,
}

/// What goes into one segment of a group-committed batch (one write and sync each).
#[derive(Default)]
struct Chunk {
    buf: Vec<u8>,
    written: Vec<Written>,
}

/// A batch cut into chunks at segment boundaries, so a segment stays near its size however
/// large a batch is (size retention deletes whole segments: one segment holding a whole
/// large batch could hold more than the limit allows).
struct Batch {
    chunks: Vec<Chunk>,
    /// The length the current chunk's segment will have.
    segment_len: u64,
    segment_bytes: u64,
}

impl Batch {
    fn add(&mut self, entry: Entry) {
        let full = self.segment_len >= self.segment_bytes;
        if full && self.chunks.last().is_some_and(|c| !c.written.is_empty()) {
            self.chunks.push(Chunk::default());
            self.segment_len = 0;
        }
        let Some(chunk) = self.chunks.last_mut() else {
            return;
        };
        let start = chunk.buf.len() as u64;
        log::encode_append(
            &mut chunk.buf,
            None,
            &entry.key,
            entry.enqueued_ms,
            entry.expires_ms,
            &entry.bag,
            &entry.body,
        );
        let end = chunk.buf.len() as u64;
        self.segment_len += end - start;
        chunk.written.push(Written { entry, start, end });
    }
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        loop {
            let first = match rx.recv_timeout(SWEEP_EVERY) {
                Ok(job) => Some(job),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            if let Some(first) = first {
                let mut jobs = vec![first];
                while jobs.len() < 4096 {
                    match rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                self.apply(jobs);
            }
            if let Err(e) = self.retain(now_ms()) {
                tracing::warn!(error = %e, "events log: retention could not delete a segment");
            }
        }
    }

    fn below_floor(&self, incoming: u64) -> Option<(u64, u64)> {
        let floor = self.retention.min_free_bytes;
        if floor == 0 {
            return None;
        }
        let free = free_bytes(&self.dir)?;
        (free < floor.saturating_add(incoming)).then_some((free, floor))
    }

    fn apply(&mut self, jobs: Vec<Job>) {
        let mut batch = Batch {
            chunks: vec![Chunk::default()],
            segment_len: self.active.len,
            segment_bytes: self.segment_bytes,
        };
        let mut appended = Vec::new();
        let mut imported = Vec::new();
        let incoming: u64 = jobs
            .iter()
            .map(|j| match j {
                Job::Append { entries, .. } => {
                    entries.iter().map(|e| entry_size(&e.bag, &e.body)).sum()
                }
                Job::Import { .. } => 0,
            })
            .sum();
        let floor = self.below_floor(incoming);
        let mut next_seq = lock(&self.state).next_seq;
        for job in jobs {
            match job {
                Job::Append {
                    entries,
                    now_ms,
                    reply,
                } => {
                    if let Some((free, floor)) = floor {
                        let _ = reply.send(Err(AppendError {
                            error: QueueError::DiskFull { free, floor },
                            entries,
                        }));
                        continue;
                    }
                    let expires_ms = match self.retention.time_ms {
                        0 => u64::MAX,
                        t => now_ms.saturating_add(t),
                    };
                    for e in entries {
                        batch.add(Entry {
                            key: EntryKey {
                                sink: self.name.clone(),
                                priority: 0,
                                seq: next_seq,
                            },
                            enqueued_ms: now_ms,
                            expires_ms,
                            bag: e.bag,
                            body: e.body,
                        });
                        next_seq += 1;
                    }
                    appended.push(reply);
                }
                Job::Import { entries, reply } => {
                    let mut n = 0;
                    for mut e in entries {
                        if e.key.seq < next_seq {
                            continue;
                        }
                        next_seq = e.key.seq + 1;
                        e.key.sink = self.name.clone();
                        e.key.priority = 0;
                        batch.add(e);
                        n += 1;
                    }
                    imported.push((reply, n));
                }
            }
        }
        let chunks = batch.chunks.len();
        for (i, chunk) in batch.chunks.into_iter().enumerate() {
            if chunk.written.is_empty() {
                continue;
            }
            if let Err(e) = self.write(chunk) {
                // Chunks before this one are stored: sent again, they are duplicates.
                for (reply, _) in imported {
                    let _ = reply.send(Err(e.clone()));
                }
                for reply in appended {
                    let _ = reply.send(Err(e.clone().into()));
                }
                return;
            }
            if i + 1 < chunks || self.active.len >= self.segment_bytes {
                if let Err(e) = self.rotate() {
                    tracing::warn!(error = %e, "events log: could not start a new segment");
                }
            }
        }
        // Before the replies, so what an appender reads next already reflects retention.
        if let Err(e) = self.retain(now_ms()) {
            tracing::warn!(error = %e, "events log: retention could not delete a segment");
        }
        for (reply, n) in imported {
            let _ = reply.send(Ok(n));
        }
        for reply in appended {
            let _ = reply.send(Ok(()));
        }
    }

    /// Writes and syncs one chunk into the segment being written, then makes its entries
    /// visible to readers.
    fn write(&mut self, chunk: Chunk) -> Result<(), QueueError> {
        // Positions handed out so far: up to this chunk's last (a later chunk of the batch
        // goes into the next segment, which is named by the position after it).
        let next_seq = chunk
            .written
            .last()
            .map(|w| w.entry.key.seq + 1)
            .unwrap_or(0);
        let base = self.active.len;
        self.active.write(&chunk.buf, true)?;
        // Entries kept in memory hold their bodies as slices of the chunk just written, not
        // of what they arrived in: a body parsed out of a connection's read buffer would keep
        // that whole buffer alive (one per device in a fleet that sends now and then).
        let written = Bytes::from(chunk.buf);
        let mut st = lock(&self.state);
        st.next_seq = st.next_seq.max(next_seq);
        let active_id = self.active.id;
        for mut w in chunk.written {
            let body_len = w.entry.body.len() as u64;
            w.entry.body = written.slice((w.end - body_len) as usize..w.end as usize);
            if let Some(seg) = st.segments.get_mut(&active_id) {
                seg.add(
                    w.entry.key.seq,
                    w.entry.enqueued_ms,
                    base + w.start,
                    base + w.end,
                );
            }
            // The tail stays contiguous: an entry not following the last one (an import)
            // starts it again.
            if st
                .tail
                .back()
                .is_some_and(|b| b.key.seq + 1 != w.entry.key.seq)
            {
                st.tail.clear();
                st.tail_bytes = 0;
            }
            st.tail_bytes += w.entry.size() as usize;
            st.tail.push_back(w.entry);
            while st.tail_bytes > self.retention.cache_bytes {
                let Some(old) = st.tail.pop_front() else {
                    break;
                };
                st.tail_bytes = st.tail_bytes.saturating_sub(old.size() as usize);
            }
        }
        Ok(())
    }

    /// Seals the segment being written and starts the next one, named by the next position.
    fn rotate(&mut self) -> Result<(), QueueError> {
        let (id, empty) = {
            let st = lock(&self.state);
            let empty = st
                .segments
                .get(&self.active.id)
                .is_none_or(|s| s.count == 0);
            (st.next_seq, empty)
        };
        if empty || id <= self.active.id {
            // Nothing appended since it was started: keep writing it.
            return Ok(());
        }
        let active = Active::create(&self.dir, id)?;
        self.active = active;
        lock(&self.state)
            .segments
            .insert(id, Segment::new(log::gen_path(&self.dir, id)));
        Ok(())
    }

    /// Deletes the oldest segments past retention time, then those beyond the size limit.
    /// The segment being written goes only by time, once everything in it is past it (a
    /// new one is started first, so the positions go on from where they were).
    fn retain(&mut self, now_ms: u64) -> Result<(), QueueError> {
        let r = self.retention;
        if r.time_ms > 0 {
            let active_expired = {
                let st = lock(&self.state);
                st.segments
                    .get(&self.active.id)
                    .is_some_and(|s| s.count > 0 && s.last_ms.saturating_add(r.time_ms) <= now_ms)
            };
            if active_expired {
                self.rotate()?;
            }
        }
        loop {
            let victim = {
                let st = lock(&self.state);
                let total = st.total_bytes();
                st.segments
                    .iter()
                    .find(|(id, _)| **id != self.active.id)
                    .and_then(|(id, s)| {
                        let by_time = r.time_ms > 0
                            && (s.count == 0 || s.last_ms.saturating_add(r.time_ms) <= now_ms);
                        let by_size = r.bytes > 0 && total > r.bytes;
                        (by_time || by_size).then_some((*id, by_time))
                    })
            };
            let Some((id, by_time)) = victim else {
                return Ok(());
            };
            let seg = {
                let mut st = lock(&self.state);
                let Some(seg) = st.segments.remove(&id) else {
                    return Ok(());
                };
                if by_time {
                    st.dropped_expired += seg.count;
                } else {
                    st.dropped_quota += seg.count;
                }
                let last = seg.last_seq;
                while st.tail.front().is_some_and(|e| e.key.seq <= last) {
                    if let Some(old) = st.tail.pop_front() {
                        st.tail_bytes = st.tail_bytes.saturating_sub(old.size() as usize);
                    }
                }
                seg
            };
            match std::fs::remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(e)),
            }
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> Dir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "fh-retained-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        Dir(d)
    }

    fn keep(bytes: u64, cache_bytes: usize) -> Retention {
        Retention {
            time_ms: 0,
            bytes,
            cache_bytes,
            min_free_bytes: 0,
        }
    }

    fn entry(i: usize) -> NewEntry {
        NewEntry {
            sink: "$events".into(),
            priority: 0,
            ttl_ms: 0,
            bag: format!("n={i}"),
            body: Bytes::from(format!("body {i} {}", "x".repeat(i % 50))),
        }
    }

    fn append(log: &RetainedLog, from: usize, n: usize, now: u64) {
        let entries = (from..from + n).map(entry).collect();
        futures_block(log.append(entries, now)).unwrap();
    }

    fn futures_block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn bags(entries: &[Entry]) -> Vec<String> {
        entries.iter().map(|e| e.bag.clone()).collect()
    }

    fn all(log: &RetainedLog, now: u64) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = log.read_after(after, 7, now).unwrap();
            let Some(last) = page.last() else {
                return out;
            };
            after = last.key.seq;
            out.extend(page);
        }
    }

    /// Positions are consecutive, reads by position agree whether served from memory or from
    /// the segment files (after a restart memory is empty), and positions go on after it.
    #[test]
    fn reads_by_position_from_memory_and_files_agree_across_restarts() {
        let d = dir("positions");
        let log = RetainedLog::open(&d.0, "$events", keep(0, 1 << 20)).unwrap();
        append(&log, 0, 100, 1_000);
        append(&log, 100, 50, 2_000);
        let hot = all(&log, 3_000);
        assert_eq!(hot.len(), 150);
        assert!(hot
            .iter()
            .enumerate()
            .all(|(i, e)| e.key.seq == i as u64 + 1));
        assert_eq!(log.last_seq(), 150);
        assert_eq!(log.count_after(40).unwrap(), 110);
        assert_eq!(log.seq_before(2_000, 3_000).unwrap(), 100);
        drop(log);

        let log = RetainedLog::open(&d.0, "$events", keep(0, 1 << 20)).unwrap();
        let cold = all(&log, 3_000);
        assert_eq!(cold, hot);
        assert_eq!(
            bags(&log.read_after(120, 3, 3_000).unwrap()),
            ["n=120", "n=121", "n=122"]
        );
        append(&log, 150, 1, 4_000);
        assert_eq!(log.read_after(150, 10, 4_000).unwrap()[0].key.seq, 151);
        assert_eq!(log.stats().depth, 151);
    }

    /// Size retention deletes whole segments, oldest first, and counts what they held; the
    /// newest stay readable in order; positions never go back, even after a restart.
    #[test]
    fn size_retention_drops_the_oldest_segments_and_counts_them() {
        let d = dir("size");
        let log = RetainedLog::open(&d.0, "$events", keep(8 * 1024, 512)).unwrap();
        for i in 0..50 {
            append(&log, i * 10, 10, 1_000);
        }
        let kept = all(&log, 1_000);
        let stats = log.stats();
        assert!(
            stats.bytes <= 8 * 1024 + MIN_SEGMENT.max(1024),
            "{}",
            stats.bytes
        );
        assert!(kept.len() > 20 && kept.len() < 500, "{}", kept.len());
        assert_eq!(stats.dropped_quota + kept.len() as u64, 500);
        let first = kept[0].key.seq;
        assert!(kept
            .iter()
            .enumerate()
            .all(|(i, e)| e.key.seq == first + i as u64));
        assert_eq!(kept.last().unwrap().bag, "n=499");
        drop(log);
        let log = RetainedLog::open(&d.0, "$events", keep(8 * 1024, 512)).unwrap();
        assert_eq!(log.last_seq(), 500);
        assert_eq!(all(&log, 1_000), kept);

        // One batch far larger than the limit is cut into segments: its newest stay.
        let depth0 = log.stats().depth;
        append(&log, 500, 400, 1_000);
        let kept = all(&log, 1_000);
        assert!(kept.len() > 20 && kept.len() < 400, "{}", kept.len());
        assert_eq!(kept.last().unwrap().bag, "n=899");
        let first = kept[0].key.seq;
        assert!(kept
            .iter()
            .enumerate()
            .all(|(i, e)| e.key.seq == first + i as u64));
        assert!(
            log.stats().bytes <= 8 * 1024,
            "{} bytes kept",
            log.stats().bytes
        );
        // Every segment is named by its first position and holds about an eighth.
        for (id, path) in log::generations(&d.0).unwrap() {
            let size = std::fs::metadata(&path).unwrap().len();
            assert!(size <= 1024 + 200, "segment {id}: {size} bytes");
        }
        // Counted since the restart: what was there before the batch, and the batch.
        assert_eq!(log.stats().dropped_quota + log.stats().depth, depth0 + 400);
    }

    /// Time retention: expired entries are not handed out, and their segments (the one
    /// being written too) are deleted and counted; positions go on after that.
    #[test]
    fn time_retention_deletes_expired_segments_and_keeps_positions() {
        let d = dir("time");
        let r = Retention {
            time_ms: 60_000,
            ..keep(0, 1 << 20)
        };
        let log = RetainedLog::open(&d.0, "$events", r).unwrap();
        let now = now_ms();
        append(&log, 0, 20, now - 120_000);
        assert!(
            log.read_after(0, 100, now).unwrap().is_empty(),
            "past retention"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while log.stats().dropped_expired < 20 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(log.stats().dropped_expired, 20);
        assert_eq!(log.stats().depth, 0);
        drop(log);
        let log = RetainedLog::open(&d.0, "$events", r).unwrap();
        assert_eq!(log.last_seq(), 20, "the position survives its entries");
        append(&log, 20, 1, now);
        assert_eq!(log.read_after(0, 10, now).unwrap()[0].key.seq, 21);
    }

    /// A torn tail (a crash mid-write) is cut off and loses only the record being written;
    /// a damaged record in the middle costs that record and is counted.
    #[test]
    fn a_torn_tail_is_cut_and_damage_costs_one_record() {
        let d = dir("damage");
        let log = RetainedLog::open(&d.0, "$events", keep(0, 1 << 20)).unwrap();
        append(&log, 0, 10, 1_000);
        drop(log);
        let (_, path) = log::generations(&d.0).unwrap().pop().unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let whole = bytes.len();
        let torn = bytes[..30].to_vec();
        bytes.extend_from_slice(&torn);
        // Damage in the fifth record's body.
        let fifth = Scan::new(&bytes, 0).nth(4).unwrap().0;
        bytes[fifth + 40] ^= 0xFF;
        std::fs::write(&path, &bytes).unwrap();

        let log = RetainedLog::open(&d.0, "$events", keep(0, 1 << 20)).unwrap();
        assert_eq!(log.corrupt_records, 1);
        let read = all(&log, 1_000);
        assert_eq!(read.len(), 9);
        assert!(read.iter().all(|e| e.bag != "n=4"));
        assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, whole);
        append(&log, 10, 1, 1_000);
        assert_eq!(all(&log, 1_000).last().unwrap().bag, "n=10");
    }

    /// Imported entries keep their positions; importing again skips what is there.
    #[test]
    fn imports_keep_positions_and_are_idempotent() {
        let d = dir("import");
        let log = RetainedLog::open(&d.0, "$events", keep(0, 1 << 20)).unwrap();
        let old: Vec<Entry> = [5u64, 9, 12]
            .iter()
            .map(|&seq| Entry {
                key: EntryKey {
                    sink: "$events".into(),
                    priority: 0,
                    seq,
                },
                enqueued_ms: 1_000,
                expires_ms: u64::MAX,
                bag: format!("s={seq}"),
                body: Bytes::from_static(b"b"),
            })
            .collect();
        assert_eq!(futures_block(log.import(old.clone())).unwrap(), 3);
        assert_eq!(futures_block(log.import(old.clone())).unwrap(), 0);
        assert_eq!(all(&log, 2_000), old);
        assert_eq!(log.count_after(5).unwrap(), 2);
        append(&log, 0, 1, 2_000);
        assert_eq!(log.last_seq(), 13);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Against a model: whatever the batches, segment size, memory budget and restarts,
        /// reading from any position gives exactly the model's entries after it.
        #[test]
        fn reads_match_a_model(
            batches in proptest::collection::vec((1usize..150, any::<bool>()), 1..12),
            cache in 0usize..4096,
            probes in proptest::collection::vec(0u64..1800, 1..8),
        ) {
            let d = dir("model");
            // Segments of 25 KB; at most about 171 KB written, so nothing is dropped.
            let r = keep(200_000, cache);
            let mut log = RetainedLog::open(&d.0, "$events", r).unwrap();
            let mut model: Vec<String> = Vec::new();
            for (n, restart) in batches {
                let from = model.len();
                append(&log, from, n, 1_000);
                model.extend((from..from + n).map(|i| format!("n={i}")));
                if restart {
                    drop(log);
                    log = RetainedLog::open(&d.0, "$events", r).unwrap();
                }
            }
            for after in probes {
                let got = bags(&log.read_after(after, 25, 1_000).unwrap());
                let want: Vec<String> = model.iter().skip(after as usize).take(25).cloned().collect();
                prop_assert_eq!(got, want);
                prop_assert_eq!(log.count_after(after).unwrap(), model.len().saturating_sub(after as usize) as u64);
            }
        }
    }
}
