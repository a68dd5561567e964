//! State shared by the MQTT front end and the management API.
//!
//! - `twin_write`: the one path of a twin write and everything that follows it;
//! - `changes`: the interface through which what sits above the hub (deployments) hears
//!   of device changes.

mod changes;
mod twin_write;

pub use crate::connections::{Direct, LiveConnection, Mailbox, DIRECT_BACKLOG};
pub use changes::{Change, ChangeError, ChangeFuture, ChangeObserver};
pub use twin_write::{TwinWrite, TwinWriteError};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use serde::Serialize;

use crate::c2d::C2dStore;
use crate::config::Config;
use crate::core::Core;
use crate::identity::IdentityKey;
use crate::methods::Methods;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::topics::Delivery;
use crate::twin::TwinStore;

/// Addresses actually bound (port 0 resolved). Written to `data_dir/endpoints.json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Endpoints {
    pub mqtt: Option<SocketAddr>,
    pub mqtts: Option<SocketAddr>,
    /// MQTT over WebSockets (TLS); absent in files written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wss: Option<SocketAddr>,
    pub api: SocketAddr,
}

/// The durable stores the hub opens at start.
pub struct Stores {
    /// The main store file all of these live in (kept for consistent backups).
    pub db: Arc<crate::storage::Store>,
    pub registry: Registry,
    /// Products and device groups.
    pub fleet: crate::fleet::Fleet,
    /// Image packages.
    pub images: crate::images::Images,
    pub twins: TwinStore,
    pub c2d: C2dStore,
    /// Persistent MQTT sessions.
    pub sessions: crate::session::SessionStore,
    /// CA certificates for X.509 CA authentication.
    pub certificates: crate::certificates::CaStore,
    /// Who may provision themselves (DPS enrollments).
    pub enrollments: crate::enrollment::Enrollments,
    /// The events endpoint's consumer groups.
    pub consumer_groups: crate::events::GroupStore,
}

/// Queue entries made by routing, and the distinct sinks they go to (woken once the entries
/// are committed).
#[derive(Default)]
pub struct Routed {
    pub entries: Vec<fleethub_router::queue::NewEntry>,
    pub sinks: Vec<crate::sinks::SinkId>,
}

impl Routed {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The `[mqtt]` limits a configuration reload may change while connections run (read where
/// they apply, lock-free). Those sized at start (connection slots) are in `config` only.
pub struct LiveLimits {
    pub max_payload_bytes: AtomicUsize,
    pub connect_timeout_secs: AtomicU64,
    pub session_expiry_secs: AtomicU64,
}

impl LiveLimits {
    fn new(c: &crate::config::MqttSection) -> LiveLimits {
        LiveLimits {
            max_payload_bytes: AtomicUsize::new(c.max_payload_bytes),
            connect_timeout_secs: AtomicU64::new(c.connect_timeout_secs),
            session_expiry_secs: AtomicU64::new(c.session_expiry_secs),
        }
    }

    pub fn set(&self, c: &crate::config::MqttSection) {
        self.max_payload_bytes
            .store(c.max_payload_bytes, Ordering::Relaxed);
        self.connect_timeout_secs
            .store(c.connect_timeout_secs, Ordering::Relaxed);
        self.session_expiry_secs
            .store(c.session_expiry_secs, Ordering::Relaxed);
    }

    pub fn max_payload_bytes(&self) -> usize {
        self.max_payload_bytes.load(Ordering::Relaxed)
    }

    pub fn connect_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.connect_timeout_secs.load(Ordering::Relaxed))
    }

    pub fn session_expiry_secs(&self) -> u64 {
        self.session_expiry_secs.load(Ordering::Relaxed)
    }
}

/// The `[api]` limits, changed by a reload and read per connection or request.
pub struct LiveApiLimits {
    pub max_connections: AtomicUsize,
    pub header_read_timeout_secs: AtomicU64,
    pub body_read_timeout_secs: AtomicU64,
    pub max_body_bytes: AtomicUsize,
}

impl LiveApiLimits {
    fn new(c: &crate::config::ApiSection) -> LiveApiLimits {
        let l = LiveApiLimits {
            max_connections: AtomicUsize::new(0),
            header_read_timeout_secs: AtomicU64::new(0),
            body_read_timeout_secs: AtomicU64::new(0),
            max_body_bytes: AtomicUsize::new(0),
        };
        l.set(c);
        l
    }

    pub fn set(&self, c: &crate::config::ApiSection) {
        self.max_connections
            .store(c.max_connections.max(1), Ordering::Relaxed);
        self.header_read_timeout_secs
            .store(c.header_read_timeout_secs.max(1), Ordering::Relaxed);
        self.body_read_timeout_secs
            .store(c.body_read_timeout_secs.max(1), Ordering::Relaxed);
        self.max_body_bytes
            .store(c.max_body_bytes, Ordering::Relaxed);
    }
}

