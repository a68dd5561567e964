//! How the hub tells what sits above it that something changed.
//!
//! The deployment engine keeps state derived from devices, groups and images (which
//! deployment applies, what a group's devices should run). It must hear about every change
//! that can move that state: a registration, a move to another group, a twin write, a
//! group's settings or deletion, a new image version, a start after downtime. The hub defines
//! this interface and the engine implements it, so the hub, the API and the MQTT front end
//! name nothing of `deploy`: the import graph points one way.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::Hub;
use crate::identity::DeviceId;

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A device, or a module of it, was registered.
    Registered(DeviceId),
    /// The device moved to another device group.
    Moved(DeviceId),
    /// Tags, desired or reported properties of the device or one of its modules were written.
    Twin(DeviceId),
    /// A device group's settings changed (application updates, OS feed): its devices may run
    /// something else now.
    GroupChanged { group_id: String },
    /// A device group was deleted (its devices had left it).
    GroupDeleted { group_id: String },
    /// A new version of the image `name` was added.
    ImageAdded { name: String },
    /// The hub started: anything may have changed while it was down (or a crash cut a
    /// reconcile short).
    Start,
}

/// An observer's failure, carried without the hub knowing its type.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ChangeError(pub Box<dyn std::error::Error + Send + Sync>);

pub type ChangeFuture = Pin<Box<dyn Future<Output = Result<usize, ChangeError>> + Send>>;

/// Something that keeps derived state and must hear of changes.
pub trait ChangeObserver: Send + Sync {
    /// Brings derived state up to date after `change`; returns how many twins it wrote.
    fn changed(&self, hub: Arc<Hub>, change: Change) -> ChangeFuture;
}

impl Hub {
    /// Installs the observer (once, at start, before any connection or request).
    pub fn observe(&self, observer: Arc<dyn ChangeObserver>) {
        if self.observer.set(observer).is_err() {
            tracing::warn!("a second change observer was ignored");
        }
    }

    /// Tells the observer what changed; the future answers how many twins it wrote. It owns
    /// what it needs, so it can be awaited or spawned.
    pub fn changed(self: &Arc<Self>, change: Change) -> ChangeFuture {
        match self.observer.get() {
            Some(o) => o.changed(self.clone(), change),
            None => Box::pin(async { Ok(0) }),
        }
    }
}
