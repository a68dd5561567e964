//! Persistent MQTT 3.1.1 sessions (clean session 0), kept across reconnects, hub restarts
//! and `kill -9`.
//!
//! The Azure IoT SDKs connect with clean session 0 and never subscribe again after an
//! automatic reconnect: IoT Hub keeps their subscriptions. So must fleethub, or every SDK
//! device goes deaf at its first reconnect. A session here is just the client's filters as it
//! wrote them (mapped again through the topic table on resume, so the table stays the one
//! place that knows internal topics). Unacknowledged QoS 1 deliveries need no copy here: C2D
//! messages and module inputs stay in their durable queues until the client's PUBACK, and a
//! resumed session delivers them again.
//!
//! Invariants:
//! - a SUBSCRIBE is acknowledged only after the session that includes it is committed
//!   (writes are group-committed by one writer thread, one fsync per batch);
//! - the filters live on disk only; memory holds an index of which sessions exist with
//!   their idle time, so connected devices do not keep a second copy of their subscriptions;
//! - sessions are keyed by client id: an identity's key (`d`, `d/m`) or, for service
//!   connections, `~service/{client id}` (`~` is not a valid id character);
//! - a session whose client stayed away longer than `[mqtt] session_expiry_secs` is removed
//!   by [`SessionStore::expire`]; its identity's deletion removes it at once.
//!
//! On a cluster node ([`SessionStore::share`]) the sessions live in the table the nodes
//! share instead (`cluster::sessions` says how a session follows its client between nodes),
//! written by the same batching writer, one transaction per batch; the index then holds only
//! the sessions of clients connected to this node, and expiry is the leader's.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::cluster::rows::SharedRows;
use crate::cluster::sessions::SessionWrite;
use crate::storage::JsonTable;
use crate::storage::Store;
use dashmap::DashMap;
use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

const SESSIONS: JsonTable<StoredSession> = JsonTable::new("sessions");
const MAX_BATCH: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("session store: {0}")]
    Store(String),
}

crate::storage::store_errors!(SessionError);

/// What is kept of one persistent session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSession {
    /// The client's filters as it subscribed them, in subscription order.
    pub filters: Vec<String>,
    /// When the client last disconnected (ms since the epoch); 0 while it is connected or
    /// when the hub stopped without a clean disconnect. Idle time counts from here.
    #[serde(default)]
    pub last_seen_ms: u64,
    /// On a cluster node: the node holding the client's connection, empty while it is away.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
}

/// What the hub keeps in memory per stored session: just enough for expiry. The filters
/// stay on disk and are read at CONNECT (a few microseconds), so a fleet of connected devices
/// does not hold a second copy of every subscription.
#[derive(Debug, Clone, Copy, Default)]
struct Presence {
    last_seen_ms: u64,
    /// Connections of this client open now: expiry never removes a live session.
    connected: u32,
}

