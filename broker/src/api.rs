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

mod deployments;
mod fleet;
mod images;

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
    PreconditionFailed(String),
    #[error("{0}")]
    GatewayTimeout(String),
    /// IoT Hub's 404103: a method for a device that is not connected or not listening.
    #[error("{0}")]
    DeviceNotOnline(String),
    #[error("route set refused: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    InvalidRoutes(Vec<fleethub_router::route::RouteError>),
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
        if let ApiError::InvalidRoutes(errors) = &self {
            let list: Vec<serde_json::Value> = errors
                .iter()
                .map(|e| json!({"name": e.name, "source": e.origin, "message": e.message, "column": e.column}))
                .collect();
            let body = json!({"error": "BadRequest", "message": self.to_string(), "errors": list});
            return (StatusCode::BAD_REQUEST, Json(body)).into_response();
        }
        if let ApiError::DeviceNotOnline(_) = &self {
            let body = json!({"error": "DeviceNotOnline", "errorCode": 404103, "message": self.to_string()});
            return (StatusCode::NOT_FOUND, Json(body)).into_response();
        }
        let (status, kind) = match &self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "Unauthorized"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "NotFound"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "Conflict"),
            ApiError::PreconditionFailed(_) => {
                (StatusCode::PRECONDITION_FAILED, "PreconditionFailed")
            }
            ApiError::GatewayTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "GatewayTimeout"),
            ApiError::DeviceNotOnline(_) => (StatusCode::NOT_FOUND, "DeviceNotOnline"),
            ApiError::InvalidRoutes(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
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
        .route("/twins/query", axum::routing::post(query_twins))
        .route(
            "/twins/{device}",
            get(get_device_twin).patch(patch_device_twin),
        )
        .route(
            "/twins/{device}/modules/{module}",
            get(get_module_twin).patch(patch_module_twin),
        )
        .route(
            "/devices/{device}/methods",
            axum::routing::post(device_method),
        )
        .route(
            "/devices/{device}/modules/{module}/methods",
            axum::routing::post(module_method),
        )
        .route("/devices/{device}/messages", axum::routing::post(send_c2d))
        .route("/routes", get(list_routes))
        .route("/queues", get(list_queues))
        .route("/routes/check", axum::routing::post(check_route))
        .merge(fleet::routes())
        .merge(images::routes())
        .merge(deployments::routes())
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
    hub.metrics.sessions.set(hub.sessions.len() as i64);
    hub.metrics.observe_queues(
        &fleethub_router::queue::Queue::stats(&*hub.queues),
        crate::c2d::now_ms(),
    );
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        hub.metrics.render(),
    )
}

