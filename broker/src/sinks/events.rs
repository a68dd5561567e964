//! The built-in events endpoint as a sink: `INTO $events` and the fallback route queue into
//! it; its consumer groups' readers ([`crate::events`]) are woken when entries arrive.

use std::sync::Arc;

use super::{Health, SinkDriver, SinkId, StopFuture};

pub struct EventsEndpoint {
    events: Arc<crate::events::Events>,
}

impl EventsEndpoint {
    pub fn new(ctx: &super::Context) -> EventsEndpoint {
        EventsEndpoint {
            events: ctx.events.clone(),
        }
    }
}

impl SinkDriver for EventsEndpoint {
    fn kind(&self) -> &'static str {
        "events"
    }

    fn owns(&self, sink: &SinkId) -> bool {
        matches!(sink, SinkId::Events)
    }

    fn refuses(&self, _sink: &SinkId) -> Option<String> {
        // Kept for its retention whether or not anyone reads.
        None
    }

    fn wake(&self, _sink: &SinkId) {
        self.events.wake();
    }

    fn health(&self) -> Health {
        Health {
            kind: "events",
            enabled: true,
            connected: None,
        }
    }

    fn stop(&self) -> StopFuture<'_> {
        Box::pin(async {})
    }
}
