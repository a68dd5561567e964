//! `/deployments`: targeted and layered deployments, their status and rollouts.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use std::sync::Arc;

use super::super::targeted::{self, Compiled, DeploymentStatus};
use super::super::wire::{DeploymentSpec, DeploymentUpdate, DeploymentView, MetricView};
use super::DeployState;
use crate::api::wire::Items;
use crate::api::{blocking, ApiError, ApiResult};

pub fn routes() -> Router<DeployState> {
    Router::new()
        .route("/deployments", get(list).post(create))
        .route("/deployments/{id}", get(show).patch(update).delete(delete))
        .route("/deployments/{id}/metrics/{metric}", get(show_metric))
        .route("/deployments/{id}/{action}", post(control))
}

fn view_of(c: &Compiled, status: Option<DeploymentStatus>) -> DeploymentView {
    DeploymentView {
        deployment: c.d.clone(),
        system_metrics: status.as_ref().map(DeploymentStatus::system_metrics),
        custom_metrics: status.map(|s| {
            s.custom
                .iter()
                .map(|(k, v)| (k.clone(), v.len() as u64))
                .collect()
        }),
        twins_written: None,
        rollout_members: None,
    }
}

async fn reconcile_all(s: &DeployState) -> ApiResult<usize> {
    let devices = crate::deploy::all_devices(&s.hub);
    Ok(s.engine.reconcile_targeted(&s.hub, devices).await?)
}

async fn create(
    State(s): State<DeployState>,
    body: Result<Json<DeploymentSpec>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(spec) = body?;
    let d = s.engine.clone();
    let c = blocking(&s.hub, move |h| targeted::create(h, &d.targeted, spec)).await??;
    let id = c.d.id.clone();
    let written = reconcile_all(&s).await?;
    let mut v = with_status(&s, &id).await?;
    v.twins_written = Some(written);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

/// The deployment as it stands, with its metrics.
async fn with_status(s: &DeployState, id: &str) -> ApiResult<DeploymentView> {
    let c = require(s, id)?;
    let d = s.engine.clone();
    blocking(&s.hub, move |h| {
        let status = targeted::status(h, &d.targeted, &c);
        view_of(&c, Some(status))
    })
    .await
}

fn require(s: &DeployState, id: &str) -> ApiResult<Arc<Compiled>> {
    s.engine
        .targeted
        .get(id)
        .ok_or_else(|| ApiError::NotFound(format!("deployment '{id}' not found")))
}

/// `GET /deployments[?summary=true]`.
#[derive(serde::Deserialize)]
struct ListQuery {
    /// Leave out the rollout's member lists (one id per targeted device), keeping their
    /// lengths: what a page that refreshes every second needs on a large fleet.
    #[serde(default)]
    summary: bool,
}

async fn list(
    State(s): State<DeployState>,
    axum::extract::Query(q): axum::extract::Query<ListQuery>,
) -> ApiResult<Json<Items<DeploymentView>>> {
    let d = s.engine.clone();
    let items = blocking(&s.hub, move |h| {
        d.targeted
            .all()
            .iter()
            .map(|c| {
                let mut view = view_of(c, Some(targeted::status(h, &d.targeted, c)));
                if q.summary {
                    if let Some(r) = view.deployment.rollout_state.as_mut() {
                        view.rollout_members = Some(super::super::wire::RolloutMembers {
                            members: r.members.len(),
                            phase_members: r.phase_members.len(),
                        });
                        r.members = Vec::new();
                        r.phase_members = Vec::new();
                    }
                }
                view
            })
            .collect::<Vec<_>>()
    })
    .await?;
    Ok(Json(Items { items }))
}

async fn show(
    State(s): State<DeployState>,
    Path(id): Path<String>,
) -> ApiResult<Json<DeploymentView>> {
    Ok(Json(with_status(&s, &id).await?))
}

async fn update(
    State(s): State<DeployState>,
    Path(id): Path<String>,
    body: Result<Json<DeploymentUpdate>, JsonRejection>,
) -> ApiResult<Json<DeploymentView>> {
    let Json(u) = body?;
    if let Some(c) = &u.target_condition {
        // Checked before anything changes, with the column of the error.
        fleethub_router::condition::Condition::parse(c)
            .map_err(|e| ApiError::BadRequest(format!("invalid targetCondition: {e}")))?;
    }
    let (id2, d) = (id.clone(), s.engine.clone());
    blocking(&s.hub, move |_| d.targeted.update(&id2, u)).await??;
    reconcile_all(&s).await?;
    Ok(Json(with_status(&s, &id).await?))
}

async fn delete(State(s): State<DeployState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let d = s.engine.clone();
    blocking(&s.hub, move |_| d.targeted.delete(&id)).await??;
    reconcile_all(&s).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `targetedCount`, `appliedCount`, `reportedSuccessfulCount`, `reportedFailedCount`, or a
/// custom metric's name: the count and the devices behind it.
async fn show_metric(
    State(s): State<DeployState>,
    Path((id, metric)): Path<(String, String)>,
) -> ApiResult<Json<MetricView>> {
    let c = require(&s, &id)?;
    let d = s.engine.clone();
    let mut status = blocking(&s.hub, move |h| targeted::status(h, &d.targeted, &c)).await?;
    let found = match metric.as_str() {
        "targetedCount" => Some(status.targeted),
        "appliedCount" => Some(status.applied),
        "reportedSuccessfulCount" => Some(status.reported_successful),
        "reportedFailedCount" => Some(status.reported_failed),
        custom => status.custom.remove(custom),
    }
    .ok_or_else(|| {
        ApiError::NotFound(format!(
            "metric '{metric}' of deployment '{id}' (system metrics: targetedCount, \
                 appliedCount, reportedSuccessfulCount, reportedFailedCount)"
        ))
    })?;
    Ok(Json(MetricView {
        deployment: id,
        metric,
        count: found.len() as u64,
        device_ids: found,
    }))
}

/// `pause`, `resume` or `abort` a phased rollout.
async fn control(
    State(s): State<DeployState>,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<Json<DeploymentView>> {
    if !matches!(action.as_str(), "pause" | "resume" | "abort") {
        return Err(ApiError::NotFound(format!(
            "'{action}': a deployment's actions are pause, resume and abort"
        )));
    }
    let (id2, d) = (id.clone(), s.engine.clone());
    blocking(&s.hub, move |_| d.targeted.control(&id2, &action)).await??;
    reconcile_all(&s).await?;
    let c = require(&s, &id)?;
    Ok(Json(view_of(&c, None)))
}
