//! What a simulated fleet asks of the hub's management API, through the hub's own typed
//! client: identities (registered, or fetched when a rerun finds them), routes, desired
//! pushes, deployments followed to the end, and the hub's memory and CPU from `/metrics`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fleethub::api::wire::{
    CreateDevice, CreateModule, IdentityView, TwinPatch, TwinPatchProperties,
};
use fleethub::client::{ApiClient, ClientError};
use fleethub::deploy::wire::DeploymentSpec;
use fleethub::identity::IdentityKey;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::progress;
use crate::device::{Identity, Role};
use crate::stats::Stats;

/// The API client and the admin token (also the monitor's MQTT password).
pub struct HubApi {
    pub client: ApiClient,
    pub token: String,
}

impl HubApi {
    pub fn new(base: &str, token: &str) -> HubApi {
        HubApi {
            client: ApiClient::new(base, token),
            token: token.to_string(),
        }
    }

    /// Creates the identity, or fetches it when it exists (reruns reuse their fleet).
    async fn ensure(&self, device: &str, module: Option<&str>) -> Result<Identity> {
        let key = IdentityKey::parse(&match module {
            Some(m) => format!("{device}/{m}"),
            None => device.to_string(),
        })?;
        let created = match module {
            None => {
                let body = CreateDevice {
                    device_id: device.to_string(),
                    ..Default::default()
                };
                self.client.create_device(&body).await
            }
            Some(m) => {
                let body = CreateModule {
                    module_id: m.to_string(),
                    ..Default::default()
                };
                self.client.create_module(device, &body).await
            }
        };
        let view: IdentityView = match created {
            Ok(v) => v,
            Err(e) if e.status() == Some(reqwest::StatusCode::CONFLICT) => {
                self.client.identity(&key).await?
            }
            Err(e) => return Err(anyhow!("registering {key}: {e}")),
        };
        let primary = view.identity.authentication.symmetric_key.primary_key;
        if primary.is_empty() {
            bail!("{key}: no symmetric key (only SAS identities can be simulated)");
        }
        Ok(Identity {
            device: device.to_string(),
            module: module.map(str::to_string),
            key: primary,
        })
    }

    /// Registers identities with bounded concurrency, printing progress for big fleets.
    pub async fn register(
        self: &Arc<Self>,
        wanted: Vec<(String, Option<String>, Role)>,
    ) -> Result<Vec<(Identity, Role)>> {
        let total = wanted.len();
        progress(format!("registering {total} identities"));
        let permits = Arc::new(Semaphore::new(16));
        let mut out = Vec::with_capacity(total);
        let mut last = Instant::now();
        // Devices first: a module can only be created under a device that exists.
        let (devices, modules): (Vec<_>, Vec<_>) = wanted
            .into_iter()
            .enumerate()
            .partition(|(_, (_, module, _))| module.is_none());
        for phase in [devices, modules] {
            let mut set = JoinSet::new();
            for (n, (device, module, role)) in phase {
                let (api, permits) = (self.clone(), permits.clone());
                set.spawn(async move {
                    let _permit = permits.acquire_owned().await?;
                    let id = api.ensure(&device, module.as_deref()).await?;
                    Ok::<_, anyhow::Error>((n, id, role))
                });
            }
            while let Some(r) = set.join_next().await {
                out.push(r??);
                if last.elapsed() > Duration::from_secs(1) {
                    last = Instant::now();
                    progress(format!("  registered {}/{total}", out.len()));
                }
            }
        }
        out.sort_by_key(|(n, _, _)| *n);
        Ok(out.into_iter().map(|(_, id, role)| (id, role)).collect())
    }

    /// One of the hub's modules, registered (or fetched).
    pub async fn hub_module(&self, hub_id: &str, module: &str) -> Result<Identity> {
        self.ensure(hub_id, Some(module)).await
    }

    /// Replaces the routes in the hub's `$edgeHub` twin.
    pub async fn install_routes(&self, hub_id: &str, routes: &Value) -> Result<()> {
        let key = IdentityKey::parse(&format!("{hub_id}/$edgeHub"))?;
        let patch = TwinPatch {
            properties: Some(TwinPatchProperties {
                desired: Some(json!({ "routes": routes })),
                reported: None,
            }),
            ..Default::default()
        };
        self.client.patch_twin(&key, &patch, None).await?;
        Ok(())
    }

