//! `/deployments`: targeted and layered deployments, their status and rollouts.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{blocking, ApiError, ApiResult};
use crate::deploy::targeted::{self, Compiled, DeploymentSpec, DeploymentUpdate};
use crate::hub::SharedHub;

pub fn routes() -> Router<SharedHub> {
    Router::new()
        .route("/deployments", get(list).post(create))
        .route("/deployments/{id}", get(show).patch(update).delete(delete))
        .route("/deployments/{id}/metrics/{metric}", get(show_metric))
        .route("/deployments/{id}/{action}", post(control))
}

fn json_of(c: &Compiled, status: Option<Value>) -> Value {
    let mut v = json!(c.d);
    if let Some(s) = status {
        v["systemMetrics"] = json!({
            "targetedCount": s["targetedCount"]["count"],
            "appliedCount": s["appliedCount"]["count"],
            "reportedSuccessfulCount": s["reportedSuccessfulCount"]["count"],
            "reportedFailedCount": s["reportedFailedCount"]["count"],
        });
        let custom: serde_json::Map<String, Value> = s["custom"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v["count"].clone()))
                    .collect()
            })
            .unwrap_or_default();
        v["customMetrics"] = json!(custom);
    }
    v
}

async fn reconcile_all(hub: &SharedHub) -> ApiResult<usize> {
    let devices = crate::deploy::all_devices(hub);
    targeted::reconcile(hub, devices)
        .await
        .map_err(ApiError::Internal)
}

async fn create(
    State(hub): State<SharedHub>,
    body: Result<Json<DeploymentSpec>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(spec) = body?;
    let c = blocking(&hub, move |h| h.deployments.create(h, spec)).await??;
    let id = c.d.id.clone();
    let written = reconcile_all(&hub).await?;
    let mut v = with_status(&hub, &id).await?;
    v["twinsWritten"] = json!(written);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

/// The deployment as it stands, with its metrics.
async fn with_status(hub: &SharedHub, id: &str) -> ApiResult<Value> {
    let c = require(hub, id)?;
    let h = hub.clone();
    blocking(hub, move |_| {
        let status = targeted::status(&h, &c);
        json_of(&c, Some(status))
    })
    .await
}

fn require(hub: &SharedHub, id: &str) -> ApiResult<std::sync::Arc<Compiled>> {
    hub.deployments
        .get(id)
        .ok_or_else(|| ApiError::NotFound(format!("deployment '{id}' not found")))
}

async fn list(State(hub): State<SharedHub>) -> ApiResult<Json<Value>> {
    let h = hub.clone();
    let items = blocking(&hub, move |_| {
        h.deployments
            .all()
            .iter()
            .map(|c| json_of(c, Some(targeted::status(&h, c))))
            .collect::<Vec<_>>()
    })
    .await?;
    Ok(Json(json!({ "items": items })))
}

async fn show(State(hub): State<SharedHub>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(with_status(&hub, &id).await?))
}

async fn update(
    State(hub): State<SharedHub>,
    Path(id): Path<String>,
    body: Result<Json<DeploymentUpdate>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(u) = body?;
    if let Some(c) = &u.target_condition {
        // Checked before anything changes, with the column of the error.
        fleethub_router::condition::Condition::parse(c)
            .map_err(|e| ApiError::BadRequest(format!("invalid targetCondition: {e}")))?;
    }
    let id2 = id.clone();
    blocking(&hub, move |h| h.deployments.update(&id2, u)).await??;
    reconcile_all(&hub).await?;
    Ok(Json(with_status(&hub, &id).await?))
}

async fn delete(State(hub): State<SharedHub>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    blocking(&hub, move |h| h.deployments.delete(&id)).await??;
    reconcile_all(&hub).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `targetedCount`, `appliedCount`, `reportedSuccessfulCount`, `reportedFailedCount`, or a
/// custom metric's name: the count and the devices behind it.
async fn show_metric(
    State(hub): State<SharedHub>,
    Path((id, metric)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let c = require(&hub, &id)?;
    let h = hub.clone();
    let status = blocking(&hub, move |_| targeted::status(&h, &c)).await?;
    let found = status
        .get(&metric)
        .filter(|_| metric != "custom")
        .or_else(|| status["custom"].get(&metric))
        .cloned()
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "metric '{metric}' of deployment '{id}' (system metrics: targetedCount, \
                 appliedCount, reportedSuccessfulCount, reportedFailedCount)"
            ))
        })?;
    Ok(Json(json!({
        "deployment": id,
        "metric": metric,
        "count": found["count"],
        "deviceIds": found["deviceIds"],
    })))
}

/// `pause`, `resume` or `abort` a phased rollout.
async fn control(
    State(hub): State<SharedHub>,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    if !matches!(action.as_str(), "pause" | "resume" | "abort") {
        return Err(ApiError::NotFound(format!(
            "'{action}': a deployment's actions are pause, resume and abort"
        )));
    }
    let id2 = id.clone();
    blocking(&hub, move |h| h.deployments.control(&id2, &action)).await??;
    reconcile_all(&hub).await?;
    let c = require(&hub, &id)?;
    Ok(Json(json_of(&c, None)))
}
