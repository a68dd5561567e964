//! `/enrollmentGroups` and `/enrollments`: who may provision themselves (DPS enrollments with
//! symmetric-key attestation).

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::wire::{Items, SetProvisioningStatus};
use super::{blocking, ApiError, ApiResult, ApiState};
use crate::enrollment::{Enrollment, EnrollmentError, EnrollmentInput, EnrollmentKind};
use crate::hub::SharedHub;

impl From<EnrollmentError> for ApiError {
    fn from(e: EnrollmentError) -> Self {
        match e {
            EnrollmentError::Invalid { .. } => ApiError::BadRequest(e.to_string()),
            EnrollmentError::NotFound(_) => ApiError::NotFound(e.to_string()),
            EnrollmentError::Exists(_) => ApiError::Conflict(e.to_string()),
            EnrollmentError::Store(_) => ApiError::Internal(e.to_string()),
        }
    }
}

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/enrollmentGroups", get(list_groups).post(create_group))
        .route(
            "/enrollmentGroups/{id}",
            get(show_group).patch(patch_group).delete(delete_group),
        )
        .route("/enrollments", get(list_individual).post(create_individual))
        .route(
            "/enrollments/{id}",
            get(show_individual)
                .patch(patch_individual)
                .delete(delete_individual),
        )
}

fn list(hub: &SharedHub, kind: EnrollmentKind) -> Json<Items<Enrollment>> {
    Json(Items {
        items: hub.enrollments.list(kind),
    })
}

async fn create(
    hub: SharedHub,
    kind: EnrollmentKind,
    body: Result<Json<EnrollmentInput>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body?;
    // A group that does not exist would fail every registration: refused here, by name.
    if let Some(path) = &body.device_group {
        hub.fleet
            .resolve(path)
            .map_err(|e| ApiError::BadRequest(format!("deviceGroup: {e}")))?;
    }
    let e = blocking(&hub, move |h| h.enrollments.create(kind, body)).await??;
    Ok((StatusCode::CREATED, Json(e)).into_response())
}

fn show(hub: &SharedHub, kind: EnrollmentKind, id: &str) -> ApiResult<Json<Enrollment>> {
    hub.enrollments
        .get(kind, id)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("enrollment '{id}' not found")))
}

async fn patch(
    hub: SharedHub,
    kind: EnrollmentKind,
    id: String,
    body: Result<Json<SetProvisioningStatus>, JsonRejection>,
) -> ApiResult<Json<Enrollment>> {
    let Json(body) = body?;
    let e = blocking(&hub, move |h| {
        h.enrollments
            .set_status(kind, &id, &body.provisioning_status)
    })
    .await??;
    Ok(Json(e))
}

async fn delete(hub: SharedHub, kind: EnrollmentKind, id: String) -> ApiResult<StatusCode> {
    blocking(&hub, move |h| h.enrollments.delete(kind, &id)).await??;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_groups(State(hub): State<SharedHub>) -> Json<Items<Enrollment>> {
    list(&hub, EnrollmentKind::Group)
}

async fn list_individual(State(hub): State<SharedHub>) -> Json<Items<Enrollment>> {
    list(&hub, EnrollmentKind::Individual)
}

async fn create_group(
    State(hub): State<SharedHub>,
    body: Result<Json<EnrollmentInput>, JsonRejection>,
) -> ApiResult<Response> {
    create(hub, EnrollmentKind::Group, body).await
}

async fn create_individual(
    State(hub): State<SharedHub>,
    body: Result<Json<EnrollmentInput>, JsonRejection>,
) -> ApiResult<Response> {
    create(hub, EnrollmentKind::Individual, body).await
}

async fn show_group(
    State(hub): State<SharedHub>,
    Path(id): Path<String>,
) -> ApiResult<Json<Enrollment>> {
    show(&hub, EnrollmentKind::Group, &id)
}

async fn show_individual(
    State(hub): State<SharedHub>,
    Path(id): Path<String>,
) -> ApiResult<Json<Enrollment>> {
    show(&hub, EnrollmentKind::Individual, &id)
}

async fn patch_group(
    State(hub): State<SharedHub>,
    Path(id): Path<String>,
    body: Result<Json<SetProvisioningStatus>, JsonRejection>,
) -> ApiResult<Json<Enrollment>> {
    patch(hub, EnrollmentKind::Group, id, body).await
}

async fn patch_individual(
    State(hub): State<SharedHub>,
    Path(id): Path<String>,
    body: Result<Json<SetProvisioningStatus>, JsonRejection>,
) -> ApiResult<Json<Enrollment>> {
    patch(hub, EnrollmentKind::Individual, id, body).await
}

async fn delete_group(
    State(hub): State<SharedHub>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    delete(hub, EnrollmentKind::Group, id).await
}

async fn delete_individual(
    State(hub): State<SharedHub>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    delete(hub, EnrollmentKind::Individual, id).await
}
