//! Subscriptions and persistent sessions: SUBSCRIBE / UNSUBSCRIBE (acknowledged once the
//! session holding them is stored), resuming a stored session at CONNECT, and what the
//! embedded router sends service connections.

use super::*;

/// A digest of a session's filter list, to tell whether it changed.
pub(super) fn filters_digest(filters: &[String]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    filters.hash(&mut h);
    h.finish()
}

/// A router subscription for an internal topic.
pub(super) fn router_filter(internal: &str, qos: QoS) -> Filter {
    Filter {
        path: internal.to_string(),
        qos,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: rumqttd::protocol::RetainForwardRule::OnEverySubscribe,
    }
}

impl Session {
    pub(super) fn on_subscribe(
        &mut self,
        subscribe: Subscribe,
        wbuf: &mut BytesMut,
        to_router: &mut Vec<Packet>,
    ) {
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut forward = Vec::new();
        let mut send_state = false;
        let mut group_qos = None;
        for f in &subscribe.filters {
            let granted = if f.qos == QoS::AtMostOnce {
                QoS::AtMostOnce
            } else {
                // IoT Hub has no QoS 2; grant at most 1.
                QoS::AtLeastOnce
            };
            match topics::map_filter(&self.principal, &f.path) {
                Some(mapped) if !self.group_allowed(&mapped) => {
                    warn!(filter = f.path, "subscribe refused: no such consumer group, or another one is read on this connection");
                    codes.push(Some(SubscribeReasonCode::Failure));
                }
                Some(mapped) => {
                    if let topics::Target::ConsumerGroup(_) = &mapped.target {
                        group_qos = Some(granted);
                    }
                    match mapped.router_filter() {
                        Some(path) => {
                            codes.push(None);
                            forward.push(router_filter(path, granted));
                        }
                        None => {
                            // An identity's own deliveries are written by the front end.
                            send_state |= mapped.delivers(Delivery::DesiredState);
                            codes.push(Some(SubscribeReasonCode::Success(granted)));
                        }
                    }
                    self.filters.retain(|m| m.client != mapped.client);
                    self.filters.push(mapped);
                }
                None => {
                    self.deny("subscribe", &f.path);
                    codes.push(Some(SubscribeReasonCode::Failure));
                }
            }
        }
        self.filters_changed();
        if let Some(q) = group_qos {
            self.set_group_qos(q);
        }
        let commit = self.store_session();
        let mut out = BytesMut::new();
        if forward.is_empty() {
            let return_codes = codes
                .into_iter()
                .map(|c| c.unwrap_or(SubscribeReasonCode::Failure))
                .collect();
            let ack = SubAck {
                pkid: subscribe.pkid,
                return_codes,
            };
            let _ = V4.write(Packet::SubAck(ack, None), &mut out);
            if send_state {
                // The desired document acts as a retained message: it follows the SUBACK.
                self.send_desired_state(&mut out);
            }
        } else {
            let subs = self.router_subs.get_or_insert_with(Default::default);
            subs.pending.retain(|(p, _)| *p != subscribe.pkid);
            subs.pending.push((subscribe.pkid, codes));
            let sub = Subscribe {
                pkid: subscribe.pkid,
                filters: forward,
            };
            to_router.push(Packet::Subscribe(sub, None));
        }
        self.hold_or_write(commit, out, wbuf);
    }

