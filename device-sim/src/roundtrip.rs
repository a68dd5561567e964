//! Request/response round trips: every device sends a request, waits for its answer, and
//! repeats (closed loop). Against fleethub the request is a reported-property patch and the
//! answer its `204` (committed to disk first); against bare rumqttd an echo client answers
//! each request on the device's response topic — the same broker round trip with no twin
//! store behind it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use serde_json::{json, Value};

use crate::targets::Target;

pub struct RoundTripResult {
    pub target: &'static str,
    pub devices: usize,
    pub completed: u64,
    pub elapsed: Duration,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl RoundTripResult {
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn json(&self) -> Value {
        json!({
            "target": self.target,
            "devices": self.devices,
            "round_trips": self.completed,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "round_trips_per_s": self.rate(),
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
        })
    }
}

async fn wait_connack(events: &mut EventLoop) -> Result<()> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("connect failed: {e}"),
            Err(_) => bail!("no CONNACK"),
        }
    }
}

async fn wait_suback(events: &mut EventLoop) -> Result<()> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("subscribe failed: {e}"),
            Err(_) => bail!("no SUBACK"),
        }
    }
}

/// The topics one device uses on a target: (request topic for a rid, response filter).
fn topics(target: &Target, device: &str, rid: u64) -> (String, String) {
    if target.name == "fleethub" {
        (
            format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
            "$iothub/twin/res/#".to_string(),
        )
    } else {
        (
            format!("rt/req/{device}/{rid}"),
            format!("rt/res/{device}/#"),
        )
    }
}

pub async fn run(
    target: &Target,
    per_device: usize,
    payload_bytes: usize,
) -> Result<RoundTripResult> {
    // The rumqttd baseline needs someone to answer.
    let echo = if target.name == "fleethub" {
        None
    } else {
        let (mut options, _) = target.subscriber_options();
        options.set_client_id("rt-echo".into());
        let (client, mut events) = AsyncClient::new(options, 1000);
        wait_connack(&mut events).await?;
        client.subscribe("rt/req/#", QoS::AtMostOnce).await?;
        wait_suback(&mut events).await?;
        Some(tokio::spawn(async move {
            while let Ok(event) = events.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = event {
                    let topic = p.topic.replacen("rt/req/", "rt/res/", 1);
                    if client
                        .try_publish(topic, QoS::AtMostOnce, false, p.payload.to_vec())
                        .is_err()
                    {
                        let _ = client
                            .publish(
                                p.topic.replacen("rt/req/", "rt/res/", 1),
                                QoS::AtMostOnce,
                                false,
                                Vec::new(),
                            )
                            .await;
                    }
                }
            }
        }))
    };

    let devices = target.devices.len();
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(
        devices * per_device,
    )));
    let mut clients = Vec::new();
    for i in 0..devices {
        let (options, _) = target.device_options(i);
        let (client, mut events) = AsyncClient::new(options, 10);
        wait_connack(&mut events).await?;
        let id = target.devices[i].id.clone();
        let (_, filter) = topics(target, &id, 0);
        client.subscribe(filter, QoS::AtMostOnce).await?;
        wait_suback(&mut events).await?;
        clients.push((id, client, events));
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (id, client, mut events) in clients {
        let latencies = latencies.clone();
        let is_hub = target.name == "fleethub";
        let topics_for: Vec<String> = (1..=per_device as u64)
            .map(|rid| {
                if is_hub {
                    format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}")
                } else {
                    format!("rt/req/{id}/{rid}")
                }
            })
            .collect();
        let body = json!({ "counter": 0, "pad": "x".repeat(payload_bytes.saturating_sub(24)) })
            .to_string();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            for (i, topic) in topics_for.into_iter().enumerate() {
                let sent = Instant::now();
                if client
                    .publish(topic, QoS::AtMostOnce, false, body.clone())
                    .await
                    .is_err()
                {
                    break;
                }
                let want = format!("$rid={}", i + 1);
                let want_plain = format!("/{}", i + 1);
                loop {
                    match tokio::time::timeout(Duration::from_secs(30), events.poll()).await {
                        Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                            let hit = if is_hub {
                                p.topic.contains(&want)
                                    && p.topic.starts_with("$iothub/twin/res/204/")
                            } else {
                                p.topic.ends_with(&want_plain)
                            };
                            if hit {
                                break;
                            }
                        }
                        Ok(Ok(_)) => {}
                        _ => return done,
                    }
                }
                if let Ok(mut l) = latencies.lock() {
                    l.push(sent.elapsed().as_micros() as u64);
                }
                done += 1;
            }
            done
        }));
    }
    let mut completed = 0;
    for t in tasks {
        completed += t.await.unwrap_or(0);
    }
    let elapsed = start.elapsed();
    if let Some(e) = echo {
        e.abort();
    }
    let mut lat = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    lat.sort_unstable();
    let pct = |p: f64| {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
        }
    };
    Ok(RoundTripResult {
        target: target.name,
        devices,
        completed,
        elapsed,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    })
}
