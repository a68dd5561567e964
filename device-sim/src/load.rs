//! One load run: N publishing clients and one subscriber, all rumqttc on one runtime.
//! Every payload starts with its send time, so the subscriber measures end-to-end latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{json, Value};

use crate::targets::Target;

static EPOCH: OnceLock<Instant> = OnceLock::new();

fn now_micros() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

#[derive(Clone)]
pub struct LoadSpec {
    pub messages_per_device: usize,
    pub payload_bytes: usize,
    pub qos: QoS,
    /// JSON bodies (`{"ts":…,"temperature":…,"pad":"…"}`) for routes with `$body` conditions.
    pub json: bool,
    /// Publish everything first (every PUBACK in), then subscribe: the rate is how fast a
    /// reader drains a backlog (fleethub's events endpoint keeps it; a plain broker does not).
    pub backlog: bool,
    /// Messages per second in all, spread evenly over the devices (`None`: as fast as each
    /// device's inflight window allows). Latency at a rate the broker sustains, not under
    /// overload.
    pub rate: Option<f64>,
}

/// A body of about `size` bytes carrying the send time.
fn body(size: usize, json: bool, sent: u64) -> Vec<u8> {
    if json {
        let head = format!("{{\"ts\":{sent},\"temperature\":21.5,\"pad\":\"");
        let pad = size.saturating_sub(head.len() + 2);
        let mut b = head.into_bytes();
        b.extend(std::iter::repeat_n(b'x', pad));
        b.extend_from_slice(b"\"}");
        b
    } else {
        let mut b = vec![b'x'; size.max(8)];
        b[..8].copy_from_slice(&sent.to_be_bytes());
        b
    }
}

/// The send time a body carries.
fn sent_at(payload: &[u8]) -> Option<u64> {
    if let Some(rest) = payload.strip_prefix(b"{\"ts\":") {
        let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
        std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
    } else {
        Some(u64::from_be_bytes(payload.get(..8)?.try_into().ok()?))
    }
}

