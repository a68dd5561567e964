//! `/devices/{d}/messages`: cloud-to-device messages.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

use super::wire::{C2dMessage, C2dQueued};
use super::{blocking, device_key, registered, ApiError, ApiResult, ApiState};
use crate::hub::SharedHub;

pub fn routes() -> Router<ApiState> {
    Router::new().route("/devices/{device}/messages", post(send_c2d))
}

async fn send_c2d(
    State(hub): State<SharedHub>,
    Path(device): Path<String>,
    body: Result<Json<C2dMessage>, JsonRejection>,
) -> ApiResult<Response> {
    let key = device_key(&device)?;
    registered(&hub, &key)?;
    let Json(msg) = body?;
    let ttl = msg.ttl_seconds.unwrap_or(3600);
    if !(1..=172_800).contains(&ttl) {
        return Err(ApiError::BadRequest(format!(
            "ttlSeconds {ttl}: must be 1 to 172800"
        )));
    }
    let mut properties = Vec::new();
    for (k, v) in msg.properties {
        let v = match v {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        properties.push((k, v));
    }
    let bytes = match msg.body {
        serde_json::Value::String(s) => s.into_bytes(),
        other => other.to_string().into_bytes(),
    };
    let message_id = msg
        .message_id
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
    let ttl_ms = ttl * 1000;
    // Stored here (on a cluster node: in the queue every node shares), then delivered by
    // whichever node holds the device's connection.
    let queued = enqueue_here(&hub, &key, message_id, bytes, properties, ttl_ms).await?;
    if let Some(bus) = hub.cluster.bus() {
        if !hub.live.contains_key(&key) {
            bus.wake_c2d(&key).await;
        }
    }
    let (message_id, enqueued_time, expires_at_ms) = (
        queued.message_id,
        queued.enqueued_time,
        queued.expires_at_ms,
    );
    let expires = std::time::UNIX_EPOCH + std::time::Duration::from_millis(expires_at_ms);
    Ok((
        StatusCode::ACCEPTED,
        Json(C2dQueued {
            message_id,
            enqueued_time,
            expiry_time_utc: humantime::format_rfc3339_millis(expires).to_string(),
        }),
    )
        .into_response())
}

/// Stores a C2D message in the durable queue (on a cluster node, the shared one) and wakes
/// the device's connection if it is here.
pub async fn enqueue_here(
    hub: &SharedHub,
    key: &crate::identity::IdentityKey,
    message_id: String,
    bytes: Vec<u8>,
    properties: Vec<(String, String)>,
    ttl_ms: u64,
) -> ApiResult<crate::c2d::C2dMessage> {
    let dev = key.device.to_string();
    let queued = blocking(hub, move |h| {
        h.c2d.enqueue(&dev, message_id, &bytes, properties, ttl_ms)
    })
    .await?
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    hub.metrics
        .c2d_messages
        .with_label_values(&["queued"])
        .inc();
    if let Some(live) = hub.live.get(key) {
        live.mailbox.wake_c2d();
    }
    Ok(queued)
}
