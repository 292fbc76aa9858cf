//! `POST /_matrix/app/v1/ping` ([spec](https://spec.matrix.org/v1.18/application-service-api/#post_matrixappv1ping))
//!
//! The homeserver calls this when someone (our own startup check) asks it to ping us.

use axum::Json;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct PingBody {
    transaction_id: Option<String>,
}

pub async fn post_ping(body: Option<Json<PingBody>>) -> Json<serde_json::Value> {
    let txn = body.and_then(|Json(b)| b.transaction_id);
    tracing::info!(
        transaction_id = txn.as_deref().unwrap_or(""),
        "homeserver pinged us"
    );
    Json(serde_json::json!({}))
}
