//! `cluster status`: the nodes, the leader, connections per node, the shared PostgreSQL.

use anyhow::Result;
use clap::Subcommand;

use super::Ctx;
use crate::api::wire::ClusterStatus;

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// The nodes as the shared PostgreSQL knows them (state, leader, connections, last
    /// heartbeat), and how PostgreSQL answered; a single hub says it is one
    Status,
}

impl ClusterCmd {
    pub async fn run(&self, ctx: &Ctx) -> Result<()> {
        match self {
            ClusterCmd::Status => {
                let status = ctx.api.cluster().await?;
                ctx.print(&status, text);
                Ok(())
            }
        }
    }
}

fn text(s: &ClusterStatus) -> String {
    if s.mode == "single" {
        return format!(
            "single hub '{}' (no [cluster] configured); it runs: {}",
            s.node,
            s.singletons.join(", ")
        );
    }
    let mut out = format!(
        "cluster seen from node '{}'; leader: {}",
        s.node,
        s.leader.as_deref().unwrap_or("none")
    );
    match &s.postgres {
        Some(pg) if pg.reachable => {
            out += &format!(
                "\npostgres: reachable, {:.1} ms, version {}",
                pg.round_trip_ms.unwrap_or_default(),
                pg.server_version.as_deref().unwrap_or("?")
            )
        }
        Some(pg) => {
            out += &format!(
                "\npostgres: UNREACHABLE: {}",
                pg.error.as_deref().unwrap_or("")
            )
        }
        None => {}
    }
    match s.nats_connected {
        Some(true) => out += "\nnats: connected",
        Some(false) => out += "\nnats: DISCONNECTED (reconnecting)",
        None => out += "\nnats: not configured (no messages between nodes)",
    }
    out += &format!(
        "\n{:<20} {:<8} {:<6} {:>11} {:>12}  {:<21} VERSION",
        "NODE", "STATE", "LEADER", "CONNECTIONS", "LAST_SEEN_MS", "API"
    );
    for n in &s.nodes {
        out += &format!(
            "\n{:<20} {:<8} {:<6} {:>11} {:>12}  {:<21} {}",
            n.node,
            n.state,
            if n.leader { "yes" } else { "" },
            n.connections,
            n.last_seen_ms,
            n.api,
            n.version
        );
    }
    out += &format!("\nthis node runs: {}", s.singletons.join(", "));
    out
}
