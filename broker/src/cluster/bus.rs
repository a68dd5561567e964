//! Messages between nodes on NATS: what is addressed to one identity reaches the node that
//! holds its connection.
//!
//! A node subscribes to `fleethub.identity.{id}.*` for each identity connected to it, and
//! drops the subscription when the connection ends, so "who holds this device" is NATS's own
//! interest graph: no directory to keep in step. A method call made on another node is a NATS
//! request to `….method`; with no node holding the identity NATS answers "no responders" at
//! once, which is exactly IoT Hub's "device not online". A connection accepted on one node
//! publishes `….takeover` before it subscribes, and the node holding the previous connection
//! with that id closes it, as IoT Hub does within one hub. C2D messages are stored in the
//! queue the nodes share by whichever node the API call reached; it then publishes
//! `….c2d` (no answer awaited) and the node holding the device's connection delivers from
//! the shared queue. (`{id}` is the identity's `device[/module]` in hex: device ids may hold
//! `.`, `*` and `>`.)

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::identity::IdentityKey;

/// A direct method call carried to the node that holds the connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MethodRequest {
    pub method_name: String,
    pub payload: serde_json::Value,
    pub timeout_secs: u64,
}

/// What came of it, as the holding node saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MethodOutcome {
    /// The device answered.
    Answered {
        status: i64,
        payload: serde_json::Value,
    },
    /// Not connected there, or not subscribed to method requests (404103).
    Offline(String),
    /// No answer within the call's timeout (504101).
    Timeout(String),
}

/// A routed message for a module input, moved from the node whose routes queued it to the
/// node holding the module's connection (see `cluster::relay`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayedEntry {
    /// `/modules/{m}/inputs/{i}`.
    pub sink: String,
    pub priority: u8,
    /// What is left of its time to live, in ms: it expires when it would have.
    pub ttl_ms: u64,
    pub bag: String,
    /// The body, base64.
    pub body: String,
}

/// Stores relayed entries for a module connected here; `Ok` once committed.
pub type TakeRelayed =
    dyn Fn(IdentityKey, Vec<RelayedEntry>) -> BoxFuture<'static, Result<(), String>> + Send + Sync;

/// What the server does with what arrives for a local connection.
pub struct Handlers {
    /// Routed messages for this module's inputs, from another node's queues: stored in this
    /// node's queues (`Ok` only once committed) and delivered from there.
    pub inputs: Arc<TakeRelayed>,
    /// A C2D message for this device was stored in the shared queue: deliver it.
    pub c2d: Arc<dyn Fn(IdentityKey) + Send + Sync>,
    pub method:
        Arc<dyn Fn(IdentityKey, MethodRequest) -> BoxFuture<'static, MethodOutcome> + Send + Sync>,
    /// Another node accepted a connection with this id: close the one here.
    pub takeover: Arc<dyn Fn(IdentityKey, u64) + Send + Sync>,
}

/// This node's connection to NATS.
pub struct Bus {
    client: async_nats::Client,
    node: String,
    handlers: OnceLock<Handlers>,
    /// The serving task of each local connection, by connection id.
    serving: DashMap<u64, tokio::task::AbortHandle>,
}

/// Why [`Bus::ask`] got no answer.
enum Asked {
    /// No node holds the identity's connection.
    Nobody,
    TimedOut,
    Failed(String),
}

/// NATS could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("cluster NATS ({url}): {message}")]
pub struct BusError {
    url: String,
    message: String,
}

/// How long "no responders" waits before it is asked again (see [`Bus::call_method`]).
const NO_RESPONDERS_AGAIN: Duration = Duration::from_millis(150);

fn subject(key: &IdentityKey, what: &str) -> String {
    let id: String = key
        .to_string()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("fleethub.identity.{id}.{what}")
}

