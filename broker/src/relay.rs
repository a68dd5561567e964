//! Routed messages for a module connected to another node.
//!
//! Routes run on the node where a message arrives, and queue what they route to a module
//! input in that node's durable store-and-forward queue (the message's PUBACK waits for that
//! commit, as on a single hub). When the module is connected to another node, this task
//! moves the entries there: it reads a batch in delivery order, asks the node holding the
//! module (over NATS, `….inputs`) to commit them to its own queue, and removes them here
//! only once that node answered. The module then reads them there with everything routed
//! on that node. So a module connected to any node drains its inputs, and neither node's
//! death (`kill -9`) loses an acknowledged message: each entry is on one node's disk or
//! both. A lost answer sends a batch again (at most one batch of duplicates per loss, as
//! MQTT QoS 1 allows); priority and the time left to live go with each entry.
//!
//! What this does not do yet: the queues are not replicated, so a node whose disk is lost
//! loses what it had queued (README "Cluster" says so).
//!
//! Also here, for the same reason (it needs the hub and the bus): the live view across the
//! cluster ([`live_view_across`]).

use std::time::Duration;

use base64::Engine;
use fleethub_router::queue::{KeySet, NewEntry, Queue};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::cluster::bus::RelayedEntry;
use crate::hub::SharedHub;
use crate::identity::{IdentityKey, ModuleId};

/// Entries moved per request.
const BATCH: usize = 256;
/// How often queues of modules not connected here are looked at (reads counters only).
const EVERY: Duration = Duration::from_millis(100);

/// Moves module-input entries to the nodes holding their modules, until `stop`.
pub async fn relay_inputs(hub: SharedHub, mut stop: watch::Receiver<bool>) {
    let Some(bus) = hub.cluster.bus() else {
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        for (sink, _) in Queue::sinks(&*hub.queues) {
            let Some(module) = module_of(&sink) else {
                continue;
            };
            let key = IdentityKey::module(hub.config.hub_id.clone(), module);
            if hub.live.contains_key(&key) {
                continue; // its connection here reads the queue itself
            }
            // Batch after batch while the module's node takes them.
            loop {
                let now = crate::c2d::now_ms();
                let peeked = match Queue::peek(&*hub.queues, &sink, &KeySet::default(), BATCH, now)
                {
                    Ok(p) => p,
                    Err(e) => {
                        warn!(sink, error = %e, "cannot read a module input queue to relay it");
                        break;
                    }
                };
                if peeked.entries.is_empty() {
                    break;
                }
                let batch: Vec<RelayedEntry> = peeked
                    .entries
                    .iter()
                    .map(|e| RelayedEntry {
                        sink: e.key.sink.clone(),
                        priority: e.key.priority,
                        ttl_ms: e.expires_ms.saturating_sub(now).max(1),
                        bag: e.bag.clone(),
                        body: base64::engine::general_purpose::STANDARD.encode(&e.body),
                    })
                    .collect();
                match bus.relay_inputs(&key, &batch).await {
                    Ok(true) => {
                        let n = peeked.entries.len();
                        Queue::remove(
                            &*hub.queues,
                            peeked.entries.into_iter().map(|e| e.key).collect(),
                        );
                        hub.metrics
                            .sink_messages
                            .with_label_values(&[&sink, "relayed"])
                            .inc_by(n as u64);
                        if n < BATCH {
                            break;
                        }
                    }
                    // Connected nowhere: it reads the queue when it connects here, or the
                    // next look finds its node.
                    Ok(false) => break,
                    Err(e) => {
                        debug!(sink, error = %e, "relaying module input entries failed; kept here");
                        break;
                    }
                }
            }
        }
    }
}

/// Stores entries relayed from another node for module `key` in this node's queues and
/// wakes its connection; `Ok` once committed.
pub async fn take_relayed(
    hub: &SharedHub,
    key: &IdentityKey,
    entries: Vec<RelayedEntry>,
) -> Result<(), String> {
    let Some(module) = &key.module else {
        return Err(format!("'{key}' is not a module"));
    };
    let prefix = format!("/modules/{module}/inputs/");
    let mut new = Vec::with_capacity(entries.len());
    for e in entries {
        if !e.sink.starts_with(&prefix) {
            return Err(format!("'{}' is not an input of '{key}'", e.sink));
        }
        let body = base64::engine::general_purpose::STANDARD
            .decode(&e.body)
            .map_err(|e| format!("a relayed body is not base64: {e}"))?;
        new.push(NewEntry {
            sink: e.sink,
            priority: e.priority,
            ttl_ms: e.ttl_ms,
            bag: e.bag,
            body: body.into(),
        });
    }
    Queue::append(&*hub.queues, new, crate::c2d::now_ms())
        .await
        .map_err(|e| e.to_string())?;
    if let Some(live) = hub.live.get(key) {
        live.mailbox.wake_inputs();
    }
    Ok(())
}