/// The store key of a service connection's session.
pub fn service_key(client_id: &str) -> String {
    format!("~service/{client_id}")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A write of the session writer: the same on one hub (redb) and on a cluster node.
type Op = SessionWrite;

struct Job {
    key: String,
    op: Op,
    reply: Option<oneshot::Sender<Result<(), SessionError>>>,
}

/// Sessions on disk, with an in-memory index of which exist (so a CONNECT without one never
/// touches the disk), written through one group-committing writer thread.
pub struct SessionStore {
    db: Arc<Store>,
    index: DashMap<String, Presence>,
    jobs: mpsc::Sender<Job>,
    /// On a cluster node: CONNECTs' claims, batched by one claimer thread.
    claims: std::sync::OnceLock<mpsc::Sender<Claim>>,
    /// On a cluster node: the shared table, which then holds the sessions (the writer
    /// thread reads it too).
    shared: Arc<std::sync::OnceLock<Arc<SharedRows>>>,
}

impl SessionStore {
    /// Loads the index and starts the writer thread. A session found without a disconnect
    /// time (the hub was killed while it was connected) counts as seen now.
    pub fn open(db: Arc<Store>) -> Result<SessionStore, SessionError> {
        let index = DashMap::new();
        let now = now_ms();
        for (key, session) in SESSIONS.load::<SessionError>(&db)? {
            let last_seen_ms = match session.last_seen_ms {
                0 => now,
                t => t,
            };
            index.insert(
                key,
                Presence {
                    last_seen_ms,
                    connected: 0,
                },
            );
        }
        let (jobs, rx) = mpsc::channel();
        let writer_db = db.clone();
        let shared: Arc<std::sync::OnceLock<Arc<SharedRows>>> = Arc::default();
        let writer_shared = shared.clone();
        std::thread::Builder::new()
            .name("session-writer".into())
            .spawn(move || writer(writer_db, writer_shared, rx))
            .map_err(|e| SessionError::Store(e.to_string()))?;
        Ok(SessionStore {
            db,
            index,
            jobs,
            claims: std::sync::OnceLock::new(),
            shared,
        })
    }

    /// Makes this store a cluster node's: sessions live in `rows` from now on. The first
    /// node of a new cluster brings its own; a node releases the sessions it held before it
    /// stopped.
    pub fn share(&self, rows: Arc<SharedRows>) -> Result<(), SessionError> {
        let now = now_ms();
        let local = SESSIONS
            .load::<SessionError>(&self.db)?
            .into_iter()
            .map(|(k, s)| {
                let last_seen_ms = match s.last_seen_ms {
                    0 => now,
                    t => t,
                };
                let seeded = StoredSession {
                    last_seen_ms,
                    node: String::new(),
                    ..s
                };
                (k, serde_json::to_string(&seeded).unwrap_or_default())
            })
            .collect();
        rows.seed_sessions(local).map_err(SessionError::Store)?;
        rows.release_sessions(now).map_err(SessionError::Store)?;
        self.index.clear();
        let (claims, rx) = mpsc::channel();
        let claimer_rows = rows.clone();
        std::thread::Builder::new()
            .name("session-claimer".into())
            .spawn(move || claimer(claimer_rows, rx))
            .map_err(|e| SessionError::Store(e.to_string()))?;
        let _ = self.claims.set(claims);
        let _ = self.shared.set(rows);
        Ok(())
    }

    fn shared(&self) -> Option<&Arc<SharedRows>> {
        self.shared.get()
    }

    /// The stored session of `key`, if there is one. On a cluster node this also claims it
    /// for this node (batched with other CONNECTs' claims): call it for a client connecting
    /// here. On one hub it answers at once (the index, then redb only when there is one).
    pub async fn get(&self, key: &str) -> Result<Option<StoredSession>, SessionError> {
        if let Some(claims) = self.claims.get() {
            let (reply, answer) = oneshot::channel();
            claims
                .send(Claim {
                    key: key.to_string(),
                    reply,
                })
                .map_err(|_| SessionError::Store("session claimer stopped".into()))?;
            let found: Option<StoredSession> = answer
                .await
                .map_err(|_| SessionError::Store("session claimer stopped".into()))?
                .map_err(SessionError::Store)?
                .map(|body| serde_json::from_str(&body))
                .transpose()?;
            if found.is_some() {
                self.index.entry(key.to_string()).or_default().last_seen_ms = 0;
            }
            return Ok(found);
        }
        if !self.index.contains_key(key) {
            return Ok(None);
        }
        SESSIONS.get::<SessionError>(&self.db, key)
    }

    /// How many sessions are stored (on a cluster node: in the whole cluster).
    pub fn len(&self) -> usize {
        match self.shared() {
            Some(rows) => rows.count().map(|n| n.max(0) as usize).unwrap_or(0),
            None => self.index.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this node removes idle sessions: a single hub does; in a cluster the leader
    /// does it for every node.
    pub fn expires_here(&self, leads: bool) -> bool {
        self.shared().is_none() || leads
    }

    /// Stores `filters` as the session of `key` (whose client is connected); resolves once
    /// committed.
    pub fn put(
        &self,
        key: &str,
        filters: Vec<String>,
    ) -> impl std::future::Future<Output = Result<(), SessionError>> + Send + 'static {
        // Only a connected client changes its subscriptions.
        let mut presence = self.index.entry(key.to_string()).or_default();
        presence.connected = presence.connected.max(1);
        presence.last_seen_ms = 0;
        drop(presence);
        self.submit(key, Op::Put(filters))
    }

    /// Removes the session of `key` (clean session 1, identity deleted, expired); resolves
    /// once committed. Nothing is written when there was none.
    pub fn remove(
        &self,
        key: &str,
    ) -> impl std::future::Future<Output = Result<(), SessionError>> + Send + 'static {
        // Another node may have written it: in a cluster, always ask.
        let existed = self.index.remove(key).is_some() || self.shared().is_some();
        let pending = existed.then(|| self.submit(key, Op::Remove));
        async move {
            match pending {
                Some(p) => p.await,
                None => Ok(()),
            }
        }
    }

    /// A connection of `key` opened (counted only where a session exists: nothing else
    /// expires).
    pub fn connected(&self, key: &str) {
        if let Some(mut p) = self.index.get_mut(key) {
            p.connected += 1;
        }
    }

    /// A connection of `key` closed: its session (if any) starts idling now. The time is
    /// written in the background; losing it in a crash only makes the session live longer.
    pub fn disconnected(&self, key: &str) {
        let idle_since = self.index.get_mut(key).and_then(|mut p| {
            p.connected = p.connected.saturating_sub(1);
            (p.connected == 0).then(|| {
                p.last_seen_ms = now_ms();
                p.last_seen_ms
            })
        });
        if let Some(t) = idle_since {
            if self.shared().is_some() {
                // The index of a cluster node holds the sessions of its connected clients.
                self.index.remove_if(key, |_, p| p.connected == 0);
            }
            let _ = self.jobs.send(Job {
                key: key.to_string(),
                op: Op::Left(t),
                reply: None,
            });
        }
    }

    /// Removes sessions idle for longer than `max_idle_ms`; returns how many went.
    pub fn expire(&self, max_idle_ms: u64) -> usize {
        let now = now_ms();
        if let Some(rows) = self.shared() {
            return match rows.expire_sessions(now, max_idle_ms) {
                Ok(n) => n as usize,
                Err(e) => {
                    tracing::warn!(error = %e, "could not expire the cluster's idle sessions");
                    0
                }
            };
        }
        let stale: Vec<String> = self
            .index
            .iter()
            .filter(|p| {
                p.connected == 0
                    && p.last_seen_ms != 0
                    && now.saturating_sub(p.last_seen_ms) > max_idle_ms
            })
            .map(|p| p.key().clone())
            .collect();
        for key in &stale {
            drop(self.remove(key));
        }
        stale.len()
    }

    fn submit(
        &self,
        key: &str,
        op: Op,
    ) -> impl std::future::Future<Output = Result<(), SessionError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let queued = self.jobs.send(Job {
            key: key.to_string(),
            op,
            reply: Some(reply),
        });
        async move {
            queued.map_err(|_| SessionError::Store("session writer stopped".into()))?;
            rx.await
                .map_err(|_| SessionError::Store("session writer stopped".into()))?
        }
    }
}