pub struct Hub {
    pub config: Config,
    /// What a reload may change of `config.limits`.
    pub limits: LiveLimits,
    /// What a reload may change of `config.api_limits`.
    pub api_limits: LiveApiLimits,
    /// Store-and-forward: one durable queue per sink.
    pub queues: Arc<fleethub_router::queue::DiskQueue>,
    pub routing: crate::routing::Routing,
    /// The main store (registry, twins, fleet, deployments, sessions), for backups.
    pub db: Arc<crate::storage::Store>,
    /// Where routed messages go after their queue: one driver per kind of sink.
    pub sinks: Arc<crate::sinks::Sinks>,
    pub registry: Registry,
    pub fleet: crate::fleet::Fleet,
    pub images: crate::images::Images,
    pub twins: TwinStore,
    pub c2d: C2dStore,
    pub sessions: crate::session::SessionStore,
    /// CA certificates for X.509 CA authentication.
    pub certificates: crate::certificates::CaStore,
    pub enrollments: crate::enrollment::Enrollments,
    /// The built-in events endpoint's consumer groups and their readers.
    pub events: Arc<crate::events::Events>,
    pub methods: Methods,
    pub metrics: Arc<Metrics>,
    pub core: Core,
    /// Telemetry to the live view's watchers, through one shared router link.
    pub live_view: crate::live_view::LiveView,
    /// The operator's bearer token (API) and service-connection password (MQTT).
    pub admin_token: String,
    /// Shared with the sink drivers that wake a connection (module inputs).
    pub live: crate::connections::Live,
    /// Service connections subscribed to telemetry; while there are none, telemetry is not
    /// published into the router at all.
    pub event_subscribers: std::sync::atomic::AtomicUsize,
    /// Devices whose reported properties changed since the last reconcile, and whether one
    /// is running (see [`Hub::reported_changed`]).
    pending_reports: crate::gathered::Gathered<crate::identity::DeviceId>,
    /// Set once the listeners are bound.
    pub endpoints: std::sync::OnceLock<Endpoints>,
    /// This node's place in the cluster (a single hub is its own leader).
    pub cluster: Arc<crate::cluster::Cluster>,
    /// Mailboxes of service connections (identities' are in `live`), so a stop reaches them.
    pub services: DashMap<u64, Arc<Mailbox>>,
    /// The hub is shutting down: every connection is kicked through its mailbox, and one
    /// that opens meanwhile sees this flag. Nothing per connection waits on a shared signal:
    /// registering a waiter on one takes a lock every connection would share.
    stopping: AtomicBool,
    next_conn: AtomicU64,
    /// Hears of device changes (the deployment engine), installed once at start.
    observer: std::sync::OnceLock<Arc<dyn ChangeObserver>>,
}

