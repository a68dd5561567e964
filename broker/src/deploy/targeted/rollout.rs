//! Phased rollouts: which devices each phase takes (in a stable hashed order), and the
//! ticker's decision to advance or stop from the devices' reports.

use std::collections::HashSet;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::super::DeployError;
use super::compute::{reported, targets};
use super::spec::{Compiled, RolloutState, RolloutStatus};
use super::store::{now_ms, Deployments};
use crate::hub::Hub;

/// A device's place in rollout order: a hash of its id, so reruns pick the same canaries.
fn rollout_order(device: &str) -> (u64, String) {
    let d = Sha256::digest(device.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    (u64::from_be_bytes(b), device.to_string())
}

impl Deployments {
    /// Devices the deployment's condition matches, in rollout order.
    fn targeted_in_order(&self, hub: &Hub, c: &Compiled) -> Vec<String> {
        let mut v: Vec<(u64, String)> = super::super::all_devices(hub)
            .into_iter()
            .filter(|d| targets(c, &hub.device_subject(d)))
            .map(|d| rollout_order(d.as_str()))
            .collect();
        v.sort();
        v.into_iter().map(|(_, d)| d).collect()
    }

    /// Starts phase `phase`: its devices are the first `phases[phase]` percent of targets in
    /// rollout order (at least one while there are targets).
    pub(super) fn start_phase(
        &self,
        hub: &Hub,
        id: &str,
        phase: usize,
    ) -> Result<Arc<Compiled>, DeployError> {
        let c = self
            .get(id)
            .ok_or_else(|| DeployError::NotFound(format!("deployment '{id}'")))?;
        if c.d.rollout.is_none() || c.d.rollout_state.is_none() {
            return Ok(c);
        }
        // Read again on each attempt: another node may have paused, aborted or advanced it.
        self.modify(id, |c| self.next_phase(hub, c, phase))
    }

    /// The deployment with phase `phase` started, if its rollout is still where starting
    /// that phase makes sense (phase 0 of a new one, or the phase after a running one's).
    fn next_phase(
        &self,
        hub: &Hub,
        c: &Compiled,
        phase: usize,
    ) -> Result<super::spec::Deployment, DeployError> {
        let (Some(rollout), Some(state)) = (&c.d.rollout, &c.d.rollout_state) else {
            return Ok(c.d.clone());
        };
        if phase > 0 && (state.status != RolloutStatus::Running || state.phase + 1 != phase) {
            return Err(DeployError::Invalid {
                field: "rollout",
                message: format!("deployment '{}' changed meanwhile", c.d.id),
            });
        }
        let mut d = c.d.clone();
        let mut next = state.clone();
        if phase >= rollout.phases.len() {
            next.status = RolloutStatus::Completed;
            next.members.clear();
            next.phase_members.clear();
        } else {
            let targets = self.targeted_in_order(hub, c);
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
        Ok(d)
    }

    /// Pause, resume or abort a rollout (`abort` also works on a deployment mid-phase: the
    /// phase's devices go back to what they had).
    pub fn control(&self, id: &str, action: &str) -> Result<Arc<Compiled>, DeployError> {
        self.modify(id, |c| control(c, action))
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
            if n > 0 && failed > 0 && failed as f64 * 100.0 >= rollout.failure_threshold * n as f64
            {
                let reason = format!(
                    "phase {} ({}%): {failed} of {n} devices reported failure (threshold {}%)",
                    state.phase + 1,
                    rollout.phases[state.phase],
                    rollout.failure_threshold
                );
                let stopped = self.modify(&c.d.id, |now| {
                    // Only the phase this tick judged, if nobody paused or moved it since.
                    match &now.d.rollout_state {
                        Some(s) if s.status == RolloutStatus::Running && s.phase == state.phase => {
                            let mut d = now.d.clone();
                            let mut next = s.clone();
                            abort(&mut next, reason.clone());
                            d.rollout_state = Some(next);
                            Ok(d)
                        }
                        _ => Err(DeployError::Invalid {
                            field: "rollout",
                            message: "changed meanwhile".into(),
                        }),
                    }
                });
                if stopped.is_ok() {
                    tracing::warn!(deployment = %c.d.id, "rollout stopped: failure threshold passed");
                    changed.push(c.d.id.clone());
                }
                continue;
            }
            let observed =
                now_ms().saturating_sub(state.phase_started_ms) >= rollout.observe_secs * 1000;
            let succeeded = ok as f64 * 100.0 >= rollout.success_threshold * n as f64;
            if observed && succeeded && self.start_phase(hub, &c.d.id, state.phase + 1).is_ok() {
                tracing::info!(deployment = %c.d.id, phase = state.phase + 2, "rollout phase started");
                changed.push(c.d.id.clone());
            }
        }
        changed
    }
}

/// The deployment with `action` (pause, resume, abort) applied to its rollout.
fn control(c: &Compiled, action: &str) -> Result<super::spec::Deployment, DeployError> {
    let id = &c.d.id;
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
    Ok(d)
}

fn abort(state: &mut RolloutState, reason: String) {
    let failed: HashSet<String> = state.phase_members.iter().cloned().collect();
    state.members.retain(|m| !failed.contains(m));
    state.phase_members.clear();
    state.status = RolloutStatus::Aborted;
    state.reason = Some(reason);
}
