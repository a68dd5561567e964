//! `method` and `c2d`: what the cloud sends a device.

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};

use super::{parse_duration, Ctx};
use crate::api::wire::{C2dMessage, MethodCall};
use crate::identity::IdentityKey;

#[derive(Subcommand, Debug)]
pub enum MethodCmd {
    /// Call a direct method and print the device's answer
    Invoke {
        device: String,
        method: String,
        #[arg(long)]
        module: Option<String>,
        /// JSON payload
        #[arg(long, default_value = "null")]
        payload: String,
        /// Seconds to wait for the answer
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum C2dCmd {
    /// Queue a message for a device (delivered when it is connected and subscribed)
    Send {
        device: String,
        /// Message body (sent as UTF-8 text)
        #[arg(long)]
        body: String,
        /// Application property, repeatable: --property key=value
        #[arg(long = "property", value_name = "KEY=VALUE")]
        properties: Vec<String>,
        #[arg(long)]
        message_id: Option<String>,
        /// Time to live, e.g. 1h (default) or 10m
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

impl MethodCmd {
    pub async fn run(&self, ctx: &Ctx) -> Result<()> {
        let MethodCmd::Invoke {
            device,
            method,
            module,
            payload,
            timeout,
        } = self;
        let payload: Value = serde_json::from_str(payload).context("--payload is not JSON")?;
        let key = IdentityKey::parse(&match module {
            Some(m) => format!("{device}/{m}"),
            None => device.clone(),
        })?;
        let call = MethodCall {
            method_name: method.clone(),
            payload,
            response_timeout_in_seconds: Some(*timeout),
            connect_timeout_in_seconds: None,
        };
        let result = ctx.api.invoke_method(&key, &call).await?;
        ctx.print(&result, |r| {
            format!(
                "status: {}\npayload: {}",
                r.status,
                serde_json::to_string_pretty(&r.payload).unwrap_or_default()
            )
        });
        Ok(())
    }
}

impl C2dCmd {
    pub async fn run(&self, ctx: &Ctx) -> Result<()> {
        let C2dCmd::Send {
            device,
            body,
            properties,
            message_id,
            ttl,
        } = self;
        let mut props = serde_json::Map::new();
        for p in properties {
            let (k, v) = p
                .split_once('=')
                .with_context(|| format!("--property '{p}' is not KEY=VALUE"))?;
            props.insert(k.to_string(), json!(v));
        }
        let message = C2dMessage {
            body: json!(body),
            properties: props,
            message_id: message_id.clone(),
            ttl_seconds: Some(parse_duration(ttl)?.as_secs()),
        };
        let queued = ctx.api.send_c2d(device, &message).await?;
        ctx.print(&queued, |q| {
            format!(
                "Queued message {} for {device} (expires {})",
                q.message_id, q.expiry_time_utc
            )
        });
        Ok(())
    }
}
