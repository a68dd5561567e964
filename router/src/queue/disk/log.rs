//! The disk queue's write-ahead log: what makes an append durable.
//!
//! An append is one record at the end of the current log file, and a batch of them costs one
//! `write` and one `fdatasync` — the disk's own batch limit, with no B-tree page to find,
//! copy or rewrite. Removals of entries still served from the log are records too (synced
//! with the next batch of appends: a removal lost to a crash is a duplicate delivery, never a
//! lost message). Files are numbered generations; the queue deletes a generation once none
//! of its entries is live any more, oldest first, so a removal record never outlives the
//! generation holding the append it cancels.
//!
//! Frame: a 4-byte sync marker, `len: u32 BE` (of the payload), `crc32: u32 BE` (of the
//! payload), payload. A frame that is short or fails its checksum is either a torn tail (the
//! end of the newest file after a crash mid-write: it held nothing acknowledged, acks follow
//! the sync of a whole batch) or damage. After damage, reading resynchronises at the next
//! marker that starts a valid frame, so one damaged byte costs one record, not the rest of
//! the file; what could not be read is reported so the queue can count it.
//!
//! Files written before the marker existed (no marker at their start) are read the old way:
//! up to the first bad frame.
//!
//! **Generation frames and recycled files** (queue format 3). Appending to a file makes every
//! `fdatasync` also commit the file's new size and blocks to the filesystem journal; writing
//! over blocks the file already has does not (on this project's test machine 103 µs against
//! 156–210 µs per write and sync). So the queue keeps a few retired generation files as
//! spares and writes the next generations over them. Their old records are still there past
//! the new end, which a reader must never take for current ones: the queue's frames start
//! with a second marker and carry the generation they belong to, inside the checksum. A frame
//! of another generation, or the end record written (and synced) when a generation is sealed,
//! ends the file's records. The events log (its own files, never recycled) keeps the first
//! frame form.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{EntryKey, QueueError};
use crate::queue::err;

const APPEND: u8 = 1;
const REMOVE: u8 = 2;
/// The last record of a sealed generation: what follows is an earlier life of the file.
const END: u8 = 3;
/// Starts every frame: where reading picks up again after damage.
const SYNC: [u8; 4] = [0xF1, 0xEE, 0x7A, 0x51];
/// Starts every generation frame (a frame that names its generation, see the module
/// comment).
const SYNC_GEN: [u8; 4] = [0xF1, 0xEE, 0x7A, 0x52];
/// Marker, length and checksum.
const HEADER: usize = 12;
/// Marker, length, checksum and generation; the checksum covers generation and payload.
const HEADER_GEN: usize = 20;
/// Larger than any entry the hub accepts (bodies are capped far below): a length beyond it
/// is damage, not a record.
const MAX_RECORD: usize = 64 * 1024 * 1024;

/// A record as read back at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::queue) enum Record {
    Append {
        key: EntryKey,
        enqueued_ms: u64,
        expires_ms: u64,
        bag: String,
        body: bytes::Bytes,
    },
    Remove(EntryKey),
}

/// A frame around what `payload` writes: a generation frame when `generation` is given.
fn frame(buf: &mut Vec<u8>, generation: Option<u64>, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    let (sync, header) = match generation {
        Some(_) => (SYNC_GEN, HEADER_GEN),
        None => (SYNC, HEADER),
    };
    buf.extend_from_slice(&sync);
    buf.extend_from_slice(&[0; 8]);
    if let Some(g) = generation {
        buf.extend_from_slice(&g.to_be_bytes());
    }
    payload(buf);
    let len = (buf.len() - start - header) as u32;
    let crc = crc32fast::hash(&buf[start + 12..]);
    buf[start + 4..start + 8].copy_from_slice(&len.to_be_bytes());
    buf[start + 8..start + 12].copy_from_slice(&crc.to_be_bytes());
}

fn put_key(buf: &mut Vec<u8>, key: &EntryKey) {
    buf.extend_from_slice(&key.seq.to_be_bytes());
    buf.push(key.priority);
    buf.extend_from_slice(&(key.sink.len() as u16).to_be_bytes());
    buf.extend_from_slice(key.sink.as_bytes());
}

