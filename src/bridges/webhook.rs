//! `POST /bridges/webhook/{account}` — the generic signed webhook, for anything without a
//! bridge of its own.
//!
//! In: JSON `{id, chat: {id, name?}, sender: {id, name?}, text}` with the headers
//! `X-Agentbus-Timestamp` (unix seconds) and `X-Agentbus-Signature: sha256=<hex>`, the
//! HMAC-SHA256 under the account's secret of `timestamp + "." + body`. Out: the same
//! shape (`id` is the Matrix event ID, stable across retries) POSTed to the account's
//! `outbound_url`, signed the same way.
//!
//! Answers: 200 `{"status": "accepted" | "duplicate"}` once the message is recorded; 401
//! for a missing, wrong or stale (over five minutes off) signature; 400 with the reason
//! for a body that is not the schema; 404 for an unknown account; 413 for a body over
//! [`MAX_BODY`], refused before it is read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::OnceCell;
use url::Url;

use super::http::{self, refuse};
use super::{
    Addressing, BridgeState, Capabilities, Channel, Inbound, InboundMessage, OutboundMessage,
    Received, RemoteChat, RemoteUser, SendError, TextFormat,
};
use crate::config::{ChannelId, Config};

/// The largest request body accepted.
pub const MAX_BODY: usize = http::MAX_BODY;
/// How far a request's timestamp may be from our clock.
pub const WINDOW: Duration = http::WINDOW;
pub const TIMESTAMP_HEADER: &str = "x-agentbus-timestamp";
pub const SIGNATURE_HEADER: &str = "x-agentbus-signature";
/// How long one outbound POST may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// The platform name: `bridges.webhook`, and the channel bindings match on.
pub fn platform() -> ChannelId {
    ChannelId::new("webhook")
}

/// `sha256=<hex>` of HMAC-SHA256(`secret`, `timestamp.body`).
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    format!(
        "sha256={}",
        http::hmac_hex(secret, &[timestamp.as_bytes(), b".", body])
    )
}

/// Checks a request's signature and timestamp against `secret` at `now` (unix seconds);
/// `Err` says what is wrong, for the 401.
pub fn verify(
    secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: u64,
) -> Result<(), &'static str> {
    const ERRORS: http::SignatureErrors = http::SignatureErrors {
        missing_timestamp: "missing X-Agentbus-Timestamp",
        missing_signature: "missing X-Agentbus-Signature",
        not_seconds: "X-Agentbus-Timestamp is not unix seconds",
        stale: "X-Agentbus-Timestamp is more than five minutes off",
        wrong: "wrong X-Agentbus-Signature",
    };
    http::verify_signed(timestamp, signature, now, &ERRORS, |timestamp| {
        sign(secret, timestamp, body)
    })
}

fn now_secs() -> u64 {
    crate::unix_ms() / 1000
}

/// The wire schema, both ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookMessage {
    pub id: String,
    pub chat: RemoteChat,
    pub sender: RemoteUser,
    pub text: String,
}

/// Reads and checks an inbound body; `Err` is the reason for the 400.
pub fn parse(body: &[u8]) -> Result<WebhookMessage, String> {
    let message: WebhookMessage =
        serde_json::from_slice(body).map_err(|e| format!("the body is not the schema: {e}"))?;
    for (field, value) in [
        ("id", &message.id),
        ("chat.id", &message.chat.id),
        ("sender.id", &message.sender.id),
        ("text", &message.text),
    ] {
        if value.trim().is_empty() {
            return Err(format!("{field} must not be empty"));
        }
    }
    Ok(message)
}

/// One webhook account.
pub struct WebhookChannel {
    account: String,
    secret: Vec<u8>,
    outbound_url: Url,
    http: reqwest::Client,
    inbound: OnceCell<Inbound>,
}

impl WebhookChannel {
    pub fn new(account: &str, secret: Vec<u8>, outbound_url: Url) -> Self {
        Self {
            account: account.to_owned(),
            secret,
            outbound_url,
            http: reqwest::Client::builder()
                .timeout(SEND_TIMEOUT)
                .build()
                .expect("an HTTP client builds"),
            inbound: OnceCell::new(),
        }
    }
}

