//! `consumer-group`: the events endpoint's consumer groups (create with a start position,
//! list with lag, show, delete).

use anyhow::Result;
use clap::Subcommand;

use super::Ctx;
use crate::events::GroupView;

#[derive(Subcommand, Debug)]
pub enum ConsumerGroupCmd {
    /// Create a group; it reads from --from: start (the oldest retained event), end (what
    /// arrives from now on) or an RFC 3339 time
    Create {
        name: String,
        #[arg(long, default_value = "start")]
        from: String,
    },
    /// Every group with its checkpoint, lag (events and age) and readers
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
}

fn describe(g: &GroupView) -> String {
    format!(
        "{}  checkpoint {}  lag {} events ({:.1} s)  {} readers, {} in flight",
        g.name, g.checkpoint, g.lag_messages, g.lag_seconds, g.consumers, g.in_flight
    )
}

impl ConsumerGroupCmd {
    pub async fn run(&self, ctx: &Ctx) -> Result<()> {
        match self {
            ConsumerGroupCmd::Create { name, from } => {
                let g = ctx.api.create_consumer_group(name, from).await?;
                ctx.print(&g, describe);
            }
            ConsumerGroupCmd::List => {
                let list = ctx.api.consumer_groups().await?;
                ctx.print(&list, |l| {
                    l.items.iter().map(describe).collect::<Vec<_>>().join("\n")
                });
            }
            ConsumerGroupCmd::Show { name } => {
                let g = ctx.api.consumer_group(name).await?;
                ctx.print(&g, describe);
            }
            ConsumerGroupCmd::Delete { name } => {
                ctx.api.delete_consumer_group(name).await?;
                ctx.print(&serde_json::json!({ "deleted": name }), |_| {
                    format!("Deleted consumer group {name}")
                });
            }
        }
        Ok(())
    }
}