/// An append record; in a generation frame when `generation` is given (the queue's files).
pub(in crate::queue) fn encode_append(
    buf: &mut Vec<u8>,
    generation: Option<u64>,
    key: &EntryKey,
    enqueued_ms: u64,
    expires_ms: u64,
    bag: &str,
    body: &[u8],
) {
    frame(buf, generation, |b| {
        b.push(APPEND);
        put_key(b, key);
        b.extend_from_slice(&enqueued_ms.to_be_bytes());
        b.extend_from_slice(&expires_ms.to_be_bytes());
        b.extend_from_slice(&(bag.len() as u32).to_be_bytes());
        b.extend_from_slice(bag.as_bytes());
        b.extend_from_slice(body);
    });
}

pub(in crate::queue) fn encode_remove(buf: &mut Vec<u8>, generation: Option<u64>, key: &EntryKey) {
    frame(buf, generation, |b| {
        b.push(REMOVE);
        put_key(b, key);
    });
}

/// The record that seals a generation.
fn encode_end(buf: &mut Vec<u8>, generation: u64) {
    frame(buf, Some(generation), |b| b.push(END));
}

/// Reads fields off a payload; `None` at the first one that does not fit.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn key(&mut self) -> Option<EntryKey> {
        let seq = self.u64()?;
        let priority = self.u8()?;
        let len = self.u16()? as usize;
        let sink = std::str::from_utf8(self.take(len)?).ok()?.to_string();
        Some(EntryKey {
            sink,
            priority,
            seq,
        })
    }
}

fn decode(payload: &[u8]) -> Option<Record> {
    let mut r = Reader(payload);
    match r.u8()? {
        APPEND => {
            let key = r.key()?;
            let enqueued_ms = r.u64()?;
            let expires_ms = r.u64()?;
            let bag_len = r.u32()? as usize;
            let bag = std::str::from_utf8(r.take(bag_len)?).ok()?.to_string();
            let body = bytes::Bytes::copy_from_slice(r.0);
            Some(Record::Append {
                key,
                enqueued_ms,
                expires_ms,
                bag,
                body,
            })
        }
        REMOVE => {
            let key = r.key()?;
            r.0.is_empty().then_some(Record::Remove(key))
        }
        _ => None,
    }
}

/// What reading a log file found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(in crate::queue) struct Read {
    pub(in crate::queue) records: Vec<Record>,
    /// Damaged stretches in the middle (offset, bytes), each followed by a readable record:
    /// at least one record lost in each.
    pub(in crate::queue) damaged: Vec<(usize, usize)>,
    /// Bytes at the end that are not a whole record: a torn tail, or damage at the end.
    pub(in crate::queue) tail: usize,
}

/// A whole, intact frame of either form at `at` (marker `sync`, header of `header` bytes):
/// what its checksum covers (everything after marker, length and checksum) and where the next
/// frame starts.
fn intact(bytes: &[u8], at: usize, sync: [u8; 4], header: usize) -> Option<(&[u8], usize)> {
    if bytes.get(at..at + 4)? != sync {
        return None;
    }
    let h = bytes.get(at + 4..at + 12)?;
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let crc = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    if len > MAX_RECORD {
        return None;
    }
    let end = at + header + len;
    let covered = bytes.get(at + 12..end)?;
    (crc32fast::hash(covered) == crc).then_some((covered, end))
}

/// The record whose frame starts at `at`, and where the next one starts.
pub(in crate::queue) fn frame_at(bytes: &[u8], at: usize) -> Option<(Record, usize)> {
    let (payload, end) = intact(bytes, at, SYNC, HEADER)?;
    Some((decode(payload)?, end))
}

/// A whole, intact generation frame at `at`: its generation, payload and where the next
/// frame starts.
fn frame_gen_at(bytes: &[u8], at: usize) -> Option<(u64, &[u8], usize)> {
    let (covered, end) = intact(bytes, at, SYNC_GEN, HEADER_GEN)?;
    let (generation, payload) = covered.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*generation), payload, end))
}

/// The records of generation file `id` of the queue: generation frames (a recycled file: see
/// the module comment), or the first frame form for files written before format 3.
pub(in crate::queue) fn read_generation(bytes: &[u8], id: u64) -> Read {
    let framed = read_gen_frames(bytes, id);
    if !framed.records.is_empty() || bytes.starts_with(&SYNC_GEN) {
        return framed;
    }
    read(bytes)
}

