//! A client's PUBLISH: checked, classified by the topic table ([`topics::classify_publish`]
//! parses it into an [`Inbound`]), then applied by one handler per variant: telemetry
//! (routed, acknowledged after its commit), twin GET, reported patch, method answer.

use super::*;
use rumqttd::protocol::Publish;

/// The original sender named in a gateway-forwarded message's `$.cdid` / `$.cmid`.
pub(super) fn forwarded_sender(message: &Message) -> Option<IdentityKey> {
    let device =
        crate::identity::DeviceId::new(message.system.connection_device_id.as_deref()?).ok()?;
    match message.system.connection_module_id.as_deref() {
        Some(m) => Some(IdentityKey::module(
            device,
            crate::identity::ModuleId::new(m).ok()?,
        )),
        None => Some(IdentityKey::device(device)),
    }
}

impl Session {
    pub(super) fn on_publish(&mut self, publish: Publish) -> Result<(), &'static str> {
        // A cheap clone (reference-counted) so the parsed topic can borrow it while the
        // publish itself moves on.
        let topic_bytes = publish.topic.clone();
        let Ok(topic) = std::str::from_utf8(&topic_bytes) else {
            self.protocol_error("malformed");
            return Err("topic not UTF-8");
        };
        // MQTT 3.1.1 §3.3.2.1: a topic name never holds wildcards.
        if topic.contains(['+', '#']) {
            self.protocol_error("malformed");
            return Err("wildcard in a PUBLISH topic");
        }
        if publish.payload.len() > self.hub.limits.max_payload_bytes() {
            self.protocol_error("payload_too_large");
            return Err("payload too large");
        }
        let Principal::Identity(key) = &self.principal else {
            self.deny("publish", topic);
            return Err("service connections cannot publish");
        };
        let key = key.clone();
        match topics::classify_publish(&self.principal, topic) {
            Inbound::Telemetry { bag } => self.on_telemetry(&key, bag, publish)?,
            Inbound::TwinGet { query } => self.on_twin_get(&key, query),
            Inbound::TwinReportedPatch { query } => {
                self.reported_patch(key, query, &publish.payload)
            }
            Inbound::MethodResponse { status, query } => {
                self.on_method_response(&key, status, query, &publish.payload)
            }
            Inbound::Denied => {
                self.deny("publish", topic);
                return Err("publish not authorized");
            }
        }
        self.ack_locally();
        Ok(())
    }

    /// Telemetry: stamped with the sender's ids, routed into the sinks' queues (the PUBACK
    /// waits for their commit) and, while a service connection watches, shown on the live
    /// view (through the router, by [`crate::live_view`]).
    fn on_telemetry(
        &mut self,
        key: &IdentityKey,
        bag: &str,
        publish: Publish,
    ) -> Result<(), &'static str> {
        let mut message = match Message::from_bag(bag, publish.payload.clone()) {
            Ok(m) => m,
            Err(e) => {
                warn!(principal = ?self.principal, error = %e, "bad property bag");
                self.protocol_error("bad_property_bag");
                return Err("bad property bag");
            }
        };
        // Connection ids come from authentication, never from the client; only a gateway may
        // forward another sender's ids.
        let forwarded = self.gateway && message.system.connection_device_id.is_some();
        if !forwarded {
            message.system.connection_device_id = Some(key.device.to_string());
            message.system.connection_module_id = key.module.as_ref().map(|m| m.to_string());
        }
        message.system.enqueued_time = Some(crate::registry::now_rfc3339());
        let sender = if forwarded {
            forwarded_sender(&message).unwrap_or_else(|| key.clone())
        } else {
            key.clone()
        };
        let bag = message.to_bag();
        // The bag must fit the envelope that carries it to service subscribers.
        if bag.len() > envelope::MAX_SUFFIX {
            self.protocol_error("bad_property_bag");
            return Err("property bag too long");
        }
        let origin = self
            .hub
            .origin(&sender, message.system.output_name.as_deref());
        self.hub
            .dispatch(&message, Some(&bag), &origin, false, &mut self.queued);
        self.hub.metrics.telemetry_messages.inc();
        self.hub
            .metrics
            .telemetry_bytes
            .inc_by(message.body.len() as u64);
        self.hub.registry.touch(key);
        // The router only carries telemetry to service subscribers (monitor-events), so the
        // envelope and topic are built only while there are some.
        let subscribers = self
            .hub
            .event_subscribers
            .load(std::sync::atomic::Ordering::Relaxed);
        let elsewhere = self.hub.live_view.watched_elsewhere();
        if subscribers > 0 || elsewhere {
            if let Some(payload) = envelope::pack(&bag, &message.body) {
                let topic: bytes::Bytes = if forwarded {
                    topics::telemetry_topic(&sender)
                } else {
                    self.telemetry_topic.clone()
                }
                .into();
                if elsewhere {
                    self.hub.live_view.outward(topic.clone(), payload.clone());
                }
                if subscribers > 0 {
                    self.hub.live_view.offer(topic, payload);
                }
            }
        }
        Ok(())
    }

    /// `$iothub/twin/GET/`: the whole twin, answered on `$iothub/twin/res/200/`.
    fn on_twin_get(&self, key: &IdentityKey, query: &str) {
        let twin = self.hub.twins.get(key);
        let body = crate::twin::view::device_json(&twin).to_string();
        self.hub
            .twin_response(key, 200, query, None, body.as_bytes());
        self.hub.metrics.twin_reads.with_label_values(&["ok"]).inc();
    }

    /// `$iothub/methods/res/{status}/`: completes the call waiting for it.
    fn on_method_response(&self, key: &IdentityKey, status: &str, query: &str, payload: &[u8]) {
        let rid = crate::methods::query_param(query, "$rid").unwrap_or("");
        let payload = serde_json::from_slice(payload).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(payload).into_owned())
        });
        let reply = crate::methods::MethodReply {
            status: status.parse().unwrap_or(500),
            payload,
        };
        if !self.hub.methods.complete(key, rid, reply) {
            debug!(identity = %key, rid, "method reply for no waiting call");
        }
    }

    /// Validates a reported patch and queues it; the answer (204 with the new version, or 400
    /// with the reason) is published once the patch is committed.
    pub(super) fn reported_patch(&self, key: IdentityKey, query: &str, body: &[u8]) {
        use crate::hub::TwinWrite;
        use crate::twin::doc;
        let parsed = serde_json::from_slice::<serde_json::Value>(body)
            .map_err(|e| doc::PatchError::NotJson(e.to_string()))
            .and_then(|v| doc::validate("properties.reported", v));
        let patch = match parsed {
            Ok(p) => p,
            Err(e) => {
                let body = serde_json::json!({ "message": e.to_string() }).to_string();
                self.hub
                    .twin_response(&key, 400, query, None, body.as_bytes());
                self.hub
                    .metrics
                    .twin_patches
                    .with_label_values(&["reported", "bad_request"])
                    .inc();
                return;
            }
        };
        let committed = self.hub.write_twin(key.clone(), TwinWrite::Reported(patch));
        let (hub, query) = (self.hub.clone(), query.to_string());
        tokio::spawn(async move {
            match committed.await {
                Ok(applied) => {
                    hub.twin_response(&key, 204, &query, Some(applied.twin.reported.version), b"");
                }
                Err(e) => {
                    // 503 for a full disk (the device may try again later), 500 otherwise.
                    let message = e.to_string();
                    let status = if crate::storage::is_disk_full(&message) {
                        503
                    } else {
                        500
                    };
                    let body = serde_json::json!({ "message": message }).to_string();
                    hub.twin_response(&key, status, &query, None, body.as_bytes());
                }
            }
        });
    }

    /// PUBACK a QoS 1 publish the hub handled itself. Acknowledgements wait until the end of
    /// the read batch, after its routed messages are committed to their queues, and go out
    /// in the order the publishes came in.
    pub(super) fn ack_locally(&mut self) {
        if let Some((1, pkid)) = self.current {
            self.deferred_acks.push(pkid);
        }
    }
}
