//! Cloud-to-device messages: a durable queue per device.
//!
//! A message accepted by the API is committed here before the API answers. The device's
//! connection delivers queued messages at QoS 1 straight from this queue (see `mqtt.rs`) and
//! a message leaves only when the device's PUBACK for it arrives, or when it expires. Expired
//! messages are never delivered; they are removed and counted.
//!
//! On a cluster node ([`C2dStore::share`]) the queues live in the table the nodes share
//! (`cluster::c2d`), so a device finds what was sent while it was away on whichever node
//! it connects to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::storage::Store;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Key: (device id, sequence). Value: JSON [`C2dMessage`].
const C2D: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("c2d");

#[derive(Debug, thiserror::Error)]
#[error("C2D store: {0}")]
pub struct C2dError(String);

fn err(e: impl std::fmt::Display) -> C2dError {
    C2dError(e.to_string())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct C2dMessage {
    pub seq: u64,
    pub message_id: String,
    /// Base64 of the body bytes.
    pub body: String,
    /// Application properties, in order.
    pub properties: Vec<(String, String)>,
    pub enqueued_time: String,
    /// Unix milliseconds after which the message is dropped undelivered.
    pub expires_at_ms: u64,
}

impl C2dMessage {
    pub fn body_bytes(&self) -> Vec<u8> {
        B64.decode(&self.body).unwrap_or_default()
    }

    /// The property bag devices receive after `messages/devicebound/`.
    pub fn bag(&self, device: &str) -> String {
        let m = fleethub_router::Message {
            body: bytes::Bytes::new(),
            properties: self
                .properties
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone())))
                .collect(),
            system: fleethub_router::SystemProperties {
                message_id: Some(self.message_id.clone()),
                to: Some(format!("/devices/{device}/messages/devicebound")),
                ..Default::default()
            },
        };
        m.to_bag()
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub struct C2dStore {
    db: Arc<Store>,
    next_seq: AtomicU64,
    shared: std::sync::OnceLock<Arc<crate::cluster::rows::SharedRows>>,
}

impl C2dStore {
    pub fn open(db: Arc<Store>) -> Result<C2dStore, C2dError> {
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(C2D).map_err(err)?;
        tx.commit().map_err(err)?;
        // Sequences only need to grow per device across restarts: start past the clock.
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Ok(C2dStore {
            db,
            next_seq: AtomicU64::new(start),
            shared: std::sync::OnceLock::new(),
        })
    }

    /// Makes this store a cluster node's: the queues live in `rows` from now on. The first
    /// node of a new cluster brings the messages its own store holds.
    pub fn share(&self, rows: Arc<crate::cluster::rows::SharedRows>) -> Result<(), C2dError> {
        rows.index_c2d().map_err(C2dError)?;
        let mut local = Vec::new();
        {
            let tx = self.db.begin_read().map_err(err)?;
            let table = tx.open_table(C2D).map_err(err)?;
            for row in table.iter().map_err(err)? {
                let (k, v) = row.map_err(err)?;
                if let Ok(msg) = serde_json::from_slice::<C2dMessage>(v.value()) {
                    local.push((k.value().0.to_string(), msg));
                }
            }
        }
        // The first node of a new cluster brings what its own store holds.
        if !local.is_empty() && rows.count().map_err(C2dError)? == 0 {
            for (device, msg) in local {
                rows.enqueue_c2d(&device, move |seq| {
                    serde_json::to_string(&C2dMessage { seq, ..msg }).unwrap_or_default()
                })
                .map_err(C2dError)?;
            }
        }
        let _ = self.shared.set(rows);
        Ok(())
    }

    /// Queues a message durably; returns it with its sequence number.
    pub fn enqueue(
        &self,
        device: &str,
        message_id: String,
        body: &[u8],
        properties: Vec<(String, String)>,
        ttl_ms: u64,
    ) -> Result<C2dMessage, C2dError> {
        let msg = C2dMessage {
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            message_id,
            body: B64.encode(body),
            properties,
            enqueued_time: crate::registry::now_rfc3339(),
            expires_at_ms: now_ms().saturating_add(ttl_ms),
        };
        if let Some(rows) = self.shared.get() {
            let stored = msg.clone();
            let seq = rows
                .enqueue_c2d(device, move |seq| {
                    serde_json::to_string(&C2dMessage { seq, ..stored }).unwrap_or_default()
                })
                .map_err(C2dError)?;
            return Ok(C2dMessage { seq, ..msg });
        }
        let bytes = serde_json::to_vec(&msg).map_err(err)?;
        let tx = self.db.begin_write().map_err(err)?;
        tx.open_table(C2D)
            .map_err(err)?
            .insert((device, msg.seq), bytes.as_slice())
            .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(msg)
    }

