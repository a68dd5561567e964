//! The deployment resources' request and response bodies, shared by their handlers
//! ([`super::http`]) and the API client, as [`crate::api::wire`] is for the rest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use super::group::GroupDeployment;
pub use super::targeted::{
    Deployment, DeploymentSpec, DeploymentUpdate, MetricsSpec, OnUnmatch, Rollout, RolloutStatus,
};
use crate::images::ImageKind;

/// `POST .../groups/{g}/deployments`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateGroupDeployment {
    /// Image ids, `name:X.Y.Z` or `name:latest`.
    pub images: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupDeploymentView {
    #[serde(flatten)]
    pub deployment: GroupDeployment,
    /// `Product/Group`.
    pub device_group: Option<String>,
    /// The images the references resolve to now.
    pub resolved: Vec<ResolvedImage>,
    /// Whether it is the group's deployment in force.
    pub current: bool,
    /// Devices whose twins changed (creation only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices_updated: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResolvedImage {
    pub id: String,
    pub name: String,
    pub version: String,
    pub kind: ImageKind,
}

/// A deployment with its figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentView {
    #[serde(flatten)]
    pub deployment: Deployment,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_metrics: Option<SystemMetrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_metrics: Option<BTreeMap<String, u64>>,
    /// Twins written by the request (creation only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twins_written: Option<usize>,
    /// With `?summary=true`: how many devices the rollout's lists held (they are left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_members: Option<RolloutMembers>,
}

/// The lengths of a rollout's member lists.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutMembers {
    pub members: usize,
    pub phase_members: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemMetrics {
    pub targeted_count: u64,
    pub applied_count: u64,
    pub reported_successful_count: u64,
    pub reported_failed_count: u64,
}

/// One metric of a deployment and the devices behind it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricView {
    pub deployment: String,
    pub metric: String,
    pub count: u64,
    pub device_ids: Vec<String>,
}
