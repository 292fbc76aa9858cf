//! Telegram bots, over the [Bot API](https://core.telegram.org/bots/api).
//!
//! In: each account's updates arrive either as Telegram's POSTs to
//! `/bridges/telegram/{account}` (`mode: webhook`, the default; the operator registers the
//! URL with `setWebhook` and a `secret_token`, which every request carries in
//! `X-Telegram-Bot-Api-Secret-Token`), or by long polling `getUpdates` (`mode: polling`).
//! A `message` update with text becomes an [`InboundMessage`] whose ID is the update's
//! `update_id`, so a redelivered update is recognised.
//!
//! Who is addressed: a private chat always addresses the bot. In a group, a message does
//! when it mentions the bot (`@botname`, whose username `getMe` told at start), replies
//! to one of the bot's messages, or is a `/command` (not one for another bot). The
//! `@botname` is taken out of the text. The account's agent answers every private chat
//! and, in groups, only the messages addressing it; the others are posted to the portal
//! all the same, for the people there to read.
//!
//! Out: `sendMessage` with `parse_mode: HTML`, the Markdown rendered to Telegram's HTML
//! subset and split to fit its 4096 characters. A 429 is retried after its
//! `parameters.retry_after`, a 5xx or a network failure after the usual backoff; any
//! other refusal is final, with Telegram's `description`. Streaming answers go out once
//! final (edits while they stream are not sent to Telegram yet).
//!
//! The webhook answers: 200 `{"status": "accepted" | "duplicate" | "ignored"}` once the
//! update is recorded (or is not a text message); 401 for a missing or wrong secret token;
//! 400 with the reason for a body that is not an `Update`; 404 for an unknown account (or
//! one that polls); 413 for a body over [`MAX_BODY`], refused before it is read; 503 while
//! the bot has not connected yet, so that Telegram delivers it again later.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::http::{self, refuse, status};
use super::{
    Addressing, BridgeState, Capabilities, Channel, Inbound, InboundMessage, OutboundMessage,
    Received, RemoteChat, RemoteUser, SendError, TextFormat,
};
use crate::config::{ChannelId, Config, TelegramMode};
use crate::render;

/// The largest webhook body accepted.
pub const MAX_BODY: usize = http::MAX_BODY;
/// The header Telegram sends the webhook's `secret_token` in.
pub const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";
/// The longest text of one message (`sendMessage`: "1-4096 characters after entities
/// parsing").
pub const MAX_TEXT: usize = 4096;
/// How long one `getUpdates` waits for updates.
const POLL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long any other call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the first `getMe` may hold up the start.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait between two attempts at reaching Telegram.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The platform name: `bridges.telegram`, and the channel bindings match on.
pub fn platform() -> ChannelId {
    ChannelId::new("telegram")
}

/// An [`Update`](https://core.telegram.org/bots/api#update); only `message` is bridged.
#[derive(Debug, Clone, Deserialize)]
pub struct Update {
    pub update_id: i64,
    #[serde(default)]
    pub message: Option<Message>,
}

/// A [`Message`](https://core.telegram.org/bots/api#message), the fields bridged.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub message_id: i64,
    #[serde(default)]
    pub from: Option<User>,
    pub chat: Chat,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub entities: Vec<MessageEntity>,
    #[serde(default)]
    pub caption: Option<String>,
    #[serde(default)]
    pub caption_entities: Vec<MessageEntity>,
    #[serde(default)]
    pub reply_to_message: Option<Box<Message>>,
}

/// A [`User`](https://core.telegram.org/bots/api#user).
#[derive(Debug, Clone, Deserialize)]
pub struct User {
    pub id: i64,
    #[serde(default)]
    pub is_bot: bool,
    #[serde(default)]
    pub first_name: String,
    #[serde(default)]
    pub last_name: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
}

/// A [`Chat`](https://core.telegram.org/bots/api#chat).
#[derive(Debug, Clone, Deserialize)]
pub struct Chat {
    pub id: i64,
    /// `private`, `group`, `supergroup` or `channel`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub first_name: Option<String>,
    #[serde(default)]
    pub last_name: Option<String>,
}

/// A [`MessageEntity`](https://core.telegram.org/bots/api#messageentity); `offset` and
/// `length` count UTF-16 code units.
#[derive(Debug, Clone, Deserialize)]
pub struct MessageEntity {
    #[serde(rename = "type")]
    pub kind: String,
    pub offset: usize,
    pub length: usize,
    #[serde(default)]
    pub user: Option<User>,
}

