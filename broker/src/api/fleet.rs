//! `/products` and their `/groups`: the API over [`crate::fleet`].

use std::collections::BTreeMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{blocking, ApiError, ApiResult, ApiState};
use crate::deploy::group::GroupDeployment;
use crate::deploy::DeployError;
use crate::fleet::{DeviceGroup, FleetError, GroupUpdate, OsFeed, Product};
use crate::hub::SharedHub;

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> Self {
        match e {
            FleetError::Invalid { .. } => ApiError::BadRequest(e.to_string()),
            FleetError::Exists(_) | FleetError::InUse(_) => ApiError::Conflict(e.to_string()),
            FleetError::NotFound(_) => ApiError::NotFound(e.to_string()),
            FleetError::Store(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> Self {
        match e {
            DeployError::Invalid { .. } => ApiError::BadRequest(e.to_string()),
            DeployError::NotFound(_) => ApiError::NotFound(e.to_string()),
            DeployError::Exists(_) => ApiError::Conflict(e.to_string()),
            DeployError::InvalidRoutes(errors) => ApiError::InvalidRoutes(errors),
            DeployError::Store(_) | DeployError::Twin(_) => ApiError::Internal(e.to_string()),
        }
    }
}

/// Brings a group's devices to their deployment state before the API answers, so an
/// operator who gets a 2xx can read the result in the twins.
pub(super) async fn reconcile_group(s: &ApiState, group_id: &str) -> ApiResult<usize> {
    let devices = crate::deploy::devices_in_group(&s.hub, group_id);
    Ok(s.deploy.reconcile_groups(&s.hub, devices).await?)
}

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/products", get(list_products).post(create_product))
        .route(
            "/products/{product}",
            get(get_product)
                .patch(update_product)
                .delete(delete_product),
        )
        .route(
            "/products/{product}/groups",
            get(list_groups).post(create_group),
        )
        .route(
            "/products/{product}/groups/{group}",
            get(get_group).patch(update_group).delete(delete_group),
        )
        .route(
            "/products/{product}/groups/{group}/deployments",
            get(list_deployments).post(create_deployment),
        )
        .route("/device-groups", get(all_groups))
}

fn group_json(hub: &SharedHub, g: &DeviceGroup, devices: usize) -> Value {
    let product = hub
        .fleet
        .product(&g.product_id)
        .map(|p| p.name.to_string())
        .unwrap_or_default();
    let mut v = json!(g);
    v["product"] = json!(product);
    v["devices"] = json!(devices);
    v
}

fn product_json(hub: &SharedHub, p: &Product, counts: &BTreeMap<String, usize>) -> Value {
    let groups: Vec<Value> = hub
        .fleet
        .groups_of(&p.id)
        .iter()
        .map(|g| group_json(hub, g, counts.get(&g.id).copied().unwrap_or(0)))
        .collect();
    let mut v = json!(p);
    v["groups"] = json!(groups);
    v
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateProduct {
    name: String,
    description: Option<String>,
    /// Skip the five default groups.
    #[serde(default)]
    no_default_groups: bool,
}

async fn create_product(
    State(hub): State<SharedHub>,
    body: Result<Json<CreateProduct>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body?;
    let (product, _) = blocking(&hub, move |h| {
        h.fleet
            .create_product(&body.name, body.description, !body.no_default_groups)
    })
    .await??;
    let counts = hub.fleet.device_counts(&hub.registry);
    Ok((
        StatusCode::CREATED,
        Json(product_json(&hub, &product, &counts)),
    )
        .into_response())
}

async fn list_products(State(hub): State<SharedHub>) -> Json<Value> {
    let counts = hub.fleet.device_counts(&hub.registry);
    let items: Vec<Value> = hub
        .fleet
        .products()
        .iter()
        .map(|p| product_json(&hub, p, &counts))
        .collect();
    Json(json!({ "items": items }))
}

fn require_product(hub: &SharedHub, product: &str) -> ApiResult<Product> {
    hub.fleet
        .product(product)
        .ok_or_else(|| ApiError::NotFound(format!("product '{product}' not found")))
}

async fn get_product(
    State(hub): State<SharedHub>,
    Path(product): Path<String>,
) -> ApiResult<Json<Value>> {
    let p = require_product(&hub, &product)?;
    let counts = hub.fleet.device_counts(&hub.registry);
    Ok(Json(product_json(&hub, &p, &counts)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct UpdateProduct {
    name: Option<String>,
    description: Option<String>,
}

async fn update_product(
    State(hub): State<SharedHub>,
    Path(product): Path<String>,
    body: Result<Json<UpdateProduct>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(body) = body?;
    let p = blocking(&hub, move |h| {
        h.fleet
            .update_product(&product, body.name.as_deref(), body.description)
    })
    .await??;
    let counts = hub.fleet.device_counts(&hub.registry);
    Ok(Json(product_json(&hub, &p, &counts)))
}

async fn delete_product(
    State(st): State<ApiState>,
    Path(product): Path<String>,
) -> ApiResult<StatusCode> {
    let hub = st.hub.clone();
    let p = require_product(&hub, &product)?;
    let groups: Vec<String> = hub
        .fleet
        .groups_of(&p.id)
        .into_iter()
        .map(|g| g.id)
        .collect();
    blocking(&hub, move |h| h.fleet.delete_product(&product, &h.registry)).await??;
    for g in groups {
        st.deploy.groups.forget_group(&g)?;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn list_groups(
    State(hub): State<SharedHub>,
    Path(product): Path<String>,
) -> ApiResult<Json<Value>> {
    let p = require_product(&hub, &product)?;
    let counts = hub.fleet.device_counts(&hub.registry);
    let items: Vec<Value> = hub
        .fleet
        .groups_of(&p.id)
        .iter()
        .map(|g| group_json(&hub, g, counts.get(&g.id).copied().unwrap_or(0)))
        .collect();
    Ok(Json(json!({ "items": items })))
}

async fn all_groups(State(hub): State<SharedHub>) -> Json<Value> {
    let counts = hub.fleet.device_counts(&hub.registry);
    let items: Vec<Value> = hub
        .fleet
        .products()
        .iter()
        .flat_map(|p| hub.fleet.groups_of(&p.id))
        .map(|g| group_json(&hub, &g, counts.get(&g.id).copied().unwrap_or(0)))
        .collect();
    Json(json!({ "items": items }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateGroup {
    name: String,
    description: Option<String>,
    application_updates: Option<bool>,
    os_feed: Option<OsFeed>,
}

async fn create_group(
    State(hub): State<SharedHub>,
    Path(product): Path<String>,
    body: Result<Json<CreateGroup>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body?;
    let g = blocking(&hub, move |h| {
        h.fleet.create_group(
            &product,
            &body.name,
            body.description,
            body.application_updates,
            body.os_feed,
        )
    })
    .await??;
    Ok((StatusCode::CREATED, Json(group_json(&hub, &g, 0))).into_response())
}

async fn get_group(
    State(hub): State<SharedHub>,
    Path((product, group)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let g = hub.fleet.group(&product, &group)?;
    let counts = hub.fleet.device_counts(&hub.registry);
    let mut v = group_json(&hub, &g, counts.get(&g.id).copied().unwrap_or(0));
    let mut devices: Vec<String> = hub
        .registry
        .identities()
        .iter()
        .filter(|i| i.module_id.is_none() && i.device_group_id.as_deref() == Some(&g.id))
        .map(|i| i.device_id.to_string())
        .collect();
    devices.sort();
    v["deviceIds"] = json!(devices);
    Ok(Json(v))
}

async fn update_group(
    State(st): State<ApiState>,
    Path((product, group)): Path<(String, String)>,
    body: Result<Json<GroupUpdate>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let hub = st.hub.clone();
    let Json(body) = body?;
    let g = blocking(&hub, move |h| h.fleet.update_group(&product, &group, body)).await??;
    // Application updates on or off changes what its devices should run.
    reconcile_group(&st, &g.id).await?;
    let counts = hub.fleet.device_counts(&hub.registry);
    Ok(Json(group_json(
        &hub,
        &g,
        counts.get(&g.id).copied().unwrap_or(0),
    )))
}

async fn delete_group(
    State(st): State<ApiState>,
    Path((product, group)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let hub = st.hub.clone();
    let g = hub.fleet.group(&product, &group)?;
    blocking(&hub, move |h| {
        h.fleet.delete_group(&product, &group, &h.registry)
    })
    .await??;
    st.deploy.groups.forget_group(&g.id)?;
    Ok(StatusCode::NO_CONTENT)
}

fn deployment_json(hub: &SharedHub, d: &GroupDeployment, current: bool) -> Value {
    let resolved: Vec<Value> = d
        .images
        .iter()
        .filter_map(|r| hub.images.resolve(r).ok())
        .map(|i| json!({ "id": i.id, "name": i.name, "version": i.version, "kind": i.kind }))
        .collect();
    let mut v = json!(d);
    v["deviceGroup"] = json!(hub.fleet.path_of(&d.group_id));
    v["resolved"] = json!(resolved);
    v["current"] = json!(current);
    v
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateDeployment {
    /// Image ids, `name:X.Y.Z` or `name:latest`.
    images: Vec<String>,
}

async fn create_deployment(
    State(st): State<ApiState>,
    Path((product, group)): Path<(String, String)>,
    body: Result<Json<CreateDeployment>, JsonRejection>,
) -> ApiResult<Response> {
    let hub = st.hub.clone();
    let Json(body) = body?;
    let g = hub.fleet.group(&product, &group)?;
    let group_id = g.id.clone();
    let deploy = st.deploy.clone();
    let d = blocking(&hub, move |h| {
        deploy.groups.create(&h.images, &group_id, &body.images)
    })
    .await??;
    let updated = reconcile_group(&st, &g.id).await?;
    let mut v = deployment_json(&hub, &d, true);
    v["devicesUpdated"] = json!(updated);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn list_deployments(
    State(st): State<ApiState>,
    Path((product, group)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let hub = st.hub.clone();
    let g = hub.fleet.group(&product, &group)?;
    let items: Vec<Value> = st
        .deploy
        .groups
        .history(&g.id)
        .iter()
        .enumerate()
        .map(|(n, d)| deployment_json(&hub, d, n == 0))
        .collect();
    Ok(Json(json!({ "items": items })))
}
