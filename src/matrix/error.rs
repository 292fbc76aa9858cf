//! How an outbound request failed, classified by whether retrying can help.

use std::time::Duration;

use serde::Deserialize;

/// How an outbound request failed, and therefore whether retrying can help.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MatrixError {
    /// The homeserver could not be reached (connection refused, reset, timeout).
    #[error("homeserver unreachable: {0}")]
    Network(String),
    /// The homeserver asked us to come back later (429 / 5xx).
    #[error("homeserver busy (HTTP {status}{}): {message}", errcode.as_deref().map(|c| format!(", {c}")).unwrap_or_default())]
    Transient {
        status: u16,
        errcode: Option<String>,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The request is wrong or not allowed; retrying will not help.
    #[error("HTTP {status} {errcode}: {message}")]
    Permanent {
        status: u16,
        errcode: String,
        message: String,
    },
}

impl MatrixError {
    /// The Matrix errcode, when the homeserver sent one.
    pub fn errcode(&self) -> Option<&str> {
        match self {
            MatrixError::Network(_) => None,
            MatrixError::Transient { errcode, .. } => errcode.as_deref(),
            MatrixError::Permanent { errcode, .. } => Some(errcode),
        }
    }
}

/// Classifies a non-success response from its status and JSON body.
pub fn classify_error(status: u16, body: &[u8]) -> MatrixError {
    #[derive(Deserialize)]
    struct ErrorBody {
        errcode: Option<String>,
        error: Option<String>,
        retry_after_ms: Option<u64>,
    }
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let errcode = parsed.as_ref().and_then(|b| b.errcode.clone());
    let message = parsed
        .as_ref()
        .and_then(|b| b.error.clone())
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    let retry_after = parsed
        .as_ref()
        .and_then(|b| b.retry_after_ms)
        .map(Duration::from_millis);
    if status == 429 || errcode.as_deref() == Some("M_LIMIT_EXCEEDED") || status >= 500 {
        MatrixError::Transient {
            status,
            errcode,
            message,
            retry_after,
        }
    } else {
        MatrixError::Permanent {
            status,
            errcode: errcode.unwrap_or_else(|| "M_UNKNOWN".to_owned()),
            message,
        }
    }
}

/// Why a message that must be delivered was not.
#[derive(Debug, thiserror::Error)]
pub enum Undelivered {
    /// The homeserver refused it for a reason that will not heal (not in the room, …).
    #[error("{0}")]
    Permanent(MatrixError),
    /// agentbus is shutting down; the caller leaves its event journaled.
    #[error("stopped before the homeserver took the message")]
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::RetryPolicy;

    #[test]
    fn client_errors_are_permanent_and_keep_the_errcode() {
        let error = classify_error(403, br#"{"errcode":"M_FORBIDDEN","error":"not in room"}"#);
        assert_eq!(error.errcode(), Some("M_FORBIDDEN"));
        assert_eq!(RetryPolicy::default().delay(0, &error), None);
        assert_eq!(error.to_string(), "HTTP 403 M_FORBIDDEN: not in room");
        let error = classify_error(404, b"not json");
        assert_eq!(error.to_string(), "HTTP 404 M_UNKNOWN: not json");
    }
}
