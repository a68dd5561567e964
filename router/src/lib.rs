//! fleethub's routing crate.
//!
//! Map of modules:
//! - [`message`]: the one message model every telemetry publish is parsed into (body,
//!   application properties, system properties) and the IoT Hub property-bag codec used on
//!   MQTT topics. The route language, sinks and store-and-forward queues build on it.
//! - [`condition`]: the IoT Hub query language's expressions (twin queries, deployment
//!   target conditions): parse once, evaluate three-valued.
//! - [`route`]: `FROM … WHERE … INTO …` in edgeHub's language, lexed, parsed, type-checked
//!   and evaluated as edgeHub does; whole sets validated into a [`route::RouteTable`].
//! - [`context`]: how a message looks to a condition (`$body`, system and application
//!   properties), the body parsed at most once per message.
//! - [`queue`]: store-and-forward: a queue per sink ordered by priority then arrival, with
//!   time to live and a size quota; in memory or durable (a group-committed write-ahead
//!   log in front of redb).
//!
//! Nothing here opens a socket: the broker crate feeds messages in and delivers them out.

pub mod condition;
pub mod context;
pub mod message;
pub mod queue;
pub mod route;

pub use message::{Message, PropertyBagError, SystemProperties};
