//! Configuration: the TOML file (defaults embedded from `config/fleethub.toml`), overridden by
//! command-line flags, checked once into [`Config`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The default configuration, also the documentation of every key.
pub const DEFAULT_TOML: &str = include_str!("../../config/fleethub.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config key {key}: '{value}' is not an address (host:port) or \"off\"")]
    Address { key: &'static str, value: String },
    #[error("config keys tls.cert and tls.key must be set together")]
    TlsPair,
    #[error("config key hub.id: {0}")]
    HubId(String),
    #[error("config [routes].{name}: {message}")]
    Route { name: String, message: String },
    #[error("config [upstream]: {0}")]
    Upstream(String),
    #[error("config key log.format: '{0}' is not \"text\" or \"json\"")]
    LogFormat(String),
    #[error("config key events.{0}: must be at least 1")]
    Events(&'static str),
    #[error("config [cluster]: {0}")]
    Cluster(String),
    #[error("config [endpoints.{name}]: {message}")]
    Endpoint { name: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    hub: HubSection,
    listen: ListenSection,
    tls: TlsSection,
    mqtt: MqttSection,
    api: ApiSection,
    log: LogSection,
    router: RouterSection,
    routing: RoutingSection,
    #[serde(default)]
    routes: toml::Table,
    upstream: UpstreamSection,
    store_and_forward: StoreAndForwardSection,
    #[serde(default)]
    provisioning: ProvisioningSection,
    #[serde(default)]
    events: EventsSection,
    #[serde(default)]
    endpoints: std::collections::BTreeMap<String, EndpointSection>,
    #[serde(default)]
    cluster: ClusterSection,
}

/// `[cluster]`: several hub nodes on one PostgreSQL (see `crate::cluster`). Absent or without
/// `postgres`, the hub is the single node it always was.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// This node's name, unique in the cluster: letters, digits, '-', '_' and '.'.
    #[serde(default)]
    pub node: String,
    /// The PostgreSQL the nodes share: `postgres://…` or `host=… port=… user=… dbname=…`.
    #[serde(default)]
    pub postgres: String,
    /// The NATS the nodes share, for what is addressed to one identity (method calls,
    /// takeovers): `nats://host:port`, several separated by commas. Empty: none.
    #[serde(default)]
    pub nats: String,
    /// How often a node reports itself alive, and a follower asks for leadership.
    #[serde(default = "ClusterSection::default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// A node not heard from for this long is shown as gone.
    #[serde(default = "ClusterSection::default_node_timeout_ms")]
    pub node_timeout_ms: u64,
}

impl ClusterSection {
    fn default_heartbeat_ms() -> u64 {
        1000
    }
    fn default_node_timeout_ms() -> u64 {
        5000
    }

    /// Whether this hub runs as a cluster node.
    pub fn enabled(&self) -> bool {
        !self.postgres.is_empty()
    }
}

/// `[endpoints.NAME]`: a custom endpoint routes reach with `INTO Endpoint("NAME")`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSection {
    /// `jetstream` (NATS JetStream) or `postgres` (a PostgreSQL table).
    pub kind: String,
    /// The server: `nats://host:port`, or a PostgreSQL connection string
    /// (`host=… port=… user=… dbname=…` or `postgres://…`).
    pub url: String,
    /// JetStream: the stream messages are stored in; created (for `subject`'s prefix) if
    /// missing.
    #[serde(default)]
    pub stream: String,
    /// PostgreSQL: the table rows go into; created if missing.
    #[serde(default)]
    pub table: String,
    /// The subject template: `{hub}`, `{device}`, `{module}` (`~` for none) and `{output}`
    /// (`~` for none) are filled in per message.
    #[serde(default = "default_subject")]
    pub subject: String,
}

fn default_subject() -> String {
    "fleethub.{hub}.{device}.{module}.{output}".into()
}

/// `[events]`: the built-in events endpoint (see `crate::events`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSection {
    /// The fallback route: telemetry that matched no route goes to the endpoint.
    pub fallback: bool,
    /// How long a message is kept, read or not.
    pub retention_secs: u64,
    /// How much is kept at most: beyond it the oldest messages make room.
    pub retention_bytes: u64,
    /// Consumer groups the hub allows, `$Default` included.
    pub max_consumer_groups: usize,
}

impl Default for EventsSection {
    fn default() -> Self {
        EventsSection {
            fallback: true,
            retention_secs: 86_400,
            retention_bytes: 1 << 30,
            max_consumer_groups: 20,
        }
    }
}

/// `[provisioning]`: zero-touch provisioning as the Device Provisioning Service does it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisioningSection {
    /// The ID scope devices give the provisioning client (`id_scope`).
    pub id_scope: String,
}