fn read_gen_frames(bytes: &[u8], id: u64) -> Read {
    let mut out = Read::default();
    let mut at = 0;
    while at < bytes.len() {
        let found = frame_gen_at(bytes, at).or_else(|| {
            // Damage (or the torn end, or the remains of an earlier life's record): pick
            // up at the next whole frame.
            let next = (at + 1..bytes.len().saturating_sub(HEADER_GEN - 1))
                .filter(|&i| bytes[i..].starts_with(&SYNC_GEN))
                .find_map(|i| frame_gen_at(bytes, i).map(|f| (i, f)));
            match next {
                // A record of this generation further on: what lies between is damage.
                Some((i, frame)) if frame.0 == id => {
                    out.damaged.push((at, i - at));
                    at = i;
                    Some(frame)
                }
                // An earlier life of the file: this generation ended before it.
                Some(_) => None,
                None => {
                    out.tail = bytes.len() - at;
                    None
                }
            }
        });
        let Some((generation, payload, next)) = found else {
            break;
        };
        if generation != id || payload == [END] {
            break;
        }
        match decode(payload) {
            Some(record) => out.records.push(record),
            // Intact but not a record this code knows: count it as lost.
            None => out.damaged.push((at, next - at)),
        }
        at = next;
    }
    out
}

/// Every readable record of a log file, where it was damaged, and how many bytes at its end
/// are not a whole record.
pub(in crate::queue) fn read(bytes: &[u8]) -> Read {
    let marked = read_marked(bytes);
    if marked.records.is_empty() && !bytes.starts_with(&SYNC[..bytes.len().min(4)]) {
        // Perhaps a file from before markers.
        let unmarked = read_unmarked(bytes);
        if !unmarked.records.is_empty() {
            return unmarked;
        }
    }
    marked
}

fn read_marked(bytes: &[u8]) -> Read {
    let mut out = Read::default();
    let mut at = 0;
    while at < bytes.len() {
        if let Some((record, next)) = frame_at(bytes, at) {
            out.records.push(record);
            at = next;
            continue;
        }
        // Damage (or the torn end): pick up at the next marker that starts a valid frame.
        let resume = (at + 1..bytes.len().saturating_sub(HEADER - 1))
            .filter(|&i| bytes[i..].starts_with(&SYNC))
            .find(|&i| frame_at(bytes, i).is_some());
        match resume {
            Some(next) => {
                out.damaged.push((at, next - at));
                at = next;
            }
            None => {
                out.tail = bytes.len() - at;
                break;
            }
        }
    }
    out
}

/// Records from offset `at` on, each with where its frame starts: what a reader by position
/// (the retained log) needs. Damage in the middle is skipped as [`read`] does (counted in
/// `damaged`); iteration stops where no further whole frame starts, leaving `at` there (a torn
/// tail, or a record cut by the end of a partial read).
pub(in crate::queue) struct Scan<'a> {
    bytes: &'a [u8],
    pub(in crate::queue) at: usize,
    pub(in crate::queue) damaged: u64,
}

impl<'a> Scan<'a> {
    pub(in crate::queue) fn new(bytes: &'a [u8], at: usize) -> Scan<'a> {
        Scan {
            bytes,
            at,
            damaged: 0,
        }
    }
}

impl Iterator for Scan<'_> {
    type Item = (usize, Record);

    fn next(&mut self) -> Option<(usize, Record)> {
        let bytes = self.bytes;
        if let Some((record, next)) = frame_at(bytes, self.at) {
            let start = self.at;
            self.at = next;
            return Some((start, record));
        }
        let resume = (self.at + 1..bytes.len().saturating_sub(HEADER - 1))
            .filter(|&i| bytes[i..].starts_with(&SYNC))
            .find(|&i| frame_at(bytes, i).is_some())?;
        self.damaged += 1;
        self.at = resume;
        self.next()
    }
}

/// A file from before frames had markers: read up to its first bad frame.
fn read_unmarked(bytes: &[u8]) -> Read {
    let mut out = Read::default();
    let mut at = 0;
    while at < bytes.len() {
        let Some(header) = bytes.get(at..at + 8) else {
            break;
        };
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_RECORD {
            break;
        }
        let Some(payload) = bytes.get(at + 8..at + 8 + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Some(record) = decode(payload) else {
            break;
        };
        out.records.push(record);
        at += 8 + len;
    }
    out.tail = bytes.len() - at;
    out
}

/// The log generations present in `dir`, oldest first.
pub(in crate::queue) fn generations(dir: &Path) -> Result<Vec<(u64, PathBuf)>, QueueError> {
    numbered(dir, ".log")
}

/// The files of `dir` named `{number}{suffix}`, by number.
fn numbered(dir: &Path, suffix: &str) -> Result<Vec<(u64, PathBuf)>, QueueError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(err)? {
        let path = e.map_err(err)?.path();
        let id = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(suffix))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(id) = id {
            out.push((id, path));
        }
    }
    out.sort();
    Ok(out)
}

