//! `device-sim`: simulated fleets over MQTT.
//!
//! Today it has one verb, `bench`: the same load (same clients, payloads, QoS and counts)
//! against a bare embedded rumqttd and against fleethub, in one run, printed side by side.
//! This is the harness BENCHMARKS.md quotes.

mod bench;
mod load;
mod targets;

use clap::{Parser, Subcommand};

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
    /// Same load against bare rumqttd and fleethub, side by side
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => bench::run(args),
    }
}
