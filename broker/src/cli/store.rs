//! `store check`: the hub's stores checked offline, with the hub stopped.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;

use super::Output;

#[derive(Subcommand, Debug)]
pub enum StoreCmd {
    /// Check every store of the data directory (page integrity, every row readable); the hub
    /// must be stopped. Exits non-zero when something is damaged
    Check,
}

impl StoreCmd {
    pub fn run(&self, data_dir: &Option<PathBuf>, output: Output) -> Result<()> {
        let StoreCmd::Check = self;
        let dir = data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("./fleethub-data"));
        if !dir.is_dir() {
            bail!("{}: no such data directory", dir.display());
        }
        let checked = crate::stores::check(&dir);
        if checked
            .iter()
            .any(|c| c.detail.contains("open in another process"))
        {
            bail!(
                "a hub is running on {}: stop it first (`fleethub backup` copies a running hub's stores)",
                dir.display()
            );
        }
        match output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(&checked).unwrap_or_default()
            ),
            Output::Text => {
                for c in &checked {
                    println!(
                        "{:<4} {:<28} {:<14} {}",
                        if c.ok { "ok" } else { "BAD" },
                        c.store,
                        c.file
                            .file_name()
                            .map(|f| f.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                        c.detail
                    );
                }
            }
        }
        let bad = checked.iter().filter(|c| !c.ok).count();
        if bad > 0 {
            bail!(
                "{bad} store(s) damaged: start from a backup (`fleethub backup`), or move the damaged file aside to start without what it held"
            );
        }
        Ok(())
    }
}
