//! The live connections of identities and what the hub tells each: its mailbox, and the
//! messages meant for it alone. Its own module so that what delivers to a connection (the
//! hub, sink drivers) and the connection itself share it without importing each other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

use crate::identity::IdentityKey;

use tokio::sync::Notify;

use crate::topics::Delivery;

/// A message for one identity's connection: `suffix` completes the client topic of
/// `delivery` (`$iothub/twin/res/` + `200/?$rid=1`).
#[derive(Debug)]
pub struct Direct {
    pub delivery: Delivery,
    pub suffix: String,
    pub body: bytes::Bytes,
}

impl Direct {
    /// A desired patch on `$iothub/twin/PATCH/properties/desired/?$version={v}`, at the
    /// version of `desired`.
    pub fn desired_patch(desired: &crate::twin::doc::Section, patch: &serde_json::Value) -> Direct {
        Direct {
            delivery: Delivery::DesiredPatch,
            suffix: format!("?$version={}", desired.version),
            body: patch.to_string().into(),
        }
    }

    /// The whole desired document on `$fleethub/twin/desired/?$version={v}`.
    pub fn desired_state(desired: &crate::twin::doc::Section) -> Direct {
        Direct {
            delivery: Delivery::DesiredState,
            suffix: format!("?$version={}", desired.version),
            body: desired.with_version().to_string().into(),
        }
    }
}

/// Direct messages one connection may have waiting; beyond that they are dropped (and
/// counted), as a QoS 0 subscriber that stopped reading would lose them.
pub const DIRECT_BACKLOG: usize = 1024;

/// What the hub tells one connection: messages for this identity alone (twin answers,
/// desired patches, method requests, its desired document), that C2D or module-input entries
/// were queued, that it must close (taken over, disabled, deleted); and what the connection
/// tells the hub (whether it listens for method requests).
///
/// One allocation and one wake-up per connection, and a locked queue rather than an mpsc
/// channel: a fleet is mostly idle connections, and a tokio channel allocates its first block
/// of slots (about 2 KiB here) up front while an empty `VecDeque` allocates nothing.
#[derive(Default)]
pub struct Mailbox {
    items: std::sync::Mutex<std::collections::VecDeque<Direct>>,
    ready: Notify,
    kicked: AtomicBool,
    c2d: AtomicBool,
    inputs: AtomicBool,
    /// Set while the connection listens for method requests: a call to a connection that
    /// does not is answered 404103 at once, as IoT Hub does.
    pub methods: AtomicBool,
}

impl Mailbox {
    /// Queues `d`; `false` (dropped) when the backlog is full.
    pub fn push(&self, d: Direct) -> bool {
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        if items.len() >= DIRECT_BACKLOG {
            return false;
        }
        items.push_back(d);
        drop(items);
        // A permit is kept if the connection is not waiting right now.
        self.ready.notify_one();
        true
    }

    /// Asks the connection to close.
    pub fn kick(&self) {
        self.kicked.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// Tells the connection that C2D messages were queued for it.
    pub fn wake_c2d(&self) {
        self.c2d.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// Tells a module's connection that routed messages were queued for its inputs.
    pub fn wake_inputs(&self) {
        self.inputs.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    pub fn kicked(&self) -> bool {
        self.kicked.load(Ordering::Acquire)
    }

    /// Whether a C2D wake came since the last call.
    pub fn take_c2d(&self) -> bool {
        self.c2d.swap(false, Ordering::AcqRel)
    }

    /// Whether a module-input wake came since the last call.
    pub fn take_inputs(&self) -> bool {
        self.inputs.swap(false, Ordering::AcqRel)
    }

    /// Every message waiting, oldest first.
    pub fn take(&self) -> std::collections::VecDeque<Direct> {
        std::mem::take(&mut *self.items.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Completes once something happened since the last wait.
    pub async fn ready(&self) {
        self.ready.notified().await
    }
}

/// A live device or module connection, so the API can close it (delete, disable) and a
/// second connection with the same id can take over, as IoT Hub does.
pub struct LiveConnection {
    pub conn_id: u64,
    /// Everything the hub tells this connection.
    pub mailbox: Arc<Mailbox>,
}

/// Every identity's live connection, by identity (at most one each).
pub type Live = Arc<DashMap<IdentityKey, LiveConnection>>;
