//! The brokers a benchmark runs against, each in a process of its own, so its memory can be
//! read off `/proc` and it competes for the two cores the way a deployed broker would:
//!
//! - fleethub and a bare rumqttd are this binary run again (`device-sim serve-broker`), so
//!   both have the same allocator and the same router sizing;
//! - mosquitto is Debian's `mosquitto`, when it is installed.
//!
//! Each target says how its clients connect and which topics they use.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rumqttc::MqttOptions;
use serde_json::json;

/// One simulated client: its id, credentials, and the topic it publishes (or the filter it
/// subscribes to).
pub struct ClientSpec {
    pub id: String,
    pub credentials: Option<(String, String)>,
    pub topic: String,
}

/// How the publishing devices reach fleethub: MQTT over TCP, over TLS (the MQTTS listener), or
/// over WebSockets in TLS (the WSS listener, `/$iothub/websocket`, as the SDKs'
/// `websockets=True`). The baselines and the subscriber always use plain TCP.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Plain,
    Tls,
    Wss,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Plain => "plain",
            Transport::Tls => "tls",
            Transport::Wss => "wss",
        }
    }
}

/// fleethub's TLS listeners and a client configuration trusting its generated CA.
struct TlsAccess {
    mqtts: SocketAddr,
    wss: SocketAddr,
    config: Arc<rustls::ClientConfig>,
}

/// How a load's clients reach a broker.
pub struct Target {
    pub name: &'static str,
    pub addr: SocketAddr,
    /// What [`Target::device_options`] connects the devices over (fleethub only).
    pub transport: Transport,
    tls: Option<TlsAccess>,
    pub devices: Vec<ClientSpec>,
    /// Idle clients that only hold a connection (the memory-per-connection measurement).
    pub held: Vec<ClientSpec>,
    pub subscriber: ClientSpec,
    child: Option<Child>,
    dir: PathBuf,
}

impl Target {
    /// Whether the broker serves MQTT over TLS and WebSockets (fleethub does).
    pub fn has_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn device_options(&self, i: usize) -> (MqttOptions, String) {
        let c = &self.devices[i];
        let mut o = options(self.addr, &c.id, &c.credentials);
        match (self.transport, &self.tls) {
            (Transport::Plain, _) => {}
            (Transport::Tls, Some(tls)) => {
                o = options(tls.mqtts, &c.id, &c.credentials);
                o.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(tls.config.clone()),
                ));
            }
            (Transport::Wss, Some(tls)) => {
                let url = format!("wss://{}/$iothub/websocket", tls.wss);
                let mut w = MqttOptions::new(&c.id, url, tls.wss.port());
                if let Some((u, p)) = &c.credentials {
                    w.set_credentials(u.clone(), p.clone());
                }
                w.set_keep_alive(o.keep_alive());
                w.set_max_packet_size(1024 * 1024, 1024 * 1024);
                w.set_inflight(o.inflight());
                w.set_transport(rumqttc::Transport::wss_with_config(
                    rumqttc::TlsConfiguration::Rustls(tls.config.clone()),
                ));
                o = w;
            }
            // Only fleethub has the TLS listeners; a baseline stays on TCP.
            (_, None) => {}
        }
        (o, c.topic.clone())
    }

    pub fn held_options(&self, i: usize) -> MqttOptions {
        let c = &self.held[i];
        options(self.addr, &c.id, &c.credentials)
    }

    /// An SDK device's subscriptions for held client `i`: IoT Hub topics on fleethub, the
    /// same four families on plain topics elsewhere (rumqttd refuses `$` filters).
    pub fn held_filters(&self, i: usize) -> Vec<String> {
        let id = &self.held[i].id;
        if self.name == "fleethub" {
            vec![
                format!("devices/{id}/messages/devicebound/#"),
                "$iothub/twin/res/#".into(),
                "$iothub/twin/PATCH/properties/desired/#".into(),
                "$iothub/methods/POST/#".into(),
            ]
        } else {
            vec![
                format!("devices/{id}/messages/devicebound/#"),
                format!("iothub/{id}/twin/res/#"),
                format!("iothub/{id}/twin/PATCH/properties/desired/#"),
                format!("iothub/{id}/methods/POST/#"),
            ]
        }
    }

    pub fn subscriber_options(&self) -> (MqttOptions, String) {
        let c = &self.subscriber;
        (options(self.addr, &c.id, &c.credentials), c.topic.clone())
    }

    /// `kill -9` of a fleethub target, then the same hub (data directory, MQTT address)
    /// started again; returns once it is listening, with its API's address.
    pub fn crash_and_restart(
        &mut self,
        max_connections: usize,
        sizing: Sizing,
    ) -> Result<SocketAddr> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let endpoints = self.dir.join("data").join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints);
        let mut child = spawn_broker_at(
            "fleethub",
            &self.dir,
            max_connections,
            sizing,
            &self.addr.to_string(),
            false,
        )?;
        let found = wait_for_file(&mut child, &endpoints, |t| {
            serde_json::from_str::<fleethub::hub::Endpoints>(t).ok()
        });
        self.child = Some(child);
        Ok(found?.api)
    }

    /// Live heap bytes of a fleethub target (written by its process every 200 ms).
    pub fn heap_bytes(&self) -> Option<i64> {
        std::fs::read_to_string(self.dir.join("heap"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The data directory of a fleethub target.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// CPU time (user and system) the broker process has used, in seconds: what the hub's
    /// `fleethub_process_cpu_seconds_total` reports, read the same way for every broker.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let pid = self.child.as_ref()?.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces), closed by ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf only reads a system constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (hz > 0).then(|| ticks as f64 / hz as f64)
    }

    /// The broker process's resident memory, in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn options(addr: SocketAddr, id: &str, creds: &Option<(String, String)>) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    if let Some((u, p)) = creds {
        o.set_credentials(u.clone(), p.clone());
    }
    o.set_keep_alive(Duration::from_secs(60));
    o.set_max_packet_size(1024 * 1024, 1024 * 1024);
    o.set_inflight(100);
    o
}

