//! Scenario files (`config/scenarios/*.toml`): what a simulated fleet is and does.
//!
//! A scenario is read once and checked whole before anything connects, so a typo in a body
//! generator or a duration is an error naming the field, not a surprise an hour into a load
//! test. Command-line flags override the fleet size, rate and duration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rand::Rng;
use serde::Deserialize;
use serde_json::{Map, Value};

/// A scenario as written in its file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub fleet: Fleet,
    #[serde(default)]
    pub telemetry: Telemetry,
    #[serde(default)]
    pub desired: Desired,
    /// Modules of the hub's own identity that device-sim plays (route sinks and sources).
    #[serde(default)]
    pub hub_modules: Vec<HubModule>,
    /// Routes installed in the hub's `$edgeHub` twin before the run (name → expression).
    #[serde(default)]
    pub routes: BTreeMap<String, String>,
    /// device-sim plays the hub's upstream broker, behind a link it can cut.
    pub upstream: Option<UpstreamSim>,
    /// Targeted deployments device-sim creates mid-run (and measures).
    #[serde(default)]
    pub deployment: Vec<DeploymentPush>,
}

/// A deployment as `POST /deployments` takes it, created at `at`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentPush {
    pub at: String,
    pub id: String,
    pub target_condition: String,
    #[serde(default)]
    pub priority: u32,
    /// `{ deviceContent = { … } }` or `{ modulesContent = { … } }`.
    pub content: toml::Value,
    /// `{ phases = [1, 10, 100], successThreshold = 95, failureThreshold = 5, observeSecs = 10 }`
    pub rollout: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    #[serde(default = "Fleet::default_devices")]
    pub devices: usize,
    #[serde(default)]
    pub modules_per_device: usize,
    /// Device ids are `{id_prefix}{n}`, n from 0, so reruns reuse the same identities.
    #[serde(default = "Fleet::default_prefix")]
    pub id_prefix: String,
    /// New connections per second while the fleet connects.
    #[serde(default = "Fleet::default_connect_rate")]
    pub connect_rate: f64,
    /// Answer direct methods.
    #[serde(default = "yes")]
    pub methods: bool,
    /// Fetch the twin at connect and apply desired properties as they arrive.
    #[serde(default = "yes")]
    pub twin: bool,
    /// Subscribe to cloud-to-device messages and count them.
    #[serde(default)]
    pub c2d: bool,
    /// Count the fleet's telemetry at the hub's service endpoint (`$fleethub/events`).
    #[serde(default = "yes")]
    pub monitor: bool,
}

fn yes() -> bool {
    true
}

