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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};

use crate::config::Config;
use crate::matrix::MatrixClient;
pub use crate::net::ApiError;
use crate::net::throttle::LogThrottle;
use crate::net::{Contact, bearer_token, token_digest, token_matches};
use crate::store::JournalStore;
use crate::store::feed::FeedSender;

/// Largest transaction body accepted. Synapse sends at most 100 events per transaction,
/// but a single event may be up to 64 KiB.
const MAX_TRANSACTION_BYTES: usize = 16 * 1024 * 1024;
/// At most one warning about requests with a wrong hs_token per this interval: anyone who
/// can reach the listener can send them.
const WRONG_TOKEN_WARNING_EVERY: Duration = Duration::from_secs(60);

/// What the appservice API's handlers share.
pub struct AppState {
    pub config: Arc<Config>,
    /// SHA-256 of the hs_token, for constant-time comparison.
    hs_token_digest: [u8; 32],
    pub journal: Arc<dyn JournalStore>,
    /// Where journaled events go to the inbox.
    pub feed: FeedSender,
    /// For registering agents the homeserver asks about.
    pub matrix: Arc<MatrixClient>,
    /// What the homeserver has shown of itself, for the startup checks.
    pub contact: Arc<Contact>,
    /// Keeps a flood of wrong-token requests from flooding the log.
    wrong_token_warnings: LogThrottle,
}

impl AppState {
    /// The state for `config`, whose tokens are resolved.
    pub fn new(
        config: Arc<Config>,
        journal: Arc<dyn JournalStore>,
        feed: FeedSender,
        matrix: Arc<MatrixClient>,
    ) -> Arc<Self> {
        let hs_token = config
            .appservice
            .hs_token
            .as_deref()
            .expect("tokens are resolved before building state");
        Arc::new(Self {
            hs_token_digest: token_digest(hs_token),
            config,
            journal,
            feed,
            matrix,
            contact: Arc::default(),
            wrong_token_warnings: LogThrottle::new(WRONG_TOKEN_WARNING_EVERY),
        })
    }
}

/// The appservice HTTP API as an axum router (spec: Application Service API).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
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
        ))
        .layer(DefaultBodyLimit::max(MAX_TRANSACTION_BYTES))
        .with_state(state)
}

/// The answer to any route nobody serves.
pub async fn unrecognized() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "M_UNRECOGNIZED",
        "Unrecognized request",
    )
}

/// Checks the hs_token, from `Authorization: Bearer <token>` (any case of `Bearer`) or
/// `?access_token=` (Conduit and older homeservers send the latter); when both are present
/// they must agree. An `Authorization` header in another form — a bare token, another
/// scheme — is refused as no token at all, like Synapse does, rather than guessed at.
async fn require_hs_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let header = match request.headers().get(axum::http::header::AUTHORIZATION) {
        None => None,
        Some(value) => match bearer_token(value) {
            Some(token) => Some(token.to_owned()),
            None => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "M_MISSING_TOKEN",
                    "Invalid Authorization header: send Authorization: Bearer <hs_token>",
                )
                .into_response();
            }
        },
    };
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
    if !token_matches(&token, &state.hs_token_digest) {
        state.contact.record_wrong_token();
        if let Some(held_back) = state.wrong_token_warnings.admit() {
            let peer = request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(peer)| *peer);
            // The path as Debug: it is the requester's text, and must not forge log lines.
            tracing::warn!(
                path = ?request.uri().path(),
                peer = peer.map(tracing::field::display),
                suppressed = held_back,
                "rejected a request with a wrong hs_token (is the registration's hs_token \
                 the one agentbus has?)"
            );
        }
        return ApiError::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", "Invalid access token")
            .into_response();
    }
    state.contact.record_authenticated();
    next.run(request).await
}
