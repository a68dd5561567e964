//! Targeted deployments (IoT Hub configurations / IoT Edge deployments at scale), layered
//! deployments, the `onUnmatch` policy and phased rollouts.
//!
//! For every device the hub computes, from scratch and deterministically:
//!
//! 1. the **base** deployment: among non-layered deployments whose target condition matches
//!    the device's twin (and whose rollout includes it), the highest priority, ties to the
//!    newest; lower ones are neither applied nor merged;
//! 2. the **layered** deployments that match, applied on top in priority order (then age);
//! 3. what the device should therefore carry in each twin it targets, as a map of
//!    deployment-owned top-level desired properties.
//!
//! Each device's result is persisted (which deployments apply, which keys they own, and the
//! `onUnmatch` history), because `keep` and `remove` depend on what applied before. Twins are
//! written only where the computed value differs, so desired versions move only when content
//! changes.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use dashmap::DashMap;
use fleethub_router::condition::query::{Collection, Query};
use fleethub_router::condition::Condition;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::manifest::{self, Content, Target};
use super::DeployError;
use crate::hub::Hub;
use crate::identity::{DeviceId, IdentityKey};
use crate::registry::now_rfc3339;

const DEPLOYMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("deployments");
/// Key: device id. Value: JSON [`DeviceState`].
const DEVICE_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("deployment_devices");

/// At most this many custom metric queries per deployment (as IoT Hub).
pub const MAX_METRICS: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnUnmatch {
    /// The next best deployment's content (nothing, if none matches).
    #[default]
    Fallback,
    /// The device keeps this deployment's content until the deployment is deleted or another
    /// deployment wins.
    Keep,
    /// This deployment's content is removed and lower-ranked deployments do not take over.
    Remove,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rollout {
    /// Cumulative percent of targeted devices per phase, increasing, ending at 100.
    pub phases: Vec<u32>,
    /// Percent of a phase's devices that must report success before the next starts.
    pub success_threshold: f64,
    /// Percent of a phase's devices whose reported failure stops the rollout.
    pub failure_threshold: f64,
    /// A phase runs at least this long before the next starts.
    #[serde(default)]
    pub observe_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutStatus {
    Running,
    Paused,
    Completed,
    Aborted,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutState {
    /// Index into `phases`.
    pub phase: usize,
    pub status: RolloutStatus,
    pub phase_started_ms: u64,
    /// Devices the deployment applies to (cumulative over phases); unused once completed.
    pub members: Vec<String>,
    /// The devices the current phase added.
    pub phase_members: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    pub id: String,
    /// As given; immutable.
    pub content: Value,
    pub target_condition: String,
    pub priority: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Custom metric name → `SELECT deviceId FROM devices WHERE …`.
    #[serde(default)]
    pub metrics: BTreeMap<String, String>,
    #[serde(default)]
    pub layered: bool,
    #[serde(default)]
    pub on_unmatch: OnUnmatch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_state: Option<RolloutState>,
    pub created_time: String,
    /// Creation order: "newest wins" never depends on clock resolution.
    pub sequence: u64,
}

/// A deployment with its parts parsed once.
pub struct Compiled {
    pub d: Deployment,
    condition: Condition,
    content: Content,
    metrics: Vec<(String, Query)>,
    members: HashSet<String>,
}

impl Compiled {
    fn new(d: Deployment) -> Result<Compiled, DeployError> {
        let condition = parse_condition(&d.target_condition)?;
        let content = Content::parse(&d.content).map_err(|e| DeployError::Invalid {
            field: "content",
            message: e.to_string(),
        })?;
        let metrics = parse_metrics(&d.metrics)?;
        let members = d
            .rollout_state
            .as_ref()
            .map(|r| r.members.iter().cloned().collect())
            .unwrap_or_default();
        Ok(Compiled {
            d,
            condition,
            content,
            metrics,
            members,
        })
    }

    /// (priority, sequence): higher wins.
    fn rank(&self) -> (u32, u64) {
        (self.d.priority, self.d.sequence)
    }

    /// Whether the rollout (if any) includes the device.
    fn in_scope(&self, device: &str) -> bool {
        match &self.d.rollout_state {
            None => true,
            Some(r) if r.status == RolloutStatus::Completed => true,
            Some(_) => self.members.contains(device),
        }
    }

    /// The twin whose reported `lastDesiredStatus` tells how applying went.
    fn reporting_target(&self) -> Target {
        let targets = self.content.targets();
        if targets.contains(&Target::Device) {
            Target::Device
        } else if targets.contains(&Target::Module("$edgeAgent".into())) {
            Target::Module("$edgeAgent".into())
        } else {
            targets.into_iter().next().unwrap_or(Target::Device)
        }
    }
}

fn parse_condition(text: &str) -> Result<Condition, DeployError> {
    if text.trim() == "*" {
        return Condition::parse("true").map_err(|e| DeployError::Invalid {
            field: "targetCondition",
            message: e.to_string(),
        });
    }
    Condition::parse(text).map_err(|e| DeployError::Invalid {
        field: "targetCondition",
        message: e.to_string(),
    })
}

fn parse_metrics(m: &BTreeMap<String, String>) -> Result<Vec<(String, Query)>, DeployError> {
    if m.len() > MAX_METRICS {
        return Err(DeployError::Invalid {
            field: "metrics.queries",
            message: format!("{} queries; at most {MAX_METRICS}", m.len()),
        });
    }
    m.iter()
        .map(|(name, q)| {
            Query::parse(q)
                .map(|q| (name.clone(), q))
                .map_err(|e| DeployError::Invalid {
                    field: "metrics.queries",
                    message: format!("{name}: {e}"),
                })
        })
        .collect()
}

fn check_id(id: &str) -> Result<(), DeployError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || "-:+%_#*?!(),=@;$'".contains(c)
        });
    if ok {
        Ok(())
    } else {
        Err(DeployError::Invalid {
            field: "id",
            message: format!(
                "'{id}': 1 to 128 lowercase letters, digits or any of -:+%_#*?!(),=@;$'"
            ),
        })
    }
}

