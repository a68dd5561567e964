//! Sinks: where routed messages go after their durable queue.
//!
//! A route names a sink (`BrokeredEndpoint("/modules/m/inputs/i")`, `$upstream`); the
//! router turns it into a [`SinkId`] once, when the route table is installed, and from then on
//! the id travels as a type (its queue name is derived from it, never parsed back). Each kind
//! of sink has a driver ([`SinkDriver`]): it says whether it takes entries now, delivers from
//! its queue within a window when woken (through a [`QueueReader`], which knows what is in
//! flight and removes what was acknowledged), reports its health and stops with the hub.
//!
//! Drivers are found by asking each whether it owns a sink ([`SinkDriver::owns`]), not by
//! an enum of kinds, so a kind reached through an existing [`SinkId`] form is a folder here
//! and one line in [`Sinks::start`]. (A sink form routes cannot name yet, such as a
//! configured endpoint by name, also needs its variant here and its route syntax.)

pub mod endpoint;
pub mod events;
pub mod jetstream;
pub mod module_input;
pub mod postgres;
mod reader;
#[cfg(test)]
mod tests;
pub mod upstream;

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use fleethub_router::route::Sink;

use crate::identity::{IdError, ModuleId};

pub use reader::QueueReader;

/// A sink, as routes name it and queues store it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SinkId {
    /// An input of one of the hub's own modules.
    ModuleInput { module: ModuleId, input: String },
    /// The `$upstream` bridge.
    Upstream,
    /// The built-in events endpoint.
    Events,
    /// A custom endpoint from `[endpoints]`.
    Endpoint(String),
}

impl SinkId {
    /// The sink a route names. A module name that is not a valid module id can never
    /// connect, so such a route's messages are dropped (counted), not queued.
    pub fn from_route(sink: &Sink) -> Result<SinkId, IdError> {
        Ok(match sink {
            Sink::Upstream => SinkId::Upstream,
            Sink::Events => SinkId::Events,
            Sink::Endpoint(name) => SinkId::Endpoint(name.clone()),
            Sink::ModuleInput { module, input } => SinkId::ModuleInput {
                module: ModuleId::new(module)?,
                input: input.clone(),
            },
        })
    }
}

/// The queue name: `/modules/{m}/inputs/{i}` or `$upstream`, as IoT Edge names them.
impl fmt::Display for SinkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SinkId::ModuleInput { module, input } => write!(f, "/modules/{module}/inputs/{input}"),
            SinkId::Upstream => f.write_str(upstream::SINK),
            SinkId::Events => f.write_str(crate::events::SINK),
            SinkId::Endpoint(name) => write!(f, "$endpoint/{name}"),
        }
    }
}

/// How a sink kind is doing, for `/routes` and `/queues`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Health {
    pub kind: &'static str,
    /// Whether it takes entries at all (an unconfigured upstream does not).
    pub enabled: bool,
    /// For sinks that keep a connection: whether it is up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
}

pub type StopFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// One kind of sink.
pub trait SinkDriver: Send + Sync {
    /// The kind's name (`module_input`, `upstream`), as health reports name it.
    fn kind(&self) -> &'static str;
    /// Whether this driver delivers `sink`.
    fn owns(&self, sink: &SinkId) -> bool;
    /// Why `sink` takes nothing (an unconfigured upstream), or `None` when it takes entries.
    /// A route's messages to a sink that takes nothing are dropped and counted rather than
    /// queued for nobody, and the route is flagged when its table is installed.
    fn refuses(&self, sink: &SinkId) -> Option<String>;
    /// Entries were committed to `sink`'s queue: deliver them (or tell whoever does).
    fn wake(&self, sink: &SinkId);
    fn health(&self) -> Health;
    /// Ends delivery and waits for it; what was in flight stays queued.
    fn stop(&self) -> StopFuture<'_>;
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("upstream: {0}")]
    Upstream(#[from] upstream::UpstreamError),
}

/// What drivers start from.
pub struct Context<'a> {
    pub config: &'a crate::config::Config,
    pub queues: std::sync::Arc<fleethub_router::queue::DiskQueue>,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Identities' live connections (module inputs wake their module's).
    pub live: crate::connections::Live,
    /// The events endpoint, whose readers its driver wakes.
    pub events: std::sync::Arc<crate::events::Events>,
}

/// Every sink driver of the hub.
pub struct Sinks {
    drivers: Vec<Box<dyn SinkDriver>>,
}

impl Sinks {
    /// Starts every kind of sink: the one place a kind is registered.
    pub fn start(ctx: &Context) -> Result<Sinks, SinkError> {
        let drivers: Vec<Box<dyn SinkDriver>> = vec![
            Box::new(module_input::ModuleInputs::new(ctx)),
            Box::new(upstream::Upstream::start(ctx)?),
            Box::new(events::EventsEndpoint::new(ctx)),
            Box::new(endpoint::Endpoints::start(
                ctx,
                jetstream::KIND,
                jetstream::session,
            )),
            Box::new(endpoint::Endpoints::start(
                ctx,
                postgres::KIND,
                postgres::session,
            )),
        ];
        Ok(Sinks { drivers })
    }

    /// No drivers at all: every sink refuses (for tests of what sits above).
    #[cfg(test)]
    pub fn none() -> Sinks {
        Sinks {
            drivers: Vec::new(),
        }
    }

    fn driver(&self, sink: &SinkId) -> Option<&dyn SinkDriver> {
        self.drivers
            .iter()
            .find(|d| d.owns(sink))
            .map(|d| d.as_ref())
    }

    /// Why `sink` takes nothing, or `None` when it takes entries.
    pub fn refusal(&self, sink: &SinkId) -> Option<String> {
        match (self.driver(sink), sink) {
            (Some(d), _) => d.refuses(sink),
            (None, SinkId::Endpoint(name)) => Some(format!(
                "no [endpoints.{name}] in the configuration: nothing can deliver to it"
            )),
            (None, _) => Some(format!("no driver delivers {sink}")),
        }
    }

    /// Tells the drivers of freshly committed entries that there is work.
    pub fn wake<'a>(&self, sinks: impl IntoIterator<Item = &'a SinkId>) {
        for sink in sinks {
            if let Some(d) = self.driver(sink) {
                d.wake(sink);
            }
        }
    }

    /// The health of the driver of `kind`.
    pub fn health(&self, kind: &str) -> Option<Health> {
        self.drivers
            .iter()
            .find(|d| d.kind() == kind)
            .map(|d| d.health())
    }

    /// Stops every driver and waits for each.
    pub async fn stop(&self) {
        for d in &self.drivers {
            d.stop().await;
        }
    }
}
