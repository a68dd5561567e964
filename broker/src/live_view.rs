//! The live view's way into the embedded router: telemetry that service connections watch
//! (`$fleethub/events/+/#`, `monitor-events`) enters rumqttd through one shared link.
//!
//! Why one link: the router is only needed to fan telemetry out to watchers, and a rumqttd
//! link costs about 230 KB (its buffers on both sides). Opening one per device connection,
//! the first time it sent telemetry while someone watched, made a 10,000-device fleet that
//! each sent one message grow the hub by 2.3 GB. A device's messages stay in order (one
//! channel, one link). The view is best effort, as documented: QoS 0 into the router, and
//! what would queue beyond [`MAX_PENDING_BYTES`] for it is dropped and counted; the events
//! endpoint and the routes keep everything.
//!
//! On a cluster node the view also spans the other nodes (`relay::live_view_across`): while
//! another node has watchers, this node hands its telemetry out as well ([`LiveView::outward`]),
//! and what other nodes hand out comes in through [`LiveView::offer`] like local telemetry.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use rumqttd::protocol::{Packet, Publish};
use tokio::sync::mpsc;

use crate::core::Core;

/// Bytes of telemetry waiting for the router at most.
const MAX_PENDING_BYTES: usize = 16 * 1024 * 1024;
/// Publishes handed to the router with one wake-up at most.
const MAX_BATCH: usize = 512;

pub struct LiveView {
    core: Core,
    dropped: prometheus::IntCounter,
    pending: Arc<AtomicUsize>,
    /// Started on first use (from the async runtime).
    tx: OnceLock<mpsc::UnboundedSender<Publish>>,
    /// On a cluster node: whether another node has watchers now, and where this node's
    /// telemetry goes for them.
    watched_elsewhere: AtomicBool,
    outward: OnceLock<mpsc::UnboundedSender<(bytes::Bytes, bytes::Bytes)>>,
    outward_pending: Arc<AtomicUsize>,
}

impl LiveView {
    pub fn new(core: Core, dropped: prometheus::IntCounter) -> LiveView {
        LiveView {
            core,
            dropped,
            pending: Arc::new(AtomicUsize::new(0)),
            tx: OnceLock::new(),
            watched_elsewhere: AtomicBool::new(false),
            outward: OnceLock::new(),
            outward_pending: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Whether another cluster node has watchers: one relaxed load on the telemetry path.
    pub fn watched_elsewhere(&self) -> bool {
        self.watched_elsewhere.load(Ordering::Relaxed)
    }

    pub fn set_watched_elsewhere(&self, watched: bool) {
        self.watched_elsewhere.store(watched, Ordering::Relaxed);
    }

    /// Where telemetry goes for other nodes' watchers (set once by the cluster's task);
    /// returns the counter of bytes waiting there, which the task lowers as it sends.
    pub fn send_outward_to(
        &self,
        tx: mpsc::UnboundedSender<(bytes::Bytes, bytes::Bytes)>,
    ) -> Arc<AtomicUsize> {
        let _ = self.outward.set(tx);
        self.outward_pending.clone()
    }

    /// Hands telemetry (live-view topic and envelope) to other nodes' watchers, best effort
    /// as the local view is.
    pub fn outward(&self, topic: bytes::Bytes, payload: bytes::Bytes) {
        let Some(tx) = self.outward.get() else {
            return;
        };
        let size = topic.len() + payload.len();
        if self.outward_pending.fetch_add(size, Ordering::Relaxed) + size > MAX_PENDING_BYTES
            || tx.send((topic, payload)).is_err()
        {
            self.outward_pending.fetch_sub(size, Ordering::Relaxed);
            self.dropped.inc();
        }
    }

    /// Shows telemetry (its live-view topic and envelope) to the live view's watchers.
    pub fn offer(&self, topic: bytes::Bytes, payload: bytes::Bytes) {
        let size = topic.len() + payload.len();
        if self.pending.fetch_add(size, Ordering::Relaxed) + size > MAX_PENDING_BYTES {
            self.pending.fetch_sub(size, Ordering::Relaxed);
            self.dropped.inc();
            return;
        }
        // QoS 0, as rumqttd expects of local links.
        let publish = Publish::new(topic, payload, false);
        let tx = self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(self.core.clone(), rx, self.pending.clone()));
            tx
        });
        if tx.send(publish).is_err() {
            self.pending.fetch_sub(size, Ordering::Relaxed);
            self.dropped.inc();
        }
    }
}

async fn run(core: Core, mut rx: mpsc::UnboundedReceiver<Publish>, pending: Arc<AtomicUsize>) {
    // The receiving half stays open for the link's life (the router sends nothing back for
    // QoS 0 publishes, but a dropped receiver would end the link).
    let (mut link, _link_rx) = match core.link("live-view".to_string()).await {
        Ok(link) => link,
        Err(e) => {
            tracing::error!(error = %e, "the live view has no way into the router: watchers of live telemetry see none");
            return;
        }
    };
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let size: usize = batch.iter().map(|p| p.topic.len() + p.payload.len()).sum();
        let mut packets: Vec<Packet> = batch.drain(..).map(|p| Packet::Publish(p, None)).collect();
        let Some(last) = packets.pop() else {
            continue;
        };
        link.buffer().extend(packets);
        let sent = link.send(last).await;
        pending.fetch_sub(size, Ordering::Relaxed);
        if sent.is_err() {
            tracing::error!("the router closed the live view's link");
            return;
        }
    }
}