fn check_rollout(r: &Rollout) -> Result<(), DeployError> {
    let bad = |message: String| DeployError::Invalid {
        field: "rollout",
        message,
    };
    if r.phases.is_empty() || r.phases.last() != Some(&100) {
        return Err(bad("phases must end at 100 (percent of targets)".into()));
    }
    if r.phases.windows(2).any(|w| w[0] >= w[1]) || r.phases[0] == 0 {
        return Err(bad("phases must increase, from above 0".into()));
    }
    for (name, v) in [
        ("successThreshold", r.success_threshold),
        ("failureThreshold", r.failure_threshold),
    ] {
        if !(0.0..=100.0).contains(&v) {
            return Err(bad(format!("{name} {v}: must be 0 to 100")));
        }
    }
    Ok(())
}

/// What a device carries, and why, as of its last reconcile.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layered: Vec<String>,
    /// `keep` deployments the device no longer matches but still carries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sticky: Vec<String>,
    /// A `remove` deployment the device left: nothing ranked at or below it takes over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<String>,
    /// Target ("" for the device twin, else a module id) → deployment-owned desired keys.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub owned: BTreeMap<String, Vec<String>>,
}

/// Fields a deployment may change after creation (content never does).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeploymentUpdate {
    pub target_condition: Option<String>,
    pub priority: Option<u32>,
    pub labels: Option<BTreeMap<String, String>>,
    pub metrics: Option<MetricsSpec>,
    /// Present only to be refused with a clear message.
    pub content: Option<Value>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSpec {
    #[serde(default)]
    pub queries: BTreeMap<String, String>,
}

/// A new deployment as the API takes it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeploymentSpec {
    pub id: String,
    pub content: Value,
    pub target_condition: String,
    #[serde(default)]
    pub priority: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub metrics: MetricsSpec,
    #[serde(default)]
    pub layered: bool,
    #[serde(default)]
    pub on_unmatch: OnUnmatch,
    pub rollout: Option<Rollout>,
}

pub struct Deployments {
    db: Arc<Database>,
    by_id: RwLock<BTreeMap<String, Arc<Compiled>>>,
    devices: DashMap<String, DeviceState>,
    writer: Mutex<()>,
    /// One reconcile at a time: each reads and writes device states.
    pub reconciling: tokio::sync::Mutex<()>,
}

pub fn now_ms() -> u64 {
    crate::c2d::now_ms()
}

