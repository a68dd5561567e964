//! The one path a twin write takes, whoever writes: the API (operator tags and desired
//! properties), a device (reported properties over MQTT) or a deployment (the desired keys
//! it owns).
//!
//! In order: the route rule (a write to the hub's `$edgeHub` desired properties must leave a
//! valid route set, or it is refused whole and the table in force stays, for every writer);
//! the durable apply; metrics; the desired push to the identity's connection; the route-table
//! swap; the twin-change notification (reported writes); and telling the change observer
//! (the deployment engine) so tags and reported properties can select deployments.

use std::future::Future;
use std::sync::Arc;

use fleethub_router::route::{RouteError, RouteTable};
use serde_json::{Map, Value};

use super::changes::Change;
use super::{Direct, Hub};
use crate::identity::IdentityKey;
use crate::twin::{doc, Applied, Twin, TwinError, TwinOp};

/// A twin write, by who makes it.
#[derive(Debug, Clone)]
pub enum TwinWrite {
    /// A device's reported properties (validated).
    Reported(Map<String, Value>),
    /// The operator's tags and/or desired properties (merge patches, validated), optionally
    /// guarded by an etag.
    Operator {
        tags: Option<Map<String, Value>>,
        desired: Option<Map<String, Value>>,
        if_match: Option<String>,
    },
    /// A deployment's keys: each top-level desired key is replaced whole, `null` removes it.
    Deployment(Map<String, Value>),
}