    /// Up to `limit` live messages for `device` after sequence `after`, in order; expired ones
    /// met on the way are removed. Returns (messages, expired count).
    pub fn pending(
        &self,
        device: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<C2dMessage>, u64), C2dError> {
        let now = now_ms();
        let mut live = Vec::new();
        let mut expired = Vec::new();
        if let Some(rows) = self.shared.get() {
            // Expired ones do not count against the limit: read on until it is met.
            let mut after = after;
            loop {
                let batch = rows.c2d_after(device, after, limit).map_err(C2dError)?;
                let full = batch.len() >= limit;
                for (body, seq) in batch {
                    let found = serde_json::from_str::<C2dMessage>(&body).map_err(|_| seq);
                    match found {
                        Ok(msg) if msg.expires_at_ms > now && live.len() < limit => {
                            after = msg.seq;
                            live.push(msg);
                        }
                        Ok(msg) if msg.expires_at_ms <= now => {
                            after = msg.seq;
                            expired.push(msg.seq);
                        }
                        Ok(_) => {}
                        Err(seq) => {
                            after = seq;
                            expired.push(seq);
                        }
                    }
                }
                if !full || live.len() >= limit {
                    break;
                }
            }
        } else {
            let tx = self.db.begin_read().map_err(err)?;
            let table = tx.open_table(C2D).map_err(err)?;
            let start = after.saturating_add(1);
            for row in table
                .range((device, start)..=(device, u64::MAX))
                .map_err(err)?
            {
                let (k, v) = row.map_err(err)?;
                let Ok(msg) = serde_json::from_slice::<C2dMessage>(v.value()) else {
                    expired.push(k.value().1);
                    continue;
                };
                if msg.expires_at_ms <= now {
                    expired.push(msg.seq);
                    continue;
                }
                live.push(msg);
                if live.len() >= limit {
                    break;
                }
            }
        }
        if !expired.is_empty() {
            self.remove_many(device, &expired)?;
        }
        Ok((live, expired.len() as u64))
    }

    /// Removes delivered (or expired) messages.
    pub fn remove_many(&self, device: &str, seqs: &[u64]) -> Result<(), C2dError> {
        if let Some(rows) = self.shared.get() {
            return rows.remove_c2d(device, seqs).map_err(C2dError);
        }
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut table = tx.open_table(C2D).map_err(err)?;
            for seq in seqs {
                table.remove((device, *seq)).map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Removes every message of a device (it was deleted).
    pub fn purge(&self, device: &str) -> Result<(), C2dError> {
        if let Some(rows) = self.shared.get() {
            return rows.purge_c2d(device).map_err(C2dError);
        }
        let (all, _) = self.pending(device, 0, usize::MAX)?;
        let seqs: Vec<u64> = all.iter().map(|m| m.seq).collect();
        self.remove_many(device, &seqs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_orders_expires_and_survives_reopen() {
        let dir = std::env::temp_dir().join(format!("fh-c2d-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.redb");
        {
            let store = C2dStore::open(Arc::new(Store::create(&path).unwrap())).unwrap();
            store
                .enqueue("d1", "a".into(), b"1", vec![], 60_000)
                .unwrap();
            store.enqueue("d1", "gone".into(), b"2", vec![], 0).unwrap();
            store
                .enqueue("d2", "other".into(), b"x", vec![], 60_000)
                .unwrap();
            store
                .enqueue(
                    "d1",
                    "c".into(),
                    b"3",
                    vec![("k".into(), "v".into())],
                    60_000,
                )
                .unwrap();
        }
        let store = C2dStore::open(Arc::new(Store::create(&path).unwrap())).unwrap();
        let (msgs, expired) = store.pending("d1", 0, 10).unwrap();
        assert_eq!(expired, 1);
        assert_eq!(
            msgs.iter()
                .map(|m| m.message_id.as_str())
                .collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(msgs[1].body_bytes(), b"3");
        let (after_first, _) = store.pending("d1", msgs[0].seq, 10).unwrap();
        assert_eq!(after_first.len(), 1);
        store.remove_many("d1", &[msgs[0].seq]).unwrap();
        assert_eq!(store.pending("d1", 0, 10).unwrap().0.len(), 1);
        assert_eq!(store.pending("d2", 0, 10).unwrap().0.len(), 1);
        store.purge("d1").unwrap();
        assert!(store.pending("d1", 0, 10).unwrap().0.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
