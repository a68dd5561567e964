//! The `fleethub` binary: argument parsing lives in `fleethub::cli`.

use std::process::ExitCode;

/// The hub allocates many small, short-lived buffers per message (property bags, topics,
/// JSON bodies for route conditions); mimalloc handles that pattern markedly better than the
/// system allocator (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match fleethub::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
