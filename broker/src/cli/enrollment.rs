//! `enrollment`: who may provision themselves (DPS enrollments, symmetric keys).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};

use super::Ctx;
use crate::enrollment::{Enrollment, EnrollmentInput, EnrollmentKind, InitialTwin};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// Any registration id; its key is derived from the group's
    Group,
    /// One registration id with its own key
    Individual,
}

impl From<KindArg> for EnrollmentKind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::Group => EnrollmentKind::Group,
            KindArg::Individual => EnrollmentKind::Individual,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum EnrollmentCmd {
    /// Create an enrollment: a group (ID is the group's) or an individual (ID is the
    /// registration id); keys are generated unless given
    Create {
        #[arg(value_enum)]
        kind: KindArg,
        id: String,
        #[arg(long)]
        primary_key: Option<String>,
        #[arg(long)]
        secondary_key: Option<String>,
        /// The device group ("Product/Group") registered devices join
        #[arg(long)]
        device_group: Option<String>,
        /// A JSON file {"tags": {...}, "desired": {...}} registered devices start with
        #[arg(long)]
        initial_twin: Option<PathBuf>,
        /// Created disabled: registrations are refused until enabled
        #[arg(long)]
        disabled: bool,
    },
    List {
        #[arg(value_enum)]
        kind: KindArg,
    },
    Show {
        #[arg(value_enum)]
        kind: KindArg,
        id: String,
    },
    Enable {
        #[arg(value_enum)]
        kind: KindArg,
        id: String,
    },
    Disable {
        #[arg(value_enum)]
        kind: KindArg,
        id: String,
    },
    Delete {
        #[arg(value_enum)]
        kind: KindArg,
        id: String,
    },
    /// The key a device of group GROUP registering as REGISTRATION_ID uses
    DeriveKey {
        group: String,
        registration_id: String,
    },
}

fn describe(e: &Enrollment) -> String {
    format!(
        "{:?} {}  {}{}\n  primary key {}",
        e.kind,
        e.id,
        e.provisioning_status,
        e.device_group
            .as_ref()
            .map(|g| format!(", device group {g}"))
            .unwrap_or_default(),
        e.primary_key
    )
}

impl EnrollmentCmd {
    pub async fn run(&self, ctx: &Ctx) -> Result<()> {
        match self {
            EnrollmentCmd::Create {
                kind,
                id,
                primary_key,
                secondary_key,
                device_group,
                initial_twin,
                disabled,
            } => {
                let initial_twin: Option<InitialTwin> = match initial_twin {
                    Some(p) => Some(
                        serde_json::from_str(
                            &std::fs::read_to_string(p)
                                .with_context(|| format!("reading {}", p.display()))?,
                        )
                        .with_context(|| format!("{}: {{\"tags\", \"desired\"}}", p.display()))?,
                    ),
                    None => None,
                };
                let body = EnrollmentInput {
                    id: id.clone(),
                    primary_key: primary_key.clone(),
                    secondary_key: secondary_key.clone(),
                    provisioning_status: disabled.then(|| "disabled".into()),
                    device_group: device_group.clone(),
                    initial_twin,
                };
                let e = ctx.api.create_enrollment((*kind).into(), &body).await?;
                ctx.print(&e, describe);
            }
            EnrollmentCmd::List { kind } => {
                let list = ctx.api.enrollments((*kind).into()).await?;
                ctx.print(&list, |l| {
                    l.items.iter().map(describe).collect::<Vec<_>>().join("\n")
                });
            }
            EnrollmentCmd::Show { kind, id } => {
                let e = ctx.api.enrollment((*kind).into(), id).await?;
                ctx.print(&e, describe);
            }
            EnrollmentCmd::Enable { kind, id } | EnrollmentCmd::Disable { kind, id } => {
                let status = if matches!(self, EnrollmentCmd::Enable { .. }) {
                    "enabled"
                } else {
                    "disabled"
                };
                let e = ctx
                    .api
                    .set_enrollment_status((*kind).into(), id, status)
                    .await?;
                ctx.print(&e, describe);
            }
            EnrollmentCmd::Delete { kind, id } => {
                ctx.api.delete_enrollment((*kind).into(), id).await?;
                ctx.print(&serde_json::json!({ "deleted": id }), |_| {
                    format!("Deleted enrollment {id}")
                });
            }
            EnrollmentCmd::DeriveKey {
                group,
                registration_id,
            } => {
                let g = ctx.api.enrollment(EnrollmentKind::Group, group).await?;
                let key = crate::enrollment::derive_key(&g.primary_key, registration_id)
                    .context("the group's key is not base64")?;
                ctx.print(
                    &serde_json::json!({ "registrationId": registration_id, "key": key }),
                    |_| key.clone(),
                );
            }
        }
        Ok(())
    }
}
