//! The built-in events endpoint, as IoT Hub's: telemetry that matched no route (the fallback
//! route) or was routed `INTO $events` is kept for a retention period and size, and consumer
//! groups read it, each from its own durable position.
//!
//! The endpoint's storage is its own retained log ([`fleethub_router::queue::RetainedLog`],
//! in `events/` of the data directory) beside the store-and-forward queues: entries are
//! stored before the device's PUBACK like every routed message (the hub appends to both in
//! one step, [`crate::hub::Hub::append`]), and leave only by retention (whole segments past
//! the retention time, or the oldest beyond the retention size), never because a reader
//! took them. Readers hold positions instead: a group's checkpoint is the position up to
//! which everything was acknowledged. Several consumers in one group share its messages
//! (competing consumers): each is handed entries no other consumer of the group holds; an
//! entry a consumer leaves unacknowledged is handed to the next one. Checkpoints are stored
//! a moment after they move (so a crash redelivers at most that moment's acknowledgements
//! and what was in flight: duplicates, never losses).

mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use fleethub_router::queue::{Entry, QueueError, RetainedLog};
use serde::{Deserialize, Serialize};

pub use store::GroupStore;

/// The queue sink of the endpoint.
pub const SINK: &str = "$events";
/// The group every hub has, read by `$fleethub/events/#`.
pub const DEFAULT_GROUP: &str = crate::topics::DEFAULT_CONSUMER_GROUP;
/// Entries one consumer holds unacknowledged at once.
pub const CONSUMER_WINDOW: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("consumer group '{0}' not found")]
    NotFound(String),
    #[error("consumer group '{0}' already exists")]
    Exists(String),
    #[error("{0}")]
    Limit(String),
    #[error("store: {0}")]
    Store(String),
}

crate::storage::store_errors!(EventsError);

impl From<QueueError> for EventsError {
    fn from(e: QueueError) -> Self {
        EventsError::Store(e.to_string())
    }
}

/// Where a new group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest retained message.
    Start,
    /// What arrives after the group is created.
    End,
    /// The first message enqueued at or after this time (unix ms).
    Time(u64),
}

impl StartAt {
    /// `start`, `end`, or an RFC 3339 time.
    pub fn parse(s: &str) -> Result<StartAt, EventsError> {
        match s {
            "start" | "" => Ok(StartAt::Start),
            "end" => Ok(StartAt::End),
            t => humantime::parse_rfc3339_weak(t)
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| StartAt::Time(d.as_millis() as u64))
                .ok_or_else(|| EventsError::Invalid {
                    field: "from",
                    message: format!("'{t}': start, end or an RFC 3339 time"),
                }),
        }
    }
}

/// A consumer group as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerGroup {
    pub name: String,
    pub created_time: String,
    /// Every entry with a sequence number up to this one was acknowledged.
    pub checkpoint: u64,
}

/// A group as the API and the CLI show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupView {
    pub name: String,
    pub created_time: String,
    pub checkpoint: u64,
    /// Retained messages after the checkpoint.
    pub lag_messages: u64,
    /// Age of the oldest of them, in seconds (0 when there is none).
    pub lag_seconds: f64,
    pub consumers: usize,
    pub in_flight: usize,
}

/// One group's reading state.
struct Group {
    def: ConsumerGroup,
    /// The highest sequence number handed out from the log.
    read: u64,
    /// Handed out and not acknowledged, by whom.
    in_flight: BTreeMap<u64, u64>,
    /// Left unacknowledged by a consumer that went away: handed out again first.
    redeliver: BTreeSet<u64>,
    /// The checkpoint moved since it was stored.
    dirty: bool,
}

impl Group {
    fn new(def: ConsumerGroup) -> Group {
        Group {
            read: def.checkpoint,
            def,
            in_flight: BTreeMap::new(),
            redeliver: BTreeSet::new(),
            dirty: false,
        }
    }

    /// Everything up to the lowest entry still held (or to be handed out again) is done.
    fn advance(&mut self) {
        let low = [
            self.in_flight.keys().next().copied(),
            self.redeliver.iter().next().copied(),
        ]
        .into_iter()
        .flatten()
        .min();
        let checkpoint = match low {
            Some(s) => s.saturating_sub(1),
            None => self.read,
        };
        if checkpoint > self.def.checkpoint {
            self.def.checkpoint = checkpoint;
            self.dirty = true;
        }
    }
}

/// A reader of one group: a service connection, or an HTTP reader.
struct Consumer {
    group: String,
    /// Woken when entries arrive; `None` for HTTP readers, which poll.
    mailbox: Option<Arc<crate::connections::Mailbox>>,
}

