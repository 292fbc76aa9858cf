//! `POST /bridges/slack/{account}` — Slack workspaces over the
//! [Events API](https://api.slack.com/apis/events-api), answered through the
//! [Web API](https://api.slack.com/web).
//!
//! In: Slack POSTs each event as JSON, signed ([Verifying requests from Slack](https://api.slack.com/authentication/verifying-requests-from-slack)):
//! `X-Slack-Signature: v0=<hex>` is HMAC-SHA256 under the app's signing secret of
//! `v0:<X-Slack-Request-Timestamp>:<body>`, refused over five minutes off. A
//! `url_verification` request is answered with its `challenge`; an `event_callback` with a
//! `message` or `app_mention` is recorded (the core journals it, which is quick) and only
//! then acknowledged with 200, well within the three seconds Slack waits before it
//! redelivers with `X-Slack-Retry-Num`. A redelivery, and the second of the `message` and
//! `app_mention` Slack sends for one message that mentions the app, are the same message
//! (its channel and `ts`), so they post nothing again.
//!
//! Each channel is a portal (named `#name` when `conversations.info` may tell, else after
//! its ID; a DM after the person); each person a puppet named from `users.info`, cached.
//! Bots' messages, the app's own included, are not bridged. A mention of the app, or any
//! DM to it, addresses the account's agent: the posted message mentions it in
//! `m.mentions`, and the `<@app>` token is taken out of the text.
//!
//! Out: `chat.postMessage` with the bot token, the Markdown rendered to mrkdwn. A 429 is
//! retried after its `Retry-After`, 5xx and network failures with backoff; Slack's
//! `ok: false` errors (`channel_not_found`, `not_in_channel`, `invalid_auth`, …) are
//! permanent and reported in the portal.
//!
//! Answers: 200 `{"status": "accepted" | "duplicate" | "ignored"}` (or the challenge);
//! 401 for a missing, wrong or stale signature; 400 with the reason for a body that is
//! not an Events API request; 404 for an unknown account; 413 for a body over
//! [`MAX_BODY`], refused before it is read.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::OnceCell;
use url::Url;

use super::http::{self, refuse, status};
use super::{
    Addressing, BridgeState, Capabilities, Channel, Inbound, InboundMessage, OutboundMessage,
    Received, RemoteChat, RemoteUser, SendError, TextFormat,
};
use crate::config::{ChannelId, Config, SlackAccountConfig};
use crate::render::mrkdwn;

/// The largest request body accepted.
pub const MAX_BODY: usize = http::MAX_BODY;
/// How far a request's timestamp may be from our clock.
pub const WINDOW: Duration = http::WINDOW;
pub const TIMESTAMP_HEADER: &str = "x-slack-request-timestamp";
pub const SIGNATURE_HEADER: &str = "x-slack-signature";
pub const RETRY_NUM_HEADER: &str = "x-slack-retry-num";
/// How long one `chat.postMessage` may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a name lookup may hold up the acknowledgement Slack wants within 3 s.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);
/// Slack cuts `text` longer than this.
const MAX_TEXT: usize = 40_000;

/// The platform name: `bridges.slack`, and the channel bindings match on.
pub fn platform() -> ChannelId {
    ChannelId::new("slack")
}

/// `v0=<hex>` of HMAC-SHA256(`secret`, `v0:timestamp:body`).
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    format!(
        "v0={}",
        http::hmac_hex(secret, &[b"v0:", timestamp.as_bytes(), b":", body])
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
        missing_timestamp: "missing X-Slack-Request-Timestamp",
        missing_signature: "missing X-Slack-Signature",
        not_seconds: "X-Slack-Request-Timestamp is not unix seconds",
        stale: "X-Slack-Request-Timestamp is more than five minutes off",
        wrong: "wrong X-Slack-Signature",
    };
    http::verify_signed(timestamp, signature, now, &ERRORS, |timestamp| {
        sign(secret, timestamp, body)
    })
}

fn now_secs() -> u64 {
    crate::unix_ms() / 1000
}

/// An Events API request, by its `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Envelope {
    /// The check Slack makes of a new request URL.
    UrlVerification { challenge: String },
    /// An event of the workspace.
    EventCallback {
        event_id: String,
        event: Box<SlackEvent>,
        /// Who the app is in the workspace: its bot user's ID, when `auth.test` has not
        /// said.
        #[serde(default)]
        authorizations: Vec<Authorization>,
    },
    /// Anything else (`app_rate_limited`, …): acknowledged, nothing to do.
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Authorization {
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub is_bot: bool,
}

