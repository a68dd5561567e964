//! The bridge task: one upstream connection at a time, publishing from the `$upstream` queue.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleethub_router::queue::{DiskQueue, EntryKey};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, Transport};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::{UpstreamError, SINK, WINDOW};
use crate::config::UpstreamSection;
use crate::metrics::Metrics;
use crate::sinks::QueueReader;

pub(super) struct Bridge {
    pub(super) options: MqttOptions,
    pub(super) template: String,
    pub(super) hub_id: String,
    pub(super) queue: Arc<DiskQueue>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) connected: Arc<AtomicBool>,
    pub(super) wake: Arc<Notify>,
}

pub(super) fn options(cfg: &UpstreamSection, hub_id: &str) -> Result<MqttOptions, UpstreamError> {
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
    pub(super) async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
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
        // A fresh window per connection: what was in flight on the last one is read again.
        let mut reader = QueueReader::new(WINDOW);
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
                            reader.acked(key);
                            reader.flush(&*self.queue, &self.metrics);
                        }
                        self.fill(&client, &mut unassigned, &mut reader);
                    }
                    _ => {}
                },
                _ = self.wake.notified() => {
                    reader.rewind();
                    self.fill(&client, &mut unassigned, &mut reader);
                }
                _ = poll_tick.tick() => {
                    reader.rewind();
                    self.fill(&client, &mut unassigned, &mut reader);
                }
            }
        }
    }

    fn fill(
        &self,
        client: &AsyncClient,
        unassigned: &mut VecDeque<EntryKey>,
        reader: &mut QueueReader,
    ) {
        // Refill on every acknowledgement, as the broker does: waiting for half the window to
        // empty stalls against clients that batch their acknowledgements.
        if !self.connected.load(Ordering::Relaxed) {
            return;
        }
        let entries = match reader.read(&*self.queue, SINK, crate::c2d::now_ms()) {
            Ok(entries) => entries,
            Err(e) => {
                warn!(error = %e, "cannot read the upstream queue");
                return;
            }
        };
        let mut entries = entries.into_iter();
        while let Some(entry) = entries.next() {
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
                // The client's queue is full: these go back, to be read again.
                reader.release(std::iter::once(entry.key).chain(entries.map(|e| e.key)));
                break;
            }
            unassigned.push_back(entry.key);
        }
    }
}
