//! `monitor-events`: telemetry over the MQTT service connection (like `az iot hub
//! monitor-events`): the live view by default (what arrives while it runs, never kept), or
//! the events endpoint through a consumer group (`--consumer-group`), from its checkpoint.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::Args;
use serde_json::{json, Value};

use super::{parse_duration, Ctx, Output};

#[derive(Args, Debug)]
pub struct MonitorArgs {
    #[arg(long)]
    device: Option<String>,
    #[arg(long, requires = "device")]
    module: Option<String>,
    /// MQTT address of the hub [default: the hub's plain MQTT endpoint]
    #[arg(long)]
    mqtt: Option<String>,
    /// Stop after this long (e.g. 30s)
    #[arg(long)]
    timeout: Option<String>,
    /// Stop after this many events
    #[arg(long)]
    count: Option<u64>,
    /// Read the events endpoint through this consumer group, from its checkpoint (its
    /// acknowledgements move it); without it, the live view
    #[arg(long, conflicts_with = "device")]
    consumer_group: Option<String>,
    /// With --consumer-group: where a group that does not exist yet starts (start, end
    /// or an RFC 3339 time); it is created
    #[arg(long, requires = "consumer_group")]
    from: Option<String>,
}

impl MonitorArgs {
    pub async fn run(&self, ctx: &Ctx) -> Result<()> {
        let (device, module, mqtt, timeout, count) = (
            self.device.as_deref(),
            self.module.as_deref(),
            self.mqtt.as_deref(),
            self.timeout.as_deref(),
            self.count,
        );
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        let addr = match mqtt {
            Some(a) => a.to_string(),
            None => ctx
                .api
                .hub()
                .await?
                .endpoints
                .and_then(|e| e.mqtt)
                .context("the hub has no plain MQTT listener; pass --mqtt")?
                .to_string(),
        };
        let (host, port) = addr.rsplit_once(':').context("--mqtt must be host:port")?;
        let port: u16 = port.parse().context("--mqtt port")?;
        let client_id = format!("monitor-{:08x}", rand::random::<u32>());
        let mut options = MqttOptions::new(client_id, host.trim_matches(['[', ']']), port);
        options.set_credentials(crate::mqtt::SERVICE_USERNAME, ctx.token.clone());
        options.set_max_packet_size(1024 * 1024, 1024 * 1024);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = AsyncClient::new(options, 100);
        if let (Some(group), Some(from)) = (&self.consumer_group, &self.from) {
            match ctx.api.consumer_group(group).await {
                Ok(_) => ctx.progress(&format!(
                    "consumer group {group} exists: reading from its checkpoint, not --from"
                )),
                Err(_) => {
                    ctx.api.create_consumer_group(group, from).await?;
                }
            }
        }
        let filter = match (device, module, &self.consumer_group) {
            (_, _, Some(g)) => format!("$share/{g}/{}", crate::topics::EVENTS_ALL),
            (Some(d), Some(m), None) => format!(
                "$fleethub/events/{}/{}/#",
                crate::topics::encode_id(d),
                crate::topics::encode_id(m)
            ),
            (Some(d), None, None) => {
                format!("$fleethub/events/{}/#", crate::topics::encode_id(d))
            }
            // Every device's telemetry, live (`#` alone would read the $Default group).
            _ => "$fleethub/events/+/#".to_string(),
        };
        client.subscribe(filter, QoS::AtLeastOnce).await?;
        let deadline = timeout
            .map(parse_duration)
            .transpose()?
            .map(|d| tokio::time::Instant::now() + d);
        let mut seen = 0u64;
        ctx.progress(&format!(
            "Monitoring telemetry at {addr}. Press Ctrl+C to stop."
        ));
        loop {
            if count.is_some_and(|c| seen >= c) {
                break;
            }
            let next = async {
                match deadline {
                    Some(d) => tokio::time::timeout_at(d, events.poll()).await.ok(),
                    None => Some(events.poll().await),
                }
            };
            let event = tokio::select! {
                e = next => e,
                _ = tokio::signal::ctrl_c() => None,
            };
            match event {
                None => break,
                Some(Ok(Event::Incoming(Packet::ConnAck(ack))))
                    if ack.code != rumqttc::ConnectReturnCode::Success =>
                {
                    bail!("the hub refused the monitor connection: {:?}", ack.code)
                }
                Some(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        bail!("the hub refused the telemetry subscription (is the consumer group there? fleethub consumer-group list)");
                    }
                }
                Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    if let Some(event) = describe_event(&p.topic, &p.payload) {
                        seen += 1;
                        match ctx.output {
                            Output::Json => println!("{}", event),
                            Output::Text => println!(
                                "{}",
                                serde_json::to_string_pretty(&json!({ "event": event }))
                                    .unwrap_or_default()
                            ),
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("connection to {addr} failed: {e}"),
            }
        }
        let _ = client.disconnect().await;
        Ok(())
    }
}

/// Turns a `$fleethub/events/{d}/{m}/{bag}` delivery into the event JSON printed.
pub fn describe_event(topic: &str, payload: &[u8]) -> Option<Value> {
    let rest = topic.strip_prefix(crate::topics::SERVICE_EVENTS_PREFIX)?;
    let (device, module, bag) = crate::topics::split_telemetry_ids(rest)?;
    let message =
        fleethub_router::Message::from_bag(bag, bytes::Bytes::copy_from_slice(payload)).ok()?;
    let body = match std::str::from_utf8(payload) {
        Ok(s) => serde_json::from_str::<Value>(s).unwrap_or_else(|_| Value::String(s.to_string())),
        Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(payload) }),
    };
    let system: serde_json::Map<String, Value> = message
        .system
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let application: serde_json::Map<String, Value> = message
        .properties
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    Some(json!({
        "origin": device,
        "module": module.unwrap_or_default(),
        "payload": body,
        "properties": { "system": system, "application": application },
    }))
}