/// The fields of an event a message is made of; other events have some of them.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SlackEvent {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub subtype: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub bot_id: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub ts: Option<String>,
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default)]
    pub channel_type: Option<String>,
}

/// Reads an Events API body; `Err` is the reason for the 400.
pub fn parse(body: &[u8]) -> Result<Envelope, String> {
    serde_json::from_slice(body).map_err(|e| format!("the body is not an Events API request: {e}"))
}

/// A person's message, as taken from an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub channel: String,
    pub user: String,
    /// The text as plain text, the app's own mention taken out.
    pub text: String,
    /// `<channel>/<ts>`: the same for the `message` and the `app_mention` of one message.
    pub remote_id: String,
    /// A DM with the app.
    pub direct: bool,
    /// A DM, or a message that mentions the app.
    pub addressed: bool,
}

/// The message `event` carries, when it is a person's message to bridge: not a bot's
/// (the app's own included), not an edit or a deletion, not empty.
pub fn incoming(event: &SlackEvent, bot_user: Option<&str>) -> Option<Incoming> {
    if !matches!(event.kind.as_str(), "message" | "app_mention")
        || event.bot_id.is_some()
        || event.subtype.is_some()
    {
        return None;
    }
    let user = event.user.as_deref()?;
    if Some(user) == bot_user {
        return None;
    }
    let channel = event.channel.as_deref()?;
    let ts = event.ts.as_deref()?;
    let raw = event.text.as_deref().unwrap_or_default();
    let mentioned = bot_user.is_some_and(|bot| raw.contains(&format!("<@{bot}>")));
    let text = plain_text(raw, bot_user);
    if text.is_empty() {
        return None;
    }
    let direct = event.channel_type.as_deref() == Some("im") || channel.starts_with('D');
    Some(Incoming {
        channel: channel.to_owned(),
        user: user.to_owned(),
        text,
        remote_id: format!("{channel}/{ts}"),
        direct,
        addressed: direct || event.kind == "app_mention" || mentioned,
    })
}

/// Slack's message text as plain text ([Formatting text](https://api.slack.com/reference/surfaces/formatting#retrieving-messages)):
/// `<@bot>` taken out, `<@U1>` as `@U1`, `<#C1|general>` as `#general`, `<!here>` as
/// `@here`, `<url|label>` as `label (url)`, and `&amp;`, `&lt;`, `&gt;` decoded.
pub fn plain_text(text: &str, bot_user: Option<&str>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('<') {
        out.push_str(&unescape(&rest[..open]));
        let Some(close) = rest[open..].find('>') else {
            out.push_str(&unescape(&rest[open..]));
            rest = "";
            break;
        };
        let inner = &rest[open + 1..open + close];
        rest = &rest[open + close + 1..];
        let (target, label) = match inner.split_once('|') {
            Some((target, label)) => (target, Some(unescape(label))),
            None => (inner, None),
        };
        if let Some(user) = target.strip_prefix('@') {
            if Some(user) == bot_user {
                rest = rest.strip_prefix(' ').unwrap_or(rest);
                continue;
            }
            out.push('@');
            out.push_str(label.as_deref().unwrap_or(user));
        } else if let Some(channel) = target.strip_prefix('#') {
            out.push('#');
            out.push_str(label.as_deref().unwrap_or(channel));
        } else if let Some(special) = target.strip_prefix('!') {
            match label {
                Some(label) => out.push_str(&label),
                None => {
                    out.push('@');
                    out.push_str(special);
                }
            }
        } else {
            let url = unescape(target);
            match label {
                Some(label) if !url.ends_with(label.as_str()) => {
                    out.push_str(&format!("{label} ({url})"))
                }
                _ => out.push_str(&url),
            }
        }
    }
    out.push_str(&unescape(rest));
    out.trim().to_owned()
}

fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Why a Web API call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ApiError {
    /// A 429, a 5xx, no answer: another attempt may succeed.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// `ok: false` with Slack's error code.
    Refused(String),
    /// Another HTTP status, or a body that is not the Web API's.
    Broken(String),
}

/// Whether Slack's `error` code is worth another attempt ([chat.postMessage errors](https://api.slack.com/methods/chat.postMessage#errors)).
fn is_transient_error(code: &str) -> bool {
    matches!(
        code,
        "ratelimited"
            | "internal_error"
            | "fatal_error"
            | "service_unavailable"
            | "request_timeout"
    )
}

