//! `/certificates`: CA certificates for X.509 CA authentication (IoT Hub's certificates
//! resource): upload, prove possession, list, delete.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::wire::{AddCertificate, Items, VerifyCertificate};
use super::{blocking, ApiError, ApiResult, ApiState};
use crate::certificates::{CaCertificate, CertificateError};
use crate::hub::SharedHub;

impl From<CertificateError> for ApiError {
    fn from(e: CertificateError) -> Self {
        match e {
            CertificateError::Invalid(_) => ApiError::BadRequest(e.to_string()),
            CertificateError::NotFound(_) => ApiError::NotFound(e.to_string()),
            CertificateError::Exists(_) => ApiError::Conflict(e.to_string()),
            CertificateError::Store(_) => ApiError::Internal(e.to_string()),
        }
    }
}

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/certificates", get(list).post(add))
        .route("/certificates/{name}", get(show).delete(delete))
        .route("/certificates/{name}/verify", post(verify))
}

async fn list(State(hub): State<SharedHub>) -> Json<Items<CaCertificate>> {
    Json(Items {
        items: hub.certificates.list(),
    })
}

async fn show(
    State(hub): State<SharedHub>,
    Path(name): Path<String>,
) -> ApiResult<Json<CaCertificate>> {
    hub.certificates
        .get(&name)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("CA certificate '{name}' not found")))
}

async fn add(
    State(hub): State<SharedHub>,
    body: Result<Json<AddCertificate>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body?;
    let ca = blocking(&hub, move |h| {
        h.certificates.add(&body.name, &body.certificate)
    })
    .await??;
    Ok((StatusCode::CREATED, Json(ca)).into_response())
}

async fn verify(
    State(hub): State<SharedHub>,
    Path(name): Path<String>,
    body: Result<Json<VerifyCertificate>, JsonRejection>,
) -> ApiResult<Json<CaCertificate>> {
    let Json(body) = body?;
    let ca = blocking(&hub, move |h| {
        h.certificates.verify(&name, &body.certificate)
    })
    .await??;
    Ok(Json(ca))
}

async fn delete(State(hub): State<SharedHub>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    blocking(&hub, move |h| h.certificates.delete(&name)).await??;
    Ok(StatusCode::NO_CONTENT)
}
