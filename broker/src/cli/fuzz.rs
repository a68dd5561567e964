//! `fuzz`: the mutation fuzzer over every parser that takes outside input (for developers;
//! see `fleethub::fuzzing`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use crate::fuzzing;

#[derive(Args, Debug)]
pub struct FuzzArgs {
    /// A target name, or "all": mqtt_packet, topic, property_bag, sas_token, condition,
    /// twin_patch, manifest
    #[arg(long, default_value = "all")]
    target: String,
    /// Inputs per target
    #[arg(long, default_value_t = 10_000_000)]
    inputs: u64,
    /// Seed of the mutations (a run is reproduced from it)
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The fuzz directory: corpus/{target} is read, crashes/{target} written
    #[arg(long, default_value = "fuzz")]
    dir: PathBuf,
    /// Write each target's seeds into corpus/{target} first (files that exist are kept)
    #[arg(long)]
    init_corpus: bool,
}

impl FuzzArgs {
    pub fn run(&self) -> Result<()> {
        let targets: Vec<_> = fuzzing::targets()
            .into_iter()
            .filter(|t| self.target == "all" || t.name == self.target)
            .collect();
        if targets.is_empty() {
            bail!("no target named '{}'", self.target);
        }
        if self.init_corpus {
            for t in &targets {
                write_seeds(t, &self.dir)?;
            }
        }
        run_targets(&targets, self.inputs, self.seed, &self.dir)
    }
}

/// Fuzzes each target, printing progress and a line per target; fails when any panicked.
pub fn run_targets(
    targets: &[fuzzing::Target],
    inputs: u64,
    seed: u64,
    dir: &std::path::Path,
) -> Result<()> {
    let mut crashed = 0;
    for t in targets {
        let outcome = fuzzing::fuzz(t, inputs, seed, dir, |n| {
            if n > 0 && n % 1_000_000 == 0 {
                eprintln!("  {}: {n} inputs", t.name);
            }
        });
        println!(
            "{:<14} {:>12} inputs {:>8.1} s {:>10.0}/s  {} panics",
            t.name,
            outcome.inputs,
            outcome.seconds,
            outcome.inputs as f64 / outcome.seconds.max(1e-9),
            outcome.crashes.len()
        );
        for (path, message) in &outcome.crashes {
            println!("  {}: {message}", path.display());
        }
        crashed += outcome.crashes.len();
    }
    if crashed > 0 {
        bail!(
            "{crashed} panicking input(s), saved under {}/crashes",
            dir.display()
        );
    }
    Ok(())
}

/// Writes `target`'s seeds as `corpus/{name}/seed-{n}`.
pub fn write_seeds(target: &fuzzing::Target, dir: &std::path::Path) -> Result<()> {
    let corpus = dir.join("corpus").join(target.name);
    std::fs::create_dir_all(&corpus)?;
    for (n, seed) in (target.seeds)().iter().enumerate() {
        let path = corpus.join(format!("seed-{n}"));
        if !path.exists() {
            std::fs::write(&path, seed)?;
        }
    }
    Ok(())
}
