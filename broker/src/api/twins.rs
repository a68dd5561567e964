//! `/twins`: device and module twins, and twin queries.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::header;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::wire::{IdentityView, QueryPage, TwinPatch, TwinProperties, TwinQuery, TwinView};
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
        device_group: identity.and_then(|i| i.device_group.clone()),
    }
}

fn show(hub: &SharedHub, key: &IdentityKey) -> ApiResult<Json<TwinView>> {
    let identity = registered(hub, key)?;
    let twin = hub.twins.get(key);
    hub.metrics.twin_reads.with_label_values(&["ok"]).inc();
    Ok(Json(twin_view(
        key,
        &twin,
        Some(&hub.identity_view(&identity)),
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
        Some(&hub.identity_view(&identity)),
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

/// The largest page a query returns.
const MAX_PAGE: usize = 1000;

/// Where the next page of a query starts: after an identity (rows in identity order), or at
/// an offset (grouped rows). Opaque to clients: base64url of `k:{identity}` or `o:{n}`.
enum Continue {
    After(String),
    Offset(usize),
}

impl Continue {
    fn encode(&self) -> String {
        use base64::Engine;
        let text = match self {
            Continue::After(k) => format!("k:{k}"),
            Continue::Offset(n) => format!("o:{n}"),
        };
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    }

    fn decode(token: &str) -> Result<Continue, ApiError> {
        use base64::Engine;
        let bad = || {
            ApiError::BadRequest(format!(
                "continuationToken '{token}': not one this hub returned"
            ))
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        match text.split_once(':') {
            Some(("k", key)) => Ok(Continue::After(key.to_string())),
            Some(("o", n)) => n.parse().map(Continue::Offset).map_err(|_| bad()),
            _ => Err(bad()),
        }
    }
}

async fn query_twins(
    State(hub): State<SharedHub>,
    headers: axum::http::HeaderMap,
    body: Result<Json<TwinQuery>, JsonRejection>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    use fleethub_router::condition::query::{Collection, Item, Projection, Query};
    use fleethub_router::condition::{Resolve, Segment};
    let Json(body) = body?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let page_size = match header("x-ms-max-item-count") {
        Some(v) => Some(v.trim().parse::<usize>().map_err(|_| {
            ApiError::BadRequest(format!("x-ms-max-item-count '{v}': a number of rows"))
        })?),
        None => body.page_size,
    };
    if let Some(n) = page_size {
        if n == 0 || n > MAX_PAGE {
            return Err(ApiError::BadRequest(format!(
                "pageSize {n}: 1 to {MAX_PAGE} rows"
            )));
        }
    }
    let from = match header("x-ms-continuation").or(body.continuation_token.as_deref()) {
        Some(t) if !t.is_empty() => Some(Continue::decode(t)?),
        _ => None,
    };
    let query =
        Query::parse(&body.query).map_err(|e| ApiError::BadRequest(format!("query: {e}")))?;
    let want_modules = query.from == Collection::Modules;
    let hub2 = hub.clone();
    let (items, next) = blocking(&hub, move |_| {
        let hub = hub2;
        // The matching identities with their twins; rows are served in identity order (so
        // pages stay stable while twins change).
        let matching = || {
            hub.registry
                .identities()
                .into_iter()
                .filter(|entry| entry.module_id.is_some() == want_modules)
                .filter_map(|entry| {
                    let subject = hub.subject(&entry);
                    query
                        .matches_with(&subject.view())
                        .then_some((entry, subject))
                })
        };
        let field = |view: &dyn Resolve, path: &[Segment]| {
            view.resolve(path).unwrap_or(serde_json::Value::Null)
        };
        let grouped = !query.group_by.is_empty();
        match &query.projection {
            Projection::Count { alias } if !grouped => {
                Ok((vec![json!({ alias.as_str(): matching().count() })], None))
            }
            Projection::Items(items) if grouped => {
                // One row per distinct group, in the order of the groups' JSON text.
                let mut groups: std::collections::BTreeMap<String, (Vec<serde_json::Value>, u64)> =
                    Default::default();
                for (_, subject) in matching() {
                    let view = subject.view();
                    let values: Vec<_> = query.group_by.iter().map(|p| field(&view, p)).collect();
                    let k = serde_json::Value::Array(values.clone()).to_string();
                    groups.entry(k).or_insert((values, 0)).1 += 1;
                }
                let rows: Vec<serde_json::Value> = groups
                    .into_values()
                    .map(|(values, count)| {
                        let mut row = serde_json::Map::new();
                        for item in items {
                            match item {
                                Item::Count { alias } => {
                                    row.insert(alias.clone(), json!(count));
                                }
                                Item::Field { path, alias } => {
                                    let i = query.group_by.iter().position(|g| g == path);
                                    let v = i.and_then(|i| values.get(i).cloned());
                                    row.insert(alias.clone(), v.unwrap_or_default());
                                }
                            }
                        }
                        serde_json::Value::Object(row)
                    })
                    .collect();
                let start = match from {
                    Some(Continue::Offset(n)) => n.min(rows.len()),
                    Some(Continue::After(_)) => {
                        return Err(ApiError::BadRequest(
                            "continuationToken: from a different query".into(),
                        ))
                    }
                    None => 0,
                };
                let end = page_size.map_or(rows.len(), |n| (start + n).min(rows.len()));
                let next = (end < rows.len()).then(|| Continue::Offset(end).encode());
                Ok((rows[start..end].to_vec(), next))
            }
            projection => {
                // Paged: in identity order, and only as many twins are evaluated as the page
                // needs (the next page starts after the last identity shown). Every row at
                // once: in registry order, with no key to build or sort.
                let paged = page_size.is_some() || from.is_some();
                let mut entries: Vec<(String, _)> = hub
                    .registry
                    .identities()
                    .into_iter()
                    .filter(|entry| entry.module_id.is_some() == want_modules)
                    .map(|entry| {
                        let key = match (&entry.module_id, paged) {
                            (_, false) => String::new(),
                            (Some(m), true) => format!("{}/{m}", entry.device_id),
                            (None, true) => entry.device_id.to_string(),
                        };
                        (key, entry)
                    })
                    .collect();
                if paged {
                    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                }
                let start = match &from {
                    Some(Continue::After(k)) => entries.partition_point(|(key, _)| key <= k),
                    Some(Continue::Offset(_)) => {
                        return Err(ApiError::BadRequest(
                            "continuationToken: from a different query".into(),
                        ))
                    }
                    None => 0,
                };
                let mut rows = Vec::new();
                let mut last = None;
                let mut more = false;
                for (key, entry) in &entries[start..] {
                    let subject = hub.subject(entry);
                    let view = subject.view();
                    if !query.matches_with(&view) {
                        continue;
                    }
                    if page_size.is_some_and(|n| rows.len() == n) {
                        more = true;
                        break;
                    }
                    rows.push(match projection {
                        Projection::Items(items) => {
                            let mut row = serde_json::Map::new();
                            for item in items {
                                if let Item::Field { path, alias } = item {
                                    row.insert(alias.clone(), field(&view, path));
                                }
                            }
                            serde_json::Value::Object(row)
                        }
                        _ => json!(twin_view(
                            &subject.key,
                            &subject.twin,
                            Some(&hub.identity_view(entry)),
                        )),
                    });
                    last = Some(key);
                }
                let next = last
                    .filter(|_| more)
                    .map(|k| Continue::After(k.clone()).encode());
                Ok((rows, next))
            }
        }
    })
    .await??;
    let mut response = Json(QueryPage {
        items,
        continuation_token: next.clone(),
    })
    .into_response();
    if let Some(token) = next.and_then(|t| axum::http::HeaderValue::from_str(&t).ok()) {
        response.headers_mut().insert("x-ms-continuation", token);
    }
    Ok(response)
}
