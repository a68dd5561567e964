//! `device-sim bench`: one load, run against bare rumqttd and against fleethub in the same
//! process and the same run, printed side by side with the ratio.

use anyhow::Result;
use clap::{Args, ValueEnum};
use rumqttc::QoS;
use serde_json::json;

use crate::load::{self, LoadResult, LoadSpec};
use crate::targets::{self, Target};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Publishing devices (each its own MQTT connection)
    #[arg(long, default_value_t = 20)]
    devices: usize,
    /// Messages each device publishes
    #[arg(long, default_value_t = 5000)]
    messages: usize,
    /// Payload size in bytes
    #[arg(long, default_value_t = 200)]
    payload: usize,
    /// MQTT QoS of publishes and the subscription; a list runs each in turn ("0,1")
    #[arg(long, value_delimiter = ',', default_value = "1",
          value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: Vec<u8>,
    /// Idle connections each broker holds during the run; their broker-side memory is
    /// measured (RSS after they connect minus before, per connection)
    #[arg(long, default_value_t = 0)]
    hold: usize,
    /// Held clients connect with clean session 0 and subscribe like an SDK device (four
    /// topic families), so each broker keeps a persistent session per client
    #[arg(long)]
    sessions: bool,
    /// Which brokers to run: all (fleethub, rumqttd, and mosquitto when installed) or one
    #[arg(long, value_enum, default_value_t = Which::All)]
    target: Which,
    /// fleethub routes each message through a `$body` condition into a module input, which
    /// is the subscriber (bodies are JSON for every broker)
    #[arg(long)]
    routed: bool,
    /// Also measure fleethub draining a backlog: every message published and acknowledged
    /// first, then the events endpoint's $Default group read (a plain broker keeps nothing
    /// for a reader that was not there)
    #[arg(long)]
    backlog: bool,
    /// How fleethub's publishing devices connect, each in turn against the same hub: plain
    /// MQTT, MQTT over TLS, MQTT over WebSockets in TLS ("plain,tls,wss" runs all three);
    /// the baselines and the subscriber use plain MQTT
    #[arg(long, value_enum, value_delimiter = ',', default_value = "plain")]
    transports: Vec<targets::Transport>,
    /// Router log segment size in MiB (fleethub and rumqttd)
    #[arg(long, default_value_t = 32)]
    segment_mib: usize,
    /// Router log segments kept per filter (fleethub and rumqttd)
    #[arg(long, default_value_t = 4)]
    segments: usize,
    /// Repeat each measurement (`--pick` says which round is reported)
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Which round of `--rounds` to report: the best rate, or the median round (as the
    /// performance issue states its targets)
    #[arg(long, value_enum, default_value_t = Pick::Best)]
    pick: Pick,
    /// Also run each broker paced at this fraction of its own reported rate (0.5: half), for
    /// latency at a rate it sustains rather than under overload; shown as `{broker}-paced`
    #[arg(long)]
    paced: Option<f64>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// Which of several rounds a result reports.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Pick {
    Best,
    Median,
}

