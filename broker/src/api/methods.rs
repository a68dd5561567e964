//! `/devices/{d}/methods`: direct method calls.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};

use super::wire::{MethodCall, MethodResult};
use super::{device_key, module_key, registered, ApiError, ApiResult, ApiState};
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
    // As IoT Hub: a device that cannot take the call now gets an answer now, not a timeout.
    if !hub.takes_methods(&key) {
        hub.metrics
            .method_calls
            .with_label_values(&["offline"])
            .inc();
        let why = if hub.live.contains_key(&key) {
            "is connected but not subscribed to method requests"
        } else {
            "is not connected"
        };
        return Err(ApiError::DeviceNotOnline(format!(
            "{} {why}",
            crate::registry::describe(&key)
        )));
    }
    let (rid, reply) = hub.methods.register(&key);
    let suffix = format!("{}/?$rid={rid}", call.method_name);
    hub.deliver(
        &key,
        crate::topics::Delivery::MethodRequest,
        &suffix,
        call.payload.to_string().as_bytes(),
    );
    match tokio::time::timeout(std::time::Duration::from_secs(timeout), reply).await {
        Ok(Ok(r)) => {
            hub.metrics.method_calls.with_label_values(&["ok"]).inc();
            Ok(Json(MethodResult {
                status: r.status,
                payload: r.payload,
            }))
        }
        _ => {
            hub.methods.forget(&key, &rid);
            hub.metrics
                .method_calls
                .with_label_values(&["timeout"])
                .inc();
            Err(ApiError::GatewayTimeout(format!(
                "{} did not answer '{}' within {timeout} s",
                crate::registry::describe(&key),
                call.method_name
            )))
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
