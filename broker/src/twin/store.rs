//! Durable twins with group commit.
//!
//! Every write goes through one writer thread: it takes all jobs waiting (up to a batch),
//! applies them in order in one redb write transaction, commits (one fsync), and only then
//! updates the in-memory cache and answers. A reported patch is therefore acknowledged only
//! once it is on disk, and many devices patching at once share the cost of a commit.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::Arc;

use crate::storage::Store;
use dashmap::DashMap;
use redb::{ReadableTable, TableDefinition};
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use super::doc::Twin;
use crate::cluster::rows::{BatchWrite, Heard, SharedRows, Versions};
use crate::identity::IdentityKey;

const TWINS: TableDefinition<&str, &[u8]> = TableDefinition::new("twins");
const MAX_BATCH: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwinError {
    #[error("etag '{given}' does not match the twin's current etag '{current}'")]
    EtagMismatch { given: String, current: String },
    #[error("twin store: {0}")]
    Store(String),
}

/// A change to one twin.
#[derive(Debug, Clone)]
pub enum TwinOp {
    Reported(Map<String, Value>),
    /// Operator/deployment change of tags and/or desired properties, optionally guarded by
    /// an etag.
    Update {
        tags: Option<Map<String, Value>>,
        desired: Option<Map<String, Value>>,
        if_match: Option<String>,
    },
    /// A deployment's keys: each top-level desired key given is replaced whole (not
    /// merged), `null` removes it. Devices receive the change as a merge patch (with `null`
    /// for every key that went).
    ReplaceDesired(Map<String, Value>),
    Delete,
}

/// The result of an applied change.
#[derive(Debug, Clone)]
pub struct Applied {
    pub twin: Arc<Twin>,
    /// The desired patch as devices receive it: the RFC 7386 patch from the previous desired
    /// document to the new one (`null` for removed keys) with `"$version": v`, when desired
    /// properties were written.
    pub desired_patch: Option<Value>,
}

struct Job {
    key: IdentityKey,
    op: TwinOp,
    reply: oneshot::Sender<Result<Applied, TwinError>>,
}

pub struct TwinStore {
    cache: Arc<DashMap<IdentityKey, Arc<Twin>>>,
    jobs: mpsc::Sender<Job>,
    /// On a cluster node: the table every node shares, which then holds the twins instead of
    /// the local store, and the shared version of each cached twin.
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    rows: std::sync::OnceLock<Arc<SharedRows>>,
    versions: Versions,
    /// Held while a twin and its version are read or changed together: the writer thread and
    /// the change feed both update them, and a twin cached at one version with another's
    /// number would let a write pass its check on content it never saw.
    together: std::sync::Mutex<()>,
}

impl Shared {
    fn together(&self) -> std::sync::MutexGuard<'_, ()> {
        self.together.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How often a batch that found twins changed by another node reads them and applies again.
const SHARED_RETRIES: usize = 8;

/// A twin another node changed, as this node had it and as it is now (`None`: deleted).
pub struct HeardTwin {
    pub key: IdentityKey,
    pub before: Arc<Twin>,
    pub after: Option<Arc<Twin>>,
}

fn store_err(e: impl std::fmt::Display) -> TwinError {
    TwinError::Store(e.to_string())
}

impl TwinStore {
    /// Loads every twin and starts the writer thread.
    pub fn open(db: Arc<Store>) -> Result<TwinStore, TwinError> {
        let cache = Arc::new(DashMap::new());
        {
            let tx = db.begin_write().map_err(store_err)?;
            tx.open_table(TWINS).map_err(store_err)?;
            tx.commit().map_err(store_err)?;
        }
        {
            let tx = db.begin_read().map_err(store_err)?;
            let table = tx.open_table(TWINS).map_err(store_err)?;
            for row in table.iter().map_err(store_err)? {
                let (k, v) = row.map_err(store_err)?;
                let Ok(key) = IdentityKey::parse(k.value()) else {
                    continue;
                };
                let mut twin: Twin = serde_json::from_slice(v.value()).map_err(store_err)?;
                // Written before sections started at version 1 (as IoT Hub's do).
                for section in [&mut twin.desired, &mut twin.reported] {
                    section.version = section.version.max(1);
                }
                cache.insert(key, Arc::new(twin));
            }
        }
        let (jobs, rx) = mpsc::channel();
        let writer_cache = cache.clone();
        let shared = Arc::new(Shared::default());
        let writer_shared = shared.clone();
        std::thread::Builder::new()
            .name("twin-writer".into())
            .spawn(move || writer(db, writer_cache, writer_shared, rx))
            .map_err(store_err)?;
        Ok(TwinStore {
            cache,
            jobs,
            shared,
        })
    }

