//! Starting and stopping the hub: `run(config, shutdown)`.
//!
//! On first start the data directory is created with the store, the admin token and (unless
//! certificates are configured) the TLS files. Once the listeners are bound, their actual
//! addresses (port 0 resolved) are logged and written to `data_dir/endpoints.json`, which is
//! how tests and scripts find a hub started on ephemeral ports.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::cluster::rows::SharedRows;
use crate::config::Config;
use crate::core::Core;
use crate::hub::{Endpoints, Hub, SharedHub};
use crate::registry::RegistryError;
use crate::tls::{self, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{what} ({path}): {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Damaged(#[from] crate::stores::StoreError),
    #[error("store: {0}")]
    Store(String),
    #[error("invalid routes: {0}")]
    Routes(String),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("{0}. A cluster node does not start without the PostgreSQL and NATS its nodes share (config [cluster] postgres, nats)")]
    Cluster(#[from] crate::cluster::ClusterError),
}

pub use crate::data_dir::{ADMIN_TOKEN_FILE, ENDPOINTS_FILE, QUEUES_FILE, STORE_FILE};

/// Reads the admin token, creating it (mode 0600) on first start.
pub fn ensure_admin_token(data_dir: &Path) -> Result<String, ServerError> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ServerError::Io {
                what: "reading the admin token",
                path,
                source,
            })
        }
    }
    let bytes: [u8; 32] = rand::random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    tls::write_private(&path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

async fn bind(what: &'static str, addr: std::net::SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { what, addr, source })
}

/// Sets the log filter (`[log] level`); an error when the filter does not parse.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
/// Loads and checks the configuration file again (with the same command-line overrides).
pub type LoadConfig = Box<dyn Fn() -> Result<Config, crate::config::ConfigError> + Send + Sync>;

/// How the hub re-reads its configuration on SIGHUP.
pub struct Reload {
    pub load: LoadConfig,
    pub set_log_level: SetLogLevel,
}

/// Runs the hub until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    run_with_reload(config, None, shutdown).await
}

