//! The `fleethub` binary: argument parsing lives in `fleethub::cli`.

use std::process::ExitCode;

/// The hub allocates many small, short-lived buffers per message (property bags, topics,
/// JSON bodies for route conditions); mimalloc handles that pattern markedly better than the
/// system allocator (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc (v3) keeps freed pages for a second before giving them back
/// (`MIMALLOC_PURGE_DELAY`, 1000 ms), which under a hub's bursts kept far more resident than
/// the live heap: a 10,000-device hub idled at 171 MB instead of 70 and stayed 150 MB up
/// after a deployment to all of them. Giving them back at once cost no measurable
/// throughput (BENCHMARKS.md). mimalloc reads the option when the process starts, before
/// `main`, so the hub starts itself again (same process, `exec`) with it set; an operator's
/// own setting is left as it is.
#[cfg(unix)]
fn return_freed_memory_at_once() {
    use std::os::unix::process::CommandExt;
    const OPTION: &str = "MIMALLOC_PURGE_DELAY";
    if std::env::var_os(OPTION).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        command.arg0(arg0);
    }
    // Returns only if the exec failed: then the hub runs with mimalloc's default.
    let _ = command.args(args).env(OPTION, "0").exec();
}

#[cfg(not(unix))]
fn return_freed_memory_at_once() {}

fn main() -> ExitCode {
    return_freed_memory_at_once();
    match fleethub::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
