//! One simulated identity (a device, a device's module, or a module of the hub's own
//! identity) speaking the IoT Hub MQTT topics the way the Azure SDKs do: telemetry with a
//! property bag, direct methods answered, desired properties fetched at connect and applied as
//! patches arrive, `lastDesiredStatus` reported, module inputs counted (and forwarded by
//! pipeline modules). A dropped connection is retried with exponential backoff and jitter.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleethub_router::message::Message;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::scenario::Plan;
use crate::stats::{now_us, Stats};

/// The application property carrying a message's send time, for end-to-end latency.
pub const SENT_PROPERTY: &str = "simSentUs";

#[derive(Debug, Clone)]
pub struct Identity {
    pub device: String,
    pub module: Option<String>,
    /// Base64 symmetric key.
    pub key: String,
}

impl Identity {
    pub fn client_id(&self) -> String {
        match &self.module {
            Some(m) => format!("{}/{m}", self.device),
            None => self.device.clone(),
        }
    }

    /// `devices/{d}/` or `devices/{d}/modules/{m}/`.
    fn topic_root(&self) -> String {
        match &self.module {
            Some(m) => format!("devices/{}/modules/{m}/", self.device),
            None => format!("devices/{}/", self.device),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Role {
    /// A device: sends telemetry, answers methods, applies desired properties.
    Device,
    /// A module of a simulated device: the same, telemetry on its output, and counts inputs.
    DeviceModule,
    /// A module of the hub's identity: a route sink (counts inputs), optionally forwarding
    /// everything to an output so routes can chain it.
    HubModule { forward_to: Option<String> },
}

/// What every identity shares.
pub struct Ctx {
    pub plan: Arc<Plan>,
    pub stats: Arc<Stats>,
    pub hostname: String,
    /// Where devices connect: one hub, or a cluster's nodes (never empty).
    pub mqtt: Vec<SocketAddr>,
    /// SAS expiry, seconds since the epoch.
    pub expiry: u64,
    /// Set to true when identities should disconnect and end.
    pub stop: watch::Receiver<bool>,
    /// Set to true when senders may start (the fleet has connected).
    pub go: watch::Receiver<bool>,
}

/// The address of `nodes` a client id goes to: the same one every time (FNV-1a of the id), so
/// a fleet spreads evenly over a cluster's nodes as behind a hashing load balancer.
pub fn node_for(nodes: &[SocketAddr], client_id: &str) -> SocketAddr {
    let hash = client_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    });
    nodes[(hash % nodes.len().max(1) as u64) as usize]
}

fn options(ctx: &Ctx, id: &Identity) -> anyhow::Result<MqttOptions> {
    let key = fleethub::identity::IdentityKey::parse(&id.client_id())?;
    let sas = fleethub::sas::generate(
        &fleethub::sas::resource_for(&ctx.hostname, &key),
        &id.key,
        ctx.expiry,
    )?;
    let user = format!(
        "{}/{}/?api-version=2021-04-12",
        ctx.hostname,
        id.client_id()
    );
    let addr = node_for(&ctx.mqtt, &id.client_id());
    let mut o = MqttOptions::new(id.client_id(), addr.ip().to_string(), addr.port());
    o.set_credentials(user, sas);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_max_packet_size(512 * 1024, 512 * 1024);
    // As the Azure IoT SDKs connect: a persistent session (clean session 0). rumqttc keeps
    // unacknowledged publishes across a reconnect only when the session is present, so a
    // hub that stops with publishes in flight (their PUBACK waits for the durable commit) gets
    // them again when it is back, instead of the device dropping them.
    o.set_clean_session(false);
    Ok(o)
}

fn qos(q: u8) -> QoS {
    if q == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// Runs one identity until `ctx.stop`. Returns when it has disconnected.
pub async fn run(id: Identity, role: Role, ctx: Arc<Ctx>) {
    let options = match options(&ctx, &id) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{}: {e:#}", id.client_id());
            ctx.stats.errors.inc();
            return;
        }
    };
    let (client, mut events) = AsyncClient::new(options, 64);
    let (connected_tx, connected_rx) = watch::channel(false);
    let sender = match role {
        Role::Device | Role::DeviceModule => Some(tokio::spawn(send_telemetry(
            id.clone(),
            client.clone(),
            ctx.clone(),
            connected_rx,
        ))),
        Role::HubModule { .. } => None,
    };
    let mut state = State {
        id: &id,
        role: &role,
        ctx: &ctx,
        client: &client,
        next_rid: 1,
        get_rid: None,
        applied_version: None,
        reports: std::collections::HashMap::new(),
    };
    let mut stop = ctx.stop.clone();
    let mut backoff = Duration::from_millis(200);
    let mut is_connected = false;
    loop {
        let event = tokio::select! {
            e = events.poll() => e,
            _ = stop.wait_for(|s| *s) => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if !is_connected {
                    is_connected = true;
                    ctx.stats.connected();
                }
                backoff = Duration::from_millis(200);
                let _ = connected_tx.send(true);
                state.on_connect().await;
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => state.on_suback().await,
            Ok(Event::Incoming(Packet::Publish(p))) => state.on_publish(p).await,
            Ok(Event::Incoming(Packet::PubAck(_))) => ctx.stats.acked.inc(),
            Ok(_) => {}
            Err(_) => {
                if is_connected {
                    is_connected = false;
                    ctx.stats.connected.dec();
                    ctx.stats.reconnects.inc();
                }
                let _ = connected_tx.send(false);
                ctx.stats.errors.inc();
                let jitter = rand::thread_rng().gen_range(0..=backoff.as_millis() as u64 / 2);
                tokio::select! {
                    _ = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    if let Some(s) = sender {
        s.abort();
    }
    if is_connected {
        // Let in-flight acks arrive before the connection goes.
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(e) = events.poll().await {
                if let Event::Incoming(Packet::PubAck(_)) = e {
                    ctx.stats.acked.inc();
                }
            }
        })
        .await;
        ctx.stats.connected.dec();
    }
}

/// Publishes `plan.messages_per_sender()` messages at the plan's rate, from when the fleet is
/// connected, with a random phase so a fleet does not send in lockstep.
async fn send_telemetry(
    id: Identity,
    client: AsyncClient,
    ctx: Arc<Ctx>,
    mut connected: watch::Receiver<bool>,
) {
    let plan = &ctx.plan;
    let mut go = ctx.go.clone();
    if go.wait_for(|g| *g).await.is_err() || connected.wait_for(|c| *c).await.is_err() {
        return;
    }
    let mut rng = rand::rngs::StdRng::from_entropy();
    let period = Duration::from_secs_f64(1.0 / plan.rate);
    tokio::time::sleep(period.mul_f64(rng.gen_range(0.0..1.0))).await;
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = plan.body.state();
    let topic_root = format!("{}messages/events/", id.topic_root());
    let client_id = id.client_id();
    for seq in 0..plan.messages_per_sender() {
        ticks.tick().await;
        let body = plan.body.render(&id.device, &mut state, &mut rng);
        let mut message = Message::default();
        message.system.content_type = Some("application/json".into());
        message.system.content_encoding = Some("utf-8".into());
        message.system.message_id = Some(format!("{client_id}-{seq}"));
        if id.module.is_some() {
            message.system.output_name = Some(plan.output.clone());
        }
        message.properties = plan
            .properties
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        message
            .properties
            .push((SENT_PROPERTY.into(), Some(now_us().to_string())));
        let topic = format!("{topic_root}{}", message.to_bag());
        let payload = serde_json::to_vec(&body).unwrap_or_default();
        if client
            .publish(topic, qos(plan.qos), false, payload)
            .await
            .is_err()
        {
            return;
        }
        ctx.stats.sent.inc();
    }
}

struct State<'a> {
    id: &'a Identity,
    role: &'a Role,
    ctx: &'a Ctx,
    client: &'a AsyncClient,
    next_rid: u64,
    /// The request id of the twin GET in flight.
    get_rid: Option<String>,
    /// The desired `$version` last applied (and reported).
    applied_version: Option<u64>,
    /// Request ids of reported patches awaiting their answer, and whether each reports a
    /// failure.
    reports: std::collections::HashMap<String, bool>,
}

impl State<'_> {
    fn rid(&mut self) -> String {
        self.next_rid += 1;
        self.next_rid.to_string()
    }

    /// After every CONNACK: the session is clean, so subscribe again and fetch the twin.
    async fn on_connect(&mut self) {
        let plan = &self.ctx.plan;
        let mut filters: Vec<String> = Vec::new();
        let hub_module = matches!(self.role, Role::HubModule { .. });
        if plan.methods && !hub_module {
            filters.push("$iothub/methods/POST/#".into());
        }
        if plan.twin && !hub_module {
            filters.push("$iothub/twin/res/#".into());
            filters.push("$iothub/twin/PATCH/properties/desired/#".into());
        }
        match self.role {
            Role::Device if plan.c2d => {
                filters.push(format!("devices/{}/messages/devicebound/#", self.id.device));
            }
            Role::DeviceModule | Role::HubModule { .. } => {
                filters.push(format!("{}inputs/#", self.id.topic_root()));
            }
            Role::Device => {}
        }
        if filters.is_empty() {
            return;
        }
        let subscribe = filters
            .into_iter()
            .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce));
        if self.client.subscribe_many(subscribe).await.is_err() {
            self.ctx.stats.errors.inc();
        }
    }

    /// The subscriptions are in place: fetch the twin, as the SDKs do, only now, so its
    /// answer cannot overtake the subscription it arrives on.
    async fn on_suback(&mut self) {
        let hub_module = matches!(self.role, Role::HubModule { .. });
        if self.ctx.plan.twin && !hub_module {
            let rid = self.rid();
            self.get_rid = Some(rid.clone());
            let _ = self
                .client
                .publish(
                    format!("$iothub/twin/GET/?$rid={rid}"),
                    QoS::AtMostOnce,
                    false,
                    Vec::new(),
                )
                .await;
        }
    }

    async fn on_publish(&mut self, p: Publish) {
        let topic = p.topic.clone();
        if let Some(rest) = topic.strip_prefix("$iothub/methods/POST/") {
            self.answer_method(rest, &p.payload).await;
        } else if let Some(rest) = topic.strip_prefix("$iothub/twin/res/") {
            self.twin_response(rest, &p.payload).await;
        } else if let Some(rest) = topic.strip_prefix("$iothub/twin/PATCH/properties/desired/") {
            let version = query_value(rest, "$version").and_then(|v| v.parse().ok());
            self.ctx.stats.desired_arrived();
            if let Some(v) = version {
                self.apply_desired(v).await;
            }
        } else if topic.contains("/messages/devicebound/") {
            self.ctx.stats.c2d_received.inc();
        } else if let Some(rest) = topic.strip_prefix(&format!("{}inputs/", self.id.topic_root())) {
            self.input(rest, p.payload).await;
        }
    }

    async fn answer_method(&mut self, rest: &str, payload: &[u8]) {
        let (name, query) = rest.split_once('/').unwrap_or((rest, ""));
        let Some(rid) = query_value(query, "$rid") else {
            self.ctx.stats.errors.inc();
            return;
        };
        let request: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
        let answer = json!({ "device": self.id.client_id(), "method": name, "request": request });
        let ok = self
            .client
            .publish(
                format!("$iothub/methods/res/200/?$rid={rid}"),
                QoS::AtMostOnce,
                false,
                answer.to_string(),
            )
            .await
            .is_ok();
        if ok {
            self.ctx.stats.methods_answered.inc();
        }
    }

    async fn twin_response(&mut self, rest: &str, payload: &[u8]) {
        let (status, query) = rest.split_once('/').unwrap_or((rest, ""));
        let status: u16 = status.parse().unwrap_or(0);
        let rid = query_value(query, "$rid").unwrap_or_default();
        if let Some(failed) = self.reports.remove(&rid) {
            let stats = &self.ctx.stats;
            match (200..300).contains(&status) {
                false => stats.errors.inc(),
                true if failed => stats.reported_failed.inc(),
                true => stats.reported_ok(),
            }
            return;
        }
        if self.get_rid.as_deref() == Some(rid.as_str()) {
            self.get_rid = None;
            if status != 200 {
                self.ctx.stats.errors.inc();
                return;
            }
            let twin: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
            if let Some(v) = twin["desired"]["$version"].as_u64() {
                self.apply_desired(v).await;
            }
        }
    }

    /// Applies desired `version` (after the plan's delay) and reports the outcome the way
    /// IoT Edge agents do: `lastDesiredVersion` and `lastDesiredStatus.code` (200 or 500).
    async fn apply_desired(&mut self, version: u64) {
        // Version 1 (0 on hubs that start twins there) is a twin nobody has set desired
        // properties on: nothing to apply.
        if version <= 1 || self.applied_version.is_some_and(|v| v >= version) {
            return;
        }
        self.applied_version = Some(version);
        let plan = &self.ctx.plan;
        let failed = fails(&self.id.client_id(), version, plan.failure_percent);
        let (code, description) = if failed {
            (500, "simulated failure")
        } else {
            (200, "applied")
        };
        let report = json!({
            "lastDesiredVersion": version,
            "lastDesiredStatus": { "code": code, "description": description },
        });
        let rid = self.rid();
        self.reports.insert(rid.clone(), failed);
        let client = self.client.clone();
        let delay = plan.apply_delay;
        // The delay runs on its own task so the connection keeps being served meanwhile.
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = client
                .publish(
                    format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
                    QoS::AtMostOnce,
                    false,
                    report.to_string(),
                )
                .await;
        });
    }

    /// A message on a module input: `{input}/{bag}`.
    async fn input(&mut self, rest: &str, body: Bytes) {
        let stats = &self.ctx.stats;
        stats.input_received.inc();
        let bag = rest.split_once('/').map(|(_, b)| b).unwrap_or("");
        let Ok(mut message) = Message::from_bag(bag, body) else {
            stats.errors.inc();
            return;
        };
        if let Some(sent) = message.property(SENT_PROPERTY).and_then(|v| v.parse().ok()) {
            stats.latency.record_since(sent);
        }
        if let Role::HubModule {
            forward_to: Some(output),
        } = self.role
        {
            // Forward as a module does: the original application properties and content
            // type, on our output; the hub sets the connection ids.
            message.system.output_name = Some(output.clone());
            message.system.connection_device_id = None;
            message.system.connection_module_id = None;
            message.system.enqueued_time = None;
            let topic = format!(
                "{}messages/events/{}",
                self.id.topic_root(),
                message.to_bag()
            );
            if self
                .client
                .publish(topic, QoS::AtLeastOnce, false, message.body.to_vec())
                .await
                .is_ok()
            {
                stats.forwarded.inc();
            }
        }
    }
}

