//! `twin`: show, patch and query twins.

use anyhow::{bail, Result};
use clap::Subcommand;
use serde_json::Value;

use super::{parse_json_arg, Ctx};
use crate::api::wire::{TwinPatch, TwinPatchProperties};
use crate::identity::IdentityKey;

#[derive(Subcommand, Debug)]
pub enum TwinCmd {
    /// Print a twin
    Show {
        device: String,
        #[arg(long)]
        module: Option<String>,
    },
    /// Patch tags and/or desired properties (JSON merge patch: null deletes)
    Update {
        device: String,
        #[arg(long)]
        module: Option<String>,
        /// Desired-properties patch, e.g. '{"interval": 30}'
        #[arg(long)]
        desired: Option<String>,
        /// Tags patch, e.g. '{"location": {"region": "US"}}'
        #[arg(long)]
        tags: Option<String>,
        /// Only apply if the twin's etag is still this (HTTP If-Match)
        #[arg(long)]
        etag: Option<String>,
    },
    /// Run an IoT Hub twin query, e.g. "SELECT * FROM devices WHERE tags.region = 'US'"
    Query { query: String },
}

fn key(device: &str, module: &Option<String>) -> Result<IdentityKey> {
    Ok(IdentityKey::parse(&match module {
        Some(m) => format!("{device}/{m}"),
        None => device.to_string(),
    })?)
}

fn pretty<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

impl TwinCmd {
    pub async fn run(&self, ctx: &Ctx) -> Result<()> {
        match self {
            TwinCmd::Show { device, module } => {
                let twin = ctx.api.twin(&key(device, module)?).await?;
                ctx.print(&twin, pretty);
            }
            TwinCmd::Update {
                device,
                module,
                desired,
                tags,
                etag,
            } => {
                let desired: Option<Value> = desired
                    .as_deref()
                    .map(|d| parse_json_arg(d, "--desired"))
                    .transpose()?;
                let tags: Option<Value> = tags
                    .as_deref()
                    .map(|t| parse_json_arg(t, "--tags"))
                    .transpose()?;
                if desired.is_none() && tags.is_none() {
                    bail!("nothing to update: give --desired and/or --tags");
                }
                let patch = TwinPatch {
                    tags,
                    properties: desired.map(|d| TwinPatchProperties {
                        desired: Some(d),
                        reported: None,
                    }),
                    ..Default::default()
                };
                let twin = ctx
                    .api
                    .patch_twin(&key(device, module)?, &patch, etag.as_deref())
                    .await?;
                ctx.print(&twin, pretty);
            }
            TwinCmd::Query { query } => {
                let rows = ctx
                    .api
                    .query_twins_paged(query, |n| {
                        if n >= 1000 {
                            ctx.progress(&format!("{n} rows…"));
                        }
                    })
                    .await?;
                ctx.print(&rows, pretty);
            }
        }
        Ok(())
    }
}
