//! `GET /_matrix/app/v1/rooms/{roomAlias}` ([spec](https://spec.matrix.org/v1.18/application-service-api/#get_matrixappv1roomsroomalias))
//!
//! No room aliases are provisioned on demand yet (bridge portals will be), so every query
//! is answered "does not exist".

use axum::extract::Path;
use axum::extract::rejection::PathRejection;
use axum::http::StatusCode;

use super::ApiError;

pub async fn get_room_alias(alias: Result<Path<String>, PathRejection>) -> ApiError {
    let alias = match alias {
        Ok(Path(alias)) => alias,
        Err(rejection) => return rejection.into(),
    };
    tracing::debug!(?alias, "room alias query: not provisioned");
    ApiError::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", "No such room alias")
}
