//! `/devices/{d}/methods`: direct method calls.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};

use super::wire::{MethodCall, MethodResult};
use super::{device_key, module_key, registered, ApiError, ApiResult, ApiState};
use crate::cluster::bus::{MethodOutcome, MethodRequest};
use crate::hub::SharedHub;
use crate::identity::IdentityKey;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/devices/{device}/methods", post(device_method))
        .route(
            "/devices/{device}/modules/{module}/methods",
            post(module_method),
        )
}

async fn invoke(
    hub: &SharedHub,
    key: IdentityKey,
    body: Result<Json<MethodCall>, JsonRejection>,
) -> ApiResult<Json<MethodResult>> {
    registered(hub, &key)?;
    let Json(call) = body?;
    let _ = call.connect_timeout_in_seconds;
    if call.method_name.is_empty() || call.method_name.contains(['/', '#', '+', '?']) {
        return Err(ApiError::BadRequest(format!(
            "methodName '{}': must be non-empty without / # + ?",
            call.method_name
        )));
    }
    let timeout = call.response_timeout_in_seconds.unwrap_or(30);
    if !(1..=300).contains(&timeout) {
        return Err(ApiError::BadRequest(format!(
            "responseTimeoutInSeconds {timeout}: must be 1 to 300"
        )));
    }
    let request = MethodRequest {
        method_name: call.method_name.clone(),
        payload: call.payload,
        timeout_secs: timeout,
    };
    // Connected here (or no other node to ask): called here. Otherwise the node that holds
    // the connection calls it, found through NATS.
    let outcome = match hub.cluster.bus() {
        Some(bus) if !hub.live.contains_key(&key) => bus.call_method(&key, &request).await,
        _ => call_here(hub.clone(), key.clone(), request).await,
    };
    let result = match outcome {
        MethodOutcome::Answered { status, payload } => Ok(Json(MethodResult { status, payload })),
        // As IoT Hub: a device that cannot take the call now gets an answer now.
        MethodOutcome::Offline(why) => Err(ApiError::DeviceNotOnline(why)),
        MethodOutcome::Timeout(why) => Err(ApiError::GatewayTimeout(why)),
    };
    let counted = match &result {
        Ok(_) => "ok",
        Err(ApiError::DeviceNotOnline(_)) => "offline",
        Err(_) => "timeout",
    };
    hub.metrics.method_calls.with_label_values(&[counted]).inc();
    result
}

/// Calls a method on a connection of this node and waits for its answer (the API's calls,
/// and calls other nodes forward here).
pub async fn call_here(hub: SharedHub, key: IdentityKey, request: MethodRequest) -> MethodOutcome {
    if !hub.takes_methods(&key) {
        let why = if hub.live.contains_key(&key) {
            "is connected but not subscribed to method requests"
        } else {
            "is not connected"
        };
        return MethodOutcome::Offline(format!("{} {why}", crate::registry::describe(&key)));
    }
    let (rid, reply) = hub.methods.register(&key);
    let suffix = format!("{}/?$rid={rid}", request.method_name);
    hub.deliver(
        &key,
        crate::topics::Delivery::MethodRequest,
        &suffix,
        request.payload.to_string().as_bytes(),
    );
    let within = std::time::Duration::from_secs(request.timeout_secs);
    match tokio::time::timeout(within, reply).await {
        Ok(Ok(r)) => MethodOutcome::Answered {
            status: r.status,
            payload: r.payload,
        },
        _ => {
            hub.methods.forget(&key, &rid);
            MethodOutcome::Timeout(format!(
                "{} did not answer '{}' within {} s",
                crate::registry::describe(&key),
                request.method_name,
                request.timeout_secs
            ))
        }
    }
}

async fn device_method(
    State(hub): State<SharedHub>,
    Path(device): Path<String>,
    body: Result<Json<MethodCall>, JsonRejection>,
) -> ApiResult<Json<MethodResult>> {
    invoke(&hub, device_key(&device)?, body).await
}

async fn module_method(
    State(hub): State<SharedHub>,
    Path((device, module)): Path<(String, String)>,
    body: Result<Json<MethodCall>, JsonRejection>,
) -> ApiResult<Json<MethodResult>> {
    invoke(&hub, module_key(&device, &module)?, body).await
}
