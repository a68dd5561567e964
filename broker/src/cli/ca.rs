//! `ca`: CA certificates for X.509 CA authentication (upload, prove, list, delete).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use super::Ctx;
use crate::certificates::CaCertificate;

#[derive(Subcommand, Debug)]
pub enum CaCmd {
    /// Upload a CA certificate (PEM); prints the verification code to prove it with
    Add {
        name: String,
        #[arg(long)]
        cert: PathBuf,
    },
    /// Prove possession of the CA's key: a certificate signed by it whose common name is the
    /// verification code `ca add` printed
    Verify {
        name: String,
        #[arg(long)]
        cert: PathBuf,
    },
    List,
    Delete {
        name: String,
    },
}

fn describe(c: &CaCertificate) -> String {
    format!(
        "{}  {}  {}  thumbprint {}{}",
        c.name,
        if c.is_verified {
            "verified"
        } else {
            "NOT VERIFIED"
        },
        c.subject,
        c.thumbprint,
        if c.is_verified {
            String::new()
        } else {
            format!("\n  verification code: {}", c.verification_code)
        }
    )
}

fn read(path: &PathBuf) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

impl CaCmd {
    pub async fn run(&self, ctx: &Ctx) -> Result<()> {
        match self {
            CaCmd::Add { name, cert } => {
                let c = ctx.api.add_certificate(name, &read(cert)?).await?;
                ctx.print(&c, describe);
            }
            CaCmd::Verify { name, cert } => {
                let c = ctx.api.verify_certificate(name, &read(cert)?).await?;
                ctx.print(&c, describe);
            }
            CaCmd::List => {
                let list = ctx.api.certificates().await?;
                ctx.print(&list, |l| {
                    l.items.iter().map(describe).collect::<Vec<_>>().join("\n")
                });
            }
            CaCmd::Delete { name } => {
                ctx.api.delete_certificate(name).await?;
                ctx.print(&serde_json::json!({ "deleted": name }), |_| {
                    format!("Deleted CA certificate {name}")
                });
            }
        }
        Ok(())
    }
}
