//! `device`, `module` and `sas-token`: the identity registry.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use super::{parse_duration, Ctx};
use crate::api::wire::{
    AuthenticationInput, Capabilities, CreateDevice, CreateModule, IdentityUpdate, IdentityView,
    Page, Status, SymmetricKeyInput,
};
use crate::identity::IdentityKey;

#[derive(Args, Debug)]
pub struct KeyArgs {
    /// How it authenticates: a SAS token (keys), or a self-signed X.509 certificate (TLS
    /// client certificate whose thumbprint is registered)
    #[arg(long, value_enum, default_value_t = AuthArg::Sas)]
    auth: AuthArg,
    /// Base64 primary key [default: generated]
    #[arg(long)]
    primary_key: Option<String>,
    /// Base64 secondary key [default: generated]
    #[arg(long)]
    secondary_key: Option<String>,
    /// With --auth x509-thumbprint: the certificate's SHA-1 or SHA-256 thumbprint (hex)
    #[arg(long)]
    primary_thumbprint: Option<String>,
    /// With --auth x509-thumbprint: a second certificate's thumbprint (for rollover)
    #[arg(long)]
    secondary_thumbprint: Option<String>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum AuthArg {
    Sas,
    X509Thumbprint,
    /// A certificate chaining to a verified CA (`fleethub ca`), the device id as common name
    X509Ca,
}

impl KeyArgs {
    /// The authentication asked for, if any (the hub generates keys left out).
    fn authentication(&self) -> Option<AuthenticationInput> {
        let keys = (self.primary_key.is_some() || self.secondary_key.is_some()).then(|| {
            SymmetricKeyInput {
                primary_key: self.primary_key.clone(),
                secondary_key: self.secondary_key.clone(),
            }
        });
        match self.auth {
            AuthArg::Sas if keys.is_none() => None,
            AuthArg::Sas => Some(AuthenticationInput {
                kind: Some("sas".into()),
                symmetric_key: keys,
                x509_thumbprint: None,
            }),
            AuthArg::X509Ca => Some(AuthenticationInput {
                kind: Some(crate::registry::AUTH_CA.into()),
                symmetric_key: keys,
                x509_thumbprint: None,
            }),
            AuthArg::X509Thumbprint => Some(AuthenticationInput {
                kind: Some(crate::registry::AUTH_SELF_SIGNED.into()),
                symmetric_key: keys,
                x509_thumbprint: Some(crate::registry::X509Thumbprint {
                    primary_thumbprint: self.primary_thumbprint.clone(),
                    secondary_thumbprint: self.secondary_thumbprint.clone(),
                }),
            }),
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    Enabled,
    Disabled,
}

impl From<StatusArg> for Status {
    fn from(s: StatusArg) -> Status {
        match s {
            StatusArg::Enabled => Status::Enabled,
            StatusArg::Disabled => Status::Disabled,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum DeviceCmd {
    /// Register a device; prints its keys and connection string
    Create {
        id: String,
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        /// A gateway (IoT Edge device, child fleethub): messages it forwards keep their
        /// original device and module ids
        #[arg(long)]
        edge: bool,
        #[command(flatten)]
        keys: KeyArgs,
    },
    Show {
        id: String,
    },
    /// List devices (one page, or --all)
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        after: Option<String>,
        /// Follow pages to the end
        #[arg(long)]
        all: bool,
    },
    Update {
        id: String,
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        #[arg(long)]
        status_reason: Option<String>,
        /// Move the device into this group: "Product/Group" (it leaves its old group)
        #[arg(long)]
        device_group: Option<String>,
        #[command(flatten)]
        keys: KeyArgs,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ModuleCmd {
    /// Register a module of a device; prints its keys and connection string
    Create {
        device: String,
        module: String,
        #[command(flatten)]
        keys: KeyArgs,
    },
    Show {
        device: String,
        module: String,
    },
    List {
        device: String,
    },
    Delete {
        device: String,
        module: String,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum KeyChoice {
    Primary,
    Secondary,
}

#[derive(Args, Debug)]
pub struct SasTokenArgs {
    device: String,
    #[arg(long)]
    module: Option<String>,
    /// Validity, e.g. 1h, 30m, 7d
    #[arg(long, default_value = "1h")]
    duration: String,
    /// Which key signs the token
    #[arg(long, value_enum, default_value_t = KeyChoice::Primary)]
    key: KeyChoice,
}

/// An identity with the connection string an SDK takes.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WithConnectionString {
    #[serde(flatten)]
    view: IdentityView,
    connection_string: String,
}

fn key_of(device: &str, module: Option<&str>) -> Result<IdentityKey> {
    Ok(IdentityKey::parse(&match module {
        Some(m) => format!("{device}/{m}"),
        None => device.to_string(),
    })?)
}

async fn with_connection_string(ctx: &Ctx, view: IdentityView) -> Result<WithConnectionString> {
    let host = ctx.api.hub().await?.hostname;
    let i = &view.identity;
    let key = &i.authentication.symmetric_key.primary_key;
    let connection_string = match &i.module_id {
        Some(m) => format!(
            "HostName={host};DeviceId={};ModuleId={m};SharedAccessKey={key}",
            i.device_id
        ),
        None => format!(
            "HostName={host};DeviceId={};SharedAccessKey={key}",
            i.device_id
        ),
    };
    Ok(WithConnectionString {
        view,
        connection_string,
    })
}

fn describe(verb: &str, view: &IdentityView, connection_string: Option<&str>) -> String {
    let i = &view.identity;
    let name = match &i.module_id {
        Some(m) => format!("module {}/{m}", i.device_id),
        None => format!("device {}", i.device_id),
    };
    let keys = &i.authentication.symmetric_key;
    let mut out = format!("{verb} {name}\n");
    out += &format!("  status:           {}\n", status_str(i.status));
    out += &format!("  connectionState:  {:?}\n", view.connection_state);
    if let Some(t) = &i.last_activity_time {
        out += &format!("  lastActivityTime: {t}\n");
    }
    if let Some(g) = &view.device_group {
        out += &format!("  deviceGroup:      {g}\n");
    }
    out += &format!("  primaryKey:       {}\n", keys.primary_key);
    out += &format!("  secondaryKey:     {}", keys.secondary_key);
    if let Some(cs) = connection_string {
        out += &format!("\n  connectionString: {cs}");
    }
    out
}

fn status_str(s: Status) -> &'static str {
    match s {
        Status::Enabled => "enabled",
        Status::Disabled => "disabled",
    }
}

fn print_with_cs(ctx: &Ctx, verb: &str, v: &WithConnectionString) {
    ctx.print(v, |v| describe(verb, &v.view, Some(&v.connection_string)));
}

impl DeviceCmd {
    pub async fn run(&self, ctx: &Ctx) -> Result<()> {
        match self {
            DeviceCmd::Create {
                id,
                status,
                edge,
                keys,
            } => {
                let body = CreateDevice {
                    device_id: id.clone(),
                    status: status.map(Status::from),
                    authentication: keys.authentication(),
                    capabilities: edge.then_some(Capabilities { iot_edge: true }),
                };
                let view = ctx.api.create_device(&body).await?;
                print_with_cs(ctx, "Created", &with_connection_string(ctx, view).await?);
            }
            DeviceCmd::Show { id } => {
                let view = ctx.api.identity(&key_of(id, None)?).await?;
                print_with_cs(ctx, "Device", &with_connection_string(ctx, view).await?);
            }
            DeviceCmd::List { limit, after, all } => {
                let mut items = Vec::new();
                let mut after = after.clone();
                loop {
                    let page = ctx.api.list_devices(*limit, after.as_deref()).await?;
                    items.extend(page.items);
                    after = page.next;
                    if *all && after.is_some() {
                        ctx.progress(&format!("… {} devices so far", items.len()));
                        continue;
                    }
                    break;
                }
                let page = Page { items, next: after };
                ctx.print(&page, |p| {
                    let mut out = format!(
                        "{:<40} {:<9} {:<13} LAST ACTIVITY",
                        "DEVICE", "STATUS", "CONNECTION"
                    );
                    for d in &p.items {
                        out += &format!(
                            "\n{:<40} {:<9} {:<13} {}",
                            d.identity.device_id.as_str(),
                            status_str(d.identity.status),
                            format!("{:?}", d.connection_state),
                            d.identity.last_activity_time.as_deref().unwrap_or("-")
                        );
                    }
                    if let Some(n) = &p.next {
                        out += &format!("\n(more: --after {n})");
                    }
                    out
                });
            }
            DeviceCmd::Update {
                id,
                status,
                status_reason,
                device_group,
                keys,
            } => {
                let update = IdentityUpdate {
                    status: status.map(Status::from),
                    status_reason: status_reason.clone(),
                    authentication: keys.authentication(),
                    capabilities: None,
                    device_group: device_group.clone(),
                };
                let view = ctx.api.update_identity(&key_of(id, None)?, &update).await?;
                ctx.print(&view, |v| describe("Updated", v, None));
            }
            DeviceCmd::Delete { id } => {
                ctx.api.delete_identity(&key_of(id, None)?).await?;
                ctx.deleted("device", id);
            }
        }
        Ok(())
    }
}

impl ModuleCmd {
    pub async fn run(&self, ctx: &Ctx) -> Result<()> {
        match self {
            ModuleCmd::Create {
                device,
                module,
                keys,
            } => {
                let body = CreateModule {
                    module_id: module.clone(),
                    authentication: keys.authentication(),
                };
                let view = ctx.api.create_module(device, &body).await?;
                print_with_cs(ctx, "Created", &with_connection_string(ctx, view).await?);
            }
            ModuleCmd::Show { device, module } => {
                let view = ctx.api.identity(&key_of(device, Some(module))?).await?;
                print_with_cs(ctx, "Module", &with_connection_string(ctx, view).await?);
            }
            ModuleCmd::List { device } => {
                let page = ctx.api.list_modules(device).await?;
                ctx.print(&page, |p| {
                    let mut out = format!("{:<40} {:<9} CONNECTION", "MODULE", "STATUS");
                    for m in &p.items {
                        out += &format!(
                            "\n{:<40} {:<9} {:?}",
                            m.identity
                                .module_id
                                .as_ref()
                                .map(|m| m.as_str())
                                .unwrap_or(""),
                            status_str(m.identity.status),
                            m.connection_state
                        );
                    }
                    out
                });
            }
            ModuleCmd::Delete { device, module } => {
                ctx.api
                    .delete_identity(&key_of(device, Some(module))?)
                    .await?;
                ctx.deleted("module", &format!("{device}/{module}"));
            }
        }
        Ok(())
    }
}

/// What `sas-token --output json` prints.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SasTokenOut {
    sas_token: String,
    expiry: u64,
    client_id: String,
    username: String,
}

impl SasTokenArgs {
    pub async fn run(&self, ctx: &Ctx) -> Result<()> {
        let duration = parse_duration(&self.duration)?;
        let identity = key_of(&self.device, self.module.as_deref())?;
        let record = ctx.api.identity(&identity).await?;
        let keys = record.identity.authentication.symmetric_key;
        let key_b64 = match self.key {
            KeyChoice::Primary => keys.primary_key,
            KeyChoice::Secondary => keys.secondary_key,
        };
        let host = ctx.api.hub().await?.hostname;
        let expiry = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + duration.as_secs();
        let resource = crate::sas::resource_for(&host, &identity);
        let token = crate::sas::generate(&resource, &key_b64, expiry)?;
        let out = SasTokenOut {
            sas_token: token,
            expiry,
            client_id: identity.to_string(),
            username: format!("{host}/{identity}/?api-version=2021-04-12"),
        };
        ctx.print(&out, |o| o.sas_token.clone());
        Ok(())
    }
}
