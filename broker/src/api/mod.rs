//! The management HTTP API: identities now, twins, routes and deployments as they land.
//!
//! Every route but `/metrics` and `/health` needs `Authorization: Bearer {admin token}`.
//! Errors are JSON `{"error": "...", "message": "..."}` with a precise message (field name,
//! id rule broken), never a bare status.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

mod backup;
mod certificates;
mod consumer_groups;
mod enrollments;
mod fleet;
mod identities;
mod images;
pub mod listener;
mod messages;
mod methods;
mod routes;
mod twins;
pub mod wire;

pub use methods::call_here as call_method_here;

use crate::hub::{Hub, SharedHub};
use crate::identity::{DeviceId, IdError, IdentityKey, ModuleId};
use crate::registry::RegistryError;

/// An API failure, rendered as JSON with its status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// Authenticated, but the request may not be made this way (the console's CSRF and
    /// origin checks).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    GatewayTimeout(String),
    /// A body over `[api] max_body_bytes`.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// IoT Hub's 404103: a method for a device that is not connected or not listening.
    #[error("{0}")]
    DeviceNotOnline(String),
    #[error("route set refused: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    InvalidRoutes(Vec<fleethub_router::route::RouteError>),
    #[error("{0}")]
    Internal(String),
    /// Another node of the cluster did not confirm what it was asked to do: not done as far
    /// as the caller can know, so it must try again.
    #[error("{0}")]
    Unavailable(String),
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
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::PayloadTooLarge(format!(
                "request body: {} (the limit is [api] max_body_bytes)",
                e.body_text()
            ));
        }
        ApiError::BadRequest(format!("request body: {}", e.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "Unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "Forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "NotFound"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "Conflict"),
            ApiError::PreconditionFailed(_) => {
                (StatusCode::PRECONDITION_FAILED, "PreconditionFailed")
            }
            ApiError::GatewayTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "GatewayTimeout"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge"),
            ApiError::DeviceNotOnline(_) => (StatusCode::NOT_FOUND, "DeviceNotOnline"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
            ApiError::InvalidRoutes(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
            // A write refused for lack of space: 507, and the message says so.
            ApiError::Internal(m) if crate::storage::is_disk_full(m) => {
                (StatusCode::INSUFFICIENT_STORAGE, "InsufficientStorage")
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "Internal"),
        };
        let errors = match &self {
            ApiError::InvalidRoutes(errors) => errors
                .iter()
                .map(|e| wire::RouteErrorView {
                    name: e.name.clone(),
                    source: e.origin.clone(),
                    message: e.message.clone(),
                    column: e.column,
                })
                .collect(),
            _ => Vec::new(),
        };
        let body = wire::ErrorBody {
            error: kind.to_string(),
            message: self.to_string(),
            errors,
            error_code: matches!(self, ApiError::DeviceNotOnline(_)).then_some(404103),
        };
        (status, Json(body)).into_response()
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;
/// What every handler works with.
pub type ApiState = SharedHub;

/// The API, one resource per file, each with its own `routes()`; `mounted` are resources
/// that live with the module they drive (the deployments), behind the same token check.
pub fn router(hub: SharedHub, mounted: Router<SharedHub>) -> Router {
    let state = hub;
    let authed =
        resources(mounted).layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .merge(authed)
        .fallback(|| async { ApiError::NotFound("no such API route".into()) })
        .with_state(state)
}

/// Every authenticated resource, before the check that guards it: behind the bearer token
/// in [`router`], and behind the console's session cookie under `/ui/api` (the same
/// handlers).
pub fn resources(mounted: Router<SharedHub>) -> Router<SharedHub> {
    Router::new()
        .route("/hub", get(hub_info))
        .route("/cluster", get(cluster_status))
        .merge(identities::routes())
        .merge(twins::routes())
        .merge(methods::routes())
        .merge(messages::routes())
        .merge(routes::routes())
        .merge(fleet::routes())
        .merge(images::routes())
        .merge(backup::routes())
        .merge(certificates::routes())
        .merge(enrollments::routes())
        .merge(consumer_groups::routes())
        .merge(mounted)
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
pub(crate) async fn blocking<T: Send + 'static>(
    hub: &SharedHub,
    f: impl FnOnce(&Hub) -> T + Send + 'static,
) -> ApiResult<T> {
    let hub = hub.clone();
    tokio::task::spawn_blocking(move || f(&hub))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))
}

async fn metrics(State(hub): State<SharedHub>) -> impl IntoResponse {
    // On a cluster node a count in PostgreSQL: off the async threads.
    let h = hub.clone();
    let sessions = tokio::task::spawn_blocking(move || h.sessions.len())
        .await
        .unwrap_or(0);
    hub.metrics.sessions.set(sessions as i64);
    hub.metrics
        .observe_queues(&hub.queue_stats(), crate::c2d::now_ms());
    // Lag reads the queue (a range count per group): off the async threads.
    let events = hub.events.clone();
    let groups = tokio::task::spawn_blocking(move || {
        events
            .names()
            .iter()
            .filter_map(|g| events.view(g).ok())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    hub.metrics.observe_groups(&groups);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        hub.metrics.render(),
    )
}

/// Ready once the stores are open and every listener is bound (the API is served only then);
/// 503 while the hub is stopping, so a supervisor or load balancer stops sending to it.
async fn health(State(hub): State<SharedHub>) -> Response {
    if hub.is_stopping() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "stopping" })),
        )
            .into_response();
    }
    Json(serde_json::json!({ "status": "ready" })).into_response()
}

async fn hub_info(State(hub): State<SharedHub>) -> Json<wire::HubInfo> {
    Json(wire::HubInfo {
        id: hub.config.hub_id.to_string(),
        hostname: hub.config.hostname.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        endpoints: hub.endpoints.get().cloned(),
        devices: hub.registry.device_count(),
        connections: hub.metrics.connections.get(),
    })
}

/// The cluster as this node sees it: always 200, with `postgres.reachable` false and the
/// error when the shared PostgreSQL does not answer (that is what an operator asks about).
async fn cluster_status(State(hub): State<SharedHub>) -> Json<wire::ClusterStatus> {
    Json(crate::cluster::status(&hub.cluster).await)
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

fn registered(
    hub: &SharedHub,
    key: &IdentityKey,
) -> ApiResult<std::sync::Arc<crate::registry::Identity>> {
    hub.registry
        .get(key)
        .ok_or_else(|| ApiError::NotFound(format!("{} not found", crate::registry::describe(key))))
}
