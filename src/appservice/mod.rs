//! The inbound homeserver API: what Synapse or Conduit calls on us.
//!
//! Every route here authenticates the homeserver by its hs_token, answers in milliseconds
//! and never waits on a model: transactions are journaled durably and handed to the inbox
//! workers ([`crate::inbox`]).

mod ping;
pub mod registration;
mod rooms;
mod transactions;
mod users;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AppState;

/// Largest transaction body accepted. Synapse sends at most 100 events per transaction,
/// but a single event may be up to 64 KiB.
const MAX_TRANSACTION_BYTES: usize = 16 * 1024 * 1024;

/// The appservice HTTP API as an axum router (spec: Application Service API).
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route(
            "/_matrix/app/v1/transactions/{txn_id}",
            put(transactions::put_transaction),
        )
        .route("/_matrix/app/v1/users/{user_id}", get(users::get_user))
        .route("/_matrix/app/v1/rooms/{alias}", get(rooms::get_room_alias))
        .route("/_matrix/app/v1/ping", post(ping::post_ping))
        // Legacy unprefixed paths, still used by older homeservers.
        .route("/transactions/{txn_id}", put(transactions::put_transaction))
        .route("/users/{user_id}", get(users::get_user))
        .route("/rooms/{alias}", get(rooms::get_room_alias))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_hs_token,
        ));
    api.merge(crate::ops::api::routes(state.clone()))
        .fallback(unrecognized)
        .layer(DefaultBodyLimit::max(MAX_TRANSACTION_BYTES))
        .with_state(state)
}

/// A Matrix error response: `{"errcode": …, "error": …}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub error: String,
}

impl ApiError {
    pub fn new(status: StatusCode, errcode: &'static str, error: impl Into<String>) -> Self {
        Self {
            status,
            errcode,
            error: error.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "errcode": self.errcode, "error": self.error });
        (self.status, axum::Json(body)).into_response()
    }
}

async fn unrecognized() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "M_UNRECOGNIZED",
        "Unrecognized request",
    )
}

/// The SHA-256 of a token; tokens are compared as digests so the comparison takes the same
/// time whatever their length or content.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Checks the hs_token, from `Authorization: Bearer` or `?access_token=` (Conduit sends
/// the latter); when both are present they must agree.
async fn require_hs_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim().to_owned());
    let query = request.uri().query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v.into_owned())
    });
    let token = match (header, query) {
        (None, None) => {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "M_MISSING_TOKEN",
                "Missing access token",
            )
            .into_response();
        }
        (Some(h), Some(q)) if h != q => {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "M_FORBIDDEN",
                "Conflicting access tokens",
            )
            .into_response();
        }
        (Some(t), _) | (None, Some(t)) => t,
    };
    if !bool::from(token_digest(&token).ct_eq(&state.hs_token_digest)) {
        tracing::warn!(path = %request.uri().path(), "rejected a request with a wrong hs_token");
        return ApiError::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", "Invalid access token")
            .into_response();
    }
    next.run(request).await
}