/// Whether Slack's `error` code says the token is not good.
fn is_bad_credentials(code: &str) -> bool {
    matches!(
        code,
        "invalid_auth" | "not_authed" | "account_inactive" | "token_revoked" | "token_expired"
    )
}

/// One Slack app in one workspace.
pub struct SlackChannel {
    account: String,
    bot_token: String,
    signing_secret: Vec<u8>,
    api_url: Url,
    http: reqwest::Client,
    inbound: OnceCell<Inbound>,
    /// The app's bot user, from `auth.test`.
    bot_user: OnceLock<String>,
    /// Display names by user ID, as `users.info` gave them (None: it did not).
    users: Mutex<HashMap<String, Option<String>>>,
    /// Channel names by ID, as `conversations.info` gave them (None: it did not).
    channels: Mutex<HashMap<String, Option<String>>>,
}

impl SlackChannel {
    pub fn new(account: &str, bot_token: String, signing_secret: Vec<u8>, api_url: Url) -> Self {
        Self {
            account: account.to_owned(),
            bot_token,
            signing_secret,
            api_url,
            http: reqwest::Client::builder()
                .timeout(SEND_TIMEOUT)
                .build()
                .expect("an HTTP client builds"),
            inbound: OnceCell::new(),
            bot_user: OnceLock::new(),
            users: Mutex::new(HashMap::new()),
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn method_url(&self, method: &str) -> String {
        format!("{}/{method}", self.api_url.as_str().trim_end_matches('/'))
    }

    /// Calls Web API `method`: a JSON body POSTed, or (`body` None) the `query` read with
    /// GET; the answer when it is `ok`.
    async fn call(
        &self,
        method: &str,
        body: Option<&Value>,
        query: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<Value, ApiError> {
        let mut url = Url::parse(&self.method_url(method))
            .map_err(|e| ApiError::Broken(format!("bridges.slack api_url: {e}")))?;
        let request = match body {
            Some(body) => self
                .http
                .post(url)
                .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
                .body(serde_json::to_vec(body).expect("JSON serialises")),
            None => {
                url.query_pairs_mut().extend_pairs(query);
                self.http.get(url)
            }
        };
        let response = request
            .bearer_auth(&self.bot_token)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| ApiError::Transient {
                reason: format!("cannot reach {method}: {}", crate::net::error_chain(&e)),
                retry_after: None,
            })?;
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            // Rate limits: "a Retry-After HTTP header containing the number of seconds
            // until you can retry" (https://api.slack.com/apis/rate-limits).
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(ApiError::Transient {
                reason: format!("{method}: 429 Too Many Requests"),
                retry_after,
            });
        }
        if status.is_server_error() {
            return Err(ApiError::Transient {
                reason: format!("{method}: {status}"),
                retry_after: None,
            });
        }
        if !status.is_success() {
            return Err(ApiError::Broken(format!("{method} answered {status}")));
        }
        let answer: Value = response
            .json()
            .await
            .map_err(|e| ApiError::Broken(format!("{method} answered no JSON: {e}")))?;
        if answer["ok"] == true {
            Ok(answer)
        } else {
            let code = answer["error"].as_str().unwrap_or("unknown_error");
            Err(ApiError::Refused(code.to_owned()))
        }
    }

    /// The display name of `user` (`users.info`, cached): the profile's display name, else
    /// the real name, else the handle.
    async fn user_name(&self, user: &str) -> Option<String> {
        if let Some(known) = self.users.lock().expect("names lock").get(user) {
            return known.clone();
        }
        let name = match self
            .call("users.info", None, &[("user", user)], LOOKUP_TIMEOUT)
            .await
        {
            Ok(answer) => {
                let u = &answer["user"];
                [
                    &u["profile"]["display_name"],
                    &u["profile"]["real_name"],
                    &u["real_name"],
                    &u["name"],
                ]
                .into_iter()
                .filter_map(|v| v.as_str())
                .find(|v| !v.trim().is_empty())
                .map(str::to_owned)
            }
            // Not cached: asked again next time.
            Err(ApiError::Transient { .. }) => return None,
            Err(e) => {
                tracing::debug!(account = self.account, user, error = ?e, "users.info did not name a Slack user");
                None
            }
        };
        self.users
            .lock()
            .expect("names lock")
            .insert(user.to_owned(), name.clone());
        name
    }

    /// `#name` of `channel` (`conversations.info`, cached; it needs `channels:read`, so
    /// without it portals keep the channel ID).
    async fn channel_name(&self, channel: &str) -> Option<String> {
        if let Some(known) = self.channels.lock().expect("names lock").get(channel) {
            return known.clone();
        }
        let name = match self
            .call(
                "conversations.info",
                None,
                &[("channel", channel)],
                LOOKUP_TIMEOUT,
            )
            .await
        {
            Ok(answer) => answer["channel"]["name"]
                .as_str()
                .filter(|n| !n.is_empty())
                .map(|n| format!("#{n}")),
            Err(ApiError::Transient { .. }) => return None,
            Err(e) => {
                tracing::debug!(account = self.account, channel, error = ?e, "conversations.info did not name a Slack channel");
                None
            }
        };
        self.channels
            .lock()
            .expect("names lock")
            .insert(channel.to_owned(), name.clone());
        name
    }
}

/// The bot token and signing secret of account `id`, from the environment, or what is
/// wrong.
pub fn credentials(id: &str, account: &SlackAccountConfig) -> Result<(String, Vec<u8>), String> {
    let read = |key: &str, env: &str, what: &str| match std::env::var(env) {
        Ok(value) if !value.trim().is_empty() => Ok(value.trim().to_owned()),
        _ => Err(format!(
            "bridges.slack.accounts.{id}.{key} names {env}, which is not set: set it to the \
             app's {what} (api.slack.com/apps)"
        )),
    };
    let token = read(
        "bot_token_env",
        &account.bot_token_env,
        "bot token (xoxb-…)",
    )?;
    let secret = read(
        "signing_secret_env",
        &account.signing_secret_env,
        "signing secret",
    )?;
    Ok((token, secret.into_bytes()))
}

/// Every configured Slack account whose credentials are set; the others are logged.
pub fn channels(config: &Config) -> Vec<Arc<SlackChannel>> {
    let mut channels = Vec::new();
    for (id, account) in &config.bridges.slack.accounts {
        match credentials(id, account) {
            Ok((token, secret)) => channels.push(Arc::new(SlackChannel::new(
                id,
                token,
                secret,
                account.api_url.clone(),
            ))),
            Err(e) => tracing::error!("{e}"),
        }
    }
    channels
}

#[async_trait]
impl Channel for SlackChannel {
    fn platform(&self) -> ChannelId {
        platform()
    }

