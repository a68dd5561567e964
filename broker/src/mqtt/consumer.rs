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

/// `$fleethub/events/{d}/{m or ~}/{bag}`, the live view's topic, from the stored bag. Only
/// the two ids are picked out (the hub wrote the bag: its system keys are literal), not the
/// whole bag parsed: this runs per event delivered.
fn event_topic(bag: &str) -> String {
    let (mut d, mut m) = (None, None);
    for kv in bag.split('&') {
        if let Some(v) = kv.strip_prefix("$.cdid=") {
            d = Some(v);
        } else if let Some(v) = kv.strip_prefix("$.cmid=") {
            m = Some(v);
        }
    }
    let decode = |v: &str| {
        percent_encoding::percent_decode_str(v)
            .decode_utf8_lossy()
            .into_owned()
    };
    let d = d.map(decode).unwrap_or_default();
    let m = m.map(decode);
    let ids = crate::topics::telemetry_ids(&d, m.as_deref());
    format!("{}{ids}/{bag}", topics::SERVICE_EVENTS_PREFIX)
}

#[cfg(test)]
mod tests {
    /// The topic from the picked-out ids is the one a full parse of the bag gives.
    #[test]
    fn event_topics_name_the_sender() {
        for (d, m) in [
            ("d1", None),
            ("a b/c", Some("m%1")),
            ("x", Some("$edgeHub")),
        ] {
            let message = fleethub_router::Message {
                system: fleethub_router::SystemProperties {
                    connection_device_id: Some(d.to_string()),
                    connection_module_id: m.map(str::to_string),
                    ..Default::default()
                },
                properties: vec![("k".into(), Some("v&w".into()))],
                ..Default::default()
            };
            let bag = message.to_bag();
            let ids = crate::topics::telemetry_ids(d, m);
            assert_eq!(
                super::event_topic(&bag),
                format!("$fleethub/events/{ids}/{bag}")
            );
        }
    }
}
