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
use tokio::sync::watch;
use tokio::task::JoinSet;

mod hub_api;
mod summary;

use hub_api::HubApi;

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
    /// MQTT address devices connect to [default: the hub's plain MQTT listener]; several,
    /// comma-separated, spread the devices over a cluster's nodes (each device always goes
    /// to the same one, by a hash of its id)
    #[arg(long, value_delimiter = ',')]
    mqtt: Vec<SocketAddr>,
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

struct HubInfo {
    id: String,
    hostname: String,
    /// One or more (a cluster's nodes); never empty.
    mqtt: Vec<SocketAddr>,
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
        Output::Text => summary::print_summary(&summary),
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
    let stats = Arc::new(Stats::new());
    let (api, hub, from_file) = find_hub(args).await?;
    let needs_api = plan.monitor
        || !plan.routes.is_empty()
        || !plan.hub_modules.is_empty()
        || !plan.pushes.is_empty();
    if api.is_none() && needs_api {
        bail!("this scenario uses the management API (monitor, routes, hub modules or desired pushes): pass --token or --data-dir");
    }

    let (fleet, device_ids) = gather_fleet(&plan, api.as_ref(), &hub, from_file).await?;
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
                hub.mqtt[0],
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
        Some(api) => api.memory().await,
        None => None,
    };
    let ctx = Arc::new(Ctx {
        plan: plan.clone(),
        stats: stats.clone(),
        hostname: hub.hostname.clone(),
        mqtt: hub.mqtt.clone(),
        expiry: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            + 24 * 3600
            + plan.duration.as_secs() * 2,
        stop: stop_rx.clone(),
        go: go_rx,
    });
    let connected = connect_fleet(fleet, ctx, &plan, &stats, &hub.mqtt).await;
    let total = connected.total;
    // Let the connection burst's allocations settle before reading the hub's memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let memory_connected = match &api {
        Some(api) => api.memory().await,
        None => None,
    };

    // Telemetry, with pushes and outages on schedule.
    let expected_sent = connected.senders * plan.messages_per_sender();
    let start = Instant::now();
    let _ = go_tx.send(true);
    let mut schedule = Schedule::start(&plan, &api, &stats, &device_ids, upstream.as_ref(), start);
    let send_deadline = start + plan.duration * 2 + Duration::from_secs(30);
    let mut prev = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while stats.sent.get() < expected_sent && Instant::now() < send_deadline {
        tick.tick().await;
        prev = summary::progress_line(&stats, start, total, prev);
    }
    let send_secs = start.elapsed().as_secs_f64();
    drain(
        &plan,
        &stats,
        &mut schedule,
        upstream.is_some(),
        start,
        total,
        prev,
    )
    .await;

    let connected_at_end = stats.connected.get();
    let _ = stop_tx.send(true);
    let mut tasks = connected.tasks;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    schedule.tasks.abort_all();
    let deployment = schedule.deployment.lock().ok().and_then(|r| r.clone());
    Ok(summary::summarize(summary::Measured {
        plan: &plan,
        stats: &stats,
        devices: device_ids.len(),
        total,
        connected_after_ramp: connected.after_ramp,
        connected_at_end,
        connect_secs: connected.secs,
        expected_sent,
        send_secs,
        memory_before,
        memory_connected,
        deployment,
        upstream: upstream.is_some(),
    }))
}

/// Finds the hub: its API (URL and token from the flags, the environment or its data
/// directory, as the `fleethub` CLI does), its id, hostname and MQTT address; or, without a
/// token, what connection strings tell.
async fn find_hub(
    args: &RunArgs,
) -> Result<(
    Option<Arc<HubApi>>,
    HubInfo,
    Option<(String, Vec<Identity>)>,
)> {
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
    let api = token.map(|token| Arc::new(HubApi::new(&base, &token)));

    // The hub, and the identities to play.
    let from_file = match &args.connection_strings {
        Some(path) => Some(read_connection_strings(path)?),
        None => None,
    };
    let hub = match &api {
        Some(api) => {
            let info = api.client.hub().await?;
            let mqtt = match (args.mqtt.is_empty(), info.endpoints.and_then(|e| e.mqtt)) {
                (false, _) => args.mqtt.clone(),
                (true, Some(a)) => vec![a],
                (true, None) => bail!("the hub has no plain MQTT listener; pass --mqtt"),
            };
            HubInfo {
                id: info.id,
                hostname: info.hostname,
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
                mqtt: match args.mqtt.is_empty() {
                    false => args.mqtt.clone(),
                    true => vec![endpoints
                        .as_ref()
                        .and_then(|e| e.mqtt)
                        .context("without the API, pass --mqtt")?],
                },
            }
        }
    };
    Ok((api, hub, from_file))
}

