//! The `fleethub` command line: `serve` runs the hub; every other verb is a client of the
//! management API through [`crate::client::ApiClient`] (and `monitor-events` of the
//! MQTT service connection).
//!
//! One file per verb group, each owning its clap command enum and its `run`:
//! `identity` (devices, modules, SAS tokens), `twin`, `message` (direct methods and
//! C2D), `route` (routes and queues), `fleet` (products, device groups and their
//! deployments), `image`, `deployment` (targeted deployments), `monitor`.

mod ca;
mod cluster;
mod consumer_group;
mod deployment;
mod enrollment;
mod fleet;
pub mod fuzz;
mod identity;
mod image;
mod message;
mod monitor;
mod route;
mod store;
mod twin;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::client::ApiClient;
use crate::config::{Config, Overrides};
use crate::data_dir::{ADMIN_TOKEN_FILE, ENDPOINTS_FILE};
use crate::hub::Endpoints;

pub use monitor::describe_event;

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
    Device(identity::DeviceCmd),
    /// Modules (deviceId/moduleId identities)
    #[command(subcommand)]
    Module(identity::ModuleCmd),
    /// Device and module twins
    #[command(subcommand)]
    Twin(twin::TwinCmd),
    /// Direct methods
    #[command(subcommand)]
    Method(message::MethodCmd),
    /// Cloud-to-device messages
    #[command(subcommand)]
    C2d(message::C2dCmd),
    /// Routes: the table in force, and checking an expression
    #[command(subcommand)]
    Route(route::RouteCmd),
    /// Store-and-forward queues, one per sink
    #[command(subcommand)]
    Queue(route::QueueCmd),
    /// Products: what kind of device (Azure Sphere); each has device groups
    #[command(subcommand)]
    Product(fleet::ProductCmd),
    /// Device groups of a product, named "Product/Group"
    #[command(subcommand)]
    DeviceGroup(fleet::DeviceGroupCmd),
    /// Image packages (applications, board configurations) that deployments hand out
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// CA certificates for X.509 CA-signed devices
    #[command(subcommand)]
    Ca(ca::CaCmd),
    /// Provisioning enrollments: who may register themselves (DPS, symmetric keys)
    #[command(subcommand)]
    Enrollment(enrollment::EnrollmentCmd),
    /// Targeted and layered deployments (IoT Edge deployment manifests), with rollouts
    #[command(subcommand)]
    Deployment(deployment::DeploymentCmd),
    /// Print a SAS token for a device or module (the MQTT password)
    SasToken(identity::SasTokenArgs),
    /// Print telemetry: live as it arrives, or the events endpoint through a consumer group
    /// (like `az iot hub monitor-events`)
    MonitorEvents(monitor::MonitorArgs),
    /// The events endpoint's consumer groups
    #[command(subcommand)]
    ConsumerGroup(consumer_group::ConsumerGroupCmd),
    /// The hub's stores, offline (the hub stopped)
    #[command(subcommand)]
    Store(store::StoreCmd),
    /// Copy the running hub's data directory (registry, twins, fleet, deployments, queues,
    /// token, TLS files, images) into DIR; start a hub on DIR to restore it
    Backup { dir: PathBuf },
    /// Fuzz every parser that takes outside input (for developers)
    Fuzz(fuzz::FuzzArgs),
    /// The cluster: nodes, leader, connections per node, the shared PostgreSQL
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Exit 0 when the hub answers ready on /health (for supervisors and container
    /// health checks; needs no token)
    Health,
}

#[derive(Args, Debug, Default, Clone)]
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
    /// MQTT over WebSockets over TLS (the SDKs' websockets=True, path /$iothub/websocket)
    /// listen address, or "off"; the SDKs dial port 443
    #[arg(long)]
    pub wss: Option<String>,
    /// HTTP API and /metrics listen address
    #[arg(long)]
    pub api: Option<String>,
    /// Log format [default: [log] format of the config, "text"]
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// Entry point of the binary.
pub fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match &cli.command {
        None => runtime.block_on(serve(&cli.data_dir, ServeArgs::default())),
        Some(Command::Serve(args)) => runtime.block_on(serve(&cli.data_dir, args.clone())),
        // Offline: needs no running hub, no token.
        Some(Command::Store(cmd)) => cmd.run(&cli.data_dir, cli.output),
        Some(Command::Fuzz(args)) => args.run(),
        Some(Command::Health) => runtime.block_on(health(&cli)),
        Some(command) => {
            let ctx = Ctx::new(&cli)?;
            runtime.block_on(run(command, &ctx))
        }
    }
}

