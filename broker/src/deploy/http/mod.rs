//! The deployment resources of the management API, kept with the engine they drive and
//! mounted into the API by the server: the API names nothing of `deploy`.
//!
//! - `targeted`: `/deployments` (targeted and layered deployments, metrics, rollouts);
//! - `group`: `/products/{p}/groups/{g}/deployments` (group deployments).

mod group;
mod targeted;

use std::sync::Arc;

use axum::Router;

use super::{DeployError, Engine};
use crate::api::ApiError;
use crate::hub::SharedHub;

/// What the deployment handlers work with.
#[derive(Clone)]
pub struct DeployState {
    pub hub: SharedHub,
    pub engine: Arc<Engine>,
}

/// The deployment resources, ready to merge into the API router (behind its token check).
pub fn routes<S: Clone + Send + Sync + 'static>(hub: SharedHub, engine: Arc<Engine>) -> Router<S> {
    Router::new()
        .merge(targeted::routes())
        .merge(group::routes())
        .with_state(DeployState { hub, engine })
}

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> Self {
        match e {
            DeployError::Invalid { .. } => ApiError::BadRequest(e.to_string()),
            DeployError::InvalidRoutes(errors) => ApiError::InvalidRoutes(errors),
            DeployError::NotFound(_) => ApiError::NotFound(e.to_string()),
            DeployError::Exists(_) | DeployError::Changed(_) => ApiError::Conflict(e.to_string()),
            DeployError::Store(_) | DeployError::Twin(_) => ApiError::Internal(e.to_string()),
        }
    }
}
