//! fleethub: a self-hosted IoT hub in one binary.
//!
//! Map of modules, from the wire inwards:
//! - [`mqtt`]: the MQTT front end devices connect to (plain and TLS): CONNECT
//!   authentication, per-connection authorization, topic translation.
//! - [`topics`]: the one table mapping IoT Hub client topics to internal router topics.
//! - [`core`]: the embedded rumqttd router behind a small start/link API.
//! - [`sas`], [`identity`]: SAS tokens and validated device/module ids.
//! - [`registry`]: the durable identity registry (redb); [`session`]: persistent MQTT
//!   sessions (clean session 0) that outlive connections and restarts.
//! - [`twin`]: device and module twins (merge patches, metadata, group-committed store).
//! - [`methods`]: direct method calls awaiting device replies; [`c2d`]: the durable
//!   cloud-to-device queue.
//! - [`routing`]: the route table in force (config and `$edgeHub` twin) and dispatch;
//!   [`upstream`]: the `$upstream` bridge.
//! - [`api`]: the management HTTP API and `/metrics`; [`metrics`]: what it exports.
//! - [`server`]: startup and shutdown (`run(config, shutdown)`); [`config`]: settings;
//!   [`tls`]: certificates; [`hub`]: state shared by the front end and the API.
//! - [`cli`]: the `fleethub` command line.

pub mod api;
pub mod c2d;
pub mod cli;
pub mod client;
pub mod config;
pub mod core;
pub mod deploy;
pub mod fleet;
pub mod hub;
pub mod identity;
pub mod images;
pub mod methods;
pub mod metrics;
pub mod mqtt;
pub mod registry;
pub mod routing;
pub mod sas;
pub mod server;
pub mod session;
pub mod sinks;
mod storage;
pub mod tls;
pub mod topics;
pub mod twin;

pub use config::Config;
pub use server::run;
