//! `/products/{p}/groups/{g}/deployments`: group deployments.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::super::wire::{
    CreateGroupDeployment, GroupDeployment, GroupDeploymentView, ResolvedImage,
};
use super::DeployState;
use crate::api::wire::Items;
use crate::api::{blocking, ApiResult};
use crate::hub::SharedHub;

pub fn routes() -> Router<DeployState> {
    Router::new().route(
        "/products/{product}/groups/{group}/deployments",
        get(list_deployments).post(create_deployment),
    )
}

fn deployment_view(hub: &SharedHub, d: &GroupDeployment, current: bool) -> GroupDeploymentView {
    let resolved = d
        .images
        .iter()
        .filter_map(|r| hub.images.resolve(r).ok())
        .map(|i| ResolvedImage {
            id: i.id,
            name: i.name,
            version: i.version,
            kind: i.kind,
        })
        .collect();
    GroupDeploymentView {
        deployment: d.clone(),
        device_group: hub.fleet.path_of(&d.group_id),
        resolved,
        current,
        devices_updated: None,
    }
}

async fn create_deployment(
    State(s): State<DeployState>,
    Path((product, group)): Path<(String, String)>,
    body: Result<Json<CreateGroupDeployment>, JsonRejection>,
) -> ApiResult<Response> {
    let hub = s.hub.clone();
    let Json(body) = body?;
    let g = hub.fleet.group(&product, &group)?;
    let group_id = g.id.clone();
    let engine = s.engine.clone();
    let d = blocking(&hub, move |h| {
        engine.groups.create(&h.images, &group_id, &body.images)
    })
    .await??;
    let devices = crate::deploy::devices_in_group(&hub, &g.id);
    let updated = s.engine.reconcile_groups(&hub, devices).await?;
    let mut v = deployment_view(&hub, &d, true);
    v.devices_updated = Some(updated);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn list_deployments(
    State(s): State<DeployState>,
    Path((product, group)): Path<(String, String)>,
) -> ApiResult<Json<Items<GroupDeploymentView>>> {
    let hub = s.hub.clone();
    let g = hub.fleet.group(&product, &group)?;
    let items = s
        .engine
        .groups
        .history(&g.id)
        .iter()
        .enumerate()
        .map(|(n, d)| deployment_view(&hub, d, n == 0))
        .collect();
    Ok(Json(Items { items }))
}
