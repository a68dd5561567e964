//! `/consumerGroups`: the events endpoint's consumer groups (create with a start position,
//! list with lag, delete), and batch reads over HTTP: a page of events after the group's
//! checkpoint (or after a given position), and an explicit checkpoint.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::wire::Items;
use super::{blocking, ApiError, ApiResult, ApiState};
use crate::events::{EventsError, GroupView, StartAt};
use crate::hub::SharedHub;

impl From<EventsError> for ApiError {
    fn from(e: EventsError) -> Self {
        match e {
            EventsError::Invalid { .. } => ApiError::BadRequest(e.to_string()),
            EventsError::NotFound(_) => ApiError::NotFound(e.to_string()),
            EventsError::Exists(_) | EventsError::Limit(_) => ApiError::Conflict(e.to_string()),
            EventsError::Store(_) => ApiError::Internal(e.to_string()),
        }
    }
}

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/consumerGroups", get(list).post(create))
        .route("/consumerGroups/{group}", get(show).delete(delete))
        .route("/consumerGroups/{group}/events", get(read))
        .route("/consumerGroups/{group}/checkpoint", post(checkpoint))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateGroup {
    name: String,
    /// `start` (default), `end` or an RFC 3339 time.
    #[serde(default)]
    from: Option<String>,
}

async fn list(State(hub): State<SharedHub>) -> ApiResult<Json<Items<GroupView>>> {
    let items = blocking(&hub, |h| {
        h.events
            .names()
            .iter()
            .map(|g| h.events.view(g))
            .collect::<Result<Vec<_>, _>>()
    })
    .await??;
    Ok(Json(Items { items }))
}

async fn create(
    State(hub): State<SharedHub>,
    body: Result<Json<CreateGroup>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body?;
    let from = StartAt::parse(body.from.as_deref().unwrap_or("start"))?;
    let view = blocking(&hub, move |h| {
        h.events.create(&body.name, from)?;
        h.events.view(&body.name)
    })
    .await??;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn show(
    State(hub): State<SharedHub>,
    Path(group): Path<String>,
) -> ApiResult<Json<GroupView>> {
    Ok(Json(blocking(&hub, move |h| h.events.view(&group)).await??))
}

async fn delete(State(hub): State<SharedHub>, Path(group): Path<String>) -> ApiResult<StatusCode> {
    blocking(&hub, move |h| h.events.delete(&group)).await??;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadQuery {
    /// At most this many events (1..=1000, default 100).
    max: Option<usize>,
    /// After this sequence number instead of the group's checkpoint.
    after: Option<u64>,
}

async fn read(
    State(hub): State<SharedHub>,
    Path(group): Path<String>,
    Query(q): Query<ReadQuery>,
) -> ApiResult<Json<Value>> {
    let max = q.max.unwrap_or(100);
    if !(1..=1000).contains(&max) {
        return Err(ApiError::BadRequest("max: 1 to 1000".into()));
    }
    let (entries, checkpoint) = blocking(&hub, move |h| {
        let entries = h.events.read(&group, q.after, max)?;
        let checkpoint = h.events.view(&group)?.checkpoint;
        Ok::<_, EventsError>((entries, checkpoint))
    })
    .await??;
    let last = entries.last().map(|e| e.key.seq);
    Ok(Json(json!({
        "events": entries.iter().map(crate::events::describe).collect::<Vec<_>>(),
        "checkpoint": checkpoint,
        "lastSequenceNumber": last,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Checkpoint {
    sequence_number: u64,
}

async fn checkpoint(
    State(hub): State<SharedHub>,
    Path(group): Path<String>,
    body: Result<Json<Checkpoint>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(body) = body?;
    let checkpoint = blocking(&hub, move |h| {
        h.events.set_checkpoint(&group, body.sequence_number)
    })
    .await??;
    Ok(Json(json!({ "checkpoint": checkpoint })))
}
