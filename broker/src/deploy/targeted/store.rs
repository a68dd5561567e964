//! Where targeted deployments and per-device deployment state are kept (redb). Knows no
//! hub: the engine above it (`rollout`, `compute`) brings devices along.
//!
//! On a cluster node ([`Deployments::share`]) both live in tables the nodes share instead,
//! cached here and kept current by the change feed ([`Deployments::heard`]). A deployment
//! record is written only if it is still at the version this node read (two nodes changing
//! one deployment, say an operator's pause and the leader's phase advance, cannot lose a
//! change: the loser reads it again and reapplies its change). A device's state is computed
//! from shared inputs by whichever node reconciles the device, and the last write stands.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use crate::cluster::rows::{BatchWrite, Heard, SharedRows, Versions};
use crate::storage::JsonTable;
use crate::storage::Store;
use dashmap::DashMap;

use super::super::DeployError;
use super::spec::{
    Compiled, Deployment, DeploymentUpdate, DeviceState, RolloutState, RolloutStatus,
};

const DEPLOYMENTS: JsonTable<Deployment> = JsonTable::new("deployments");
/// Key: device id. Value: JSON [`DeviceState`].
const DEVICE_STATE: JsonTable<DeviceState> = JsonTable::new("deployment_devices");

pub fn now_ms() -> u64 {
    crate::c2d::now_ms()
}

pub struct Deployments {
    db: Arc<Store>,
    by_id: RwLock<BTreeMap<String, Arc<Compiled>>>,
    devices: DashMap<String, DeviceState>,
    /// Serialises read-modify-write of deployment records.
    pub(super) writer: Mutex<()>,
    /// One reconcile at a time: each reads and writes device states.
    pub reconciling: tokio::sync::Mutex<()>,
    /// On a cluster node: the shared tables and the version of each cached record.
    shared: std::sync::OnceLock<Shared>,
}

struct Shared {
    records: Arc<SharedRows>,
    states: Arc<SharedRows>,
    record_versions: Versions<String>,
    state_versions: Versions<String>,
}

/// Which of the two shared tables a change was heard on.
#[derive(Debug, Clone, Copy)]
pub enum Table {
    Records,
    States,
}

/// How often a deployment write that lost a race with another node reads it again.
const WRITE_ATTEMPTS: usize = 5;

impl Deployments {
    pub fn open(db: Arc<Store>) -> Result<Deployments, DeployError> {
        let mut by_id = BTreeMap::new();
        for (id, d) in DEPLOYMENTS.load::<DeployError>(&db)? {
            by_id.insert(id, Arc::new(Compiled::new(d)?));
        }
        let devices: DashMap<String, DeviceState> =
            DEVICE_STATE.load::<DeployError>(&db)?.into_iter().collect();
        Ok(Deployments {
            db,
            by_id: RwLock::new(by_id),
            devices,
            writer: Mutex::new(()),
            reconciling: tokio::sync::Mutex::new(()),
            shared: std::sync::OnceLock::new(),
        })
    }

