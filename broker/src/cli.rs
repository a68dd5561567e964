//! The `fleethub` command line: `serve` runs the hub; every other verb is a client of the
//! management API (and `monitor-events` of the MQTT service connection).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::config::{Config, Overrides};
use crate::hub::Endpoints;
use crate::server::{ADMIN_TOKEN_FILE, ENDPOINTS_FILE};

#[derive(Parser, Debug)]
#[command(
    name = "fleethub",
    version,
    about = "Self-hosted IoT hub: MQTT broker, device registry, twins, routes and fleet deployments"
)]
pub struct Cli {
    /// Management API base URL [default: from DATA_DIR/endpoints.json of a running hub, else http://127.0.0.1:8080]
    #[arg(long, env = "FLEETHUB_URL", global = true)]
    pub url: Option<String>,
    /// Admin bearer token [default: the admin-token file in the data directory]
    #[arg(long, env = "FLEETHUB_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Data directory (serve: where the hub keeps its state; client verbs: where to find the token)
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// Output format
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the hub (the default with no subcommand)
    Serve(ServeArgs),
    /// Devices in the identity registry
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Modules (deviceId/moduleId identities)
    #[command(subcommand)]
    Module(ModuleCmd),
    /// Device and module twins
    #[command(subcommand)]
    Twin(TwinCmd),
    /// Direct methods
    #[command(subcommand)]
    Method(MethodCmd),
    /// Cloud-to-device messages
    #[command(subcommand)]
    C2d(C2dCmd),
    /// Routes: the table in force, and checking an expression
    #[command(subcommand)]
    Route(RouteCmd),
    /// Store-and-forward queues, one per sink
    #[command(subcommand)]
    Queue(QueueCmd),
    /// Products: what kind of device (Azure Sphere); each has device groups
    #[command(subcommand)]
    Product(ProductCmd),
    /// Device groups of a product, named "Product/Group"
    #[command(subcommand)]
    DeviceGroup(DeviceGroupCmd),
    /// Image packages (applications, board configurations) that deployments hand out
    #[command(subcommand)]
    Image(ImageCmd),
    /// Targeted and layered deployments (IoT Edge deployment manifests), with rollouts
    #[command(subcommand)]
    Deployment(DeploymentCmd),
    /// Print a SAS token for a device or module (the MQTT password)
    SasToken {
        device: String,
        #[arg(long)]
        module: Option<String>,
        /// Validity, e.g. 1h, 30m, 7d
        #[arg(long, default_value = "1h")]
        duration: String,
        /// Which key signs the token
        #[arg(long, value_enum, default_value_t = KeyChoice::Primary)]
        key: KeyChoice,
    },
    /// Print telemetry as it arrives (like `az iot hub monitor-events`)
    MonitorEvents {
        #[arg(long)]
        device: Option<String>,
        #[arg(long, requires = "device")]
        module: Option<String>,
        /// MQTT address of the hub [default: the hub's plain MQTT endpoint]
        #[arg(long)]
        mqtt: Option<String>,
        /// Stop after this long (e.g. 30s)
        #[arg(long)]
        timeout: Option<String>,
        /// Stop after this many events
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ProductCmd {
    /// Create a product; it gets the five default device groups unless --no-default-groups
    Create {
        name: String,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        no_default_groups: bool,
    },
    List,
    /// A product with its groups and how many devices each holds
    Show {
        name: String,
    },
    /// Change the description or the name (the id never changes)
    Update {
        name: String,
        #[arg(long)]
        new_name: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Delete a product and its groups (refused while devices are in them)
    Delete {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Upload an image; its id is the SHA-256 of its content. Adding the same content again
    /// returns the existing image
    Add {
        file: PathBuf,
        #[arg(long)]
        name: String,
        /// X.Y.Z
        #[arg(long)]
        version: String,
        #[arg(long, value_parser = ["application", "board-config"])]
        kind: String,
    },
    List,
    /// An image by id, name:X.Y.Z or name:latest
    Show {
        reference: String,
    },
    /// Write an image's content to a file
    Download {
        reference: String,
        /// Where to write it [default: NAME-VERSION.bin in the current directory]
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum DeploymentCmd {
    /// Create a deployment from an IoT Edge / IoT Hub manifest, as `az iot edge deployment
    /// create` takes it
    Create {
        id: String,
        /// The manifest: {"content": {"modulesContent": …}} or {"content": {"deviceContent": …}}
        #[arg(long)]
        content: PathBuf,
        /// The twin query WHERE condition over tags, reported properties, deviceId and
        /// deviceGroup ("*" for every device)
        #[arg(long)]
        target_condition: String,
        #[arg(long, default_value_t = 0)]
        priority: u32,
        /// Labels as a JSON object
        #[arg(long)]
        labels: Option<String>,
        /// Custom metrics file: {"queries": {"name": "SELECT deviceId FROM devices WHERE …"}}
        #[arg(long)]
        metrics: Option<PathBuf>,
        /// Add properties.desired.<path> values on top of the winning base deployment
        #[arg(long)]
        layered: bool,
        /// What a device that stops matching gets
        #[arg(long, value_enum, default_value_t = Unmatch::Fallback)]
        on_unmatch: Unmatch,
        /// Phased rollout as JSON: {"phases": [1, 10, 100], "successThreshold": 95,
        /// "failureThreshold": 5, "observeSecs": 60}
        #[arg(long)]
        rollout: Option<String>,
    },
    List,
    Show {
        id: String,
    },
    /// Change target condition, priority, labels or metrics (content is immutable)
    Update {
        id: String,
        #[arg(long)]
        target_condition: Option<String>,
        #[arg(long)]
        priority: Option<u32>,
        #[arg(long)]
        labels: Option<String>,
        #[arg(long)]
        metrics: Option<PathBuf>,
    },
    Delete {
        id: String,
    },
    /// A metric's count and the devices behind it (targetedCount, appliedCount,
    /// reportedSuccessfulCount, reportedFailedCount, or a custom metric)
    ShowMetric {
        id: String,
        metric: String,
    },
    /// Hold a phased rollout at its current phase
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Stop a phased rollout; the current phase's devices go back to what they had
    Abort {
        id: String,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Unmatch {
    Fallback,
    Keep,
    Remove,
}

fn read_json(path: &std::path::Path, what: &str) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {what} {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{what} {} is not JSON", path.display()))
}

fn parse_json_arg(text: &str, what: &str) -> Result<Value> {
    serde_json::from_str(text).with_context(|| format!("{what} is not JSON: {text}"))
}

/// An optional flag holding JSON text, parsed when given.
fn json_flag(text: &Option<String>, flag: &str) -> Result<Option<Value>> {
    text.as_deref().map(|t| parse_json_arg(t, flag)).transpose()
}

/// An optional flag naming a JSON file, read when given.
fn json_file(path: &Option<std::path::PathBuf>, what: &str) -> Result<Option<Value>> {
    path.as_deref().map(|p| read_json(p, what)).transpose()
}

/// `base` plus the optional fields that were given: a flag not used leaves its field out, so
/// the server keeps what it has.
fn with_given<const N: usize>(mut base: Value, fields: [(&str, Option<Value>); N]) -> Value {
    for (field, value) in fields {
        if let Some(v) = value {
            base[field] = v;
        }
    }
    base
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Feed {
    Retail,
    RetailEval,
}

impl Feed {
    fn api(self) -> &'static str {
        match self {
            Feed::Retail => "Retail",
            Feed::RetailEval => "RetailEval",
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum DeviceGroupCmd {
    /// Create a group: "Product/Group"
    Create {
        path: String,
        #[arg(long)]
        description: Option<String>,
        /// Whether deployments update the group's applications [default: on]
        #[arg(long, value_enum)]
        application_updates: Option<OnOff>,
        /// OS feed [default: retail]
        #[arg(long, value_enum)]
        os_feed: Option<Feed>,
    },
    /// Groups of one product, or of all
    List {
        #[arg(long)]
        product: Option<String>,
    },
    /// A group, with its devices
    Show { path: String },
    Update {
        path: String,
        #[arg(long)]
        new_name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[arg(long, value_enum)]
        application_updates: Option<OnOff>,
        #[arg(long, value_enum)]
        os_feed: Option<Feed>,
    },
    /// Delete a group (refused while devices are in it)
    Delete { path: String },
    /// The group's deployments: the set of images its devices run
    #[command(subcommand)]
    Deployment(GroupDeploymentCmd),
}

#[derive(Subcommand, Debug)]
pub enum GroupDeploymentCmd {
    /// Assign a set of images to a group, replacing its current deployment
    Create {
        path: String,
        /// Image ids, name:X.Y.Z (pinned) or name:latest (follows new versions)
        #[arg(long, num_args = 1.., required = true)]
        images: Vec<String>,
    },
    /// The group's deployments, newest (the one in force) first
    List { path: String },
}

/// `Product/Group` → the API path of the group.
fn group_path(path: &str) -> Result<String> {
    let (product, group) = path
        .split_once('/')
        .with_context(|| format!("'{path}': name a group as \"Product/Group\""))?;
    Ok(format!("/products/{}/groups/{}", enc(product), enc(group)))
}

fn groups_table(items: &[Value]) -> String {
    let mut out = format!(
        "{:<30} {:<30} {:>7} {:<12} {:>8}",
        "PRODUCT", "GROUP", "APP_UPD", "OS_FEED", "DEVICES"
    );
    for g in items {
        out += &format!(
            "\n{:<30} {:<30} {:>7} {:<12} {:>8}",
            g["product"].as_str().unwrap_or(""),
            g["name"].as_str().unwrap_or(""),
            if g["applicationUpdates"] == true {
                "on"
            } else {
                "off"
            },
            g["osFeed"].as_str().unwrap_or(""),
            g["devices"]
        );
    }
    out
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum KeyChoice {
    Primary,
    Secondary,
}

#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// Configuration file (TOML); the embedded defaults fill what it leaves out
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Plain MQTT listen address, or "off"
    #[arg(long)]
    pub mqtt: Option<String>,
    /// MQTT over TLS listen address, or "off"
    #[arg(long)]
    pub mqtts: Option<String>,
    /// HTTP API and /metrics listen address
    #[arg(long)]
    pub api: Option<String>,
}

#[derive(Args, Debug)]
pub struct KeyArgs {
    /// Base64 primary key [default: generated]
    #[arg(long)]
    primary_key: Option<String>,
    /// Base64 secondary key [default: generated]
    #[arg(long)]
    secondary_key: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum DeviceCmd {
    /// Register a device; prints its keys and connection string
    Create {
        id: String,
        #[arg(long, value_parser = ["enabled", "disabled"])]
        status: Option<String>,
        /// A gateway (IoT Edge device, child fleethub): messages it forwards keep their
        /// original device and module ids
        #[arg(long)]
        edge: bool,
        #[command(flatten)]
        keys: KeyArgs,
    },
    Show {
        id: String,
    },
    /// List devices (one page, or --all)
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        after: Option<String>,
        /// Follow pages to the end
        #[arg(long)]
        all: bool,
    },
    Update {
        id: String,
        #[arg(long, value_parser = ["enabled", "disabled"])]
        status: Option<String>,
        #[arg(long)]
        status_reason: Option<String>,
        /// Move the device into this group: "Product/Group" (it leaves its old group)
        #[arg(long)]
        device_group: Option<String>,
        #[command(flatten)]
        keys: KeyArgs,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum QueueCmd {
    /// Every sink's queue: depth, bytes, oldest message age, drops by reason
    List,
    /// One sink's queue, e.g. '$upstream' or /modules/filter/inputs/in1
    Show { sink: String },
}

#[derive(Subcommand, Debug)]
pub enum RouteCmd {
    /// The routes in force and where each came from (config or the $edgeHub twin)
    List,
    /// Validate one route expression; prints the error with its column
    Check { route: String },
}

#[derive(Subcommand, Debug)]
pub enum TwinCmd {
    /// Print a twin
    Show {
        device: String,
        #[arg(long)]
        module: Option<String>,
    },
    /// Patch tags and/or desired properties (JSON merge patch: null deletes)
    Update {
        device: String,
        #[arg(long)]
        module: Option<String>,
        /// Desired-properties patch, e.g. '{"interval": 30}'
        #[arg(long)]
        desired: Option<String>,
        /// Tags patch, e.g. '{"location": {"region": "US"}}'
        #[arg(long)]
        tags: Option<String>,
        /// Only apply if the twin's etag is still this (HTTP If-Match)
        #[arg(long)]
        etag: Option<String>,
    },
    /// Run an IoT Hub twin query, e.g. "SELECT * FROM devices WHERE tags.region = 'US'"
    Query { query: String },
}

#[derive(Subcommand, Debug)]
pub enum MethodCmd {
    /// Call a direct method and print the device's answer
    Invoke {
        device: String,
        method: String,
        #[arg(long)]
        module: Option<String>,
        /// JSON payload
        #[arg(long, default_value = "null")]
        payload: String,
        /// Seconds to wait for the answer
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum C2dCmd {
    /// Queue a message for a device (delivered when it is connected and subscribed)
    Send {
        device: String,
        /// Message body (sent as UTF-8 text)
        #[arg(long)]
        body: String,
        /// Application property, repeatable: --property key=value
        #[arg(long = "property", value_name = "KEY=VALUE")]
        properties: Vec<String>,
        #[arg(long)]
        message_id: Option<String>,
        /// Time to live, e.g. 1h (default) or 10m
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ModuleCmd {
    /// Register a module of a device; prints its keys and connection string
    Create {
        device: String,
        module: String,
        #[command(flatten)]
        keys: KeyArgs,
    },
    Show {
        device: String,
        module: String,
    },
    List {
        device: String,
    },
    Delete {
        device: String,
        module: String,
    },
}

/// Entry point of the binary.
pub fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        None => runtime.block_on(serve(&cli.data_dir, ServeArgs::default())),
        Some(Command::Serve(ref args)) => runtime.block_on(serve(
            &cli.data_dir,
            ServeArgs {
                config: args.config.clone(),
                mqtt: args.mqtt.clone(),
                mqtts: args.mqtts.clone(),
                api: args.api.clone(),
            },
        )),
        Some(ref command) => {
            let client = Client::new(&cli)?;
            runtime.block_on(client.run(command))
        }
    }
}

async fn serve(data_dir: &Option<PathBuf>, args: ServeArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn".into()),
        )
        .init();
    let overrides = Overrides {
        data_dir: data_dir.clone(),
        mqtt: args.mqtt,
        mqtts: args.mqtts,
        api: args.api,
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    crate::server::run(config, crate::server::signal()).await?;
    Ok(())
}

fn parse_duration(s: &str) -> Result<Duration> {
    humantime::parse_duration(s)
        .with_context(|| format!("'{s}' is not a duration (try 30s, 1h, 7d)"))
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    output: Output,
}

impl Client {
    fn new(cli: &Cli) -> Result<Client> {
        let data_dir = cli
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("./fleethub-data"));
        let token = match &cli.token {
            Some(t) => t.clone(),
            None => {
                let path = data_dir.join(ADMIN_TOKEN_FILE);
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!("no --token given and cannot read {} (set FLEETHUB_TOKEN or --data-dir)", path.display())
                    })?
                    .trim()
                    .to_string()
            }
        };
        let base = match &cli.url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => match read_endpoints(&data_dir) {
                Some(e) => format!("http://{}", e.api),
                None => "http://127.0.0.1:8080".to_string(),
            },
        };
        Ok(Client {
            http: reqwest::Client::new(),
            base,
            token,
            output: cli.output,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the hub at {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let message = value
                .get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            bail!("{} ({})", message, status);
        }
        Ok(value)
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// `DELETE path`, then `{"deleted": name}` or "Deleted {what} {name}".
    async fn delete(&self, path: &str, what: &str, name: &str) -> Result<()> {
        self.call(reqwest::Method::DELETE, path, None).await?;
        self.print(&json!({ "deleted": name }), |_| {
            format!("Deleted {what} {name}")
        });
        Ok(())
    }

    fn print(&self, value: &Value, text: impl FnOnce(&Value) -> String) {
        match self.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_default()
            ),
            Output::Text => println!("{}", text(value)),
        }
    }

    async fn hostname(&self) -> Result<String> {
        let info = self.get("/hub").await?;
        Ok(info["hostname"].as_str().unwrap_or("localhost").to_string())
    }

    async fn run(&self, command: &Command) -> Result<()> {
        match command {
            Command::Serve(_) => unreachable!("serve is handled before a client is built"),
            Command::Device(cmd) => self.device(cmd).await,
            Command::Module(cmd) => self.module(cmd).await,
            Command::Twin(cmd) => self.twin(cmd).await,
            Command::Product(cmd) => self.product(cmd).await,
            Command::Image(cmd) => self.image(cmd).await,
            Command::Deployment(cmd) => self.deployment(cmd).await,
            Command::DeviceGroup(cmd) => self.device_group(cmd).await,
            Command::Queue(cmd) => {
                let v = self.get("/queues").await?;
                let v = match cmd {
                    QueueCmd::List => v,
                    QueueCmd::Show { sink } => v["items"]
                        .as_array()
                        .and_then(|items| {
                            items.iter().find(|i| i["sink"] == sink.as_str()).cloned()
                        })
                        .with_context(|| format!("no queue for sink '{sink}'"))?,
                };
                self.print(&v, |v| {
                    let row = |q: &Value| {
                        format!(
                            "{:<40} {:>10} {:>12} {:>12} {:>9} {:>9}",
                            q["sink"].as_str().unwrap_or(""),
                            q["depth"],
                            q["bytes"],
                            q["oldestAgeSeconds"]
                                .as_f64()
                                .map(|a| format!("{a:.1}"))
                                .unwrap_or_else(|| "-".into()),
                            q["dropped"]["expired"],
                            q["dropped"]["quota"]
                        )
                    };
                    let mut out = format!(
                        "{:<40} {:>10} {:>12} {:>12} {:>9} {:>9}",
                        "SINK", "DEPTH", "BYTES", "OLDEST_S", "EXPIRED", "QUOTA"
                    );
                    match v["items"].as_array() {
                        Some(items) => items.iter().for_each(|q| out += &format!("\n{}", row(q))),
                        None => out += &format!("\n{}", row(v)),
                    }
                    out
                });
                Ok(())
            }
            Command::Route(RouteCmd::List) => {
                let v = self.get("/routes").await?;
                self.print(&v, |v| {
                    let mut out = format!(
                        "{:<20} {:<9} {:>3} {:>8}  ROUTE",
                        "NAME", "SOURCE", "PRI", "TTL_S"
                    );
                    for r in v["routes"].as_array().into_iter().flatten() {
                        out += &format!(
                            "\n{:<20} {:<9} {:>3} {:>8}  {}",
                            r["name"].as_str().unwrap_or(""),
                            r["source"].as_str().unwrap_or(""),
                            r["priority"],
                            r["timeToLiveSecs"],
                            r["route"].as_str().unwrap_or("")
                        );
                    }
                    out += &format!(
                        "\nupstream: {}",
                        match (
                            v["upstream"]["enabled"].as_bool(),
                            v["upstream"]["connected"].as_bool()
                        ) {
                            (Some(true), Some(true)) => "connected",
                            (Some(true), _) => "disconnected",
                            _ => "not configured",
                        }
                    );
                    out
                });
                Ok(())
            }
            Command::Route(RouteCmd::Check { route }) => {
                let url = format!("{}/routes/check", self.base);
                let resp = self
                    .http
                    .post(&url)
                    .bearer_auth(&self.token)
                    .json(&json!({ "route": route }))
                    .send()
                    .await
                    .with_context(|| format!("cannot reach the hub at {}", self.base))?;
                let v: Value = resp.json().await.unwrap_or(Value::Null);
                if v["valid"].as_bool() == Some(true) {
                    self.print(&v, |v| {
                        format!(
                            "valid: {} -> {}",
                            v["source"].as_str().unwrap_or(""),
                            v["sink"].as_str().unwrap_or("")
                        )
                    });
                    Ok(())
                } else {
                    let column = v["column"].as_u64().unwrap_or(1) as usize;
                    if self.output == Output::Text {
                        eprintln!("{route}\n{}^", " ".repeat(column.saturating_sub(1)));
                    }
                    bail!("{}", v["message"].as_str().unwrap_or("invalid route"))
                }
            }
            Command::Method(MethodCmd::Invoke {
                device,
                method,
                module,
                payload,
                timeout,
            }) => {
                let payload: Value =
                    serde_json::from_str(payload).context("--payload is not JSON")?;
                let path = match module {
                    Some(m) => format!("/devices/{}/modules/{}/methods", enc(device), enc(m)),
                    None => format!("/devices/{}/methods", enc(device)),
                };
                let body = json!({ "methodName": method, "payload": payload, "responseTimeoutInSeconds": timeout });
                let v = self.call(reqwest::Method::POST, &path, Some(body)).await?;
                self.print(&v, |v| {
                    format!(
                        "status: {}\npayload: {}",
                        v["status"],
                        serde_json::to_string_pretty(&v["payload"]).unwrap_or_default()
                    )
                });
                Ok(())
            }
            Command::C2d(C2dCmd::Send {
                device,
                body,
                properties,
                message_id,
                ttl,
            }) => {
                let mut props = serde_json::Map::new();
                for p in properties {
                    let (k, v) = p
                        .split_once('=')
                        .with_context(|| format!("--property '{p}' is not KEY=VALUE"))?;
                    props.insert(k.to_string(), json!(v));
                }
                let mut req = json!({ "body": body, "properties": props, "ttlSeconds": parse_duration(ttl)?.as_secs() });
                if let Some(id) = message_id {
                    req["messageId"] = json!(id);
                }
                let v = self
                    .call(
                        reqwest::Method::POST,
                        &format!("/devices/{}/messages", enc(device)),
                        Some(req),
                    )
                    .await?;
                self.print(&v, |v| {
                    format!(
                        "Queued message {} for {device} (expires {})",
                        v["messageId"].as_str().unwrap_or(""),
                        v["expiryTimeUtc"].as_str().unwrap_or("")
                    )
                });
                Ok(())
            }
            Command::SasToken {
                device,
                module,
                duration,
                key,
            } => {
                self.sas_token(device, module.as_deref(), duration, *key)
                    .await
            }
            Command::MonitorEvents {
                device,
                module,
                mqtt,
                timeout,
                count,
            } => {
                self.monitor(
                    device.as_deref(),
                    module.as_deref(),
                    mqtt.as_deref(),
                    timeout.as_deref(),
                    *count,
                )
                .await
            }
        }
    }

    async fn with_connection_string(&self, mut record: Value) -> Result<Value> {
        let host = self.hostname().await?;
        let device = record["deviceId"].as_str().unwrap_or_default().to_string();
        let key = record["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let cs = match record["moduleId"].as_str() {
            Some(m) => {
                format!("HostName={host};DeviceId={device};ModuleId={m};SharedAccessKey={key}")
            }
            None => format!("HostName={host};DeviceId={device};SharedAccessKey={key}"),
        };
        record["connectionString"] = Value::String(cs);
        Ok(record)
    }

    fn print_identity(&self, verb: &str, v: &Value) {
        self.print(v, |v| {
            let name = match v["moduleId"].as_str() {
                Some(m) => format!("module {}/{}", v["deviceId"].as_str().unwrap_or(""), m),
                None => format!("device {}", v["deviceId"].as_str().unwrap_or("")),
            };
            let mut out = format!("{verb} {name}\n");
            out += &format!(
                "  status:           {}\n",
                v["status"].as_str().unwrap_or("")
            );
            out += &format!(
                "  connectionState:  {}\n",
                v["connectionState"].as_str().unwrap_or("")
            );
            if let Some(t) = v["lastActivityTime"].as_str() {
                out += &format!("  lastActivityTime: {t}\n");
            }
            if let Some(g) = v["deviceGroup"].as_str() {
                out += &format!("  deviceGroup:      {g}\n");
            }
            out += &format!(
                "  primaryKey:       {}\n",
                v["authentication"]["symmetricKey"]["primaryKey"]
                    .as_str()
                    .unwrap_or("")
            );
            out += &format!(
                "  secondaryKey:     {}",
                v["authentication"]["symmetricKey"]["secondaryKey"]
                    .as_str()
                    .unwrap_or("")
            );
            if let Some(cs) = v["connectionString"].as_str() {
                out += &format!("\n  connectionString: {cs}");
            }
            out
        });
    }

    async fn deployment(&self, cmd: &DeploymentCmd) -> Result<()> {
        let show = |v: &Value| {
            let m = &v["systemMetrics"];
            let mut out = format!(
                "Deployment {} (priority {}{})\n  targetCondition: {}\n  targeted {}  applied {}  reportedSuccess {}  reportedFailed {}",
                v["id"].as_str().unwrap_or(""),
                v["priority"],
                if v["layered"] == true { ", layered" } else { "" },
                v["targetCondition"].as_str().unwrap_or(""),
                m["targetedCount"],
                m["appliedCount"],
                m["reportedSuccessfulCount"],
                m["reportedFailedCount"]
            );
            if let Some(r) = v["rolloutState"].as_object() {
                out += &format!(
                    "\n  rollout: {} at phase {} ({} devices in scope){}",
                    r["status"].as_str().unwrap_or(""),
                    r["phase"].as_u64().unwrap_or(0) + 1,
                    r["members"].as_array().map(Vec::len).unwrap_or(0),
                    r["reason"]
                        .as_str()
                        .map(|s| format!(": {s}"))
                        .unwrap_or_default()
                );
            }
            for (k, c) in v["customMetrics"].as_object().into_iter().flatten() {
                out += &format!("\n  {k}: {c}");
            }
            out
        };
        let path = |id: &str| format!("/deployments/{}", enc(id));
        match cmd {
            DeploymentCmd::Create {
                id,
                content,
                target_condition,
                priority,
                labels,
                metrics,
                layered,
                on_unmatch,
                rollout,
            } => {
                let body = with_given(
                    json!({
                        "id": id,
                        "content": read_json(content, "content")?,
                        "targetCondition": target_condition,
                        "priority": priority,
                        "layered": layered,
                        "onUnmatch": format!("{on_unmatch:?}").to_lowercase(),
                    }),
                    [
                        ("labels", json_flag(labels, "--labels")?),
                        ("metrics", json_file(metrics, "metrics")?),
                        ("rollout", json_flag(rollout, "--rollout")?),
                    ],
                );
                let v = self
                    .call(reqwest::Method::POST, "/deployments", Some(body))
                    .await?;
                self.print(&v, show);
            }
            DeploymentCmd::List => {
                let v = self.get("/deployments").await?;
                self.print(&v, |v| {
                    let mut out = format!(
                        "{:<32} {:>8} {:<7} {:>8} {:>8} {:>8} {:>8}  TARGET",
                        "ID", "PRIORITY", "LAYERED", "TARGETED", "APPLIED", "SUCCESS", "FAILED"
                    );
                    for d in v["items"].as_array().into_iter().flatten() {
                        let m = &d["systemMetrics"];
                        out += &format!(
                            "\n{:<32} {:>8} {:<7} {:>8} {:>8} {:>8} {:>8}  {}",
                            d["id"].as_str().unwrap_or(""),
                            d["priority"],
                            d["layered"],
                            m["targetedCount"],
                            m["appliedCount"],
                            m["reportedSuccessfulCount"],
                            m["reportedFailedCount"],
                            d["targetCondition"].as_str().unwrap_or("")
                        );
                    }
                    out
                });
            }
            DeploymentCmd::Show { id } => {
                let v = self.get(&path(id)).await?;
                self.print(&v, show);
            }
            DeploymentCmd::Update {
                id,
                target_condition,
                priority,
                labels,
                metrics,
            } => {
                let body = with_given(
                    json!({}),
                    [
                        (
                            "targetCondition",
                            target_condition.as_ref().map(|c| json!(c)),
                        ),
                        ("priority", priority.map(|p| json!(p))),
                        ("labels", json_flag(labels, "--labels")?),
                        ("metrics", json_file(metrics, "metrics")?),
                    ],
                );
                let v = self
                    .call(reqwest::Method::PATCH, &path(id), Some(body))
                    .await?;
                self.print(&v, show);
            }
            DeploymentCmd::Delete { id } => self.delete(&path(id), "deployment", id).await?,
            DeploymentCmd::ShowMetric { id, metric } => {
                let v = self
                    .get(&format!("{}/metrics/{}", path(id), enc(metric)))
                    .await?;
                self.print(&v, |v| {
                    let mut out = format!("{metric}: {}", v["count"]);
                    for d in v["deviceIds"].as_array().into_iter().flatten() {
                        out += &format!("\n  {}", d.as_str().unwrap_or(""));
                    }
                    out
                });
            }
            DeploymentCmd::Pause { id }
            | DeploymentCmd::Resume { id }
            | DeploymentCmd::Abort { id } => {
                let action = match cmd {
                    DeploymentCmd::Pause { .. } => "pause",
                    DeploymentCmd::Resume { .. } => "resume",
                    _ => "abort",
                };
                let v = self
                    .call(
                        reqwest::Method::POST,
                        &format!("{}/{action}", path(id)),
                        None,
                    )
                    .await?;
                self.print(&v, |v| {
                    format!(
                        "Rollout of {id}: {}",
                        v["rolloutState"]["status"].as_str().unwrap_or("")
                    )
                });
            }
        }
        Ok(())
    }

    async fn image(&self, cmd: &ImageCmd) -> Result<()> {
        let row = |i: &Value| {
            format!(
                "{:<64} {:<24} {:<10} {:<12} {:>10}",
                i["id"].as_str().unwrap_or(""),
                i["name"].as_str().unwrap_or(""),
                i["version"].as_str().unwrap_or(""),
                i["kind"].as_str().unwrap_or(""),
                i["size"]
            )
        };
        let header = format!(
            "{:<64} {:<24} {:<10} {:<12} {:>10}",
            "ID", "NAME", "VERSION", "KIND", "BYTES"
        );
        match cmd {
            ImageCmd::Add {
                file,
                name,
                version,
                kind,
            } => {
                let content =
                    std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
                if self.output == Output::Text {
                    eprintln!("uploading {} ({} bytes)…", file.display(), content.len());
                }
                let path = format!(
                    "/images?name={}&version={}&kind={}",
                    enc(name),
                    enc(version),
                    enc(kind)
                );
                let resp = self
                    .http
                    .post(format!("{}{path}", self.base))
                    .bearer_auth(&self.token)
                    .header("content-type", "application/octet-stream")
                    .body(content)
                    .send()
                    .await
                    .with_context(|| format!("cannot reach the hub at {}", self.base))?;
                let status = resp.status();
                let v: Value = resp.json().await.unwrap_or(Value::Null);
                if !status.is_success() {
                    bail!(
                        "{} ({status})",
                        v["message"].as_str().unwrap_or("upload refused")
                    );
                }
                let existed = status == reqwest::StatusCode::OK;
                self.print(&v, |v| {
                    format!(
                        "{} image {} ({} {})",
                        if existed { "Existing" } else { "Added" },
                        v["id"].as_str().unwrap_or(""),
                        v["name"].as_str().unwrap_or(""),
                        v["version"].as_str().unwrap_or("")
                    )
                });
            }
            ImageCmd::List => {
                let v = self.get("/images").await?;
                self.print(&v, |v| {
                    let mut out = header.clone();
                    for i in v["items"].as_array().into_iter().flatten() {
                        out += &format!("\n{}", row(i));
                    }
                    out
                });
            }
            ImageCmd::Show { reference } => {
                let v = self.get(&format!("/images/{}", enc(reference))).await?;
                self.print(&v, |v| format!("{header}\n{}", row(v)));
            }
            ImageCmd::Download { reference, out } => {
                let v = self.get(&format!("/images/{}", enc(reference))).await?;
                let resp = self
                    .http
                    .get(format!("{}/images/{}/content", self.base, enc(reference)))
                    .bearer_auth(&self.token)
                    .send()
                    .await
                    .with_context(|| format!("cannot reach the hub at {}", self.base))?;
                if !resp.status().is_success() {
                    bail!("download refused ({})", resp.status());
                }
                let bytes = resp.bytes().await?;
                let path = out.clone().unwrap_or_else(|| {
                    PathBuf::from(format!(
                        "{}-{}.bin",
                        v["name"].as_str().unwrap_or("image"),
                        v["version"].as_str().unwrap_or("0.0.0")
                    ))
                });
                std::fs::write(&path, &bytes)
                    .with_context(|| format!("writing {}", path.display()))?;
                let done = json!({ "id": v["id"], "path": path, "bytes": bytes.len() });
                self.print(&done, |_| {
                    format!("Wrote {} bytes to {}", bytes.len(), path.display())
                });
            }
        }
        Ok(())
    }

    async fn product(&self, cmd: &ProductCmd) -> Result<()> {
        let show = |v: &Value| {
            let mut out = format!(
                "Product {} ({})\n  description: {}\n",
                v["name"].as_str().unwrap_or(""),
                v["id"].as_str().unwrap_or(""),
                v["description"].as_str().unwrap_or("")
            );
            out += &groups_table(v["groups"].as_array().map(Vec::as_slice).unwrap_or(&[]));
            out
        };
        match cmd {
            ProductCmd::Create {
                name,
                description,
                no_default_groups,
            } => {
                let body = json!({
                    "name": name,
                    "description": description,
                    "noDefaultGroups": no_default_groups,
                });
                let v = self
                    .call(reqwest::Method::POST, "/products", Some(body))
                    .await?;
                self.print(&v, show);
            }
            ProductCmd::List => {
                let v = self.get("/products").await?;
                self.print(&v, |v| {
                    let mut out =
                        format!("{:<36} {:<30} {:>6}  DESCRIPTION", "ID", "NAME", "GROUPS");
                    for p in v["items"].as_array().into_iter().flatten() {
                        out += &format!(
                            "\n{:<36} {:<30} {:>6}  {}",
                            p["id"].as_str().unwrap_or(""),
                            p["name"].as_str().unwrap_or(""),
                            p["groups"].as_array().map(Vec::len).unwrap_or(0),
                            p["description"].as_str().unwrap_or("")
                        );
                    }
                    out
                });
            }
            ProductCmd::Show { name } => {
                let v = self.get(&format!("/products/{}", enc(name))).await?;
                self.print(&v, show);
            }
            ProductCmd::Update {
                name,
                new_name,
                description,
            } => {
                let body = with_given(
                    json!({}),
                    [
                        ("name", new_name.as_ref().map(|n| json!(n))),
                        ("description", description.as_ref().map(|d| json!(d))),
                    ],
                );
                let v = self
                    .call(
                        reqwest::Method::PATCH,
                        &format!("/products/{}", enc(name)),
                        Some(body),
                    )
                    .await?;
                self.print(&v, show);
            }
            ProductCmd::Delete { name } => {
                self.delete(&format!("/products/{}", enc(name)), "product", name)
                    .await?
            }
        }
        Ok(())
    }

    async fn device_group(&self, cmd: &DeviceGroupCmd) -> Result<()> {
        let show = |v: &Value| {
            let mut out = groups_table(std::slice::from_ref(v));
            if let Some(ids) = v["deviceIds"].as_array() {
                for id in ids {
                    out += &format!("\n  {}", id.as_str().unwrap_or(""));
                }
            }
            out
        };
        let settings = |body: Value, updates: &Option<OnOff>, feed: &Option<Feed>| {
            with_given(
                body,
                [
                    ("applicationUpdates", updates.map(|u| json!(u == OnOff::On))),
                    ("osFeed", feed.map(|f| json!(f.api()))),
                ],
            )
        };
        match cmd {
            DeviceGroupCmd::Create {
                path,
                description,
                application_updates,
                os_feed,
            } => {
                let (product, group) = path
                    .split_once('/')
                    .with_context(|| format!("'{path}': name a group as \"Product/Group\""))?;
                let body = with_given(
                    json!({ "name": group }),
                    [("description", description.as_ref().map(|d| json!(d)))],
                );
                let body = settings(body, application_updates, os_feed);
                let v = self
                    .call(
                        reqwest::Method::POST,
                        &format!("/products/{}/groups", enc(product)),
                        Some(body),
                    )
                    .await?;
                self.print(&v, show);
            }
            DeviceGroupCmd::List { product } => {
                let path = match product {
                    Some(p) => format!("/products/{}/groups", enc(p)),
                    None => "/device-groups".to_string(),
                };
                let v = self.get(&path).await?;
                self.print(&v, |v| {
                    groups_table(v["items"].as_array().map(Vec::as_slice).unwrap_or(&[]))
                });
            }
            DeviceGroupCmd::Show { path } => {
                let v = self.get(&group_path(path)?).await?;
                self.print(&v, show);
            }
            DeviceGroupCmd::Update {
                path,
                new_name,
                description,
                application_updates,
                os_feed,
            } => {
                let body = with_given(
                    json!({}),
                    [
                        ("name", new_name.as_ref().map(|n| json!(n))),
                        ("description", description.as_ref().map(|d| json!(d))),
                    ],
                );
                let body = settings(body, application_updates, os_feed);
                let v = self
                    .call(reqwest::Method::PATCH, &group_path(path)?, Some(body))
                    .await?;
                self.print(&v, show);
            }
            DeviceGroupCmd::Deployment(cmd) => {
                let row = |d: &Value| {
                    let images: Vec<String> = d["resolved"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|i| {
                            format!(
                                "{}:{}",
                                i["name"].as_str().unwrap_or(""),
                                i["version"].as_str().unwrap_or("")
                            )
                        })
                        .collect();
                    format!(
                        "{:<36} {:<24} {:<7} {}",
                        d["id"].as_str().unwrap_or(""),
                        d["createdTime"].as_str().unwrap_or(""),
                        if d["current"] == true { "current" } else { "" },
                        images.join(", ")
                    )
                };
                match cmd {
                    GroupDeploymentCmd::Create { path, images } => {
                        let v = self
                            .call(
                                reqwest::Method::POST,
                                &format!("{}/deployments", group_path(path)?),
                                Some(json!({ "images": images })),
                            )
                            .await?;
                        self.print(&v, |v| {
                            format!(
                                "Deployed to {} ({} device twin(s) updated)\n{}",
                                v["deviceGroup"].as_str().unwrap_or(""),
                                v["devicesUpdated"],
                                row(v)
                            )
                        });
                    }
                    GroupDeploymentCmd::List { path } => {
                        let v = self
                            .get(&format!("{}/deployments", group_path(path)?))
                            .await?;
                        self.print(&v, |v| {
                            let mut out =
                                format!("{:<36} {:<24} {:<7} IMAGES", "ID", "CREATED", "");
                            for d in v["items"].as_array().into_iter().flatten() {
                                out += &format!("\n{}", row(d));
                            }
                            out
                        });
                    }
                }
            }
            DeviceGroupCmd::Delete { path } => {
                self.delete(&group_path(path)?, "device group", path)
                    .await?
            }
        }
        Ok(())
    }

    async fn device(&self, cmd: &DeviceCmd) -> Result<()> {
        match cmd {
            DeviceCmd::Create {
                id,
                status,
                edge,
                keys,
            } => {
                let body = with_given(
                    json!({ "deviceId": id }),
                    [
                        ("capabilities", edge.then(|| json!({ "iotEdge": true }))),
                        ("status", status.as_ref().map(|s| json!(s))),
                        ("authentication", keys_json(keys)),
                    ],
                );
                let v = self
                    .call(reqwest::Method::POST, "/devices", Some(body))
                    .await?;
                let v = self.with_connection_string(v).await?;
                self.print_identity("Created", &v);
            }
            DeviceCmd::Show { id } => {
                let v = self.get(&format!("/devices/{}", enc(id))).await?;
                let v = self.with_connection_string(v).await?;
                self.print_identity("Device", &v);
            }
            DeviceCmd::List { limit, after, all } => {
                let mut items = Vec::new();
                let mut after = after.clone();
                loop {
                    let mut path = format!("/devices?limit={limit}");
                    if let Some(a) = &after {
                        path += &format!("&after={}", enc(a));
                    }
                    let page = self.get(&path).await?;
                    items.extend(page["items"].as_array().cloned().unwrap_or_default());
                    after = page["next"].as_str().map(str::to_string);
                    if *all && after.is_some() {
                        if self.output == Output::Text {
                            eprintln!("… {} devices so far", items.len());
                        }
                        continue;
                    }
                    break;
                }
                let v = json!({ "items": items, "next": after });
                self.print(&v, |v| {
                    let mut out = format!(
                        "{:<40} {:<9} {:<13} LAST ACTIVITY",
                        "DEVICE", "STATUS", "CONNECTION"
                    );
                    for d in v["items"].as_array().into_iter().flatten() {
                        out += &format!(
                            "\n{:<40} {:<9} {:<13} {}",
                            d["deviceId"].as_str().unwrap_or(""),
                            d["status"].as_str().unwrap_or(""),
                            d["connectionState"].as_str().unwrap_or(""),
                            d["lastActivityTime"].as_str().unwrap_or("-")
                        );
                    }
                    if let Some(n) = v["next"].as_str() {
                        out += &format!("\n(more: --after {n})");
                    }
                    out
                });
            }
            DeviceCmd::Update {
                id,
                status,
                status_reason,
                device_group,
                keys,
            } => {
                let body = with_given(
                    json!({}),
                    [
                        ("deviceGroup", device_group.as_ref().map(|g| json!(g))),
                        ("status", status.as_ref().map(|s| json!(s))),
                        ("statusReason", status_reason.as_ref().map(|r| json!(r))),
                        ("authentication", keys_json(keys)),
                    ],
                );
                let v = self
                    .call(
                        reqwest::Method::PATCH,
                        &format!("/devices/{}", enc(id)),
                        Some(body),
                    )
                    .await?;
                self.print_identity("Updated", &v);
            }
            DeviceCmd::Delete { id } => {
                self.delete(&format!("/devices/{}", enc(id)), "device", id)
                    .await?
            }
        }
        Ok(())
    }

    async fn module(&self, cmd: &ModuleCmd) -> Result<()> {
        match cmd {
            ModuleCmd::Create {
                device,
                module,
                keys,
            } => {
                let body = with_given(
                    json!({ "moduleId": module }),
                    [("authentication", keys_json(keys))],
                );
                let v = self
                    .call(
                        reqwest::Method::POST,
                        &format!("/devices/{}/modules", enc(device)),
                        Some(body),
                    )
                    .await?;
                let v = self.with_connection_string(v).await?;
                self.print_identity("Created", &v);
            }
            ModuleCmd::Show { device, module } => {
                let v = self
                    .get(&format!("/devices/{}/modules/{}", enc(device), enc(module)))
                    .await?;
                let v = self.with_connection_string(v).await?;
                self.print_identity("Module", &v);
            }
            ModuleCmd::List { device } => {
                let v = self
                    .get(&format!("/devices/{}/modules", enc(device)))
                    .await?;
                self.print(&v, |v| {
                    let mut out = format!("{:<40} {:<9} CONNECTION", "MODULE", "STATUS");
                    for m in v["items"].as_array().into_iter().flatten() {
                        out += &format!(
                            "\n{:<40} {:<9} {}",
                            m["moduleId"].as_str().unwrap_or(""),
                            m["status"].as_str().unwrap_or(""),
                            m["connectionState"].as_str().unwrap_or("")
                        );
                    }
                    out
                });
            }
            ModuleCmd::Delete { device, module } => {
                let path = format!("/devices/{}/modules/{}", enc(device), enc(module));
                self.delete(&path, "module", &format!("{device}/{module}"))
                    .await?
            }
        }
        Ok(())
    }

    async fn twin(&self, cmd: &TwinCmd) -> Result<()> {
        let path = |device: &str, module: &Option<String>| match module {
            Some(m) => format!("/twins/{}/modules/{}", enc(device), enc(m)),
            None => format!("/twins/{}", enc(device)),
        };
        let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
        match cmd {
            TwinCmd::Show { device, module } => {
                let v = self.get(&path(device, module)).await?;
                self.print(&v, pretty);
            }
            TwinCmd::Update {
                device,
                module,
                desired,
                tags,
                etag,
            } => {
                let desired = json_flag(desired, "--desired")?;
                let body = with_given(
                    json!({}),
                    [
                        ("properties", desired.map(|d| json!({ "desired": d }))),
                        ("tags", json_flag(tags, "--tags")?),
                    ],
                );
                if body.as_object().is_some_and(|o| o.is_empty()) {
                    bail!("nothing to update: give --desired and/or --tags");
                }
                let url = format!("{}{}", self.base, path(device, module));
                let mut req = self.http.patch(&url).bearer_auth(&self.token).json(&body);
                if let Some(e) = etag {
                    req = req.header("If-Match", e.as_str());
                }
                let resp = req
                    .send()
                    .await
                    .with_context(|| format!("cannot reach the hub at {}", self.base))?;
                let status = resp.status();
                let v: Value = resp.json().await.unwrap_or(Value::Null);
                if !status.is_success() {
                    bail!(
                        "{} ({})",
                        v["message"].as_str().unwrap_or("request failed"),
                        status
                    );
                }
                self.print(&v, pretty);
            }
            TwinCmd::Query { query } => {
                let v = self
                    .call(
                        reqwest::Method::POST,
                        "/twins/query",
                        Some(json!({ "query": query })),
                    )
                    .await?;
                self.print(&v, pretty);
            }
        }
        Ok(())
    }

    async fn sas_token(
        &self,
        device: &str,
        module: Option<&str>,
        duration: &str,
        key: KeyChoice,
    ) -> Result<()> {
        let duration = parse_duration(duration)?;
        let path = match module {
            Some(m) => format!("/devices/{}/modules/{}", enc(device), enc(m)),
            None => format!("/devices/{}", enc(device)),
        };
        let record = self.get(&path).await?;
        let field = match key {
            KeyChoice::Primary => "primaryKey",
            KeyChoice::Secondary => "secondaryKey",
        };
        let key_b64 = record["authentication"]["symmetricKey"][field]
            .as_str()
            .context("the hub returned no key")?;
        let host = self.hostname().await?;
        let identity = crate::identity::IdentityKey::parse(&match module {
            Some(m) => format!("{device}/{m}"),
            None => device.to_string(),
        })?;
        let expiry = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + duration.as_secs();
        let resource = crate::sas::resource_for(&host, &identity);
        let token = crate::sas::generate(&resource, key_b64, expiry)?;
        let username = format!("{host}/{identity}/?api-version=2021-04-12");
        let v = json!({ "sasToken": token, "expiry": expiry, "clientId": identity.to_string(), "username": username });
        self.print(&v, |v| {
            v["sasToken"].as_str().unwrap_or_default().to_string()
        });
        Ok(())
    }

    async fn monitor(
        &self,
        device: Option<&str>,
        module: Option<&str>,
        mqtt: Option<&str>,
        timeout: Option<&str>,
        count: Option<u64>,
    ) -> Result<()> {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        let addr = match mqtt {
            Some(a) => a.to_string(),
            None => {
                let info = self.get("/hub").await?;
                info["endpoints"]["mqtt"]
                    .as_str()
                    .context("the hub has no plain MQTT listener; pass --mqtt")?
                    .to_string()
            }
        };
        let (host, port) = addr.rsplit_once(':').context("--mqtt must be host:port")?;
        let port: u16 = port.parse().context("--mqtt port")?;
        let client_id = format!("monitor-{:08x}", rand::random::<u32>());
        let mut options = MqttOptions::new(client_id, host.trim_matches(['[', ']']), port);
        options.set_credentials(crate::mqtt::SERVICE_USERNAME, self.token.clone());
        options.set_max_packet_size(1024 * 1024, 1024 * 1024);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = AsyncClient::new(options, 100);
        let filter = match (device, module) {
            (Some(d), Some(m)) => format!(
                "$fleethub/events/{}/{}/#",
                crate::topics::encode_id(d),
                crate::topics::encode_id(m)
            ),
            (Some(d), None) => format!("$fleethub/events/{}/#", crate::topics::encode_id(d)),
            _ => "$fleethub/events/#".to_string(),
        };
        client.subscribe(filter, QoS::AtLeastOnce).await?;
        let deadline = timeout
            .map(parse_duration)
            .transpose()?
            .map(|d| tokio::time::Instant::now() + d);
        let mut seen = 0u64;
        if self.output == Output::Text {
            eprintln!("Monitoring telemetry at {addr}. Press Ctrl+C to stop.");
        }
        loop {
            if count.is_some_and(|c| seen >= c) {
                break;
            }
            let next = async {
                match deadline {
                    Some(d) => tokio::time::timeout_at(d, events.poll()).await.ok(),
                    None => Some(events.poll().await),
                }
            };
            let event = tokio::select! {
                e = next => e,
                _ = tokio::signal::ctrl_c() => None,
            };
            match event {
                None => break,
                Some(Ok(Event::Incoming(Packet::ConnAck(ack))))
                    if ack.code != rumqttc::ConnectReturnCode::Success =>
                {
                    bail!("the hub refused the monitor connection: {:?}", ack.code)
                }
                Some(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        bail!("the hub refused the telemetry subscription");
                    }
                }
                Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    if let Some(event) = describe_event(&p.topic, &p.payload) {
                        seen += 1;
                        match self.output {
                            Output::Json => println!("{}", event),
                            Output::Text => println!(
                                "{}",
                                serde_json::to_string_pretty(&json!({ "event": event }))
                                    .unwrap_or_default()
                            ),
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("connection to {addr} failed: {e}"),
            }
        }
        let _ = client.disconnect().await;
        Ok(())
    }
}

/// Turns a `$fleethub/events/{d}/{m}/{bag}` delivery into the event JSON printed.
pub fn describe_event(topic: &str, payload: &[u8]) -> Option<Value> {
    use percent_encoding::percent_decode_str;
    let rest = topic.strip_prefix(crate::topics::SERVICE_EVENTS_PREFIX)?;
    let mut parts = rest.splitn(3, '/');
    let device = percent_decode_str(parts.next()?)
        .decode_utf8()
        .ok()?
        .into_owned();
    let module = parts.next()?;
    let module = (module != crate::topics::NO_MODULE)
        .then(|| percent_decode_str(module).decode_utf8_lossy().into_owned());
    let bag = parts.next().unwrap_or("");
    let message =
        fleethub_router::Message::from_bag(bag, bytes::Bytes::copy_from_slice(payload)).ok()?;
    let body = match std::str::from_utf8(payload) {
        Ok(s) => serde_json::from_str::<Value>(s).unwrap_or_else(|_| Value::String(s.to_string())),
        Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(payload) }),
    };
    let system: serde_json::Map<String, Value> = message
        .system
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let application: serde_json::Map<String, Value> = message
        .properties
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    Some(json!({
        "origin": device,
        "module": module.unwrap_or_default(),
        "payload": body,
        "properties": { "system": system, "application": application },
    }))
}

fn keys_json(keys: &KeyArgs) -> Option<Value> {
    if keys.primary_key.is_none() && keys.secondary_key.is_none() {
        return None;
    }
    let mut k = json!({});
    if let Some(p) = &keys.primary_key {
        k["primaryKey"] = json!(p);
    }
    if let Some(s) = &keys.secondary_key {
        k["secondaryKey"] = json!(s);
    }
    Some(json!({ "type": "sas", "symmetricKey": k }))
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn read_endpoints(data_dir: &std::path::Path) -> Option<Endpoints> {
    let text = std::fs::read_to_string(data_dir.join(ENDPOINTS_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}
