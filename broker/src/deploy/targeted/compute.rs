//! What each device should carry: base and layered deployments, `onUnmatch`, and the
//! per-target desired keys; the reconcile that writes the difference; status figures.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use fleethub_router::condition::query::Collection;
use serde_json::{Map, Value};

use super::super::manifest::{self, Target};
use super::super::DeployError;
use super::spec::{Compiled, DeviceState, OnUnmatch};
use super::Deployments;
use crate::hub::Hub;
use crate::identity::{DeviceId, IdentityKey};

pub(super) fn twin_key(device: &DeviceId, target: &Target) -> Option<IdentityKey> {
    match target {
        Target::Device => Some(IdentityKey::device(device.clone())),
        Target::Module(m) => Some(IdentityKey::module(
            device.clone(),
            crate::identity::ModuleId::new(m).ok()?,
        )),
    }
}

/// Whether the deployment's target condition matches a device.
pub(super) fn targets(c: &Compiled, device: &crate::twin::view::Subject) -> bool {
    c.condition.matches(&device.view())
}

/// Whether the device reported applying the deployment's content: `Some(true)` for code 200,
/// `Some(false)` for 400 and above, both only for the desired version in force.
pub(super) fn reported(hub: &Hub, c: &Compiled, device: &str) -> Option<bool> {
    let device = DeviceId::new(device).ok()?;
    let key = twin_key(&device, &c.reporting_target())?;
    let twin = hub.twins.get(&key);
    let r = twin.reported.tree();
    if r.get("lastDesiredVersion")?.as_leaf()?.as_u64()? != twin.desired.version {
        return None;
    }
    match r
        .get("lastDesiredStatus")?
        .get("code")?
        .as_leaf()?
        .as_u64()?
    {
        200 => Some(true),
        c if c >= 400 => Some(false),
        _ => None,
    }
}

/// Computes what the device should carry: its new state and, per target, the
/// deployment-owned desired properties.
fn compute(
    hub: &Hub,
    all: &[Arc<Compiled>],
    device: &DeviceId,
    prev: &DeviceState,
) -> (DeviceState, BTreeMap<Target, Map<String, Value>>) {
    let exists = |id: &str| all.iter().any(|c| c.d.id == id);
    let subject = hub.device_subject(device);
    let matching: HashSet<&str> = all
        .iter()
        .filter(|c| targets(c, &subject))
        .map(|c| c.d.id.as_str())
        .collect();
    let eligible = |c: &Compiled| matching.contains(c.d.id.as_str()) && c.in_scope(device.as_str());

    let mut sticky: Vec<String> = prev
        .sticky
        .iter()
        .filter(|id| exists(id) && !matching.contains(id.as_str()))
        .cloned()
        .collect();
    let mut suppressed = prev
        .suppressed
        .clone()
        .filter(|id| exists(id) && !matching.contains(id.as_str()));
    // The base it had no longer matches: its onUnmatch policy decides.
    if let Some(pb) = prev
        .base
        .as_deref()
        .and_then(|id| all.iter().find(|c| c.d.id == id))
    {
        if !matching.contains(pb.d.id.as_str()) {
            match pb.d.on_unmatch {
                OnUnmatch::Keep if !sticky.contains(&pb.d.id) => sticky.push(pb.d.id.clone()),
                OnUnmatch::Remove => suppressed = Some(pb.d.id.clone()),
                _ => {}
            }
        }
    }
    let floor = suppressed
        .as_deref()
        .and_then(|id| all.iter().find(|c| c.d.id == id))
        .map(|c| c.rank());
    let base = all
        .iter()
        .filter(|c| !c.d.layered)
        .filter(|c| eligible(c) || sticky.contains(&c.d.id))
        .filter(|c| floor.is_none_or(|f| c.rank() > f))
        .max_by_key(|c| c.rank());
    // A sticky deployment that lost to another is let go.
    sticky.retain(|id| base.is_some_and(|b| b.d.id == *id));
    let mut layered: Vec<&Arc<Compiled>> =
        all.iter().filter(|c| c.d.layered && eligible(c)).collect();
    layered.sort_by_key(|c| c.rank());

    let mut maps: BTreeMap<Target, Map<String, Value>> = BTreeMap::new();
    for c in base.into_iter().chain(layered.iter().copied()) {
        for (t, set) in &c.content.entries {
            manifest::apply(maps.entry(t.clone()).or_default(), set);
        }
    }
    let owned = maps
        .iter()
        .map(|(t, m)| (t.label().to_string(), m.keys().cloned().collect()))
        .collect();
    let state = DeviceState {
        base: base.map(|c| c.d.id.clone()),
        layered: layered.iter().map(|c| c.d.id.clone()).collect(),
        sticky,
        suppressed,
        owned,
    };
    (state, maps)
}

