//! The management HTTP API: identities now, twins, routes and deployments as they land.
//!
//! Every route but `/metrics` and `/health` needs `Authorization: Bearer {admin token}`.
//! Errors are JSON `{"error": "...", "message": "..."}` with a precise message (field name,
//! id rule broken), never a bare status.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::hub::{Hub, SharedHub};
use crate::identity::{DeviceId, IdError, IdentityKey, ModuleId};
use crate::registry::{AuthenticationInput, IdentityUpdate, RegistryError, Status};

/// An API failure, rendered as JSON with its status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::InvalidId(_) | RegistryError::Invalid { .. } => {
                ApiError::BadRequest(e.to_string())
            }
            RegistryError::Exists(_) => ApiError::Conflict(e.to_string()),
            RegistryError::NotFound(_) => ApiError::NotFound(e.to_string()),
            RegistryError::Store(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<IdError> for ApiError {
    fn from(e: IdError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::BadRequest(format!("request body: {}", e.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "Unauthorized"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "NotFound"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "Conflict"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "Internal"),
        };
        (
            status,
            Json(json!({"error": kind, "message": self.to_string()})),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub fn router(hub: SharedHub) -> Router {
    let authed = Router::new()
        .route("/hub", get(hub_info))
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
        .layer(middleware::from_fn_with_state(hub.clone(), require_token));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok" }))
        .merge(authed)
        .fallback(|| async { ApiError::NotFound("no such API route".into()) })
        .with_state(hub)
}

async fn require_token(State(hub): State<SharedHub>, request: Request, next: Next) -> Response {
    let ok = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| hub.is_admin_token(t.trim()));
    if ok {
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

/// Runs registry work (fsynced redb commits) off the async workers.
async fn blocking<T: Send + 'static>(
    hub: &SharedHub,
    f: impl FnOnce(&Hub) -> T + Send + 'static,
) -> ApiResult<T> {
    let hub = hub.clone();
    tokio::task::spawn_blocking(move || f(&hub))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))
}

async fn metrics(State(hub): State<SharedHub>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        hub.metrics.render(),
    )
}

async fn hub_info(State(hub): State<SharedHub>) -> Json<serde_json::Value> {
    Json(json!({
        "hostname": hub.config.hostname,
        "version": env!("CARGO_PKG_VERSION"),
        "endpoints": hub.endpoints.get(),
        "devices": hub.registry.device_count(),
        "connections": hub.metrics.connections.get(),
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateDevice {
    device_id: String,
    status: Option<Status>,
    authentication: Option<AuthenticationInput>,
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

fn device_key(device: &str) -> ApiResult<IdentityKey> {
    Ok(IdentityKey::device(DeviceId::new(device)?))
}

fn module_key(device: &str, module: &str) -> ApiResult<IdentityKey> {
    Ok(IdentityKey::module(
        DeviceId::new(device)?,
        ModuleId::new(module)?,
    ))
}

async fn create(
    hub: &SharedHub,
    key: IdentityKey,
    status: Option<Status>,
    auth: Option<AuthenticationInput>,
) -> ApiResult<Response> {
    let view = blocking(hub, move |h| {
        h.registry
            .create(&key, status, auth)
            .map(|i| h.registry.view(&i))
    })
    .await??;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn create_device(
    State(hub): State<SharedHub>,
    body: Result<Json<CreateDevice>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body?;
    let key = device_key(&body.device_id)?;
    create(&hub, key, body.status, body.authentication).await
}

async fn create_module(
    State(hub): State<SharedHub>,
    Path(device): Path<String>,
    body: Result<Json<CreateModule>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body?;
    let key = module_key(&device, &body.module_id)?;
    create(&hub, key, None, body.authentication).await
}

fn show(hub: &SharedHub, key: &IdentityKey) -> ApiResult<Json<serde_json::Value>> {
    let identity = hub.registry.get(key).ok_or_else(|| {
        ApiError::NotFound(format!("{} not found", crate::registry::describe(key)))
    })?;
    Ok(Json(json!(hub.registry.view(&identity))))
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
    let items: Vec<_> = items.iter().map(|i| hub.registry.view(i)).collect();
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
    let k = key.clone();
    let view = blocking(hub, move |h| {
        h.registry.update(&k, update).map(|i| h.registry.view(&i))
    })
    .await??;
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
