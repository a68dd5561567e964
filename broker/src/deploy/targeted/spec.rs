//! What a targeted deployment is: the API's spec, the stored record, and the compiled
//! form (condition, content and metric queries parsed once).

use std::collections::{BTreeMap, HashSet};

use fleethub_router::condition::query::Query;
use fleethub_router::condition::Condition;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::super::manifest::{Content, Target};
use super::super::DeployError;
use crate::registry::now_rfc3339;

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
    pub(super) condition: Condition,
    pub(super) content: Content,
    pub(super) metrics: Vec<(String, Query)>,
    members: HashSet<String>,
}

impl Compiled {
    pub(super) fn new(d: Deployment) -> Result<Compiled, DeployError> {
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
    pub(super) fn rank(&self) -> (u32, u64) {
        (self.d.priority, self.d.sequence)
    }

    /// Whether the rollout (if any) includes the device.
    pub(super) fn in_scope(&self, device: &str) -> bool {
        match &self.d.rollout_state {
            None => true,
            Some(r) if r.status == RolloutStatus::Completed => true,
            Some(_) => self.members.contains(device),
        }
    }

    /// The twin whose reported `lastDesiredStatus` tells how applying went.
    pub(super) fn reporting_target(&self) -> Target {
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
    #[serde(default, skip_serializing_if = "Owned::is_empty")]
    pub owned: Owned,
}

/// Deployment-owned desired keys per target, sorted by target. A sorted vector rather than
/// a `BTreeMap`: every device a deployment reaches keeps one, nearly always with a single
/// target, and a B-tree's first node takes about 500 bytes however little it holds (5 MB
/// at 10,000 devices). Stored as the same JSON map.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Owned(Vec<(String, Vec<String>)>);

impl Owned {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The keys owned on `target` ("" for the device twin).
    pub fn get(&self, target: &str) -> Option<&Vec<String>> {
        self.0
            .binary_search_by(|(t, _)| t.as_str().cmp(target))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// The targets, in order.
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(t, _)| t.as_str())
    }
}

impl FromIterator<(String, Vec<String>)> for Owned {
    /// Sorted by target; of two entries for one target the last wins, as in a map.
    fn from_iter<I: IntoIterator<Item = (String, Vec<String>)>>(iter: I) -> Owned {
        let map: BTreeMap<String, Vec<String>> = iter.into_iter().collect();
        Owned(map.into_iter().collect())
    }
}

impl Serialize for Owned {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(t, keys)| (t, keys)))
    }
}

impl<'de> Deserialize<'de> for Owned {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Owned, D::Error> {
        let map = BTreeMap::<String, Vec<String>>::deserialize(deserializer)?;
        Ok(Owned(map.into_iter().collect()))
    }
}

/// Fields a deployment may change after creation (content never does).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeploymentUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_condition: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsSpec>,
    /// Present only to be refused with a clear message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Value>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSpec {
    #[serde(default)]
    pub queries: BTreeMap<String, String>,
}

/// A new deployment as the API takes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

impl Compiled {
    /// Checks and compiles a new deployment (not yet stored: its sequence is 0). Every
    /// error names its field.
    pub fn from_spec(spec: DeploymentSpec) -> Result<Compiled, DeployError> {
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
            id: spec.id,
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
        Compiled::new(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device's state is stored as before `owned` became a vector: a map by target.
    #[test]
    fn device_state_keeps_its_stored_form() {
        let stored = serde_json::json!({
            "base": "d1",
            "owned": {"": ["config"], "filter": ["a", "b"]},
        });
        let state: DeviceState = serde_json::from_value(stored.clone()).unwrap();
        assert_eq!(state.owned.get(""), Some(&vec!["config".to_string()]));
        assert_eq!(state.owned.targets().collect::<Vec<_>>(), ["", "filter"]);
        assert_eq!(serde_json::to_value(&state).unwrap(), stored);
        // The last of two entries for one target wins, as in a map.
        let owned: Owned = [
            ("m".to_string(), vec!["x".to_string()]),
            ("".to_string(), vec![]),
            ("m".to_string(), vec!["y".to_string()]),
        ]
        .into_iter()
        .collect();
        assert_eq!(owned.get("m"), Some(&vec!["y".to_string()]));
        assert_eq!(owned.targets().collect::<Vec<_>>(), ["", "m"]);
    }
}
