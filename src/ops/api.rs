//! The admin HTTP API, `/api/v1/*`, on the same listener as the appservice API. Every
//! route requires `Authorization: Bearer <admin.token>` (any case of `Bearer`).
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

use super::health::{self, Readiness};
use super::metrics::{self, Scrape};
use crate::config::ChannelId;
use crate::net::{ApiError, bearer_token, token_digest, token_matches};
use crate::router::RouteDecision;
use crate::router::explain::{Explain, ExplainError, RouteQuery};
use crate::store::{PAIRING_TTL, PairedSender, PairingRequest, PairingStore, StoreError, Stores};

/// What the admin routes share.
pub struct AdminState {
    /// SHA-256 of the admin API token.
    admin_token_digest: [u8; 32],
    store: Stores,
    explain: Arc<dyn Explain>,
}

impl AdminState {
    pub fn new(admin_token: &str, store: Stores, explain: Arc<dyn Explain>) -> Arc<Self> {
        Arc::new(Self {
            admin_token_digest: token_digest(admin_token),
            store,
            explain,
        })
    }
}

/// The admin routes, authenticated by the admin token.
pub fn routes(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/api/v1/router/test", post(router_test))
        .route("/api/v1/pairing", get(pairing_list))
        .route("/api/v1/pairing/approve", post(pairing_approve))
        .route("/api/v1/pairing/revoke", post(pairing_revoke))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_admin_token,
        ))
        .with_state(state)
}

/// The probes: `GET /health`, `GET /ready` ([`super::health`]) and, unless metrics have
/// a listener of their own, `GET /metrics` ([`super::metrics`]). Unauthenticated, like
/// most exporters and every container probe: they say how busy agentbus is and whether
/// it can work, nothing of what was said.
pub fn probe_routes(readiness: Arc<Readiness>, scrape: Option<Arc<Scrape>>) -> Router {
    let probes = Router::new()
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .with_state(readiness);
    match scrape {
        Some(scrape) => probes.merge(metrics_routes(scrape)),
        None => probes,
    }
}

/// `GET /metrics` alone, for `metrics.listen`.
pub fn metrics_routes(scrape: Arc<Scrape>) -> Router {
    Router::new()
        .route("/metrics", get(metrics::metrics))
        .with_state(scrape)
}

pub(crate) async fn require_admin_token(
    State(state): State<Arc<AdminState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(bearer_token);
    let Some(token) = presented else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
            "admin API: send Authorization: Bearer <admin token>",
        ));
    };
    if !token_matches(token, &state.admin_token_digest) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "M_UNKNOWN_TOKEN",
            "admin API: wrong admin token",
        ));
    }
    Ok(next.run(request).await)
}

fn store_error(e: crate::store::StoreError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "M_UNKNOWN",
        e.to_string(),
    )
}

async fn router_test(
    State(state): State<Arc<AdminState>>,
    query: Result<Json<RouteQuery>, JsonRejection>,
) -> Result<Json<RouteDecision>, ApiError> {
    let Json(query) = query?;
    state
        .explain
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
pub async fn read_pairings(store: &dyn PairingStore) -> Result<PairingState, StoreError> {
    Ok(PairingState {
        pending: store
            .pending_pairings(crate::unix_ms(), PAIRING_TTL)
            .await?,
        approved: store.paired_senders().await?,
    })
}

/// Approves the live request with `code`; `None` when there is none (say [`unknown_code`]).
pub async fn approve(
    store: &dyn PairingStore,
    code: &str,
) -> Result<Option<PairingRequest>, StoreError> {
    store
        .approve_pairing(code, crate::unix_ms(), PAIRING_TTL)
        .await
}

/// What to tell someone whose code matches no live request.
pub fn unknown_code(code: &str) -> String {
    format!("no pending pairing request has code {code:?} (codes expire after an hour)")
}

async fn pairing_list(
    State(state): State<Arc<AdminState>>,
) -> Result<Json<PairingState>, ApiError> {
    read_pairings(state.store.pairing.as_ref())
        .await
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
    State(state): State<Arc<AdminState>>,
    body: Result<Json<ApproveRequest>, JsonRejection>,
) -> Result<Json<PairingRequest>, ApiError> {
    let Json(body) = body?;
    match approve(state.store.pairing.as_ref(), &body.code)
        .await
        .map_err(store_error)?
    {
        Some(request) => {
            tracing::info!(channel = ?request.channel, sender = ?request.sender, "pairing approved");
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
    pub channel: ChannelId,
    pub sender: String,
}

fn matrix() -> ChannelId {
    ChannelId::MATRIX
}

async fn pairing_revoke(
    State(state): State<Arc<AdminState>>,
    body: Result<Json<RevokeRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(body) = body?;
    let revoked = state
        .store
        .pairing
        .revoke_pairing(&body.channel, &body.sender)
        .await
        .map_err(store_error)?;
    if revoked {
        tracing::info!(channel = ?body.channel, sender = ?body.sender, "pairing revoked");
        Ok(Json(serde_json::json!({ "revoked": true })))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
            format!("{} is not paired on {}", body.sender, body.channel),
        ))
    }
}
