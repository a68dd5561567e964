//! What the hub delivers to one identity from its durable queues (C2D for a device, routed
//! messages for a module's inputs) within an inflight window, and the direct messages of its
//! mailbox, written only if one of its filters asks for them.

use super::*;

impl Session {
    /// Sends queued C2D messages while the window has room.
    pub(super) fn c2d_fill(&mut self, wbuf: &mut BytesMut) {
        let Principal::Identity(key) = &self.principal else {
            return;
        };
        if key.module.is_some() || !self.c2d.active {
            return;
        }
        let room = C2D_WINDOW.saturating_sub(self.c2d.inflight.len());
        if room == 0 {
            return;
        }
        let device = key.device.as_str();
        match self.hub.c2d.pending(device, self.c2d.last_seq, room) {
            Ok((messages, expired)) => {
                self.hub
                    .metrics
                    .c2d_messages
                    .with_label_values(&["expired"])
                    .inc_by(expired);
                for m in messages {
                    let topic = format!("devices/{device}/messages/devicebound/{}", m.bag(device));
                    let pkid = self.queue_pkids.next();
                    let p = publish_with(&topic, &m.body_bytes(), QoS::AtLeastOnce, pkid, false);
                    let _ = V4.write(Packet::Publish(p, None), wbuf);
                    self.c2d.inflight.push_back((pkid, m.seq));
                    self.c2d.last_seq = m.seq;
                }
            }
            Err(e) => warn!(identity = %key, error = %e, "cannot read the C2D queue"),
        }
    }

    /// The client acknowledged something delivered from a durable queue: a module input
    /// (it leaves its queue with the rest of the read batch, in `inputs_acked_flush`) or a
    /// C2D message (it leaves the C2D queue now).
    pub(super) fn queue_acked(&mut self, pkid: u16, wbuf: &mut BytesMut) {
        if self.event_acked(pkid) {
            return;
        }
        if let Some(inputs) = self.inputs.as_mut() {
            if inputs.acked(pkid) {
                return;
            }
        }
        let Some(pos) = self.c2d.inflight.iter().position(|(p, _)| *p == pkid) else {
            return;
        };
        let Some((_, seq)) = self.c2d.inflight.remove(pos) else {
            return;
        };
        if let Principal::Identity(key) = &self.principal {
            let (hub, device) = (self.hub.clone(), key.device.to_string());
            tokio::task::spawn_blocking(move || {
                if let Err(e) = hub.c2d.remove_many(&device, &[seq]) {
                    warn!(device, error = %e, "cannot remove a delivered C2D message");
                }
            });
            self.hub
                .metrics
                .c2d_messages
                .with_label_values(&["delivered"])
                .inc();
        }
        self.c2d_fill(wbuf);
    }

    /// The routed messages acknowledged in this read batch leave their queues (one call),
    /// are counted (one metric update per sink) and the window is refilled once.
    pub(super) fn inputs_acked_flush(&mut self, wbuf: &mut BytesMut) {
        self.events_acked_flush(wbuf);
        let Some(inputs) = self.inputs.as_mut() else {
            return;
        };
        if inputs.reader.flush(&*self.hub.queues, &self.hub.metrics) > 0 {
            self.inputs_fill(wbuf);
        }
    }

    /// Delivers routed messages from this module's input queues (`/modules/{m}/inputs/*`),
    /// highest priority first, while the window has room.
    pub(super) fn inputs_fill(&mut self, wbuf: &mut BytesMut) {
        let Principal::Identity(key) = &self.principal else {
            return;
        };
        let Some(module) = &key.module else {
            return;
        };
        if !self.c2d.active {
            return;
        }
        let inputs = self.inputs.get_or_insert_with(|| {
            Box::new(crate::sinks::module_input::InputDelivery::new(
                module.clone(),
            ))
        });
        let now = crate::c2d::now_ms();
        for (queue, input) in inputs.queues(&self.hub.queues) {
            if inputs.reader.room() == 0 {
                break;
            }
            let entries = match inputs.reader.read(&*self.hub.queues, &queue, now) {
                Ok(entries) => entries,
                Err(e) => {
                    warn!(sink = queue, error = %e, "cannot read a module input queue");
                    continue;
                }
            };
            for entry in entries {
                let pkid = self.queue_pkids.next();
                let topic = [
                    "devices/",
                    key.device.as_str(),
                    "/modules/",
                    module.as_str(),
                    "/inputs/",
                    &input,
                    "/",
                    &entry.bag,
                ];
                crate::core::write_publish_qos1(wbuf, &topic, &entry.body, pkid);
                inputs.sent(pkid, entry.key);
            }
        }
    }

    /// A message for this identity alone: written if one of its filters asks for it.
    pub(super) fn on_direct(&mut self, d: crate::hub::Direct, wbuf: &mut BytesMut) {
        let Principal::Identity(key) = &self.principal else {
            return;
        };
        let topic = format!("{}{}", topics::client_prefix(key, d.delivery), d.suffix);
        if !self
            .filters
            .iter()
            .any(|f| topics::filter_matches(&f.client, &topic))
        {
            return;
        }
        let retain = d.delivery == Delivery::DesiredState;
        let publish =
            rumqttd::protocol::Publish::new(bytes::Bytes::from(topic.into_bytes()), d.body, retain);
        let _ = V4.write(Packet::Publish(publish, None), wbuf);
    }

    /// C2D flows while a device has a filter on its devicebound topic.
    pub(super) fn update_c2d_active(&mut self) {
        let Principal::Identity(key) = &self.principal else {
            return;
        };
        if key.module.is_some() && key.device != self.hub.config.hub_id {
            return;
        }
        let active = self.filters.iter().any(|f| f.delivers(Delivery::Own));
        if active && !self.c2d.active {
            if key.module.is_some() {
                self.mailbox.wake_inputs();
            } else {
                self.mailbox.wake_c2d();
            }
        }
        self.c2d.active = active;
    }
}