/// Who the bot is, as `getMe` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BotIdentity {
    pub id: i64,
    pub username: String,
}

/// `first last`, or the username, or nothing.
fn full_name(first: Option<&str>, last: Option<&str>, username: Option<&str>) -> Option<String> {
    let name = [first, last]
        .into_iter()
        .flatten()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if name.is_empty() {
        username.map(str::to_owned)
    } else {
        Some(name)
    }
}

/// The bytes of `text` an entity's UTF-16 `offset`/`length` cover.
fn utf16_range(text: &str, offset: usize, length: usize) -> Option<Range<usize>> {
    let (mut units, mut start) = (0usize, None);
    for (at, c) in text.char_indices() {
        if units == offset {
            start = Some(at);
        }
        if units == offset + length {
            return Some(start?..at);
        }
        units += c.len_utf16();
    }
    if units == offset {
        start = Some(text.len());
    }
    (units == offset + length).then_some(start?..text.len())
}

/// `text` without `cuts` (sorted, disjoint), the space a cut leaves doubled taken out.
fn cut(text: &str, cuts: &[Range<usize>]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for range in cuts {
        out.push_str(&text[at..range.start]);
        at = range.end;
        if out.ends_with(char::is_whitespace) || out.is_empty() {
            let rest = &text[at..];
            at += rest.len() - rest.trim_start_matches([' ', '\t']).len();
        }
    }
    out.push_str(&text[at..]);
    out.trim().to_owned()
}

/// What `update` is for the core: a text message, with whether it addresses the bot
/// `me` and its `@botname` mentions taken out; `None` for anything else.
pub fn parse_update(account: &str, update: &Update, me: &BotIdentity) -> Option<InboundMessage> {
    let message = update.message.as_ref()?;
    let (text, entities) = match (&message.text, &message.caption) {
        (Some(text), _) => (text, &message.entities),
        (None, Some(caption)) => (caption, &message.caption_entities),
        (None, None) => return None,
    };
    let mut addressed = message.chat.kind == "private";
    let mut cuts = Vec::new();
    for entity in entities {
        let Some(range) = utf16_range(text, entity.offset, entity.length) else {
            continue;
        };
        let said = &text[range.clone()];
        match entity.kind.as_str() {
            "mention"
                if said
                    .strip_prefix('@')
                    .is_some_and(|name| name.eq_ignore_ascii_case(&me.username)) =>
            {
                addressed = true;
                cuts.push(range);
            }
            "text_mention" if entity.user.as_ref().is_some_and(|u| u.id == me.id) => {
                addressed = true;
            }
            "bot_command" => match said.split_once('@') {
                Some((_, bot)) if bot.eq_ignore_ascii_case(&me.username) => {
                    addressed = true;
                    cuts.push(range.start + said.len() - bot.len() - 1..range.end);
                }
                Some(_) => {} // another bot's
                None => addressed = true,
            },
            _ => {}
        }
    }
    if message
        .reply_to_message
        .as_ref()
        .and_then(|r| r.from.as_ref())
        .is_some_and(|u| u.id == me.id)
    {
        addressed = true;
    }
    cuts.sort_by_key(|r| r.start);
    let mut body = cut(text, &cuts);
    if body.is_empty() {
        body = text.trim().to_owned();
    }
    if body.is_empty() {
        return None;
    }
    let chat = &message.chat;
    let chat_name = if chat.kind == "private" {
        full_name(
            chat.first_name.as_deref(),
            chat.last_name.as_deref(),
            chat.username.as_deref(),
        )
    } else {
        chat.title.clone()
    };
    let sender = match &message.from {
        Some(user) => RemoteUser {
            id: user.id.to_string(),
            name: full_name(
                Some(&user.first_name),
                user.last_name.as_deref(),
                user.username.as_deref(),
            ),
        },
        // A channel's post, or an anonymous group admin: the chat speaks.
        None => RemoteUser {
            id: chat.id.to_string(),
            name: chat_name.clone(),
        },
    };
    Some(InboundMessage {
        account: account.to_owned(),
        chat: RemoteChat {
            id: chat.id.to_string(),
            name: chat_name,
        },
        sender,
        text: body,
        remote_id: update.update_id.to_string(),
        addressed,
    })
}