impl Fleet {
    fn default_devices() -> usize {
        10
    }
    fn default_prefix() -> String {
        "sim-".into()
    }
    fn default_connect_rate() -> f64 {
        500.0
    }
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet {
            devices: Fleet::default_devices(),
            modules_per_device: 0,
            id_prefix: Fleet::default_prefix(),
            connect_rate: Fleet::default_connect_rate(),
            methods: true,
            twin: true,
            c2d: false,
            monitor: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    /// Messages per second per device (and per device module): `"2/s"`, `"30/min"`, `"0.5"`.
    #[serde(default = "Telemetry::default_rate")]
    pub rate: String,
    /// How long each device sends: `"30s"`, `"5m"`.
    #[serde(default = "Telemetry::default_duration")]
    pub duration: String,
    #[serde(default = "Telemetry::default_qos")]
    pub qos: u8,
    /// The output device modules publish on (`$.on`).
    #[serde(default = "Telemetry::default_output")]
    pub output: String,
    /// Application properties of every message.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// The JSON body template (see [`Template`]).
    #[serde(default = "Telemetry::default_body")]
    pub body: toml::Value,
}

impl Telemetry {
    fn default_rate() -> String {
        "1/s".into()
    }
    fn default_duration() -> String {
        "10s".into()
    }
    fn default_qos() -> u8 {
        1
    }
    fn default_output() -> String {
        "telemetry".into()
    }
    fn default_body() -> toml::Value {
        toml::Value::Table(toml::map::Map::from_iter([(
            "seq".to_string(),
            toml::Value::Table(toml::map::Map::from_iter([(
                "$counter".to_string(),
                toml::Value::Table(Default::default()),
            )])),
        )]))
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            rate: Telemetry::default_rate(),
            duration: Telemetry::default_duration(),
            qos: Telemetry::default_qos(),
            output: Telemetry::default_output(),
            properties: BTreeMap::new(),
            body: Telemetry::default_body(),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Desired {
    /// How long a device takes to apply a desired change before it reports.
    #[serde(default)]
    pub apply_delay: Option<String>,
    /// Percent of applications that report failure (`lastDesiredStatus.code` 500). Which
    /// device fails is a hash of its id and the desired version, so a rerun fails the same ones.
    #[serde(default)]
    pub failure_percent: f64,
    /// Desired patches device-sim sends to every simulated device through the API mid-run.
    #[serde(default)]
    pub push: Vec<DesiredPush>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredPush {
    /// When, from the start of telemetry.
    pub at: String,
    pub properties: toml::Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubModule {
    pub id: String,
    /// Republish every message arriving on an input on this output, properties kept.
    pub forward_to: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSim {
    /// Where the hub's `[upstream] address` points. device-sim listens here and relays to a
    /// broker of its own, counting what arrives.
    pub listen: String,
    #[serde(default)]
    pub outage: Vec<Outage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    pub at: String,
    #[serde(rename = "for")]
    pub lasts: String,
}

/// What the command line may override.
#[derive(Debug, Default)]
pub struct Overrides {
    pub devices: Option<usize>,
    pub modules_per_device: Option<usize>,
    pub rate: Option<String>,
    pub duration: Option<String>,
    pub upstream_listen: Option<String>,
}

/// A scenario checked whole: durations parsed, the body template compiled.
#[derive(Debug)]
pub struct Plan {
    pub name: String,
    pub description: String,
    pub devices: usize,
    pub modules_per_device: usize,
    pub id_prefix: String,
    pub connect_rate: f64,
    pub methods: bool,
    pub twin: bool,
    pub c2d: bool,
    pub monitor: bool,
    /// Messages per second per sending identity.
    pub rate: f64,
    pub duration: Duration,
    pub qos: u8,
    pub output: String,
    pub properties: Vec<(String, String)>,
    pub body: Template,
    pub apply_delay: Duration,
    pub failure_percent: f64,
    pub pushes: Vec<(Duration, Value)>,
    /// (when, deployment id, the `POST /deployments` body).
    pub deployments: Vec<(Duration, String, Value)>,
    pub hub_modules: Vec<(String, Option<String>)>,
    pub routes: BTreeMap<String, String>,
    pub upstream: Option<(SocketAddr, Vec<(Duration, Duration)>)>,
}

impl Plan {
    /// Messages each sending identity publishes: `rate × duration`, at least one.
    pub fn messages_per_sender(&self) -> u64 {
        ((self.rate * self.duration.as_secs_f64()).round() as u64).max(1)
    }
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scenario {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("scenario {}", path.display()))
    }

    /// Checks everything and applies the command line's overrides.
    pub fn plan(self, o: &Overrides) -> Result<Plan> {
        let rate_text = o.rate.as_deref().unwrap_or(&self.telemetry.rate);
        let rate = parse_rate(rate_text).context("telemetry.rate")?;
        let duration_text = o.duration.as_deref().unwrap_or(&self.telemetry.duration);
        let duration = parse_duration(duration_text).context("telemetry.duration")?;
        if self.telemetry.qos > 1 {
            bail!("telemetry.qos: {} is not 0 or 1", self.telemetry.qos);
        }
        if self.fleet.connect_rate.is_nan() || self.fleet.connect_rate <= 0.0 {
            bail!("fleet.connect_rate: must be above 0");
        }
        if !(0.0..=100.0).contains(&self.desired.failure_percent) {
            bail!("desired.failure_percent: must be within 0..=100");
        }
        let body_json = serde_json::to_value(&self.telemetry.body)?;
        let body = Template::compile(&body_json, "telemetry.body")?;
        let apply_delay = match &self.desired.apply_delay {
            Some(d) => parse_duration(d).context("desired.apply_delay")?,
            None => Duration::ZERO,
        };
        let mut pushes = Vec::new();
        for (i, p) in self.desired.push.iter().enumerate() {
            let at = parse_duration(&p.at).with_context(|| format!("desired.push[{i}].at"))?;
            let props = serde_json::to_value(&p.properties)?;
            if !props.is_object() {
                bail!("desired.push[{i}].properties: must be a table");
            }
            pushes.push((at, props));
        }
        let mut deployments = Vec::new();
        for (i, d) in self.deployment.iter().enumerate() {
            let at = parse_duration(&d.at).with_context(|| format!("deployment[{i}].at"))?;
            let content = serde_json::to_value(&d.content)?;
            if !content.is_object() {
                bail!("deployment[{i}].content: must be a table");
            }
            let mut body = serde_json::json!({
                "id": d.id,
                "targetCondition": d.target_condition,
                "priority": d.priority,
                "content": { "content": content },
            });
            if let Some(r) = &d.rollout {
                body["rollout"] = serde_json::to_value(r)?;
            }
            deployments.push((at, d.id.clone(), body));
        }
        let hub_modules = self
            .hub_modules
            .into_iter()
            .map(|m| (m.id, m.forward_to))
            .collect();
        let upstream = match self.upstream {
            None => None,
            Some(u) => {
                let listen = o.upstream_listen.as_deref().unwrap_or(&u.listen);
                let addr: SocketAddr = listen
                    .parse()
                    .with_context(|| format!("upstream.listen: `{listen}` is not host:port"))?;
                let mut outages = Vec::new();
                for (i, out) in u.outage.iter().enumerate() {
                    let at = parse_duration(&out.at)
                        .with_context(|| format!("upstream.outage[{i}].at"))?;
                    let lasts = parse_duration(&out.lasts)
                        .with_context(|| format!("upstream.outage[{i}].for"))?;
                    outages.push((at, lasts));
                }
                Some((addr, outages))
            }
        };
        Ok(Plan {
            name: self.name,
            description: self.description,
            devices: o.devices.unwrap_or(self.fleet.devices),
            modules_per_device: o
                .modules_per_device
                .unwrap_or(self.fleet.modules_per_device),
            id_prefix: self.fleet.id_prefix,
            connect_rate: self.fleet.connect_rate,
            methods: self.fleet.methods,
            twin: self.fleet.twin,
            c2d: self.fleet.c2d,
            monitor: self.fleet.monitor,
            rate,
            duration,
            qos: self.telemetry.qos,
            output: self.telemetry.output,
            properties: self.telemetry.properties.into_iter().collect(),
            body,
            apply_delay,
            failure_percent: self.desired.failure_percent,
            pushes,
            deployments,
            hub_modules,
            routes: self.routes,
            upstream,
        })
    }
}

/// `"2/s"`, `"30/min"`, `"1/h"` or a bare number (per second).
pub fn parse_rate(text: &str) -> Result<f64> {
    let t = text.trim();
    let (number, per) = match t.split_once('/') {
        Some((n, unit)) => (
            n.trim(),
            match unit.trim() {
                "s" | "sec" => 1.0,
                "m" | "min" => 60.0,
                "h" => 3600.0,
                other => bail!("`{other}` is not a rate unit (s, min, h)"),
            },
        ),
        None => (t, 1.0),
    };
    let n: f64 = number
        .parse()
        .map_err(|_| anyhow!("`{text}` is not a rate like 2/s"))?;
    if n.is_nan() || n <= 0.0 || !n.is_finite() {
        bail!("`{text}`: the rate must be above 0");
    }
    Ok(n / per)
}

/// `"30s"`, `"5m"`, `"250ms"` (humantime), or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<f64>() {
        if secs >= 0.0 && secs.is_finite() {
            return Ok(Duration::from_secs_f64(secs));
        }
    }
    humantime::parse_duration(t).map_err(|e| anyhow!("`{text}` is not a duration: {e}"))
}

/// A JSON body template. Plain values are sent as written; a one-key table whose key starts
/// with `$` is a generator, evaluated per message with per-device state:
///
/// - `{ "$counter" = { start = 0, step = 1 } }`: 0, 1, 2, …
/// - `{ "$drift" = { start = 21.0, step = 0.5, min = 10.0, max = 40.0 } }`: a random walk.
/// - `{ "$random" = { min = 0, max = 100 } }`: uniform; integers when both bounds are.
/// - `{ "$choice" = ["ok", "warn"] }`: one of the values.
/// - the strings `"$deviceId"` and `"$now"` (RFC 3339).
#[derive(Debug, Clone)]
pub enum Template {
    Literal(Value),
    Object(Vec<(String, Template)>),
    Array(Vec<Template>),
    Counter {
        slot: usize,
        start: f64,
        step: f64,
    },
    Drift {
        slot: usize,
        start: f64,
        step: f64,
        min: f64,
        max: f64,
    },
    Random {
        min: f64,
        max: f64,
        integer: bool,
    },
    Choice(Vec<Value>),
    DeviceId,
    Now,
}

/// Per-device generator state (counters, drifting values), one slot per generator.
#[derive(Debug, Clone)]
pub struct TemplateState(Vec<f64>);

impl Template {
    pub fn compile(v: &Value, path: &str) -> Result<Template> {
        let mut slots = 0;
        Template::compile_at(v, path, &mut slots)
    }

    fn compile_at(v: &Value, path: &str, slots: &mut usize) -> Result<Template> {
        Ok(match v {
            Value::String(s) if s == "$deviceId" => Template::DeviceId,
            Value::String(s) if s == "$now" => Template::Now,
            Value::Object(map) if map.len() == 1 && map.keys().all(|k| k.starts_with('$')) => {
                let (key, arg) = map.iter().next().expect("one entry");
                Template::generator(key, arg, &format!("{path}.{key}"), slots)?
            }
            Value::Object(map) => Template::Object(
                map.iter()
                    .map(|(k, v)| {
                        Ok((
                            k.clone(),
                            Template::compile_at(v, &format!("{path}.{k}"), slots)?,
                        ))
                    })
                    .collect::<Result<_>>()?,
            ),
            Value::Array(items) => Template::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Template::compile_at(v, &format!("{path}[{i}]"), slots))
                    .collect::<Result<_>>()?,
            ),
            other => Template::Literal(other.clone()),
        })
    }

