//! Group deployments (Azure Sphere): a set of images assigned to a device group.
//!
//! A new deployment for a group replaces the current one; all of them are kept as history.
//! Images are named by id (pinned) or `name:latest` (following the highest version), so
//! adding a new version of a followed image changes what the group's devices should run.
//! The effective state of a device is computed from its group, the group's current
//! deployment and the group's settings, and written to the twin's desired `groupDeployment`
//! property.

mod reconcile;
mod store;

pub use reconcile::{group_state, reconcile};
pub use store::{GroupDeployment, GroupDeployments};

/// The desired property group deployments own.
pub const DESIRED_KEY: &str = "groupDeployment";