impl Default for ProvisioningSection {
    fn default() -> Self {
        ProvisioningSection {
            id_scope: "0ne00000F1E".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingSection {
    pub detect_json_bodies: bool,
    pub time_to_live_secs: u64,
}

/// `[upstream]`: the bridge `INTO $upstream` uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub enabled: bool,
    pub address: String,
    pub tls: bool,
    pub ca: String,
    pub client_id: String,
    pub username: String,
    pub password: String,
    pub device_key: String,
    pub sas_hostname: String,
    pub topic: String,
}

/// `[store_and_forward]`: the durable queues' limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreAndForwardSection {
    pub cache_bytes: usize,
    pub max_bytes: u64,
    pub max_sink_bytes: u64,
    pub when_full: WhenFullSetting,
    pub min_free_bytes: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WhenFullSetting {
    DropOldest,
    Refuse,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HubSection {
    id: String,
    hostname: String,
    data_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenSection {
    mqtt: String,
    mqtts: String,
    /// MQTT over WebSockets over TLS (`/$iothub/websocket`); "off" by default.
    #[serde(default = "off")]
    wss: String,
    api: String,
}

fn off() -> String {
    "off".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    cert: String,
    key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    pub max_payload_bytes: usize,
    pub max_connections: usize,
    pub connect_timeout_secs: u64,
    /// Sockets that have not finished CONNECT held at once.
    pub max_pending_connections: usize,
    /// How long a persistent session (clean session 0) outlives its client's last
    /// disconnect.
    pub session_expiry_secs: u64,
}

/// Logging (see `[log]` in the default config).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter: `info`, `debug`, `info,fleethub::mqtt=debug`.
    pub level: String,
}

/// Limits of the HTTP API (see `[api]` in the default config).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    pub max_connections: usize,
    pub header_read_timeout_secs: u64,
    pub body_read_timeout_secs: u64,
    pub max_body_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSection {
    pub max_segment_bytes: usize,
    pub max_segment_count: usize,
}

/// Flags that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub mqtt: Option<String>,
    pub mqtts: Option<String>,
    pub wss: Option<String>,
    pub api: Option<String>,
}

/// The checked configuration the hub runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The hub's own device id.
    pub hub_id: crate::identity::DeviceId,
    pub hostname: String,
    pub data_dir: PathBuf,
    pub mqtt: Option<SocketAddr>,
    pub mqtts: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    pub api: SocketAddr,
    /// Configured certificate and key; `None` means generate under `data_dir/tls`.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub limits: MqttSection,
    pub api_limits: ApiSection,
    pub log: LogSection,
    pub router: RouterSection,
    pub routing: RoutingSection,
    /// Routes from `[routes]`, parsed and checked when the hub starts.
    pub routes: Vec<fleethub_router::route::RouteSpec>,
    pub upstream: UpstreamSection,
    pub store_and_forward: StoreAndForwardSection,
    pub provisioning: ProvisioningSection,
    pub events: EventsSection,
    pub endpoints: std::collections::BTreeMap<String, EndpointSection>,
    pub cluster: ClusterSection,
}

impl Config {
    /// Loads `path` (or the embedded defaults) and applies `overrides`.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        // The embedded defaults are the base; a user file may set only some keys.
        let mut base: toml::Table =
            toml::from_str(DEFAULT_TOML).map_err(|e| ConfigError::Parse {
                path: "(embedded defaults)".into(),
                message: e.to_string(),
            })?;
        let label = path.map(|p| p.display().to_string());
        if let Some(path) = path {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let user: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            merge(&mut base, user);
        }
        let file: FileConfig =
            toml::Value::Table(base)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: label.unwrap_or_else(|| "(embedded defaults)".into()),
                    message: e.to_string(),
                })?;
        Self::build(file, overrides)
    }

    fn build(file: FileConfig, o: &Overrides) -> Result<Config, ConfigError> {
        if !matches!(file.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::LogFormat(file.log.format));
        }
        for (key, value) in [
            ("retention_secs", file.events.retention_secs),
            ("retention_bytes", file.events.retention_bytes),
            (
                "max_consumer_groups",
                file.events.max_consumer_groups as u64,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Events(key));
            }
        }
        for (name, e) in &file.endpoints {
            let err = |message: String| ConfigError::Endpoint {
                name: name.clone(),
                message,
            };
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
            {
                return Err(err("names are letters, digits, '-' and '_'".into()));
            }
            match e.kind.as_str() {
                "jetstream" => {
                    if !e.url.starts_with("nats://") {
                        return Err(err(format!("url '{}': nats://host:port", e.url)));
                    }
                    if e.stream.is_empty()
                        || e.subject.split('.').next().unwrap_or("").contains('{')
                    {
                        return Err(err(
                            "stream must be named and subject must start with a fixed token".into(),
                        ));
                    }
                }
                "postgres" => {
                    if let Err(x) = e.url.parse::<tokio_postgres::Config>() {
                        return Err(err(format!("url: {x}")));
                    }
                    let ok = e.table.len() <= 63
                        && e.table
                            .starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                        && e.table
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !ok {
                        return Err(err(format!(
                            "table '{}': a name of letters, digits and '_'",
                            e.table
                        )));
                    }
                }
                other => return Err(err(format!("kind '{other}': jetstream or postgres"))),
            }
        }
        let c = &file.cluster;
        if c.enabled() {
            if let Err(x) = c.postgres.parse::<tokio_postgres::Config>() {
                return Err(ConfigError::Cluster(format!("postgres: {x}")));
            }
            let ok_name = !c.node.is_empty()
                && c.node.len() <= 63
                && c.node
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
            if !ok_name {
                return Err(ConfigError::Cluster(format!(
                    "node '{}': every node needs its own name of letters, digits, '-', '_' and '.' (at most 63)",
                    c.node
                )));
            }
            if !c.nats.is_empty()
                && !c
                    .nats
                    .split(',')
                    .all(|u| u.trim().parse::<async_nats::ServerAddr>().is_ok())
            {
                return Err(ConfigError::Cluster(format!(
                    "nats '{}': nats://host:port, several separated by commas",
                    c.nats
                )));
            }
            if c.heartbeat_ms == 0 || c.node_timeout_ms < 2 * c.heartbeat_ms {
                return Err(ConfigError::Cluster(
                    "heartbeat_ms must be at least 1 and node_timeout_ms at least twice it".into(),
                ));
            }
        } else if !c.node.is_empty() {
            return Err(ConfigError::Cluster(
                "node is set without postgres: a cluster needs the PostgreSQL its nodes share"
                    .into(),
            ));
        }
        let addr = |key: &'static str, v: &str| -> Result<Option<SocketAddr>, ConfigError> {
            if v == "off" {
                return Ok(None);
            }
            v.parse().map(Some).map_err(|_| ConfigError::Address {
                key,
                value: v.to_string(),
            })
        };
        let mqtt = addr(
            "listen.mqtt",
            o.mqtt.as_deref().unwrap_or(&file.listen.mqtt),
        )?;
        let mqtts = addr(
            "listen.mqtts",
            o.mqtts.as_deref().unwrap_or(&file.listen.mqtts),
        )?;
        let wss = addr("listen.wss", o.wss.as_deref().unwrap_or(&file.listen.wss))?;
        let api_str = o.api.as_deref().unwrap_or(&file.listen.api);
        let api = addr("listen.api", api_str)?.ok_or(ConfigError::Address {
            key: "listen.api",
            value: api_str.to_string(),
        })?;
        let tls = match (file.tls.cert.is_empty(), file.tls.key.is_empty()) {
            (true, true) => None,
            (false, false) => Some((file.tls.cert.into(), file.tls.key.into())),
            _ => return Err(ConfigError::TlsPair),
        };
        let hub_id = crate::identity::DeviceId::new(&file.hub.id)
            .map_err(|e| ConfigError::HubId(e.to_string()))?;
        let routes = route_specs(&file.routes)?;
        if file.upstream.enabled && file.upstream.address.is_empty() {
            return Err(ConfigError::Upstream("enabled without an address".into()));
        }
        Ok(Config {
            hub_id,
            hostname: file.hub.hostname,
            data_dir: o.data_dir.clone().unwrap_or(file.hub.data_dir),
            mqtt,
            mqtts,
            wss,
            api,
            tls,
            limits: file.mqtt,
            api_limits: file.api,
            log: file.log,
            router: file.router,
            routing: file.routing,
            routes,
            upstream: file.upstream,
            store_and_forward: file.store_and_forward,
            provisioning: file.provisioning,
            events: file.events,
            endpoints: file.endpoints,
            cluster: file.cluster,
        })
    }
}

