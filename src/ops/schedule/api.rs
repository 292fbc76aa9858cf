//! The scheduler's admin routes, behind the admin token like every `/api/v1` route:
//!
//! - `GET /api/v1/tasks` — every scheduled task and heartbeat with its last and next run,
//!   outcome, failures in a row and whether it is paused ([`TaskView`]s).
//! - `POST /api/v1/tasks/{name}/trigger` — runs the task now and answers with how it
//!   stands after the run (a paused task that succeeds resumes).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::{Scheduler, TaskView, TriggerError};
use crate::net::ApiError;

/// The routes; the caller layers the admin-token check on them.
pub fn routes(scheduler: Arc<Scheduler>) -> Router {
    Router::new()
        .route("/api/v1/tasks", get(list))
        .route("/api/v1/tasks/{name}/trigger", post(trigger))
        .with_state(scheduler)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "M_UNKNOWN",
        e.to_string(),
    )
}

async fn list(State(scheduler): State<Arc<Scheduler>>) -> Result<Json<Vec<TaskView>>, ApiError> {
    scheduler.list().await.map(Json).map_err(internal)
}

async fn trigger(
    State(scheduler): State<Arc<Scheduler>>,
    Path(name): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    match scheduler.trigger(&name).await {
        Ok(view) => Ok(Json(view)),
        Err(e @ TriggerError::Unknown(_)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
            e.to_string(),
        )),
        Err(TriggerError::Store(e)) => Err(internal(e)),
    }
}
