//! HTTP plumbing every side shares, and nothing of Matrix or agents: error chains, the
//! Matrix-style error body our own HTTP APIs answer with (every error, axum's own
//! rejections included: [`error_body`]), bearer tokens and their digests for
//! constant-time comparison; the listener with its timeouts and connection cap
//! ([`listener`]), throttled log lines ([`throttle`]); the address guard for outbound
//! requests others can steer ([`guard`]), and HTML read as text ([`html`]).

pub mod guard;
pub mod html;
pub mod listener;
pub mod throttle;

use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
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

impl From<JsonRejection> for ApiError {
    /// Not JSON → `M_NOT_JSON`; JSON of the wrong shape → `M_BAD_JSON`, both 400 as
    /// homeservers answer them; the rest keeps axum's status.
    fn from(rejection: JsonRejection) -> Self {
        let (status, errcode) = match &rejection {
            JsonRejection::JsonSyntaxError(_) => (StatusCode::BAD_REQUEST, "M_NOT_JSON"),
            JsonRejection::JsonDataError(_) => (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
            JsonRejection::MissingJsonContentType(_) => (rejection.status(), "M_NOT_JSON"),
            _ => (rejection.status(), errcode_for(rejection.status())),
        };
        Self::new(status, errcode, rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        let status = rejection.status();
        let errcode = if status == StatusCode::BAD_REQUEST {
            "M_INVALID_PARAM"
        } else {
            errcode_for(status)
        };
        Self::new(status, errcode, rejection.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        let status = rejection.status();
        Self::new(status, errcode_for(status), rejection.body_text())
    }
}

/// The Matrix errcode for an error status nothing more specific was said about
/// ([spec: standard error response](https://spec.matrix.org/v1.18/client-server-api/#standard-error-response);
/// 404 and 405 per "Unsupported endpoints").
fn errcode_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED => {
            "M_UNRECOGNIZED"
        }
        StatusCode::FORBIDDEN => "M_FORBIDDEN",
        StatusCode::PAYLOAD_TOO_LARGE
        | StatusCode::URI_TOO_LONG
        | StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "M_TOO_LARGE",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "M_NOT_JSON",
        StatusCode::UNPROCESSABLE_ENTITY => "M_BAD_JSON",
        StatusCode::TOO_MANY_REQUESTS => "M_LIMIT_EXCEEDED",
        _ => "M_UNKNOWN",
    }
}

/// Gives an error response that is not JSON a Matrix error body (for `map_response`):
/// axum's own answers — 405, 413 from the body limit, rejections of handlers that take
/// an extractor's rejection as is — are plain text or empty, and a homeserver or client
/// reading `errcode` would find none. Their text becomes `error`; other headers (`Allow`)
/// stay.
pub async fn error_body(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(response.headers()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    // axum's rejection texts are a line; a longer body is not buffered, and the status's
    // reason stands in for it.
    let text = match axum::body::to_bytes(body, 4096).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let error = if text.is_empty() {
        status.canonical_reason().unwrap_or("Error").to_owned()
    } else {
        text
    };
    let mut answer = ApiError::new(status, errcode_for(status), error).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().append(name, value.clone());
        }
    }
    answer
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// The token of an `Authorization: Bearer <token>` header, or `None` when the header is
/// not in that form (another scheme, or a bare token). The scheme is case-insensitive
/// (RFC 9110 §11.1) and separated from the token by one or more spaces.
pub fn bearer_token(value: &HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_matches(' '))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_with_any_case_of_the_scheme() {
        let token = |v: &str| bearer_token(&HeaderValue::from_str(v).unwrap()).map(str::to_owned);
        for (header, expected) in [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("BEARER abc", Some("abc")),
            ("bEaReR  abc", Some("abc")),
            ("Bearer", Some("")),
            ("Bearer ", Some("")),
            ("abc", None),
            ("Basic YWxhZGRpbjpvcGVuc2VzYW1l", None),
            ("Bearerabc", None),
            ("", None),
        ] {
            assert_eq!(token(header).as_deref(), expected, "{header:?}");
        }
        assert_eq!(
            bearer_token(&HeaderValue::from_bytes(b"Bearer \xff").unwrap()),
            None
        );
    }

    #[test]
    fn error_statuses_have_the_spec_errcodes() {
        for (status, errcode) in [
            (StatusCode::NOT_FOUND, "M_UNRECOGNIZED"),
            (StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED"),
            (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"),
            (StatusCode::URI_TOO_LONG, "M_TOO_LARGE"),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "M_NOT_JSON"),
            (StatusCode::UNPROCESSABLE_ENTITY, "M_BAD_JSON"),
            (StatusCode::BAD_REQUEST, "M_UNKNOWN"),
            (StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN"),
        ] {
            assert_eq!(errcode_for(status), errcode, "{status}");
        }
    }
}