/// The secret `secret_env` names for account `id`, or what is wrong.
pub fn secret(id: &str, secret_env: &str) -> Result<Vec<u8>, String> {
    match std::env::var(secret_env) {
        Ok(secret) if !secret.is_empty() => Ok(secret.into_bytes()),
        _ => Err(format!(
            "bridges.webhook.accounts.{id}.secret_env names {secret_env}, which is not set: \
             set it to the secret shared with the other side"
        )),
    }
}

/// Every configured webhook account whose secret is set; the others are logged.
pub fn channels(config: &Config) -> Vec<Arc<WebhookChannel>> {
    let mut channels = Vec::new();
    for (id, account) in &config.bridges.webhook.accounts {
        match secret(id, &account.secret_env) {
            Ok(secret) => channels.push(Arc::new(WebhookChannel::new(
                id,
                secret,
                account.outbound_url.clone(),
            ))),
            Err(e) => tracing::error!("{e}"),
        }
    }
    channels
}

#[async_trait]
impl Channel for WebhookChannel {
    fn platform(&self) -> ChannelId {
        platform()
    }

    fn account(&self) -> &str {
        &self.account
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            text: TextFormat::Plain,
            max_text_len: None,
            addressing: Addressing::Every,
        }
    }

    async fn start(&self, inbound: Inbound) -> Result<(), String> {
        // The other side calls us: taking requests is all there is to connecting.
        inbound.report(
            BridgeState::Connected,
            Some("taking signed requests on bridges.listen".into()),
        );
        self.inbound
            .set(inbound)
            .map_err(|_| "the webhook account was started twice".to_owned())
    }

    async fn stop(&self) {
        // Requests in flight finish with the listener; none is taken after shutdown.
    }

    async fn send(&self, message: &OutboundMessage) -> Result<(), SendError> {
        let body = serde_json::to_vec(&WebhookMessage {
            id: message.id.clone(),
            chat: message.chat.clone(),
            sender: message.sender.clone(),
            text: message.text.clone(),
        })
        .expect("a message serialises");
        let timestamp = now_secs().to_string();
        let signature = sign(&self.secret, &timestamp, &body);
        let response = self
            .http
            .post(self.outbound_url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, &timestamp)
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await
            .map_err(|e| SendError::Transient {
                reason: format!("cannot reach {}: {e}", self.outbound_url),
                retry_after: None,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(SendError::Transient {
                reason: "429 Too Many Requests".into(),
                retry_after,
            });
        }
        if status.is_server_error() {
            return Err(SendError::Transient {
                reason: format!("{status}"),
                retry_after: None,
            });
        }
        Err(SendError::Permanent(format!(
            "{} answered {status}",
            self.outbound_url
        )))
    }
}

/// The routes' state: the accounts by ID.
#[derive(Clone)]
struct Routes {
    accounts: Arc<BTreeMap<String, Arc<WebhookChannel>>>,
}

/// `POST /bridges/webhook/{account}` for `channels` (merged into [`super::routes`]).
pub fn routes(channels: &[Arc<WebhookChannel>]) -> Router {
    let accounts = channels
        .iter()
        .map(|c| (c.account.clone(), c.clone()))
        .collect();
    Router::new()
        .route("/bridges/webhook/{account}", post(receive))
        .with_state(Routes {
            accounts: Arc::new(accounts),
        })
}