    fn generator(key: &str, arg: &Value, path: &str, slots: &mut usize) -> Result<Template> {
        let num = |name: &str, default: Option<f64>| -> Result<f64> {
            match arg.get(name) {
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| anyhow!("{path}.{name}: expected a number, found {v}")),
                None => default.ok_or_else(|| anyhow!("{path}: missing `{name}`")),
            }
        };
        let known = |allowed: &[&str]| -> Result<()> {
            match arg {
                Value::Object(m) => match m.keys().find(|k| !allowed.contains(&k.as_str())) {
                    Some(k) => bail!(
                        "{path}: unknown field `{k}` (expected {})",
                        allowed.join(", ")
                    ),
                    None => Ok(()),
                },
                other => bail!("{path}: expected a table, found {other}"),
            }
        };
        let mut next_slot = || {
            *slots += 1;
            *slots - 1
        };
        Ok(match key {
            "$counter" => {
                known(&["start", "step"])?;
                Template::Counter {
                    slot: next_slot(),
                    start: num("start", Some(0.0))?,
                    step: num("step", Some(1.0))?,
                }
            }
            "$drift" => {
                known(&["start", "step", "min", "max"])?;
                let (start, step) = (num("start", None)?, num("step", Some(1.0))?);
                let (min, max) = (num("min", Some(f64::MIN))?, num("max", Some(f64::MAX))?);
                if min > max || !(min..=max).contains(&start) {
                    bail!("{path}: need min <= start <= max");
                }
                // The walk draws from [-step, step]: that span must be a finite number.
                if !(step >= 0.0 && (step * 2.0).is_finite()) {
                    bail!("{path}.step: must be a finite number >= 0");
                }
                Template::Drift {
                    slot: next_slot(),
                    start,
                    step,
                    min,
                    max,
                }
            }
            "$random" => {
                known(&["min", "max"])?;
                let (min, max) = (num("min", None)?, num("max", None)?);
                if min > max {
                    bail!("{path}: min is above max");
                }
                if !(max - min).is_finite() {
                    bail!("{path}: max - min must be a finite number");
                }
                let integer = [arg.get("min"), arg.get("max")]
                    .iter()
                    .all(|v| v.is_some_and(|v| v.is_i64() || v.is_u64()));
                Template::Random { min, max, integer }
            }
            "$choice" => match arg {
                Value::Array(items) if !items.is_empty() => Template::Choice(items.clone()),
                _ => bail!("{path}: expected a non-empty list of values"),
            },
            other => bail!(
                "{path}: unknown generator `{other}` (expected $counter, $drift, $random or $choice)"
            ),
        })
    }

