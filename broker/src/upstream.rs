//! The `$upstream` bridge: a rumqttc client to the configured upstream broker.
//!
//! Messages keep their original device/module ids and properties: each is published on the
//! configured topic template with the full property bag. The connection is re-made with
//! backoff when it drops; rumqttc re-sends what was in flight. Messages wait in a bounded
//! in-memory buffer; when it is full they are dropped and counted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleethub_router::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::UpstreamSection;
use crate::metrics::Metrics;

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
    tx: mpsc::Sender<Message>,
    connected: Arc<AtomicBool>,
}

impl Upstream {
    /// Starts the bridge task.
    pub fn start(
        cfg: &UpstreamSection,
        hub_id: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Upstream, UpstreamError> {
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
        options.set_clean_session(false);
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
            let mut roots = rustls::RootCertStore::empty();
            if !cfg.ca.is_empty() {
                let pem = std::fs::read(&cfg.ca).map_err(|e| UpstreamError::Ca {
                    path: cfg.ca.clone(),
                    message: e.to_string(),
                })?;
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let cert = cert.map_err(|e| UpstreamError::Ca {
                        path: cfg.ca.clone(),
                        message: e.to_string(),
                    })?;
                    roots.add(cert).map_err(|e| UpstreamError::Ca {
                        path: cfg.ca.clone(),
                        message: e.to_string(),
                    })?;
                }
            }
            let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| UpstreamError::Ca {
                path: cfg.ca.clone(),
                message: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
            options.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
            ));
        }
        let (tx, mut rx) = mpsc::channel::<Message>(cfg.buffer_messages.max(1));
        let connected = Arc::new(AtomicBool::new(false));
        let template = cfg.topic.clone();
        let hub_id = hub_id.to_string();
        let (client, mut events) = AsyncClient::new(options, 1000);
        // The event loop: (re)connects with backoff and reports the connection state.
        let state = connected.clone();
        let m = metrics.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        info!(code = ?ack.code, "upstream connected");
                        state.store(true, Ordering::Relaxed);
                        m.upstream_connected.set(1);
                        backoff = Duration::from_millis(200);
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        m.sink_messages
                            .with_label_values(&["$upstream", "delivered"])
                            .inc();
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if state.swap(false, Ordering::Relaxed) {
                            warn!(error = %e, "upstream connection lost");
                        }
                        m.upstream_connected.set(0);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        });
        // The publisher: message → topic template → QoS 1 publish (rumqttc queues it while
        // the connection is down and sends it once it is back).
        tokio::spawn(async move {
            while let Some(message) = rx.recv().await {
                let device = message
                    .system
                    .connection_device_id
                    .clone()
                    .unwrap_or_default();
                let module = message
                    .system
                    .connection_module_id
                    .clone()
                    .unwrap_or_default();
                let topic = template
                    .replace("{hubId}", &hub_id)
                    .replace("{deviceId}", &device)
                    .replace("{moduleId}", &module)
                    .replace("{bag}", &message.to_bag());
                if client
                    .publish(topic, QoS::AtLeastOnce, false, message.body.to_vec())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Upstream { tx, connected })
    }

    /// Queues a message for upstream; `false` when the buffer is full (dropped).
    pub fn send(&self, message: Message) -> bool {
        self.tx.try_send(message).is_ok()
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}