/// `name = "FROM …"` or `name = { route = "FROM …", priority = 0, timeToLiveSecs = 7200 }`.
fn route_specs(table: &toml::Table) -> Result<Vec<fleethub_router::route::RouteSpec>, ConfigError> {
    let mut specs = Vec::new();
    for (name, value) in table {
        let err = |message: &str| ConfigError::Route {
            name: name.clone(),
            message: message.to_string(),
        };
        let (text, priority, ttl) = match value {
            toml::Value::String(s) => (s.clone(), 0, None),
            toml::Value::Table(t) => {
                for key in t.keys() {
                    if !["route", "priority", "timeToLiveSecs"].contains(&key.as_str()) {
                        return Err(err(&format!(
                            "unknown key '{key}' (route, priority, timeToLiveSecs)"
                        )));
                    }
                }
                let text = t
                    .get("route")
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| err("needs route = \"FROM …\""))?;
                let priority = match t.get("priority") {
                    None => 0,
                    Some(toml::Value::Integer(p)) if (0..=9).contains(p) => *p as u8,
                    Some(_) => return Err(err("priority must be an integer 0..9")),
                };
                let ttl = match t.get("timeToLiveSecs") {
                    None => None,
                    Some(toml::Value::Integer(s)) if *s > 0 => Some(*s as u64),
                    Some(_) => return Err(err("timeToLiveSecs must be a positive integer")),
                };
                (text.to_string(), priority, ttl)
            }
            _ => return Err(err("must be a route string or a table")),
        };
        specs.push(fleethub_router::route::RouteSpec {
            name: name.clone(),
            text,
            priority,
            ttl_secs: ttl,
            origin: "config".into(),
        });
    }
    Ok(specs)
}

