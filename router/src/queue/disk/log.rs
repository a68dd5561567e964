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
//! Frame: `len: u32 BE` (of the payload), `crc32: u32 BE` (of the payload), payload. A file is
//! read up to its first frame that is short or fails its checksum: a torn tail from a crash
//! mid-write, which held nothing acknowledged (acks follow the sync of a whole batch).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{EntryKey, QueueError};

const APPEND: u8 = 1;
const REMOVE: u8 = 2;
/// Larger than any entry the hub accepts (bodies are capped far below): a length beyond it
/// is damage, not a record.
const MAX_RECORD: usize = 64 * 1024 * 1024;

/// A record as read back at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Record {
    Append {
        key: EntryKey,
        enqueued_ms: u64,
        expires_ms: u64,
        bag: String,
        body: bytes::Bytes,
    },
    Remove(EntryKey),
}

fn frame(buf: &mut Vec<u8>, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 8]);
    payload(buf);
    let len = (buf.len() - start - 8) as u32;
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

fn put_key(buf: &mut Vec<u8>, key: &EntryKey) {
    buf.extend_from_slice(&key.seq.to_be_bytes());
    buf.push(key.priority);
    buf.extend_from_slice(&(key.sink.len() as u16).to_be_bytes());
    buf.extend_from_slice(key.sink.as_bytes());
}

pub(super) fn encode_append(
    buf: &mut Vec<u8>,
    key: &EntryKey,
    enqueued_ms: u64,
    expires_ms: u64,
    bag: &str,
    body: &[u8],
) {
    frame(buf, |b| {
        b.push(APPEND);
        put_key(b, key);
        b.extend_from_slice(&enqueued_ms.to_be_bytes());
        b.extend_from_slice(&expires_ms.to_be_bytes());
        b.extend_from_slice(&(bag.len() as u32).to_be_bytes());
        b.extend_from_slice(bag.as_bytes());
        b.extend_from_slice(body);
    });
}

pub(super) fn encode_remove(buf: &mut Vec<u8>, key: &EntryKey) {
    frame(buf, |b| {
        b.push(REMOVE);
        put_key(b, key);
    });
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

/// Every whole record of a log file, and how many bytes at its end were not one (a torn
/// tail, or damage: reading stops at the first bad frame).
pub(super) fn read(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut out = Vec::new();
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
        out.push(record);
        at += 8 + len;
    }
    (out, bytes.len() - at)
}

fn err(e: impl std::fmt::Display) -> QueueError {
    QueueError::Store(e.to_string())
}

/// The log generations present in `dir`, oldest first.
pub(super) fn generations(dir: &Path) -> Result<Vec<(u64, PathBuf)>, QueueError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(err)? {
        let path = e.map_err(err)?.path();
        let id = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(id) = id {
            out.push((id, path));
        }
    }
    out.sort();
    Ok(out)
}

pub(super) fn gen_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.log"))
}

/// Makes a directory's entries (a new or deleted log file) durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), QueueError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

/// The generation being written.
pub(super) struct Active {
    pub(super) id: u64,
    file: File,
    pub(super) len: u64,
}

impl Active {
    pub(super) fn create(dir: &Path, id: u64) -> Result<Active, QueueError> {
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(gen_path(dir, id))
            .map_err(err)?;
        sync_dir(dir)?;
        Ok(Active { id, file, len: 0 })
    }

    /// Writes a batch; with `sync`, returns only once it is on disk. A batch that failed
    /// (disk full mid-record, a failed sync) is cut off again: reading stops at the first bad
    /// record, so anything appended after a partial one would be lost to replay.
    pub(super) fn write(&mut self, buf: &[u8], sync: bool) -> Result<(), QueueError> {
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
                if let Err(cut) = self.file.set_len(self.len) {
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
            &key("/modules/m/inputs/i", 3, 7),
            10,
            20,
            "a=1",
            b"{}",
        );
        encode_remove(&mut buf, &key("$upstream", 0, 5));
        let (records, rest) = read(&buf);
        assert_eq!(rest, 0);
        assert_eq!(
            records,
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
    fn reading_stops_at_a_torn_or_damaged_record() {
        let mut buf = Vec::new();
        encode_append(&mut buf, &key("s", 0, 1), 1, 2, "", b"one");
        let first = buf.len();
        encode_append(&mut buf, &key("s", 0, 2), 1, 2, "", b"two");
        for cut in first..buf.len() {
            let (records, rest) = read(&buf[..cut]);
            assert_eq!((records.len(), rest), (1, cut - first), "cut at {cut}");
        }
        let mut flipped = buf.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        assert_eq!(read(&flipped).0.len(), 1, "checksum catches a changed byte");
    }

    proptest! {
        #[test]
        fn reading_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = read(&bytes);
        }

        #[test]
        fn any_prefix_reads_a_prefix_of_the_records(cut in 0usize..200, n in 1usize..6) {
            let mut buf = Vec::new();
            for i in 0..n {
                encode_append(&mut buf, &key("s", (i % 3) as u8, i as u64), 1, 2, "k=v", b"body");
                encode_remove(&mut buf, &key("s", 0, i as u64));
            }
            let cut = cut.min(buf.len());
            let (records, rest) = read(&buf[..cut]);
            let (all, _) = read(&buf);
            prop_assert_eq!(&all[..records.len()], &records[..]);
            prop_assert!(rest < cut + 1);
        }
    }
}
