//! What every custom endpoint (`[endpoints.NAME]`, `INTO Endpoint("NAME")`) shares,
//! whatever its kind: a task per endpoint that runs the kind's session (connect, then write
//! from the endpoint's durable queue `$endpoint/NAME` until something fails) again and again
//! with backoff, and the one driver of a kind over all its endpoints. A kind supplies only its
//! session ([`super::jetstream`], [`super::postgres`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleethub_router::queue::DiskQueue;
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::{Context, Health, SinkDriver, SinkId, StopFuture};
use crate::config::EndpointSection;
use crate::metrics::Metrics;

/// One configured endpoint, as its sessions see it.
pub struct Endpoint {
    pub name: String,
    /// Its queue's name: `$endpoint/NAME`.
    pub queue_name: String,
    pub cfg: EndpointSection,
    pub hub_id: String,
    pub queue: Arc<DiskQueue>,
    pub metrics: Arc<Metrics>,
    /// Set by the session once it can write; cleared when it ends.
    pub connected: AtomicBool,
    /// Entries were committed to the queue.
    pub wake: Notify,
}

/// One connection's work; ends with why it stopped (it never ends well: it runs until
/// something fails or the task is stopped).
pub type SessionFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// A kind's session: connect, then write from the queue.
pub type Session = fn(Arc<Endpoint>) -> SessionFuture;

/// Every endpoint of one kind, each with its task.
pub struct Endpoints {
    kind: &'static str,
    endpoints: HashMap<String, Running>,
}

struct Running {
    endpoint: Arc<Endpoint>,
    stop: tokio::sync::watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Endpoints {
    /// Starts a task for every `[endpoints.*]` of `kind`.
    pub fn start(ctx: &Context, kind: &'static str, session: Session) -> Endpoints {
        let mut endpoints = HashMap::new();
        for (name, cfg) in &ctx.config.endpoints {
            if cfg.kind != kind {
                continue;
            }
            let endpoint = Arc::new(Endpoint {
                name: name.clone(),
                queue_name: SinkId::Endpoint(name.clone()).to_string(),
                cfg: cfg.clone(),
                hub_id: ctx.config.hub_id.to_string(),
                queue: ctx.queues.clone(),
                metrics: ctx.metrics.clone(),
                connected: AtomicBool::new(false),
                wake: Notify::new(),
            });
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let task = tokio::spawn(run(endpoint.clone(), kind, session, stopped));
            endpoints.insert(
                name.clone(),
                Running {
                    endpoint,
                    stop,
                    task: std::sync::Mutex::new(Some(task)),
                },
            );
        }
        Endpoints { kind, endpoints }
    }
}

/// Runs sessions one after another, with backoff between them, until stopped.
async fn run(
    endpoint: Arc<Endpoint>,
    kind: &'static str,
    session: Session,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let ended = tokio::select! {
            r = session(endpoint.clone()) => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        if let Err(e) = ended {
            if endpoint.connected.swap(false, Ordering::Relaxed) {
                warn!(endpoint = endpoint.name, kind, error = %e, "endpoint lost; messages wait in its queue");
            } else {
                debug!(endpoint = endpoint.name, kind, error = %e, "endpoint unreachable");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    endpoint.connected.store(false, Ordering::Relaxed);
}

impl SinkDriver for Endpoints {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn owns(&self, sink: &SinkId) -> bool {
        matches!(sink, SinkId::Endpoint(name) if self.endpoints.contains_key(name))
    }

    fn refuses(&self, _sink: &SinkId) -> Option<String> {
        None
    }

    fn wake(&self, sink: &SinkId) {
        if let SinkId::Endpoint(name) = sink {
            if let Some(r) = self.endpoints.get(name) {
                r.endpoint.wake.notify_one();
            }
        }
    }

    fn health(&self) -> Health {
        Health {
            kind: self.kind,
            enabled: !self.endpoints.is_empty(),
            connected: (!self.endpoints.is_empty()).then(|| {
                self.endpoints
                    .values()
                    .all(|r| r.endpoint.connected.load(Ordering::Relaxed))
            }),
        }
    }

    /// Ends every endpoint's task and waits for it; entries in flight stay queued.
    fn stop(&self) -> StopFuture<'_> {
        Box::pin(async move {
            for r in self.endpoints.values() {
                let _ = r.stop.send(true);
                let task = r.task.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(task) = task {
                    let _ = task.await;
                }
            }
        })
    }
}