/// A TLS client configuration that trusts the CA in `ca_pem`.
fn trusting(ca_pem: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let pem = std::fs::read(ca_pem).with_context(|| format!("reading {}", ca_pem.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

fn free_port() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

fn temp_dir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "device-sim-{name}-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Router log sizing, the same for both targets so neither gets bigger buffers. rumqttd's
/// logs are rings: a subscriber further behind than this loses messages, in either broker.
#[derive(Debug, Clone, Copy)]
pub struct Sizing {
    pub segment_bytes: usize,
    pub segment_count: usize,
}

/// Plain clients (no credentials) on `bench/…` topics: rumqttd and mosquitto.
fn plain_clients(devices: usize, hold: usize) -> (Vec<ClientSpec>, Vec<ClientSpec>, ClientSpec) {
    let devices = (0..devices)
        .map(|i| ClientSpec {
            id: format!("dev{i}"),
            credentials: None,
            topic: format!("bench/dev{i}/events"),
        })
        .collect();
    let held = (0..hold)
        .map(|i| ClientSpec {
            id: format!("hold{i}"),
            credentials: None,
            topic: String::new(),
        })
        .collect();
    let subscriber = ClientSpec {
        id: "bench-sub".into(),
        credentials: None,
        topic: "bench/#".into(),
    };
    (devices, held, subscriber)
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum BrokerKind {
    Rumqttd,
    Fleethub,
}

/// `device-sim serve-broker`: what a benchmark's broker process runs.
#[derive(Args, Debug)]
pub struct ServeBrokerArgs {
    #[arg(long, value_enum)]
    kind: BrokerKind,
    /// Where to write `addr` (rumqttd) or the hub's data directory `data/` (fleethub)
    #[arg(long)]
    dir: PathBuf,
    #[arg(long)]
    max_connections: usize,
    #[arg(long)]
    segment_bytes: usize,
    #[arg(long)]
    segment_count: usize,
    /// fleethub's MQTT listener (a restarted hub comes back where its clients expect it)
    #[arg(long, default_value = "127.0.0.1:0")]
    mqtt: String,
    /// Count the live heap (memory runs only: it costs an atomic add per allocation)
    #[arg(long)]
    count_heap: bool,
}

/// Runs a benchmark broker until killed.
pub fn serve_broker(args: ServeBrokerArgs) -> Result<()> {
    let sizing = Sizing {
        segment_bytes: args.segment_bytes,
        segment_count: args.segment_count,
    };
    match args.kind {
        BrokerKind::Rumqttd => {
            let addr = spawn_bare_rumqttd(args.max_connections, sizing)?;
            let tmp = args.dir.join("addr.tmp");
            std::fs::write(&tmp, addr.to_string())?;
            std::fs::rename(tmp, args.dir.join("addr"))?;
            loop {
                std::thread::park();
            }
        }
        BrokerKind::Fleethub => {
            if args.count_heap {
                // Live heap bytes, for `bench --hold` (see `crate::heap`).
                crate::heap::enable();
                let heap_file = args.dir.join("heap");
                std::thread::spawn(move || loop {
                    let tmp = heap_file.with_extension("tmp");
                    if std::fs::write(&tmp, crate::heap::live().to_string()).is_ok() {
                        let _ = std::fs::rename(&tmp, &heap_file);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                });
            }
            // The TLS listeners cost nothing while no client uses them; `bench --transports`
            // does.
            let overrides = fleethub::config::Overrides {
                data_dir: Some(args.dir.join("data")),
                mqtt: Some(args.mqtt.clone()),
                mqtts: Some("127.0.0.1:0".into()),
                wss: Some("127.0.0.1:0".into()),
                api: Some("127.0.0.1:0".into()),
            };
            // `hub.toml` beside the data directory, when a benchmark wrote one.
            let file = args.dir.join("hub.toml");
            let mut config =
                fleethub::Config::load(file.exists().then_some(file.as_path()), &overrides)?;
            config.router.max_segment_bytes = sizing.segment_bytes;
            config.router.max_segment_count = sizing.segment_count;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(fleethub::run(config, std::future::pending::<()>()))?;
            Ok(())
        }
    }
}

/// This binary again, as a benchmark broker; its log goes to `dir/broker.log`.
fn spawn_broker(kind: &str, dir: &Path, max_connections: usize, sizing: Sizing) -> Result<Child> {
    spawn_broker_at(kind, dir, max_connections, sizing, "127.0.0.1:0", false)
}

fn spawn_broker_at(
    kind: &str,
    dir: &Path,
    max_connections: usize,
    sizing: Sizing,
    mqtt: &str,
    count_heap: bool,
) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("broker.log"))?;
    Command::new(std::env::current_exe()?)
        .args(["serve-broker", "--kind", kind, "--mqtt", mqtt, "--dir"])
        .arg(dir)
        .args(count_heap.then_some("--count-heap"))
        .args([
            "--max-connections",
            &max_connections.to_string(),
            "--segment-bytes",
            &sizing.segment_bytes.to_string(),
            "--segment-count",
            &sizing.segment_count.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting the broker process")
}

/// Waits for `path` to hold what `parse` accepts, while `child` lives.
fn wait_for_file<T>(
    child: &mut Child,
    path: &Path,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = std::fs::read_to_string(path)
            .ok()
            .as_deref()
            .and_then(&parse)
        {
            return Ok(v);
        }
        if let Some(status) = child.try_wait()? {
            bail!("the broker process exited ({status}) before it was ready");
        }
        if Instant::now() > deadline {
            bail!("the broker process did not write {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A bare rumqttd (one v4 listener, no auth, dynamic filters) in its own process.
pub fn rumqttd(devices: usize, hold: usize, sizing: Sizing) -> Result<Target> {
    let dir = temp_dir("rumqttd")?;
    let mut child = spawn_broker("rumqttd", &dir, devices + hold + 16, sizing)?;
    let addr = wait_for_file(&mut child, &dir.join("addr"), |t| t.trim().parse().ok());
    let (devices, held, subscriber) = plain_clients(devices, hold);
    let mut target = Target {
        name: "rumqttd",
        transport: Transport::Plain,
        tls: None,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        devices,
        held,
        subscriber,
        child: Some(child),
        dir,
    };
    target.addr = addr?;
    Ok(target)
}

/// Debian's mosquitto in its own process, configured like the others (no auth, 100 messages
/// in flight per client, no persistence, a queue deep enough that a slow subscriber is not
/// dropped from under QoS 1). `None` when mosquitto is not installed.
pub fn mosquitto(devices: usize, hold: usize) -> Result<Option<Target>> {
    let Some(bin) = [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists()) else {
        return Ok(None);
    };
    let dir = temp_dir("mosquitto")?;
    let addr = free_port()?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 100\n\
             max_queued_messages 10000000\npersistence false\nlog_dest stderr\nlog_type error\n",
            addr.port()
        ),
    )?;
    let log = std::fs::File::create(dir.join("broker.log"))?;
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting mosquitto")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "mosquitto exited ({status}): {}",
                std::fs::read_to_string(dir.join("broker.log")).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!("mosquitto did not listen on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (devices, held, subscriber) = plain_clients(devices, hold);
    Ok(Some(Target {
        name: "mosquitto",
        transport: Transport::Plain,
        tls: None,
        addr,
        devices,
        held,
        subscriber,
        child: Some(child),
        dir,
    }))
}

/// Starts a bare rumqttd (no auth, dynamic filters) on its own thread in this process, on an
/// ephemeral port of 127.0.0.1, and returns its address once it listens.
pub fn spawn_bare_rumqttd(max_connections: usize, sizing: Sizing) -> Result<SocketAddr> {
    let addr = free_port()?;
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: 300 * 1024,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "v4-bench".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: sizing.segment_bytes,
            max_segment_count: sizing.segment_count,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("bench-rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            let _ = broker.start();
        })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("broker did not listen on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(addr)
}

/// fleethub with its embedded defaults on ephemeral ports, in a temp data directory, with
/// `devices` registered through its API.
pub fn fleethub(devices: usize, sizing: Sizing) -> Result<Target> {
    fleethub_with(devices, 0, sizing, false)
}

/// The route the routed benchmark installs: a `$body` condition into a module input.
pub const BENCH_ROUTE: &str = "FROM /messages/* WHERE $body.temperature > 0 INTO BrokeredEndpoint(\"/modules/sink/inputs/in\")";

/// fleethub in its own process, with `devices` publishers and `hold` idle devices registered
/// through its API; with `routed`, devices send JSON telemetry that [`BENCH_ROUTE`] delivers
/// to the hub's module `sink`, which is the subscriber.
pub fn fleethub_with(devices: usize, hold: usize, sizing: Sizing, routed: bool) -> Result<Target> {
    fleethub_in(temp_dir("fleethub")?, devices, hold, sizing, routed)
}

/// fleethub in its own process with `config` (TOML: routes, endpoints) over the embedded
/// defaults, and `devices` publishers registered.
pub fn fleethub_configured(devices: usize, sizing: Sizing, config: &str) -> Result<Target> {
    let dir = temp_dir("fleethub")?;
    std::fs::write(dir.join("hub.toml"), config)?;
    fleethub_in(dir, devices, 0, sizing, false)
}

fn fleethub_in(
    dir: PathBuf,
    devices: usize,
    hold: usize,
    sizing: Sizing,
    routed: bool,
) -> Result<Target> {
    // The live heap is counted for memory runs (`--hold`) only.
    let mut child = spawn_broker_at(
        "fleethub",
        &dir,
        devices + hold + 16,
        sizing,
        "127.0.0.1:0",
        hold > 0,
    )?;
    let data_dir = dir.join("data");
    let endpoints = wait_for_file(&mut child, &data_dir.join("endpoints.json"), |t| {
        serde_json::from_str::<fleethub::hub::Endpoints>(t).ok()
    });
    // From here on the target owns the process, so an error below still ends it.
    let mut target = Target {
        name: "fleethub",
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        transport: Transport::Plain,
        tls: None,
        devices: Vec::new(),
        held: Vec::new(),
        subscriber: ClientSpec {
            id: String::new(),
            credentials: None,
            topic: String::new(),
        },
        child: Some(child),
        dir,
    };
    let endpoints = endpoints?;
    let token = std::fs::read_to_string(data_dir.join("admin-token"))?
        .trim()
        .to_string();
    target.addr = endpoints
        .mqtt
        .context("fleethub has no plain MQTT listener")?;
    if let (Some(mqtts), Some(wss)) = (endpoints.mqtts, endpoints.wss) {
        target.tls = Some(TlsAccess {
            mqtts,
            wss,
            config: trusting(&data_dir.join("tls").join("ca.pem"))?,
        });
    }
    let api = format!("http://{}", endpoints.api);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 24 * 3600;
    let client = fleethub::client::ApiClient::new(&api, &token);
    // Registers `id` and returns its MQTT credentials.
    let register = |id: String| {
        let client = client.clone();
        async move {
            use fleethub::api::wire::{CreateDevice, CreateModule};
            let view = match id.split_once('/') {
                None => {
                    let body = CreateDevice {
                        device_id: id.clone(),
                        ..Default::default()
                    };
                    client.create_device(&body).await
                }
                Some((d, m)) => {
                    let body = CreateModule {
                        module_id: m.to_string(),
                        ..Default::default()
                    };
                    client.create_module(d, &body).await
                }
            }
            .with_context(|| format!("registering {id}"))?;
            let key = view.identity.authentication.symmetric_key.primary_key;
            let identity = fleethub::identity::IdentityKey::parse(&id)?;
            let sas = fleethub::sas::generate(
                &fleethub::sas::resource_for("localhost", &identity),
                &key,
                expiry,
            )?;
            let user = format!("localhost/{id}/?api-version=2021-04-12");
            Ok::<_, anyhow::Error>((id, (user, sas)))
        }
    };
    let (devices, held, sink) = rt.block_on(async {
        let mut devices = Vec::with_capacity(devices);
        for i in 0..devices.capacity() {
            let (id, creds) = register(format!("dev{i}")).await?;
            let topic = if routed {
                format!("devices/{id}/messages/events/$.ct=application%2Fjson&$.ce=utf-8")
            } else {
                format!("devices/{id}/messages/events/")
            };
            devices.push(ClientSpec {
                id,
                credentials: Some(creds),
                topic,
            });
        }
        // Idle devices, registered 16 at a time.
        let mut held = Vec::with_capacity(hold);
        let mut pending = tokio::task::JoinSet::new();
        for i in 0..hold {
            if pending.len() >= 16 {
                if let Some(r) = pending.join_next().await {
                    held.push(r??);
                }
            }
            pending.spawn(register(format!("hold{i}")));
        }
        while let Some(r) = pending.join_next().await {
            held.push(r??);
        }
        let held = held
            .into_iter()
            .map(|(id, creds)| ClientSpec {
                id,
                credentials: Some(creds),
                topic: String::new(),
            })
            .collect::<Vec<_>>();
        if !routed {
            return Ok::<_, anyhow::Error>((devices, held, None));
        }
        let (id, creds) = register("fleethub/sink".to_string()).await?;
        let patch = fleethub::api::wire::TwinPatch {
            properties: Some(fleethub::api::wire::TwinPatchProperties {
                desired: Some(json!({ "routes": { "bench": BENCH_ROUTE } })),
                reported: None,
            }),
            ..Default::default()
        };
        let edge_hub = fleethub::identity::IdentityKey::parse("fleethub/$edgeHub")?;
        client
            .patch_twin(&edge_hub, &patch, None)
            .await
            .context("installing the route")?;
        let sink = ClientSpec {
            id,
            credentials: Some(creds),
            topic: "devices/fleethub/modules/sink/inputs/#".into(),
        };
        Ok((devices, held, Some(sink)))
    })?;
    target.devices = devices;
    target.held = held;
    target.subscriber = sink.unwrap_or(ClientSpec {
        id: "bench-monitor".into(),
        credentials: Some(("$service".into(), token)),
        topic: "$fleethub/events/#".into(),
    });
    Ok(target)
}
