//! What a group's devices should run (the `groupDeployment` desired property), and the
//! reconcile that writes it where it differs.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::super::DeployError;
use super::{GroupDeployments, DESIRED_KEY};
use crate::hub::Hub;
use crate::identity::{DeviceId, IdentityKey};
use crate::images::ImageKind;

/// The `groupDeployment` value a device should have, or `None` when its group has no
/// deployment (or it is in no group).
pub fn group_state(hub: &Hub, groups: &GroupDeployments, device: &DeviceId) -> Option<Value> {
    let identity = hub.registry.get(&IdentityKey::device(device.clone()))?;
    let group = hub
        .fleet
        .group_by_id(identity.device_group_id.as_deref()?)?;
    let deployment = groups.current(&group.id)?;
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
pub async fn reconcile(
    hub: &Arc<Hub>,
    groups: &GroupDeployments,
    devices: Vec<DeviceId>,
) -> Result<usize, DeployError> {
    let mut writes = Vec::new();
    for device in devices {
        let key = IdentityKey::device(device.clone());
        if hub.registry.get(&key).is_none() {
            continue;
        }
        let want = group_state(hub, groups, &device);
        let twin = hub.twins.get(&key);
        if twin.desired.get(DESIRED_KEY) == want {
            continue;
        }
        let mut patch = Map::new();
        patch.insert(DESIRED_KEY.to_string(), want.unwrap_or(Value::Null));
        writes.push((key, patch));
    }
    super::super::write_desired(hub, writes).await
}
