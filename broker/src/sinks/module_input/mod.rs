//! Module inputs: `BrokeredEndpoint("/modules/{m}/inputs/{i}")` routes deliver to one of the
//! hub's own modules, over that module's MQTT connection.
//!
//! The driver only wakes the module's connection; the connection reads the module's input
//! queues itself through an [`InputDelivery`] (a [`QueueReader`] over every
//! `/modules/{m}/inputs/*` queue), because the PUBACK that completes a delivery arrives on
//! that connection.

use std::collections::HashMap;

use fleethub_router::queue::EntryKey;

use super::{Health, QueueReader, SinkDriver, SinkId, StopFuture};
use crate::identity::{IdentityKey, ModuleId};

/// Routed messages in flight to one module at once. A module reads for many publishers, and
/// its connection task gets a turn like each of theirs: with a window of 100 it fell behind
/// 20 publishing devices (a backlog of 100k entries in the routed benchmark), with 1000 it
/// keeps up (p50 latency 386 ms -> 13 ms). Unacknowledged entries stay queued either way.
pub const INPUT_WINDOW: usize = 1000;

/// The module-input driver.
pub struct ModuleInputs {
    hub_id: crate::identity::DeviceId,
    live: crate::connections::Live,
}

impl ModuleInputs {
    pub fn new(ctx: &super::Context) -> ModuleInputs {
        ModuleInputs {
            hub_id: ctx.config.hub_id.clone(),
            live: ctx.live.clone(),
        }
    }
}

impl SinkDriver for ModuleInputs {
    fn kind(&self) -> &'static str {
        "module_input"
    }

    fn owns(&self, sink: &SinkId) -> bool {
        matches!(sink, SinkId::ModuleInput { .. })
    }

    fn refuses(&self, _sink: &SinkId) -> Option<String> {
        // Queued while the module is away: it reads its inputs when it connects.
        None
    }

    fn wake(&self, sink: &SinkId) {
        if let SinkId::ModuleInput { module, .. } = sink {
            let key = IdentityKey::module(self.hub_id.clone(), module.clone());
            if let Some(live) = self.live.get(&key) {
                live.mailbox.wake_inputs();
            }
        }
    }

    fn health(&self) -> Health {
        Health {
            kind: "module_input",
            enabled: true,
            connected: None,
        }
    }

    fn stop(&self) -> StopFuture<'_> {
        // Nothing of its own runs: module connections stop with the MQTT front end.
        Box::pin(async {})
    }
}

/// What one module connection has in flight from its input queues.
pub struct InputDelivery {
    module: ModuleId,
    pub reader: QueueReader,
    /// The entry each packet id carries, until the module's PUBACK.
    by_pkid: HashMap<u16, EntryKey>,
}

impl InputDelivery {
    pub fn new(module: ModuleId) -> InputDelivery {
        InputDelivery {
            module,
            reader: QueueReader::new(INPUT_WINDOW),
            by_pkid: HashMap::new(),
        }
    }

    /// `key` went out as packet `pkid`.
    pub fn sent(&mut self, pkid: u16, key: EntryKey) {
        self.by_pkid.insert(pkid, key);
    }

    /// The module's PUBACK for `pkid`; `false` when the packet was not an input delivery.
    pub fn acked(&mut self, pkid: u16) -> bool {
        match self.by_pkid.remove(&pkid) {
            Some(key) => {
                self.reader.acked(key);
                true
            }
            None => false,
        }
    }

    /// The module's input queues that have entries.
    pub fn queues(&self, queues: &fleethub_router::queue::DiskQueue) -> Vec<(String, String)> {
        let prefix = format!("/modules/{}/inputs/", self.module);
        fleethub_router::queue::Queue::sinks(queues)
            .into_iter()
            .filter_map(|(s, _)| {
                let input = s.strip_prefix(&prefix)?.to_string();
                Some((s, input))
            })
            .collect()
    }
}
