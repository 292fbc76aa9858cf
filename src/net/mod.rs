//! HTTP plumbing every side shares, and nothing of Matrix or agents: error chains, the
//! Matrix-style error body our own HTTP APIs answer with, token digests for constant-time
//! comparison; the listener with its timeouts and connection cap ([`listener`]),
//! throttled log lines ([`throttle`]); the address guard for outbound requests others can
//! steer ([`guard`]), and HTML read as text ([`html`]).

pub mod guard;
pub mod html;
pub mod listener;
pub mod throttle;

use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// An error and its causes on one line, `: `-separated, repeats left out (reqwest hides
/// the useful part in `source()`, and often repeats it).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source = Some(error);
    while let Some(e) = source {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}

/// The SHA-256 of a token; tokens are compared as digests so the comparison takes the same
/// time whatever their length or content.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether `presented` is the token whose digest is `expected`, in constant time.
pub fn token_matches(presented: &str, expected: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(token_digest(presented).ct_eq(expected))
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

/// Whether a peer (the homeserver) has reached our HTTP API, and with which token: a ping
/// that fails while the homeserver demonstrably reaches us is not an unreachable agentbus.
#[derive(Debug, Default)]
pub struct Contact {
    authenticated: AtomicBool,
    wrong_token: AtomicBool,
}

impl Contact {
    /// A request with the right token arrived.
    pub fn record_authenticated(&self) {
        self.authenticated.store(true, Ordering::Release);
    }

    /// A request with a different token arrived.
    pub fn record_wrong_token(&self) {
        self.wrong_token.store(true, Ordering::Release);
    }

    /// Whether a request with the right token arrived.
    pub fn reached_us(&self) -> bool {
        self.authenticated.load(Ordering::Acquire)
    }

    /// Whether a request with a different token arrived.
    pub fn saw_wrong_token(&self) -> bool {
        self.wrong_token.load(Ordering::Acquire)
    }
}