/// Brings devices to their computed deployment state. Returns how many twins were written.
pub async fn reconcile(
    hub: &Arc<Hub>,
    deployments: &Deployments,
    devices: Vec<DeviceId>,
) -> Result<usize, DeployError> {
    let _one = deployments.reconciling.lock().await;
    let all = deployments.all();
    let mut writes: Vec<(IdentityKey, Map<String, Value>)> = Vec::new();
    let mut states = Vec::new();
    let mut written = 0;
    for device in devices {
        // Patches are written a chunk at a time, so a deployment to a whole fleet never
        // holds every device's patch at once (the states are saved after all of them, as
        // before: a device whose write did not happen is computed again).
        if writes.len() >= WRITE_CHUNK {
            written += super::super::write_desired(hub, std::mem::take(&mut writes)).await?;
        }
        let key = IdentityKey::device(device.clone());
        if hub.registry.get(&key).is_none() {
            continue;
        }
        let prev = deployments.device_state(device.as_str());
        if all.is_empty() && prev == DeviceState::default() {
            continue;
        }
        let (state, maps) = compute(hub, &all, &device, &prev);
        // Every target it wrote before or writes now.
        let mut targets: Vec<Target> = maps.keys().cloned().collect();
        for label in prev.owned.targets() {
            let t = if label.is_empty() {
                Target::Device
            } else {
                Target::Module(label.to_string())
            };
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        for t in targets {
            let Some(tkey) = twin_key(&device, &t) else {
                continue;
            };
            if tkey.module.is_some() && hub.registry.get(&tkey).is_none() {
                // Written when the module is registered (module creation reconciles).
                continue;
            }
            let twin = hub.twins.get(&tkey);
            let want = maps.get(&t).cloned().unwrap_or_default();
            let mut patch = Map::new();
            for (k, v) in &want {
                if twin.desired.get(k).as_ref() != Some(v) {
                    patch.insert(k.clone(), v.clone());
                }
            }
            for k in prev.owned.get(t.label()).into_iter().flatten() {
                if !want.contains_key(k) && twin.desired.contains_key(k) {
                    patch.insert(k.clone(), Value::Null);
                }
            }
            if !patch.is_empty() {
                writes.push((tkey, patch));
            }
        }
        if state != prev {
            states.push((device.as_str().to_string(), state));
        }
    }
    written += super::super::write_desired(hub, writes).await?;
    deployments.save_states(states)?;
    Ok(written)
}

/// Twins' patches computed before they are written, at most.
const WRITE_CHUNK: usize = 1024;

/// Which devices a deployment targets, applies to, and which reported success or failure;
/// and, per custom metric, the identities its query matches among the targeted devices.
/// Every list is sorted.
#[derive(Debug, Clone, Default)]
pub struct DeploymentStatus {
    pub targeted: Vec<String>,
    pub applied: Vec<String>,
    pub reported_successful: Vec<String>,
    pub reported_failed: Vec<String>,
    pub custom: BTreeMap<String, Vec<String>>,
}

impl DeploymentStatus {
    /// The counts IoT Hub calls a deployment's system metrics.
    pub fn system_metrics(&self) -> super::super::wire::SystemMetrics {
        let len = |v: &Vec<String>| v.len() as u64;
        super::super::wire::SystemMetrics {
            targeted_count: len(&self.targeted),
            applied_count: len(&self.applied),
            reported_successful_count: len(&self.reported_successful),
            reported_failed_count: len(&self.reported_failed),
        }
    }
}

/// Per-deployment figures: system metrics and custom metrics, each with its devices.
pub fn status(hub: &Hub, deployments: &Deployments, c: &Compiled) -> DeploymentStatus {
    let mut st = DeploymentStatus::default();
    for device in super::super::all_devices(hub) {
        if targets(c, &hub.device_subject(&device)) {
            st.targeted.push(device.as_str().to_string());
        }
        let s = deployments.device_state(device.as_str());
        if s.base.as_deref() == Some(&c.d.id) || s.layered.contains(&c.d.id) {
            st.applied.push(device.as_str().to_string());
            match reported(hub, c, device.as_str()) {
                Some(true) => st.reported_successful.push(device.as_str().to_string()),
                Some(false) => st.reported_failed.push(device.as_str().to_string()),
                None => {}
            }
        }
    }
    let targeted_set: HashSet<&str> = st.targeted.iter().map(String::as_str).collect();
    for (name, q) in &c.metrics {
        let mut ids = Vec::new();
        for entry in hub.registry.identities() {
            let key = crate::registry::key_of(&entry);
            if key.module.is_some() != (q.from == Collection::Modules) {
                continue;
            }
            if !targeted_set.contains(key.device.as_str()) {
                continue;
            }
            if q.matches_with(&hub.subject(&entry).view()) {
                ids.push(key.to_string());
            }
        }
        ids.sort();
        st.custom.insert(name.clone(), ids);
    }
    for ids in [
        &mut st.targeted,
        &mut st.applied,
        &mut st.reported_successful,
        &mut st.reported_failed,
    ] {
        ids.sort();
    }
    st
}