async fn serve(data_dir: &Option<PathBuf>, args: ServeArgs) -> Result<()> {
    let overrides = Overrides {
        data_dir: data_dir.clone(),
        mqtt: args.mqtt,
        mqtts: args.mqtts,
        wss: args.wss,
        api: args.api,
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    let set_log_level = init_logs(&config.log, args.log_format);
    let path = args.config.clone();
    let reload = crate::server::Reload {
        load: Box::new(move || Config::load(path.as_deref(), &overrides)),
        set_log_level,
    };
    crate::server::run_with_reload(config, Some(reload), crate::server::signal()).await?;
    Ok(())
}

/// Logs to stdout: text (colour only on a terminal: a file, a pipe or journald gets plain
/// lines) or one JSON object per line with level, target, message and the span's fields.
/// `RUST_LOG` overrides `[log] level`.
/// Returns how to change the filter later (a configuration reload).
fn init_logs(
    log: &crate::config::LogSection,
    format: Option<LogFormat>,
) -> crate::server::SetLogLevel {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| log.level.as_str().into());
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let json = match format {
        Some(f) => f == LogFormat::Json,
        None => log.format == "json",
    };
    let json_layer = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
    });
    let text_layer = (!json)
        .then(|| tracing_subscriber::fmt::layer().with_ansi(std::io::stdout().is_terminal()));
    tracing_subscriber::registry()
        .with(filter)
        .with(json_layer)
        .with(text_layer)
        .init();
    Box::new(move |level: &str| {
        let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Hands a client verb to its group.
async fn run(command: &Command, ctx: &Ctx) -> Result<()> {
    match command {
        Command::Serve(_) | Command::Store(_) | Command::Fuzz(_) | Command::Health => {
            unreachable!("serve and store run without a client")
        }
        Command::Device(cmd) => cmd.run(ctx).await,
        Command::Module(cmd) => cmd.run(ctx).await,
        Command::Twin(cmd) => cmd.run(ctx).await,
        Command::Method(cmd) => cmd.run(ctx).await,
        Command::C2d(cmd) => cmd.run(ctx).await,
        Command::Route(cmd) => cmd.run(ctx).await,
        Command::Queue(cmd) => cmd.run(ctx).await,
        Command::Product(cmd) => cmd.run(ctx).await,
        Command::DeviceGroup(cmd) => cmd.run(ctx).await,
        Command::Image(cmd) => cmd.run(ctx).await,
        Command::Ca(cmd) => cmd.run(ctx).await,
        Command::Enrollment(cmd) => cmd.run(ctx).await,
        Command::Deployment(cmd) => cmd.run(ctx).await,
        Command::SasToken(args) => args.run(ctx).await,
        Command::MonitorEvents(args) => args.run(ctx).await,
        Command::ConsumerGroup(cmd) => cmd.run(ctx).await,
        Command::Cluster(cmd) => cmd.run(ctx).await,
        Command::Backup { dir } => {
            let dir = std::path::absolute(dir).context("the backup directory")?;
            ctx.progress(&format!("backing up to {} …", dir.display()));
            let report = ctx.api.backup(&dir).await?;
            ctx.print(&report, |r| {
                let rows: u64 = r.tables.values().sum();
                format!(
                    "Backed up to {}: {rows} rows in {} tables, {} queued messages, {} retained events, {} files. Restore: fleethub --data-dir {} serve",
                    r.dir.display(),
                    r.tables.len(),
                    r.queued_entries,
                    r.events_entries,
                    r.files,
                    r.dir.display()
                )
            });
            Ok(())
        }
    }
}

/// What every client verb works with: the API client, the admin token (the monitor's MQTT
/// password) and the output format.
pub struct Ctx {
    pub api: ApiClient,
    pub token: String,
    pub output: Output,
}

impl Ctx {
    fn new(cli: &Cli) -> Result<Ctx> {
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
                        format!(
                            "no --token given and cannot read {} (set FLEETHUB_TOKEN or --data-dir)",
                            path.display()
                        )
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
        Ok(Ctx {
            api: ApiClient::new(&base, &token),
            token,
            output: cli.output,
        })
    }

    /// Prints `value` as JSON, or `text` of it.
    pub fn print<T: Serialize>(&self, value: &T, text: impl FnOnce(&T) -> String) {
        match self.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_default()
            ),
            Output::Text => println!("{}", text(value)),
        }
    }

    /// `{"deleted": name}` or "Deleted {what} {name}".
    pub fn deleted(&self, what: &str, name: &str) {
        self.print(&serde_json::json!({ "deleted": name }), |_| {
            format!("Deleted {what} {name}")
        });
    }

    /// Progress for an operator watching a long command (never in JSON output).
    pub fn progress(&self, line: &str) {
        if self.output == Output::Text {
            eprintln!("{line}");
        }
    }
}

/// `GET /health` of the hub at `--url` or the data directory's endpoints.
async fn health(cli: &Cli) -> Result<()> {
    let data_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("./fleethub-data"));
    let base = match &cli.url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => match read_endpoints(&data_dir) {
            Some(e) => format!("http://{}", e.api),
            None => anyhow::bail!(
                "no running hub: {} has no endpoints.json",
                data_dir.display()
            ),
        },
    };
    let resp = reqwest::Client::new()
        .get(format!("{base}/health"))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .with_context(|| format!("cannot reach the hub at {base}"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    println!("{body}");
    if !status.is_success() {
        anyhow::bail!("not ready ({status})");
    }
    Ok(())
}

fn parse_duration(s: &str) -> Result<Duration> {
    humantime::parse_duration(s)
        .with_context(|| format!("'{s}' is not a duration (try 30s, 1h, 7d)"))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {what} {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{what} {} is not valid: ", path.display()))
}

fn parse_json_arg<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    serde_json::from_str(text).with_context(|| format!("{what} is not valid JSON for it: {text}"))
}

fn read_endpoints(data_dir: &Path) -> Option<Endpoints> {
    let text = std::fs::read_to_string(data_dir.join(ENDPOINTS_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}