    /// Makes this store a cluster node's: deployments (`records`) and device states
    /// (`states`) live in the shared tables from now on. The first node of a new cluster
    /// brings its own.
    pub fn share(
        &self,
        records: Arc<SharedRows>,
        states: Arc<SharedRows>,
    ) -> Result<(), DeployError> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let store = |e: String| DeployError::Store(e);
        let (mut all, _) = records.load().map_err(store)?;
        let (mut all_states, _) = states.load().map_err(store)?;
        if all.is_empty() && all_states.is_empty() {
            let mine: Vec<(String, String, String)> = self
                .read()
                .values()
                .map(|c| (c.d.id.clone(), json(&c.d), String::new()))
                .collect();
            let my_states: Vec<(String, String, String)> = self
                .devices
                .iter()
                .map(|e| (e.key().clone(), json(e.value()), String::new()))
                .collect();
            if !mine.is_empty() || !my_states.is_empty() {
                records.insert_new(mine).map_err(store)?;
                states.insert_new(my_states).map_err(store)?;
                all = records.load().map_err(store)?.0;
                all_states = states.load().map_err(store)?.0;
            }
        }
        let shared = Shared {
            records,
            states,
            record_versions: Versions::default(),
            state_versions: Versions::default(),
        };
        let mut by_id = BTreeMap::new();
        for row in all {
            match serde_json::from_str::<Deployment>(&row.body)
                .map_err(|e| e.to_string())
                .and_then(|d| Compiled::new(d).map_err(|e| e.to_string()))
            {
                Ok(c) => {
                    shared.record_versions.insert(row.key.clone(), row.version);
                    by_id.insert(row.key, Arc::new(c));
                }
                Err(e) => {
                    tracing::warn!(deployment = row.key, error = %e, "a shared deployment cannot be read; skipped")
                }
            }
        }
        self.devices.clear();
        for row in all_states {
            if let Ok(state) = serde_json::from_str::<DeviceState>(&row.body) {
                shared.state_versions.insert(row.key.clone(), row.version);
                self.devices.insert(row.key, state);
            }
        }
        *self.by_id.write().unwrap_or_else(|e| e.into_inner()) = by_id;
        let _ = self.shared.set(shared);
        Ok(())
    }

    /// The shared tables, on a cluster node.
    pub fn shared_tables(&self) -> Option<(Arc<SharedRows>, Arc<SharedRows>)> {
        self.shared
            .get()
            .map(|s| (s.records.clone(), s.states.clone()))
    }

    /// Applies what another node changed: newer records only, as every shared store does.
    pub fn heard(&self, table: Table, heard: Heard) {
        let Some(shared) = self.shared.get() else {
            return;
        };
        match table {
            Table::Records => {
                let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
                let cached = || self.read().keys().cloned().collect();
                heard.apply_newer(&shared.record_versions, cached, |id, row| {
                    let next = row.and_then(|r| {
                        serde_json::from_str::<Deployment>(&r.body)
                            .ok()
                            .and_then(|d| Compiled::new(d).ok())
                    });
                    let mut by_id = self.by_id.write().unwrap_or_else(|e| e.into_inner());
                    match next {
                        Some(c) => {
                            by_id.insert(id.clone(), Arc::new(c));
                        }
                        None => {
                            by_id.remove(id);
                        }
                    }
                });
            }
            Table::States => {
                let cached = || self.devices.iter().map(|e| e.key().clone()).collect();
                heard.apply_newer(&shared.state_versions, cached, |device, row| {
                    match row.and_then(|r| serde_json::from_str::<DeviceState>(&r.body).ok()) {
                        Some(s) => {
                            self.devices.insert(device.clone(), s);
                        }
                        None => {
                            self.devices.remove(device);
                        }
                    }
                });
            }
        }
    }

    /// Changes deployment `id` with `change` (given the record as it is now) and writes it;
    /// on a cluster node, if another node changed it meanwhile, reads it again and retries.
    pub(super) fn modify(
        &self,
        id: &str,
        change: impl Fn(&Compiled) -> Result<Deployment, DeployError>,
    ) -> Result<Arc<Compiled>, DeployError> {
        for _ in 0..WRITE_ATTEMPTS {
            let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            let c = self
                .get(id)
                .ok_or_else(|| DeployError::NotFound(format!("deployment '{id}'")))?;
            let d = change(&c)?;
            match self.put(d) {
                Err(DeployError::Changed(_)) => continue,
                other => return other,
            }
        }
        Err(DeployError::Changed(format!(
            "deployment '{id}' kept changing on other nodes; try again"
        )))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Compiled>>> {
        self.by_id.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    pub fn all(&self) -> Vec<Arc<Compiled>> {
        let mut v: Vec<Arc<Compiled>> = self.read().values().cloned().collect();
        v.sort_by_key(|c| std::cmp::Reverse(c.rank()));
        v
    }

    pub fn get(&self, id: &str) -> Option<Arc<Compiled>> {
        self.read().get(id).cloned()
    }

    pub fn device_state(&self, device: &str) -> DeviceState {
        self.devices
            .get(device)
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Writes a deployment record (callers hold `writer`). On a cluster node it must still
    /// be at the version this node has (absent, for a new one): `Changed` when it was not,
    /// with the cache read again.
    pub(super) fn put(&self, d: Deployment) -> Result<Arc<Compiled>, DeployError> {
        let c = Arc::new(Compiled::new(d)?);
        if let Some(shared) = self.shared.get() {
            let id = c.d.id.clone();
            let write = BatchWrite {
                key: id.clone(),
                body: Some((json(&c.d), String::new())),
                // A record this node does not hold (new, or deleted) must not exist yet.
                expected: self.get(&id).and_then(|_| shared.record_versions.get(&id)),
            };
            match shared
                .records
                .write_batch(vec![write])
                .map_err(DeployError::Store)?
            {
                Ok(versions) => {
                    shared
                        .record_versions
                        .insert(id.clone(), versions.first().copied().unwrap_or_default());
                }
                Err(_) => {
                    self.reread(shared, &id)?;
                    return Err(DeployError::Changed(format!(
                        "deployment '{id}' was changed on another node"
                    )));
                }
            }
            self.by_id
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, c.clone());
            return Ok(c);
        }
        let tx = self.db.begin_write()?;
        DEPLOYMENTS.put::<DeployError>(&tx, &c.d.id, &c.d)?;
        tx.commit()?;
        self.by_id
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(c.d.id.clone(), c.clone());
        Ok(c)
    }

    /// Records a compiled deployment as the newest (its rollout, if any, at phase 0 with
    /// no devices yet: the engine starts the phase).
    pub fn insert(&self, compiled: Compiled) -> Result<Arc<Compiled>, DeployError> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if self.get(&compiled.d.id).is_some() {
            return Err(DeployError::Exists(format!(
                "deployment '{}'",
                compiled.d.id
            )));
        }
        let mut d = compiled.d;
        d.sequence = match self.shared.get() {
            // Creation order across every node: the shared table's sequence.
            Some(shared) => shared
                .records
                .next_sequence()
                .map_err(DeployError::Store)?
                .max(0) as u64,
            None => {
                self.read()
                    .values()
                    .map(|c| c.d.sequence)
                    .max()
                    .unwrap_or(0)
                    + 1
            }
        };
        if d.rollout.is_some() {
            d.rollout_state = Some(RolloutState {
                phase: 0,
                status: RolloutStatus::Running,
                phase_started_ms: now_ms(),
                members: Vec::new(),
                phase_members: Vec::new(),
                reason: None,
            });
        }
        let id = d.id.clone();
        match self.put(d) {
            // Created on another node meanwhile.
            Err(DeployError::Changed(_)) => Err(DeployError::Exists(format!("deployment '{id}'"))),
            other => other,
        }
    }

    pub fn update(&self, id: &str, update: DeploymentUpdate) -> Result<Arc<Compiled>, DeployError> {
        if update.content.is_some() {
            return Err(DeployError::Invalid {
                field: "content",
                message: "a deployment's content is immutable; create a new deployment".into(),
            });
        }
        self.modify(id, |c| {
            let mut d = c.d.clone();
            if let Some(cond) = &update.target_condition {
                d.target_condition = cond.clone();
            }
            if let Some(p) = update.priority {
                d.priority = p;
            }
            if let Some(l) = &update.labels {
                d.labels = l.clone();
            }
            if let Some(m) = &update.metrics {
                d.metrics = m.queries.clone();
            }
            Ok(d)
        })
    }

    pub fn delete(&self, id: &str) -> Result<(), DeployError> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if self.get(id).is_none() {
            return Err(DeployError::NotFound(format!("deployment '{id}'")));
        }
        if let Some(shared) = self.shared.get() {
            let deleted = shared
                .records
                .delete(vec![id.to_string()])
                .map_err(DeployError::Store)?;
            shared.record_versions.insert(id.to_string(), deleted);
            self.by_id
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            return Ok(());
        }
        let tx = self.db.begin_write()?;
        DEPLOYMENTS.remove::<DeployError>(&tx, id)?;
        tx.commit()?;
        self.by_id
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(())
    }

    /// Persists device states that changed.
    pub(super) fn save_states(
        &self,
        states: Vec<(String, DeviceState)>,
    ) -> Result<(), DeployError> {
        if states.is_empty() {
            return Ok(());
        }
        if let Some(shared) = self.shared.get() {
            let writes = states
                .iter()
                .map(|(d, s)| (d.clone(), (*s != DeviceState::default()).then(|| json(s))))
                .collect();
            let versions = shared
                .states
                .upsert_batch(writes)
                .map_err(DeployError::Store)?;
            for ((d, s), v) in states.into_iter().zip(versions) {
                shared.state_versions.insert(d.clone(), v);
                if s == DeviceState::default() {
                    self.devices.remove(&d);
                } else {
                    self.devices.insert(d, s);
                }
            }
            return Ok(());
        }
        let tx = self.db.begin_write()?;
        for (d, s) in &states {
            if *s == DeviceState::default() {
                DEVICE_STATE.remove::<DeployError>(&tx, d)?;
            } else {
                DEVICE_STATE.put::<DeployError>(&tx, d, s)?;
            }
        }
        tx.commit()?;
        for (d, s) in states {
            if s == DeviceState::default() {
                self.devices.remove(&d);
            } else {
                self.devices.insert(d, s);
            }
        }
        Ok(())
    }
}

impl Deployments {
    /// Reads one record again after a lost race (callers hold `writer`).
    fn reread(&self, shared: &Shared, id: &str) -> Result<(), DeployError> {
        let found = shared.records.get(id).map_err(DeployError::Store)?;
        let mut by_id = self.by_id.write().unwrap_or_else(|e| e.into_inner());
        match found {
            Ok(row) => {
                let d: Deployment = serde_json::from_str(&row.body)?;
                shared.record_versions.insert(id.to_string(), row.version);
                by_id.insert(id.to_string(), Arc::new(Compiled::new(d)?));
            }
            Err(at) => {
                shared.record_versions.insert(id.to_string(), at);
                by_id.remove(id);
            }
        }
        Ok(())
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}
