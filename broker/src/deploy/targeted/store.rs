//! Where targeted deployments and per-device deployment state are kept (redb). Knows no
//! hub: the engine above it (`rollout`, `compute`) brings devices along.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

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
}

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
        })
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

    pub(super) fn put(&self, d: Deployment) -> Result<Arc<Compiled>, DeployError> {
        let c = Arc::new(Compiled::new(d)?);
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
        d.sequence = self
            .read()
            .values()
            .map(|c| c.d.sequence)
            .max()
            .unwrap_or(0)
            + 1;
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
        self.put(d)
    }

    pub fn update(&self, id: &str, update: DeploymentUpdate) -> Result<Arc<Compiled>, DeployError> {
        if update.content.is_some() {
            return Err(DeployError::Invalid {
                field: "content",
                message: "a deployment's content is immutable; create a new deployment".into(),
            });
        }
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut d = self
            .get(id)
            .ok_or_else(|| DeployError::NotFound(format!("deployment '{id}'")))?
            .d
            .clone();
        if let Some(c) = update.target_condition {
            d.target_condition = c;
        }
        if let Some(p) = update.priority {
            d.priority = p;
        }
        if let Some(l) = update.labels {
            d.labels = l;
        }
        if let Some(m) = update.metrics {
            d.metrics = m.queries;
        }
        self.put(d)
    }

    pub fn delete(&self, id: &str) -> Result<(), DeployError> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if self.get(id).is_none() {
            return Err(DeployError::NotFound(format!("deployment '{id}'")));
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
