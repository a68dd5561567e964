//! `/twins`: device and module twins, and twin queries.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::header;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::wire::{IdentityView, Items, TwinPatch, TwinProperties, TwinQuery, TwinView};
use super::{blocking, device_key, module_key, registered, ApiError, ApiResult, ApiState};
use crate::hub::{SharedHub, TwinWrite, TwinWriteError};
use crate::identity::IdentityKey;
use crate::twin::Twin;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/twins/query", post(query_twins))
        .route(
            "/twins/{device}",
            get(get_device_twin).patch(patch_device_twin),
        )
        .route(
            "/twins/{device}/modules/{module}",
            get(get_module_twin).patch(patch_module_twin),
        )
}

/// A twin as the API shows it; with its identity's status and connection when given.
fn twin_view(key: &IdentityKey, twin: &Twin, identity: Option<&IdentityView>) -> TwinView {
    TwinView {
        device_id: key.device.clone(),
        module_id: key.module.clone(),
        etag: twin.etag.clone(),
        version: twin.version,
        tags: twin.tags.clone(),
        properties: TwinProperties {
            desired: twin.desired.full(),
            reported: twin.reported.full(),
        },
        status: identity.map(|i| i.identity.status),
        connection_state: identity.map(|i| i.connection_state),
        last_activity_time: identity.and_then(|i| i.identity.last_activity_time.clone()),
    }
}

fn show(hub: &SharedHub, key: &IdentityKey) -> ApiResult<Json<TwinView>> {
    let identity = registered(hub, key)?;
    let twin = hub.twins.get(key);
    hub.metrics.twin_reads.with_label_values(&["ok"]).inc();
    Ok(Json(twin_view(
        key,
        &twin,
        Some(&hub.registry.view(&identity)),
    )))
}

async fn get_device_twin(
    State(hub): State<SharedHub>,
    Path(device): Path<String>,
) -> ApiResult<Json<TwinView>> {
    show(&hub, &device_key(&device)?)
}

async fn get_module_twin(
    State(hub): State<SharedHub>,
    Path((device, module)): Path<(String, String)>,
) -> ApiResult<Json<TwinView>> {
    show(&hub, &module_key(&device, &module)?)
}

async fn patch_twin(
    hub: &SharedHub,
    key: IdentityKey,
    headers: &axum::http::HeaderMap,
    body: Result<Json<TwinPatch>, JsonRejection>,
) -> ApiResult<Json<TwinView>> {
    use crate::twin::{doc, TwinError};
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
    let write = TwinWrite::Operator {
        tags,
        desired,
        if_match,
    };
    let applied = hub
        .write_twin(key.clone(), write)
        .await
        .map_err(|e| match e {
            TwinWriteError::InvalidRoutes(errors) => ApiError::InvalidRoutes(errors),
            TwinWriteError::Twin(e @ TwinError::EtagMismatch { .. }) => {
                ApiError::PreconditionFailed(e.to_string())
            }
            TwinWriteError::Twin(e) => ApiError::Internal(e.to_string()),
        })?;
    Ok(Json(twin_view(
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
) -> ApiResult<Json<TwinView>> {
    patch_twin(&hub, device_key(&device)?, &headers, body).await
}

async fn patch_module_twin(
    State(hub): State<SharedHub>,
    Path((device, module)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Result<Json<TwinPatch>, JsonRejection>,
) -> ApiResult<Json<TwinView>> {
    patch_twin(&hub, module_key(&device, &module)?, &headers, body).await
}

async fn query_twins(
    State(hub): State<SharedHub>,
    body: Result<Json<TwinQuery>, JsonRejection>,
) -> ApiResult<Json<Items<serde_json::Value>>> {
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
                Projection::All => items.push(json!(twin_view(
                    &subject.key,
                    &subject.twin,
                    Some(&hub.registry.view(&entry)),
                ))),
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
            Projection::All | Projection::Fields(_) => Ok(Json(Items { items })),
            Projection::Count { alias } => Ok(Json(Items {
                items: vec![json!({ alias.as_str(): count })],
            })),
        }
    })
    .await?
}
