//! The admin HTTP API, `/api/v1/*`, on the same listener as the appservice API. Every
//! route requires `Authorization: Bearer <admin.token>`.
//!
//! - `POST /api/v1/router/test` — a [`RouteQuery`] in, the [`RouteDecision`] out; nothing is
//!   sent or recorded.
//! - `GET /api/v1/pairing` — pending pairing requests and approved senders.
//! - `POST /api/v1/pairing/approve` — `{"code": "…"}`: approve a pending request.
//! - `POST /api/v1/pairing/revoke` — `{"channel": "matrix", "sender": "@…"}`.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::appservice::{ApiError, token_digest};
use crate::inbox::{ExplainError, PAIRING_TTL, RouteQuery};
use crate::router::RouteDecision;
use crate::store::{PairedSender, PairingRequest, Store, StoreError};

/// The admin routes, authenticated by the admin token.
pub fn routes(state: Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/v1/router/test", post(router_test))
        .route("/api/v1/pairing", get(pairing_list))
        .route("/api/v1/pairing/approve", post(pairing_approve))
        .route("/api/v1/pairing/revoke", post(pairing_revoke))
        .route_layer(middleware::from_fn_with_state(state, require_admin_token))
}

async fn require_admin_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    let Some(token) = presented else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
            "admin API: send Authorization: Bearer <admin token>",
        ));
    };
    use subtle::ConstantTimeEq;
    if !bool::from(token_digest(token).ct_eq(&state.admin_token_digest)) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "M_UNKNOWN_TOKEN",
            "admin API: wrong admin token",
        ));
    }
    Ok(next.run(request).await)
}

fn bad_json(rejection: JsonRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", rejection.body_text())
}

fn store_error(e: crate::store::StoreError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "M_UNKNOWN",
        e.to_string(),
    )
}

async fn router_test(
    State(state): State<Arc<AppState>>,
    query: Result<Json<RouteQuery>, JsonRejection>,
) -> Result<Json<RouteDecision>, ApiError> {
    let Json(query) = query.map_err(bad_json)?;
    state
        .processor
        .explain(&query)
        .await
        .map(Json)
        .map_err(|ExplainError::BadQuery(e)| {
            ApiError::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", e)
        })
}

/// `GET /api/v1/pairing`
#[derive(Debug, Serialize, Deserialize)]
pub struct PairingState {
    pub pending: Vec<PairingRequest>,
    pub approved: Vec<PairedSender>,
}

/// The pairing state of `store` now: live requests and approved senders.
pub fn read_pairings(store: &dyn Store) -> Result<PairingState, StoreError> {
    Ok(PairingState {
        pending: store.pending_pairings(crate::unix_ms(), PAIRING_TTL)?,
        approved: store.paired_senders()?,
    })
}

/// Approves the live request with `code`; `None` when there is none (say [`unknown_code`]).
pub fn approve(store: &dyn Store, code: &str) -> Result<Option<PairingRequest>, StoreError> {
    store.approve_pairing(code, crate::unix_ms(), PAIRING_TTL)
}

/// What to tell someone whose code matches no live request.
pub fn unknown_code(code: &str) -> String {
    format!("no pending pairing request has code {code:?} (codes expire after an hour)")
}

async fn pairing_list(State(state): State<Arc<AppState>>) -> Result<Json<PairingState>, ApiError> {
    read_pairings(state.store.as_ref())
        .map(Json)
        .map_err(store_error)
}

/// `POST /api/v1/pairing/approve`
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproveRequest {
    pub code: String,
}

async fn pairing_approve(
    State(state): State<Arc<AppState>>,
    body: Result<Json<ApproveRequest>, JsonRejection>,
) -> Result<Json<PairingRequest>, ApiError> {
    let Json(body) = body.map_err(bad_json)?;
    match approve(state.store.as_ref(), &body.code).map_err(store_error)? {
        Some(request) => {
            tracing::info!(channel = %request.channel, sender = %request.sender, "pairing approved");
            Ok(Json(request))
        }
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
            unknown_code(&body.code),
        )),
    }
}

/// `POST /api/v1/pairing/revoke`
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    #[serde(default = "matrix")]
    pub channel: String,
    pub sender: String,
}

fn matrix() -> String {
    crate::router::MATRIX.to_owned()
}

async fn pairing_revoke(
    State(state): State<Arc<AppState>>,
    body: Result<Json<RevokeRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(body) = body.map_err(bad_json)?;
    let revoked = state
        .store
        .revoke_pairing(&body.channel, &body.sender)
        .map_err(store_error)?;
    if revoked {
        tracing::info!(channel = %body.channel, sender = %body.sender, "pairing revoked");
        Ok(Json(serde_json::json!({ "revoked": true })))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
            format!("{} is not paired on {}", body.sender, body.channel),
        ))
    }
}
