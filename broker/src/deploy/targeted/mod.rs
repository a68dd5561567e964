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

//!
//! Files: `spec` (what a deployment is), `store` (where deployments and device states are
//! kept; knows no hub), `rollout` (phases), `compute` (what a device should carry, and
//! the reconcile that writes it).

mod compute;
mod rollout;
mod spec;
mod store;

use std::sync::Arc;

use serde_json::Map;

pub use compute::{reconcile, status, DeploymentStatus};
pub use spec::{
    Compiled, Deployment, DeploymentSpec, DeploymentUpdate, DeviceState, MetricsSpec, OnUnmatch,
    Rollout, RolloutState, RolloutStatus, MAX_METRICS,
};
pub use store::{Deployments, Table};

use super::DeployError;
use crate::hub::{Hub, TwinWrite};

/// Validates and records a deployment, and starts its first rollout phase. `$edgeHub`
/// content that would leave the hub's route set invalid is refused whole, exactly as the
/// same change through the twin API is.
pub fn create(
    hub: &Hub,
    deployments: &Deployments,
    spec: DeploymentSpec,
) -> Result<Arc<Compiled>, DeployError> {
    // Parse everything before taking any lock: errors come back whole and early.
    let compiled = Compiled::from_spec(spec)?;
    check_routes(hub, &compiled)?;
    let c = deployments.insert(compiled)?;
    if c.d.rollout.is_some() {
        return deployments.start_phase(hub, &c.d.id, 0);
    }
    Ok(c)
}

/// The deployment's content for the hub's route twin, applied to that twin as a deployment
/// write would, must build a valid route table.
fn check_routes(hub: &Hub, c: &Compiled) -> Result<(), DeployError> {
    let route_twin = hub.routing.route_twin();
    let mut keys = Map::new();
    for (target, set) in &c.content.entries {
        if compute::twin_key(&route_twin.device, target).as_ref() == Some(route_twin) {
            super::manifest::apply(&mut keys, set);
        }
    }
    if keys.is_empty() {
        return Ok(());
    }
    match hub.routes_after(route_twin, &TwinWrite::Deployment(keys)) {
        Some(Err(errors)) => Err(DeployError::InvalidRoutes(errors)),
        _ => Ok(()),
    }
}