#[derive(Debug, Clone)]
pub struct LoadResult {
    pub target: &'static str,
    pub devices: usize,
    pub sent: u64,
    pub received: u64,
    pub elapsed: Duration,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Messages of an earlier round delivered again in this one (at-least-once: their
    /// acknowledgement had not reached the broker when that round's subscriber left).
    pub redelivered: u64,
    /// The broker process's CPU time over the run (from the first publish to the last
    /// receipt), when it is a process of its own.
    pub cpu_s: Option<f64>,
}

impl LoadResult {
    pub fn rate(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The broker's CPU time per message received, in nanoseconds.
    pub fn cpu_ns_per_message(&self) -> Option<f64> {
        Some(self.cpu_s? * 1e9 / self.received.max(1) as f64)
    }

    pub fn json(&self) -> Value {
        json!({
            "target": self.target,
            "devices": self.devices,
            "sent": self.sent,
            "received": self.received,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "messages_per_s": self.rate(),
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "redelivered_from_earlier_rounds": self.redelivered,
            "cpu_s": self.cpu_s,
            "cpu_ns_per_message": self.cpu_ns_per_message(),
        })
    }
}

pub async fn run(target: &Target, spec: &LoadSpec) -> Result<LoadResult> {
    let devices = target.devices.len();
    let expected = (devices * spec.messages_per_device) as u64;

    let received = Arc::new(AtomicU64::new(0));
    // Messages of this round are all sent after this moment. One sent before it comes from
    // an earlier round against the same broker: QoS 1 delivers it again because its PUBACK
    // had not reached the broker when that round's subscriber disconnected. Counted apart.
    let round_start = now_micros();
    let stale = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(expected as usize)));
    let last_rx = Arc::new(AtomicU64::new(0));
    // Subscriber first (after the publishers for a backlog), and wait for its SUBACK.
    let subscribe = || async {
        let (options, filter) = target.subscriber_options();
        let (sub, mut sub_events) = AsyncClient::new(options, 100);
        sub.subscribe(filter, spec.qos).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), sub_events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    // A backlog may start flowing before the SUBACK is seen.
                    if sent_at(&p.payload).is_some_and(|t| t < round_start) {
                        stale.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    last_rx.store(now_micros(), Ordering::Relaxed);
                    received.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!("{}: subscriber failed: {e}", target.name),
                Err(_) => bail!("{}: no SUBACK", target.name),
            }
        }
        let (received, latencies, last_rx, stale) = (
            received.clone(),
            latencies.clone(),
            last_rx.clone(),
            stale.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                match sub_events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let now = now_micros();
                        let sent = sent_at(&p.payload);
                        if sent.is_some_and(|t| t < round_start) {
                            stale.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        if let Some(sent) = sent {
                            if let Ok(mut l) = latencies.lock() {
                                l.push(now.saturating_sub(sent));
                            }
                        }
                        last_rx.store(now, Ordering::Relaxed);
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        Ok::<_, anyhow::Error>((sub, task))
    };
    let mut subscriber = None;
    if !spec.backlog {
        subscriber = Some(subscribe().await?);
    }

    // Connect every publisher before the clock starts.
    let mut clients = Vec::with_capacity(devices);
    for i in 0..devices {
        let (options, topic) = target.device_options(i);
        let (client, mut events) = AsyncClient::new(options, 10);
        loop {
            match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!("{}: device {i} failed to connect: {e}", target.name),
                Err(_) => bail!("{}: device {i}: no CONNACK", target.name),
            }
        }
        let acked = Arc::new(AtomicU64::new(0));
        let a = acked.clone();
        let poller = tokio::spawn(async move {
            while let Ok(event) = events.poll().await {
                if let Event::Incoming(Packet::PubAck(_)) = event {
                    a.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        clients.push((client, topic, acked, poller));
    }

    let start = now_micros();
    let cpu_start = target.cpu_seconds();
    let sent = Arc::new(AtomicU64::new(0));
    // Paced: device d sends its k-th message at start + k × interval (plus an offset, so
    // the devices take turns), catching up in a burst after a late wake-up.
    let interval = spec
        .rate
        .map(|r| Duration::from_secs_f64(devices as f64 / r.max(1.0)));
    let paced_from = tokio::time::Instant::now();
    let mut publishers = Vec::new();
    for (d, (client, topic, _, _)) in clients.iter().enumerate() {
        let (client, topic, sent) = (client.clone(), topic.clone(), sent.clone());
        let offset = interval.map(|i| i.mul_f64(d as f64 / devices.max(1) as f64));
        let (n, size, qos, json) = (
            spec.messages_per_device,
            spec.payload_bytes,
            spec.qos,
            spec.json,
        );
        publishers.push(tokio::spawn(async move {
            for k in 0..n {
                if let (Some(i), Some(o)) = (interval, offset) {
                    tokio::time::sleep_until(paced_from + o + i.mul_f64(k as f64)).await;
                }
                let payload = body(size, json, now_micros());
                if client
                    .publish(topic.clone(), qos, false, payload)
                    .await
                    .is_err()
                {
                    return;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for p in publishers {
        let _ = p.await;
    }
    let mut start = start;
    if spec.backlog {
        // Every message stored (acknowledged) before the reader comes: then the clock starts.
        let deadline = Instant::now() + Duration::from_secs(120);
        while clients
            .iter()
            .map(|(_, _, a, _)| a.load(Ordering::Relaxed))
            .sum::<u64>()
            < expected
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        start = now_micros();
        subscriber = Some(subscribe().await?);
    }
    // Wait for the subscriber to catch up; stop when nothing arrives for 5 s.
    let mut last_seen = (0, Instant::now());
    while received.load(Ordering::Relaxed) < expected {
        let r = received.load(Ordering::Relaxed);
        if r != last_seen.0 {
            last_seen = (r, Instant::now());
        } else if last_seen.1.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let end = last_rx.load(Ordering::Relaxed).max(start + 1);
    let cpu_s = cpu_start
        .zip(target.cpu_seconds())
        .map(|(a, b)| (b - a).max(0.0));
    for (client, _, _, poller) in clients {
        let _ = client.disconnect().await;
        poller.abort();
    }
    if let Some((sub, task)) = subscriber {
        task.abort();
        let _ = sub.disconnect().await;
    }
    let mut lat = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let idx = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[idx] as f64 / 1000.0
    };
    Ok(LoadResult {
        target: target.name,
        devices,
        sent: sent.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
        elapsed: Duration::from_micros(end - start),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        redelivered: stale.load(Ordering::Relaxed),
        cpu_s,
    })
}

/// Idle connections a broker holds while it is measured.
pub struct Held {
    clients: Vec<(AsyncClient, tokio::task::JoinHandle<()>)>,
    retries: u64,
}

impl Held {
    pub fn count(&self) -> u64 {
        self.clients.len() as u64
    }

    /// Handshakes that had to be retried.
    pub fn retries(&self) -> u64 {
        self.retries
    }

    /// Takes `other`'s connections into this set.
    pub fn extend(&mut self, other: Held) {
        self.clients.extend(other.clients);
        self.retries += other.retries;
    }

    /// Disconnects them all.
    pub async fn release(self) {
        for (client, poller) in self.clients {
            let _ = client.try_disconnect();
            poller.abort();
        }
    }
}

/// Connects every one of `target.held`, at most 200 handshakes at a time, each kept alive by
/// its own task. Fails if any is refused.
/// Connects the target's idle clients. With `sessions`, each connects as the Azure IoT SDKs
/// do (clean session 0) and subscribes to an SDK device's four topic families (C2D, twin
/// responses, desired patches, methods; plain-topic equivalents on brokers that refuse `$`
/// filters), so the broker holds a persistent session per client.
pub async fn hold(target: &Target, sessions: bool, which: std::ops::Range<usize>) -> Result<Held> {
    let permits = Arc::new(tokio::sync::Semaphore::new(200));
    let mut connecting = tokio::task::JoinSet::new();
    for i in which {
        let mut options = target.held_options(i);
        let filters = if sessions {
            options.set_clean_session(false);
            target.held_filters(i)
        } else {
            Vec::new()
        };
        let permit = permits.clone().acquire_owned().await?;
        let name = target.name;
        connecting.spawn(async move {
            let (client, mut events) = AsyncClient::new(options, 10);
            // A broker busy accepting thousands may time a handshake out; the next poll
            // tries again, as a device would.
            let mut failures = 0;
            loop {
                match tokio::time::timeout(Duration::from_secs(30), events.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        failures += 1;
                        if failures >= 5 {
                            bail!("{name}: held connection {i} failed {failures} times: {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(200 * failures)).await;
                    }
                    Err(_) => bail!("{name}: held connection {i}: no CONNACK"),
                }
            }
            if !filters.is_empty() {
                let filters = filters
                    .into_iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce));
                client.subscribe_many(filters).await?;
                loop {
                    match tokio::time::timeout(Duration::from_secs(30), events.poll()).await {
                        Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => bail!("{name}: held connection {i} subscribing: {e}"),
                        Err(_) => bail!("{name}: held connection {i}: no SUBACK"),
                    }
                }
            }
            drop(permit);
            let poller = tokio::spawn(async move { while events.poll().await.is_ok() {} });
            Ok((client, poller, failures))
        });
    }
    let mut clients = Vec::new();
    let mut retries = 0;
    while let Some(r) = connecting.join_next().await {
        let (client, poller, failures) = r??;
        retries += failures;
        clients.push((client, poller));
    }
    Ok(Held { clients, retries })
}