    fn account(&self) -> &str {
        &self.account
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            text: TextFormat::SlackMrkdwn,
            max_text_len: Some(MAX_TEXT),
            // A channel bound to an agent is that agent's conversation.
            addressing: Addressing::Every,
        }
    }

    /// Takes events from now on, and asks `auth.test` who the app is: the bridge state.
    async fn start(&self, inbound: Inbound) -> Result<(), String> {
        self.inbound
            .set(inbound.clone())
            .map_err(|_| "the Slack account was started twice".to_owned())?;
        // Slack calls us, so events are taken whatever auth.test says; its answer is the
        // account's state.
        match self.check_credentials().await {
            Ok(team) => inbound.report(BridgeState::Connected, Some(team)),
            Err((state, reason)) => inbound.report(state, Some(reason)),
        }
        Ok(())
    }

    async fn stop(&self) {
        // Slack calls us: requests in flight finish with the listener.
    }

    async fn send(&self, message: &OutboundMessage) -> Result<(), SendError> {
        self.post_message(message).await
    }
}

impl SlackChannel {
    /// `auth.test`: whether the token is good, and who the app's bot user is; the
    /// account's state is logged (`connected`, `bad_credentials`, `unreachable`).
    async fn check_credentials(&self) -> Result<String, (BridgeState, String)> {
        match self
            .call("auth.test", Some(&json!({})), &[], SEND_TIMEOUT)
            .await
        {
            Ok(answer) => {
                let user = answer["user_id"].as_str().unwrap_or_default().to_owned();
                let team = answer["team"].as_str().unwrap_or_default();
                tracing::info!(
                    account = self.account,
                    state = "connected",
                    team,
                    bot_user = user.as_str(),
                    "slack account connected"
                );
                let detail = format!("workspace {team} as {user}");
                if !user.is_empty() {
                    let _ = self.bot_user.set(user);
                }
                Ok(detail)
            }
            Err(ApiError::Refused(code)) if is_bad_credentials(&code) => {
                tracing::error!(
                    account = self.account,
                    state = "bad_credentials",
                    error = code,
                    "slack account has bad credentials"
                );
                Err((
                    BridgeState::BadCredentials,
                    format!(
                        "auth.test answered {code}; check the bot token \
                         bridges.slack.accounts.{}.bot_token_env names",
                        self.account
                    ),
                ))
            }
            Err(e) => {
                tracing::warn!(account = self.account, state = "unreachable", error = ?e, "slack account cannot be checked; events are still taken");
                Err((
                    BridgeState::TransientDisconnect,
                    format!("auth.test failed: {e:?}"),
                ))
            }
        }
    }