async fn hub_info(State(hub): State<SharedHub>) -> Json<serde_json::Value> {
    Json(json!({
        "id": hub.config.hub_id.as_str(),
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
    capabilities: crate::registry::Capabilities,
) -> ApiResult<Response> {
    let device = key.device.clone();
    let view = blocking(hub, move |h| {
        h.registry
            .create_with(&key, status, auth, capabilities)
            .map(|i| h.registry.view(&i))
    })
    .await??;
    if !hub.deployments.is_empty() {
        // A new device may be targeted; a new module may be a deployment's target twin.
        crate::deploy::targeted::reconcile(hub, vec![device])
            .await
            .map_err(ApiError::Internal)?;
    }
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
        crate::deploy::devices_changed(hub, vec![key.device.clone()])
            .await
            .map_err(ApiError::Internal)?;
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

// ---------------------------------------------------------------------------------------
// Twins

fn registered(
    hub: &SharedHub,
    key: &IdentityKey,
) -> ApiResult<std::sync::Arc<crate::registry::Identity>> {
    hub.registry
        .get(key)
        .ok_or_else(|| ApiError::NotFound(format!("{} not found", crate::registry::describe(key))))
}

fn twin_json(hub: &SharedHub, key: &IdentityKey) -> ApiResult<Json<serde_json::Value>> {
    let identity = registered(hub, key)?;
    let twin = hub.twins.get(key);
    hub.metrics.twin_reads.with_label_values(&["ok"]).inc();
    Ok(Json(crate::twin::view::api_json(
        key,
        &twin,
        Some(&hub.registry.view(&identity)),
    )))
}

async fn get_device_twin(
    State(hub): State<SharedHub>,
    Path(device): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    twin_json(&hub, &device_key(&device)?)
}

async fn get_module_twin(
    State(hub): State<SharedHub>,
    Path((device, module)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    twin_json(&hub, &module_key(&device, &module)?)
}

/// `{"tags": {...}, "properties": {"desired": {...}}}`; reported properties are the device's.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TwinPatch {
    tags: Option<serde_json::Value>,
    properties: Option<TwinPatchProperties>,
    // Read-only fields a client may echo back from a GET; ignored.
    #[serde(rename = "deviceId")]
    _device_id: Option<serde_json::Value>,
    #[serde(rename = "moduleId")]
    _module_id: Option<serde_json::Value>,
    #[serde(rename = "etag")]
    _etag: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TwinPatchProperties {
    desired: Option<serde_json::Value>,
    reported: Option<serde_json::Value>,
}

async fn patch_twin(
    hub: &SharedHub,
    key: IdentityKey,
    headers: &axum::http::HeaderMap,
    body: Result<Json<TwinPatch>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    use crate::twin::{doc, TwinError, TwinOp};
    let identity = registered(hub, &key)?;
    let Json(body) = body?;
    let bad = |e: doc::PatchError| ApiError::BadRequest(e.to_string());
    let mut desired = None;
    if let Some(props) = body.properties {
        if props.reported.is_some() {
            return Err(ApiError::BadRequest(
                "properties.reported: reported properties are written by the device only".into(),
            ));
        }
        if let Some(d) = props.desired {
            desired = Some(doc::validate("properties.desired", d).map_err(bad)?);
        }
    }
    let tags = body
        .tags
        .map(|t| doc::validate("tags", t))
        .transpose()
        .map_err(bad)?;
    let if_match = headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().trim_matches('"').to_string());
    let section = match (&tags, &desired) {
        (Some(_), None) => "tags",
        _ => "desired",
    };
    // Routes live in the $edgeHub twin: a desired change must leave a valid route set, or
    // it is refused whole and the table in force stays.
    let is_edge_hub = key.device == hub.config.hub_id
        && key
            .module
            .as_ref()
            .is_some_and(|m| m.as_str() == crate::routing::EDGE_HUB);
    let _routes_guard = if is_edge_hub && desired.is_some() {
        Some(hub.routing.update.lock().await)
    } else {
        None
    };
    let mut next_table = None;
    if let (true, Some(patch)) = (is_edge_hub, &desired) {
        let mut next = hub.twins.get(&key).desired.data.clone();
        doc::merge(&mut next, &mut serde_json::Map::new(), patch, "", None);
        match hub.routing.build(&next) {
            Ok(table) => next_table = Some(table),
            Err(errors) => {
                hub.metrics
                    .twin_patches
                    .with_label_values(&[section, "bad_request"])
                    .inc();
                return Err(ApiError::InvalidRoutes(errors));
            }
        }
    }
    let applied = hub
        .twins
        .apply(
            key.clone(),
            TwinOp::Update {
                tags,
                desired,
                if_match,
            },
        )
        .await
        .map_err(|e| {
            let result = if matches!(e, TwinError::EtagMismatch { .. }) {
                "conflict"
            } else {
                "error"
            };
            hub.metrics
                .twin_patches
                .with_label_values(&[section, result])
                .inc();
            match e {
                TwinError::EtagMismatch { .. } => ApiError::PreconditionFailed(e.to_string()),
                TwinError::Store(_) => ApiError::Internal(e.to_string()),
            }
        })?;
    hub.metrics
        .twin_patches
        .with_label_values(&[section, "ok"])
        .inc();
    if let Some(table) = next_table {
        hub.routing.swap(table);
        tracing::info!(
            routes = hub.routing.table().routes.len(),
            "route table replaced from the $edgeHub twin"
        );
    }
    if applied.desired_patch.is_some() {
        hub.publish_desired(&key, &applied.twin, applied.desired_patch.as_ref());
    }
    if !hub.deployments.is_empty() {
        // Tags select deployments, and a desired change may touch a key one owns.
        crate::deploy::targeted::reconcile(hub, vec![key.device.clone()])
            .await
            .map_err(ApiError::Internal)?;
    }
    Ok(Json(crate::twin::view::api_json(
        &key,
        &applied.twin,
        Some(&hub.registry.view(&identity)),
    )))
}

async fn patch_device_twin(
    State(hub): State<SharedHub>,
    Path(device): Path<String>,
    headers: axum::http::HeaderMap,
    body: Result<Json<TwinPatch>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    patch_twin(&hub, device_key(&device)?, &headers, body).await
}

async fn patch_module_twin(
    State(hub): State<SharedHub>,
    Path((device, module)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Result<Json<TwinPatch>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    patch_twin(&hub, module_key(&device, &module)?, &headers, body).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryBody {
    query: String,
}

async fn query_twins(
    State(hub): State<SharedHub>,
    body: Result<Json<QueryBody>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    use fleethub_router::condition::query::{Collection, Projection, Query};
    let Json(body) = body?;
    let query =
        Query::parse(&body.query).map_err(|e| ApiError::BadRequest(format!("query: {e}")))?;
    let want_modules = query.from == Collection::Modules;
    let hub2 = hub.clone();
    blocking(&hub, move |_| {
        let hub = hub2;
        let mut count = 0u64;
        let mut items = Vec::new();
        for entry in hub.registry.identities() {
            if entry.module_id.is_some() != want_modules {
                continue;
            }
            let subject = hub.subject(&entry);
            let view = subject.view();
            if !query.matches_with(&view) {
                continue;
            }
            count += 1;
            match &query.projection {
                Projection::All => items.push(crate::twin::view::api_json(
                    &subject.key,
                    &subject.twin,
                    Some(&hub.registry.view(&entry)),
                )),
                Projection::Fields(fields) => {
                    use fleethub_router::condition::{Resolve, Segment};
                    let mut row = serde_json::Map::new();
                    for f in fields {
                        let v = view.resolve(&[Segment::Key(f.clone())]);
                        row.insert(f.clone(), v.unwrap_or(serde_json::Value::Null));
                    }
                    items.push(serde_json::Value::Object(row));
                }
                Projection::Count { .. } => {}
            }
        }
        match &query.projection {
            Projection::All | Projection::Fields(_) => Ok(Json(json!({ "items": items }))),
            Projection::Count { alias } => {
                Ok(Json(json!({ "items": [ { alias.as_str(): count } ] })))
            }
        }
    })
    .await?
}

// ---------------------------------------------------------------------------------------
// Direct methods

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MethodCall {
    method_name: String,
    #[serde(default)]
    payload: serde_json::Value,
    response_timeout_in_seconds: Option<u64>,
    connect_timeout_in_seconds: Option<u64>,
}

async fn invoke(
    hub: &SharedHub,
    key: IdentityKey,
    body: Result<Json<MethodCall>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
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
            Ok(Json(json!({ "status": r.status, "payload": r.payload })))
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
) -> ApiResult<Json<serde_json::Value>> {
    invoke(&hub, device_key(&device)?, body).await
}

async fn module_method(
    State(hub): State<SharedHub>,
    Path((device, module)): Path<(String, String)>,
    body: Result<Json<MethodCall>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    invoke(&hub, module_key(&device, &module)?, body).await
}

// ---------------------------------------------------------------------------------------
// Cloud-to-device messages

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct C2dBody {
    /// A string is sent as its UTF-8 bytes; any other JSON value as its JSON text.
    body: serde_json::Value,
    #[serde(default)]
    properties: serde_json::Map<String, serde_json::Value>,
    message_id: Option<String>,
    /// Time to live; default one hour, at most two days (IoT Hub's maximum).
    ttl_seconds: Option<u64>,
}

async fn send_c2d(
    State(hub): State<SharedHub>,
    Path(device): Path<String>,
    body: Result<Json<C2dBody>, JsonRejection>,
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
        Json(json!({
            "messageId": queued.message_id,
            "enqueuedTime": queued.enqueued_time,
            "expiryTimeUtc": humantime::format_rfc3339_millis(expires).to_string(),
        })),
    )
        .into_response())
}

// ---------------------------------------------------------------------------------------
// Routes

async fn list_routes(State(hub): State<SharedHub>) -> Json<serde_json::Value> {
    let mut v = crate::routing::table_json(&hub.routing.table());
    v["upstream"] = json!({
        "enabled": hub.upstream.is_some(),
        "connected": hub.upstream.as_ref().is_some_and(|u| u.is_connected()),
    });
    Json(v)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckBody {
    route: String,
}

async fn check_route(body: Result<Json<CheckBody>, JsonRejection>) -> ApiResult<Response> {
    let Json(body) = body?;
    match fleethub_router::route::Route::parse(&body.route) {
        Ok(r) => Ok(Json(json!({
            "valid": true,
            "source": format!("{:?}", r.source),
            "condition": r.condition.as_ref().map(|c| c.source().to_string()),
            "sink": r.sink.to_string(),
        }))
        .into_response()),
        Err(e) => Ok((
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "BadRequest", "valid": false, "message": e.to_string(), "column": e.column})),
        )
            .into_response()),
    }
}

// ---------------------------------------------------------------------------------------
// Store-and-forward queues

async fn list_queues(State(hub): State<SharedHub>) -> Json<serde_json::Value> {
    let now = crate::c2d::now_ms();
    let stats = fleethub_router::queue::Queue::stats(&*hub.queues);
    hub.metrics.observe_queues(&stats, now);
    let items: Vec<serde_json::Value> = stats
        .iter()
        .map(|s| {
            json!({
                "sink": s.sink,
                "depth": s.depth,
                "bytes": s.bytes,
                "oldestAgeSeconds": s.oldest_ms.map(|t| now.saturating_sub(t) as f64 / 1000.0),
                "dropped": { "expired": s.dropped_expired, "quota": s.dropped_quota },
            })
        })
        .collect();
    let cfg = &hub.config.store_and_forward;
    Json(json!({
        "items": items,
        "limits": {
            "maxBytes": cfg.max_bytes,
            "maxSinkBytes": cfg.max_sink_bytes,
            "whenFull": format!("{:?}", cfg.when_full),
        },
        "refused": hub.metrics.queue_refused.get(),
        "recoveredFrom": hub.queues.recovered_from.as_ref().map(|p| p.display().to_string()),
    }))
}
