//! State shared by the MQTT front end and the management API.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use serde::Serialize;
use tokio::sync::Notify;

use crate::config::Config;
use crate::core::Core;
use crate::identity::IdentityKey;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// Addresses actually bound (port 0 resolved). Written to `data_dir/endpoints.json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Endpoints {
    pub mqtt: Option<SocketAddr>,
    pub mqtts: Option<SocketAddr>,
    pub api: SocketAddr,
}

/// A live device or module connection, so the API can close it (delete, disable) and a
/// second connection with the same id can take over, as IoT Hub does.
pub struct LiveConnection {
    pub conn_id: u64,
    pub kick: Arc<Notify>,
}

pub struct Hub {
    pub config: Config,
    pub registry: Registry,
    pub metrics: Metrics,
    pub core: Core,
    /// The operator's bearer token (API) and service-connection password (MQTT).
    pub admin_token: String,
    pub live: DashMap<IdentityKey, LiveConnection>,
    /// Set once the listeners are bound.
    pub endpoints: std::sync::OnceLock<Endpoints>,
    next_conn: AtomicU64,
}

impl Hub {
    pub fn new(config: Config, registry: Registry, core: Core, admin_token: String) -> Hub {
        Hub {
            config,
            registry,
            metrics: Metrics::new(),
            core,
            admin_token,
            live: DashMap::new(),
            endpoints: std::sync::OnceLock::new(),
            next_conn: AtomicU64::new(1),
        }
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Closes the live connection of `key`, if any.
    pub fn kick(&self, key: &IdentityKey) {
        if let Some(live) = self.live.get(key) {
            live.kick.notify_one();
        }
    }

    /// Constant-time comparison with the admin token.
    pub fn is_admin_token(&self, candidate: &str) -> bool {
        let a = self.admin_token.as_bytes();
        let b = candidate.as_bytes();
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

pub type SharedHub = Arc<Hub>;