/// One CONNECT's claim of its session, answered with the session's JSON (if any).
struct Claim {
    key: String,
    reply: oneshot::Sender<Result<Option<String>, String>>,
}

/// Claims the sessions of a cluster node's CONNECTs, as many as are waiting in one statement.
fn claimer(rows: Arc<SharedRows>, rx: mpsc::Receiver<Claim>) {
    while let Some(batch) = crate::storage::next_batch(&rx, MAX_BATCH) {
        let keys = batch.iter().map(|c| c.key.clone()).collect();
        match rows.claim_sessions(keys) {
            Ok(found) => {
                for claim in batch {
                    let _ = claim.reply.send(Ok(found.get(&claim.key).cloned()));
                }
            }
            Err(e) => {
                for claim in batch {
                    let _ = claim.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn writer(
    db: Arc<Store>,
    shared: Arc<std::sync::OnceLock<Arc<SharedRows>>>,
    rx: mpsc::Receiver<Job>,
) {
    while let Some(batch) = crate::storage::next_batch(&rx, MAX_BATCH) {
        if let Some(rows) = shared.get() {
            let writes = batch
                .iter()
                .map(|job| (job.key.clone(), job.op.clone()))
                .collect();
            let result = rows.write_sessions(writes).map_err(SessionError::Store);
            if let Err(e) = &result {
                tracing::warn!(error = %e, "could not write sessions to the cluster's PostgreSQL");
            }
            for job in batch {
                if let Some(reply) = job.reply {
                    let _ = reply.send(result.clone());
                }
            }
            continue;
        }
        let result = (|| -> Result<(), SessionError> {
            let tx = db.begin_write()?;
            {
                let mut table = tx.open_table(SESSIONS.raw())?;
                // In order: later operations on a key see the earlier ones of the batch.
                for job in &batch {
                    let key = job.key.as_str();
                    match &job.op {
                        Op::Put(filters) => {
                            let session = StoredSession {
                                filters: filters.clone(),
                                last_seen_ms: 0,
                                node: String::new(),
                            };
                            table.insert(key, serde_json::to_vec(&session)?.as_slice())?;
                        }
                        Op::Remove => {
                            table.remove(key)?;
                        }
                        Op::Left(t) => {
                            let found = table.get(key)?.map(|v| v.value().to_vec());
                            if let Some(bytes) = found {
                                let mut session: StoredSession = serde_json::from_slice(&bytes)?;
                                session.last_seen_ms = *t;
                                table.insert(key, serde_json::to_vec(&session)?.as_slice())?;
                            }
                        }
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })();
        for job in batch {
            if let Some(reply) = job.reply {
                let _ = reply.send(result.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the test store, waiting for a previous store's writer thread to let go.
    fn db(dir: &std::path::Path) -> Arc<Store> {
        for _ in 0..200 {
            match redb::Database::create(dir.join("s.redb")) {
                Ok(db) => return Arc::new(Store::new(db, dir)),
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("store still open");
    }

    fn temp() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "fleethub-session-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn sessions_survive_reopen_and_removal_sticks() {
        let dir = temp();
        {
            let store = SessionStore::open(db(&dir)).unwrap();
            store
                .put("d1", vec!["$iothub/methods/POST/#".into()])
                .await
                .unwrap();
            store.put("d2", vec!["a".into()]).await.unwrap();
            store.remove("d2").await.unwrap();
            store.remove("never").await.unwrap();
        }
        let store = SessionStore::open(db(&dir)).unwrap();
        let s = store.get("d1").await.unwrap().unwrap();
        assert_eq!(s.filters, vec!["$iothub/methods/POST/#".to_string()]);
        // A session without a disconnect counts as seen at load: not expired at once.
        assert_eq!(store.expire(60_000), 0);
        assert!(store.get("d2").await.unwrap().is_none());
        assert_eq!(store.len(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn only_idle_disconnected_sessions_expire() {
        let dir = temp();
        let store = SessionStore::open(db(&dir)).unwrap();
        // As a connection does: subscribe (stored while connected), then go.
        store.put("idle", vec!["x".into()]).await.unwrap();
        store.disconnected("idle");
        store.put("live", vec!["x".into()]).await.unwrap();
        // A second connection of the same client while the first is open.
        store.connected("live");
        store.disconnected("live");
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(store.expire(10), 1);
        assert!(store.get("idle").await.unwrap().is_none());
        assert!(store.get("live").await.unwrap().is_some());
        assert_eq!(store.expire(60_000), 0);
        let _ = std::fs::remove_dir_all(dir);
    }
}
