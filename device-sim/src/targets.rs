//! The brokers a benchmark runs against, each started in this process on its own threads:
//! fleethub (its library `run`, on its own runtime) and a bare rumqttd with the same router
//! sizing. Each target says how its clients connect and which topics they use.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rumqttc::MqttOptions;
use serde_json::json;

/// One simulated client: its id, credentials, and the topic it publishes (or the filter it
/// subscribes to).
pub struct ClientSpec {
    pub id: String,
    pub credentials: Option<(String, String)>,
    pub topic: String,
}

/// How a load's clients reach a broker.
pub struct Target {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub devices: Vec<ClientSpec>,
    pub subscriber: ClientSpec,
    _stop: Option<tokio::sync::oneshot::Sender<()>>,
    data_dir: Option<PathBuf>,
}

impl Target {
    pub fn device_options(&self, i: usize) -> (MqttOptions, String) {
        let c = &self.devices[i];
        (options(self.addr, &c.id, &c.credentials), c.topic.clone())
    }

    pub fn subscriber_options(&self) -> (MqttOptions, String) {
        let c = &self.subscriber;
        (options(self.addr, &c.id, &c.credentials), c.topic.clone())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(stop) = self._stop.take() {
            let _ = stop.send(());
        }
        if let Some(dir) = &self.data_dir {
            std::thread::sleep(Duration::from_millis(200));
            let _ = std::fs::remove_dir_all(dir);
        }
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

fn free_port() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// Router log sizing, the same for both targets so neither gets bigger buffers. rumqttd's
/// logs are rings: a subscriber further behind than this loses messages, in either broker.
#[derive(Debug, Clone, Copy)]
pub struct Sizing {
    pub segment_bytes: usize,
    pub segment_count: usize,
}

/// A bare rumqttd: one v4 listener, no auth, dynamic filters.
pub fn rumqttd(devices: usize, sizing: Sizing) -> Result<Target> {
    let addr = spawn_bare_rumqttd(devices + 16, sizing)?;
    Ok(Target {
        name: "rumqttd",
        addr,
        devices: (0..devices)
            .map(|i| ClientSpec {
                id: format!("dev{i}"),
                credentials: None,
                topic: format!("bench/dev{i}/events"),
            })
            .collect(),
        subscriber: ClientSpec {
            id: "bench-sub".into(),
            credentials: None,
            topic: "bench/#".into(),
        },
        _stop: None,
        data_dir: None,
    })
}

/// Starts a bare rumqttd (no auth, dynamic filters) on its own thread, on an ephemeral port
/// of 127.0.0.1, and returns its address once it listens.
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
    wait_for_port(addr)?;
    Ok(addr)
}

fn wait_for_port(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("broker did not listen on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// fleethub with its embedded defaults on ephemeral ports, in a temp data directory, with
/// `devices` registered through its API.
pub fn fleethub(devices: usize, sizing: Sizing) -> Result<Target> {
    fleethub_with(devices, sizing, false)
}

/// The route the routed benchmark installs: a `$body` condition into a module input.
pub const BENCH_ROUTE: &str = "FROM /messages/* WHERE $body.temperature > 0 INTO BrokeredEndpoint(\"/modules/sink/inputs/in\")";

/// fleethub; with `routed`, devices send JSON telemetry that [`BENCH_ROUTE`] delivers to the
/// hub's module `sink`, which is the subscriber.
pub fn fleethub_with(devices: usize, sizing: Sizing, routed: bool) -> Result<Target> {
    let data_dir = std::env::temp_dir().join(format!(
        "device-sim-bench-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let overrides = fleethub::config::Overrides {
        data_dir: Some(data_dir.clone()),
        mqtt: Some("127.0.0.1:0".into()),
        mqtts: Some("off".into()),
        api: Some("127.0.0.1:0".into()),
    };
    let mut config = fleethub::Config::load(None, &overrides)?;
    config.router.max_segment_bytes = sizing.segment_bytes;
    config.router.max_segment_count = sizing.segment_count;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("bench-fleethub".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("fleethub")
                .build()
            else {
                return;
            };
            let _ = rt.block_on(fleethub::run(config, async {
                let _ = stop_rx.await;
            }));
        })?;
    let endpoints_path = data_dir.join("endpoints.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    let endpoints: fleethub::hub::Endpoints = loop {
        if let Some(e) = std::fs::read_to_string(&endpoints_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
        {
            break e;
        }
        if Instant::now() > deadline {
            bail!("fleethub did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let token = std::fs::read_to_string(data_dir.join("admin-token"))?
        .trim()
        .to_string();
    let addr = endpoints
        .mqtt
        .context("fleethub has no plain MQTT listener")?;
    let api = format!("http://{}", endpoints.api);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let list = rt.block_on(async {
        let http = reqwest::Client::new();
        let mut list = Vec::with_capacity(devices);
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            + 24 * 3600;
        for i in 0..devices {
            let id = format!("dev{i}");
            let resp = http
                .post(format!("{api}/devices"))
                .bearer_auth(&token)
                .json(&json!({ "deviceId": id }))
                .send()
                .await?;
            if !resp.status().is_success() {
                bail!(
                    "registering {id}: {}",
                    resp.text().await.unwrap_or_default()
                );
            }
            let v: serde_json::Value = resp.json().await?;
            let key = v["authentication"]["symmetricKey"]["primaryKey"]
                .as_str()
                .context("no key")?
                .to_string();
            let identity = fleethub::identity::IdentityKey::parse(&id)?;
            let sas = fleethub::sas::generate(
                &fleethub::sas::resource_for("localhost", &identity),
                &key,
                expiry,
            )?;
            let user = format!("localhost/{id}/?api-version=2021-04-12");
            let topic = if routed {
                format!("devices/{id}/messages/events/$.ct=application%2Fjson&$.ce=utf-8")
            } else {
                format!("devices/{id}/messages/events/")
            };
            list.push(ClientSpec {
                id: id.clone(),
                credentials: Some((user, sas)),
                topic,
            });
        }
        if !routed {
            return Ok::<_, anyhow::Error>((list, None));
        }
        let resp = http
            .post(format!("{api}/devices/fleethub/modules"))
            .bearer_auth(&token)
            .json(&json!({ "moduleId": "sink" }))
            .send()
            .await?;
        let v: serde_json::Value = resp.json().await?;
        let key = v["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .context("no module key")?
            .to_string();
        let resp = http
            .patch(format!("{api}/twins/fleethub/modules/$edgeHub"))
            .bearer_auth(&token)
            .json(&json!({ "properties": { "desired": { "routes": { "bench": BENCH_ROUTE } } } }))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!(
                "installing the route: {}",
                resp.text().await.unwrap_or_default()
            );
        }
        let identity = fleethub::identity::IdentityKey::parse("fleethub/sink")?;
        let sas = fleethub::sas::generate(
            &fleethub::sas::resource_for("localhost", &identity),
            &key,
            expiry,
        )?;
        let sink = ClientSpec {
            id: "fleethub/sink".into(),
            credentials: Some((
                "localhost/fleethub/sink/?api-version=2021-04-12".into(),
                sas,
            )),
            topic: "devices/fleethub/modules/sink/inputs/#".into(),
        };
        Ok::<_, anyhow::Error>((list, Some(sink)))
    })?;
    let (list, sink) = list;
    Ok(Target {
        name: "fleethub",
        addr,
        devices: list,
        subscriber: sink.unwrap_or(ClientSpec {
            id: "bench-monitor".into(),
            credentials: Some(("$service".into(), token)),
            topic: "$fleethub/events/#".into(),
        }),
        _stop: Some(stop_tx),
        data_dir: Some(data_dir),
    })
}