impl Bus {
    /// Connects to NATS (`nats://a:4222,nats://b:4222`: any server of its cluster will do;
    /// the client moves to another when one goes away).
    pub async fn connect(urls: &str, node: &str) -> Result<Bus, BusError> {
        let err = |message: String| BusError {
            url: urls.to_string(),
            message,
        };
        let servers: Vec<async_nats::ServerAddr> = urls
            .split(',')
            .map(|u| u.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<_, _>>()
            .map_err(|e| err(e.to_string()))?;
        let client = async_nats::ConnectOptions::new()
            .name(format!("fleethub:{node}"))
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .connect(servers)
            .await
            .map_err(|e| err(e.to_string()))?;
        // The first connection is made in the background with retry_on_initial_connect;
        // a node must not start deaf, so wait for it (bounded).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() > deadline {
                return Err(err("no server answered within 10 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Bus {
            client,
            node: node.to_string(),
            handlers: OnceLock::new(),
            serving: DashMap::new(),
        })
    }

    /// Installs what local connections answer with (once, at start).
    pub fn serve_with(&self, handlers: Handlers) {
        let _ = self.handlers.set(handlers);
    }

    /// A connection for `key` was accepted here: the previous one on any other node closes,
    /// and what is addressed to `key` comes here while this connection lasts.
    pub async fn attach(self: &Arc<Self>, key: &IdentityKey, conn_id: u64) {
        if let Err(e) = self
            .client
            .publish(subject(key, "takeover"), self.node.clone().into())
            .await
        {
            warn!(identity = %key, error = %e, "could not tell other nodes of a new connection");
        }
        let mut messages = match self.client.subscribe(subject(key, "*")).await {
            Ok(s) => s,
            Err(e) => {
                warn!(identity = %key, error = %e, "cannot take messages for a connection from other nodes");
                return;
            }
        };
        let (bus, key) = (self.clone(), key.clone());
        let serving = tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                let Some(handlers) = bus.handlers.get() else {
                    continue;
                };
                if message.subject.ends_with(".takeover") {
                    if message.payload.as_ref() != bus.node.as_bytes() {
                        debug!(identity = %key, "taken over on another node");
                        (handlers.takeover)(key.clone(), conn_id);
                    }
                    continue;
                }
                if message.subject.ends_with(".c2d") {
                    (handlers.c2d)(key.clone());
                    continue;
                }
                let Some(reply) = message.reply.clone() else {
                    continue;
                };
                let body = if message.subject.ends_with(".inputs") {
                    let stored = match serde_json::from_slice::<Vec<RelayedEntry>>(&message.payload)
                    {
                        Ok(entries) => (handlers.inputs)(key.clone(), entries).await,
                        Err(e) => Err(format!("unreadable relayed entries: {e}")),
                    };
                    serde_json::to_vec(&stored)
                } else if message.subject.ends_with(".method") {
                    let outcome = match serde_json::from_slice::<MethodRequest>(&message.payload) {
                        Ok(request) => (handlers.method)(key.clone(), request).await,
                        Err(e) => MethodOutcome::Offline(format!("unreadable method request: {e}")),
                    };
                    serde_json::to_vec(&outcome)
                } else {
                    continue;
                };
                if let Err(e) = bus
                    .client
                    .publish(reply, body.unwrap_or_default().into())
                    .await
                {
                    warn!(identity = %key, subject = %message.subject, error = %e, "could not answer another node");
                }
            }
        });
        self.serving.insert(conn_id, serving.abort_handle());
    }

    /// The connection ended: its messages stop coming here.
    pub fn detach(&self, conn_id: u64) {
        if let Some((_, serving)) = self.serving.remove(&conn_id) {
            serving.abort();
        }
    }

    /// Asks the node holding `key`'s connection (`what`: `method`, `inputs`) and reads its
    /// answer. A connection made a moment ago may not be known to every NATS server yet
    /// (interest crosses the NATS cluster's routes asynchronously), so with `twice` "no
    /// responders" is asked once more after a short wait before it counts as no node holding
    /// `key`: for answers a caller sees (a method's 404). A caller that asks again anyway
    /// (the relay, every look) takes the first "no responders".
    async fn ask<T: serde::de::DeserializeOwned>(
        &self,
        key: &IdentityKey,
        what: &str,
        request: &impl Serialize,
        within: Duration,
        twice: bool,
    ) -> Result<T, Asked> {
        let body: bytes::Bytes = serde_json::to_vec(request)
            .map_err(|e| Asked::Failed(e.to_string()))?
            .into();
        let mut asked_twice = !twice;
        loop {
            let asked = self.client.send_request(
                subject(key, what),
                async_nats::Request::new()
                    .payload(body.clone())
                    .timeout(Some(within)),
            );
            return match asked.await {
                Ok(reply) => serde_json::from_slice(&reply.payload).map_err(|e| {
                    Asked::Failed(format!("unreadable answer from another node: {e}"))
                }),
                Err(e) => match e.kind() {
                    async_nats::RequestErrorKind::NoResponders if !asked_twice => {
                        asked_twice = true;
                        tokio::time::sleep(NO_RESPONDERS_AGAIN).await;
                        continue;
                    }
                    async_nats::RequestErrorKind::NoResponders => Err(Asked::Nobody),
                    async_nats::RequestErrorKind::TimedOut => Err(Asked::TimedOut),
                    _ => Err(Asked::Failed(format!("cluster NATS: {e}"))),
                },
            };
        }
    }

    /// Calls a method on `key` wherever it is connected; `Offline` when no node holds it.
    pub async fn call_method(&self, key: &IdentityKey, request: &MethodRequest) -> MethodOutcome {
        // The holder times the call itself; this only covers a node dying mid-call.
        let within = Duration::from_secs(request.timeout_secs + 5);
        match self.ask(key, "method", request, within, true).await {
            Ok(outcome) => outcome,
            Err(Asked::Nobody) => {
                MethodOutcome::Offline(format!("'{key}' is not connected to any node"))
            }
            Err(Asked::TimedOut) => MethodOutcome::Timeout(format!(
                "no answer from the node holding '{key}' within {within:?}"
            )),
            Err(Asked::Failed(why)) => MethodOutcome::Offline(why),
        }
    }

    /// Hands routed entries for module `key`'s inputs to the node holding its connection:
    /// `Ok(true)` once that node has committed them, `Ok(false)` when no node holds it.
    pub async fn relay_inputs(
        &self,
        key: &IdentityKey,
        entries: &[RelayedEntry],
    ) -> Result<bool, String> {
        match self
            .ask::<Result<(), String>>(key, "inputs", &entries, Duration::from_secs(10), false)
            .await
        {
            Ok(Ok(())) => Ok(true),
            Ok(Err(why)) => Err(why),
            Err(Asked::Nobody) => Ok(false),
            Err(Asked::TimedOut) => Err("no answer from the module's node".into()),
            Err(Asked::Failed(why)) => Err(why),
        }
    }

    /// Tells the node holding `key`'s connection (if any) that a C2D message for it was
    /// stored in the shared queue. Nothing is awaited: the message is already safe, and a
    /// connection also reads the queue whenever it (re)subscribes and after each delivery.
    pub async fn wake_c2d(&self, key: &IdentityKey) {
        if let Err(e) = self
            .client
            .publish(subject(key, "c2d"), bytes::Bytes::new())
            .await
        {
            warn!(identity = %key, error = %e, "could not tell the device's node of a C2D message");
        }
    }

    /// The NATS client, for the subjects other parts of the cluster use directly.
    pub fn nats(&self) -> &async_nats::Client {
        &self.client
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether the NATS connection is up now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_hold_any_identity_as_one_token() {
        let key = IdentityKey::parse("a.b_c:d/m-1").unwrap();
        let s = subject(&key, "method");
        let token = s
            .strip_prefix("fleethub.identity.")
            .and_then(|r| r.strip_suffix(".method"))
            .unwrap();
        assert!(token.chars().all(|c| c.is_ascii_hexdigit()), "{s}");
        assert_ne!(
            s,
            subject(&IdentityKey::parse("a.b_c:d").unwrap(), "method")
        );
    }
}