/// The identities to play (registered, or from connection strings), and the scenario's hub
/// modules and routes installed. Returns them with the ids of the devices among them.
async fn gather_fleet(
    plan: &Plan,
    api: Option<&Arc<HubApi>>,
    hub: &HubInfo,
    from_file: Option<(String, Vec<Identity>)>,
) -> Result<(Vec<(Identity, Role)>, Vec<String>)> {
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
            let api = api.context("registering needs the API")?;
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
            fleet = api.register(wanted).await?;
        }
    }
    let device_ids: Vec<String> = fleet
        .iter()
        .filter(|(id, _)| id.module.is_none())
        .map(|(id, _)| id.device.clone())
        .collect();
    if let Some(api) = api {
        for (m, forward) in &plan.hub_modules {
            let id = api.hub_module(&hub.id, m).await?;
            fleet.push((
                id,
                Role::HubModule {
                    forward_to: forward.clone(),
                },
            ));
        }
        if !plan.routes.is_empty() {
            api.install_routes(&hub.id, &json!(plan.routes))
                .await
                .context("installing the scenario's routes")?;
            progress(format!(
                "routes installed: {}",
                plan.routes.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    Ok((fleet, device_ids))
}

/// The fleet's connection tasks and how connecting went.
struct Connected {
    tasks: JoinSet<()>,
    total: u64,
    /// Identities that send telemetry (every one but the hub's modules).
    senders: u64,
    secs: f64,
    after_ramp: u64,
}

/// Connects the fleet at the connect rate and waits for it (or a deadline).
async fn connect_fleet(
    fleet: Vec<(Identity, Role)>,
    ctx: Arc<Ctx>,
    plan: &Plan,
    stats: &Arc<Stats>,
    mqtt: &[SocketAddr],
) -> Connected {
    let total = fleet.len() as u64;
    let senders = fleet
        .iter()
        .filter(|(_, r)| !matches!(r, Role::HubModule { .. }))
        .count() as u64;
    let to: Vec<String> = mqtt.iter().map(|a| a.to_string()).collect();
    progress(format!(
        "connecting {total} identities to {} at {}/s",
        to.join(", "),
        plan.connect_rate
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
    Connected {
        tasks,
        total,
        senders,
        secs: connect_secs,
        after_ramp: connected_after_ramp,
    }
}

/// What runs on the scenario's clock: desired pushes, a deployment, upstream outages.
struct Schedule {
    tasks: JoinSet<()>,
    /// What the deployment's follower saw.
    deployment: Arc<std::sync::Mutex<Option<Value>>>,
    /// When the last outage ends, from the start.
    outages_end: Option<Duration>,
}

impl Schedule {
    fn start(
        plan: &Plan,
        api: &Option<Arc<HubApi>>,
        stats: &Arc<Stats>,
        device_ids: &[String],
        upstream: Option<&Arc<UpstreamSim>>,
        start: Instant,
    ) -> Schedule {
        let mut schedule: JoinSet<()> = JoinSet::new();
        for (at, props) in plan.pushes.clone() {
            let (api, stats, devices) = (api.clone(), stats.clone(), device_ids.to_vec());
            schedule.spawn(async move {
                tokio::time::sleep_until((start + at).into()).await;
                if let Some(api) = api {
                    api.push_desired(&devices, props, &stats).await;
                }
            });
        }
        let deployment = Arc::new(std::sync::Mutex::new(None::<Value>));
        for (at, id, body) in plan.deployments.clone() {
            let (api, stats, result) = (api.clone(), stats.clone(), deployment.clone());
            schedule.spawn(async move {
                tokio::time::sleep_until((start + at).into()).await;
                let Some(api) = api else { return };
                let outcome = api.follow_deployment(&id, body, &stats).await;
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
        let outages_end = match (&plan.upstream, upstream) {
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
        Schedule {
            tasks: schedule,
            deployment,
            outages_end,
        }
    }
}

/// Waits for acknowledgements and arrivals to stop changing, the schedule to finish and any
/// outage's backlog to arrive (or a deadline).
async fn drain(
    plan: &Plan,
    stats: &Arc<Stats>,
    schedule: &mut Schedule,
    upstream: bool,
    start: Instant,
    total: u64,
    mut prev: (u64, u64),
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
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
        prev = summary::progress_line(stats, start, total, prev);
        let now_seen = (
            stats.acked.get(),
            stats.received(),
            stats.desired_received.get(),
        );
        if now_seen != last_seen {
            last_seen = now_seen;
            quiet_since = Instant::now();
        }
        let outage_over = schedule.outages_end.is_none_or(|end| start.elapsed() > end);
        let pushes_done = schedule.tasks.is_empty() || {
            while schedule.tasks.try_join_next().is_some() {}
            schedule.tasks.is_empty()
        };
        let acked_all = plan.qos == 0 || stats.acked.get() >= stats.sent.get();
        // The outage scenario routes everything upstream: its backlog is in when every
        // acknowledged message has arrived there (a hub may still be backing off meanwhile).
        let upstream_in = !upstream || stats.upstream_received.get() >= stats.acked.get();
        let quiet = quiet_since.elapsed() >= Duration::from_secs(2);
        if (outage_over && pushes_done && quiet && acked_all && upstream_in)
            || Instant::now() > drain_deadline
        {
            break;
        }
    }
}

/// The service connection that counts the fleet's telemetry as the hub receives it.
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
    // The live view of every telemetry message, routed or not (`$fleethub/events/#` alone
    // would read the events endpoint's $Default group, which routed messages skip).
    client.subscribe("$fleethub/events/+/#", q).await?;
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
