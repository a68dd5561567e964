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
        std::thread::Builder::new()
            .name("twin-writer".into())
            .spawn(move || writer(db, writer_cache, rx))
            .map_err(store_err)?;
        Ok(TwinStore { cache, jobs })
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

fn writer(db: Arc<Store>, cache: Arc<DashMap<IdentityKey, Arc<Twin>>>, rx: mpsc::Receiver<Job>) {
    while let Some(batch) = crate::storage::next_batch(&rx, MAX_BATCH) {
        let now = crate::registry::now_rfc3339();
        // Twins as they stand inside this batch (`None`: deleted).
        let mut staged: HashMap<IdentityKey, Option<Arc<Twin>>> = HashMap::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        let result = (|| -> Result<(), TwinError> {
            let tx = db.begin_write().map_err(store_err)?;
            {
                let mut table = tx.open_table(TWINS).map_err(store_err)?;
                for job in &batch {
                    let current = match staged.get(&job.key) {
                        Some(Some(t)) => t.clone(),
                        Some(None) => Arc::new(Twin::new()),
                        None => cache
                            .get(&job.key)
                            .map(|t| t.value().clone())
                            .unwrap_or_else(|| Arc::new(Twin::new())),
                    };
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
