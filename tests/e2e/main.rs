//! End-to-end tests: the real `fleethub` binary on ephemeral ports, driven over MQTT
//! (rumqttc) and HTTP (reqwest) exactly as devices and operators would.

mod auth;
mod authz;
mod c2d;
mod cluster;
mod conformance;
mod crash;
mod events;
mod fleet;
mod formats;
mod full_disk;
mod garbage;
mod group_deployments;
mod hardening;
mod harness;
mod images;
mod interop;
mod interop_sessions;
mod jetstream;
mod methods;
mod operations;
mod postgres;
mod provisioning;
mod registry;
mod routes;
mod sessions;
mod shutdown;
mod sinks;
mod store_forward;
mod targeted_deployments;
mod telemetry;
mod twin;
mod websocket;

mod x509;
