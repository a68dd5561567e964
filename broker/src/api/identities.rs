//! `/devices` and `/devices/{d}/modules`: the identity registry.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{blocking, device_key, module_key, ApiError, ApiResult, ApiState};
use crate::hub::{Change, Hub, SharedHub};
use crate::identity::IdentityKey;
use crate::registry::{AuthenticationInput, IdentityUpdate, Status};

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/devices", get(list_devices).post(create_device))
        .route(
            "/devices/{device}",
            get(get_device).patch(update_device).delete(delete_device),
        )
        .route(
            "/devices/{device}/modules",
            get(list_modules).post(create_module),
        )
        .route(
            "/devices/{device}/modules/{module}",
            get(get_module).patch(update_module).delete(delete_module),
        )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateDevice {
    device_id: String,
    status: Option<Status>,
    authentication: Option<AuthenticationInput>,
    capabilities: Option<crate::registry::Capabilities>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateModule {
    module_id: String,
    authentication: Option<AuthenticationInput>,
}

#[derive(Deserialize)]
struct Page {
    limit: Option<usize>,
    after: Option<String>,
}

async fn create(
    hub: &SharedHub,
    key: IdentityKey,
    status: Option<Status>,
    auth: Option<AuthenticationInput>,
    capabilities: crate::registry::Capabilities,
) -> ApiResult<Response> {
    let device = key.device.clone();
    let view = blocking(hub, move |h| {
        h.registry
            .create_with(&key, status, auth, capabilities)
            .map(|i| h.registry.view(&i))
    })
    .await??;
    hub.devices_changed(vec![device], Change::Registered)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn create_device(
    State(hub): State<SharedHub>,
    body: Result<Json<CreateDevice>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body?;
    let key = device_key(&body.device_id)?;
    let caps = body.capabilities.unwrap_or_default();
    create(&hub, key, body.status, body.authentication, caps).await
}

async fn create_module(
    State(hub): State<SharedHub>,
    Path(device): Path<String>,
    body: Result<Json<CreateModule>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body?;
    let key = module_key(&device, &body.module_id)?;
    create(&hub, key, None, body.authentication, Default::default()).await
}

/// An identity as the API shows it: the registry view plus its device group's
/// `Product/Group` path.
fn identity_json(hub: &Hub, view: crate::registry::IdentityView) -> serde_json::Value {
    let group = hub.group_path(&view.identity);
    let mut v = json!(view);
    if let Some(path) = group {
        v["deviceGroup"] = json!(path);
    }
    v
}

fn show(hub: &SharedHub, key: &IdentityKey) -> ApiResult<Json<serde_json::Value>> {
    let identity = hub.registry.get(key).ok_or_else(|| {
        ApiError::NotFound(format!("{} not found", crate::registry::describe(key)))
    })?;
    Ok(Json(identity_json(hub, hub.registry.view(&identity))))
}

async fn get_device(
    State(hub): State<SharedHub>,
    Path(device): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    show(&hub, &device_key(&device)?)
}

async fn get_module(
    State(hub): State<SharedHub>,
    Path((device, module)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    show(&hub, &module_key(&device, &module)?)
}

async fn list_devices(
    State(hub): State<SharedHub>,
    Query(page): Query<Page>,
) -> ApiResult<Json<serde_json::Value>> {
    let limit = page.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit {limit}: must be 1 to 1000"
        )));
    }
    let (items, next) = hub.registry.list_devices(limit, page.after.as_deref());
    let items: Vec<_> = items
        .iter()
        .map(|i| identity_json(&hub, hub.registry.view(i)))
        .collect();
    Ok(Json(json!({ "items": items, "next": next })))
}

async fn list_modules(
    State(hub): State<SharedHub>,
    Path(device): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let key = device_key(&device)?;
    if hub.registry.get(&key).is_none() {
        return Err(ApiError::NotFound(format!("device '{device}' not found")));
    }
    let items: Vec<_> = hub
        .registry
        .modules_of(&key.device)
        .iter()
        .map(|i| hub.registry.view(i))
        .collect();
    Ok(Json(json!({ "items": items, "next": null })))
}

async fn update(
    hub: &SharedHub,
    key: IdentityKey,
    update: IdentityUpdate,
) -> ApiResult<Json<serde_json::Value>> {
    let disables = update.status == Some(Status::Disabled) || update.authentication.is_some();
    let moves = update.device_group.is_some();
    let k = key.clone();
    let view = blocking(hub, move |h| -> ApiResult<serde_json::Value> {
        // The group first: a bad path refuses the whole update.
        if let Some(path) = &update.device_group {
            h.fleet.assign(&h.registry, &k, path)?;
        }
        let i = h.registry.update(&k, update)?;
        Ok(identity_json(h, h.registry.view(&i)))
    })
    .await??;
    if moves {
        // Its new group's deployment, and none of the old group's; targeted deployments
        // may select on the group too.
        hub.devices_changed(vec![key.device.clone()], Change::Moved)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
    }
    if disables {
        // A disabled identity, or one whose keys changed, must connect again.
        hub.kick(&key);
    }
    Ok(Json(json!(view)))
}

async fn update_device(
    State(hub): State<SharedHub>,
    Path(device): Path<String>,
    body: Result<Json<IdentityUpdate>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Json(body) = body?;
    update(&hub, device_key(&device)?, body).await
}

async fn update_module(
    State(hub): State<SharedHub>,
    Path((device, module)): Path<(String, String)>,
    body: Result<Json<IdentityUpdate>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Json(body) = body?;
    update(&hub, module_key(&device, &module)?, body).await
}

async fn delete(hub: &SharedHub, key: IdentityKey) -> ApiResult<StatusCode> {
    let gone = blocking(hub, move |h| h.registry.delete(&key)).await??;
    for k in &gone {
        hub.kick(k);
        if let Err(e) = hub.sessions.remove(&k.to_string()).await {
            tracing::warn!(identity = %k, error = %e, "could not remove a deleted identity's session");
        }
        let _ = hub
            .twins
            .apply(k.clone(), crate::twin::TwinOp::Delete)
            .await;
        if k.module.is_none() {
            let device = k.device.to_string();
            let _ = blocking(hub, move |h| h.c2d.purge(&device)).await;
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_device(
    State(hub): State<SharedHub>,
    Path(device): Path<String>,
) -> ApiResult<StatusCode> {
    delete(&hub, device_key(&device)?).await
}

async fn delete_module(
    State(hub): State<SharedHub>,
    Path((device, module)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    delete(&hub, module_key(&device, &module)?).await
}
