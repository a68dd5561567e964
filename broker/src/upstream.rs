//! The `$upstream` bridge: drains the durable `$upstream` queue into the configured upstream
//! broker (rumqttc).
//!
//! Entries are published at QoS 1 in queue order (priority, then arrival) and removed from
//! the queue only when the upstream's PUBACK for them arrives. Each connection attempt uses a
//! fresh client, so rumqttc never replays on its own: after a drop, whatever was not
//! acknowledged is read again from the queue and re-sent (at least once; the few duplicates
//! are the in-flight window at the moment of the drop).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleethub_router::queue::{DiskQueue, EntryKey, Queue};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, Transport};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::config::UpstreamSection;
use crate::metrics::Metrics;

/// The queue every `INTO $upstream` route feeds.
pub const SINK: &str = "$upstream";
/// Publishes in flight to the upstream at once.
const WINDOW: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream address '{0}' is not host:port")]
    Address(String),
    #[error("upstream CA file {path}: {message}")]
    Ca { path: String, message: String },
    #[error("upstream SAS token: {0}")]
    Sas(String),
}

pub struct Upstream {
    connected: Arc<AtomicBool>,
    wake: Arc<Notify>,
    stop: tokio::sync::watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct Bridge {
    options: MqttOptions,
    template: String,
    hub_id: String,
    queue: Arc<DiskQueue>,
    metrics: Arc<Metrics>,
    connected: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

impl Upstream {
    /// Starts the bridge task.
    pub fn start(
        cfg: &UpstreamSection,
        hub_id: &str,
        queue: Arc<DiskQueue>,
        metrics: Arc<Metrics>,
    ) -> Result<Upstream, UpstreamError> {
        let options = options(cfg, hub_id)?;
        let connected = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(Notify::new());
        let bridge = Bridge {
            options,
            template: cfg.topic.clone(),
            hub_id: hub_id.to_string(),
            queue,
            metrics,
            connected: connected.clone(),
            wake: wake.clone(),
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(bridge.run(stopped));
        Ok(Upstream {
            connected,
            wake,
            stop,
            task: std::sync::Mutex::new(Some(task)),
        })
    }

    /// Something was queued for upstream.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Ends the bridge and waits for it. Entries in flight stay queued (they are removed
    /// only on the upstream's PUBACK) and are sent again after the next start.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

fn options(cfg: &UpstreamSection, hub_id: &str) -> Result<MqttOptions, UpstreamError> {
    let (host, port) = cfg
        .address
        .rsplit_once(':')
        .and_then(|(h, p)| {
            p.parse::<u16>()
                .ok()
                .map(|p| (h.trim_matches(['[', ']']).to_string(), p))
        })
        .ok_or_else(|| UpstreamError::Address(cfg.address.clone()))?;
    let client_id = if cfg.client_id.is_empty() {
        hub_id.to_string()
    } else {
        cfg.client_id.clone()
    };
    let sas_host = if cfg.sas_hostname.is_empty() {
        host.clone()
    } else {
        cfg.sas_hostname.clone()
    };
    let mut options = MqttOptions::new(client_id.clone(), host, port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(512 * 1024, 512 * 1024);
    options.set_inflight(WINDOW as u16);
    let username = if !cfg.username.is_empty() {
        cfg.username.clone()
    } else if !cfg.device_key.is_empty() {
        format!("{sas_host}/{client_id}/?api-version=2021-04-12")
    } else {
        String::new()
    };
    let password = if !cfg.device_key.is_empty() {
        let identity = crate::identity::IdentityKey::parse(&client_id)
            .map_err(|e| UpstreamError::Sas(e.to_string()))?;
        let expiry = crate::c2d::now_ms() / 1000 + 365 * 24 * 3600;
        crate::sas::generate(
            &crate::sas::resource_for(&sas_host, &identity),
            &cfg.device_key,
            expiry,
        )
        .map_err(|e| UpstreamError::Sas(e.to_string()))?
    } else {
        cfg.password.clone()
    };
    if !username.is_empty() || !password.is_empty() {
        options.set_credentials(username, password);
    }
    if cfg.tls {
        let ca_err = |message: String| UpstreamError::Ca {
            path: cfg.ca.clone(),
            message,
        };
        let mut roots = rustls::RootCertStore::empty();
        if !cfg.ca.is_empty() {
            let pem = std::fs::read(&cfg.ca).map_err(|e| ca_err(e.to_string()))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots
                    .add(cert.map_err(|e| ca_err(e.to_string()))?)
                    .map_err(|e| ca_err(e.to_string()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ca_err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        options.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
        ));
    }
    Ok(options)
}

impl Bridge {
    async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let session = tokio::select! {
                r = self.session() => r,
                _ = stop.wait_for(|s| *s) => break,
            };
            match session {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    if self.connected.swap(false, Ordering::Relaxed) {
                        warn!(error = %e, "upstream connection lost");
                    }
                }
            }
            self.connected.store(false, Ordering::Relaxed);
            self.metrics.upstream_connected.set(0);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        self.connected.store(false, Ordering::Relaxed);
        self.metrics.upstream_connected.set(0);
    }

    /// One connection: publish from the queue until the connection fails.
    async fn session(&self) -> Result<(), rumqttc::ConnectionError> {
        let (client, mut events) = AsyncClient::new(self.options.clone(), WINDOW * 2);
        // Keys in publish order until rumqttc tells their packet ids, then by packet id.
        let mut unassigned: VecDeque<EntryKey> = VecDeque::new();
        let mut by_pkid: HashMap<u16, EntryKey> = HashMap::new();
        let mut in_flight: HashSet<EntryKey> = HashSet::new();
        // The last key handed out; refills after an ack continue from it, wakes start over.
        let mut cursor: Option<EntryKey> = None;
        let mut poll_tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                event = events.poll() => match event? {
                    Event::Incoming(Packet::ConnAck(ack)) => {
                        info!(code = ?ack.code, "upstream connected");
                        self.connected.store(true, Ordering::Relaxed);
                        self.metrics.upstream_connected.set(1);
                        self.wake.notify_one();
                    }
                    Event::Outgoing(Outgoing::Publish(pkid)) => {
                        if let Some(key) = unassigned.pop_front() {
                            by_pkid.insert(pkid, key);
                        }
                    }
                    Event::Incoming(Packet::PubAck(ack)) => {
                        if let Some(key) = by_pkid.remove(&ack.pkid) {
                            in_flight.remove(&key);
                            self.queue.remove(vec![key]);
                            self.metrics.sink_messages.with_label_values(&[SINK, "delivered"]).inc();
                        }
                        self.fill(&client, &mut unassigned, &mut in_flight, &mut cursor);
                    }
                    _ => {}
                },
                _ = self.wake.notified() => {
                    cursor = None;
                    self.fill(&client, &mut unassigned, &mut in_flight, &mut cursor);
                }
                _ = poll_tick.tick() => {
                    cursor = None;
                    self.fill(&client, &mut unassigned, &mut in_flight, &mut cursor);
                }
            }
        }
    }

    fn fill(
        &self,
        client: &AsyncClient,
        unassigned: &mut VecDeque<EntryKey>,
        in_flight: &mut HashSet<EntryKey>,
        cursor: &mut Option<EntryKey>,
    ) {
        // Refill on every acknowledgement, as the broker does: waiting for half the window to
        // empty stalls against clients that batch their acknowledgements.
        if !self.connected.load(Ordering::Relaxed) || in_flight.len() >= WINDOW {
            return;
        }
        let room = WINDOW - in_flight.len();
        let peeked = match self.queue.peek_after(
            SINK,
            cursor.as_ref(),
            in_flight,
            room,
            crate::c2d::now_ms(),
        ) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot read the upstream queue");
                return;
            }
        };
        for entry in peeked.entries {
            let bag = fleethub_router::Message::from_bag(&entry.bag, bytes::Bytes::new())
                .unwrap_or_default();
            let device = bag
                .system
                .connection_device_id
                .as_deref()
                .unwrap_or_default();
            let module = bag
                .system
                .connection_module_id
                .as_deref()
                .unwrap_or_default();
            let topic = self
                .template
                .replace("{hubId}", &self.hub_id)
                .replace("{deviceId}", device)
                .replace("{moduleId}", module)
                .replace("{bag}", &entry.bag);
            if client
                .try_publish(topic, QoS::AtLeastOnce, false, entry.body.to_vec())
                .is_err()
            {
                break;
            }
            unassigned.push_back(entry.key.clone());
            *cursor = Some(entry.key.clone());
            in_flight.insert(entry.key);
        }
    }
}
