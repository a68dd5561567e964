//! End-to-end tests: the real `fleethub` binary on ephemeral ports, driven over MQTT
//! (rumqttc) and HTTP (reqwest) exactly as devices and operators would.

mod auth;
mod authz;
mod garbage;
mod harness;
mod interop;
mod registry;
mod telemetry;