struct State {
    groups: BTreeMap<String, Group>,
    consumers: HashMap<u64, Consumer>,
}

pub struct Events {
    log: Arc<RetainedLog>,
    store: GroupStore,
    state: Mutex<State>,
    max_groups: usize,
}

impl Events {
    /// Loads the groups (creating `$Default` on first start) and makes sure the log's
    /// positions stay above every checkpoint.
    pub fn open(
        log: Arc<RetainedLog>,
        store: GroupStore,
        max_groups: usize,
    ) -> Result<Events, EventsError> {
        let mut groups = BTreeMap::new();
        for def in store.load()? {
            log.raise_seq(def.checkpoint);
            groups.insert(def.name.clone(), Group::new(def));
        }
        let events = Events {
            log,
            store,
            state: Mutex::new(State {
                groups,
                consumers: HashMap::new(),
            }),
            max_groups,
        };
        if !events.exists(DEFAULT_GROUP) {
            events.create(DEFAULT_GROUP, StartAt::Start)?;
        }
        Ok(events)
    }

    /// The endpoint's storage.
    pub fn log(&self) -> &Arc<RetainedLog> {
        &self.log
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn exists(&self, group: &str) -> bool {
        self.lock().groups.contains_key(group)
    }

    /// Creates a group starting at `from`.
    pub fn create(&self, name: &str, from: StartAt) -> Result<ConsumerGroup, EventsError> {
        validate_name(name)?;
        {
            let st = self.lock();
            if st.groups.contains_key(name) {
                return Err(EventsError::Exists(name.to_string()));
            }
            if st.groups.len() >= self.max_groups {
                return Err(EventsError::Limit(format!(
                    "the hub has {} consumer groups, the most [events] max_consumer_groups allows",
                    st.groups.len()
                )));
            }
        }
        let checkpoint = match from {
            StartAt::Start => 0,
            StartAt::End => self.log.last_seq(),
            StartAt::Time(t) => self.log.seq_before(t, crate::c2d::now_ms())?,
        };
        let def = ConsumerGroup {
            name: name.to_string(),
            created_time: crate::registry::now_rfc3339(),
            checkpoint,
        };
        self.store.put(&def)?;
        let mut st = self.lock();
        if st.groups.contains_key(name) {
            return Err(EventsError::Exists(name.to_string()));
        }
        st.groups.insert(name.to_string(), Group::new(def.clone()));
        Ok(def)
    }

    pub fn delete(&self, name: &str) -> Result<(), EventsError> {
        if name == DEFAULT_GROUP {
            return Err(EventsError::Invalid {
                field: "name",
                message: "$Default cannot be deleted".into(),
            });
        }
        if !self.exists(name) {
            return Err(EventsError::NotFound(name.to_string()));
        }
        self.store.remove(name)?;
        let mut st = self.lock();
        st.groups.remove(name);
        // Its consumers read nothing more; their connections stay.
        st.consumers.retain(|_, c| c.group != name);
        Ok(())
    }

    /// Adds a consumer of `group` (a service connection, woken through its mailbox).
    pub fn join(
        &self,
        id: u64,
        group: &str,
        mailbox: Option<Arc<crate::connections::Mailbox>>,
    ) -> Result<(), EventsError> {
        let mut st = self.lock();
        if !st.groups.contains_key(group) {
            return Err(EventsError::NotFound(group.to_string()));
        }
        st.consumers.insert(
            id,
            Consumer {
                group: group.to_string(),
                mailbox,
            },
        );
        Ok(())
    }

    /// A consumer leaves: what it held unacknowledged goes to the group's other consumers.
    pub fn leave(&self, id: u64) {
        let mut st = self.lock();
        let Some(c) = st.consumers.remove(&id) else {
            return;
        };
        let mut wake = false;
        if let Some(g) = st.groups.get_mut(&c.group) {
            let held: Vec<u64> = g
                .in_flight
                .iter()
                .filter(|(_, by)| **by == id)
                .map(|(s, _)| *s)
                .collect();
            for s in held {
                g.in_flight.remove(&s);
                g.redeliver.insert(s);
                wake = true;
            }
        }
        if wake {
            Self::wake_group(&st, &c.group);
        }
    }

    fn wake_group(st: &State, group: &str) {
        for c in st.consumers.values() {
            if c.group == group {
                if let Some(m) = &c.mailbox {
                    m.wake_inputs();
                }
            }
        }
    }

    /// New entries were committed: every consumer is told.
    pub fn wake(&self) {
        for c in self.lock().consumers.values() {
            if let Some(m) = &c.mailbox {
                m.wake_inputs();
            }
        }
    }

    /// Up to `limit` entries for consumer `id`: first those another consumer left, then new
    /// ones after the group's read position.
    pub fn take(&self, id: u64, limit: usize) -> Result<Vec<Entry>, EventsError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = crate::c2d::now_ms();
        let mut st = self.lock();
        let Some(group) = st.consumers.get(&id).map(|c| c.group.clone()) else {
            return Ok(Vec::new());
        };
        let Some(g) = st.groups.get_mut(&group) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(seq) = g.redeliver.pop_first() else {
                break;
            };
            // Gone by retention meanwhile: nothing to hand out.
            let page = self.log.read_after(seq - 1, 1, now)?;
            if let Some(e) = page.into_iter().find(|e| e.key.seq == seq) {
                g.in_flight.insert(seq, id);
                out.push(e);
            }
        }
        if out.len() < limit {
            let page = self.log.read_after(g.read, limit - out.len(), now)?;
            for e in page {
                g.read = g.read.max(e.key.seq);
                g.in_flight.insert(e.key.seq, id);
                out.push(e);
            }
        }
        g.advance();
        Ok(out)
    }

    /// Consumer `id` acknowledged these entries: the checkpoint moves past every entry
    /// before the oldest one still held.
    pub fn ack(&self, id: u64, seqs: &[u64]) {
        let mut st = self.lock();
        let Some(group) = st.consumers.get(&id).map(|c| c.group.clone()) else {
            return;
        };
        if let Some(g) = st.groups.get_mut(&group) {
            for s in seqs {
                if g.in_flight.get(s) == Some(&id) {
                    g.in_flight.remove(s);
                }
            }
            g.advance();
        }
    }

    /// Stores the checkpoints that moved (a moment's worth of acknowledgements at a time).
    pub fn flush(&self) -> Result<usize, EventsError> {
        let dirty: Vec<ConsumerGroup> = {
            let mut st = self.lock();
            st.groups
                .values_mut()
                .filter(|g| g.dirty)
                .map(|g| {
                    g.dirty = false;
                    g.def.clone()
                })
                .collect()
        };
        for def in &dirty {
            if let Err(e) = self.store.put(def) {
                // Stored next time round.
                if let Some(g) = self.lock().groups.get_mut(&def.name) {
                    g.dirty = true;
                }
                return Err(e);
            }
        }
        Ok(dirty.len())
    }

    /// Up to `max` retained entries after `after` (the group's checkpoint when `None`),
    /// for a batch reader that checkpoints itself ([`Events::set_checkpoint`]).
    pub fn read(
        &self,
        group: &str,
        after: Option<u64>,
        max: usize,
    ) -> Result<Vec<Entry>, EventsError> {
        let from = match after {
            Some(a) => a,
            None => {
                self.lock()
                    .groups
                    .get(group)
                    .ok_or_else(|| EventsError::NotFound(group.to_string()))?
                    .def
                    .checkpoint
            }
        };
        if !self.exists(group) {
            return Err(EventsError::NotFound(group.to_string()));
        }
        Ok(self.log.read_after(from, max, crate::c2d::now_ms())?)
    }

    /// A batch reader's checkpoint: everything up to `seq` is done (it only moves forward).
    /// Entries up to it that readers of the group hold are theirs to acknowledge still, but
    /// no longer hold the checkpoint back.
    pub fn set_checkpoint(&self, group: &str, seq: u64) -> Result<u64, EventsError> {
        let mut st = self.lock();
        let g = st
            .groups
            .get_mut(group)
            .ok_or_else(|| EventsError::NotFound(group.to_string()))?;
        if seq > g.def.checkpoint {
            g.in_flight.retain(|s, _| *s > seq);
            g.redeliver.retain(|s| *s > seq);
            g.read = g.read.max(seq);
            g.def.checkpoint = seq;
            g.dirty = true;
            g.advance();
        }
        Ok(g.def.checkpoint)
    }

    pub fn names(&self) -> Vec<String> {
        self.lock().groups.keys().cloned().collect()
    }

    /// A group with its lag (reads the queue: for the API and metrics, not per message).
    pub fn view(&self, name: &str) -> Result<GroupView, EventsError> {
        let (def, consumers, in_flight) = {
            let st = self.lock();
            let g = st
                .groups
                .get(name)
                .ok_or_else(|| EventsError::NotFound(name.to_string()))?;
            let consumers = st.consumers.values().filter(|c| c.group == name).count();
            (g.def.clone(), consumers, g.in_flight.len())
        };
        let lag_messages = self.log.count_after(def.checkpoint)?;
        let now = crate::c2d::now_ms();
        let oldest = self.log.read_after(def.checkpoint, 1, now)?;
        let lag_seconds = oldest
            .first()
            .map(|e| now.saturating_sub(e.enqueued_ms) as f64 / 1000.0)
            .unwrap_or(0.0);
        Ok(GroupView {
            name: def.name,
            created_time: def.created_time,
            checkpoint: def.checkpoint,
            lag_messages,
            lag_seconds,
            consumers,
            in_flight,
        })
    }
}

