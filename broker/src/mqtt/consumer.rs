//! A service connection reading the events endpoint through a consumer group
//! ([`crate::events`]): it joins the group when a filter names one, is handed entries no
//! other reader of the group holds, within a window, and its PUBACKs are the group's
//! checkpoints. Leaving (unsubscribe, disconnect) hands what it held to the others.

use std::collections::HashMap;

use super::*;

/// Events in flight on one connection.
pub(super) struct GroupReader {
    group: String,
    /// QoS 0 readers acknowledge by receiving.
    qos: QoS,
    by_pkid: HashMap<u16, u64>,
    /// Acknowledged in this read batch, checkpointed with it.
    acked: Vec<u64>,
}

impl Session {
    /// Joins or leaves a consumer group to match the filters in force.
    pub(super) fn sync_group(&mut self) {
        if self.principal != Principal::Service {
            return;
        }
        let wanted = self.filters.iter().find_map(|f| match &f.target {
            topics::Target::ConsumerGroup(g) => Some(g.clone()),
            _ => None,
        });
        if wanted.as_deref() == self.events.as_ref().map(|r| r.group.as_str()) {
            return;
        }
        if self.events.take().is_some() {
            self.hub.events.leave(self.conn_id);
        }
        let Some(group) = wanted else {
            return;
        };
        if self
            .hub
            .events
            .join(self.conn_id, &group, Some(self.mailbox.clone()))
            .is_ok()
        {
            self.events = Some(Box::new(GroupReader {
                group,
                qos: QoS::AtLeastOnce,
                by_pkid: HashMap::new(),
                acked: Vec::new(),
            }));
            self.mailbox.wake_inputs();
        }
    }

    /// The QoS the group's filter was granted (QoS 0: no acknowledgements are awaited).
    pub(super) fn set_group_qos(&mut self, qos: QoS) {
        if let Some(r) = self.events.as_mut() {
            r.qos = qos;
        }
    }

    /// Hands out events while the window has room.
    pub(super) fn events_fill(&mut self, wbuf: &mut BytesMut) {
        let Some(r) = self.events.as_mut() else {
            return;
        };
        let room = crate::events::CONSUMER_WINDOW.saturating_sub(r.by_pkid.len());
        let entries = match self.hub.events.take(self.conn_id, room) {
            Ok(entries) => entries,
            Err(e) => {
                warn!(group = r.group, error = %e, "cannot read the events endpoint");
                return;
            }
        };
        if entries.is_empty() {
            return;
        }
        self.hub
            .metrics
            .events_delivered
            .with_label_values(&[&r.group])
            .inc_by(entries.len() as u64);
        let mut done = Vec::new();
        for e in entries {
            let topic = event_topic(&e.bag);
            if r.qos == QoS::AtMostOnce {
                let p = publish_with(&topic, &e.body, QoS::AtMostOnce, 0, false);
                let _ = V4.write(Packet::Publish(p, None), wbuf);
                done.push(e.key.seq);
            } else {
                let pkid = self.queue_pkids.next();
                let p = publish_with(&topic, &e.body, QoS::AtLeastOnce, pkid, false);
                let _ = V4.write(Packet::Publish(p, None), wbuf);
                r.by_pkid.insert(pkid, e.key.seq);
            }
        }
        if !done.is_empty() {
            self.hub.events.ack(self.conn_id, &done);
            self.mailbox.wake_inputs();
        }
    }

    /// A PUBACK for an event: `false` when the packet was not one.
    pub(super) fn event_acked(&mut self, pkid: u16) -> bool {
        let Some(r) = self.events.as_mut() else {
            return false;
        };
        match r.by_pkid.remove(&pkid) {
            Some(seq) => {
                r.acked.push(seq);
                true
            }
            None => false,
        }
    }

    /// This read batch's acknowledgements move the checkpoint (one call), then the window
    /// is refilled once.
    pub(super) fn events_acked_flush(&mut self, wbuf: &mut BytesMut) {
        let Some(r) = self.events.as_mut() else {
            return;
        };
        if r.acked.is_empty() {
            return;
        }
        let acked = std::mem::take(&mut r.acked);
        self.hub.events.ack(self.conn_id, &acked);
        self.events_fill(wbuf);
    }
}

/// `$fleethub/events/{d}/{m or ~}/{bag}`, the live view's topic, from the stored bag.
fn event_topic(bag: &str) -> String {
    let (d, m) = match fleethub_router::Message::from_bag(bag, bytes::Bytes::new()) {
        Ok(m) => (
            m.system.connection_device_id.unwrap_or_default(),
            m.system.connection_module_id,
        ),
        Err(_) => (String::new(), None),
    };
    let ids = crate::topics::telemetry_ids(&d, m.as_deref());
    format!("{}{ids}/{bag}", topics::SERVICE_EVENTS_PREFIX)
}