/// Why a Bot API call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// No answer (connection, timeout, unreadable body).
    Network(String),
    /// Telegram answered `ok: false` ([Making requests](https://core.telegram.org/bots/api#making-requests)).
    Refused {
        status: u16,
        description: String,
        /// [`ResponseParameters`](https://core.telegram.org/bots/api#responseparameters)'
        /// `retry_after`, for a flood limit.
        retry_after: Option<Duration>,
    },
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiError::Network(e) => write!(f, "cannot reach the Bot API: {e}"),
            ApiError::Refused {
                status,
                description,
                ..
            } => write!(f, "the Bot API answered {status}: {description}"),
        }
    }
}

impl ApiError {
    fn is_unauthorized(&self) -> bool {
        matches!(self, ApiError::Refused { status: 401, .. })
    }
}

impl From<ApiError> for SendError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Network(_) => SendError::Transient {
                reason: e.to_string(),
                retry_after: None,
            },
            ApiError::Refused {
                status,
                retry_after,
                ..
            } if status == 429 || status >= 500 => SendError::Transient {
                reason: e.to_string(),
                retry_after,
            },
            ApiError::Refused { description, .. } => {
                SendError::Permanent(format!("Telegram refused it: {description}"))
            }
        }
    }
}

/// The answer of a call, read the way "Making requests" describes it: `ok`, then
/// `result`, or `description`, `error_code` and `parameters`.
fn read_answer(status: u16, body: &[u8]) -> Result<Value, ApiError> {
    #[derive(Deserialize)]
    struct Parameters {
        retry_after: Option<u64>,
    }
    #[derive(Deserialize)]
    struct Answer {
        ok: bool,
        #[serde(default)]
        result: Value,
        #[serde(default)]
        description: Option<String>,
        #[serde(default)]
        error_code: Option<u16>,
        #[serde(default)]
        parameters: Option<Parameters>,
    }
    let answer: Answer = match serde_json::from_slice(body) {
        Ok(answer) => answer,
        Err(_) if !(200..300).contains(&status) => {
            return Err(ApiError::Refused {
                status,
                description: format!("HTTP {status}"),
                retry_after: None,
            });
        }
        Err(e) => return Err(ApiError::Network(format!("unreadable answer: {e}"))),
    };
    if answer.ok && (200..300).contains(&status) {
        return Ok(answer.result);
    }
    Err(ApiError::Refused {
        status: answer.error_code.filter(|_| status < 400).unwrap_or(status),
        description: answer
            .description
            .unwrap_or_else(|| format!("HTTP {status}")),
        retry_after: answer
            .parameters
            .and_then(|p| p.retry_after)
            .map(Duration::from_secs),
    })
}

/// One bot's connection to the Bot API.
struct Bot {
    account: String,
    token: String,
    api_url: Url,
    http: reqwest::Client,
    me: OnceLock<BotIdentity>,
}