impl Pick {
    /// The round to report: the fastest, or the middle one by rate (the slower middle one
    /// of an even count).
    fn from(self, mut rounds: Vec<load::LoadResult>) -> Option<load::LoadResult> {
        rounds.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
        match self {
            Pick::Best => rounds.pop(),
            Pick::Median if rounds.is_empty() => None,
            Pick::Median => Some(rounds.swap_remove((rounds.len() - 1) / 2)),
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    All,
    Rumqttd,
    Fleethub,
    Mosquitto,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

/// A broker's memory with `held` idle connections.
struct Memory {
    target: &'static str,
    held: u64,
    connect_s: f64,
    idle_bytes: u64,
    /// RSS with the first half of the clients connected.
    half_bytes: u64,
    held_bytes: u64,
    /// Live heap bytes at the same three moments (fleethub only).
    heap: Option<(i64, i64, i64)>,
}

impl Memory {
    fn per_connection(&self) -> f64 {
        self.held_bytes.saturating_sub(self.idle_bytes) as f64 / self.held.max(1) as f64
    }

    /// What the second half of the connections added, per connection: free of whatever the
    /// broker allocated at start or while the clients were registered (which moves the
    /// idle baseline by tens of MiB between runs).
    fn marginal(&self) -> f64 {
        let second = self.held - self.held / 2;
        self.held_bytes.saturating_sub(self.half_bytes) as f64 / second.max(1) as f64
    }

    /// Live heap bytes the second half added, per connection.
    fn heap_marginal(&self) -> Option<f64> {
        let (_, half, held) = self.heap?;
        let second = self.held - self.held / 2;
        Some((held - half) as f64 / second.max(1) as f64)
    }

    /// Live heap bytes all the held connections added, per connection: the allocator's
    /// page keeping and reuse, which move RSS by about a KiB per connection between runs, do
    /// not enter it.
    fn heap_per_connection(&self) -> Option<f64> {
        let (idle, _, held) = self.heap?;
        Some((held - idle) as f64 / self.held.max(1) as f64)
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "target": self.target,
            "held": self.held,
            "connect_s": self.connect_s,
            "rss_idle_bytes": self.idle_bytes,
            "rss_held_bytes": self.held_bytes,
            "rss_half_bytes": self.half_bytes,
            "bytes_per_connection": self.per_connection(),
            "marginal_bytes_per_connection": self.marginal(),
            "heap_marginal_bytes_per_connection": self.heap_marginal(),
            "heap_bytes_per_connection": self.heap_per_connection(),
        })
    }
}

/// The result label of a target's paced run.
fn paced_label(name: &'static str) -> &'static str {
    match name {
        "fleethub" => "fleethub-paced",
        "rumqttd" => "rumqttd-paced",
        "mosquitto" => "mosquitto-paced",
        other => other,
    }
}

/// The result label of a target's run over `transport`: its name for plain MQTT.
fn labelled(name: &'static str, transport: targets::Transport) -> &'static str {
    match (name, transport) {
        ("fleethub", targets::Transport::Tls) => "fleethub-tls",
        ("fleethub", targets::Transport::Wss) => "fleethub-wss",
        _ => name,
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    let specs: Vec<LoadSpec> = args
        .qos
        .iter()
        .map(|&q| LoadSpec {
            messages_per_device: args.messages,
            payload_bytes: args.payload,
            qos: if q == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            json: args.routed,
            backlog: false,
            rate: None,
        })
        .collect();
    let sizing = targets::Sizing {
        segment_bytes: args.segment_mib * 1024 * 1024,
        segment_count: args.segments,
    };
    // The load generator's runtime; each broker is a process of its own.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("load")
        .build()?;
    let mut results: Vec<(u8, LoadResult)> = Vec::new();
    let mut memory: Vec<Memory> = Vec::new();
    let wanted = |w: Which| args.target == Which::All || args.target == w;
    let mut brokers: Vec<Box<dyn Fn() -> Result<Option<Target>>>> = Vec::new();
    if wanted(Which::Rumqttd) {
        brokers.push(Box::new(|| {
            targets::rumqttd(args.devices, args.hold, sizing).map(Some)
        }));
    }
    if wanted(Which::Mosquitto) {
        brokers.push(Box::new(|| targets::mosquitto(args.devices, args.hold)));
    }
    if wanted(Which::Fleethub) {
        brokers.push(Box::new(|| {
            targets::fleethub_with(args.devices, args.hold, sizing, args.routed).map(Some)
        }));
    }
    for start in brokers {
        let Some(target) = start()? else {
            if args.target == Which::Mosquitto {
                anyhow::bail!("mosquitto is not installed (apt-get install mosquitto)");
            }
            eprintln!("mosquitto is not installed: skipping it");
            continue;
        };
        let held = if args.hold > 0 {
            let settle = std::time::Duration::from_secs(2);
            // What the clients' registration left behind is freed first.
            std::thread::sleep(settle);
            let idle = target.rss_bytes().unwrap_or(0);
            let heap_idle = target.heap_bytes();
            let half = args.hold / 2;
            let started = std::time::Instant::now();
            let mut held = rt.block_on(load::hold(&target, args.sessions, 0..half))?;
            let mut connect_s = started.elapsed().as_secs_f64();
            std::thread::sleep(settle);
            let half_bytes = target.rss_bytes().unwrap_or(0);
            let heap_half = target.heap_bytes();
            let started = std::time::Instant::now();
            held.extend(rt.block_on(load::hold(&target, args.sessions, half..args.hold))?);
            connect_s += started.elapsed().as_secs_f64();
            std::thread::sleep(settle);
            memory.push(Memory {
                target: target.name,
                held: held.count(),
                connect_s,
                idle_bytes: idle,
                half_bytes,
                held_bytes: target.rss_bytes().unwrap_or(0),
                heap: match (heap_idle, heap_half, target.heap_bytes()) {
                    (Some(a), Some(b), Some(c)) => Some((a, b, c)),
                    _ => None,
                },
            });
            eprintln!(
                "{}: holding {} connections (connected in {connect_s:.1} s, {} handshakes retried)",
                target.name,
                held.count(),
                held.retries()
            );
            Some(held)
        } else {
            None
        };
        let mut target = target;
        let transports = if target.name == "fleethub" {
            args.transports.clone()
        } else {
            vec![targets::Transport::Plain]
        };
        for (q, spec) in args.qos.iter().zip(&specs) {
            for &transport in &transports {
                if transport != targets::Transport::Plain && !target.has_tls() {
                    anyhow::bail!("{} serves no TLS listeners", target.name);
                }
                target.transport = transport;
                let best = args.pick.from(
                    (0..args.rounds.max(1))
                        .map(|_| rt.block_on(load::run(&target, spec)))
                        .collect::<Result<Vec<_>>>()?,
                );
                let paced = match (&best, args.paced) {
                    (Some(b), Some(f)) if transport == targets::Transport::Plain => {
                        let spec = LoadSpec {
                            rate: Some(b.rate() * f),
                            ..spec.clone()
                        };
                        let mut r = rt.block_on(load::run(&target, &spec))?;
                        r.target = paced_label(r.target);
                        Some((*q, r))
                    }
                    _ => None,
                };
                results.extend(best.map(|mut r| {
                    r.target = labelled(r.target, transport);
                    (*q, r)
                }));
                results.extend(paced);
            }
            if args.backlog && target.name == "fleethub" && !args.routed {
                target.transport = targets::Transport::Plain;
                let drain = LoadSpec {
                    backlog: true,
                    ..spec.clone()
                };
                let best = args.pick.from(
                    (0..args.rounds.max(1))
                        .map(|_| rt.block_on(load::run(&target, &drain)))
                        .collect::<Result<Vec<_>>>()?,
                );
                results.extend(best.map(|mut r| {
                    r.target = "fleethub-drain";
                    (*q, r)
                }));
            }
        }
        if let Some(held) = held {
            rt.block_on(held.release());
        }
    }
    let rate = |name: &str, q: u8| {
        results
            .iter()
            .find(|(rq, r)| r.target == name && *rq == q)
            .map(|(_, r)| r.rate())
    };
    let ratios: Vec<(u8, Option<f64>, Option<f64>)> = args
        .qos
        .iter()
        .map(|&q| {
            let f = rate("fleethub", q);
            let ratio = |base: &str| Some(f? / rate(base, q)?);
            (q, ratio("rumqttd"), ratio("mosquitto"))
        })
        .collect();
    match args.output {
        Output::Json => {
            let v = json!({
                "devices": args.devices,
                "messages_per_device": args.messages,
                "payload_bytes": args.payload,
                "qos": args.qos,
                "routed": args.routed,
                "transports": args.transports.iter().map(|t| t.name()).collect::<Vec<_>>(),
                "hold": args.hold,
                "sessions": args.sessions,
                "results": results.iter().map(|(q, r)| {
                    let mut j = r.json();
                    j["qos"] = json!(q);
                    j
                }).collect::<Vec<_>>(),
                "memory": memory.iter().map(Memory::json).collect::<Vec<_>>(),
                "ratios": ratios.iter().map(|(q, r, m)| json!({
                    "qos": q,
                    "fleethub_to_rumqttd": r,
                    "fleethub_to_mosquitto": m,
                })).collect::<Vec<_>>(),
                "ratio_fleethub_to_rumqttd": ratios.first().and_then(|r| r.1),
                "transport_ratios": args.qos.iter().map(|&q| json!({
                    "qos": q,
                    "tls_to_plain": rate("fleethub-tls", q).zip(rate("fleethub", q)).map(|(a, b)| a / b),
                    "wss_to_plain": rate("fleethub-wss", q).zip(rate("fleethub", q)).map(|(a, b)| a / b),
                })).collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Text => {
            println!(
                "{} devices x {} messages, {} B payload{}{}",
                args.devices,
                args.messages,
                args.payload,
                if args.hold > 0 {
                    format!(", {} idle connections held", args.hold)
                } else {
                    String::new()
                },
                if args.routed {
                    format!(", fleethub routed by: {}", targets::BENCH_ROUTE)
                } else {
                    String::new()
                }
            );
            println!(
                "{:<15} {:>3} {:>10} {:>10} {:>10} {:>12} {:>8} {:>8} {:>11}",
                "target",
                "qos",
                "sent",
                "received",
                "elapsed_s",
                "msg/s",
                "p50_ms",
                "p99_ms",
                "cpu_ns/msg"
            );
            for (q, r) in &results {
                println!(
                    "{:<15} {:>3} {:>10} {:>10} {:>10.2} {:>12.0} {:>8.2} {:>8.2} {:>11}",
                    r.target,
                    q,
                    r.sent,
                    r.received,
                    r.elapsed.as_secs_f64(),
                    r.rate(),
                    r.p50_ms,
                    r.p99_ms,
                    r.cpu_ns_per_message()
                        .map(|c| format!("{c:.0}"))
                        .unwrap_or_else(|| "-".into())
                );
            }
            for &q in &args.qos {
                let plain = rate("fleethub", q);
                for t in [targets::Transport::Tls, targets::Transport::Wss] {
                    if let (Some(p), Some(r)) = (plain, rate(labelled("fleethub", t), q)) {
                        println!(
                            "QoS {q}: fleethub over {} / over plain MQTT throughput: {:.2}",
                            t.name(),
                            r / p
                        );
                    }
                }
            }
            for (q, r, m) in &ratios {
                if let Some(r) = r {
                    println!("QoS {q}: fleethub / rumqttd throughput: {r:.2}");
                }
                if let Some(m) = m {
                    println!("QoS {q}: fleethub / mosquitto throughput: {m:.2}");
                }
            }
            if !memory.is_empty() {
                println!(
                    "{:<10} {:>8} {:>10} {:>12} {:>12} {:>14} {:>17} {:>11} {:>16}",
                    "target",
                    "held",
                    "connect_s",
                    "rss_idle_MiB",
                    "rss_held_MiB",
                    "KiB/connection",
                    "marginal_KiB/conn",
                    "heap_B/conn",
                    "heap_marginal_B"
                );
                for m in &memory {
                    println!(
                        "{:<10} {:>8} {:>10.1} {:>12.1} {:>12.1} {:>14.1} {:>17.1} {:>11} {:>16}",
                        m.target,
                        m.held,
                        m.connect_s,
                        m.idle_bytes as f64 / 1048576.0,
                        m.held_bytes as f64 / 1048576.0,
                        m.per_connection() / 1024.0,
                        m.marginal() / 1024.0,
                        m.heap_per_connection()
                            .map(|b| format!("{b:.0}"))
                            .unwrap_or_else(|| "-".into()),
                        m.heap_marginal()
                            .map(|b| format!("{b:.0}"))
                            .unwrap_or_else(|| "-".into())
                    );
                }
            }
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct TwinBenchArgs {
    /// Devices, each in a closed request/answer loop
    #[arg(long, default_value_t = 50)]
    devices: usize,
    /// Round trips per device
    #[arg(long, default_value_t = 200)]
    patches: usize,
    /// Approximate patch size in bytes
    #[arg(long, default_value_t = 100)]
    payload: usize,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

pub fn run_twin(args: TwinBenchArgs) -> Result<()> {
    let sizing = targets::Sizing {
        segment_bytes: 16 * 1024 * 1024,
        segment_count: 2,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("load")
        .build()?;
    let baseline = targets::rumqttd(args.devices, 0, sizing)?;
    let b = rt.block_on(crate::roundtrip::run(&baseline, args.patches, args.payload))?;
    let hub = targets::fleethub(args.devices, sizing)?;
    let f = rt.block_on(crate::roundtrip::run(&hub, args.patches, args.payload))?;
    match args.output {
        Output::Json => {
            let v = json!({
                "devices": args.devices,
                "round_trips_per_device": args.patches,
                "results": [b.json(), f.json()],
                "ratio_fleethub_to_rumqttd": f.rate() / b.rate(),
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Text => {
            println!(
                "{} devices x {} round trips, ~{} B requests",
                args.devices, args.patches, args.payload
            );
            println!(
                "{:<10} {:>12} {:>10} {:>12} {:>8} {:>8}",
                "target", "round_trips", "elapsed_s", "per_s", "p50_ms", "p99_ms"
            );
            for r in [&b, &f] {
                println!(
                    "{:<10} {:>12} {:>10.2} {:>12.0} {:>8.2} {:>8.2}",
                    r.target,
                    r.completed,
                    r.elapsed.as_secs_f64(),
                    r.rate(),
                    r.p50_ms,
                    r.p99_ms
                );
            }
            println!(
                "fleethub (durable reported patch) / rumqttd (echo) round trips: {:.2}",
                f.rate() / b.rate()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(received: u64) -> load::LoadResult {
        load::LoadResult {
            target: "t",
            devices: 1,
            sent: received,
            received,
            elapsed: std::time::Duration::from_secs(1),
            p50_ms: 0.0,
            p99_ms: 0.0,
            redelivered: 0,
            cpu_s: None,
        }
    }

    #[test]
    fn rounds_are_reported_best_or_median() {
        let rates = |v: &[u64]| v.iter().map(|&r| round(r)).collect::<Vec<_>>();
        let got = |p: Pick, v: &[u64]| p.from(rates(v)).map(|r| r.received);
        assert_eq!(got(Pick::Best, &[3, 9, 5]), Some(9));
        assert_eq!(got(Pick::Median, &[3, 9, 5]), Some(5));
        assert_eq!(got(Pick::Median, &[3, 9, 5, 7]), Some(5));
        assert_eq!(got(Pick::Median, &[4]), Some(4));
        assert_eq!(got(Pick::Median, &[]), None);
    }
}
