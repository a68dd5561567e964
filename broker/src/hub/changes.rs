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
    /// Reported properties of these devices (or their modules) were written: devices'
    /// reports, gathered while a reconcile ran (see [`Hub::reported_changed`]).
    Reported(Vec<DeviceId>),
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

    /// A device's reported properties changed: the observer hears it soon, not before the
    /// device's write is acknowledged. Reports that arrive while a reconcile runs are
    /// gathered and handed over as one change: when a fleet answers a deployment at once
    /// (10,000 reports in a second), that is a few reconciles of many devices instead of
    /// 10,000 tasks queued behind one another, each holding its state.
    pub fn reported_changed(self: &Arc<Self>, device: DeviceId) {
        if !self.pending_reports.push(device) {
            return;
        }
        let hub = self.clone();
        tokio::spawn(async move {
            while let Some(mut devices) = hub.pending_reports.take() {
                devices.sort();
                devices.dedup();
                let n = devices.len();
                if let Err(e) = hub.changed(Change::Reported(devices)).await {
                    tracing::warn!(devices = n, error = %e, "deployments after reported changes");
                }
            }
        });
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
