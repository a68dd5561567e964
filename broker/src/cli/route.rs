//! `route` and `queue`: the routes in force, checking an expression, and the
//! store-and-forward queues.

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use super::{Ctx, Output};
use crate::api::wire::QueueView;

#[derive(Subcommand, Debug)]
pub enum RouteCmd {
    /// The routes in force and where each came from (config or the $edgeHub twin)
    List,
    /// Validate one route expression; prints the error with its column
    Check { route: String },
}

#[derive(Subcommand, Debug)]
pub enum QueueCmd {
    /// Every sink's queue: depth, bytes, oldest message age, drops by reason
    List,
    /// One sink's queue, e.g. '$upstream' or /modules/filter/inputs/in1
    Show { sink: String },
}

impl RouteCmd {
    pub async fn run(&self, ctx: &Ctx) -> Result<()> {
        match self {
            RouteCmd::List => {
                let table = ctx.api.routes().await?;
                ctx.print(&table, |t| {
                    let mut out = format!(
                        "{:<20} {:<9} {:>3} {:>8}  ROUTE",
                        "NAME", "SOURCE", "PRI", "TTL_S"
                    );
                    for r in &t.routes {
                        out += &format!(
                            "\n{:<20} {:<9} {:>3} {:>8}  {}",
                            r.name, r.source, r.priority, r.time_to_live_secs, r.route
                        );
                        if let Some(why) = &r.undeliverable {
                            out += &format!("\n{:<20} ^ DROPPED: {why}", "");
                        }
                    }
                    out += &format!(
                        "\nupstream: {}",
                        match (t.upstream.enabled, t.upstream.connected) {
                            (true, true) => "connected",
                            (true, false) => "disconnected",
                            _ => "not configured",
                        }
                    );
                    out
                });
                Ok(())
            }
            RouteCmd::Check { route } => {
                let verdict = ctx.api.check_route(route).await?;
                if verdict.valid {
                    ctx.print(&verdict, |v| {
                        format!(
                            "valid: {} -> {}",
                            v.source.as_deref().unwrap_or(""),
                            v.sink.as_deref().unwrap_or("")
                        )
                    });
                    return Ok(());
                }
                if ctx.output == Output::Text {
                    let column = verdict.column.unwrap_or(1);
                    eprintln!("{route}\n{}^", " ".repeat(column.saturating_sub(1)));
                }
                bail!("{}", verdict.message.as_deref().unwrap_or("invalid route"))
            }
        }
    }
}

fn queue_row(q: &QueueView) -> String {
    format!(
        "{:<40} {:>10} {:>12} {:>12} {:>9} {:>9}",
        q.sink,
        q.depth,
        q.bytes,
        q.oldest_age_seconds
            .map(|a| format!("{a:.1}"))
            .unwrap_or_else(|| "-".into()),
        q.dropped.expired,
        q.dropped.quota
    )
}

fn queue_header() -> String {
    format!(
        "{:<40} {:>10} {:>12} {:>12} {:>9} {:>9}",
        "SINK", "DEPTH", "BYTES", "OLDEST_S", "EXPIRED", "QUOTA"
    )
}

impl QueueCmd {
    pub async fn run(&self, ctx: &Ctx) -> Result<()> {
        let list = ctx.api.queues().await?;
        match self {
            QueueCmd::List => ctx.print(&list, |l| {
                let mut out = queue_header();
                for q in &l.items {
                    out += &format!("\n{}", queue_row(q));
                }
                out
            }),
            QueueCmd::Show { sink } => {
                let q = list
                    .items
                    .into_iter()
                    .find(|q| q.sink == *sink)
                    .with_context(|| format!("no queue for sink '{sink}'"))?;
                ctx.print(&q, |q| format!("{}\n{}", queue_header(), queue_row(q)));
            }
        }
        Ok(())
    }
}
