//! The `fleethub` binary: argument parsing lives in `fleethub::cli`.

use std::process::ExitCode;

fn main() -> ExitCode {
    match fleethub::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