impl Hub {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        stores: Stores,
        core: Core,
        admin_token: String,
        routing: crate::routing::Routing,
        sinks: Arc<crate::sinks::Sinks>,
        metrics: Arc<Metrics>,
        queues: Arc<fleethub_router::queue::DiskQueue>,
        live: crate::connections::Live,
        events: Arc<crate::events::Events>,
        cluster: Arc<crate::cluster::Cluster>,
    ) -> Hub {
        Hub {
            cluster,
            limits: LiveLimits::new(&config.limits),
            api_limits: LiveApiLimits::new(&config.api_limits),
            config,
            queues,
            routing,
            sinks,
            db: stores.db,
            registry: stores.registry,
            fleet: stores.fleet,
            images: stores.images,
            twins: stores.twins,
            c2d: stores.c2d,
            sessions: stores.sessions,
            certificates: stores.certificates,
            enrollments: stores.enrollments,
            events,
            methods: Methods::default(),
            live_view: crate::live_view::LiveView::new(
                core.clone(),
                metrics.live_view_dropped.clone(),
            ),
            metrics,
            core,
            admin_token,
            live,
            event_subscribers: std::sync::atomic::AtomicUsize::new(0),
            pending_reports: Default::default(),
            endpoints: std::sync::OnceLock::new(),
            services: DashMap::new(),
            stopping: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            observer: std::sync::OnceLock::new(),
        }
    }

    /// The `Product/Group` an identity's device is in (what queries call `deviceGroup`).
    pub fn group_path(&self, identity: &crate::registry::Identity) -> Option<String> {
        self.fleet.path_of(identity.device_group_id.as_deref()?)
    }

    /// An identity as the API shows it: with its connection state and its device group.
    pub fn identity_view(
        &self,
        identity: &crate::registry::Identity,
    ) -> crate::registry::IdentityView {
        let mut view = self.registry.view(identity);
        view.device_group = self.group_path(identity);
        view
    }

    /// An identity as twin queries and target conditions see it.
    pub fn subject(&self, identity: &crate::registry::Identity) -> crate::twin::view::Subject {
        let key = crate::registry::key_of(identity);
        crate::twin::view::Subject {
            twin: self.twins.get(&key),
            device_group: self.group_path(identity),
            key,
        }
    }

    /// A device as target conditions see it; one no longer registered has no group.
    pub fn device_subject(&self, device: &crate::identity::DeviceId) -> crate::twin::view::Subject {
        let key = IdentityKey::device(device.clone());
        match self.registry.get(&key) {
            Some(identity) => self.subject(&identity),
            None => crate::twin::view::Subject {
                twin: self.twins.get(&key),
                device_group: None,
                key,
            },
        }
    }

    /// Tells every connection to close.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for live in self.live.iter() {
            live.mailbox.kick();
        }
        for service in self.services.iter() {
            service.kick();
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether `key` is connected and listening for method requests.
    pub fn takes_methods(&self, key: &IdentityKey) -> bool {
        self.live
            .get(key)
            .is_some_and(|l| l.mailbox.methods.load(Ordering::Relaxed))
    }

    /// Closes the live connection of `key`, if any.
    pub fn kick(&self, key: &IdentityKey) {
        if let Some(live) = self.live.get(key) {
            live.mailbox.kick();
        }
    }

    /// Sends to one identity's connection, with `suffix` completing the client topic.
    ///
    /// These never pass through the embedded router: they are for one connection only, and
    /// a router subscription per identity costs a filter log per device and a scan of every
    /// filter per new topic, which does not scale to a fleet. Not connected: nothing to do
    /// (the desired document is sent when a connection subscribes to it).
    pub fn deliver(&self, key: &IdentityKey, delivery: Delivery, suffix: &str, body: &[u8]) {
        if !self.live.contains_key(key) {
            return;
        }
        let direct = Direct {
            delivery,
            suffix: suffix.to_string(),
            body: bytes::Bytes::copy_from_slice(body),
        };
        self.send(key, direct);
    }

    /// Queues `direct` in the mailbox of `key`'s connection, if it is connected.
    pub fn send(&self, key: &IdentityKey, direct: Direct) {
        let Some(live) = self.live.get(key) else {
            return;
        };
        if !live.mailbox.push(direct) {
            self.metrics.direct_dropped.inc();
            tracing::warn!(identity = %key, "connection not reading: a direct message was dropped");
        }
    }

    /// Answers a twin request on `$iothub/twin/res/{status}/?$rid=..[&$version=v]`.
    pub fn twin_response(
        &self,
        key: &IdentityKey,
        status: u16,
        query: &str,
        version: Option<u64>,
        body: &[u8],
    ) {
        let mut suffix = format!("{status}/{query}");
        if let Some(v) = version {
            suffix.push_str(&format!("&$version={v}"));
        }
        self.deliver(key, Delivery::TwinResponse, &suffix, body);
    }

    /// Routes a message: one queue entry per matching route, added to `out`, to be
    /// appended (durably) before the publish is acknowledged. `bag` is the message's
    /// property bag if the caller has it already.
    pub fn dispatch(
        &self,
        message: &fleethub_router::Message,
        bag: Option<&str>,
        origin: &fleethub_router::route::Origin<'_>,
        twin_change: bool,
        out: &mut Routed,
    ) {
        let deliveries = self.routing.route(message, origin, twin_change);
        // IoT Hub's fallback route: telemetry no route matched goes to the events endpoint.
        let fallback = deliveries.is_empty() && !twin_change && self.config.events.fallback;
        if deliveries.is_empty() && !fallback {
            return;
        }
        let owned;
        let bag = match bag {
            Some(b) => b,
            None => {
                owned = message.to_bag();
                &owned
            }
        };
        let retention_ms = self.config.events.retention_secs.saturating_mul(1000);
        if fallback {
            self.metrics.events_fallback.inc();
            out.entries.push(fleethub_router::queue::NewEntry {
                sink: crate::events::SINK.to_string(),
                priority: 0,
                ttl_ms: retention_ms,
                bag: bag.to_string(),
                body: message.body.clone(),
            });
            if !out.sinks.contains(&crate::sinks::SinkId::Events) {
                out.sinks.push(crate::sinks::SinkId::Events);
            }
            return;
        }
        for d in deliveries {
            let (Some(sink), None) = (&d.counters.sink, &d.counters.undeliverable) else {
                d.counters.dropped.inc();
                continue;
            };
            d.counters.forwarded.inc();
            // The endpoint is a log read by position: one priority, its retention as TTL.
            let (priority, ttl_ms) = match sink {
                crate::sinks::SinkId::Events => (0, retention_ms),
                _ => (d.priority, d.ttl_secs.saturating_mul(1000)),
            };
            out.entries.push(fleethub_router::queue::NewEntry {
                sink: d.counters.queue.clone(),
                priority,
                ttl_ms,
                bag: bag.to_string(),
                body: message.body.clone(),
            });
            if !out.sinks.contains(sink) {
                out.sinks.push(sink.clone());
            }
        }
    }

    /// Every queue's stats, and the events endpoint's log as the `$events` row.
    pub fn queue_stats(&self) -> Vec<fleethub_router::queue::SinkStats> {
        let mut stats = fleethub_router::queue::Queue::stats(&*self.queues);
        stats.retain(|s| s.sink != crate::events::SINK);
        stats.push(self.events.log().stats());
        stats
    }

    /// Stores routed entries before the future resolves: the events endpoint's in its
    /// retained log, the rest in the store-and-forward queues (both at once). A refusal hands
    /// back only what was refused, so offering it again duplicates nothing that was stored.
    pub fn append(
        &self,
        entries: Vec<fleethub_router::queue::NewEntry>,
    ) -> fleethub_router::queue::AppendFuture {
        use fleethub_router::queue::{AppendError, Queue};
        let now = crate::c2d::now_ms();
        let (events, queued): (Vec<_>, Vec<_>) = entries
            .into_iter()
            .partition(|e| e.sink == crate::events::SINK);
        if events.is_empty() {
            return Queue::append(&*self.queues, queued, now);
        }
        let logged = self.events.log().append(events, now);
        if queued.is_empty() {
            return logged;
        }
        let queued = Queue::append(&*self.queues, queued, now);
        Box::pin(async move {
            match tokio::join!(logged, queued) {
                (Ok(()), Ok(())) => Ok(()),
                (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
                (Err(a), Err(b)) => match (a.is_refusal(), b.is_refusal()) {
                    (true, true) => {
                        let mut entries = a.entries;
                        entries.extend(b.entries);
                        Err(AppendError {
                            error: a.error,
                            entries,
                        })
                    }
                    // A store failure: the client sends it all again.
                    (false, _) => Err(a),
                    (true, false) => Err(b),
                },
            }
        })
    }

    /// A twin change notification for `key` (its reported properties changed), routed like
    /// a message from it on `/twinChangeNotifications`.
    pub fn twin_changed(
        self: &Arc<Self>,
        key: &IdentityKey,
        patch: &serde_json::Map<String, serde_json::Value>,
        version: u64,
    ) {
        let body = serde_json::json!({ "version": version, "properties": { "reported": patch } })
            .to_string();
        let message = fleethub_router::Message {
            body: bytes::Bytes::from(body),
            properties: Vec::new(),
            system: fleethub_router::SystemProperties {
                content_type: Some("application/json".into()),
                content_encoding: Some("utf-8".into()),
                connection_device_id: Some(key.device.to_string()),
                connection_module_id: key.module.as_ref().map(|m| m.to_string()),
                enqueued_time: Some(crate::registry::now_rfc3339()),
                ..Default::default()
            },
        };
        let origin = fleethub_router::route::Origin {
            hub_module: None,
            output: None,
            twin_change: true,
        };
        let mut routed = Routed::default();
        self.dispatch(&message, None, &origin, true, &mut routed);
        if routed.entries.is_empty() {
            return;
        }
        let hub = self.clone();
        let Routed { entries, sinks } = routed;
        let committed = self.append(entries);
        tokio::spawn(async move {
            match committed.await {
                Ok(()) => hub.sinks.wake(&sinks),
                Err(e) => tracing::warn!(error = %e, "could not queue a twin change notification"),
            }
        });
    }

    /// The routing origin of a message from `key`.
    pub fn origin<'a>(
        &self,
        key: &'a IdentityKey,
        output: Option<&'a str>,
    ) -> fleethub_router::route::Origin<'a> {
        let hub_module = if key.device == self.config.hub_id {
            key.module.as_ref().map(|m| m.as_str())
        } else {
            None
        };
        fleethub_router::route::Origin {
            hub_module,
            output,
            twin_change: false,
        }
    }

    /// Constant-time comparison with the admin token.
    pub fn is_admin_token(&self, candidate: &str) -> bool {
        crate::sas::same_secret(&self.admin_token, candidate)
    }
}

pub type SharedHub = Arc<Hub>;
