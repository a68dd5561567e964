//! `deployment`: targeted and layered deployments and their rollouts.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use serde_json::Value;

use super::{parse_json_arg, read_json, Ctx};
use crate::deploy::wire::{
    DeploymentSpec, DeploymentUpdate, DeploymentView, MetricsSpec, OnUnmatch, Rollout,
    RolloutStatus, SystemMetrics,
};

#[derive(Subcommand, Debug)]
pub enum DeploymentCmd {
    /// Create a deployment from an IoT Edge / IoT Hub manifest, as `az iot edge deployment
    /// create` takes it
    Create {
        id: String,
        /// The manifest: {"content": {"modulesContent": …}} or {"content": {"deviceContent": …}}
        #[arg(long)]
        content: PathBuf,
        /// The twin query WHERE condition over tags, reported properties, deviceId and
        /// deviceGroup ("*" for every device)
        #[arg(long)]
        target_condition: String,
        #[arg(long, default_value_t = 0)]
        priority: u32,
        /// Labels as a JSON object
        #[arg(long)]
        labels: Option<String>,
        /// Custom metrics file: {"queries": {"name": "SELECT deviceId FROM devices WHERE …"}}
        #[arg(long)]
        metrics: Option<PathBuf>,
        /// Add properties.desired.<path> values on top of the winning base deployment
        #[arg(long)]
        layered: bool,
        /// What a device that stops matching gets
        #[arg(long, value_enum, default_value_t = Unmatch::Fallback)]
        on_unmatch: Unmatch,
        /// Phased rollout as JSON: {"phases": [1, 10, 100], "successThreshold": 95,
        /// "failureThreshold": 5, "observeSecs": 60}
        #[arg(long)]
        rollout: Option<String>,
    },
    List,
    Show {
        id: String,
    },
    /// Change target condition, priority, labels or metrics (content is immutable)
    Update {
        id: String,
        #[arg(long)]
        target_condition: Option<String>,
        #[arg(long)]
        priority: Option<u32>,
        #[arg(long)]
        labels: Option<String>,
        #[arg(long)]
        metrics: Option<PathBuf>,
    },
    Delete {
        id: String,
    },
    /// A metric's count and the devices behind it (targetedCount, appliedCount,
    /// reportedSuccessfulCount, reportedFailedCount, or a custom metric)
    ShowMetric {
        id: String,
        metric: String,
    },
    /// Hold a phased rollout at its current phase
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Stop a phased rollout; the current phase's devices go back to what they had
    Abort {
        id: String,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Unmatch {
    Fallback,
    Keep,
    Remove,
}

impl From<Unmatch> for OnUnmatch {
    fn from(u: Unmatch) -> OnUnmatch {
        match u {
            Unmatch::Fallback => OnUnmatch::Fallback,
            Unmatch::Keep => OnUnmatch::Keep,
            Unmatch::Remove => OnUnmatch::Remove,
        }
    }
}

fn status_str(s: RolloutStatus) -> &'static str {
    match s {
        RolloutStatus::Running => "running",
        RolloutStatus::Paused => "paused",
        RolloutStatus::Completed => "completed",
        RolloutStatus::Aborted => "aborted",
    }
}

fn show(v: &DeploymentView) -> String {
    let d = &v.deployment;
    let count = |f: fn(&SystemMetrics) -> u64| v.system_metrics.as_ref().map(f).unwrap_or(0);
    let mut out = format!(
        "Deployment {} (priority {}{})\n  targetCondition: {}\n  targeted {}  applied {}  reportedSuccess {}  reportedFailed {}",
        d.id,
        d.priority,
        if d.layered { ", layered" } else { "" },
        d.target_condition,
        count(|m| m.targeted_count),
        count(|m| m.applied_count),
        count(|m| m.reported_successful_count),
        count(|m| m.reported_failed_count),
    );
    if let Some(r) = &d.rollout_state {
        out += &format!(
            "\n  rollout: {} at phase {} ({} devices in scope){}",
            status_str(r.status),
            r.phase + 1,
            r.members.len(),
            r.reason
                .as_deref()
                .map(|s| format!(": {s}"))
                .unwrap_or_default()
        );
    }
    for (k, c) in v.custom_metrics.iter().flatten() {
        out += &format!("\n  {k}: {c}");
    }
    out
}

impl DeploymentCmd {
    pub async fn run(&self, ctx: &Ctx) -> Result<()> {
        match self {
            DeploymentCmd::Create {
                id,
                content,
                target_condition,
                priority,
                labels,
                metrics,
                layered,
                on_unmatch,
                rollout,
            } => {
                let spec = DeploymentSpec {
                    id: id.clone(),
                    content: read_json::<Value>(content, "content")?,
                    target_condition: target_condition.clone(),
                    priority: *priority,
                    labels: match labels {
                        Some(l) => parse_json_arg::<BTreeMap<String, String>>(l, "--labels")?,
                        None => BTreeMap::new(),
                    },
                    metrics: match metrics {
                        Some(m) => read_json::<MetricsSpec>(m, "metrics")?,
                        None => MetricsSpec::default(),
                    },
                    layered: *layered,
                    on_unmatch: (*on_unmatch).into(),
                    rollout: rollout
                        .as_deref()
                        .map(|r| parse_json_arg::<Rollout>(r, "--rollout"))
                        .transpose()?,
                };
                let v = ctx.api.create_deployment(&spec).await?;
                ctx.print(&v, show);
            }
            DeploymentCmd::List => {
                let list = ctx.api.deployments().await?;
                ctx.print(&list, |l| {
                    let mut out = format!(
                        "{:<32} {:>8} {:<7} {:>8} {:>8} {:>8} {:>8}  TARGET",
                        "ID", "PRIORITY", "LAYERED", "TARGETED", "APPLIED", "SUCCESS", "FAILED"
                    );
                    for v in &l.items {
                        let d = &v.deployment;
                        let m = v.system_metrics.unwrap_or(SystemMetrics {
                            targeted_count: 0,
                            applied_count: 0,
                            reported_successful_count: 0,
                            reported_failed_count: 0,
                        });
                        out += &format!(
                            "\n{:<32} {:>8} {:<7} {:>8} {:>8} {:>8} {:>8}  {}",
                            d.id,
                            d.priority,
                            d.layered,
                            m.targeted_count,
                            m.applied_count,
                            m.reported_successful_count,
                            m.reported_failed_count,
                            d.target_condition
                        );
                    }
                    out
                });
            }
            DeploymentCmd::Show { id } => {
                let v = ctx.api.deployment(id).await?;
                ctx.print(&v, show);
            }
            DeploymentCmd::Update {
                id,
                target_condition,
                priority,
                labels,
                metrics,
            } => {
                let update = DeploymentUpdate {
                    target_condition: target_condition.clone(),
                    priority: *priority,
                    labels: labels
                        .as_deref()
                        .map(|l| parse_json_arg(l, "--labels"))
                        .transpose()?,
                    metrics: metrics
                        .as_deref()
                        .map(|m| read_json(m, "metrics"))
                        .transpose()?,
                    content: None,
                };
                let v = ctx.api.update_deployment(id, &update).await?;
                ctx.print(&v, show);
            }
            DeploymentCmd::Delete { id } => {
                ctx.api.delete_deployment(id).await?;
                ctx.deleted("deployment", id);
            }
            DeploymentCmd::ShowMetric { id, metric } => {
                let m = ctx.api.deployment_metric(id, metric).await?;
                ctx.print(&m, |m| {
                    let mut out = format!("{metric}: {}", m.count);
                    for d in &m.device_ids {
                        out += &format!("\n  {d}");
                    }
                    out
                });
            }
            DeploymentCmd::Pause { id }
            | DeploymentCmd::Resume { id }
            | DeploymentCmd::Abort { id } => {
                let action = match self {
                    DeploymentCmd::Pause { .. } => "pause",
                    DeploymentCmd::Resume { .. } => "resume",
                    _ => "abort",
                };
                let v = ctx.api.control_deployment(id, action).await?;
                ctx.print(&v, |v| {
                    format!(
                        "Rollout of {id}: {}",
                        v.deployment
                            .rollout_state
                            .as_ref()
                            .map(|r| status_str(r.status))
                            .unwrap_or("")
                    )
                });
            }
        }
        Ok(())
    }
}
