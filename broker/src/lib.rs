//! fleethub: a self-hosted IoT hub in one binary.
//!
//! Map of modules, from the wire inwards:
//! - [`mqtt`]: the MQTT front end devices connect to (plain and TLS): the CONNECT handshake
//!   and session resume, the connection loop, one handler per kind of PUBLISH,
//!   subscriptions, delivery.
//! - [`topics`]: the one table mapping IoT Hub client topics to delivery kinds.
//! - [`core`]: the embedded rumqttd router behind a small start/link API.
//! - [`sas`], [`identity`]: SAS tokens and validated device/module ids.
//! - [`registry`]: the durable identity registry (redb); [`session`]: persistent MQTT
//!   sessions (clean session 0) that outlive connections and restarts.
//! - [`hub`]: state shared by the front end and the API, the one twin-write path, and the
//!   change interface deployments hear through; [`connections`]: identities' live
//!   connections and their mailboxes.
//! - [`twin`]: device and module twins (merge patches, metadata, group-committed store).
//! - [`methods`]: direct method calls awaiting device replies; [`c2d`]: the durable
//!   cloud-to-device queue.
//! - [`routing`]: the route table in force (config and `$edgeHub` twin) and its one rule;
//!   [`sinks`]: where routed messages go (module inputs, `$upstream`), one driver per kind.
//! - [`fleet`], [`images`]: products, device groups, image packages; [`deploy`]: group and
//!   targeted deployments, their engine and their API resources.
//! - [`api`]: the management HTTP API (one file per resource, `wire` for every body) and
//!   `/metrics`; [`client`]: the typed client of it; [`metrics`]: what is exported.
//! - [`server`]: startup and shutdown (`run(config, shutdown)`); [`config`]: settings;
//!   [`tls`]: certificates; `storage`: one way to keep JSON rows in redb.
//! - [`cli`]: the `fleethub` command line, one file per verb group.

pub mod api;
pub mod backup;
pub mod c2d;
pub mod certificates;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod console;
pub mod core;
pub mod data_dir;
pub mod deploy;
pub mod enrollment;
pub mod events;
pub mod fleet;
pub mod fuzzing;
pub mod gathered;
pub mod hub;
pub mod identity;
pub mod images;
pub mod live_view;
pub mod methods;
pub mod metrics;
pub mod mqtt;
pub mod provisioning;
pub mod registry;
pub mod relay;
pub mod routing;
pub mod sas;
pub mod server;
pub mod session;
pub mod sinks;
pub(crate) mod storage;
pub mod stores;
pub mod tls;
pub mod topics;
pub mod twin;
pub mod x509;

pub use config::Config;
pub use server::run;
