//! `device-sim`: simulated fleets over MQTT.
//!
//! Verbs: `run` plays a fleet from a scenario file against a running hub; `bench` runs the same telemetry load (same clients, payloads, QoS and counts)
//! against a bare embedded rumqttd and against fleethub, in one run, side by side;
//! `bench-twin` measures reported-property round trips the same way. These are the
//! harnesses BENCHMARKS.md quotes.

mod bench;
mod device;
mod load;
mod outage;
mod queuebench;
mod roundtrip;
mod run;
mod scenario;
mod stats;
mod storm;
mod targets;

use clap::{Parser, Subcommand};

/// The same allocator as the `fleethub` binary, so the in-process hub runs as it does there
/// (both brokers and the load generator share it).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "device-sim",
    version,
    about = "Simulated IoT fleets for demos, load tests and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A simulated fleet against a running hub, from a scenario file
    Run(run::RunArgs),
    /// Same load against bare rumqttd and fleethub, side by side
    Bench(bench::BenchArgs),
    /// Reported-property round trips on fleethub beside an echo round trip on bare rumqttd
    BenchTwin(bench::TwinBenchArgs),
    /// Store-and-forward queue: durable ingest beside the disk's fsync limit, drain, memory
    BenchQueue(queuebench::QueueBenchArgs),
    /// Reconnect storm: N SDK-style devices (clean session 0) across a hub kill -9 and
    /// restart: time until all have their sessions back, then until a desired push reaches all
    BenchSessions(storm::SessionBenchArgs),
    /// A benchmark's broker process (started by `bench`, not by hand)
    #[command(hide = true)]
    ServeBroker(targets::ServeBrokerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Bench(args) => bench::run(args),
        Command::BenchTwin(args) => bench::run_twin(args),
        Command::BenchQueue(args) => queuebench::run(args),
        Command::BenchSessions(args) => storm::run(args),
        Command::ServeBroker(args) => targets::serve_broker(args),
    }
}
