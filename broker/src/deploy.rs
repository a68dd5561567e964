//! Deployments: what the hub wants each device to run, written into device twins.
//!
//! **Group deployments** (Azure Sphere): a set of images assigned to a device group. A new
//! deployment for a group replaces the current one; all of them are kept as history. Images
//! are named by id (pinned) or `name:latest` (following the highest version), so adding a new
//! version of a followed image changes what the group's devices should run.
//!
//! The effective state of a device is computed from its group, the group's current
//! deployment and the group's settings (a group with application updates off gets only
//! board configurations), and written to the twin's desired `groupDeployment` property; the
//! hub pushes it like any desired change, and the retained desired document lets devices that
//! connect later converge. Writing happens only when the computed value differs from the
//! twin's, so versions move only when content changes. After a crash the hub reconciles every
//! device at start, so an acknowledged deployment always reaches its devices.

pub mod manifest;
pub mod targeted;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::hub::Hub;
use crate::identity::{DeviceId, IdentityKey};
use crate::images::{ImageError, ImageKind};
use crate::registry::now_rfc3339;

/// Key: deployment id (GUID). Value: JSON [`GroupDeployment`].
const GROUP_DEPLOYMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("group_deployments");

/// The desired property group deployments own.
pub const DESIRED_KEY: &str = "groupDeployment";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeployError {
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("store: {0}")]
    Store(String),
}

crate::storage::store_errors!(DeployError);

