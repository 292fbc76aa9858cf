//! What the platforms' webhook routes share: the body limit, checked before a byte is read
//! when the request announces its length and again while reading, and the JSON answers.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// The largest request body a platform may send.
pub const MAX_BODY: usize = 1024 * 1024;

/// An error answer: `{"error": reason}` with `status`.
pub fn refuse(status: StatusCode, reason: impl Into<String>) -> Response {
    (status, Json(json!({ "error": reason.into() }))).into_response()
}

/// A 200 `{"status": status}` (accepted, duplicate, ignored).
pub fn status(status: &str) -> Response {
    (StatusCode::OK, Json(json!({ "status": status }))).into_response()
}

/// The 413 for a body over [`MAX_BODY`].
pub fn too_large() -> Response {
    refuse(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body is over {MAX_BODY} bytes"),
    )
}

/// Whether the request's `Content-Length` is over [`MAX_BODY`]: refused before its body
/// is read.
pub fn declared_too_large(headers: &HeaderMap) -> bool {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    declared.is_some_and(|n| n > MAX_BODY as u64)
}

/// The body, read up to [`MAX_BODY`]; `None` past it (a chunked body announces no length).
pub async fn read(body: Body) -> Option<Bytes> {
    axum::body::to_bytes(body, MAX_BODY).await.ok()
}
