//! `device-sim`: simulated fleets over MQTT.
//!
//! Verbs: `run` plays a fleet from a scenario file against a running hub; `bench` runs the same telemetry load (same clients, payloads, QoS and counts)
//! against a bare embedded rumqttd and against fleethub, in one run, side by side;
//! `bench-twin` measures reported-property round trips the same way. These are the
//! harnesses BENCHMARKS.md quotes.

mod authbench;
mod bench;
mod device;
mod endpointbench;
mod load;
mod outage;
mod querybench;
mod queuebench;
mod roundtrip;
mod run;
mod scenario;
mod stats;
mod storm;
mod targets;

use clap::{Parser, Subcommand};

/// The same allocator as the `fleethub` binary, so the in-process hub runs as it does there
/// (both brokers and the load generator share it), wrapped to count live heap bytes when a
/// benchmark broker asks for it ([`heap::enable`]).
#[global_allocator]
static GLOBAL: heap::Counting = heap::Counting;

/// Live heap bytes of this process, for the memory benchmarks: RSS moves by about a KiB per
/// connection from run to run (freed memory reused, pages kept by the allocator), the heap's
/// live bytes do not. Off unless enabled at start, so the throughput runs pay one relaxed load.
pub mod heap {
    use std::alloc::{GlobalAlloc, Layout};
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

    static ON: AtomicBool = AtomicBool::new(false);
    static LIVE: AtomicI64 = AtomicI64::new(0);

    pub struct Counting;

    /// Starts counting; only allocations made from here on are counted, so call it first.
    pub fn enable() {
        ON.store(true, Ordering::Relaxed);
    }

    /// Bytes allocated and not freed since [`enable`].
    pub fn live() -> i64 {
        LIVE.load(Ordering::Relaxed)
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if ON.load(Ordering::Relaxed) {
                LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
            }
            // SAFETY: forwarded unchanged to the real allocator.
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if ON.load(Ordering::Relaxed) {
                LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
            }
            // SAFETY: `ptr` came from `alloc` of the same allocator with this layout.
            unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            if ON.load(Ordering::Relaxed) {
                LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
            }
            // SAFETY: as for `dealloc`; the real allocator does the move.
            unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
        }
    }
}

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
    /// Twin queries over a large fleet through the API: full scan, COUNT(), GROUP BY, pages
    BenchQuery(querybench::QueryBenchArgs),
    /// TLS connections per second by credential: SAS token, X.509 self-signed, X.509 CA
    BenchAuth(authbench::AuthBenchArgs),
    /// Custom endpoints into a real NATS JetStream and PostgreSQL, beside a plain client
    /// doing the same writes
    BenchEndpoints(endpointbench::EndpointBenchArgs),
    /// Fuzz the scenario-file reader (for developers; `fleethub fuzz` covers the hub's parsers)
    Fuzz {
        #[arg(long, default_value_t = 10_000_000)]
        inputs: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The fuzz directory: corpus/scenario is read, crashes/scenario written
        #[arg(long, default_value = "fuzz")]
        dir: std::path::PathBuf,
    },
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
        Command::BenchQuery(args) => querybench::run(args),
        Command::BenchAuth(args) => authbench::run(args),
        Command::BenchEndpoints(args) => endpointbench::run(args),
        Command::ServeBroker(args) => targets::serve_broker(args),
        Command::Fuzz { inputs, seed, dir } => {
            let target = scenario::fuzz::target();
            fleethub::cli::fuzz::write_seeds(&target, &dir)?;
            fleethub::cli::fuzz::run_targets(&[target], inputs, seed, &dir)
        }
    }
}
