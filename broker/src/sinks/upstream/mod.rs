//! The `$upstream` bridge: drains the durable `$upstream` queue into the configured upstream
//! broker (rumqttc).
//!
//! Entries are published at QoS 1 in queue order (priority, then arrival) and removed from
//! the queue only when the upstream's PUBACK for them arrives. Each connection attempt uses a
//! fresh client, so rumqttc never replays on its own: after a drop, whatever was not
//! acknowledged is read again from the queue and re-sent (at least once; the few duplicates
//! are the in-flight window at the moment of the drop).

//! When `[upstream]` is not enabled the driver exists but takes nothing: an `INTO $upstream`
//! route's messages are dropped and counted, not queued for a bridge that will never run.

mod bridge;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use super::{Context, Health, SinkDriver, SinkId, StopFuture};

/// The queue every `INTO $upstream` route feeds.
pub const SINK: &str = "$upstream";
/// The driver's name in health reports.
pub const KIND: &str = "upstream";
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

/// The `$upstream` driver: the bridge task when configured.
pub struct Upstream {
    running: Option<Running>,
}

struct Running {
    connected: Arc<AtomicBool>,
    wake: Arc<Notify>,
    stop: tokio::sync::watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Upstream {
    /// Starts the bridge task if `[upstream]` is enabled.
    pub fn start(ctx: &Context) -> Result<Upstream, UpstreamError> {
        let cfg = &ctx.config.upstream;
        if !cfg.enabled {
            return Ok(Upstream { running: None });
        }
        let hub_id = ctx.config.hub_id.as_str();
        let connected = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(Notify::new());
        let bridge = bridge::Bridge {
            options: bridge::options(cfg, hub_id)?,
            template: cfg.topic.clone(),
            hub_id: hub_id.to_string(),
            queue: ctx.queues.clone(),
            metrics: ctx.metrics.clone(),
            connected: connected.clone(),
            wake: wake.clone(),
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(bridge.run(stopped));
        Ok(Upstream {
            running: Some(Running {
                connected,
                wake,
                stop,
                task: std::sync::Mutex::new(Some(task)),
            }),
        })
    }
}

impl SinkDriver for Upstream {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn owns(&self, sink: &SinkId) -> bool {
        *sink == SinkId::Upstream
    }

    fn refuses(&self, _sink: &SinkId) -> Option<String> {
        self.running
            .is_none()
            .then(|| "[upstream] is not enabled: nothing can deliver to $upstream".to_string())
    }

    fn wake(&self, _sink: &SinkId) {
        if let Some(r) = &self.running {
            r.wake.notify_one();
        }
    }

    fn health(&self) -> Health {
        Health {
            kind: KIND,
            enabled: self.running.is_some(),
            connected: Some(
                self.running
                    .as_ref()
                    .is_some_and(|r| r.connected.load(Ordering::Relaxed)),
            ),
        }
    }

    /// Ends the bridge and waits for it. Entries in flight stay queued (they are removed
    /// only on the upstream's PUBACK) and are sent again after the next start.
    fn stop(&self) -> StopFuture<'_> {
        Box::pin(async move {
            let Some(r) = &self.running else {
                return;
            };
            let _ = r.stop.send(true);
            let task = r.task.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(task) = task {
                let _ = task.await;
            }
        })
    }
}
