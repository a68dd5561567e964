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
    let dev = device.clone();
    let queued = blocking(&hub, move |h| {
        h.c2d
            .enqueue(&dev, message_id, &bytes, properties, ttl * 1000)
    })
    .await?
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    hub.metrics
        .c2d_messages
        .with_label_values(&["queued"])
        .inc();
    if let Some(live) = hub.live.get(&key) {
        live.mailbox.wake_c2d();
    }
    let expires = std::time::UNIX_EPOCH + std::time::Duration::from_millis(queued.expires_at_ms);
    Ok((
        StatusCode::ACCEPTED,
        Json(C2dQueued {
            message_id: queued.message_id,
            enqueued_time: queued.enqueued_time,
            expiry_time_utc: humantime::format_rfc3339_millis(expires).to_string(),
        }),
    )
        .into_response())
}
