//! Deployments: what the hub wants each device to run, written into device twins.
//!
//! Two kinds, each in its own folder:
//! - [`group`]: **group deployments** (Azure Sphere): images assigned to a device group,
//!   written to the desired `groupDeployment` property of the group's devices;
//! - [`targeted`]: **targeted and layered deployments** (IoT Hub configurations, IoT Edge
//!   deployments at scale) with phased rollouts and the `onUnmatch` policy;
//! - [`manifest`]: the deployment content format both read;
//! - [`http`] and [`wire`]: their API resources and bodies, mounted into the API by the
//!   server.
//!
//! Each kind has a store that knows no hub and an engine part above it. The [`Engine`]
//! holds both stores and hears of device changes through the hub's [`ChangeObserver`]
//! interface, so the hub imports nothing from here. Twins are written through the hub's one
//! twin-write path, only where the computed value differs, so versions move only when
//! content changes. After a crash the hub reconciles every device at start, so an
//! acknowledged deployment always reaches its devices.

pub mod group;
pub mod http;
pub mod manifest;
pub mod targeted;
pub mod wire;

use std::sync::Arc;

use crate::storage::Store;
use serde_json::{Map, Value};

use crate::hub::{
    Change, ChangeError, ChangeFuture, ChangeObserver, Hub, TwinWrite, TwinWriteError,
};
use crate::identity::{DeviceId, IdentityKey};
use crate::images::ImageError;

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// `$edgeHub` content that would leave the hub's route set invalid.
    #[error("route set refused: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    InvalidRoutes(Vec<fleethub_router::route::RouteError>),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("store: {0}")]
    Store(String),
    /// Changed on another cluster node meanwhile (read again and retried where it can be).
    #[error("{0}")]
    Changed(String),
    #[error("twin write: {0}")]
    Twin(#[from] TwinWriteError),
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

/// Both kinds of deployment, and what keeps devices in line with them.
pub struct Engine {
    pub groups: group::GroupDeployments,
    pub targeted: targeted::Deployments,
}

impl Engine {
    pub fn open(db: Arc<Store>) -> Result<Engine, DeployError> {
        Ok(Engine {
            groups: group::GroupDeployments::open(db.clone())?,
            targeted: targeted::Deployments::open(db)?,
        })
    }

    /// Brings the group deployment state of these devices up to date.
    pub async fn reconcile_groups(
        &self,
        hub: &Arc<Hub>,
        devices: Vec<DeviceId>,
    ) -> Result<usize, DeployError> {
        group::reconcile(hub, &self.groups, devices).await
    }

    /// Brings the targeted deployment state of these devices up to date.
    pub async fn reconcile_targeted(
        &self,
        hub: &Arc<Hub>,
        devices: Vec<DeviceId>,
    ) -> Result<usize, DeployError> {
        targeted::reconcile(hub, &self.targeted, devices).await
    }

    async fn changed(&self, hub: Arc<Hub>, change: Change) -> Result<usize, DeployError> {
        match change {
            // A group change or a start may move both kinds.
            Change::Moved(device) => self.reconcile_all_kinds(&hub, vec![device]).await,
            Change::Start => self.reconcile_all_kinds(&hub, all_devices(&hub)).await,
            // A new identity has no group yet: a new device may be targeted, a new module may
            // be a deployment's target twin; tags and reported properties select deployments.
            Change::Registered(device) | Change::Twin(device) => {
                if self.targeted.is_empty() {
                    return Ok(0);
                }
                self.reconcile_targeted(&hub, vec![device]).await
            }
            Change::Reported(devices) => {
                if self.targeted.is_empty() {
                    return Ok(0);
                }
                self.reconcile_targeted(&hub, devices).await
            }
            // Application updates on or off changes what the group's devices should run.
            Change::GroupChanged { group_id } => {
                let devices = devices_in_group(&hub, &group_id);
                self.reconcile_groups(&hub, devices).await
            }
            Change::GroupDeleted { group_id } => {
                self.groups.forget_group(&group_id)?;
                Ok(0)
            }
            // Groups following `name:latest` now want the new version.
            Change::ImageAdded { name } => {
                let mut written = 0;
                for group_id in self.groups.groups_following(&name) {
                    let devices = devices_in_group(&hub, &group_id);
                    written += self.reconcile_groups(&hub, devices).await?;
                }
                Ok(written)
            }
        }
    }

    async fn reconcile_all_kinds(
        &self,
        hub: &Arc<Hub>,
        devices: Vec<DeviceId>,
    ) -> Result<usize, DeployError> {
        let a = self.reconcile_groups(hub, devices.clone()).await?;
        let b = self.reconcile_targeted(hub, devices).await?;
        Ok(a + b)
    }
}

/// The engine behind an `Arc`, as the hub holds it.
pub struct Observer(pub Arc<Engine>);

impl ChangeObserver for Observer {
    fn changed(&self, hub: Arc<Hub>, change: Change) -> ChangeFuture {
        let engine = self.0.clone();
        Box::pin(async move {
            engine
                .changed(hub, change)
                .await
                .map_err(|e| ChangeError(Box::new(e)))
        })
    }
}

/// Writes deployment-owned desired properties through the hub's twin-write path, each
/// top-level key replaced whole (`null` removes it). A write the route rule refuses (content
/// that would leave the `$edgeHub` route set invalid) is skipped with a warning and counted,
/// and the others go on. At most 512 writes are in flight: the twin store group-commits
/// whatever is waiting. Returns how many twins were written.
pub(crate) async fn write_desired(
    hub: &Arc<Hub>,
    writes: Vec<(IdentityKey, Map<String, Value>)>,
) -> Result<usize, DeployError> {
    let mut written = 0;
    let mut pending = tokio::task::JoinSet::new();
    let mut outcome = |r: Result<
        (IdentityKey, Result<(), TwinWriteError>),
        tokio::task::JoinError,
    >| {
        match r {
            Ok((_, Ok(()))) => {
                written += 1;
                Ok(())
            }
            Ok((key, Err(TwinWriteError::InvalidRoutes(errors)))) => {
                hub.metrics.deployment_writes_refused.inc();
                tracing::warn!(
                    identity = %key,
                    errors = ?errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                    "deployment content refused: it would leave an invalid route set; the table in force stays"
                );
                Ok(())
            }
            Ok((_, Err(e))) => Err(DeployError::Twin(e)),
            Err(e) => Err(DeployError::Store(format!("twin write task: {e}"))),
        }
    };
    for (key, patch) in writes {
        let write = hub.write_twin(key.clone(), TwinWrite::Deployment(patch));
        pending.spawn(async move { (key, write.await.map(|_| ())) });
        while pending.len() >= 512 {
            if let Some(r) = pending.join_next().await {
                outcome(r)?;
            }
        }
    }
    while let Some(r) = pending.join_next().await {
        outcome(r)?;
    }
    Ok(written)
}

/// Devices in a group.
pub fn devices_in_group(hub: &Hub, group_id: &str) -> Vec<DeviceId> {
    hub.registry
        .identities()
        .iter()
        .filter(|i| i.module_id.is_none() && i.device_group_id.as_deref() == Some(group_id))
        .map(|i| i.device_id.clone())
        .collect()
}

/// Every device (the start-up reconcile).
pub fn all_devices(hub: &Hub) -> Vec<DeviceId> {
    hub.registry
        .identities()
        .iter()
        .filter(|i| i.module_id.is_none())
        .map(|i| i.device_id.clone())
        .collect()
}

/// Runs phased rollouts until `stop` turns true: every half second, advances or stops them
/// from their devices' reports, and reconciles every device when a rollout's scope changed.
pub async fn run_rollouts(
    hub: Arc<Hub>,
    engine: Arc<Engine>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        ticks += 1;
        // Every 5 s: the deployment gauges (a status reads every targeted device's twin).
        if ticks % 10 == 1 {
            let (h, e) = (hub.clone(), engine.clone());
            let _ = tokio::task::spawn_blocking(move || {
                let counts: Vec<(String, [u64; 4])> = e
                    .targeted
                    .all()
                    .iter()
                    .map(|c| {
                        let m = targeted::status(&h, &e.targeted, c).system_metrics();
                        (
                            c.d.id.clone(),
                            [
                                m.targeted_count,
                                m.applied_count,
                                m.reported_successful_count,
                                m.reported_failed_count,
                            ],
                        )
                    })
                    .collect();
                h.metrics.observe_deployments(&counts);
            })
            .await;
        }
        if engine.targeted.is_empty() {
            continue;
        }
        let (h, e) = (hub.clone(), engine.clone());
        let changed = tokio::task::spawn_blocking(move || e.targeted.tick(&h))
            .await
            .unwrap_or_default();
        if !changed.is_empty() {
            if let Err(e) = engine.reconcile_targeted(&hub, all_devices(&hub)).await {
                tracing::warn!(error = %e, "reconciling after a rollout step");
            }
        }
    }
}
