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

/// How far a signed request's timestamp may be from our clock.
pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

/// What a signed request's checks say when they fail, in one platform's header names.
pub struct SignatureErrors {
    pub missing_timestamp: &'static str,
    pub missing_signature: &'static str,
    pub not_seconds: &'static str,
    pub stale: &'static str,
    pub wrong: &'static str,
}

/// HMAC-SHA256 under `secret` of `parts` one after the other, in hex.
pub fn hmac_hex(secret: &[u8], parts: &[&[u8]]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    for part in parts {
        mac.update(part);
    }
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a signed request at `now` (unix seconds): both headers there, the timestamp
/// within [`WINDOW`], and `signature` equal (in constant time) to what `expected` makes of
/// the timestamp. `Err` is the reason for the 401.
pub fn verify_signed(
    timestamp: Option<&str>,
    signature: Option<&str>,
    now: u64,
    errors: &SignatureErrors,
    expected: impl FnOnce(&str) -> String,
) -> Result<(), &'static str> {
    use subtle::ConstantTimeEq;
    let timestamp = timestamp.ok_or(errors.missing_timestamp)?;
    let signature = signature.ok_or(errors.missing_signature)?;
    let at: u64 = timestamp.parse().map_err(|_| errors.not_seconds)?;
    if now.abs_diff(at) > WINDOW.as_secs() {
        return Err(errors.stale);
    }
    if bool::from(expected(timestamp).as_bytes().ct_eq(signature.as_bytes())) {
        Ok(())
    } else {
        Err(errors.wrong)
    }
}
