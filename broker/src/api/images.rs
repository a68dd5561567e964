//! `/images`: adding, listing, resolving and downloading image packages.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::wire::{AddImage, Image, Items};
use super::{blocking, ApiError, ApiResult, ApiState};
use crate::hub::{Change, SharedHub};
use crate::images::{Added, ImageError, ImageKind, MAX_IMAGE_BYTES};

impl From<ImageError> for ApiError {
    fn from(e: ImageError) -> Self {
        match e {
            ImageError::Invalid { .. } => ApiError::BadRequest(e.to_string()),
            ImageError::Conflict(_) => ApiError::Conflict(e.to_string()),
            ImageError::NotFound(_) => ApiError::NotFound(e.to_string()),
            ImageError::Store(_) => ApiError::Internal(e.to_string()),
        }
    }
}

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route(
            "/images",
            get(list)
                .post(add)
                .layer(DefaultBodyLimit::max(MAX_IMAGE_BYTES)),
        )
        .route("/images/{reference}", get(show))
        .route("/images/{reference}/content", get(download))
}

/// The body is the image itself; name, version and kind are query parameters.
async fn add(
    State(hub): State<SharedHub>,
    Query(q): Query<AddImage>,
    body: Bytes,
) -> ApiResult<Response> {
    let missing = |f: &str| ApiError::BadRequest(format!("missing query parameter '{f}'"));
    let name = q.name.ok_or_else(|| missing("name"))?;
    let version = q.version.ok_or_else(|| missing("version"))?;
    let kind = ImageKind::parse(&q.kind.ok_or_else(|| missing("kind"))?)?;
    let added = blocking(&hub, move |h| h.images.add(&name, &version, kind, &body)).await??;
    Ok(match added {
        Added::New(i) => {
            // Groups following `name:latest` now want this version.
            hub.changed(Change::ImageAdded {
                name: i.name.clone(),
            })
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
            (StatusCode::CREATED, Json(i)).into_response()
        }
        Added::Existing(i) => (StatusCode::OK, Json(i)).into_response(),
    })
}

async fn list(State(hub): State<SharedHub>) -> Json<Items<Image>> {
    Json(Items {
        items: hub.images.list(),
    })
}

async fn show(
    State(hub): State<SharedHub>,
    Path(reference): Path<String>,
) -> ApiResult<Json<Image>> {
    Ok(Json(hub.images.resolve(&reference)?))
}

async fn download(
    State(hub): State<SharedHub>,
    Path(reference): Path<String>,
) -> ApiResult<Response> {
    let image = hub.images.resolve(&reference)?;
    let content = blocking(&hub, move |h| h.images.content(&image)).await??;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        content,
    )
        .into_response())
}