pub(in crate::queue) fn gen_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.log"))
}

/// Where a retired generation waits to be written over (named for the generation it was).
fn spare_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.spare"))
}

/// Spare files kept: as many as there can be generations in use, so that in a steady state
/// every new generation is an old one written over.
pub(in crate::queue) const SPARES: usize = 5;

/// The spare files in `dir`, by the generation each was, oldest first.
pub(in crate::queue) fn spares(dir: &Path) -> Result<Vec<(u64, PathBuf)>, QueueError> {
    numbered(dir, ".spare")
}

/// Retires generation `id`'s file: kept as a spare while there are fewer than [`SPARES`]
/// (only files of generation frames: an older file's records would read as current ones if
/// written over), else deleted. The caller syncs the directory.
pub(in crate::queue) fn retire(dir: &Path, id: u64, recyclable: bool) -> Result<(), QueueError> {
    let path = gen_path(dir, id);
    if recyclable && spares(dir)?.len() < SPARES {
        std::fs::rename(&path, spare_path(dir, id)).map_err(err)
    } else {
        std::fs::remove_file(&path).map_err(err)
    }
}

/// Deletes every spare file (the disk is short: spares hold space the queue can do without).
/// Returns how many there were.
pub(in crate::queue) fn drop_spares(dir: &Path) -> Result<usize, QueueError> {
    let spares = spares(dir)?;
    for (_, path) in &spares {
        std::fs::remove_file(path).map_err(err)?;
    }
    Ok(spares.len())
}

/// Whether a generation file holds generation frames (may be written over).
pub(in crate::queue) fn recyclable(bytes: &[u8]) -> bool {
    bytes.starts_with(&SYNC_GEN)
}

/// Makes a directory's entries (a new or deleted log file) durable.
pub(in crate::queue) fn sync_dir(dir: &Path) -> Result<(), QueueError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

/// The generation being written.
pub(in crate::queue) struct Active {
    pub(in crate::queue) id: u64,
    file: File,
    pub(in crate::queue) len: u64,
}

impl Active {
    pub(in crate::queue) fn create(dir: &Path, id: u64) -> Result<Active, QueueError> {
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(gen_path(dir, id))
            .map_err(err)?;
        sync_dir(dir)?;
        Ok(Active { id, file, len: 0 })
    }

    /// A new generation written over a spare file when there is one (see the module comment),
    /// else a new file.
    pub(in crate::queue) fn create_recycling(dir: &Path, id: u64) -> Result<Active, QueueError> {
        let Some((_, spare)) = spares(dir)?.pop() else {
            return Active::create(dir, id);
        };
        let path = gen_path(dir, id);
        std::fs::rename(&spare, &path).map_err(err)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(err)?;
        sync_dir(dir)?;
        Ok(Active { id, file, len: 0 })
    }

    /// Writes and syncs the end record: a reader stops there, not at what an earlier life of
    /// the file left behind it.
    pub(in crate::queue) fn seal(&mut self) -> Result<(), QueueError> {
        let mut buf = Vec::new();
        encode_end(&mut buf, self.id);
        self.write(&buf, true)
    }

