//! `device-sim run`: a simulated fleet against a running hub.
//!
//! The run goes: read the scenario and check it whole; find the hub (API URL and token from
//! the flags, the environment or the hub's data directory, as the `fleethub` CLI does);
//! register the identities (or read connection strings); install the scenario's hub modules and
//! routes; connect the fleet at the connect rate; send telemetry for the duration, with desired
//! pushes and upstream outages on schedule; drain; print the summary.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::device::{self, Ctx, Identity, Role, SENT_PROPERTY};
use crate::outage::UpstreamSim;
use crate::scenario::{Overrides, Plan, Scenario};
use crate::stats::Stats;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Scenario file (config/scenarios/*.toml); without one, the defaults below
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Simulated devices (overrides the scenario)
    #[arg(long)]
    devices: Option<usize>,
    /// Simulated modules under each device (overrides the scenario)
    #[arg(long)]
    modules_per_device: Option<usize>,
    /// Telemetry per device and per device module: "2/s", "30/min", or a number per second
    #[arg(long)]
    rate: Option<String>,
    /// How long each device sends: "30s", "5m"
    #[arg(long)]
    duration: Option<String>,
    /// Management API base URL [default: from DATA_DIR/endpoints.json, else http://127.0.0.1:8080]
    #[arg(long, env = "FLEETHUB_URL")]
    url: Option<String>,
    /// Admin bearer token [default: the admin-token file in the data directory]
    #[arg(long, env = "FLEETHUB_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The hub's data directory, to find its token and endpoints
    #[arg(long, default_value = "./fleethub-data")]
    data_dir: PathBuf,
    /// MQTT address devices connect to [default: the hub's plain MQTT listener]
    #[arg(long)]
    mqtt: Option<SocketAddr>,
    /// Use these identities instead of registering: one connection string per line
    /// (`HostName=…;DeviceId=…[;ModuleId=…];SharedAccessKey=…`)
    #[arg(long)]
    connection_strings: Option<PathBuf>,
    /// Where the outage scenario's simulated upstream listens (overrides the scenario)
    #[arg(long)]
    upstream_listen: Option<String>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

/// The management API, as far as a simulator needs it.
struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the hub's API at {}", self.base))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    async fn ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let (status, v) = self.call(method, path, body).await?;
        if !(200..300).contains(&status) {
            bail!(
                "{path}: HTTP {status}: {}",
                v["message"].as_str().unwrap_or(&v.to_string())
            );
        }
        Ok(v)
    }

    /// Creates the identity, or fetches it when it exists (reruns reuse their fleet).
    async fn ensure(&self, device: &str, module: Option<&str>) -> Result<Identity> {
        let enc = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        let (create, body, get) = match module {
            None => (
                "/devices".to_string(),
                json!({ "deviceId": device }),
                format!("/devices/{}", enc(device)),
            ),
            Some(m) => (
                format!("/devices/{}/modules", enc(device)),
                json!({ "moduleId": m }),
                format!("/devices/{}/modules/{}", enc(device), enc(m)),
            ),
        };
        let (status, mut v) = self
            .call(reqwest::Method::POST, &create, Some(body))
            .await?;
        if status == 409 {
            v = self.ok(reqwest::Method::GET, &get, None).await?;
        } else if !(200..300).contains(&status) {
            bail!("registering {get}: HTTP {status}: {v}");
        }
        let key = v["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .ok_or_else(|| {
                anyhow!("{get}: no symmetric key (only SAS identities can be simulated)")
            })?;
        Ok(Identity {
            device: device.to_string(),
            module: module.map(str::to_string),
            key: key.to_string(),
        })
    }

    /// The hub's resident memory from its metrics, in bytes.
    async fn hub_memory(&self) -> Option<u64> {
        hub_metric(self, "fleethub_process_resident_memory_bytes")
            .await
            .map(|v| v as u64)
    }
}

struct HubInfo {
    id: String,
    hostname: String,
    mqtt: SocketAddr,
}

/// Reads `HostName=…;DeviceId=…[;ModuleId=…];SharedAccessKey=…` lines.
fn read_connection_strings(path: &PathBuf) -> Result<(String, Vec<Identity>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut host = None;
    let mut ids = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let field = |name: &str| {
            line.split(';').find_map(|kv| {
                kv.split_once('=')
                    .filter(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            })
        };
        let missing = |f: &str| anyhow!("{}:{}: no {f}", path.display(), n + 1);
        host.get_or_insert(field("HostName").ok_or_else(|| missing("HostName"))?);
        ids.push(Identity {
            device: field("DeviceId").ok_or_else(|| missing("DeviceId"))?,
            module: field("ModuleId"),
            key: field("SharedAccessKey").ok_or_else(|| missing("SharedAccessKey"))?,
        });
    }
    let host = host.ok_or_else(|| anyhow!("{}: no connection strings", path.display()))?;
    Ok((host, ids))
}

pub fn run(args: RunArgs) -> Result<()> {
    let scenario = match &args.scenario {
        Some(path) => Scenario::load(path)?,
        None => Scenario::default(),
    };
    let plan = scenario.plan(&Overrides {
        devices: args.devices,
        modules_per_device: args.modules_per_device,
        rate: args.rate.clone(),
        duration: args.duration.clone(),
        upstream_listen: args.upstream_listen.clone(),
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("device-sim")
        .build()?;
    let summary = rt.block_on(run_plan(Arc::new(plan), &args))?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&summary)?),
        Output::Text => print_summary(&summary),
    }
    // Identities still draining are not waited for beyond this.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("{}", msg.as_ref());
}

async fn run_plan(plan: Arc<Plan>, args: &RunArgs) -> Result<Value> {
    if !plan.name.is_empty() {
        progress(format!(
            "scenario {}: {}",
            plan.name,
            plan.description.trim()
        ));
    }
    let token = match &args.token {
        Some(t) => Some(t.clone()),
        None => std::fs::read_to_string(args.data_dir.join("admin-token"))
            .ok()
            .map(|t| t.trim().to_string()),
    };
    let endpoints: Option<fleethub::hub::Endpoints> =
        std::fs::read_to_string(args.data_dir.join("endpoints.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
    let base = match (&args.url, &endpoints) {
        (Some(u), _) => u.trim_end_matches('/').to_string(),
        (None, Some(e)) => format!("http://{}", e.api),
        (None, None) => "http://127.0.0.1:8080".into(),
    };
    let api = token.map(|token| {
        Arc::new(Api {
            http: reqwest::Client::new(),
            base,
            token,
        })
    });
    let stats = Arc::new(Stats::new());

    // The hub, and the identities to play.
    let from_file = match &args.connection_strings {
        Some(path) => Some(read_connection_strings(path)?),
        None => None,
    };
    let hub = match &api {
        Some(api) => {
            let v = api.ok(reqwest::Method::GET, "/hub", None).await?;
            let mqtt = match (args.mqtt, v["endpoints"]["mqtt"].as_str()) {
                (Some(a), _) => a,
                (None, Some(a)) => a.parse().context("the hub's MQTT endpoint")?,
                (None, None) => bail!("the hub has no plain MQTT listener; pass --mqtt"),
            };
            HubInfo {
                id: v["id"].as_str().unwrap_or("fleethub").to_string(),
                hostname: v["hostname"].as_str().unwrap_or("localhost").to_string(),
                mqtt,
            }
        }
        None => {
            let Some((host, _)) = &from_file else {
                bail!(
                    "no admin token: pass --token, set FLEETHUB_TOKEN, or --data-dir of the hub \
                     (or --connection-strings with --mqtt to run without the API)"
                );
            };
            HubInfo {
                id: "fleethub".into(),
                hostname: host.clone(),
                mqtt: args
                    .mqtt
                    .or(endpoints.as_ref().and_then(|e| e.mqtt))
                    .context("without the API, pass --mqtt")?,
            }
        }
    };
    let needs_api = plan.monitor
        || !plan.routes.is_empty()
        || !plan.hub_modules.is_empty()
        || !plan.pushes.is_empty();
    if api.is_none() && needs_api {
        bail!("this scenario uses the management API (monitor, routes, hub modules or desired pushes): pass --token or --data-dir");
    }

    let mut fleet: Vec<(Identity, Role)> = Vec::new();
    match from_file {
        Some((_, ids)) => fleet.extend(ids.into_iter().map(|id| {
            let role = if id.module.is_some() {
                Role::DeviceModule
            } else {
                Role::Device
            };
            (id, role)
        })),
        None => {
            let api = api.as_ref().context("registering needs the API")?;
            let mut wanted = Vec::new();
            for d in 0..plan.devices {
                let device = format!("{}{d}", plan.id_prefix);
                for m in 0..plan.modules_per_device {
                    wanted.push((device.clone(), Some(format!("m{m}")), Role::DeviceModule));
                }
                wanted.insert(
                    wanted.len() - plan.modules_per_device,
                    (device, None, Role::Device),
                );
            }
            fleet = register(api, wanted).await?;
        }
    }
    let device_ids: Vec<String> = fleet
        .iter()
        .filter(|(id, _)| id.module.is_none())
        .map(|(id, _)| id.device.clone())
        .collect();
    if let Some(api) = &api {
        for (m, forward) in &plan.hub_modules {
            let id = api.ensure(&hub.id, Some(m)).await?;
            fleet.push((
                id,
                Role::HubModule {
                    forward_to: forward.clone(),
                },
            ));
        }
        if !plan.routes.is_empty() {
            let path = format!("/twins/{}/modules/$edgeHub", hub.id);
            api.ok(
                reqwest::Method::PATCH,
                &path,
                Some(json!({ "properties": { "desired": { "routes": plan.routes } } })),
            )
            .await
            .context("installing the scenario's routes")?;
            progress(format!(
                "routes installed: {}",
                plan.routes.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    let upstream = match &plan.upstream {
        Some((listen, _)) => {
            let sim = UpstreamSim::start(*listen, stats.clone()).await?;
            progress(format!("simulated upstream listening on {}", sim.listen()));
            Some(sim)
        }
        None => None,
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let (go_tx, go_rx) = watch::channel(false);
    if plan.monitor {
        if let Some(api) = &api {
            start_monitor(
                hub.mqtt,
                &api.token,
                &plan.id_prefix,
                plan.qos,
                stats.clone(),
                stop_rx.clone(),
            )
            .await?;
        }
    }
    let memory_before = match &api {
        Some(api) => api.hub_memory().await,
        None => None,
    };

    // Connect the fleet at the connect rate.
    let ctx = Arc::new(Ctx {
        plan: plan.clone(),
        stats: stats.clone(),
        hostname: hub.hostname.clone(),
        mqtt: hub.mqtt,
        expiry: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            + 24 * 3600
            + plan.duration.as_secs() * 2,
        stop: stop_rx.clone(),
        go: go_rx,
    });
    let total = fleet.len() as u64;
    let senders = fleet
        .iter()
        .filter(|(_, r)| !matches!(r, Role::HubModule { .. }))
        .count() as u64;
    progress(format!(
        "connecting {total} identities to {} at {}/s",
        hub.mqtt, plan.connect_rate
    ));
    let connect_start = Instant::now();
    let mut tasks = JoinSet::new();
    let gap = Duration::from_secs_f64(1.0 / plan.connect_rate);
    for (n, (id, role)) in fleet.into_iter().enumerate() {
        let due = connect_start + gap.mul_f64(n as f64);
        tokio::time::sleep_until(due.into()).await;
        tasks.spawn(device::run(id, role, ctx.clone()));
    }
    let connect_deadline = Instant::now() + Duration::from_secs(30) + gap.mul_f64(total as f64);
    let mut last = Instant::now();
    while stats.connected.get() < total && Instant::now() < connect_deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            progress(format!(
                "  connected {}/{total}  errors {}",
                stats.connected.get(),
                stats.errors.get()
            ));
        }
    }
    let connect_secs = connect_start.elapsed().as_secs_f64();
    let connected_after_ramp = stats.connected.get();
    progress(format!(
        "connected {connected_after_ramp}/{total} in {connect_secs:.1} s"
    ));
    // Let the connection burst's allocations settle before reading the hub's memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let memory_connected = match &api {
        Some(api) => api.hub_memory().await,
        None => None,
    };

    // Telemetry, with pushes and outages on schedule.
    let expected_sent = senders * plan.messages_per_sender();
    let start = Instant::now();
    let _ = go_tx.send(true);
    let mut schedule: JoinSet<()> = JoinSet::new();
    for (at, props) in plan.pushes.clone() {
        let (api, stats, devices) = (api.clone(), stats.clone(), device_ids.clone());
        schedule.spawn(async move {
            tokio::time::sleep_until((start + at).into()).await;
            if let Some(api) = api {
                push_desired(&api, &devices, props, &stats).await;
            }
        });
    }
    let deployment_result = Arc::new(std::sync::Mutex::new(None::<Value>));
    for (at, id, body) in plan.deployments.clone() {
        let (api, stats, result) = (api.clone(), stats.clone(), deployment_result.clone());
        schedule.spawn(async move {
            tokio::time::sleep_until((start + at).into()).await;
            let Some(api) = api else { return };
            let outcome = create_deployment(&api, &id, body, &stats).await;
            let v = outcome.unwrap_or_else(|e| {
                progress(format!("deployment {id}: {e:#}"));
                stats.errors.inc();
                json!({ "id": id, "error": format!("{e:#}") })
            });
            if let Ok(mut r) = result.lock() {
                *r = Some(v);
            }
        });
    }
    let outages_end = match (&plan.upstream, &upstream) {
        (Some((_, outages)), Some(sim)) => {
            for (at, lasts) in outages.clone() {
                let sim = sim.clone();
                schedule.spawn(async move {
                    tokio::time::sleep_until((start + at).into()).await;
                    progress(format!(
                        "upstream outage: link down for {} s",
                        lasts.as_secs_f64()
                    ));
                    sim.down();
                    tokio::time::sleep(lasts).await;
                    match sim.up().await {
                        Ok(()) => progress("upstream outage over: link up"),
                        Err(e) => progress(format!("upstream could not listen again: {e:#}")),
                    }
                });
            }
            outages.iter().map(|(a, l)| *a + *l).max()
        }
        _ => None,
    };
    let send_deadline = start + plan.duration * 2 + Duration::from_secs(30);
    let mut prev = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while stats.sent.get() < expected_sent && Instant::now() < send_deadline {
        tick.tick().await;
        prev = progress_line(&stats, start, total, prev);
    }
    let send_secs = start.elapsed().as_secs_f64();

    // Drain: wait for acks and arrivals to stop changing (and any outage to end).
    let drain_deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet_since = Instant::now();
    let mut last_seen = (
        stats.acked.get(),
        stats.received(),
        stats.desired_received.get(),
    );
    loop {
        tick.tick().await;
        prev = progress_line(&stats, start, total, prev);
        let now_seen = (
            stats.acked.get(),
            stats.received(),
            stats.desired_received.get(),
        );
        if now_seen != last_seen {
            last_seen = now_seen;
            quiet_since = Instant::now();
        }
        let outage_over = outages_end.is_none_or(|end| start.elapsed() > end);
        let pushes_done = schedule.is_empty() || {
            while schedule.try_join_next().is_some() {}
            schedule.is_empty()
        };
        let acked_all = plan.qos == 0 || stats.acked.get() >= stats.sent.get();
        // The outage scenario routes everything upstream: its backlog is in when every
        // acknowledged message has arrived there (a hub may still be backing off meanwhile).
        let upstream_in = upstream.is_none() || stats.upstream_received.get() >= stats.acked.get();
        let quiet = quiet_since.elapsed() >= Duration::from_secs(2);
        if (outage_over && pushes_done && quiet && acked_all && upstream_in)
            || Instant::now() > drain_deadline
        {
            break;
        }
    }
    let connected_at_end = stats.connected.get();
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    schedule.abort_all();

    let (count, p50, p99, max) = stats.latency.summary();
    let (desired_count, desired_p50, _, desired_max) = stats.desired_latency.summary();
    let (reported_count, reported_p50, _, reported_max) = stats.reported_latency.summary();
    let per_connection = match (memory_before, memory_connected) {
        (Some(b), Some(a)) if connected_after_ramp > 0 => {
            Some(a.saturating_sub(b) / connected_after_ramp)
        }
        _ => None,
    };
    let mut summary = json!({
        "scenario": plan.name,
        "devices": plan.devices.max(device_ids.len()),
        "identities": total,
        "connected": connected_after_ramp,
        "peak_connected": stats.peak_connected.get(),
        "connected_at_end": connected_at_end,
        "connect_s": connect_secs,
        "sent": stats.sent.get(),
        "expected_sent": expected_sent,
        "acked": stats.acked.get(),
        "received": stats.received(),
        "received_by": stats.received_by(),
        "forwarded": stats.forwarded.get(),
        "errors": stats.errors.get(),
        "reconnects": stats.reconnects.get(),
        "methods_answered": stats.methods_answered.get(),
        "send_s": send_secs,
        "sent_per_s": stats.sent.get() as f64 / send_secs.max(1e-9),
        "latency_samples": count,
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": max,
        "desired": {
            "received": stats.desired_received.get(),
            "reported_success": stats.reported_success.get(),
            "reported_failed": stats.reported_failed.get(),
            "after_push_p50_ms": if desired_count > 0 { json!(desired_p50) } else { Value::Null },
            "after_push_max_ms": if desired_count > 0 { json!(desired_max) } else { Value::Null },
            "reported_after_push_p50_ms": if reported_count > 0 { json!(reported_p50) } else { Value::Null },
            "reported_after_push_max_ms": if reported_count > 0 { json!(reported_max) } else { Value::Null },
        },
        "hub_memory": {
            "before_bytes": memory_before,
            "connected_bytes": memory_connected,
            "per_connection_bytes": per_connection,
        },
    });
    if let Some(d) = deployment_result.lock().ok().and_then(|r| r.clone()) {
        summary["deployment"] = d;
    }
    if upstream.is_some() {
        summary["upstream"] = json!({
            "received": stats.upstream_received.get(),
            "duplicates": stats.upstream_duplicates.get(),
            "missing": stats.acked.get().saturating_sub(stats.upstream_received.get()),
        });
    }
    Ok(summary)
}

/// Registers identities with bounded concurrency, printing progress for big fleets.
async fn register(
    api: &Arc<Api>,
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
            let (api, permits) = (api.clone(), permits.clone());
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

/// A hub metric's value from its `/metrics`.
async fn hub_metric(api: &Api, name: &str) -> Option<f64> {
    let text = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Creates a targeted deployment (replacing one with the same id from an earlier run) and
/// follows it through the hub's status until every targeted device has reported, or its
/// rollout completed or stopped. Returns what it saw, with the hub's CPU and memory meanwhile.
async fn create_deployment(api: &Api, id: &str, body: Value, stats: &Arc<Stats>) -> Result<Value> {
    let path = format!("/deployments/{id}");
    let _ = api.call(reqwest::Method::DELETE, &path, None).await?;
    let cpu0 = hub_metric(api, "fleethub_process_cpu_seconds_total").await;
    progress(format!("creating deployment {id}"));
    let started = Instant::now();
    if let Ok(mut s) = stats.push_started.lock() {
        *s = Some(started);
    }
    let created = api
        .ok(reqwest::Method::POST, "/deployments", Some(body))
        .await?;
    let created_ms = started.elapsed().as_secs_f64() * 1000.0;
    let targeted = created["systemMetrics"]["targetedCount"]
        .as_u64()
        .unwrap_or(0);
    progress(format!(
        "deployment {id}: {targeted} devices targeted, twins written in {created_ms:.0} ms"
    ));
    let mut peak_rss = 0u64;
    let deadline = started + Duration::from_secs(300);
    let (done_ms, last) = loop {
        if let Some(rss) = api.hub_memory().await {
            peak_rss = peak_rss.max(rss);
        }
        let v = api.ok(reqwest::Method::GET, &path, None).await?;
        let m = &v["systemMetrics"];
        let (ok, failed) = (
            m["reportedSuccessfulCount"].as_u64().unwrap_or(0),
            m["reportedFailedCount"].as_u64().unwrap_or(0),
        );
        let rollout = v["rolloutState"]["status"].as_str().unwrap_or("");
        let all_reported = targeted > 0 && ok + failed >= targeted && rollout != "running";
        if all_reported || rollout == "aborted" || Instant::now() > deadline {
            break (started.elapsed().as_secs_f64() * 1000.0, v);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let cpu1 = hub_metric(api, "fleethub_process_cpu_seconds_total").await;
    let wall = started.elapsed().as_secs_f64();
    Ok(json!({
        "id": id,
        "targeted": targeted,
        "twins_written_ms": created_ms,
        "all_reported_ms": done_ms,
        "system_metrics": last["systemMetrics"],
        "rollout": last["rolloutState"]["status"],
        "rollout_reason": last["rolloutState"]["reason"],
        "hub_cpu_percent": match (cpu0, cpu1) {
            (Some(a), Some(b)) => json!((b - a) / wall * 100.0),
            _ => Value::Null,
        },
        "hub_peak_rss_bytes": peak_rss,
    }))
}

/// Patches every device's desired properties through the API, concurrently.
async fn push_desired(api: &Arc<Api>, devices: &[String], props: Value, stats: &Arc<Stats>) {
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
            (api.clone(), permits.clone(), stats.clone(), props.clone());
        let path = format!("/twins/{d}");
        set.spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            let body = json!({ "properties": { "desired": props } });
            if api
                .ok(reqwest::Method::PATCH, &path, Some(body))
                .await
                .is_err()
            {
                stats.errors.inc();
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// The service connection that counts the fleet's telemetry as the hub delivers it.
async fn start_monitor(
    mqtt: SocketAddr,
    token: &str,
    prefix: &str,
    qos: u8,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut o = MqttOptions::new(
        format!("device-sim-monitor-{:x}", rand::random::<u32>()),
        mqtt.ip().to_string(),
        mqtt.port(),
    );
    o.set_credentials("$service", token);
    o.set_max_packet_size(1024 * 1024, 1024 * 1024);
    o.set_keep_alive(Duration::from_secs(60));
    let (client, mut events) = AsyncClient::new(o, 100);
    let q = if qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    client.subscribe("$fleethub/events/#", q).await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e).context("monitor connection (is the token right?)"),
            Err(_) => bail!("monitor: no SUBACK"),
        }
    }
    let prefix = prefix.to_string();
    tokio::spawn(async move {
        let _client = client;
        let mut ours: HashSet<String> = HashSet::new();
        loop {
            let event = tokio::select! {
                e = events.poll() => e,
                _ = stop.wait_for(|s| *s) => return,
            };
            match event {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    // `$fleethub/events/{d}/{m or ~}/{bag}`
                    let topic = p.topic.as_str();
                    let rest = topic.strip_prefix("$fleethub/events/").unwrap_or("");
                    let mut parts = rest.splitn(3, '/');
                    let (d, _m, bag) = (
                        parts.next().unwrap_or(""),
                        parts.next(),
                        parts.next().unwrap_or(""),
                    );
                    if !(ours.contains(d) || d.starts_with(&prefix) && ours.insert(d.to_string())) {
                        continue;
                    }
                    stats.monitor_received.inc();
                    if let Ok(m) = fleethub_router::message::Message::from_bag(bag, p.payload) {
                        if let Some(sent) = m.property(SENT_PROPERTY).and_then(|v| v.parse().ok()) {
                            stats.latency.record_since(sent);
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    stats.errors.inc();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    Ok(())
}

fn progress_line(stats: &Stats, start: Instant, total: u64, prev: (u64, u64)) -> (u64, u64) {
    let (sent, received) = (stats.sent.get(), stats.received());
    let (_, p50, p99, _) = stats.latency.summary();
    progress(format!(
        "[{:>4.0}s] connected {}/{}  sent {} ({}/s)  received {} ({}/s)  errors {}  p50 {:.1} ms  p99 {:.1} ms",
        start.elapsed().as_secs_f64(),
        stats.connected.get(),
        total,
        sent,
        sent - prev.0,
        received,
        received.saturating_sub(prev.1),
        stats.errors.get(),
        p50,
        p99
    ));
    (sent, received)
}

fn print_summary(s: &Value) {
    println!("scenario         {}", s["scenario"].as_str().unwrap_or(""));
    println!(
        "devices          {} ({} identities), connected {} in {:.1} s",
        s["devices"],
        s["identities"],
        s["connected"],
        s["connect_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "telemetry        sent {} (acked {}) in {:.1} s, {:.0}/s",
        s["sent"],
        s["acked"],
        s["send_s"].as_f64().unwrap_or(0.0),
        s["sent_per_s"].as_f64().unwrap_or(0.0)
    );
    println!("received         {} {}", s["received"], s["received_by"]);
    println!(
        "latency          p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        s["p50_ms"].as_f64().unwrap_or(0.0),
        s["p99_ms"].as_f64().unwrap_or(0.0),
        s["max_ms"].as_f64().unwrap_or(0.0)
    );
    println!("desired          {}", s["desired"]);
    println!(
        "errors           {} (reconnects {}), methods answered {}, forwarded {}",
        s["errors"], s["reconnects"], s["methods_answered"], s["forwarded"]
    );
    if let Some(per) = s["hub_memory"]["per_connection_bytes"].as_u64() {
        println!(
            "hub memory       {} MiB connected, {:.1} KiB per connection",
            s["hub_memory"]["connected_bytes"].as_u64().unwrap_or(0) / (1024 * 1024),
            per as f64 / 1024.0
        );
    }
    if !s["upstream"].is_null() {
        println!("upstream         {}", s["upstream"]);
    }
}
