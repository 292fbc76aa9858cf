//! `GET /_matrix/app/v1/users/{userId}` ([spec](https://spec.matrix.org/v1.18/application-service-api/#get_matrixappv1usersuserid))
//!
//! The homeserver asks whether a user in our namespace exists (someone invited or looked
//! up `@coder:server`). A configured agent is registered on the spot; anyone else does not
//! exist.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use ruma::UserId;

use super::ApiError;
use super::AppState;

pub async fn get_user(
    State(state): State<Arc<AppState>>,
    user_id: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(user_id) = user_id?;
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", "No such user");
    let user = UserId::parse(&user_id).map_err(|_| not_found())?;
    let agent = (state.config.agent_by_user(&user).map(|a| &a.id))
        .or_else(|| state.config.team_by_user(&user).map(|t| &t.id))
        .ok_or_else(not_found)?;
    state
        .matrix
        .intent(&user)
        .ensure_registered()
        .await
        .map_err(|e| {
            tracing::error!(agent = %agent, error = %e, "could not register agent on user query");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "M_UNKNOWN",
                format!("could not register {user}: {e}"),
            )
        })?;
    Ok(Json(serde_json::json!({})))
}