impl TwinWrite {
    /// The `section` label of `fleethub_twin_patches_total`; deployments' writes are counted
    /// by the deployment engine, not here.
    fn section(&self) -> Option<&'static str> {
        match self {
            TwinWrite::Reported(_) => Some("reported"),
            TwinWrite::Operator {
                tags: Some(_),
                desired: None,
                ..
            } => Some("tags"),
            TwinWrite::Operator { .. } => Some("desired"),
            TwinWrite::Deployment(_) => None,
        }
    }

    fn writes_desired(&self) -> bool {
        match self {
            TwinWrite::Reported(_) => false,
            TwinWrite::Operator { desired, .. } => desired.is_some(),
            TwinWrite::Deployment(_) => true,
        }
    }

    /// The desired document after this write, from `current`.
    fn desired_after(&self, current: &Map<String, Value>) -> Map<String, Value> {
        let mut next = current.clone();
        match self {
            TwinWrite::Operator {
                desired: Some(patch),
                ..
            } => doc::merge_plain(&mut next, patch),
            TwinWrite::Deployment(keys) => {
                for (k, v) in keys {
                    if v.is_null() {
                        next.remove(k);
                    } else {
                        next.insert(k.clone(), v.clone());
                    }
                }
            }
            _ => {}
        }
        next
    }

    fn into_op(self) -> TwinOp {
        match self {
            TwinWrite::Reported(patch) => TwinOp::Reported(patch),
            TwinWrite::Operator {
                tags,
                desired,
                if_match,
            } => TwinOp::Update {
                tags,
                desired,
                if_match,
            },
            TwinWrite::Deployment(keys) => TwinOp::ReplaceDesired(keys),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TwinWriteError {
    #[error("route set refused: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    InvalidRoutes(Vec<RouteError>),
    #[error(transparent)]
    Twin(#[from] TwinError),
}

impl Hub {
    /// The route table a write to `key` would leave in force: `None` when the write does not
    /// touch routes, an error listing every problem when the set would be invalid.
    pub fn routes_after(
        &self,
        key: &IdentityKey,
        write: &TwinWrite,
    ) -> Option<Result<RouteTable, Vec<RouteError>>> {
        if !self.routing.is_route_twin(key) || !write.writes_desired() {
            return None;
        }
        let next = write.desired_after(&self.twins.get(key).desired.data());
        Some(self.routing.build(&next))
    }

    /// Writes a twin and does everything that follows (see the module comment).
    ///
    /// Writes that cannot touch routes are queued before this returns, so two writes from
    /// one connection commit in the order they were made even if their futures are polled
    /// on different threads. A device's reported write does not wait for the deployment
    /// engine (its acknowledgement is the commit); an operator's does, so the API answers
    /// with deployments already brought up to date.
    pub fn write_twin(
        self: &Arc<Self>,
        key: IdentityKey,
        write: TwinWrite,
    ) -> impl Future<Output = Result<Applied, TwinWriteError>> + Send + 'static {
        let hub = self.clone();
        let section = write.section();
        let reported = match &write {
            TwinWrite::Reported(patch) => Some(patch.clone()),
            _ => None,
        };
        let notify = !matches!(write, TwinWrite::Deployment(_));
        let touches_routes = self.routing.is_route_twin(&key) && write.writes_desired();
        let queued =
            (!touches_routes).then(|| self.twins.submit(key.clone(), write.clone().into_op()));
        async move {
            let count = |result: &str| {
                if let Some(section) = section {
                    hub.metrics
                        .twin_patches
                        .with_label_values(&[section, result])
                        .inc();
                }
            };
            let applied = match queued {
                Some(committed) => committed.await,
                None => {
                    // Validate and swap as one step: no other route write in between.
                    let _one = hub.routing.update.lock().await;
                    let table = match hub.routes_after(&key, &write) {
                        Some(Ok(table)) => Some(table),
                        Some(Err(errors)) => {
                            count("bad_request");
                            return Err(TwinWriteError::InvalidRoutes(errors));
                        }
                        None => None,
                    };
                    let applied = hub.twins.apply(key.clone(), write.into_op()).await;
                    if let (Ok(_), Some(table)) = (&applied, table) {
                        hub.routing.swap(table);
                        tracing::info!(
                            routes = hub.routing.table().routes.len(),
                            "route table replaced from the $edgeHub twin"
                        );
                    }
                    applied
                }
            };
            let applied = match applied {
                Ok(a) => a,
                Err(e) => {
                    count(match e {
                        TwinError::EtagMismatch { .. } => "conflict",
                        TwinError::Store(_) => "error",
                    });
                    return Err(e.into());
                }
            };
            count("ok");
            if applied.desired_patch.is_some() {
                hub.publish_desired(&key, &applied.twin, applied.desired_patch.as_ref());
            }
            if let Some(patch) = &reported {
                hub.twin_changed(&key, patch, applied.twin.reported.version);
            }
            if notify {
                if reported.is_some() {
                    hub.reported_changed(key.device.clone());
                } else if let Err(e) = hub.changed(Change::Twin(key.device.clone())).await {
                    tracing::warn!(identity = %key, error = %e, "deployments after a twin change");
                }
            }
            Ok(applied)
        }
    }

    /// Sends a desired change: the patch on `$iothub/twin/PATCH/properties/desired/` and the
    /// full document on `$fleethub/twin/desired/` (sent again to every connection that
    /// subscribes to it, so it acts as a retained message).
    /// What follows a twin change another node of the cluster made, on this node: the
    /// desired change to the identity's connection if it is here (as the patch from what this
    /// node had to what is now, so writes it never saw are in it), the route table when it
    /// is the `$edgeHub` twin, and the deployment engine told of reported and tag changes.
    pub fn heard_twin(self: &Arc<Self>, heard: crate::twin::store::HeardTwin) {
        let crate::twin::store::HeardTwin { key, before, after } = heard;
        let Some(after) = after else {
            return;
        };
        if after.desired.version > before.desired.version {
            let (old, new) = (before.desired.data(), after.desired.data());
            let mut patch = doc::diff(&old, &new);
            patch.insert("$version".into(), serde_json::json!(after.desired.version));
            self.publish_desired(&key, &after, Some(&Value::Object(patch)));
            if self.routing.is_route_twin(&key) {
                match self.routing.build(&new) {
                    Ok(table) => {
                        self.routing.swap(table);
                        tracing::info!("route table replaced from the $edgeHub twin (another node wrote it)");
                    }
                    Err(errors) => tracing::warn!(
                        errors = errors.len(),
                        "another node wrote $edgeHub routes this node cannot use; the table in force stays"
                    ),
                }
            }
        }
        if after.reported.version > before.reported.version {
            self.reported_changed(key.device.clone());
        }
        if after.tags != before.tags {
            let hub = self.clone();
            tokio::spawn(async move {
                if let Err(e) = hub.changed(Change::Twin(key.device.clone())).await {
                    tracing::warn!(identity = %key, error = %e, "deployments after another node's twin change");
                }
            });
        }
    }

    fn publish_desired(&self, key: &IdentityKey, twin: &Twin, patch: Option<&Value>) {
        if let Some(patch) = patch {
            self.send(key, Direct::desired_patch(&twin.desired, patch));
            self.metrics.desired_pushes.inc();
        }
        self.send(key, Direct::desired_state(&twin.desired));
    }
}
