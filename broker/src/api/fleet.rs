//! `/products` and their `/groups`: the API over [`crate::fleet`].

use std::collections::BTreeMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::wire::{CreateGroup, CreateProduct, GroupView, Items, ProductView, UpdateProduct};
use super::{blocking, ApiError, ApiResult, ApiState};
use crate::fleet::{DeviceGroup, FleetError, GroupUpdate, Product};
use crate::hub::{Change, SharedHub};

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
        .route("/device-groups", get(all_groups))
}

fn group_view(hub: &SharedHub, g: &DeviceGroup, devices: usize) -> GroupView {
    let product = hub
        .fleet
        .product(&g.product_id)
        .map(|p| p.name.to_string())
        .unwrap_or_default();
    GroupView {
        group: g.clone(),
        product,
        devices,
        device_ids: None,
    }
}

fn product_view(hub: &SharedHub, p: &Product, counts: &BTreeMap<String, usize>) -> ProductView {
    let groups = hub
        .fleet
        .groups_of(&p.id)
        .iter()
        .map(|g| group_view(hub, g, counts.get(&g.id).copied().unwrap_or(0)))
        .collect();
    ProductView {
        product: p.clone(),
        groups,
    }
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
        Json(product_view(&hub, &product, &counts)),
    )
        .into_response())
}

async fn list_products(State(hub): State<SharedHub>) -> Json<Items<ProductView>> {
    let counts = hub.fleet.device_counts(&hub.registry);
    let items = hub
        .fleet
        .products()
        .iter()
        .map(|p| product_view(&hub, p, &counts))
        .collect();
    Json(Items { items })
}

fn require_product(hub: &SharedHub, product: &str) -> ApiResult<Product> {
    hub.fleet
        .product(product)
        .ok_or_else(|| ApiError::NotFound(format!("product '{product}' not found")))
}

async fn get_product(
    State(hub): State<SharedHub>,
    Path(product): Path<String>,
) -> ApiResult<Json<ProductView>> {
    let p = require_product(&hub, &product)?;
    let counts = hub.fleet.device_counts(&hub.registry);
    Ok(Json(product_view(&hub, &p, &counts)))
}

async fn update_product(
    State(hub): State<SharedHub>,
    Path(product): Path<String>,
    body: Result<Json<UpdateProduct>, JsonRejection>,
) -> ApiResult<Json<ProductView>> {
    let Json(body) = body?;
    let p = blocking(&hub, move |h| {
        h.fleet
            .update_product(&product, body.name.as_deref(), body.description)
    })
    .await??;
    let counts = hub.fleet.device_counts(&hub.registry);
    Ok(Json(product_view(&hub, &p, &counts)))
}

async fn delete_product(
    State(hub): State<SharedHub>,
    Path(product): Path<String>,
) -> ApiResult<StatusCode> {
    let p = require_product(&hub, &product)?;
    let groups: Vec<String> = hub
        .fleet
        .groups_of(&p.id)
        .into_iter()
        .map(|g| g.id)
        .collect();
    blocking(&hub, move |h| h.fleet.delete_product(&product, &h.registry)).await??;
    for group_id in groups {
        group_deleted(&hub, group_id).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn list_groups(
    State(hub): State<SharedHub>,
    Path(product): Path<String>,
) -> ApiResult<Json<Items<GroupView>>> {
    let p = require_product(&hub, &product)?;
    let counts = hub.fleet.device_counts(&hub.registry);
    let items = hub
        .fleet
        .groups_of(&p.id)
        .iter()
        .map(|g| group_view(&hub, g, counts.get(&g.id).copied().unwrap_or(0)))
        .collect();
    Ok(Json(Items { items }))
}

async fn all_groups(State(hub): State<SharedHub>) -> Json<Items<GroupView>> {
    let counts = hub.fleet.device_counts(&hub.registry);
    let items = hub
        .fleet
        .products()
        .iter()
        .flat_map(|p| hub.fleet.groups_of(&p.id))
        .map(|g| group_view(&hub, &g, counts.get(&g.id).copied().unwrap_or(0)))
        .collect();
    Json(Items { items })
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
    Ok((StatusCode::CREATED, Json(group_view(&hub, &g, 0))).into_response())
}

async fn get_group(
    State(hub): State<SharedHub>,
    Path((product, group)): Path<(String, String)>,
) -> ApiResult<Json<GroupView>> {
    let g = hub.fleet.group(&product, &group)?;
    let counts = hub.fleet.device_counts(&hub.registry);
    let mut v = group_view(&hub, &g, counts.get(&g.id).copied().unwrap_or(0));
    let mut devices: Vec<String> = hub
        .registry
        .identities()
        .iter()
        .filter(|i| i.module_id.is_none() && i.device_group_id.as_deref() == Some(&g.id))
        .map(|i| i.device_id.to_string())
        .collect();
    devices.sort();
    v.device_ids = Some(devices);
    Ok(Json(v))
}

async fn update_group(
    State(hub): State<SharedHub>,
    Path((product, group)): Path<(String, String)>,
    body: Result<Json<GroupUpdate>, JsonRejection>,
) -> ApiResult<Json<GroupView>> {
    let Json(body) = body?;
    let g = blocking(&hub, move |h| h.fleet.update_group(&product, &group, body)).await??;
    // Application updates on or off changes what its devices should run; the API answers
    // once their twins say so.
    hub.changed(Change::GroupChanged {
        group_id: g.id.clone(),
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let counts = hub.fleet.device_counts(&hub.registry);
    Ok(Json(group_view(
        &hub,
        &g,
        counts.get(&g.id).copied().unwrap_or(0),
    )))
}

async fn delete_group(
    State(hub): State<SharedHub>,
    Path((product, group)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let g = hub.fleet.group(&product, &group)?;
    blocking(&hub, move |h| {
        h.fleet.delete_group(&product, &group, &h.registry)
    })
    .await??;
    group_deleted(&hub, g.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What was deployed to a deleted group is forgotten with it.
async fn group_deleted(hub: &SharedHub, group_id: String) -> ApiResult<()> {
    hub.changed(Change::GroupDeleted { group_id })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(())
}
