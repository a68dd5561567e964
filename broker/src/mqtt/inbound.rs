//! What a client sends: decoding a read batch and handing each packet to its handler (a
//! PUBLISH to [`super::publish`], subscriptions to [`super::subscriptions`], acknowledgements
//! of deliveries to [`super::delivery`]).

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

impl Session {
    /// Decodes and handles every complete packet in `rbuf`. Returns whether any was read.
    pub(super) async fn drain_input(
        &mut self,
        rbuf: &mut BytesMut,
        wbuf: &mut BytesMut,
    ) -> Result<bool, &'static str> {
        let max_payload = self.hub.limits.max_payload_bytes();
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
                    let message = e.to_string();
                    if !crate::storage::is_disk_full(&message) {
                        warn!(principal = ?self.principal, error = %message, "could not store the session");
                        break Err("session store failed");
                    }
                    // A full disk degrades: the subscription holds on this connection and
                    // is stored with the next change once there is room.
                    warn!(principal = ?self.principal, error = %message, "subscription not stored in the session: the disk is full");
                    self.stored_filters = None;
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
            Packet::Publish(publish, _) => self.on_publish(publish)?,
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
}