    /// Makes this store a cluster node's: twins live in `rows` from now on. The first node
    /// of a new cluster seeds the table with its own twins; every node then takes the table
    /// as it is.
    pub fn share(&self, rows: Arc<SharedRows>) -> Result<(), TwinError> {
        let (mut all, _) = rows.load().map_err(store_err)?;
        if all.is_empty() && !self.cache.is_empty() {
            let local = self
                .cache
                .iter()
                .map(|e| {
                    serde_json::to_string(e.value().as_ref())
                        .map(|body| (e.key().to_string(), body, e.value().etag.clone()))
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(store_err)?;
            rows.insert_new(local).map_err(store_err)?;
            all = rows.load().map_err(store_err)?.0;
        }
        self.cache.clear();
        self.shared.versions.clear();
        for row in all {
            match (
                IdentityKey::parse(&row.key),
                serde_json::from_str::<Twin>(&row.body),
            ) {
                (Ok(key), Ok(twin)) => {
                    self.shared.versions.insert(key.clone(), row.version);
                    self.cache.insert(key, Arc::new(twin));
                }
                _ => tracing::warn!(key = row.key, "a shared twin cannot be read; skipped"),
            }
        }
        let _ = self.shared.rows.set(rows);
        Ok(())
    }

    /// Applies what another node changed, when newer than what this node has; returns each
    /// twin that changed here, before and after, for what follows (desired pushes to
    /// connections on this node, the route table).
    pub fn heard(&self, heard: Heard) -> Vec<HeardTwin> {
        let _together = self.shared.together();
        let mut changed = Vec::new();
        let cached = || self.cache.iter().map(|e| e.key().clone()).collect();
        heard.apply_newer(&self.shared.versions, cached, |key, row| {
            let before = self.get(key);
            let after = match row {
                Some(r) => match serde_json::from_str::<Twin>(&r.body) {
                    Ok(t) => Some(Arc::new(t)),
                    Err(_) => return,
                },
                None => None,
            };
            match &after {
                Some(t) => {
                    self.cache.insert(key.clone(), t.clone());
                }
                None => {
                    if self.cache.remove(key).is_none() {
                        return;
                    }
                }
            }
            changed.push(HeardTwin {
                key: key.clone(),
                before,
                after,
            });
        });
        changed
    }

    /// The twin of `key`; an identity that never had a write has an empty twin.
    pub fn get(&self, key: &IdentityKey) -> Arc<Twin> {
        self.cache
            .get(key)
            .map(|t| t.value().clone())
            .unwrap_or_else(|| Arc::new(Twin::new()))
    }

    /// Every stored twin (for queries and re-publishing retained state).
    pub fn all(&self) -> Vec<(IdentityKey, Arc<Twin>)> {
        self.cache
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Queues `op` now (so ops submitted one after another apply in that order); the
    /// returned future resolves once it is committed.
    pub fn submit(
        &self,
        key: IdentityKey,
        op: TwinOp,
    ) -> impl std::future::Future<Output = Result<Applied, TwinError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let queued = self.jobs.send(Job { key, op, reply });
        async move {
            queued.map_err(|_| TwinError::Store("twin writer stopped".into()))?;
            rx.await
                .map_err(|_| TwinError::Store("twin writer stopped".into()))?
        }
    }

    /// Applies `op` durably; resolves once committed.
    pub async fn apply(&self, key: IdentityKey, op: TwinOp) -> Result<Applied, TwinError> {
        self.submit(key, op).await
    }
}

fn apply_op(
    current: &Twin,
    op: &TwinOp,
    now: &str,
) -> Result<(Option<Twin>, Option<Value>), TwinError> {
    let mut twin = current.clone();
    match op {
        TwinOp::Delete => Ok((None, None)),
        TwinOp::Reported(patch) => {
            twin.reported.apply(patch, now, false);
            twin.touch();
            Ok((Some(twin), None))
        }
        TwinOp::ReplaceDesired(keys) => {
            let mut p = twin.desired.replace_keys(keys, now);
            p.insert("$version".into(), serde_json::json!(twin.desired.version));
            twin.touch();
            Ok((Some(twin), Some(Value::Object(p))))
        }
        TwinOp::Update {
            tags,
            desired,
            if_match,
        } => {
            if let Some(given) = if_match {
                if given != "*" && given != &current.etag {
                    return Err(TwinError::EtagMismatch {
                        given: given.clone(),
                        current: current.etag.clone(),
                    });
                }
            }
            if let Some(tags) = tags {
                twin.patch_tags(tags);
            }
            let mut pushed = None;
            if let Some(patch) = desired {
                // Devices get the change itself, with a null for every removed key.
                let mut p = twin.desired.apply(patch, now, true);
                p.insert("$version".into(), serde_json::json!(twin.desired.version));
                pushed = Some(Value::Object(p));
            }
            twin.touch();
            Ok((Some(twin), pushed))
        }
    }
}

/// `key`'s twin as it stands inside a batch: as an earlier job of the batch left it (empty
/// after a deletion), else as cached.
fn as_staged(
    staged: &HashMap<IdentityKey, Option<Arc<Twin>>>,
    cache: &DashMap<IdentityKey, Arc<Twin>>,
    key: &IdentityKey,
) -> Arc<Twin> {
    match staged.get(key) {
        Some(Some(t)) => t.clone(),
        Some(None) => Arc::new(Twin::new()),
        None => cache
            .get(key)
            .map(|t| t.value().clone())
            .unwrap_or_else(|| Arc::new(Twin::new())),
    }
}

fn writer(
    db: Arc<Store>,
    cache: Arc<DashMap<IdentityKey, Arc<Twin>>>,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Job>,
) {
    while let Some(batch) = crate::storage::next_batch(&rx, MAX_BATCH) {
        if let Some(rows) = shared.rows.get() {
            write_shared(rows, &shared, &cache, batch);
            continue;
        }
        let now = crate::registry::now_rfc3339();
        // Twins as they stand inside this batch (`None`: deleted).
        let mut staged: HashMap<IdentityKey, Option<Arc<Twin>>> = HashMap::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        let result = (|| -> Result<(), TwinError> {
            let tx = db.begin_write().map_err(store_err)?;
            {
                let mut table = tx.open_table(TWINS).map_err(store_err)?;
                for job in &batch {
                    let current = as_staged(&staged, &cache, &job.key);
                    match apply_op(&current, &job.op, &now) {
                        Ok((Some(next), pushed)) => {
                            let bytes = serde_json::to_vec(&next).map_err(store_err)?;
                            table
                                .insert(job.key.to_string().as_str(), bytes.as_slice())
                                .map_err(store_err)?;
                            let next = Arc::new(next);
                            staged.insert(job.key.clone(), Some(next.clone()));
                            outcomes.push(Ok(Applied {
                                twin: next,
                                desired_patch: pushed,
                            }));
                        }
                        Ok((None, _)) => {
                            table
                                .remove(job.key.to_string().as_str())
                                .map_err(store_err)?;
                            staged.insert(job.key.clone(), None);
                            outcomes.push(Ok(Applied {
                                twin: Arc::new(Twin::new()),
                                desired_patch: None,
                            }));
                        }
                        Err(e) => outcomes.push(Err(e)),
                    }
                }
            }
            tx.commit().map_err(store_err)
        })();
        if let Err(e) = result {
            for job in batch {
                let _ = job.reply.send(Err(e.clone()));
            }
            continue;
        }
        for (key, twin) in staged {
            match twin {
                Some(t) => {
                    cache.insert(key, t);
                }
                None => {
                    cache.remove(&key);
                }
            }
        }
        for (job, outcome) in batch.into_iter().zip(outcomes) {
            let _ = job.reply.send(outcome);
        }
    }
}

/// A batch on a cluster node: applied to the twins as this node has them, written to the
/// shared table in one transaction on condition that none changed meanwhile; the twins
/// another node changed are read again and the whole batch applied again (the operations
/// are data, so this is safe), up to [`SHARED_RETRIES`] times.
fn write_shared(
    rows: &SharedRows,
    shared: &Shared,
    cache: &DashMap<IdentityKey, Arc<Twin>>,
    batch: Vec<Job>,
) {
    let versions = &shared.versions;
    let mut failure = TwinError::Store("twins keep changing on other nodes".into());
    for _ in 0..SHARED_RETRIES {
        let now = crate::registry::now_rfc3339();
        // Each twin with the version it was read at, as one snapshot.
        let snapshot = shared.together();
        let mut staged: HashMap<IdentityKey, Option<Arc<Twin>>> = HashMap::new();
        let mut order: Vec<IdentityKey> = Vec::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        for job in &batch {
            let current = as_staged(&staged, cache, &job.key);
            match apply_op(&current, &job.op, &now) {
                Ok((next, pushed)) => {
                    let next = next.map(Arc::new);
                    if !staged.contains_key(&job.key) {
                        order.push(job.key.clone());
                    }
                    staged.insert(job.key.clone(), next.clone());
                    outcomes.push(Ok(Applied {
                        twin: next.unwrap_or_else(|| Arc::new(Twin::new())),
                        desired_patch: pushed,
                    }));
                }
                Err(e) => outcomes.push(Err(e)),
            }
        }
        let mut writes = Vec::with_capacity(order.len());
        for key in &order {
            let body = match &staged[key] {
                Some(t) => match serde_json::to_string(t.as_ref()) {
                    Ok(b) => Some((b, t.etag.clone())),
                    Err(e) => {
                        failure = store_err(e);
                        continue;
                    }
                },
                None => None,
            };
            writes.push(BatchWrite {
                key: key.to_string(),
                body,
                expected: versions.get(key),
            });
        }
        drop(snapshot);
        match rows.write_batch(writes) {
            Ok(Ok(written)) => {
                let _together = shared.together();
                for (key, version) in order.iter().zip(written) {
                    // The feed may already hold a newer write of another node.
                    if !shared.versions.newer(key, version) {
                        continue;
                    }
                    versions.insert(key.clone(), version);
                    match &staged[key] {
                        Some(t) => {
                            cache.insert(key.clone(), t.clone());
                        }
                        None => {
                            cache.remove(key);
                        }
                    }
                }
                for (job, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = job.reply.send(outcome);
                }
                return;
            }
            Ok(Err(conflicts)) => {
                // Read what the other nodes wrote, then apply the batch again.
                for name in conflicts {
                    let Ok(key) = IdentityKey::parse(&name) else {
                        continue;
                    };
                    let read = rows.get(&name);
                    let _together = shared.together();
                    match read {
                        Ok(Ok(row)) => {
                            if let (true, Ok(t)) = (
                                shared.versions.newer(&key, row.version),
                                serde_json::from_str::<Twin>(&row.body),
                            ) {
                                versions.insert(key.clone(), row.version);
                                cache.insert(key, Arc::new(t));
                            }
                        }
                        Ok(Err(at)) => {
                            if shared.versions.newer(&key, at) {
                                versions.remove(&key);
                                cache.remove(&key);
                            }
                        }
                        Err(e) => failure = TwinError::Store(e),
                    }
                }
            }
            Err(e) => {
                failure = TwinError::Store(e);
                break;
            }
        }
    }
    for job in batch {
        let _ = job.reply.send(Err(failure.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::rows::{Heard, Row};

    fn row(twin: &Twin, version: i64) -> Row {
        Row {
            key: "d1".into(),
            body: serde_json::to_string(twin).unwrap(),
            etag: twin.etag.clone(),
            version,
        }
    }

    /// Other nodes' twin writes apply in version order: a late answer never puts an older
    /// twin back, and each applied change comes with the twin as it was before.
    #[test]
    fn heard_twins_apply_in_version_order() {
        let dir = std::env::temp_dir().join(format!("fh-twin-heard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = TwinStore::open(Arc::new(Store::create(&dir.join("s.redb")).unwrap())).unwrap();
        let key = IdentityKey::parse("d1").unwrap();
        let now = "2026-11-29T00:00:00.000Z";
        let mut v5 = Twin::new();
        let mut patch = Map::new();
        patch.insert("fw".into(), Value::from("5"));
        v5.desired.apply(&patch, now, true);
        let changed = store.heard(Heard::Changed("d1".into(), Ok(row(&v5, 5))));
        assert_eq!(changed.len(), 1);
        assert_eq!(
            changed[0].before.desired.version,
            Twin::new().desired.version
        );
        assert_eq!(store.get(&key).desired.data()["fw"], "5");

        let mut v3 = Twin::new();
        patch.insert("fw".into(), Value::from("3"));
        v3.desired.apply(&patch, now, true);
        assert!(store
            .heard(Heard::Changed("d1".into(), Ok(row(&v3, 3))))
            .is_empty());
        assert!(store.heard(Heard::Changed("d1".into(), Err(4))).is_empty());
        assert_eq!(
            store.get(&key).desired.data()["fw"],
            "5",
            "older answers are ignored"
        );

        let gone = store.heard(Heard::Changed("d1".into(), Err(6)));
        assert!(gone.len() == 1 && gone[0].after.is_none());
        assert!(store.is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }
}
