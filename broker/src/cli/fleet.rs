//! `product` and `device-group`: what kinds of device there are, the groups they are in, and
//! the images each group's deployment hands out.

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};

use super::Ctx;
use crate::api::wire::{
    CreateGroup, CreateProduct, GroupUpdate, GroupView, OsFeed, ProductView, UpdateProduct,
};
use crate::deploy::wire::{CreateGroupDeployment, GroupDeploymentView};

#[derive(Subcommand, Debug)]
pub enum ProductCmd {
    /// Create a product; it gets the five default device groups unless --no-default-groups
    Create {
        name: String,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        no_default_groups: bool,
    },
    List,
    /// A product with its groups and how many devices each holds
    Show {
        name: String,
    },
    /// Change the description or the name (the id never changes)
    Update {
        name: String,
        #[arg(long)]
        new_name: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Delete a product and its groups (refused while devices are in them)
    Delete {
        name: String,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Feed {
    Retail,
    RetailEval,
}

impl From<Feed> for OsFeed {
    fn from(f: Feed) -> OsFeed {
        match f {
            Feed::Retail => OsFeed::Retail,
            Feed::RetailEval => OsFeed::RetailEval,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum DeviceGroupCmd {
    /// Create a group: "Product/Group"
    Create {
        path: String,
        #[arg(long)]
        description: Option<String>,
        /// Whether deployments update the group's applications [default: on]
        #[arg(long, value_enum)]
        application_updates: Option<OnOff>,
        /// OS feed [default: retail]
        #[arg(long, value_enum)]
        os_feed: Option<Feed>,
    },
    /// Groups of one product, or of all
    List {
        #[arg(long)]
        product: Option<String>,
    },
    /// A group, with its devices
    Show { path: String },
    Update {
        path: String,
        #[arg(long)]
        new_name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[arg(long, value_enum)]
        application_updates: Option<OnOff>,
        #[arg(long, value_enum)]
        os_feed: Option<Feed>,
    },
    /// Delete a group (refused while devices are in it)
    Delete { path: String },
    /// The group's deployments: the set of images its devices run
    #[command(subcommand)]
    Deployment(GroupDeploymentCmd),
}

#[derive(Subcommand, Debug)]
pub enum GroupDeploymentCmd {
    /// Assign a set of images to a group, replacing its current deployment
    Create {
        path: String,
        /// Image ids, name:X.Y.Z (pinned) or name:latest (follows new versions)
        #[arg(long, num_args = 1.., required = true)]
        images: Vec<String>,
    },
    /// The group's deployments, newest (the one in force) first
    List { path: String },
}

/// `Product/Group` → (product, group).
fn split_path(path: &str) -> Result<(&str, &str)> {
    path.split_once('/')
        .with_context(|| format!("'{path}': name a group as \"Product/Group\""))
}

fn os_feed_str(f: OsFeed) -> &'static str {
    match f {
        OsFeed::Retail => "Retail",
        OsFeed::RetailEval => "RetailEval",
    }
}

fn groups_table(items: &[GroupView]) -> String {
    let mut out = format!(
        "{:<30} {:<30} {:>7} {:<12} {:>8}",
        "PRODUCT", "GROUP", "APP_UPD", "OS_FEED", "DEVICES"
    );
    for g in items {
        out += &format!(
            "\n{:<30} {:<30} {:>7} {:<12} {:>8}",
            g.product,
            g.group.name.to_string(),
            if g.group.application_updates {
                "on"
            } else {
                "off"
            },
            os_feed_str(g.group.os_feed),
            g.devices
        );
    }
    out
}

fn show_product(p: &ProductView) -> String {
    let mut out = format!(
        "Product {} ({})\n  description: {}\n",
        p.product.name, p.product.id, p.product.description
    );
    out += &groups_table(&p.groups);
    out
}

fn show_group(g: &GroupView) -> String {
    let mut out = groups_table(std::slice::from_ref(g));
    for id in g.device_ids.iter().flatten() {
        out += &format!("\n  {id}");
    }
    out
}

fn deployment_row(d: &GroupDeploymentView) -> String {
    let images: Vec<String> = d
        .resolved
        .iter()
        .map(|i| format!("{}:{}", i.name, i.version))
        .collect();
    format!(
        "{:<36} {:<24} {:<7} {}",
        d.deployment.id,
        d.deployment.created_time,
        if d.current { "current" } else { "" },
        images.join(", ")
    )
}

impl ProductCmd {
    pub async fn run(&self, ctx: &Ctx) -> Result<()> {
        match self {
            ProductCmd::Create {
                name,
                description,
                no_default_groups,
            } => {
                let body = CreateProduct {
                    name: name.clone(),
                    description: description.clone(),
                    no_default_groups: *no_default_groups,
                };
                let p = ctx.api.create_product(&body).await?;
                ctx.print(&p, show_product);
            }
            ProductCmd::List => {
                let list = ctx.api.products().await?;
                ctx.print(&list, |l| {
                    let mut out =
                        format!("{:<36} {:<30} {:>6}  DESCRIPTION", "ID", "NAME", "GROUPS");
                    for p in &l.items {
                        out += &format!(
                            "\n{:<36} {:<30} {:>6}  {}",
                            p.product.id,
                            p.product.name.to_string(),
                            p.groups.len(),
                            p.product.description
                        );
                    }
                    out
                });
            }
            ProductCmd::Show { name } => {
                let p = ctx.api.product(name).await?;
                ctx.print(&p, show_product);
            }
            ProductCmd::Update {
                name,
                new_name,
                description,
            } => {
                let body = UpdateProduct {
                    name: new_name.clone(),
                    description: description.clone(),
                };
                let p = ctx.api.update_product(name, &body).await?;
                ctx.print(&p, show_product);
            }
            ProductCmd::Delete { name } => {
                ctx.api.delete_product(name).await?;
                ctx.deleted("product", name);
            }
        }
        Ok(())
    }
}

impl DeviceGroupCmd {
    pub async fn run(&self, ctx: &Ctx) -> Result<()> {
        match self {
            DeviceGroupCmd::Create {
                path,
                description,
                application_updates,
                os_feed,
            } => {
                let (product, group) = split_path(path)?;
                let body = CreateGroup {
                    name: group.to_string(),
                    description: description.clone(),
                    application_updates: application_updates.map(|u| u == OnOff::On),
                    os_feed: os_feed.map(OsFeed::from),
                };
                let g = ctx.api.create_group(product, &body).await?;
                ctx.print(&g, show_group);
            }
            DeviceGroupCmd::List { product } => {
                let list = ctx.api.groups(product.as_deref()).await?;
                ctx.print(&list, |l| groups_table(&l.items));
            }
            DeviceGroupCmd::Show { path } => {
                let (product, group) = split_path(path)?;
                let g = ctx.api.group(product, group).await?;
                ctx.print(&g, show_group);
            }
            DeviceGroupCmd::Update {
                path,
                new_name,
                description,
                application_updates,
                os_feed,
            } => {
                let (product, group) = split_path(path)?;
                let body = GroupUpdate {
                    name: new_name.clone(),
                    description: description.clone(),
                    application_updates: application_updates.map(|u| u == OnOff::On),
                    os_feed: os_feed.map(OsFeed::from),
                };
                let g = ctx.api.update_group(product, group, &body).await?;
                ctx.print(&g, show_group);
            }
            DeviceGroupCmd::Delete { path } => {
                let (product, group) = split_path(path)?;
                ctx.api.delete_group(product, group).await?;
                ctx.deleted("device group", path);
            }
            DeviceGroupCmd::Deployment(cmd) => cmd.run(ctx).await?,
        }
        Ok(())
    }
}

impl GroupDeploymentCmd {
    pub async fn run(&self, ctx: &Ctx) -> Result<()> {
        match self {
            GroupDeploymentCmd::Create { path, images } => {
                let (product, group) = split_path(path)?;
                let body = CreateGroupDeployment {
                    images: images.clone(),
                };
                let d = ctx
                    .api
                    .create_group_deployment(product, group, &body)
                    .await?;
                ctx.print(&d, |d| {
                    format!(
                        "Deployed to {} ({} device twin(s) updated)\n{}",
                        d.device_group.as_deref().unwrap_or(""),
                        d.devices_updated.unwrap_or(0),
                        deployment_row(d)
                    )
                });
            }
            GroupDeploymentCmd::List { path } => {
                let (product, group) = split_path(path)?;
                let list = ctx.api.group_deployments(product, group).await?;
                ctx.print(&list, |l| {
                    let mut out = format!("{:<36} {:<24} {:<7} IMAGES", "ID", "CREATED", "");
                    for d in &l.items {
                        out += &format!("\n{}", deployment_row(d));
                    }
                    out
                });
            }
        }
        Ok(())
    }
}