    /// Opens an existing file to append to, cut back to `len` (its last whole record).
    pub(in crate::queue) fn reopen(dir: &Path, id: u64, len: u64) -> Result<Active, QueueError> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(gen_path(dir, id))
            .map_err(err)?;
        file.set_len(len).map_err(err)?;
        file.sync_all().map_err(err)?;
        Ok(Active { id, file, len })
    }

    /// Writes a batch; with `sync`, returns only once it is on disk. A batch that failed
    /// (disk full mid-record, a failed sync) is cut off again: reading stops at the first bad
    /// record, so anything appended after a partial one would be lost to replay.
    pub(in crate::queue) fn write(&mut self, buf: &[u8], sync: bool) -> Result<(), QueueError> {
        let written = (|| {
            self.file.write_all(buf)?;
            if sync {
                self.file.sync_data()?;
            }
            Ok::<(), std::io::Error>(())
        })();
        match written {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Back to the last whole batch; the position too, for a file opened to write
                // over (not appending).
                let cut = self.file.set_len(self.len).and_then(|()| {
                    use std::io::Seek;
                    self.file
                        .seek(std::io::SeekFrom::Start(self.len))
                        .map(|_| ())
                });
                if let Err(cut) = cut {
                    return Err(err(format!(
                        "{e}; and the log could not be cut back: {cut}"
                    )));
                }
                Err(err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(sink: &str, priority: u8, seq: u64) -> EntryKey {
        EntryKey {
            sink: sink.into(),
            priority,
            seq,
        }
    }

    #[test]
    fn records_read_back_as_written() {
        let mut buf = Vec::new();
        encode_append(
            &mut buf,
            None,
            &key("/modules/m/inputs/i", 3, 7),
            10,
            20,
            "a=1",
            b"{}",
        );
        encode_remove(&mut buf, None, &key("$upstream", 0, 5));
        let read = read(&buf);
        assert_eq!((read.tail, read.damaged.len()), (0, 0));
        assert_eq!(
            read.records,
            vec![
                Record::Append {
                    key: key("/modules/m/inputs/i", 3, 7),
                    enqueued_ms: 10,
                    expires_ms: 20,
                    bag: "a=1".into(),
                    body: bytes::Bytes::from_static(b"{}"),
                },
                Record::Remove(key("$upstream", 0, 5)),
            ]
        );
    }

    #[test]
    fn a_torn_end_loses_only_the_record_being_written() {
        let mut buf = Vec::new();
        encode_append(&mut buf, None, &key("s", 0, 1), 1, 2, "", b"one");
        let first = buf.len();
        encode_append(&mut buf, None, &key("s", 0, 2), 1, 2, "", b"two");
        for cut in first..buf.len() {
            let r = read(&buf[..cut]);
            assert_eq!(
                (r.records.len(), r.tail, r.damaged.len()),
                (1, cut - first, 0),
                "cut at {cut}"
            );
        }
    }

    /// A byte changed anywhere in the file costs exactly the record it is in: reading picks
    /// up at the next record, and the damage is reported with where it was.
    #[test]
    fn damage_anywhere_costs_exactly_the_record_it_hits() {
        let mut buf = Vec::new();
        let mut starts = Vec::new();
        for i in 0..20u64 {
            starts.push(buf.len());
            encode_append(
                &mut buf,
                None,
                &key("s", 0, i),
                1,
                2,
                "k=v",
                format!("body {i}").as_bytes(),
            );
        }
        starts.push(buf.len());
        for offset in 0..buf.len() {
            let hit = starts
                .windows(2)
                .position(|w| w[0] <= offset && offset < w[1])
                .unwrap();
            let mut damaged = buf.clone();
            damaged[offset] ^= 0x5a;
            let r = read(&damaged);
            let seqs: Vec<u64> = r
                .records
                .iter()
                .map(|rec| match rec {
                    Record::Append { key, .. } => key.seq,
                    Record::Remove(key) => key.seq,
                })
                .collect();
            let want: Vec<u64> = (0..20).filter(|&s| s != hit as u64).collect();
            assert_eq!(seqs, want, "byte {offset} in record {hit}");
            if hit == 19 {
                assert_eq!(
                    (r.damaged.len(), r.tail > 0),
                    (0, true),
                    "byte {offset}: the last record"
                );
            } else {
                assert_eq!(
                    r.damaged,
                    vec![(starts[hit], starts[hit + 1] - starts[hit])],
                    "byte {offset}"
                );
            }
        }
    }

    #[test]
    fn files_without_markers_are_read_up_to_their_first_bad_frame() {
        // The frame of the version before markers: len, crc, payload.
        let legacy = |payload: &[u8]| {
            let mut f = (payload.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
            f.extend_from_slice(payload);
            f
        };
        let mut one = Vec::new();
        encode_remove(&mut one, None, &key("s", 0, 1));
        let mut buf = legacy(&one[HEADER..]);
        buf.extend(legacy(&one[HEADER..]));
        buf.extend_from_slice(b"torn");
        let r = read(&buf);
        assert_eq!((r.records.len(), r.tail), (2, 4));
    }

    fn appends(generation: u64, seqs: std::ops::Range<u64>, body: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        for seq in seqs {
            encode_append(
                &mut buf,
                Some(generation),
                &key("s", 0, seq),
                1,
                2,
                "",
                body,
            );
        }
        buf
    }

    fn seqs(read: &Read) -> Vec<u64> {
        read.records
            .iter()
            .map(|r| match r {
                Record::Append { key, .. } | Record::Remove(key) => key.seq,
            })
            .collect()
    }

    /// A file written over from its start: only the new generation's records are read, with
    /// or without the end record, and nothing is reported damaged.
    #[test]
    fn a_recycled_file_reads_only_its_new_generation() {
        let old = appends(3, 0..50, b"an older and longer body");
        let mut file = old.clone();
        let new = appends(9, 100..110, b"new");
        file[..new.len()].copy_from_slice(&new);
        let read = read_generation(&file, 9);
        assert_eq!(seqs(&read), (100..110).collect::<Vec<_>>());
        assert!(read.damaged.is_empty(), "{:?}", read.damaged);
        // Sealed: the end record is where reading stops.
        let mut sealed = new.clone();
        encode_end(&mut sealed, 9);
        let mut file = old.clone();
        file[..sealed.len()].copy_from_slice(&sealed);
        let read = read_generation(&file, 9);
        assert_eq!(
            (seqs(&read).len(), read.tail, read.damaged.len()),
            (10, 0, 0)
        );
        // Recycled and not written yet (a crash right after): nothing is current.
        assert!(read_generation(&old, 9).records.is_empty());
        // Read as its own generation, the old file is whole.
        assert_eq!(seqs(&read_generation(&old, 3)), (0..50).collect::<Vec<_>>());
    }

    /// Damage among the new generation's records costs the record it hits, as before.
    #[test]
    fn damage_in_a_generation_costs_one_record() {
        let mut file = appends(4, 0..10, b"body");
        let one = file.len() / 10;
        file[3 * one + 25] ^= 0xFF;
        let read = read_generation(&file, 4);
        assert_eq!(seqs(&read), [0, 1, 2, 4, 5, 6, 7, 8, 9]);
        assert_eq!(read.damaged.len(), 1);
    }

    /// A file from before generation frames is read the old way.
    #[test]
    fn files_of_the_first_frame_form_still_read() {
        let mut buf = Vec::new();
        encode_append(&mut buf, None, &key("s", 0, 1), 1, 2, "", b"one");
        encode_remove(&mut buf, None, &key("s", 0, 1));
        assert_eq!(read_generation(&buf, 8).records.len(), 2);
        assert!(!recyclable(&buf));
        assert!(recyclable(&appends(8, 0..1, b"x")));
    }

    proptest! {
        /// Whatever an earlier life of a file held, and wherever the new generation's writing
        /// stopped (even inside a record: a crash), reading gives exactly the new records
        /// written whole, in order.
        #[test]
        fn recycled_files_never_resurrect_old_records(
            old_sizes in proptest::collection::vec(0usize..300, 0..40),
            new_sizes in proptest::collection::vec(0usize..300, 0..40),
            cut in 0usize..20_000,
        ) {
            let mut file = Vec::new();
            for (i, n) in old_sizes.iter().enumerate() {
                encode_append(&mut file, Some(5), &key("s", 0, i as u64), 1, 2, "", &vec![7u8; *n]);
            }
            let mut new = Vec::new();
            let mut ends = Vec::new();
            for (i, n) in new_sizes.iter().enumerate() {
                encode_append(&mut new, Some(6), &key("s", 0, 1000 + i as u64), 1, 2, "", &vec![9u8; *n]);
                ends.push(new.len());
            }
            let cut = cut.min(new.len());
            if file.len() < cut {
                file.resize(cut, 0);
            }
            file[..cut].copy_from_slice(&new[..cut]);
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            let read = read_generation(&file, 6);
            prop_assert_eq!(seqs(&read), (0..whole as u64).map(|i| 1000 + i).collect::<Vec<_>>());
            prop_assert!(read.damaged.is_empty());
        }
    }

    proptest! {
        #[test]
        fn reading_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = read(&bytes);
            let _ = read_generation(&bytes, 1);
        }

        #[test]
        fn any_prefix_reads_a_prefix_of_the_records(cut in 0usize..200, n in 1usize..6) {
            let mut buf = Vec::new();
            for i in 0..n {
                encode_append(&mut buf, None, &key("s", (i % 3) as u8, i as u64), 1, 2, "k=v", b"body");
                encode_remove(&mut buf, None, &key("s", 0, i as u64));
            }
            let cut = cut.min(buf.len());
            let part = read(&buf[..cut]);
            let all = read(&buf).records;
            prop_assert_eq!(&all[..part.records.len()], &part.records[..]);
            prop_assert!(part.damaged.is_empty());
            prop_assert!(part.tail < cut + 1);
        }
    }
}