    /// `chat.postMessage` of `message`, its Markdown as mrkdwn.
    async fn post_message(&self, message: &OutboundMessage) -> Result<(), SendError> {
        let body = json!({
            "channel": message.chat.id,
            "text": mrkdwn::markdown_to_mrkdwn(&message.text),
        });
        match self
            .call("chat.postMessage", Some(&body), &[], SEND_TIMEOUT)
            .await
        {
            Ok(_) => Ok(()),
            Err(ApiError::Transient {
                reason,
                retry_after,
            }) => Err(SendError::Transient {
                reason,
                retry_after,
            }),
            Err(ApiError::Refused(code)) if is_transient_error(&code) => {
                Err(SendError::Transient {
                    reason: format!("chat.postMessage: {code}"),
                    retry_after: None,
                })
            }
            Err(ApiError::Refused(code)) => {
                Err(SendError::Permanent(format!("chat.postMessage: {code}")))
            }
            Err(ApiError::Broken(reason)) => Err(SendError::Permanent(reason)),
        }
    }
}

/// The routes' state: the accounts by ID.
#[derive(Clone)]
struct Routes {
    accounts: Arc<BTreeMap<String, Arc<SlackChannel>>>,
}

/// `POST /bridges/slack/{account}` for `channels`, to merge beside the other bridges'
/// routes (which hold the fallback).
pub fn routes(channels: &[Arc<SlackChannel>]) -> Router {
    let accounts = channels
        .iter()
        .map(|c| (c.account.clone(), c.clone()))
        .collect();
    Router::new()
        .route("/bridges/slack/{account}", post(receive))
        .with_state(Routes {
            accounts: Arc::new(accounts),
        })
        .layer(axum::middleware::map_response(crate::net::error_body))
}