/// How often a node with watchers says so, and how long the others keep handing their
/// telemetry out after they last heard it.
const WATCHING_EVERY: Duration = Duration::from_millis(500);
const WATCHING_FOR: Duration = Duration::from_secs(3);

/// The live view across the cluster: while this node has watchers (`monitor-events`,
/// `$fleethub/events/+/#`) it says so on `fleethub.watching` and takes what the others hand
/// out on `fleethub.live.{node}` into its own view; while any other node has watchers, this
/// node hands its telemetry out there. Nothing is published while nobody watches anywhere.
/// Best effort, like the local view: the events endpoint and the routes keep everything.
pub async fn live_view_across(hub: SharedHub, mut stop: watch::Receiver<bool>) {
    use futures_util::StreamExt;
    let Some(bus) = hub.cluster.bus().cloned() else {
        return;
    };
    let nats = bus.nats().clone();
    let node = bus.node().to_string();
    // This node's subject, written once: each message handed out is published on it.
    let own_subject = async_nats::Subject::from(format!("fleethub.live.{node}"));
    let mut watching = match nats.subscribe("fleethub.watching").await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "the live view will not span the cluster");
            return;
        }
    };
    let (tx, mut outward) = tokio::sync::mpsc::unbounded_channel::<(bytes::Bytes, bytes::Bytes)>();
    let pending = hub.live_view.send_outward_to(tx);
    let mut incoming: Option<async_nats::Subscriber> = None;
    let mut heard_at: Option<tokio::time::Instant> = None;
    let mut said_at: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let here = hub.event_subscribers.load(std::sync::atomic::Ordering::Relaxed) > 0;
                if here {
                    if said_at.is_none_or(|t| t.elapsed() >= WATCHING_EVERY) {
                        let _ = nats.publish("fleethub.watching", node.clone().into()).await;
                        said_at = Some(tokio::time::Instant::now());
                    }
                    if incoming.is_none() {
                        incoming = nats.subscribe("fleethub.live.*").await.ok();
                    }
                } else {
                    incoming = None;
                    said_at = None;
                }
                hub.live_view
                    .set_watched_elsewhere(heard_at.is_some_and(|t| t.elapsed() < WATCHING_FOR));
            }
            Some(m) = watching.next() => {
                if m.payload.as_ref() != node.as_bytes() {
                    heard_at = Some(tokio::time::Instant::now());
                    hub.live_view.set_watched_elsewhere(true);
                }
            }
            Some((topic, payload)) = outward.recv() => {
                pending.fetch_sub(topic.len() + payload.len(), std::sync::atomic::Ordering::Relaxed);
                let mut body = Vec::with_capacity(2 + topic.len() + payload.len());
                body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
                body.extend_from_slice(&topic);
                body.extend_from_slice(&payload);
                let _ = nats.publish(own_subject.clone(), body.into()).await;
            }
            Some(m) = async { match incoming.as_mut() { Some(s) => s.next().await, None => std::future::pending().await } } => {
                if m.subject == own_subject {
                    continue;
                }
                let b = m.payload;
                if b.len() >= 2 {
                    let n = u16::from_be_bytes([b[0], b[1]]) as usize;
                    if b.len() >= 2 + n {
                        hub.live_view.offer(b.slice(2..2 + n), b.slice(2 + n..));
                    }
                }
            }
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

/// The module of a `/modules/{m}/inputs/{i}` queue.
fn module_of(sink: &str) -> Option<ModuleId> {
    let rest = sink.strip_prefix("/modules/")?;
    let (module, input) = rest.split_once("/inputs/")?;
    (!input.is_empty()).then_some(())?;
    ModuleId::new(module).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_module_input_queues_have_a_module() {
        assert_eq!(
            module_of("/modules/m-1/inputs/in1").map(|m| m.to_string()),
            Some("m-1".to_string())
        );
        for other in [
            "$upstream",
            "$events",
            "$endpoint/x",
            "/modules/m/inputs/",
            "/modules//inputs/i",
        ] {
            assert!(module_of(other).is_none(), "{other}");
        }
    }
}
