//! `device-sim bench`: one load, run against bare rumqttd and against fleethub in the same
//! process and the same run, printed side by side with the ratio.

use anyhow::Result;
use clap::{Args, ValueEnum};
use rumqttc::QoS;
use serde_json::json;

use crate::load::{self, LoadResult, LoadSpec};
use crate::targets;

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
    /// MQTT QoS of publishes and the subscription (0 or 1)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Which brokers to run
    #[arg(long, value_enum, default_value_t = Which::Both)]
    target: Which,
    /// fleethub routes each message through a `$body` condition into a module input, which
    /// is the subscriber (bodies are JSON for both brokers)
    #[arg(long)]
    routed: bool,
    /// Router log segment size in MiB (both brokers)
    #[arg(long, default_value_t = 32)]
    segment_mib: usize,
    /// Router log segments kept per filter (both brokers)
    #[arg(long, default_value_t = 4)]
    segments: usize,
    /// Repeat each measurement and keep the best rate (reduces noise on a busy machine)
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    Both,
    Rumqttd,
    Fleethub,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let spec = LoadSpec {
        messages_per_device: args.messages,
        payload_bytes: args.payload,
        qos: if args.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        },
        json: args.routed,
    };
    let sizing = targets::Sizing {
        segment_bytes: args.segment_mib * 1024 * 1024,
        segment_count: args.segments,
    };
    // The load generator has its own runtime; each broker runs on its own threads.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("load")
        .build()?;
    let mut results: Vec<LoadResult> = Vec::new();
    let best = |a: Option<LoadResult>, b: LoadResult| match a {
        Some(a) if a.rate() >= b.rate() => Some(a),
        _ => Some(b),
    };
    if args.target != Which::Fleethub {
        let target = targets::rumqttd(args.devices, sizing)?;
        let mut r = None;
        for _ in 0..args.rounds.max(1) {
            r = best(r, rt.block_on(load::run(&target, &spec))?);
        }
        results.extend(r);
    }
    if args.target != Which::Rumqttd {
        let target = targets::fleethub_with(args.devices, sizing, args.routed)?;
        let mut r = None;
        for _ in 0..args.rounds.max(1) {
            r = best(r, rt.block_on(load::run(&target, &spec))?);
        }
        results.extend(r);
    }
    let ratio = match (
        results.iter().find(|r| r.target == "fleethub"),
        results.iter().find(|r| r.target == "rumqttd"),
    ) {
        (Some(f), Some(b)) => Some(f.rate() / b.rate()),
        _ => None,
    };
    match args.output {
        Output::Json => {
            let v = json!({
                "devices": args.devices,
                "messages_per_device": args.messages,
                "payload_bytes": args.payload,
                "qos": args.qos,
                "routed": args.routed,
                "results": results.iter().map(|r| r.json()).collect::<Vec<_>>(),
                "ratio_fleethub_to_rumqttd": ratio,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Text => {
            println!(
                "{} devices x {} messages, {} B payload, QoS {}{}",
                args.devices,
                args.messages,
                args.payload,
                args.qos,
                if args.routed {
                    format!(", fleethub routed by: {}", targets::BENCH_ROUTE)
                } else {
                    String::new()
                }
            );
            println!(
                "{:<10} {:>10} {:>10} {:>10} {:>12} {:>8} {:>8}",
                "target", "sent", "received", "elapsed_s", "msg/s", "p50_ms", "p99_ms"
            );
            for r in &results {
                println!(
                    "{:<10} {:>10} {:>10} {:>10.2} {:>12.0} {:>8.2} {:>8.2}",
                    r.target,
                    r.sent,
                    r.received,
                    r.elapsed.as_secs_f64(),
                    r.rate(),
                    r.p50_ms,
                    r.p99_ms
                );
            }
            if let Some(ratio) = ratio {
                println!("fleethub / rumqttd throughput: {ratio:.2}");
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
    let baseline = targets::rumqttd(args.devices, sizing)?;
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