/// Whether applying `version` fails on this identity: a stable hash, so a rerun fails the
/// same devices (and a new version re-rolls).
pub fn fails(client_id: &str, version: u64, percent: f64) -> bool {
    if percent <= 0.0 {
        return false;
    }
    let digest = Sha256::digest(format!("{client_id}/{version}").as_bytes());
    let n = u16::from_be_bytes([digest[0], digest[1]]) as f64 / 65536.0 * 100.0;
    n < percent
}

/// `value` of `key` in a `k=v&k2=v2` query (a leading `?` allowed).
fn query_value(query: &str, key: &str) -> Option<String> {
    query
        .trim_start_matches('?')
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values() {
        assert_eq!(
            query_value("?$rid=7&$version=3", "$rid").as_deref(),
            Some("7")
        );
        assert_eq!(
            query_value("$rid=7&$version=3", "$version").as_deref(),
            Some("3")
        );
        assert_eq!(query_value("$rid=7", "$version"), None);
        assert_eq!(query_value("$ridx=7", "$rid"), None);
    }

    #[test]
    fn failures_follow_the_percentage_and_are_stable() {
        let ids: Vec<String> = (0..10_000).map(|i| format!("d{i}")).collect();
        let failed = ids.iter().filter(|id| fails(id, 3, 5.0)).count();
        assert!((400..600).contains(&failed), "{failed}");
        assert!(ids.iter().all(|id| fails(id, 3, 5.0) == fails(id, 3, 5.0)));
        assert!(!ids.iter().any(|id| fails(id, 3, 0.0)));
        assert!(ids.iter().all(|id| fails(id, 3, 100.0)));
    }
}

#[cfg(test)]
mod node_tests {
    use super::node_for;

    #[test]
    fn devices_spread_over_the_nodes_and_each_keeps_its_node() {
        let nodes: Vec<std::net::SocketAddr> = (1..=3)
            .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
            .collect();
        let mut counts = [0usize; 3];
        for i in 0..3000 {
            let id = format!("sim-{i:05}");
            let at = node_for(&nodes, &id);
            assert_eq!(at, node_for(&nodes, &id), "the same node every time");
            counts[(at.port() - 1) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
        assert_eq!(node_for(&nodes[..1], "x"), nodes[0]);
    }
}