impl From<ImageError> for DeployError {
    fn from(e: ImageError) -> Self {
        match e {
            ImageError::NotFound(what) => DeployError::NotFound(what),
            ImageError::Invalid { field, message } => DeployError::Invalid { field, message },
            other => DeployError::Store(other.to_string()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupDeployment {
    pub id: String,
    pub group_id: String,
    /// As given: image ids (pinned), `name:X.Y.Z` (resolved to an id at creation) or
    /// `name:latest` (kept, resolved whenever the state is computed).
    pub images: Vec<String>,
    pub created_time: String,
    /// Creation order, so "newest" never depends on clock resolution.
    pub sequence: u64,
}

pub struct GroupDeployments {
    db: Arc<Database>,
    by_id: RwLock<BTreeMap<String, GroupDeployment>>,
    writer: Mutex<()>,
}

impl GroupDeployments {
    pub fn open(db: Arc<Database>) -> Result<GroupDeployments, DeployError> {
        {
            let tx = db.begin_write()?;
            tx.open_table(GROUP_DEPLOYMENTS)?;
            tx.commit()?;
        }
        let mut by_id = BTreeMap::new();
        {
            let tx = db.begin_read()?;
            for row in tx.open_table(GROUP_DEPLOYMENTS)?.iter()? {
                let (k, v) = row?;
                by_id.insert(k.value().to_string(), serde_json::from_slice(v.value())?);
            }
        }
        Ok(GroupDeployments {
            db,
            by_id: RwLock::new(by_id),
            writer: Mutex::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, GroupDeployment>> {
        self.by_id.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A group's deployments, newest first; the first is the one in force.
    pub fn history(&self, group_id: &str) -> Vec<GroupDeployment> {
        let mut v: Vec<GroupDeployment> = self
            .read()
            .values()
            .filter(|d| d.group_id == group_id)
            .cloned()
            .collect();
        v.sort_by_key(|d| std::cmp::Reverse(d.sequence));
        v
    }

    pub fn current(&self, group_id: &str) -> Option<GroupDeployment> {
        self.history(group_id).into_iter().next()
    }

    /// Records a new deployment for a group (replacing the current one). Every image
    /// reference must resolve now; exact versions are pinned to their ids.
    pub fn create(
        &self,
        hub: &Hub,
        group_id: &str,
        refs: &[String],
    ) -> Result<GroupDeployment, DeployError> {
        if refs.is_empty() {
            return Err(DeployError::Invalid {
                field: "images",
                message: "a deployment names at least one image".into(),
            });
        }
        let mut images = Vec::with_capacity(refs.len());
        for r in refs {
            let image = hub.images.resolve(r)?;
            images.push(if r.ends_with(":latest") {
                r.clone()
            } else {
                image.id
            });
        }
        images.dedup();
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let sequence = self.read().values().map(|d| d.sequence).max().unwrap_or(0) + 1;
        let d = GroupDeployment {
            id: crate::fleet::new_guid(),
            group_id: group_id.to_string(),
            images,
            created_time: now_rfc3339(),
            sequence,
        };
        let tx = self.db.begin_write()?;
        tx.open_table(GROUP_DEPLOYMENTS)?
            .insert(d.id.as_str(), serde_json::to_vec(&d)?.as_slice())?;
        tx.commit()?;
        self.by_id
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(d.id.clone(), d.clone());
        Ok(d)
    }

    /// Forgets a deleted group's deployments.
    pub fn forget_group(&self, group_id: &str) -> Result<(), DeployError> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let ids: Vec<String> = self.history(group_id).into_iter().map(|d| d.id).collect();
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(GROUP_DEPLOYMENTS)?;
            for id in &ids {
                t.remove(id.as_str())?;
            }
        }
        tx.commit()?;
        let mut map = self.by_id.write().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            map.remove(&id);
        }
        Ok(())
    }

    /// Groups whose deployment in force follows `name:latest`.
    pub fn groups_following(&self, name: &str) -> Vec<String> {
        let latest = format!("{name}:latest");
        let groups: std::collections::BTreeSet<String> =
            self.read().values().map(|d| d.group_id.clone()).collect();
        groups
            .into_iter()
            .filter(|g| self.current(g).is_some_and(|d| d.images.contains(&latest)))
            .collect()
    }
}

/// The `groupDeployment` value a device should have, or `None` when its group has no
/// deployment (or it is in no group).
pub fn group_state(hub: &Hub, device: &DeviceId) -> Option<Value> {
    let identity = hub.registry.get(&IdentityKey::device(device.clone()))?;
    let group = hub
        .fleet
        .group_by_id(identity.device_group_id.as_deref()?)?;
    let deployment = hub.group_deployments.current(&group.id)?;
    let mut images: Vec<Value> = deployment
        .images
        .iter()
        .filter_map(|r| hub.images.resolve(r).ok())
        .filter(|i| group.application_updates || i.kind != ImageKind::Application)
        .map(|i| {
            json!({
                "id": i.id,
                "name": i.name,
                "version": i.version,
                "kind": i.kind,
                "size": i.size,
            })
        })
        .collect();
    images.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Some(json!({
        "deploymentId": deployment.id,
        "deviceGroup": hub.fleet.path_of(&group.id).unwrap_or_default(),
        "applicationUpdates": group.application_updates,
        "osFeed": group.os_feed,
        "images": images,
    }))
}

/// Brings these devices' twins to their computed deployment state, writing (and pushing)
/// only what differs. Returns how many twins changed.
pub async fn reconcile(hub: &Arc<Hub>, devices: Vec<DeviceId>) -> Result<usize, String> {
    let mut writes = Vec::new();
    for device in devices {
        let key = IdentityKey::device(device.clone());
        if hub.registry.get(&key).is_none() {
            continue;
        }
        let want = group_state(hub, &device);
        let twin = hub.twins.get(&key);
        if twin.desired.data.get(DESIRED_KEY) == want.as_ref() {
            continue;
        }
        let mut patch = Map::new();
        patch.insert(DESIRED_KEY.to_string(), want.unwrap_or(Value::Null));
        writes.push((key, patch));
    }
    write_desired(hub, writes).await
}

/// Writes deployment-owned desired properties, each top-level key replaced whole (so nothing
/// of an earlier deployment's value lingers; `null` removes it), pushes each change to its
/// identity, and rebuilds the route table when the hub's own `$edgeHub` twin changed. At most
/// 512 writes are in flight: the twin store group-commits whatever is waiting. Returns how
/// many twins were written.
pub(crate) async fn write_desired(
    hub: &Arc<Hub>,
    writes: Vec<(IdentityKey, Map<String, Value>)>,
) -> Result<usize, String> {
    let written = writes.len();
    let mut pending = tokio::task::JoinSet::new();
    for (key, patch) in writes {
        let hub = hub.clone();
        pending.spawn(async move {
            let applied = hub
                .twins
                .apply(key.clone(), crate::twin::TwinOp::ReplaceDesired(patch))
                .await
                .map_err(|e| format!("{key}: {e}"))?;
            if applied.desired_patch.is_some() {
                hub.publish_desired(&key, &applied.twin, applied.desired_patch.as_ref());
            }
            let edge_hub = key.device == hub.config.hub_id
                && key
                    .module
                    .as_ref()
                    .is_some_and(|m| m.as_str() == crate::routing::EDGE_HUB);
            if edge_hub {
                match hub.routing.build(&applied.twin.desired.data) {
                    Ok(table) => {
                        hub.routing.swap(table);
                        tracing::info!("route table replaced by a deployment's $edgeHub content");
                    }
                    Err(errors) => tracing::warn!(
                        errors = ?errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                        "a deployment's $edgeHub content left an invalid route set; the table in force stays"
                    ),
                }
            }
            Ok::<_, String>(())
        });
        while pending.len() >= 512 {
            if let Some(r) = pending.join_next().await {
                r.map_err(|e| e.to_string())??;
            }
        }
    }
    while let Some(r) = pending.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    Ok(written)
}

/// Devices in a group.
pub fn devices_in_group(hub: &Hub, group_id: &str) -> Vec<DeviceId> {
    hub.registry
        .identities()
        .iter()
        .filter(|i| i.module_id.is_none() && i.device_group_id.as_deref() == Some(group_id))
        .filter_map(|i| DeviceId::new(&i.device_id).ok())
        .collect()
}

/// Every device (the start-up reconcile).
pub fn all_devices(hub: &Hub) -> Vec<DeviceId> {
    hub.registry
        .identities()
        .iter()
        .filter(|i| i.module_id.is_none())
        .filter_map(|i| DeviceId::new(&i.device_id).ok())
        .collect()
}

/// Something about these devices changed (group, tags, reported properties, registration):
/// brings both kinds of deployment state up to date for them.
pub async fn devices_changed(hub: &Arc<Hub>, devices: Vec<DeviceId>) -> Result<usize, String> {
    let a = reconcile(hub, devices.clone()).await?;
    let b = targeted::reconcile(hub, devices).await?;
    Ok(a + b)
}

/// Runs phased rollouts: every half second, advances or stops them from their devices'
/// reports, and reconciles every device when a rollout's scope changed.
pub fn spawn_rollouts(hub: Arc<Hub>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            tick.tick().await;
            if hub.deployments.is_empty() {
                continue;
            }
            let h = hub.clone();
            let changed = tokio::task::spawn_blocking(move || h.deployments.tick(&h))
                .await
                .unwrap_or_default();
            if !changed.is_empty() {
                if let Err(e) = targeted::reconcile(&hub, all_devices(&hub)).await {
                    tracing::warn!(error = %e, "reconciling after a rollout step");
                }
            }
        }
    });
}
