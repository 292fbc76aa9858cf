//! `POST /_matrix/app/v1/ping` ([spec](https://spec.matrix.org/v1.18/application-service-api/#post_matrixappv1ping))
//!
//! The homeserver calls this when someone (our own startup check) asks it to ping us.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use serde::Deserialize;

use super::ApiError;

#[derive(Debug, Default, Deserialize)]
pub struct PingBody {
    transaction_id: Option<String>,
}

/// A body is optional (without a `Content-Type` there is none); one that is there must be
/// the JSON object the spec describes.
pub async fn post_ping(
    body: Result<Option<Json<PingBody>>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let txn = body?.and_then(|Json(b)| b.transaction_id);
    tracing::info!(
        transaction_id = ?txn.as_deref().unwrap_or(""),
        "homeserver pinged us"
    );
    Ok(Json(serde_json::json!({})))
}