async fn receive(
    State(routes): State<Routes>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(channel) = routes.accounts.get(&account) else {
        return refuse(StatusCode::NOT_FOUND, "no such webhook account");
    };
    if http::declared_too_large(&headers) {
        return http::too_large();
    }
    let Some(body) = http::read(body).await else {
        return http::too_large();
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Err(reason) = verify(
        &channel.secret,
        header(TIMESTAMP_HEADER),
        header(SIGNATURE_HEADER),
        &body,
        now_secs(),
    ) {
        tracing::info!(account, reason, "webhook request refused");
        return refuse(StatusCode::UNAUTHORIZED, reason);
    }
    let message = match parse(&body) {
        Ok(message) => message,
        Err(reason) => return refuse(StatusCode::BAD_REQUEST, reason),
    };
    let Some(inbound) = channel.inbound.get() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the bridge is starting; try again",
        );
    };
    let received = inbound
        .receive(InboundMessage {
            account: account.clone(),
            chat: message.chat,
            sender: message.sender,
            text: message.text,
            remote_id: message.id,
            addressed: false,
        })
        .await;
    match received {
        Ok(Received::Accepted) => {
            (StatusCode::OK, axum::Json(json!({"status": "accepted"}))).into_response()
        }
        Ok(Received::Duplicate) => {
            (StatusCode::OK, axum::Json(json!({"status": "duplicate"}))).into_response()
        }
        Err(e) => {
            tracing::error!(account, error = %e, "cannot record a webhook message");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot record the message; try again",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"s3cret";

    #[test]
    fn a_signature_verifies_only_with_its_secret_body_and_time() {
        let body = br#"{"id":"1"}"#;
        let signature = sign(SECRET, "1700000000", body);
        assert!(signature.starts_with("sha256="));
        assert_eq!(signature.len(), "sha256=".len() + 64);
        let check = |secret: &[u8], ts: Option<&str>, sig: Option<&str>, body: &[u8], now| {
            verify(secret, ts, sig, body, now)
        };
        let ts = Some("1700000000");
        let sig = Some(signature.as_str());
        assert_eq!(check(SECRET, ts, sig, body, 1_700_000_000), Ok(()));
        assert_eq!(check(SECRET, ts, sig, body, 1_700_000_299), Ok(()));
        assert_eq!(
            check(SECRET, ts, sig, body, 1_700_000_301),
            Err("X-Agentbus-Timestamp is more than five minutes off")
        );
        assert!(
            check(SECRET, ts, sig, body, 1_699_999_600).is_err(),
            "from the future"
        );
        assert_eq!(
            check(b"other", ts, sig, body, 1_700_000_000),
            Err("wrong X-Agentbus-Signature")
        );
        assert_eq!(
            check(SECRET, ts, sig, br#"{"id":"2"}"#, 1_700_000_000),
            Err("wrong X-Agentbus-Signature")
        );
        assert_eq!(
            check(SECRET, Some("1700000001"), sig, body, 1_700_000_000),
            Err("wrong X-Agentbus-Signature"),
            "the timestamp is signed too"
        );
        assert!(check(SECRET, None, sig, body, 1_700_000_000).is_err());
        assert!(check(SECRET, ts, None, body, 1_700_000_000).is_err());
        assert!(check(SECRET, Some("soon"), sig, body, 1_700_000_000).is_err());
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: HMAC-SHA256("s3cret", "1700000000." + body), in hex.
        assert_eq!(
            sign(SECRET, "1700000000", br#"{"id":"1"}"#),
            "sha256=2b9dee6c893e4bf012ad34ee7b89d492b9567b4f47740ccbf0f161ba3717dc08"
        );
    }

    #[test]
    fn a_body_off_the_schema_is_refused_with_the_reason() {
        let ok =
            br#"{"id":"m1","chat":{"id":"c1","name":"Orders"},"sender":{"id":"u1"},"text":"hi"}"#;
        let message = parse(ok).unwrap();
        assert_eq!(message.chat.name.as_deref(), Some("Orders"));
        assert_eq!(message.sender.name, None);
        let missing = parse(br#"{"id":"m1","chat":{"id":"c1"},"text":"hi"}"#).unwrap_err();
        assert!(missing.contains("sender"), "{missing}");
        let empty = parse(br#"{"id":" ","chat":{"id":"c1"},"sender":{"id":"u1"},"text":"hi"}"#)
            .unwrap_err();
        assert_eq!(empty, "id must not be empty");
        assert!(parse(b"not json").is_err());
    }
}