/// As [`run`]; with `reload`, SIGHUP re-reads the configuration and applies what can change
/// without a restart (routes, log level), checked whole first: on any error the configuration
/// in force stays, and the log says which happened.
pub async fn run_with_reload(
    config: Config,
    reload: Option<Reload>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let data_dir = config.data_dir.clone();
    let narrowed = crate::data_dir::secure(&data_dir).map_err(|source| ServerError::Io {
        what: "creating the data directory (owner-only)",
        path: data_dir.clone(),
        source,
    })?;
    if !narrowed.paths.is_empty() {
        tracing::warn!(
            count = narrowed.paths.len(),
            paths = ?narrowed.paths.iter().take(10).collect::<Vec<_>>(),
            "the data directory was readable by other users; narrowed to the hub's user only"
        );
    }
    raise_fd_limit(&config);
    let mut admin_token = ensure_admin_token(&data_dir)?;
    let crate::stores::Opened { stores, deploy } = crate::stores::open(&data_dir)?;
    let deploy = Arc::new(deploy);

    let tls_config = match config.mqtts.or(config.wss) {
        None => None,
        Some(_) => {
            let (cert, key) = match &config.tls {
                Some(pair) => pair.clone(),
                None => tls::ensure_generated(&data_dir, &config.hostname)?,
            };
            Some(tls::server_config(&cert, &key)?)
        }
    };

    let cluster = Arc::new(if config.cluster.enabled() {
        crate::cluster::Cluster::join(&config.cluster).await?
    } else {
        crate::cluster::Cluster::single(config.hub_id.as_str())
    });
    if cluster.config().is_some() {
        let shared = cluster.shared_admin_token(&admin_token).await?;
        if shared != admin_token {
            // The CLI on this machine reads the token from the data directory.
            tls::write_private(
                &data_dir.join(ADMIN_TOKEN_FILE),
                format!("{shared}\n").as_bytes(),
            )?;
            info!("this node uses the cluster's admin token");
            admin_token = shared;
        }
    }
    // A cluster node's stores are the tables the nodes share (each seeded by the first node
    // from its own store). Opened before anything serves: blocking here holds nothing up.
    let shared_identities = match cluster.config() {
        Some(c) => Some(share_stores(c, &stores, &deploy)?),
        None => None,
    };

    // The hub is a device in its own registry, with the $edgeHub module whose twin has routes.
    let hub_key = crate::identity::IdentityKey::device(config.hub_id.clone());
    let edge_key = crate::identity::IdentityKey::module(
        config.hub_id.clone(),
        crate::identity::ModuleId::new(crate::routing::EDGE_HUB)
            .map_err(|e| ServerError::Store(e.to_string()))?,
    );
    for key in [&hub_key, &edge_key] {
        if stores.registry.get(key).is_none() {
            let caps = crate::registry::Capabilities {
                iot_edge: key.module.is_none(),
            };
            match stores.registry.create_with(key, None, None, caps) {
                // Another node of the cluster created it a moment ago.
                Ok(_) | Err(RegistryError::Exists(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let edge_desired = stores.twins.get(&edge_key).desired.data();
    let metrics = Arc::new(crate::metrics::Metrics::for_node(
        cluster.config().map(|c| c.node.as_str()),
    ));
    // The main store stops writing at half the queues' floor: the queues fill the disk
    // first and stop first, leaving the twins and registry room to keep working.
    stores
        .db
        .set_floor(config.store_and_forward.min_free_bytes / 2);
    stores
        .db
        .count_refusals_in(metrics.store_writes_refused.clone());
    let limits = fleethub_router::queue::Limits {
        max_bytes: config.store_and_forward.max_bytes,
        max_sink_bytes: config.store_and_forward.max_sink_bytes,
        cache_bytes: config.store_and_forward.cache_bytes,
        min_free_bytes: config.store_and_forward.min_free_bytes,
        when_full: match config.store_and_forward.when_full {
            crate::config::WhenFullSetting::DropOldest => {
                fleethub_router::queue::WhenFull::DropOldest
            }
            crate::config::WhenFullSetting::Refuse => fleethub_router::queue::WhenFull::Refuse,
        },
    };
    let queues = Arc::new(
        fleethub_router::queue::DiskQueue::open(&data_dir.join(QUEUES_FILE), limits)
            .map_err(|e| ServerError::Store(e.to_string()))?,
    );
    if let Some(aside) = &queues.recovered_from {
        tracing::error!(moved_to = %aside.display(), "the store-and-forward store was damaged; started with empty queues");
    }
    if queues.corrupt_records > 0 {
        metrics.corrupt_records(queues.corrupt_records);
        tracing::error!(
            records = queues.corrupt_records,
            kept = ?queues.damaged_logs,
            "the store-and-forward log was damaged: records that could not be read are counted as dropped (reason corrupt); every readable record after them was recovered"
        );
    }
    let live = crate::connections::Live::default();
    let log = Arc::new(
        fleethub_router::queue::RetainedLog::open(
            &data_dir.join(crate::data_dir::EVENTS_DIR),
            crate::events::SINK,
            fleethub_router::queue::Retention {
                time_ms: config.events.retention_secs.saturating_mul(1000),
                bytes: config.events.retention_bytes,
                cache_bytes: config.store_and_forward.cache_bytes / 4,
                min_free_bytes: config.store_and_forward.min_free_bytes,
            },
        )
        .map_err(|e| ServerError::Store(e.to_string()))?,
    );
    if log.corrupt_records > 0 {
        metrics.corrupt_records(log.corrupt_records);
        tracing::error!(
            records = log.corrupt_records,
            "the events log was damaged: records that could not be read are counted as dropped (reason corrupt); every readable record was kept"
        );
    }
    crate::events::move_from_queue(&queues, &log)
        .await
        .map_err(|e| ServerError::Store(e.to_string()))?;
    let events = Arc::new(
        crate::events::Events::open(
            log,
            stores.consumer_groups.clone(),
            config.events.max_consumer_groups,
        )
        .map_err(|e| ServerError::Store(e.to_string()))?,
    );
    let sinks = Arc::new(
        crate::sinks::Sinks::start(&crate::sinks::Context {
            config: &config,
            queues: queues.clone(),
            metrics: metrics.clone(),
            live: live.clone(),
            events: events.clone(),
        })
        .map_err(|e| ServerError::Store(e.to_string()))?,
    );
    let routing = crate::routing::Routing::new(
        edge_key.clone(),
        sinks.clone(),
        config.routes.clone(),
        config.routing.time_to_live_secs,
        config.routing.detect_json_bodies,
        &edge_desired,
        metrics.clone(),
    )
    .map_err(|errors| {
        ServerError::Routes(
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let core = Core::start(
        config.limits.max_connections,
        &config.router,
        metrics.router_links_opened.clone(),
    );
    let hub = Arc::new(Hub::new(
        config.clone(),
        stores,
        core,
        admin_token,
        routing,
        sinks,
        metrics,
        queues,
        live,
        events,
        cluster.clone(),
    ));
    hub.observe(Arc::new(crate::deploy::Observer(deploy.clone())));
    if let Some(bus) = cluster.bus() {
        // What other nodes address to connections here. The hub holds the bus, so these
        // hold the hub weakly.
        let (h1, h2, h3) = (
            Arc::downgrade(&hub),
            Arc::downgrade(&hub),
            Arc::downgrade(&hub),
        );
        let h4 = Arc::downgrade(&hub);
        bus.serve_with(crate::cluster::bus::Handlers {
            inputs: Arc::new(move |key, entries| {
                let hub = h4.clone();
                Box::pin(async move {
                    match hub.upgrade() {
                        Some(hub) => crate::relay::take_relayed(&hub, &key, entries).await,
                        None => Err("stopping".into()),
                    }
                })
            }),
            c2d: Arc::new(move |key| {
                // C2D goes to the device, whichever identity's connection carried it.
                let device = crate::identity::IdentityKey::device(key.device.clone());
                if let Some(live) = h3
                    .upgrade()
                    .as_ref()
                    .and_then(|h| h.live.get(&device).map(|l| l.mailbox.clone()))
                {
                    live.wake_c2d();
                }
            }),
            method: Arc::new(move |key, request| {
                let hub = h1.clone();
                Box::pin(async move {
                    match hub.upgrade() {
                        Some(hub) => crate::api::call_method_here(hub, key, request).await,
                        None => crate::cluster::bus::MethodOutcome::Offline("stopping".into()),
                    }
                })
            }),
            takeover: Arc::new(move |key, conn_id| {
                if let Some(hub) = h2.upgrade() {
                    if let Some(live) = hub.live.get(&key) {
                        if live.conn_id == conn_id {
                            live.mailbox.kick();
                        }
                    }
                }
            }),
        });
    }
    // A cluster node reconciles when it becomes leader (below); a single hub before it listens.
    if cluster.config().is_none() {
        reconcile_at_start(&hub).await;
    }

    let mqtt = match config.mqtt {
        Some(addr) => Some(bind("MQTT", addr).await?),
        None => None,
    };
    let mqtts = match config.mqtts {
        Some(addr) => Some(bind("MQTTS", addr).await?),
        None => None,
    };
    let wss = match config.wss {
        Some(addr) => Some(bind("WSS", addr).await?),
        None => None,
    };
    let api = bind("API", config.api).await?;
    let local = |l: &TcpListener| l.local_addr().ok();
    let endpoints = Endpoints {
        mqtt: mqtt.as_ref().and_then(local),
        mqtts: mqtts.as_ref().and_then(local),
        wss: wss.as_ref().and_then(local),
        api: local(&api).unwrap_or(config.api),
    };
    let _ = hub.endpoints.set(endpoints.clone());
    write_endpoints(&data_dir, &endpoints)?;
    info!(
        mqtt = ?endpoints.mqtt,
        mqtts = ?endpoints.mqtts,
        wss = ?endpoints.wss,
        api = %endpoints.api,
        data_dir = %data_dir.display(),
        "fleethub listening"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    // Background work: stops with the server, and shutdown waits for it. Fleet-wide work runs
    // on the cluster's leader only (a single hub always leads).
    if cluster.config().is_some() {
        tasks.spawn(crate::cluster::leadership(cluster.clone(), stop_rx.clone()));
        let h = hub.clone();
        let beat = move || crate::cluster::Beat {
            api: endpoints.api.to_string(),
            mqtt: endpoints.mqtt.map(|a| a.to_string()),
            connections: h.metrics.connections.get(),
        };
        tasks.spawn(crate::cluster::heartbeats(
            cluster.clone(),
            beat,
            stop_rx.clone(),
        ));
    }
    if let (Some((rows, twins)), Some(c)) = (shared_identities, cluster.config()) {
        use crate::cluster::rows::OnHeard;
        let mut feeds: Vec<(Arc<SharedRows>, OnHeard)> = Vec::new();
        // Other nodes' twin writes: into this node's cache, and what follows them here.
        let h = Arc::downgrade(&hub);
        feeds.push((
            twins,
            Arc::new(move |heard| {
                if let Some(hub) = h.upgrade() {
                    for changed in hub.twins.heard(heard) {
                        hub.heard_twin(changed);
                    }
                }
            }),
        ));
        // Other nodes' registry changes: into this node's cache, and a disabled or deleted
        // identity (or one with new keys) is disconnected here as it would be there.
        let h = hub.clone();
        feeds.push((
            rows,
            Arc::new(move |heard| {
                for key in h.registry.heard(heard) {
                    h.kick(&key);
                }
            }),
        ));
        // Products and groups, images, group deployments, CAs and enrollments.
        let catalogs: [(Option<Arc<SharedRows>>, OnHeard); 5] = [
            (hub.fleet.shared_rows(), {
                let h = hub.clone();
                Arc::new(move |heard| h.fleet.heard(heard))
            }),
            (hub.images.shared_rows(), {
                let h = hub.clone();
                Arc::new(move |heard| h.images.heard(heard))
            }),
            (deploy.groups.shared_rows(), {
                let d = deploy.clone();
                Arc::new(move |heard| d.groups.heard(heard))
            }),
            (hub.certificates.shared_rows(), {
                let h = hub.clone();
                Arc::new(move |heard| h.certificates.heard(heard))
            }),
            (hub.enrollments.shared_rows(), {
                let h = hub.clone();
                Arc::new(move |heard| h.enrollments.heard(heard))
            }),
        ];
        feeds.extend(
            catalogs
                .into_iter()
                .filter_map(|(rows, on)| Some((rows?, on))),
        );
        // Other nodes' deployments and device deployment states: into this node's cache (the
        // node that changed them reconciled their devices).
        if let Some((records, states)) = deploy.targeted.shared_tables() {
            use crate::deploy::targeted::Table;
            for (rows, table) in [(records, Table::Records), (states, Table::States)] {
                let d = deploy.clone();
                feeds.push((rows, Arc::new(move |heard| d.targeted.heard(table, heard))));
            }
        }
        // One listening connection for all of them.
        tasks.spawn(crate::cluster::rows::listen(
            feeds,
            c.postgres.clone(),
            c.node.clone(),
            stop_rx.clone(),
        ));
    }
    tasks.spawn(show_leadership(hub.clone(), stop_rx.clone()));
    // Routed messages for modules connected to other nodes go to them.
    tasks.spawn(crate::relay::relay_inputs(hub.clone(), stop_rx.clone()));
    // `monitor-events` on any node shows every node's telemetry.
    tasks.spawn(crate::relay::live_view_across(hub.clone(), stop_rx.clone()));
    let (h, d) = (hub.clone(), deploy.clone());
    tasks.spawn(crate::cluster::singleton(
        "rollouts",
        cluster.clone(),
        stop_rx.clone(),
        move |term| {
            let (hub, deploy) = (h.clone(), d.clone());
            async move {
                if hub.cluster.config().is_some() {
                    reconcile_at_start(&hub).await;
                }
                crate::deploy::run_rollouts(hub, deploy, term).await
            }
        },
    ));
    let h = hub.clone();
    tasks.spawn(crate::cluster::singleton(
        "ttl-sweeper",
        cluster.clone(),
        stop_rx.clone(),
        move |term| sweep_expired(h.clone(), term),
    ));
    tasks.spawn(store_checkpoints(hub.clone(), stop_rx.clone()));
    if let Some(reload) = reload {
        tasks.spawn(reload_on_sighup(hub.clone(), reload, stop_rx.clone()));
    }
    tasks.spawn(expire_sessions(hub.clone(), stop_rx.clone()));
    // Every connection task holds a clone of `open_tx`; once all are dropped, every
    // connection has finished (mini-redis's shutdown pattern).
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
    if let Some(listener) = mqtt {
        tasks.spawn(crate::mqtt::serve_tcp(
            listener,
            hub.clone(),
            stop_rx.clone(),
            open_tx.clone(),
        ));
    }
    let acceptor = tls_config.map(tokio_rustls::TlsAcceptor::from);
    if let (Some(listener), Some(acceptor)) = (mqtts, acceptor.clone()) {
        tasks.spawn(crate::mqtt::serve_tls(
            listener,
            acceptor,
            hub.clone(),
            stop_rx.clone(),
            open_tx.clone(),
        ));
    }
    if let (Some(listener), Some(acceptor)) = (wss, acceptor) {
        tasks.spawn(crate::mqtt::websocket::serve(
            listener,
            acceptor,
            hub.clone(),
            stop_rx.clone(),
            open_tx.clone(),
        ));
    }
    let deployments = crate::deploy::http::routes(hub.clone(), deploy.clone());
    let app = crate::api::router(hub.clone(), deployments.clone()).merge(crate::console::router(
        hub.clone(),
        crate::api::resources(deployments),
    ));
    tasks.spawn(crate::api::listener::serve(
        api,
        app,
        hub.clone(),
        stop_rx.clone(),
    ));

    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    hub.stop();
    drop(open_tx);
    // Give connections a moment to close and store their last activity, and background
    // tasks to finish what they were doing.
    let finished = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
        let _ = open_rx.recv().await;
    })
    .await;
    if finished.is_err() {
        tracing::warn!("some connections or background tasks did not finish within 5 s");
    }
    hub.sinks.stop().await;
    // What the last consumers acknowledged while closing.
    if let Err(e) = hub.events.flush() {
        tracing::warn!(error = %e, "could not store consumer group checkpoints");
    }
    let _ = std::fs::remove_file(data_dir.join(ENDPOINTS_FILE));
    info!("stopped");
    Ok(())
}

/// Raises the open-file soft limit to the hard limit (a hub holds a socket per device) and
/// warns when even that cannot hold every budget: MQTT connections, sockets not yet through
/// CONNECT, API connections, and headroom for stores and logs.
fn raise_fd_limit(config: &Config) {
    let want = config.limits.max_connections
        + config.limits.max_pending_connections
        + config.api_limits.max_connections
        + 256;
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit only read and write the struct passed.
        let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        if got != 0 {
            tracing::warn!("could not read the open-file limit");
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            // SAFETY: as above.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                limit = raised;
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every platform
        let have = limit.rlim_cur as u64;
        if have < want as u64 {
            tracing::warn!(
                open_files = have,
                needed = want,
                "the open-file limit is below what the configured connection budgets need; raise it (ulimit -n, LimitNOFILE=) or lower [mqtt] max_connections"
            );
        } else {
            info!(open_files = have, "open-file limit");
        }
    }
    #[cfg(not(unix))]
    let _ = want;
}

/// Applies the configuration file again on every SIGHUP (see [`run_with_reload`]).
async fn reload_on_sighup(hub: SharedHub, reload: Reload, mut stop: watch::Receiver<bool>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: configuration reload is off");
            return;
        };
        loop {
            tokio::select! {
                got = hangups.recv() => if got.is_none() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
            apply_reload(&hub, &reload).await;
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (hub, reload);
        let _ = stop.wait_for(|s| *s).await;
    }
}

async fn apply_reload(hub: &SharedHub, reload: &Reload) {
    let refused = |why: String| {
        tracing::error!(
            why,
            "configuration reload refused; the configuration in force stays"
        );
    };
    let new = match (reload.load)() {
        Ok(c) => c,
        Err(e) => return refused(e.to_string()),
    };
    let level_from_config = std::env::var_os("RUST_LOG").is_none();
    if level_from_config {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&new.log.level) {
            return refused(format!("log.level '{}': {e}", new.log.level));
        }
    }
    let routes = {
        let _one = hub.routing.update.lock().await;
        let edge = hub.twins.get(hub.routing.route_twin()).desired.data();
        match hub
            .routing
            .reload_config(new.routes.clone(), new.routing.time_to_live_secs, &edge)
        {
            Ok(n) => n,
            Err(errors) => {
                return refused(
                    errors
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; "),
                )
            }
        }
    };
    if level_from_config {
        if let Err(e) = (reload.set_log_level)(&new.log.level) {
            tracing::warn!(error = e, "the log level could not be changed");
        }
    }
    hub.limits.set(&new.limits);
    hub.api_limits.set(&new.api_limits);
    // What only a restart applies: said, so nobody waits for it.
    let old = &hub.config;
    let mut at_restart = Vec::new();
    for (key, changed) in [
        (
            "listen",
            (old.mqtt, old.mqtts, old.wss, old.api) != (new.mqtt, new.mqtts, new.wss, new.api),
        ),
        (
            "hub",
            old.hub_id != new.hub_id
                || old.hostname != new.hostname
                || old.data_dir != new.data_dir,
        ),
        (
            "mqtt.max_connections, mqtt.max_pending_connections",
            (
                old.limits.max_connections,
                old.limits.max_pending_connections,
            ) != (
                new.limits.max_connections,
                new.limits.max_pending_connections,
            ),
        ),
        (
            "upstream",
            format!("{:?}", old.upstream) != format!("{:?}", new.upstream),
        ),
        (
            "store_and_forward",
            format!("{:?}", old.store_and_forward) != format!("{:?}", new.store_and_forward),
        ),
        ("log.format", old.log.format != new.log.format),
    ] {
        if changed {
            at_restart.push(key);
        }
    }
    info!(
        routes,
        log_level = %new.log.level,
        at_restart = ?at_restart,
        max_payload_bytes = new.limits.max_payload_bytes,
        "configuration reloaded: routes, log level, the [api] limits and the [mqtt] payload, connect and session limits in force; changed settings that take effect at the next start are listed"
    );
}

/// A deployment acknowledged just before a crash (or a leader's death) may not have reached
/// every twin yet.
async fn reconcile_at_start(hub: &SharedHub) {
    match hub.changed(crate::hub::Change::Start).await {
        Ok(0) => {}
        Ok(n) => info!(twins = n, "deployment state brought up to date at start"),
        Err(e) => tracing::warn!(error = %e, "reconciling deployments at start"),
    }
}

/// Keeps `fleethub_cluster_leader` in step with leadership.
async fn show_leadership(hub: SharedHub, mut stop: watch::Receiver<bool>) {
    let mut leader = hub.cluster.watch_leader();
    loop {
        hub.metrics
            .cluster_leader
            .set(*leader.borrow_and_update() as i64);
        tokio::select! {
            changed = leader.changed() => if changed.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Removes expired entries from queues nobody drains (sink offline) as time passes.
async fn sweep_expired(hub: SharedHub, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let hub = hub.clone();
        let _ = tokio::task::spawn_blocking(move || {
            use fleethub_router::queue::Queue;
            let none = fleethub_router::queue::KeySet::default();
            for s in hub.queues.stats() {
                if s.depth > 0 {
                    let _ = hub.queues.peek(&s.sink, &none, 512, crate::c2d::now_ms());
                }
            }
        })
        .await;
    }
}

/// Stores the consumer groups' checkpoints that moved, five times a second and once more at
/// shutdown: a crash redelivers at most that long's acknowledged events (duplicates, never
/// losses), for one small write per moving group instead of one per acknowledgement.
async fn store_checkpoints(hub: SharedHub, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        let events = hub.events.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || events.flush()).await {
            tracing::warn!(error = %e, "could not store consumer group checkpoints");
        }
        if stopping {
            return;
        }
    }
}

/// Forgets persistent sessions of clients gone longer than the session expiry.
async fn expire_sessions(hub: SharedHub, mut stop: watch::Receiver<bool>) {
    loop {
        // Read each time: a reload may change it. Checked twice per expiry period, at most
        // once a minute.
        let expiry = hub.limits.session_expiry_secs();
        let every = Duration::from_secs((expiry / 2).clamp(1, 60));
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if !hub.sessions.expires_here(hub.cluster.is_leader()) {
            continue;
        }
        let h = hub.clone();
        let expired =
            tokio::task::spawn_blocking(move || h.sessions.expire(expiry.saturating_mul(1000)))
                .await
                .unwrap_or(0);
        if expired > 0 {
            hub.metrics.sessions_expired.inc_by(expired as u64);
            info!(sessions = expired, "idle persistent sessions expired");
        }
    }
}

fn write_endpoints(data_dir: &Path, endpoints: &Endpoints) -> Result<(), ServerError> {
    let path = data_dir.join(ENDPOINTS_FILE);
    let tmp = data_dir.join(format!("{ENDPOINTS_FILE}.tmp"));
    let json = serde_json::to_vec_pretty(endpoints).unwrap_or_default();
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| ServerError::Io {
            what: "writing endpoints.json",
            path,
            source,
        })
}

/// Makes every store of a cluster node write through to the tables the nodes share;
/// returns the registry's and the twins' tables, whose change feeds the node follows with
/// the others'.
fn share_stores(
    c: &crate::config::ClusterSection,
    stores: &crate::hub::Stores,
    deploy: &crate::deploy::Engine,
) -> Result<(Arc<SharedRows>, Arc<SharedRows>), ServerError> {
    let open = |name: &str| SharedRows::open(&c.postgres, &c.node, name).map(Arc::new);
    let store = |e: &dyn std::fmt::Display| ServerError::Store(e.to_string());
    let identities = open("identities")?;
    stores.registry.share(identities.clone())?;
    let twins = open("twins")?;
    stores.twins.share(twins.clone()).map_err(|e| store(&e))?;
    // Sessions: each CONNECT claims its own; no change feed.
    stores
        .sessions
        .share(open("sessions")?)
        .map_err(|e| store(&e))?;
    // C2D queues: read by the node the device is connected to.
    stores.c2d.share(open("c2d")?).map_err(|e| store(&e))?;
    // Targeted deployments with their rollout state, and each device's deployment state:
    // any node's API changes them, the leader's ticker advances rollouts.
    deploy
        .targeted
        .share(open("deployments")?, open("deployment_devices")?)
        .map_err(|e| store(&e))?;
    // The Azure Sphere side: products and groups, images, group deployments.
    stores.fleet.share(open("fleet")?).map_err(|e| store(&e))?;
    stores
        .images
        .share(open("images")?)
        .map_err(|e| store(&e))?;
    deploy
        .groups
        .share(open("group_deployments")?)
        .map_err(|e| store(&e))?;
    // Device authentication and provisioning: X.509 CAs and DPS enrollments.
    stores
        .certificates
        .share(open("ca_certificates")?)
        .map_err(|e| store(&e))?;
    stores
        .enrollments
        .share(open("enrollments")?)
        .map_err(|e| store(&e))?;
    Ok((identities, twins))
}

/// Completes on SIGINT or SIGTERM.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
