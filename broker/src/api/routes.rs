//! `/routes` and `/queues`: the route table in force, route checks, and the
//! store-and-forward queues.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{ApiResult, ApiState};
use crate::hub::SharedHub;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/routes", get(list_routes))
        .route("/routes/check", post(check_route))
        .route("/queues", get(list_queues))
}

async fn list_routes(State(hub): State<SharedHub>) -> Json<serde_json::Value> {
    let mut v = crate::routing::table_json(&hub.routing.table());
    let upstream = hub.sinks.health(crate::sinks::SinkKind::Upstream);
    v["upstream"] = json!({
        "enabled": upstream.as_ref().is_some_and(|h| h.enabled),
        "connected": upstream.and_then(|h| h.connected).unwrap_or(false),
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