    /// Fresh state for one device.
    pub fn state(&self) -> TemplateState {
        let mut slots = Vec::new();
        self.init(&mut slots);
        TemplateState(slots)
    }

    fn init(&self, slots: &mut Vec<f64>) {
        match self {
            Template::Counter { slot, start, .. } | Template::Drift { slot, start, .. } => {
                if slots.len() <= *slot {
                    slots.resize(slot + 1, 0.0);
                }
                slots[*slot] = *start;
            }
            Template::Object(fields) => fields.iter().for_each(|(_, t)| t.init(slots)),
            Template::Array(items) => items.iter().for_each(|t| t.init(slots)),
            _ => {}
        }
    }

    /// The next body for `device`.
    pub fn render(&self, device: &str, state: &mut TemplateState, rng: &mut impl Rng) -> Value {
        match self {
            Template::Literal(v) => v.clone(),
            Template::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, t)| (k.clone(), t.render(device, state, rng)))
                    .collect::<Map<_, _>>(),
            ),
            Template::Array(items) => {
                Value::Array(items.iter().map(|t| t.render(device, state, rng)).collect())
            }
            Template::Counter { slot, step, .. } => {
                let v = state.0[*slot];
                state.0[*slot] += step;
                number(v)
            }
            Template::Drift {
                slot,
                step,
                min,
                max,
                ..
            } => {
                let v = state.0[*slot];
                let delta = if *step > 0.0 {
                    rng.gen_range(-step..=*step)
                } else {
                    0.0
                };
                state.0[*slot] = (v + delta).clamp(*min, *max);
                number((v * 100.0).round() / 100.0)
            }
            Template::Random { min, max, integer } => {
                if *integer {
                    Value::from(rng.gen_range(*min as i64..=*max as i64))
                } else if min == max {
                    number(*min)
                } else {
                    number(rng.gen_range(*min..*max))
                }
            }
            Template::Choice(items) => items[rng.gen_range(0..items.len())].clone(),
            Template::DeviceId => Value::String(device.to_string()),
            Template::Now => Value::String(
                humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            ),
        }
    }
}

/// Integral values print as integers (`3`, not `3.0`), which is what a hand-written body has.
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9e15 {
        Value::from(v as i64)
    } else {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

pub mod fuzz;
#[cfg(test)]
mod tests;