impl Bot {
    /// `POST <api_url>/bot<token>/<method>` with a JSON body.
    async fn call(&self, method: &str, body: &Value, timeout: Duration) -> Result<Value, ApiError> {
        let base = self.api_url.as_str().trim_end_matches('/');
        let url = format!("{base}/bot{}/{method}", self.token);
        let response = self
            .http
            .post(url)
            .timeout(timeout)
            .json(body)
            .send()
            .await
            // The URL holds the token: never in a message.
            .map_err(|e| ApiError::Network(e.without_url().to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .bytes()
            .await
            .map_err(|e| ApiError::Network(e.without_url().to_string()))?;
        read_answer(status, &body)
    }

    /// `getMe`: who the bot is.
    async fn get_me(&self, timeout: Duration) -> Result<BotIdentity, ApiError> {
        let me = self.call("getMe", &json!({}), timeout).await?;
        match (me["id"].as_i64(), me["username"].as_str()) {
            (Some(id), Some(username)) => Ok(BotIdentity {
                id,
                username: username.to_owned(),
            }),
            _ => Err(ApiError::Network(
                "getMe answered without the bot's id and username".into(),
            )),
        }
    }

    fn connected(&self, me: BotIdentity) {
        tracing::info!(
            account = self.account,
            username = me.username,
            "telegram bot connected"
        );
        let _ = self.me.set(me);
    }

    /// `getMe` until it answers (or says the token is wrong, or shutdown).
    async fn connect(&self, inbound: &Inbound, shutdown: &CancellationToken) -> bool {
        let mut backoff = Duration::from_secs(1);
        loop {
            if self.me.get().is_some() {
                return true;
            }
            match self.get_me(CALL_TIMEOUT).await {
                Ok(me) => {
                    inbound.report(BridgeState::Connected, Some(format!("as @{}", me.username)));
                    self.connected(me);
                }
                Err(e) if e.is_unauthorized() => {
                    tracing::error!(account = self.account, error = %e, "telegram bot has bad credentials: check its token");
                    inbound.report(
                        BridgeState::BadCredentials,
                        Some(format!("getMe refused the token: {e}")),
                    );
                    return false;
                }
                Err(e) => {
                    tracing::warn!(account = self.account, error = %e, wait_s = backoff.as_secs(), "telegram bot cannot connect yet; trying again");
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Long polling: `getUpdates` from the last update handed to the core, on to the
    /// next only once the core has recorded it.
    async fn poll(&self, inbound: &Inbound, shutdown: &CancellationToken) {
        let Some(me) = self.me.get() else { return };
        let mut offset: Option<i64> = None;
        let mut backoff = Duration::from_secs(1);
        loop {
            let mut request = json!({
                "timeout": POLL_TIMEOUT.as_secs(),
                "allowed_updates": ["message"],
            });
            if let Some(offset) = offset {
                request["offset"] = json!(offset);
            }
            let answer = tokio::select! {
                _ = shutdown.cancelled() => return,
                answer = self.call("getUpdates", &request, POLL_TIMEOUT + CALL_TIMEOUT) => answer,
            };
            let failure = match answer {
                Ok(Value::Array(updates)) => {
                    let mut failure = None;
                    for raw in updates {
                        let Some(update_id) = raw["update_id"].as_i64() else {
                            continue;
                        };
                        match serde_json::from_value::<Update>(raw) {
                            Ok(update) => {
                                if let Some(message) = parse_update(&self.account, &update, me)
                                    && let Err(e) = inbound.receive(message).await
                                {
                                    failure = Some(format!("cannot record an update: {e}"));
                                    break;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(account = self.account, update_id, error = %e, "an unreadable telegram update is skipped")
                            }
                        }
                        offset = Some(update_id + 1);
                    }
                    failure
                }
                Ok(other) => Some(format!("getUpdates answered {other} instead of a list")),
                Err(e) if e.is_unauthorized() => {
                    tracing::error!(account = self.account, error = %e, "telegram bot has bad credentials: check its token");
                    inbound.report(
                        BridgeState::BadCredentials,
                        Some(format!("getUpdates refused the token: {e}")),
                    );
                    return;
                }
                Err(e) => Some(e.to_string()),
            };
            match failure {
                None => backoff = Duration::from_secs(1),
                Some(reason) => {
                    tracing::warn!(
                        account = self.account,
                        reason,
                        wait_s = backoff.as_secs(),
                        "telegram polling failed; trying again"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// `sendMessage` of one part: as HTML, or, if Telegram cannot parse what the
    /// renderer made of it, as the plain text.
    async fn send_part(&self, chat_id: &Value, markdown: &str) -> Result<(), ApiError> {
        let html = render::telegram::markdown_to_html(markdown);
        let request = json!({ "chat_id": chat_id, "text": html, "parse_mode": "HTML" });
        match self.call("sendMessage", &request, CALL_TIMEOUT).await {
            Err(ApiError::Refused {
                status: 400,
                description,
                ..
            }) if description.contains("can't parse entities") => {
                tracing::warn!(
                    account = self.account,
                    description,
                    "telegram refused the HTML; sending plain text"
                );
                let request = json!({ "chat_id": chat_id, "text": markdown });
                self.call("sendMessage", &request, CALL_TIMEOUT)
                    .await
                    .map(drop)
            }
            other => other.map(drop),
        }
    }
}

/// One Telegram bot account.
pub struct TelegramChannel {
    bot: Arc<Bot>,
    mode: TelegramMode,
    secret_token: Option<Vec<u8>>,
    inbound: OnceLock<Inbound>,
    /// How many parts of a split message went out, so a retry sends only the rest.
    progress: Mutex<HashMap<String, usize>>,
    shutdown: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl TelegramChannel {
    pub fn new(
        account: &str,
        token: String,
        secret_token: Option<Vec<u8>>,
        mode: TelegramMode,
        api_url: Url,
    ) -> Self {
        Self {
            bot: Arc::new(Bot {
                account: account.to_owned(),
                token,
                api_url,
                http: reqwest::Client::builder()
                    .build()
                    .expect("an HTTP client builds"),
                me: OnceLock::new(),
            }),
            mode,
            secret_token,
            inbound: OnceLock::new(),
            progress: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            task: Mutex::new(None),
        }
    }
}

/// The token and secret token of account `id`, from the environment, or what is wrong.
pub fn credentials(
    id: &str,
    account: &crate::config::TelegramAccountConfig,
) -> Result<(String, Option<Vec<u8>>), String> {
    let token = match std::env::var(&account.token_env) {
        Ok(token) if !token.trim().is_empty() => token.trim().to_owned(),
        _ => {
            return Err(format!(
                "bridges.telegram.accounts.{id}.token_env names {}, which is not set: set it \
                 to the bot token @BotFather gave",
                account.token_env
            ));
        }
    };
    let secret = match &account.secret_token_env {
        None => None,
        Some(env) => match std::env::var(env) {
            Ok(secret) if !secret.is_empty() => Some(secret.into_bytes()),
            _ => {
                return Err(format!(
                    "bridges.telegram.accounts.{id}.secret_token_env names {env}, which is not \
                     set: set it to the secret_token given to setWebhook"
                ));
            }
        },
    };
    Ok((token, secret))
}

/// Every configured Telegram account whose credentials are set; the others are logged.
pub fn channels(config: &Config) -> Vec<Arc<TelegramChannel>> {
    let mut channels = Vec::new();
    for (id, account) in &config.bridges.telegram.accounts {
        match credentials(id, account) {
            Ok((token, secret)) => channels.push(Arc::new(TelegramChannel::new(
                id,
                token,
                secret,
                account.mode,
                account.api_url.clone(),
            ))),
            Err(e) => tracing::error!("{e}"),
        }
    }
    channels
}

#[async_trait]
impl Channel for TelegramChannel {
    fn platform(&self) -> ChannelId {
        platform()
    }

    fn account(&self) -> &str {
        &self.bot.account
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            text: TextFormat::Html,
            max_text_len: Some(MAX_TEXT),
            addressing: Addressing::Addressed,
        }
    }

    async fn start(&self, inbound: Inbound) -> Result<(), String> {
        let bot = &self.bot;
        tracing::info!(account = bot.account, mode = ?self.mode, "telegram bot starting");
        match bot.get_me(CONNECT_TIMEOUT).await {
            Ok(me) => {
                inbound.report(BridgeState::Connected, Some(format!("as @{}", me.username)));
                bot.connected(me);
            }
            Err(e) if e.is_unauthorized() => {
                tracing::error!(account = bot.account, error = %e, "telegram bot has bad credentials: check its token");
                inbound.report(
                    BridgeState::BadCredentials,
                    Some(format!("getMe refused the token: {e}")),
                );
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(account = bot.account, error = %e, "telegram bot cannot connect yet; trying again");
                inbound.report(BridgeState::TransientDisconnect, Some(e.to_string()));
            }
        }
        self.inbound
            .set(inbound.clone())
            .map_err(|_| "the telegram account was started twice".to_owned())?;
        let (bot, mode, shutdown) = (self.bot.clone(), self.mode, self.shutdown.clone());
        let task = tokio::spawn(async move {
            if bot.connect(&inbound, &shutdown).await && mode == TelegramMode::Polling {
                bot.poll(&inbound, &shutdown).await;
            }
        });
        *self.task.lock().expect("task lock") = Some(task);
        Ok(())
    }

    async fn stop(&self) {
        self.shutdown.cancel();
        let task = self.task.lock().expect("task lock").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    async fn send(&self, message: &OutboundMessage) -> Result<(), SendError> {
        let chat_id = match message.chat.id.parse::<i64>() {
            Ok(id) => json!(id),
            Err(_) => json!(message.chat.id),
        };
        // Bytes are at least as many as characters, and rendering only takes markup out.
        let parts = render::split_answer(&message.text, MAX_TEXT);
        let sent = self
            .progress
            .lock()
            .expect("progress lock")
            .get(&message.id)
            .copied()
            .unwrap_or(0);
        for (i, part) in parts.iter().enumerate().skip(sent) {
            if part.trim().is_empty() {
                continue;
            }
            self.bot.send_part(&chat_id, part).await?;
            self.progress
                .lock()
                .expect("progress lock")
                .insert(message.id.clone(), i + 1);
        }
        self.progress
            .lock()
            .expect("progress lock")
            .remove(&message.id);
        Ok(())
    }
}

/// The routes' state: the webhook-mode accounts by ID.
#[derive(Clone)]
struct Routes {
    accounts: Arc<BTreeMap<String, Arc<TelegramChannel>>>,
}

/// `POST /bridges/telegram/{account}` for the webhook-mode accounts of `channels` (merged
/// into [`super::routes`]); without any, no route (the listener's 404 answers).
pub fn routes(channels: &[Arc<TelegramChannel>]) -> Router {
    let accounts: BTreeMap<_, _> = channels
        .iter()
        .filter(|c| c.mode == TelegramMode::Webhook)
        .map(|c| (c.bot.account.clone(), c.clone()))
        .collect();
    if accounts.is_empty() {
        return Router::new();
    }
    Router::new()
        .route("/bridges/telegram/{account}", post(receive))
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
        return refuse(StatusCode::NOT_FOUND, "no such telegram webhook account");
    };
    if http::declared_too_large(&headers) {
        return http::too_large();
    }
    let given = headers.get(SECRET_HEADER).map(|v| v.as_bytes());
    let expected = channel.secret_token.as_deref().unwrap_or_default();
    let right = given.is_some_and(|given| bool::from(given.ct_eq(expected)));
    if expected.is_empty() || !right {
        let reason = if given.is_none() {
            "missing X-Telegram-Bot-Api-Secret-Token"
        } else {
            "wrong X-Telegram-Bot-Api-Secret-Token"
        };
        tracing::info!(account, reason, "telegram webhook request refused");
        return refuse(StatusCode::UNAUTHORIZED, reason);
    }
    let Some(body) = http::read(body).await else {
        return http::too_large();
    };
    let update: Update = match serde_json::from_slice(&body) {
        Ok(update) => update,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("the body is not an Update: {e}"),
            );
        }
    };
    let (Some(inbound), Some(me)) = (channel.inbound.get(), channel.bot.me.get()) else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the bot is connecting; try again",
        );
    };
    let Some(message) = parse_update(&account, &update, me) else {
        return status("ignored");
    };
    match inbound.receive(message).await {
        Ok(Received::Accepted) => status("accepted"),
        Ok(Received::Duplicate) => status("duplicate"),
        Err(e) => {
            tracing::error!(account, error = %e, "cannot record a telegram update");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot record the update; try again",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn me() -> BotIdentity {
        BotIdentity {
            id: 777,
            username: "support_bot".into(),
        }
    }

    fn update(value: Value) -> Update {
        serde_json::from_value(value).unwrap()
    }

    fn group(text: &str, entities: Value) -> Update {
        update(json!({
            "update_id": 10,
            "message": {
                "message_id": 5, "date": 1,
                "from": { "id": 42, "is_bot": false, "first_name": "Ursula", "username": "ursula" },
                "chat": { "id": -100123, "type": "supergroup", "title": "Orders" },
                "text": text, "entities": entities,
            }
        }))
    }

    #[test]
    fn a_private_message_is_addressed_and_named_after_the_person() {
        let update = update(json!({
            "update_id": 981,
            "message": {
                "message_id": 1, "date": 1,
                "from": { "id": 42, "is_bot": false, "first_name": "Ursula", "last_name": "K" },
                "chat": { "id": 42, "type": "private", "first_name": "Ursula", "last_name": "K" },
                "text": "hello there",
            }
        }));
        let m = parse_update("support", &update, &me()).unwrap();
        assert_eq!(m.account, "support");
        assert_eq!(m.chat.id, "42");
        assert_eq!(m.chat.name.as_deref(), Some("Ursula K"));
        assert_eq!(m.sender.id, "42");
        assert_eq!(m.sender.name.as_deref(), Some("Ursula K"));
        assert_eq!(m.text, "hello there");
        assert_eq!(m.remote_id, "981", "redeliveries are told by update_id");
        assert!(m.addressed);
    }

    #[test]
    fn a_group_message_addresses_the_bot_by_mention_reply_or_command() {
        let plain = parse_update("s", &group("just chatting", json!([])), &me()).unwrap();
        assert!(!plain.addressed);
        assert_eq!(plain.chat.name.as_deref(), Some("Orders"));
        assert_eq!(plain.sender.name.as_deref(), Some("Ursula"));

        let mention = group(
            "hey @Support_Bot what's up",
            json!([{ "type": "mention", "offset": 4, "length": 12 }]),
        );
        let m = parse_update("s", &mention, &me()).unwrap();
        assert!(m.addressed);
        assert_eq!(m.text, "hey what's up", "the mention is taken out");

        let other = group(
            "@other_bot hi",
            json!([{ "type": "mention", "offset": 0, "length": 10 }]),
        );
        let m = parse_update("s", &other, &me()).unwrap();
        assert!(!m.addressed);
        assert_eq!(m.text, "@other_bot hi");

        let command = group(
            "/status@support_bot now",
            json!([{ "type": "bot_command", "offset": 0, "length": 19 }]),
        );
        let m = parse_update("s", &command, &me()).unwrap();
        assert!(m.addressed);
        assert_eq!(m.text, "/status now");
        let theirs = group(
            "/status@other_bot",
            json!([{ "type": "bot_command", "offset": 0, "length": 17 }]),
        );
        assert!(!parse_update("s", &theirs, &me()).unwrap().addressed);
        let bare = group(
            "/help",
            json!([{ "type": "bot_command", "offset": 0, "length": 5 }]),
        );
        assert!(parse_update("s", &bare, &me()).unwrap().addressed);

        let mut reply = group("and this?", json!([]));
        let message = reply.message.as_mut().unwrap();
        message.reply_to_message = Some(Box::new(
            serde_json::from_value(json!({
                "message_id": 4, "date": 1,
                "from": { "id": 777, "is_bot": true, "first_name": "Support" },
                "chat": { "id": -100123, "type": "supergroup", "title": "Orders" },
                "text": "an answer",
            }))
            .unwrap(),
        ));
        assert!(parse_update("s", &reply, &me()).unwrap().addressed);
    }

    #[test]
    fn entity_offsets_count_utf16_units() {
        // "🙂" is two UTF-16 units and four bytes.
        let text = "🙂 @support_bot ok";
        let u = group(
            text,
            json!([{ "type": "mention", "offset": 3, "length": 12 }]),
        );
        let m = parse_update("s", &u, &me()).unwrap();
        assert!(m.addressed);
        assert_eq!(m.text, "🙂 ok");
        assert_eq!(utf16_range(text, 3, 12), Some(5..17));
        assert_eq!(utf16_range(text, 3, 40), None);
        assert_eq!(utf16_range("ab", 2, 0), Some(2..2));
    }

    #[test]
    fn updates_without_text_are_not_bridged() {
        let u = update(json!({ "update_id": 3, "edited_message": { "message_id": 1 } }));
        assert!(parse_update("s", &u, &me()).is_none());
        let sticker = update(json!({
            "update_id": 4,
            "message": { "message_id": 1, "date": 1, "chat": { "id": 1, "type": "private" } }
        }));
        assert!(parse_update("s", &sticker, &me()).is_none());
    }

    #[test]
    fn answers_are_read_as_making_requests_describes() {
        assert_eq!(
            read_answer(200, br#"{"ok":true,"result":{"id":1}}"#),
            Ok(json!({"id": 1}))
        );
        let flood = read_answer(
            429,
            br#"{"ok":false,"error_code":429,"description":"Too Many Requests: retry after 3","parameters":{"retry_after":3}}"#,
        )
        .unwrap_err();
        match SendError::from(flood) {
            SendError::Transient { retry_after, .. } => {
                assert_eq!(retry_after, Some(Duration::from_secs(3)))
            }
            other => panic!("{other:?}"),
        }
        let bad = read_answer(
            400,
            br#"{"ok":false,"error_code":400,"description":"Bad Request: chat not found"}"#,
        )
        .unwrap_err();
        match SendError::from(bad) {
            SendError::Permanent(reason) => assert!(reason.contains("chat not found"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let down = read_answer(502, b"<html>bad gateway</html>").unwrap_err();
        assert!(matches!(
            SendError::from(down),
            SendError::Transient {
                retry_after: None,
                ..
            }
        ));
        assert!(
            read_answer(
                401,
                br#"{"ok":false,"error_code":401,"description":"Unauthorized"}"#
            )
            .unwrap_err()
            .is_unauthorized()
        );
        assert!(matches!(
            SendError::from(ApiError::Network("refused".into())),
            SendError::Transient { .. }
        ));
    }

    fn app() -> Router {
        let webhook = TelegramChannel::new(
            "support",
            "123:abc".into(),
            Some(b"s3cret-token".to_vec()),
            TelegramMode::Webhook,
            Url::parse("http://127.0.0.1:9").unwrap(),
        );
        let polling = TelegramChannel::new(
            "ops",
            "456:def".into(),
            None,
            TelegramMode::Polling,
            Url::parse("http://127.0.0.1:9").unwrap(),
        );
        super::super::routes(&[], &[], &[Arc::new(webhook), Arc::new(polling)])
    }

    async fn call(
        path: &str,
        secret: Option<&str>,
        length: Option<usize>,
        body: &str,
    ) -> (StatusCode, Value) {
        let mut request =
            axum::http::Request::post(path).header("content-type", "application/json");
        if let Some(secret) = secret {
            request = request.header(SECRET_HEADER, secret);
        }
        if let Some(length) = length {
            request = request.header("content-length", length);
        }
        let response = app()
            .oneshot(request.body(Body::from(body.to_owned())).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    const UPDATE: &str = r#"{"update_id":1,"message":{"message_id":1,"date":1,"chat":{"id":1,"type":"private"},"text":"hi"}}"#;

    #[tokio::test]
    async fn the_webhook_refuses_a_missing_or_wrong_secret_token() {
        let (status, body) = call("/bridges/telegram/support", None, None, UPDATE).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"], "missing X-Telegram-Bot-Api-Secret-Token");
        let (status, body) = call(
            "/bridges/telegram/support",
            Some("s3cret-tokem"),
            None,
            UPDATE,
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"], "wrong X-Telegram-Bot-Api-Secret-Token");
        let (status, _) = call("/bridges/telegram/support", Some("s3cret"), None, UPDATE).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "a prefix is not the token"
        );
    }

    #[tokio::test]
    async fn the_webhook_refuses_a_body_that_is_not_an_update_with_the_reason() {
        let (status, body) = call(
            "/bridges/telegram/support",
            Some("s3cret-token"),
            None,
            r#"{"note":"no update here"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let reason = body["error"].as_str().unwrap();
        assert!(reason.contains("the body is not an Update"), "{reason}");
        assert!(
            reason.contains("update_id"),
            "the reason names what is missing: {reason}"
        );
        let (status, _) = call("/bridges/telegram/support", Some("s3cret-token"), None, "{").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn the_webhook_knows_only_its_webhook_accounts() {
        for path in ["/bridges/telegram/nobody", "/bridges/telegram/ops"] {
            let (status, body) = call(path, Some("s3cret-token"), None, UPDATE).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(body["error"], "no such telegram webhook account");
        }
        let (status, body) = call("/bridges/elsewhere", None, None, "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body["error"].is_string(), "a JSON error body: {body}");
        // Without a webhook-mode bot there is no Telegram route at all.
        let none = super::super::routes(&[], &[], &[])
            .oneshot(
                axum::http::Request::get("/bridges/telegram/default")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(none.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn the_webhook_refuses_an_oversized_body_before_reading_it() {
        // Announced too large: refused on the header alone, whatever follows.
        let (status, _) = call(
            "/bridges/telegram/support",
            Some("s3cret-token"),
            Some(MAX_BODY + 1),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        // Not announced (chunked): cut off at the limit.
        let big = format!("{{\"update_id\":1,\"pad\":\"{}\"}}", "x".repeat(MAX_BODY));
        let (status, _) = call(
            "/bridges/telegram/support",
            Some("s3cret-token"),
            None,
            &big,
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn the_webhook_waits_for_the_bot_to_connect() {
        let (status, _) = call(
            "/bridges/telegram/support",
            Some("s3cret-token"),
            None,
            UPDATE,
        )
        .await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "before getMe, the update is left for Telegram to deliver again"
        );
    }
}