    /// What follows a change of this connection's filters: C2D / inputs delivery on or off,
    /// the API's view of whether methods can be taken, the telemetry subscriber count.
    pub(super) fn filters_changed(&mut self) {
        self.update_c2d_active();
        self.sync_group();
        if let Principal::Identity(_) = &self.principal {
            let listening = self
                .filters
                .iter()
                .any(|f| f.delivers(Delivery::MethodRequest));
            self.mailbox.methods.store(listening, Ordering::Relaxed);
        }
        // Only the live view needs telemetry in the router.
        if self.principal == Principal::Service
            && self.filters.iter().any(|f| f.router_filter().is_some())
            && !self.counted_subscriber
        {
            self.counted_subscriber = true;
            self.hub
                .event_subscribers
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A consumer group filter must name a group that exists, and a connection reads one
    /// group at a time.
    fn group_allowed(&self, mapped: &topics::MappedFilter) -> bool {
        let topics::Target::ConsumerGroup(group) = &mapped.target else {
            return true;
        };
        let other = self
            .filters
            .iter()
            .any(|f| matches!(&f.target, topics::Target::ConsumerGroup(g) if g != group));
        !other && self.hub.events.exists(group)
    }

    /// For a persistent session whose filters differ from the stored ones: the write that
    /// stores them (to be committed before the client's SUBACK / UNSUBACK).
    pub(super) fn store_session(&mut self) -> Option<HeldCommit> {
        if !self.persistent {
            return None;
        }
        let filters: Vec<String> = self.filters.iter().map(|f| f.client.clone()).collect();
        if self.stored_filters == Some(filters_digest(&filters)) {
            // A client subscribing again to what it has (rumqttc after a reconnect).
            return None;
        }
        self.stored_filters = Some(filters_digest(&filters));
        Some(Box::pin(self.hub.sessions.put(&self.session_key, filters)))
    }

    pub(super) fn hold_or_write(
        &mut self,
        commit: Option<HeldCommit>,
        out: BytesMut,
        wbuf: &mut BytesMut,
    ) {
        match commit {
            Some(commit) => self.held = Some(Box::new(HeldReply { commit, out })),
            None => wbuf.extend_from_slice(&out),
        }
    }

    /// The desired document on `$fleethub/twin/desired/` (fleethub's retained form).
    /// Nothing until something was set.
    pub(super) fn send_desired_state(&mut self, out: &mut BytesMut) {
        let Principal::Identity(key) = &self.principal else {
            return;
        };
        let twin = self.hub.twins.get(key);
        if twin.desired.untouched() {
            return;
        }
        self.on_direct(crate::hub::Direct::desired_state(&twin.desired), out);
    }

    /// Resumes a stored session (CONNACK session-present 1 is already written): its filters
    /// are in force again without a SUBSCRIBE; queued C2D and module inputs flow; a device
    /// listening for desired patches gets one that brings whatever copy it holds up to its
    /// twin (changes made while it was away, removals as `null`).
    pub(super) async fn resume(
        &mut self,
        filters: Vec<String>,
        wbuf: &mut BytesMut,
    ) -> Result<(), &'static str> {
        let mut forward = Vec::new();
        for client in &filters {
            let Some(mapped) = topics::map_filter(&self.principal, client) else {
                continue;
            };
            if let Some(path) = mapped.router_filter() {
                if !forward.iter().any(|f: &Filter| f.path == path) {
                    forward.push(router_filter(path, QoS::AtLeastOnce));
                }
            }
            self.filters.retain(|m| m.client != mapped.client);
            self.filters.push(mapped);
        }
        self.filters_changed();
        self.hub.metrics.sessions_resumed.inc();
        if let Principal::Identity(key) = &self.principal {
            let key = key.clone();
            if self
                .filters
                .iter()
                .any(|f| f.delivers(Delivery::DesiredPatch))
            {
                let twin = self.hub.twins.get(&key);
                if !twin.desired.untouched() {
                    let patch = twin.desired.resume_patch();
                    let d = crate::hub::Direct::desired_patch(&twin.desired, &patch);
                    self.on_direct(d, wbuf);
                }
            }
            if self
                .filters
                .iter()
                .any(|f| f.delivers(Delivery::DesiredState))
            {
                self.send_desired_state(wbuf);
            }
        }
        if !forward.is_empty() {
            // Packet ids the client cannot have in flight yet: it sent nothing so far.
            let pkid = 1;
            self.router_subs
                .get_or_insert_with(Default::default)
                .restoring
                .push(pkid);
            let sub = Subscribe {
                pkid,
                filters: forward,
            };
            self.send_to_router(vec![Packet::Subscribe(sub, None)])
                .await?;
        }
        Ok(())
    }

    pub(super) fn on_unsubscribe(
        &mut self,
        unsubscribe: Unsubscribe,
        wbuf: &mut BytesMut,
        to_router: &mut Vec<Packet>,
    ) {
        let mut internal = Vec::new();
        for f in &unsubscribe.filters {
            if let Some(mapped) = topics::map_filter(&self.principal, f) {
                self.filters.retain(|m| m.client != mapped.client);
                // Leave the router filter while another client filter still needs it.
                if let Some(path) = mapped.router_filter() {
                    if !self.filters.iter().any(|m| m.router_filter() == Some(path)) {
                        internal.push(path.to_string());
                    }
                }
            }
        }
        self.filters_changed();
        let commit = self.store_session();
        let mut out = BytesMut::new();
        if internal.is_empty() {
            let ack = UnsubAck {
                pkid: unsubscribe.pkid,
                reasons: vec![],
            };
            let _ = V4.write(Packet::UnsubAck(ack, None), &mut out);
        } else {
            let unsub = Unsubscribe {
                pkid: unsubscribe.pkid,
                filters: internal,
            };
            to_router.push(Packet::Unsubscribe(unsub, None));
        }
        self.hold_or_write(commit, out, wbuf);
    }

    pub(super) async fn on_notification(
        &mut self,
        n: Notification,
        wbuf: &mut BytesMut,
    ) -> Option<Outcome> {
        use rumqttd::protocol::Packet as P;
        match n {
            Notification::Forward(forward) => {
                let mut publish = forward.publish;
                let delivered = std::str::from_utf8(&publish.topic)
                    .ok()
                    .zip(envelope::unpack(&publish.payload))
                    .and_then(|(topic, (suffix, body))| {
                        topics::service_client_topic(topic, suffix).map(|t| (t, body))
                    })
                    .filter(|(t, _)| {
                        self.filters
                            .iter()
                            .any(|f| topics::filter_matches(&f.client, t))
                    });
                match delivered {
                    Some((topic, body)) => {
                        publish.topic = topic.into();
                        publish.payload = body;
                        let _ = V4.write(P::Publish(publish, None), wbuf);
                    }
                    None => {
                        // Not for this client's filters: settle it with the router so its
                        // inflight window does not stall.
                        let (qos, pkid) = publish_ids(&publish);
                        if qos == 1 {
                            let ack = PubAck {
                                pkid,
                                reason: PubAckReason::Success,
                            };
                            if let Some(tx) = &mut self.link_tx {
                                let _ = tx.send(P::PubAck(ack, None)).await;
                            }
                        }
                    }
                }
                None
            }
            Notification::DeviceAck(ack) => {
                let packet: P = ack.into();
                match packet {
                    P::SubAck(suback, _)
                        if self
                            .router_subs
                            .as_ref()
                            .is_some_and(|r| r.restoring.contains(&suback.pkid)) =>
                    {
                        if let Some(r) = self.router_subs.as_mut() {
                            r.restoring.retain(|p| *p != suback.pkid);
                        }
                    }
                    P::SubAck(suback, _) => {
                        let pending = self.router_subs.as_mut().and_then(|r| {
                            r.pending
                                .iter()
                                .position(|(p, _)| *p == suback.pkid)
                                .map(|i| r.pending.swap_remove(i).1)
                        });
                        let return_codes = match pending {
                            Some(codes) => {
                                let mut router = suback.return_codes.into_iter();
                                codes
                                    .into_iter()
                                    .map(|c| {
                                        c.or_else(|| router.next())
                                            .unwrap_or(SubscribeReasonCode::Failure)
                                    })
                                    .collect()
                            }
                            None => suback.return_codes,
                        };
                        let ack = SubAck {
                            pkid: suback.pkid,
                            return_codes,
                        };
                        let _ = V4.write(P::SubAck(ack, None), wbuf);
                    }
                    // Telemetry was acknowledged by the front end already.
                    P::PingResp(_) | P::ConnAck(..) | P::PubAck(..) => {}
                    other => {
                        let _ = V4.write(other, wbuf);
                    }
                }
                None
            }
            Notification::Unschedule => Some(Outcome::Unscheduled),
            Notification::Disconnect(..) => Some(Outcome::Close),
            _ => None,
        }
    }
}
