//! `POST /backup`: a consistent copy of the running hub's data directory, to start a hub on.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::{blocking, ApiError, ApiResult, ApiState};
use crate::backup::{BackupError, BackupReport};
use crate::hub::SharedHub;

pub fn routes() -> Router<ApiState> {
    Router::new().route("/backup", post(backup))
}

/// Where to write the copy: a directory on the hub's machine that does not exist yet or is
/// empty.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    pub dir: std::path::PathBuf,
}

impl From<BackupError> for ApiError {
    fn from(e: BackupError) -> Self {
        match e {
            BackupError::NotEmpty(_) => ApiError::Conflict(e.to_string()),
            _ => ApiError::Internal(e.to_string()),
        }
    }
}

async fn backup(
    State(hub): State<SharedHub>,
    body: Result<Json<BackupRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<BackupReport>)> {
    let Json(req) = body?;
    if !req.dir.is_absolute() {
        return Err(ApiError::BadRequest(format!(
            "dir {}: give an absolute path (it is on the hub's machine)",
            req.dir.display()
        )));
    }
    let report = blocking(&hub, move |h| crate::backup::backup(h, &req.dir)).await??;
    tracing::info!(dir = %report.dir.display(), queued = report.queued_entries, "backup written");
    Ok((StatusCode::CREATED, Json(report)))
}