    /// A hub metric's value from its `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = self.client.metrics().await.ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    /// The hub's resident memory, in bytes.
    pub async fn memory(&self) -> Option<u64> {
        self.metric("fleethub_process_resident_memory_bytes")
            .await
            .map(|v| v as u64)
    }

    /// Creates a targeted deployment (replacing one with the same id from an earlier run)
    /// and follows it through the hub's status until every targeted device has reported, or
    /// its rollout completed or stopped. Returns what it saw, with the hub's CPU and memory
    /// meanwhile.
    pub async fn follow_deployment(
        &self,
        id: &str,
        body: Value,
        stats: &Arc<Stats>,
    ) -> Result<Value> {
        let spec: DeploymentSpec =
            serde_json::from_value(body).context("the scenario's deployment")?;
        match self.client.delete_deployment(id).await {
            Ok(()) => {}
            Err(ClientError::Api { status, .. }) if status == reqwest::StatusCode::NOT_FOUND => {}
            Err(e) => return Err(e.into()),
        }
        let cpu0 = self.metric("fleethub_process_cpu_seconds_total").await;
        progress(format!("creating deployment {id}"));
        let started = Instant::now();
        if let Ok(mut s) = stats.push_started.lock() {
            *s = Some(started);
        }
        let created = self.client.create_deployment(&spec).await?;
        let created_ms = started.elapsed().as_secs_f64() * 1000.0;
        let targeted = created
            .system_metrics
            .map(|m| m.targeted_count)
            .unwrap_or(0);
        progress(format!(
            "deployment {id}: {targeted} devices targeted, twins written in {created_ms:.0} ms"
        ));
        let mut peak_rss = 0u64;
        let deadline = started + Duration::from_secs(300);
        let (done_ms, last) = loop {
            if let Some(rss) = self.memory().await {
                peak_rss = peak_rss.max(rss);
            }
            let v = self.client.deployment(id).await?;
            let (ok, failed) = v
                .system_metrics
                .map(|m| (m.reported_successful_count, m.reported_failed_count))
                .unwrap_or((0, 0));
            let rollout = v.deployment.rollout_state.as_ref().map(|r| json!(r.status));
            let running = rollout.as_ref() == Some(&json!("running"));
            let aborted = rollout.as_ref() == Some(&json!("aborted"));
            let all_reported = targeted > 0 && ok + failed >= targeted && !running;
            if all_reported || aborted || Instant::now() > deadline {
                break (started.elapsed().as_secs_f64() * 1000.0, v);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let cpu1 = self.metric("fleethub_process_cpu_seconds_total").await;
        let wall = started.elapsed().as_secs_f64();
        let rollout = last.deployment.rollout_state.as_ref();
        Ok(json!({
            "id": id,
            "targeted": targeted,
            "twins_written_ms": created_ms,
            "all_reported_ms": done_ms,
            "system_metrics": last.system_metrics,
            "rollout": rollout.map(|r| json!(r.status)),
            "rollout_reason": rollout.and_then(|r| r.reason.clone()),
            "hub_cpu_percent": match (cpu0, cpu1) {
                (Some(a), Some(b)) => json!((b - a) / wall * 100.0),
                _ => Value::Null,
            },
            "hub_peak_rss_bytes": peak_rss,
        }))
    }

    /// Patches every device's desired properties through the API, concurrently.
    pub async fn push_desired(
        self: &Arc<Self>,
        devices: &[String],
        props: Value,
        stats: &Arc<Stats>,
    ) {
        progress(format!(
            "pushing desired {props} to {} devices",
            devices.len()
        ));
        if let Ok(mut s) = stats.push_started.lock() {
            *s = Some(Instant::now());
        }
        let permits = Arc::new(Semaphore::new(32));
        let mut set = JoinSet::new();
        for d in devices {
            let (api, permits, stats, props) =
                (self.clone(), permits.clone(), stats.clone(), props.clone());
            let device = d.clone();
            set.spawn(async move {
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                let Ok(key) = IdentityKey::parse(&device) else {
                    stats.errors.inc();
                    return;
                };
                let patch = TwinPatch {
                    properties: Some(TwinPatchProperties {
                        desired: Some(props),
                        reported: None,
                    }),
                    ..Default::default()
                };
                if api.client.patch_twin(&key, &patch, None).await.is_err() {
                    stats.errors.inc();
                }
            });
        }
        while set.join_next().await.is_some() {}
    }
}