/// Moves what an earlier version kept of the endpoint in the store-and-forward queue (its
/// `$events` sink) into the retained log, positions unchanged so checkpoints stay valid.
/// Idempotent: a crash between storing and removing moves nothing twice.
pub async fn move_from_queue(
    queues: &fleethub_router::queue::DiskQueue,
    log: &RetainedLog,
) -> Result<u64, EventsError> {
    use fleethub_router::queue::Queue;
    let none = fleethub_router::queue::KeySet::default();
    let mut moved = 0;
    loop {
        // Expired entries are removed (and counted) by the queue on the way.
        let page = queues.peek(SINK, &none, 4096, crate::c2d::now_ms())?;
        if page.entries.is_empty() {
            break;
        }
        let keys = page.entries.iter().map(|e| e.key.clone()).collect();
        moved += log.import(page.entries).await?;
        queues.remove(keys);
    }
    if moved > 0 {
        tracing::info!(
            entries = moved,
            "events endpoint: entries moved from the store-and-forward queue into its own log"
        );
    }
    Ok(moved)
}

/// An event as the HTTP API shows it: its position, ids, properties and body (JSON when it
/// parses as JSON, text when UTF-8, else base64).
pub fn describe(entry: &Entry) -> serde_json::Value {
    use base64::Engine;
    use serde_json::{json, Value};
    let message = fleethub_router::Message::from_bag(&entry.bag, entry.body.clone()).ok();
    let body = match std::str::from_utf8(&entry.body) {
        Ok(s) => serde_json::from_str::<Value>(s).unwrap_or_else(|_| Value::String(s.into())),
        Err(_) => {
            json!({ "base64": base64::engine::general_purpose::STANDARD.encode(&entry.body) })
        }
    };
    let (system, application, device, module) = match &message {
        Some(m) => (
            m.system
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect::<serde_json::Map<_, _>>(),
            m.properties
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect::<serde_json::Map<_, _>>(),
            m.system.connection_device_id.clone(),
            m.system.connection_module_id.clone(),
        ),
        None => Default::default(),
    };
    json!({
        "sequenceNumber": entry.key.seq,
        "enqueuedTimeMs": entry.enqueued_ms,
        "deviceId": device,
        "moduleId": module,
        "systemProperties": system,
        "properties": application,
        "body": body,
    })
}

