//! `/routes` and `/queues`: the route table in force, route checks, and the
//! store-and-forward queues.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::wire::{
    Dropped, QueueLimits, QueueList, QueueView, RouteCheck, RouteCheckResult, RouteTableView,
    RouteView, UpstreamView,
};
use super::{ApiResult, ApiState};
use crate::hub::SharedHub;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/routes", get(list_routes))
        .route("/routes/check", post(check_route))
        .route("/queues", get(list_queues))
}

async fn list_routes(State(hub): State<SharedHub>) -> Json<RouteTableView> {
    let (table, notes) = hub.routing.table_with_notes();
    let routes = table
        .routes
        .iter()
        .zip(notes)
        .map(|(r, undeliverable)| RouteView {
            name: r.spec.name.clone(),
            route: r.spec.text.clone(),
            priority: r.spec.priority,
            time_to_live_secs: r.spec.ttl_secs.unwrap_or(table.default_ttl_secs),
            source: r.spec.origin.clone(),
            sink: r.route.sink.to_string(),
            undeliverable,
        })
        .collect();
    let upstream = hub.sinks.health(crate::sinks::upstream::KIND);
    Json(RouteTableView {
        routes,
        default_time_to_live_secs: table.default_ttl_secs,
        upstream: UpstreamView {
            enabled: upstream.as_ref().is_some_and(|h| h.enabled),
            connected: upstream.and_then(|h| h.connected).unwrap_or(false),
        },
    })
}

async fn check_route(body: Result<Json<RouteCheck>, JsonRejection>) -> ApiResult<Response> {
    let Json(body) = body?;
    match fleethub_router::route::Route::parse(&body.route) {
        Ok(r) => Ok(Json(RouteCheckResult {
            valid: true,
            source: Some(r.source.to_string()),
            condition: r.condition.as_ref().map(|c| c.source().to_string()),
            sink: Some(r.sink.to_string()),
            error: None,
            message: None,
            column: None,
        })
        .into_response()),
        Err(e) => Ok((
            StatusCode::BAD_REQUEST,
            Json(RouteCheckResult {
                valid: false,
                source: None,
                condition: None,
                sink: None,
                error: Some("BadRequest".into()),
                message: Some(e.to_string()),
                column: Some(e.column),
            }),
        )
            .into_response()),
    }
}

async fn list_queues(State(hub): State<SharedHub>) -> Json<QueueList> {
    let now = crate::c2d::now_ms();
    let stats = hub.queue_stats();
    hub.metrics.observe_queues(&stats, now);
    let items = stats
        .iter()
        .map(|s| QueueView {
            sink: s.sink.clone(),
            depth: s.depth,
            bytes: s.bytes,
            oldest_age_seconds: s.oldest_ms.map(|t| now.saturating_sub(t) as f64 / 1000.0),
            dropped: Dropped {
                expired: s.dropped_expired,
                quota: s.dropped_quota,
            },
        })
        .collect();
    let cfg = &hub.config.store_and_forward;
    Json(QueueList {
        items,
        limits: QueueLimits {
            max_bytes: cfg.max_bytes,
            max_sink_bytes: cfg.max_sink_bytes,
            when_full: format!("{:?}", cfg.when_full),
        },
        refused: hub.metrics.queue_refused.get(),
        recovered_from: hub
            .queues
            .recovered_from
            .as_ref()
            .map(|p| p.display().to_string()),
        corrupt_records: hub.queues.corrupt_records,
        damaged_logs: hub
            .queues
            .damaged_logs
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
    })
}
