//! The outage scenario's upstream: device-sim plays the broker a hub forwards to (`[upstream]
//! address`), and can cut the link. A bare rumqttd receives; a TCP relay in front of it listens
//! on the address the hub dials. An outage closes the relay's listener and every relayed
//! connection, exactly what a hub sees when its uplink goes; afterwards the relay listens
//! again. A subscriber counts distinct messages (by `$.mid`) and repeats, so a run shows what
//! store-and-forward held back and whether anything was lost or duplicated.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use fleethub_router::message::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::device::SENT_PROPERTY;
use crate::stats::Stats;

pub struct UpstreamSim {
    listen: SocketAddr,
    broker: SocketAddr,
    relay: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl UpstreamSim {
    /// Starts the receiving broker, its counting subscriber and the relay on `listen`.
    pub async fn start(listen: SocketAddr, stats: Arc<Stats>) -> Result<Arc<UpstreamSim>> {
        let broker = crate::targets::spawn_bare_rumqttd(
            64,
            crate::targets::Sizing {
                segment_bytes: 16 * 1024 * 1024,
                segment_count: 4,
            },
        )?;
        let sim = Arc::new(UpstreamSim {
            listen,
            broker,
            relay: Mutex::new(None),
        });
        sim.subscribe(stats).await?;
        sim.up().await?;
        Ok(sim)
    }

    /// The address the relay listens on (the one the hub's `[upstream] address` names).
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    async fn subscribe(&self, stats: Arc<Stats>) -> Result<()> {
        let mut o = MqttOptions::new(
            "upstream-counter",
            self.broker.ip().to_string(),
            self.broker.port(),
        );
        o.set_max_packet_size(1024 * 1024, 1024 * 1024);
        o.set_keep_alive(Duration::from_secs(60));
        let (client, mut events) = AsyncClient::new(o, 100);
        client.subscribe("#", QoS::AtLeastOnce).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e).context("upstream counter"),
                Err(_) => anyhow::bail!("upstream counter: no SUBACK"),
            }
        }
        tokio::spawn(async move {
            let _client = client;
            let mut seen: HashSet<String> = HashSet::new();
            while let Ok(event) = events.poll().await {
                let Event::Incoming(Packet::Publish(p)) = event else {
                    continue;
                };
                // `…/messages/events/{bag}`: the bag carries the original message id.
                let topic = p.topic.as_str();
                let bag = topic
                    .split_once("/messages/events/")
                    .map(|(_, b)| b)
                    .unwrap_or("");
                let Ok(m) = Message::from_bag(bag, p.payload) else {
                    stats.errors.inc();
                    continue;
                };
                let new = match &m.system.message_id {
                    Some(mid) => seen.insert(mid.clone()),
                    None => true,
                };
                if new {
                    stats.upstream_received.inc();
                    if let Some(sent) = m.property(SENT_PROPERTY).and_then(|v| v.parse().ok()) {
                        stats.latency.record_since(sent);
                    }
                } else {
                    stats.upstream_duplicates.inc();
                }
            }
        });
        Ok(())
    }

    /// Listens again (after an outage, or at start).
    pub async fn up(&self) -> Result<()> {
        let listener = TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("upstream.listen {}", self.listen))?;
        let broker = self.broker;
        let task = tokio::spawn(async move {
            // Relayed connections live in this set, so aborting the relay closes them all.
            let mut links = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { continue };
                        links.spawn(async move {
                            if let Ok(mut outbound) = TcpStream::connect(broker).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            }
                        });
                    }
                    Some(_) = links.join_next(), if !links.is_empty() => {}
                }
            }
        });
        if let Ok(mut r) = self.relay.lock() {
            if let Some(old) = r.replace(task) {
                old.abort();
            }
        }
        Ok(())
    }

    /// Cuts the link: no listener, every relayed connection closed.
    pub fn down(&self) {
        if let Ok(mut r) = self.relay.lock() {
            if let Some(task) = r.take() {
                task.abort();
            }
        }
    }
}