/// Group names: 1 to 64 letters, digits, `-`, `_`, `.`, as IoT Hub allows (and `$Default`).
fn validate_name(name: &str) -> Result<(), EventsError> {
    let ok = name == DEFAULT_GROUP
        || (!name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
    if ok {
        Ok(())
    } else {
        Err(EventsError::Invalid {
            field: "name",
            message: format!("'{name}': 1 to 64 letters, digits, '-', '_' or '.'"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group() -> Group {
        Group::new(ConsumerGroup {
            name: "g".into(),
            created_time: String::new(),
            checkpoint: 10,
        })
    }

    /// The checkpoint never passes an entry still held, whatever order acks come in.
    #[test]
    fn checkpoint_stops_before_the_oldest_entry_held() {
        let mut g = group();
        for s in [12, 15, 20] {
            g.in_flight.insert(s, 1);
            g.read = s;
        }
        g.in_flight.remove(&15);
        g.advance();
        assert_eq!(g.def.checkpoint, 11);
        g.in_flight.remove(&12);
        g.advance();
        assert_eq!(g.def.checkpoint, 19);
        g.redeliver.insert(20);
        g.in_flight.remove(&20);
        g.advance();
        assert_eq!(g.def.checkpoint, 19, "an entry to hand out again holds it");
        g.redeliver.clear();
        g.advance();
        assert_eq!(g.def.checkpoint, 20);
        assert!(g.dirty);
    }

    #[test]
    fn names_and_start_positions() {
        assert!(validate_name("analytics-1.b_c").is_ok());
        assert!(validate_name("$Default").is_ok());
        for bad in ["", "a/b", "$Other", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert_eq!(StartAt::parse("start").unwrap(), StartAt::Start);
        assert_eq!(StartAt::parse("end").unwrap(), StartAt::End);
        assert_eq!(
            StartAt::parse("2026-11-29T00:00:00Z").unwrap(),
            StartAt::Time(1_795_910_400_000)
        );
        assert!(StartAt::parse("yesterday").is_err());
    }
}