/// A device's place in rollout order: a hash of its id, so reruns pick the same canaries.
fn rollout_order(device: &str) -> (u64, String) {
    let d = Sha256::digest(device.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    (u64::from_be_bytes(b), device.to_string())
}

impl Deployments {
    pub fn open(db: Arc<Database>) -> Result<Deployments, DeployError> {
        {
            let tx = db.begin_write()?;
            tx.open_table(DEPLOYMENTS)?;
            tx.open_table(DEVICE_STATE)?;
            tx.commit()?;
        }
        let mut by_id = BTreeMap::new();
        let devices = DashMap::new();
        {
            let tx = db.begin_read()?;
            for row in tx.open_table(DEPLOYMENTS)?.iter()? {
                let (k, v) = row?;
                let d: Deployment = serde_json::from_slice(v.value())?;
                by_id.insert(k.value().to_string(), Arc::new(Compiled::new(d)?));
            }
            for row in tx.open_table(DEVICE_STATE)?.iter()? {
                let (k, v) = row?;
                devices.insert(k.value().to_string(), serde_json::from_slice(v.value())?);
            }
        }
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

    fn put(&self, d: Deployment) -> Result<Arc<Compiled>, DeployError> {
        let c = Arc::new(Compiled::new(d)?);
        let tx = self.db.begin_write()?;
        tx.open_table(DEPLOYMENTS)?
            .insert(c.d.id.as_str(), serde_json::to_vec(&c.d)?.as_slice())?;
        tx.commit()?;
        self.by_id
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(c.d.id.clone(), c.clone());
        Ok(c)
    }

    /// Validates and records a deployment. `$edgeHub` content must make a valid route set.
    pub fn create(&self, hub: &Hub, spec: DeploymentSpec) -> Result<Arc<Compiled>, DeployError> {
        check_id(&spec.id)?;
        if let Some(r) = &spec.rollout {
            check_rollout(r)?;
            if spec.layered {
                return Err(DeployError::Invalid {
                    field: "rollout",
                    message: "phased rollouts are for base deployments, not layered ones".into(),
                });
            }
        }
        let d = Deployment {
            id: spec.id.clone(),
            content: spec.content,
            target_condition: spec.target_condition,
            priority: spec.priority,
            labels: spec.labels,
            metrics: spec.metrics.queries,
            layered: spec.layered,
            on_unmatch: spec.on_unmatch,
            rollout: spec.rollout,
            rollout_state: None,
            created_time: now_rfc3339(),
            sequence: 0,
        };
        // Parse everything before taking the lock: errors come back whole and early.
        let compiled = Compiled::new(d)?;
        check_edge_hub_routes(hub, &compiled.content)?;
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if self.get(&spec.id).is_some() {
            return Err(DeployError::Exists(format!("deployment '{}'", spec.id)));
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
        let c = self.put(d)?;
        if c.d.rollout.is_some() {
            return self.start_phase(hub, &c.d.id, 0);
        }
        Ok(c)
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
        tx.open_table(DEPLOYMENTS)?.remove(id)?;
        tx.commit()?;
        self.by_id
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(())
    }

    /// Devices the deployment's condition matches, in rollout order.
    fn targeted_in_order(&self, hub: &Hub, c: &Compiled) -> Vec<String> {
        let mut v: Vec<(u64, String)> = super::all_devices(hub)
            .into_iter()
            .filter(|d| targets(c, &hub.device_subject(d)))
            .map(|d| rollout_order(d.as_str()))
            .collect();
        v.sort();
        v.into_iter().map(|(_, d)| d).collect()
    }

    /// Starts phase `phase`: its devices are the first `phases[phase]` percent of targets in
    /// rollout order (at least one while there are targets).
    fn start_phase(&self, hub: &Hub, id: &str, phase: usize) -> Result<Arc<Compiled>, DeployError> {
        let c = self
            .get(id)
            .ok_or_else(|| DeployError::NotFound(format!("deployment '{id}'")))?;
        let (Some(rollout), Some(state)) = (&c.d.rollout, &c.d.rollout_state) else {
            return Ok(c);
        };
        let mut d = c.d.clone();
        let mut next = state.clone();
        if phase >= rollout.phases.len() {
            next.status = RolloutStatus::Completed;
            next.members.clear();
            next.phase_members.clear();
        } else {
            let targets = self.targeted_in_order(hub, &c);
            let pct = rollout.phases[phase] as usize;
            let n = (targets.len() * pct).div_ceil(100).min(targets.len());
            let old: HashSet<&String> = state.members.iter().collect();
            let members: Vec<String> = targets.into_iter().take(n).collect();
            next.phase_members = members
                .iter()
                .filter(|m| !old.contains(m))
                .cloned()
                .collect();
            // Devices of earlier phases stay in even if they stopped matching meanwhile.
            let mut all: Vec<String> = state.members.clone();
            all.extend(next.phase_members.iter().cloned());
            next.members = all;
            next.phase = phase;
            next.status = RolloutStatus::Running;
        }
        next.phase_started_ms = now_ms();
        d.rollout_state = Some(next);
        self.put(d)
    }

    /// Pause, resume or abort a rollout (`abort` also works on a deployment mid-phase: the
    /// phase's devices go back to what they had).
    pub fn control(&self, id: &str, action: &str) -> Result<Arc<Compiled>, DeployError> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let c = self
            .get(id)
            .ok_or_else(|| DeployError::NotFound(format!("deployment '{id}'")))?;
        let Some(state) = &c.d.rollout_state else {
            return Err(DeployError::Invalid {
                field: "rollout",
                message: format!("deployment '{id}' has no phased rollout"),
            });
        };
        let mut next = state.clone();
        match (action, state.status) {
            ("pause", RolloutStatus::Running) => next.status = RolloutStatus::Paused,
            ("resume", RolloutStatus::Paused) => {
                next.status = RolloutStatus::Running;
                next.phase_started_ms = now_ms();
            }
            ("abort", RolloutStatus::Running | RolloutStatus::Paused) => {
                abort(&mut next, "aborted by the operator".into());
            }
            (a, s) => {
                return Err(DeployError::Invalid {
                    field: "rollout",
                    message: format!("cannot {a} a rollout that is {s:?}"),
                })
            }
        }
        let mut d = c.d.clone();
        d.rollout_state = Some(next);
        self.put(d)
    }

    /// Advances or stops running rollouts from their devices' reports. Returns the
    /// deployments whose scope changed (their devices need reconciling).
    pub fn tick(&self, hub: &Hub) -> Vec<String> {
        let mut changed = Vec::new();
        for c in self.all() {
            let (Some(rollout), Some(state)) = (&c.d.rollout, &c.d.rollout_state) else {
                continue;
            };
            if state.status != RolloutStatus::Running {
                continue;
            }
            let n = state.phase_members.len();
            let (mut ok, mut failed) = (0usize, 0usize);
            for device in &state.phase_members {
                match reported(hub, &c, device) {
                    Some(true) => ok += 1,
                    Some(false) => failed += 1,
                    None => {}
                }
            }
            let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            if n > 0 && failed > 0 && failed as f64 * 100.0 >= rollout.failure_threshold * n as f64
            {
                let mut d = c.d.clone();
                let mut next = state.clone();
                abort(
                    &mut next,
                    format!(
                        "phase {} ({}%): {failed} of {n} devices reported failure (threshold {}%)",
                        state.phase + 1,
                        rollout.phases[state.phase],
                        rollout.failure_threshold
                    ),
                );
                d.rollout_state = Some(next);
                if self.put(d).is_ok() {
                    tracing::warn!(deployment = %c.d.id, "rollout stopped: failure threshold passed");
                    changed.push(c.d.id.clone());
                }
                continue;
            }
            let observed =
                now_ms().saturating_sub(state.phase_started_ms) >= rollout.observe_secs * 1000;
            let succeeded = ok as f64 * 100.0 >= rollout.success_threshold * n as f64;
            if observed && succeeded {
                drop(_w);
                if self.start_phase(hub, &c.d.id, state.phase + 1).is_ok() {
                    tracing::info!(deployment = %c.d.id, phase = state.phase + 2, "rollout phase started");
                    changed.push(c.d.id.clone());
                }
            }
        }
        changed
    }

    /// Persists device states that changed.
    fn save_states(&self, states: Vec<(String, DeviceState)>) -> Result<(), DeployError> {
        if states.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(DEVICE_STATE)?;
            for (d, s) in &states {
                if *s == DeviceState::default() {
                    t.remove(d.as_str())?;
                } else {
                    t.insert(d.as_str(), serde_json::to_vec(s)?.as_slice())?;
                }
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

fn abort(state: &mut RolloutState, reason: String) {
    let failed: HashSet<String> = state.phase_members.iter().cloned().collect();
    state.members.retain(|m| !failed.contains(m));
    state.phase_members.clear();
    state.status = RolloutStatus::Aborted;
    state.reason = Some(reason);
}

/// `$edgeHub` content must leave a valid route set (checked on the routes it carries).
fn check_edge_hub_routes(hub: &Hub, content: &Content) -> Result<(), DeployError> {
    let mut map = Map::new();
    let mut any = false;
    for (t, set) in &content.entries {
        if *t == Target::Module(crate::routing::EDGE_HUB.into()) {
            manifest::apply(&mut map, set);
            any = true;
        }
    }
    if !any {
        return Ok(());
    }
    hub.routing
        .build(&map)
        .map(|_| ())
        .map_err(|errors| DeployError::Invalid {
            field: "content.modulesContent.$edgeHub",
            message: errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        })
}

fn twin_key(device: &DeviceId, target: &Target) -> Option<IdentityKey> {
    match target {
        Target::Device => Some(IdentityKey::device(device.clone())),
        Target::Module(m) => Some(IdentityKey::module(
            device.clone(),
            crate::identity::ModuleId::new(m).ok()?,
        )),
    }
}

/// Whether the deployment's target condition matches a device.
fn targets(c: &Compiled, device: &crate::twin::view::Subject) -> bool {
    c.condition.matches(&device.view())
}

/// Whether the device reported applying the deployment's content: `Some(true)` for code 200,
/// `Some(false)` for 400 and above, both only for the desired version in force.
fn reported(hub: &Hub, c: &Compiled, device: &str) -> Option<bool> {
    let device = DeviceId::new(device).ok()?;
    let key = twin_key(&device, &c.reporting_target())?;
    let twin = hub.twins.get(&key);
    let r = &twin.reported.data;
    if r.get("lastDesiredVersion")?.as_u64()? != twin.desired.version {
        return None;
    }
    match r.get("lastDesiredStatus")?.get("code")?.as_u64()? {
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
pub async fn reconcile(hub: &Arc<Hub>, devices: Vec<DeviceId>) -> Result<usize, String> {
    let deployments = &hub.deployments;
    let _one = deployments.reconciling.lock().await;
    let all = deployments.all();
    let mut writes: Vec<(IdentityKey, Map<String, Value>)> = Vec::new();
    let mut states = Vec::new();
    for device in devices {
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
        for label in prev.owned.keys() {
            let t = if label.is_empty() {
                Target::Device
            } else {
                Target::Module(label.clone())
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
                if twin.desired.data.get(k) != Some(v) {
                    patch.insert(k.clone(), v.clone());
                }
            }
            for k in prev.owned.get(t.label()).into_iter().flatten() {
                if !want.contains_key(k) && twin.desired.data.contains_key(k) {
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
    let written = super::write_desired(hub, writes).await?;
    deployments.save_states(states).map_err(|e| e.to_string())?;
    Ok(written)
}

/// Per-deployment figures: system metrics and custom metrics, each with its devices.
pub fn status(hub: &Hub, c: &Compiled) -> Value {
    let mut targeted = Vec::new();
    let mut applied = Vec::new();
    let mut success = Vec::new();
    let mut failed = Vec::new();
    for device in super::all_devices(hub) {
        if targets(c, &hub.device_subject(&device)) {
            targeted.push(device.as_str().to_string());
        }
        let s = hub.deployments.device_state(device.as_str());
        if s.base.as_deref() == Some(&c.d.id) || s.layered.contains(&c.d.id) {
            applied.push(device.as_str().to_string());
            match reported(hub, c, device.as_str()) {
                Some(true) => success.push(device.as_str().to_string()),
                Some(false) => failed.push(device.as_str().to_string()),
                None => {}
            }
        }
    }
    let mut custom = Map::new();
    let targeted_set: HashSet<&str> = targeted.iter().map(String::as_str).collect();
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
        custom.insert(
            name.clone(),
            json!({ "count": ids.len(), "deviceIds": ids }),
        );
    }
    for ids in [&mut targeted, &mut applied, &mut success, &mut failed] {
        ids.sort();
    }
    let metric = |ids: &Vec<String>| json!({ "count": ids.len(), "deviceIds": ids });
    json!({
        "targetedCount": metric(&targeted),
        "appliedCount": metric(&applied),
        "reportedSuccessfulCount": metric(&success),
        "reportedFailedCount": metric(&failed),
        "custom": custom,
    })
}
