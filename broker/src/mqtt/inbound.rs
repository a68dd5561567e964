//! What a client sends: decoding a read batch, and one handler per kind of PUBLISH the topic
//! table classifies (telemetry routed and acknowledged after its commit, twin GET and reported
//! patch, method answer); everything else that may arrive in a read.

use super::*;

/// (QoS, packet id) of the PUBLISH at the start of `buf`, from its fixed header; `None` for
/// other packets or an incomplete header.
pub(super) fn peek_publish_ids(buf: &[u8]) -> Option<(u8, u16)> {
    let first = *buf.first()?;
    if first >> 4 != 3 {
        return None;
    }
    let qos = (first >> 1) & 0b11;
    let i = variable_header_at(buf)?;
    if qos == 0 {
        return Some((0, 0));
    }
    let topic_len = u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]) as usize;
    let at = i + 2 + topic_len;
    Some((qos, u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?])))
}

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
    /// Decodes and handles every complete packet in `rbuf`. Returns whether any was read.
    pub(super) async fn drain_input(
        &mut self,
        rbuf: &mut BytesMut,
        wbuf: &mut BytesMut,
    ) -> Result<bool, &'static str> {
        let max_payload = self.hub.config.limits.max_payload_bytes;
        let mut to_router: Vec<Packet> = Vec::new();
        let mut any = false;
        let result = loop {
            if rbuf.is_empty() {
                break Ok(());
            }
            // QoS 2 is not part of IoT Hub's MQTT; refuse it before decoding.
            if rbuf[0] >> 4 == 3 && (rbuf[0] >> 1) & 0b11 == 2 {
                self.protocol_error("qos2");
                break Err("QoS 2 publish");
            }
            // MQTT 3.1.1 §3.8.1, §3.10.1: SUBSCRIBE and UNSUBSCRIBE carry flags 0010; any
            // other value is malformed and closes the connection.
            if matches!(rbuf[0] >> 4, 8 | 10) && rbuf[0] & 0x0f != 0b0010 {
                self.protocol_error("malformed");
                break Err("bad SUBSCRIBE/UNSUBSCRIBE flags");
            }
            // QoS and packet id of a PUBLISH, read from its header: rumqttd keeps them private.
            self.current = peek_publish_ids(rbuf);
            let packet = match V4.read_mut(rbuf, max_payload + 64 * 1024) {
                Ok(p) => p,
                Err(CodecError::InsufficientBytes(_)) => break Ok(()),
                Err(CodecError::PayloadSizeLimitExceeded(_)) => {
                    self.protocol_error("payload_too_large");
                    break Err("payload too large");
                }
                Err(e) => {
                    debug!(error = %e, "malformed packet");
                    self.protocol_error("malformed");
                    break Err("malformed packet");
                }
            };
            any = true;
            if let Err(reason) = self.on_packet(packet, wbuf, &mut to_router) {
                break Err(reason);
            }
            // A subscription change is acknowledged only once the session holding it is
            // stored; later packets wait behind it so replies keep their order.
            if let Some(held) = self.held.take() {
                if let Err(e) = held.commit.await {
                    warn!(principal = ?self.principal, error = %e, "could not store the session");
                    break Err("session store failed");
                }
                wbuf.extend_from_slice(&held.out);
            }
        };
        if !to_router.is_empty() {
            // Boxed: the router hand-off is most of this future's size and only connections
            // that use the router (service clients, telemetry while someone watches) need it.
            Box::pin(self.send_to_router(to_router)).await?;
        }
        result.map(|()| any)
    }

    pub(super) fn protocol_error(&self, reason: &str) {
        self.hub
            .metrics
            .protocol_errors
            .with_label_values(&[reason])
            .inc();
    }

    pub(super) fn deny(&self, action: &str, topic: &str) {
        self.hub
            .metrics
            .authorization_denials
            .with_label_values(&[action])
            .inc();
        warn!(principal = ?self.principal, action, topic, "not authorized");
    }

    /// Hands a batch to the router with one wake-up.
    pub(super) async fn send_to_router(
        &mut self,
        mut packets: Vec<Packet>,
    ) -> Result<(), &'static str> {
        let Some(last) = packets.pop() else {
            return Ok(());
        };
        if self.link_tx.is_none() {
            let (tx, rx) = self
                .hub
                .core
                .link(format!("c{}", self.conn_id))
                .await
                .map_err(|e| {
                    warn!(error = %e, "router refused a link");
                    "router refused a link"
                })?;
            self.link_tx = Some(tx);
            self.new_link_rx = Some(Box::new(rx));
        }
        let Some(link) = self.link_tx.as_mut() else {
            return Err("router link closed");
        };
        {
            let mut buffer = link.buffer();
            buffer.extend(packets);
        }
        link.send(last)
            .await
            .map(|_| ())
            .map_err(|_| "router link closed")
    }

    pub(super) fn on_packet(
        &mut self,
        packet: Packet,
        wbuf: &mut BytesMut,
        to_router: &mut Vec<Packet>,
    ) -> Result<(), &'static str> {
        match packet {
            Packet::Publish(mut publish, _) => {
                let Ok(topic) = std::str::from_utf8(&publish.topic) else {
                    self.protocol_error("malformed");
                    return Err("topic not UTF-8");
                };
                // MQTT 3.1.1 §3.3.2.1: a topic name never holds wildcards.
                if topic.contains(['+', '#']) {
                    self.protocol_error("malformed");
                    return Err("wildcard in a PUBLISH topic");
                }
                let max = self.hub.config.limits.max_payload_bytes;
                if publish.payload.len() > max {
                    self.protocol_error("payload_too_large");
                    return Err("payload too large");
                }
                match topics::classify_publish(&self.principal, topic) {
                    Inbound::Telemetry { bag } => {
                        let Principal::Identity(key) = &self.principal else {
                            return Err("service connections cannot publish");
                        };
                        let mut message = match Message::from_bag(bag, publish.payload.clone()) {
                            Ok(m) => m,
                            Err(e) => {
                                warn!(principal = ?self.principal, error = %e, "bad property bag");
                                self.protocol_error("bad_property_bag");
                                return Err("bad property bag");
                            }
                        };
                        // Connection ids come from authentication, never from the client;
                        // only a gateway may forward another sender's ids.
                        let forwarded =
                            self.gateway && message.system.connection_device_id.is_some();
                        if !forwarded {
                            message.system.connection_device_id = Some(key.device.to_string());
                            message.system.connection_module_id =
                                key.module.as_ref().map(|m| m.to_string());
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
                        // The hub acknowledges telemetry itself, in order, once routed; the
                        // router only carries it to service subscribers (monitor-events), so
                        // the envelope and topic are built only while there are some.
                        self.ack_locally();
                        let subscribers = self
                            .hub
                            .event_subscribers
                            .load(std::sync::atomic::Ordering::Relaxed);
                        if subscribers > 0 {
                            if let Some(payload) = envelope::pack(&bag, &message.body) {
                                publish.topic = if forwarded {
                                    topics::telemetry_topic(&sender)
                                } else {
                                    self.telemetry_topic.clone()
                                }
                                .into();
                                publish.payload = payload;
                                publish.retain = false;
                                to_router.push(Packet::Publish(publish, None));
                            }
                        }
                    }
                    Inbound::TwinGet { query } => {
                        if let Principal::Identity(key) = &self.principal {
                            let twin = self.hub.twins.get(key);
                            let body = crate::twin::view::device_json(&twin).to_string();
                            self.hub
                                .twin_response(key, 200, query, None, body.as_bytes());
                            self.hub.metrics.twin_reads.with_label_values(&["ok"]).inc();
                        }
                        self.ack_locally();
                    }
                    Inbound::TwinReportedPatch { query } => {
                        if let Principal::Identity(key) = &self.principal {
                            self.reported_patch(key.clone(), query, &publish.payload);
                        }
                        self.ack_locally();
                    }
                    Inbound::MethodResponse { status, query } => {
                        if let Principal::Identity(key) = &self.principal {
                            let rid = crate::methods::query_param(query, "$rid").unwrap_or("");
                            let payload =
                                serde_json::from_slice(&publish.payload).unwrap_or_else(|_| {
                                    serde_json::Value::String(
                                        String::from_utf8_lossy(&publish.payload).into_owned(),
                                    )
                                });
                            let reply = crate::methods::MethodReply {
                                status: status.parse().unwrap_or(500),
                                payload,
                            };
                            if !self.hub.methods.complete(key, rid, reply) {
                                debug!(identity = %key, rid, "method reply for no waiting call");
                            }
                        }
                        self.ack_locally();
                    }
                    Inbound::Denied => {
                        self.deny("publish", topic);
                        return Err("publish not authorized");
                    }
                }
            }
            Packet::Subscribe(subscribe, _) => self.on_subscribe(subscribe, wbuf, to_router),
            Packet::Unsubscribe(unsubscribe, _) => {
                self.on_unsubscribe(unsubscribe, wbuf, to_router)
            }
            Packet::PubAck(ack, _) if ack.pkid >= QUEUE_PKID_BASE => {
                self.queue_acked(ack.pkid, wbuf)
            }
            Packet::PubAck(ack, _) => to_router.push(Packet::PubAck(ack, None)),
            Packet::PingReq(_) => {
                let _ = V4.write(Packet::PingResp(PingResp), wbuf);
            }
            Packet::Disconnect(..) => return Err("client disconnected"),
            Packet::Connect(..) => {
                self.protocol_error("second_connect");
                return Err("second CONNECT");
            }
            _ => {
                self.protocol_error("unexpected_packet");
                return Err("unexpected packet");
            }
        }
        Ok(())
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
                    let body = serde_json::json!({ "message": e.to_string() }).to_string();
                    hub.twin_response(&key, 500, &query, None, body.as_bytes());
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