fn merge(base: &mut toml::Table, user: toml::Table) {
    for (k, v) in user {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(u)) => merge(b, u),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_section_is_checked_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("fh-cfg-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        let load = |text: &str| {
            std::fs::write(&file, text).unwrap();
            Config::load(Some(&file), &Overrides::default()).map_err(|e| e.to_string())
        };
        let pg = "postgres = \"host=127.0.0.1 port=5432 user=fleethub dbname=fleethub\"";
        let c = load(&format!("[cluster]\nnode = \"hub-a\"\n{pg}\n")).unwrap();
        assert!(c.cluster.enabled());
        assert_eq!(
            (c.cluster.heartbeat_ms, c.cluster.node_timeout_ms),
            (1000, 5000)
        );
        assert!(!Config::load(None, &Overrides::default())
            .unwrap()
            .cluster
            .enabled());
        for (text, says) in [
            (format!("[cluster]\n{pg}\n"), "node ''"),
            (format!("[cluster]\nnode = \"a:b\"\n{pg}\n"), "node 'a:b'"),
            ("[cluster]\nnode = \"a\"\n".to_string(), "without postgres"),
            (
                "[cluster]\nnode = \"a\"\npostgres = \"host=x port=notaport\"\n".to_string(),
                "postgres:",
            ),
            (
                format!(
                    "[cluster]\nnode = \"a\"\n{pg}\nheartbeat_ms = 1000\nnode_timeout_ms = 1500\n"
                ),
                "at least twice",
            ),
            (
                format!("[cluster]\nnode = \"a\"\n{pg}\nnats = \"http://x y\"\n"),
                "nats 'http",
            ),
            (
                format!("[cluster]\nnode = \"a\"\n{pg}\nnatz = \"x\"\n"),
                "natz",
            ),
        ] {
            let err = load(&text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn embedded_defaults_load() {
        let c = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(c.mqtt, Some("127.0.0.1:1883".parse().unwrap()));
        assert_eq!(c.limits.max_payload_bytes, 256 * 1024);
        assert!(c.tls.is_none());
    }

    #[test]
    fn overrides_and_partial_files_apply() {
        let dir = std::env::temp_dir().join(format!("fh-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[hub]\nhostname = \"hub.example\"\n[listen]\nmqtts = \"off\"\n",
        )
        .unwrap();
        let o = Overrides {
            api: Some("127.0.0.1:0".into()),
            ..Default::default()
        };
        let c = Config::load(Some(&file), &o).unwrap();
        assert_eq!(c.hostname, "hub.example");
        assert_eq!(c.mqtts, None);
        assert_eq!(c.api.port(), 0);
        std::fs::write(&file, "[hub]\nhostnme = \"x\"\n").unwrap();
        let err = Config::load(Some(&file), &o).unwrap_err().to_string();
        assert!(err.contains("hostnme"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn routes_come_in_both_forms() {
        let dir = std::env::temp_dir().join(format!("fh-cfg-routes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[routes]\nall = \"FROM /* INTO $upstream\"\nhot = { route = \"FROM /messages/* INTO $upstream\", priority = 2, timeToLiveSecs = 60 }\n",
        )
        .unwrap();
        let c = Config::load(Some(&file), &Overrides::default()).unwrap();
        assert_eq!(c.routes.len(), 2);
        let hot = c.routes.iter().find(|r| r.name == "hot").unwrap();
        assert_eq!((hot.priority, hot.ttl_secs), (2, Some(60)));
        std::fs::write(
            &file,
            "[routes]\nx = { route = \"FROM /*\", priority = 12 }\n",
        )
        .unwrap();
        let err = Config::load(Some(&file), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[routes].x") && err.contains("priority"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_address_names_the_key() {
        let o = Overrides {
            mqtt: Some("nonsense".into()),
            ..Default::default()
        };
        let err = Config::load(None, &o).unwrap_err().to_string();
        assert!(err.contains("listen.mqtt"), "{err}");
    }
}
