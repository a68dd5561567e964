//! `/devices` and `/devices/{d}/modules`: the identity registry.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::wire::{CreateDevice, CreateModule, IdentityView, Page, PageQuery};
use super::{blocking, device_key, module_key, ApiError, ApiResult, ApiState};
use crate::hub::{Change, SharedHub};
use crate::identity::IdentityKey;
use crate::registry::{AuthenticationInput, IdentityUpdate, Status};

/// The modules IoT Hub creates with an IoT Edge device.
const EDGE_MODULES: [&str; 2] = ["$edgeAgent", "$edgeHub"];

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

async fn create(
    hub: &SharedHub,
    key: IdentityKey,
    status: Option<Status>,
    auth: Option<AuthenticationInput>,
    capabilities: crate::registry::Capabilities,
) -> ApiResult<Response> {
    let device = key.device.clone();
    let view = blocking(hub, move |h| {
        let view = h
            .registry
            .create_with(&key, status, auth, capabilities)
            .map(|i| h.registry.view(&i))?;
        // As IoT Hub does for an IoT Edge device: its agent's and hub's module identities,
        // so module content deployed to it is written and reported on without a manual step.
        if capabilities.iot_edge && key.module.is_none() {
            for module in EDGE_MODULES {
                let module_key = IdentityKey::module(
                    key.device.clone(),
                    crate::identity::ModuleId::new(module)
                        .map_err(|e| crate::registry::RegistryError::Store(e.to_string()))?,
                );
                if h.registry.get(&module_key).is_none() {
                    h.registry
                        .create_with(&module_key, None, None, Default::default())?;
                }
            }
        }
        Ok::<_, crate::registry::RegistryError>(view)
    })
    .await??;
    hub.changed(Change::Registered(device))
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

fn show(hub: &SharedHub, key: &IdentityKey) -> ApiResult<Json<IdentityView>> {
    let identity = hub.registry.get(key).ok_or_else(|| {
        ApiError::NotFound(format!("{} not found", crate::registry::describe(key)))
    })?;
    Ok(Json(hub.identity_view(&identity)))
}

async fn get_device(
    State(hub): State<SharedHub>,
    Path(device): Path<String>,
) -> ApiResult<Json<IdentityView>> {
    show(&hub, &device_key(&device)?)
}

async fn get_module(
    State(hub): State<SharedHub>,
    Path((device, module)): Path<(String, String)>,
) -> ApiResult<Json<IdentityView>> {
    show(&hub, &module_key(&device, &module)?)
}

async fn list_devices(
    State(hub): State<SharedHub>,
    Query(page): Query<PageQuery>,
) -> ApiResult<Json<Page<IdentityView>>> {
    let limit = page.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit {limit}: must be 1 to 1000"
        )));
    }
    let (items, next) = hub.registry.list_devices(limit, page.after.as_deref());
    let items = items.iter().map(|i| hub.identity_view(i)).collect();
    Ok(Json(Page { items, next }))
}

async fn list_modules(
    State(hub): State<SharedHub>,
    Path(device): Path<String>,
) -> ApiResult<Json<Page<IdentityView>>> {
    let key = device_key(&device)?;
    if hub.registry.get(&key).is_none() {
        return Err(ApiError::NotFound(format!("device '{device}' not found")));
    }
    let items = hub
        .registry
        .modules_of(&key.device)
        .iter()
        .map(|i| hub.registry.view(i))
        .collect();
    Ok(Json(Page { items, next: None }))
}

async fn update(
    hub: &SharedHub,
    key: IdentityKey,
    update: IdentityUpdate,
) -> ApiResult<Json<IdentityView>> {
    let disables = update.status == Some(Status::Disabled) || update.authentication.is_some();
    let moves = update.device_group.is_some();
    let k = key.clone();
    let view = blocking(hub, move |h| -> ApiResult<IdentityView> {
        // The group first: a bad path refuses the whole update.
        if let Some(path) = &update.device_group {
            h.fleet.assign(&h.registry, &k, path)?;
        }
        let i = h.registry.update(&k, update)?;
        Ok(h.identity_view(&i))
    })
    .await??;
    if moves {
        // Its new group's deployment, and none of the old group's; targeted deployments
        // may select on the group too.
        hub.changed(Change::Moved(key.device.clone()))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
    }
    if disables {
        // A disabled identity, or one whose keys changed, must connect again.
        hub.kick(&key);
    }
    Ok(Json(view))
}

async fn update_device(
    State(hub): State<SharedHub>,
    Path(device): Path<String>,
    body: Result<Json<IdentityUpdate>, JsonRejection>,
) -> ApiResult<Json<IdentityView>> {
    let Json(body) = body?;
    update(&hub, device_key(&device)?, body).await
}

async fn update_module(
    State(hub): State<SharedHub>,
    Path((device, module)): Path<(String, String)>,
    body: Result<Json<IdentityUpdate>, JsonRejection>,
) -> ApiResult<Json<IdentityView>> {
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