async fn receive(
    State(routes): State<Routes>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(channel) = routes.accounts.get(&account) else {
        return refuse(StatusCode::NOT_FOUND, "no such slack account");
    };
    if http::declared_too_large(&headers) {
        return http::too_large();
    }
    let Some(body) = http::read(body).await else {
        return http::too_large();
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Err(reason) = verify(
        &channel.signing_secret,
        header(TIMESTAMP_HEADER),
        header(SIGNATURE_HEADER),
        &body,
        now_secs(),
    ) {
        tracing::info!(account, reason, "slack request refused");
        return refuse(StatusCode::UNAUTHORIZED, reason);
    }
    let (event_id, event, authorizations) = match parse(&body) {
        Ok(Envelope::UrlVerification { challenge }) => {
            tracing::info!(account, "slack request URL verified");
            return (
                StatusCode::OK,
                axum::Json(json!({ "challenge": challenge })),
            )
                .into_response();
        }
        Ok(Envelope::EventCallback {
            event_id,
            event,
            authorizations,
        }) => (event_id, event, authorizations),
        Ok(Envelope::Other) => return status("ignored"),
        Err(reason) => return refuse(StatusCode::BAD_REQUEST, reason),
    };
    let bot_user = channel.bot_user.get().cloned().or_else(|| {
        authorizations
            .iter()
            .find(|a| a.is_bot)
            .and_then(|a| a.user_id.clone())
    });
    let Some(message) = incoming(&event, bot_user.as_deref()) else {
        return status("ignored");
    };
    let Some(inbound) = channel.inbound.get() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the bridge is starting; try again",
        );
    };
    let retry = header(RETRY_NUM_HEADER);
    tracing::debug!(account, event_id, retry, "slack event");
    let (user_name, channel_name) = if message.direct {
        (channel.user_name(&message.user).await, None)
    } else {
        tokio::join!(
            channel.user_name(&message.user),
            channel.channel_name(&message.channel)
        )
    };
    let chat_name = if message.direct {
        user_name.clone()
    } else {
        channel_name
    };
    let received = inbound
        .receive(InboundMessage {
            account: account.clone(),
            chat: RemoteChat {
                id: message.channel,
                name: chat_name,
            },
            sender: RemoteUser {
                id: message.user,
                name: user_name,
            },
            text: message.text,
            remote_id: message.remote_id,
            addressed: message.addressed,
        })
        .await;
    match received {
        Ok(Received::Accepted) => status("accepted"),
        Ok(Received::Duplicate) => status("duplicate"),
        Err(e) => {
            tracing::error!(account, event_id, error = %e, "cannot record a slack message");
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
    use tower::ServiceExt;

    const SECRET: &[u8] = b"8f742231b10e8888abcd99yyyzzz85a5";

    #[test]
    fn the_signature_is_slacks_documented_example() {
        // "Verifying requests from Slack", the worked example:
        // https://api.slack.com/authentication/verifying-requests-from-slack
        let body = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        assert_eq!(
            sign(SECRET, "1531420618", body.as_bytes()),
            "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
        );
    }

    #[test]
    fn a_signature_verifies_only_with_its_secret_body_and_time() {
        let body = br#"{"type":"url_verification"}"#;
        let signature = sign(SECRET, "1700000000", body);
        let sig = Some(signature.as_str());
        let ts = Some("1700000000");
        assert_eq!(verify(SECRET, ts, sig, body, 1_700_000_000), Ok(()));
        assert_eq!(verify(SECRET, ts, sig, body, 1_700_000_300), Ok(()));
        assert_eq!(
            verify(SECRET, ts, sig, body, 1_700_000_301),
            Err("X-Slack-Request-Timestamp is more than five minutes off")
        );
        assert!(verify(SECRET, ts, sig, body, 1_699_999_000).is_err());
        assert_eq!(
            verify(b"other", ts, sig, body, 1_700_000_000),
            Err("wrong X-Slack-Signature")
        );
        assert_eq!(
            verify(SECRET, Some("1700000001"), sig, body, 1_700_000_000),
            Err("wrong X-Slack-Signature"),
            "the timestamp is signed too"
        );
        assert_eq!(
            verify(SECRET, ts, sig, b"{}", 1_700_000_000),
            Err("wrong X-Slack-Signature")
        );
        assert!(verify(SECRET, None, sig, body, 1_700_000_000).is_err());
        assert!(verify(SECRET, ts, None, body, 1_700_000_000).is_err());
        assert!(verify(SECRET, Some("later"), sig, body, 1_700_000_000).is_err());
    }

    fn event(value: Value) -> SlackEvent {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn an_events_api_body_is_read_by_its_type() {
        let Envelope::UrlVerification { challenge } =
            parse(br#"{"token":"t","challenge":"3eZbrw1a","type":"url_verification"}"#).unwrap()
        else {
            panic!("not a url_verification");
        };
        assert_eq!(challenge, "3eZbrw1a");
        let body = br#"{"type":"event_callback","event_id":"Ev1","team_id":"T1",
            "authorizations":[{"user_id":"UBOT","is_bot":true}],
            "event":{"type":"app_mention","user":"U1","text":"<@UBOT> hi","ts":"1.2","channel":"C1"}}"#;
        let Envelope::EventCallback {
            event_id,
            event,
            authorizations,
        } = parse(body).unwrap()
        else {
            panic!("not an event_callback");
        };
        assert_eq!(event_id, "Ev1");
        assert_eq!(event.kind, "app_mention");
        assert_eq!(authorizations[0].user_id.as_deref(), Some("UBOT"));
        assert!(matches!(
            parse(br#"{"type":"app_rate_limited"}"#).unwrap(),
            Envelope::Other
        ));
        let missing = parse(br#"{"type":"event_callback","event_id":"Ev1"}"#).unwrap_err();
        assert!(missing.contains("event"), "{missing}");
        assert!(parse(b"not json").is_err());
        assert!(parse(br#"{"challenge":"x"}"#).unwrap_err().contains("type"));
    }

    #[test]
    fn a_mention_and_its_message_are_one_addressed_message() {
        let text = "<@UBOT> what is *up*?";
        let mention = event(json!({"type": "app_mention", "user": "U1", "text": text,
            "ts": "1700000000.000100", "channel": "C1"}));
        let message = event(json!({"type": "message", "user": "U1", "text": text,
            "ts": "1700000000.000100", "channel": "C1", "channel_type": "channel"}));
        let a = incoming(&mention, Some("UBOT")).unwrap();
        let b = incoming(&message, Some("UBOT")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.remote_id, "C1/1700000000.000100");
        assert_eq!(a.text, "what is *up*?");
        assert!(a.addressed && !a.direct);
        let plain = event(
            json!({"type": "message", "user": "U1", "text": "just chatting",
            "ts": "2.0", "channel": "C1", "channel_type": "channel"}),
        );
        assert!(!incoming(&plain, Some("UBOT")).unwrap().addressed);
    }

    #[test]
    fn a_dm_is_addressed_and_bots_edits_and_other_events_are_not_bridged() {
        let dm = event(json!({"type": "message", "user": "U1", "text": "hello",
            "ts": "1.0", "channel": "D024BE91L", "channel_type": "im"}));
        let dm = incoming(&dm, Some("UBOT")).unwrap();
        assert!(dm.direct && dm.addressed);
        for ignored in [
            json!({"type": "message", "bot_id": "B1", "user": "U2", "text": "a bot",
                "ts": "1.0", "channel": "C1"}),
            json!({"type": "message", "subtype": "bot_message", "text": "old bot",
                "ts": "1.0", "channel": "C1"}),
            json!({"type": "message", "user": "UBOT", "text": "ourselves", "ts": "1.0",
                "channel": "C1"}),
            json!({"type": "message", "subtype": "message_changed", "ts": "1.0",
                "channel": "C1"}),
            json!({"type": "reaction_added", "user": "U1", "reaction": "+1"}),
            json!({"type": "app_mention", "user": "U1", "text": "<@UBOT>", "ts": "1.0",
                "channel": "C1"}),
        ] {
            assert_eq!(
                incoming(&event(ignored.clone()), Some("UBOT")),
                None,
                "{ignored}"
            );
        }
    }

    #[test]
    fn slack_markup_is_read_as_plain_text() {
        let bot = Some("UBOT");
        assert_eq!(
            plain_text("<@UBOT> hi <@U2> and <@U3|sam>", bot),
            "hi @U2 and @sam"
        );
        assert_eq!(
            plain_text("see <#C1|general> <!here>", bot),
            "see #general @here"
        );
        assert_eq!(
            plain_text(
                "<https://a.org/x?a=1&amp;b=2|the page> <https://b.org>",
                bot
            ),
            "the page (https://a.org/x?a=1&b=2) https://b.org"
        );
        assert_eq!(
            plain_text("<mailto:a@b.org|a@b.org>", bot),
            "mailto:a@b.org"
        );
        assert_eq!(
            plain_text("1 &lt; 2 &amp;&amp; 3 &gt; 2", bot),
            "1 < 2 && 3 > 2"
        );
        assert_eq!(plain_text("unclosed < bracket", bot), "unclosed < bracket");
        assert_eq!(plain_text("<@UBOT>", bot), "");
    }

    fn channel(api: &str) -> Arc<SlackChannel> {
        Arc::new(SlackChannel::new(
            "team",
            "xoxb-test".into(),
            SECRET.to_vec(),
            Url::parse(api).unwrap(),
        ))
    }

    async fn request(
        account: &str,
        body: &[u8],
        signature: Option<String>,
        length: Option<usize>,
    ) -> (StatusCode, Value) {
        let app = routes(&[channel("http://127.0.0.1:9/api")]);
        let ts = now_secs().to_string();
        let signature = signature.unwrap_or_else(|| sign(SECRET, &ts, body));
        let mut request = axum::http::Request::post(format!("/bridges/slack/{account}"))
            .header("content-type", "application/json")
            .header(TIMESTAMP_HEADER, &ts)
            .header(SIGNATURE_HEADER, signature);
        if let Some(length) = length {
            request = request.header("content-length", length);
        }
        let response = app
            .oneshot(request.body(Body::from(body.to_vec())).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn url_verification_answers_the_challenge() {
        let body = br#"{"token":"t","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#;
        let (status, answer) = request("team", body, None, None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            answer["challenge"],
            "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
        );
    }

    #[tokio::test]
    async fn bad_requests_get_the_status_they_deserve() {
        let body = br#"{"token":"t","challenge":"c","type":"url_verification"}"#;
        let (status, answer) = request("nobody", body, None, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
        assert_eq!(answer["error"], "no such slack account");

        let forged = sign(SECRET, &now_secs().to_string(), b"{}");
        let (status, answer) = request("team", body, Some(forged), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer["error"], "wrong X-Slack-Signature");

        let stale = (now_secs() - 301).to_string();
        let app = routes(&[channel("http://127.0.0.1:9/api")]);
        let response = app
            .oneshot(
                axum::http::Request::post("/bridges/slack/team")
                    .header(TIMESTAMP_HEADER, &stale)
                    .header(SIGNATURE_HEADER, sign(SECRET, &stale, body))
                    .body(Body::from(body.to_vec()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "a replay");

        let (status, answer) = request("team", br#"{"type":"event_callback"}"#, None, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            answer["error"].as_str().unwrap().contains("event_id"),
            "{answer}"
        );

        let (status, answer) = request("team", b"{}", None, Some(MAX_BODY + 1)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
        let big = vec![b' '; MAX_BODY + 1];
        let (status, _) = request("team", &big, None, None).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn events_not_to_bridge_are_acknowledged_without_the_core() {
        // No core is attached: an event that needs it would answer 503.
        let body = br#"{"type":"event_callback","event_id":"Ev2","event":{"type":"message",
            "bot_id":"B1","text":"from a bot","ts":"1.0","channel":"C1"}}"#;
        let (status, answer) = request("team", body, None, None).await;
        assert_eq!(
            (status, &answer["status"]),
            (StatusCode::OK, &json!("ignored"))
        );
        let person = br#"{"type":"event_callback","event_id":"Ev3","event":{"type":"message",
            "user":"U1","text":"hi","ts":"1.0","channel":"C1"}}"#;
        let (status, _) = request("team", person, None, None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }

    /// A Web API stand-in answering every method with `status` and `body`.
    async fn api(
        status: u16,
        headers: &'static [(&'static str, &'static str)],
        body: Value,
    ) -> String {
        let app = axum::Router::new().fallback(move || {
            let body = body.clone();
            async move {
                let mut response =
                    (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response();
                for (name, value) in headers {
                    response.headers_mut().insert(*name, value.parse().unwrap());
                }
                response
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/api", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    fn outbound() -> OutboundMessage {
        OutboundMessage {
            id: "$e".into(),
            chat: RemoteChat {
                id: "C1".into(),
                name: None,
            },
            sender: RemoteUser {
                id: "damon".into(),
                name: None,
            },
            text: "**hi**".into(),
            relayed: false,
        }
    }

    #[tokio::test]
    async fn auth_test_tells_connected_from_bad_credentials() {
        let good = channel(
            &api(
                200,
                &[],
                json!({"ok": true, "team": "Acme", "user_id": "U0BOT", "bot_id": "B1"}),
            )
            .await,
        );
        assert_eq!(
            good.check_credentials().await,
            Ok("workspace Acme as U0BOT".to_owned())
        );
        assert_eq!(good.bot_user.get().map(String::as_str), Some("U0BOT"));
        let revoked = channel(&api(200, &[], json!({"ok": false, "error": "invalid_auth"})).await);
        let (state, err) = revoked.check_credentials().await.unwrap_err();
        assert_eq!(state, BridgeState::BadCredentials);
        assert!(err.starts_with("auth.test answered invalid_auth"), "{err}");
        assert!(
            err.contains("bridges.slack.accounts.team.bot_token_env"),
            "{err}"
        );
        assert_eq!(revoked.bot_user.get(), None);
        let gone = channel("http://127.0.0.1:9/api");
        let (state, err) = gone.check_credentials().await.unwrap_err();
        assert_eq!(state, BridgeState::TransientDisconnect);
        assert!(err.starts_with("auth.test failed"), "{err}");
    }

    #[tokio::test]
    async fn send_failures_say_whether_to_try_again() {
        let limited = channel(
            &api(
                429,
                &[("retry-after", "7")],
                json!({"ok": false, "error": "ratelimited"}),
            )
            .await,
        );
        match limited.send(&outbound()).await {
            Err(SendError::Transient { retry_after, .. }) => {
                assert_eq!(retry_after, Some(Duration::from_secs(7)))
            }
            other => panic!("{other:?}"),
        }
        let down = channel(&api(503, &[], json!({})).await);
        assert!(matches!(
            down.send(&outbound()).await,
            Err(SendError::Transient {
                retry_after: None,
                ..
            })
        ));
        let gone = channel("http://127.0.0.1:9/api");
        assert!(matches!(
            gone.send(&outbound()).await,
            Err(SendError::Transient { .. })
        ));
        for code in ["channel_not_found", "not_in_channel", "invalid_auth"] {
            let refused = channel(&api(200, &[], json!({"ok": false, "error": code})).await);
            match refused.send(&outbound()).await {
                Err(SendError::Permanent(reason)) => assert!(reason.contains(code), "{reason}"),
                other => panic!("{code}: {other:?}"),
            }
        }
        let fine = channel(&api(200, &[], json!({"ok": true, "ts": "1.0"})).await);
        assert!(fine.send(&outbound()).await.is_ok());
    }
}
