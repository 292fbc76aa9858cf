//! Other platforms in the same rooms. Each remote chat is a *portal*: one Matrix room the
//! appservice's bot creates on first contact, marked with an `m.bridge` state event
//! ([MSC2346](https://github.com/matrix-org/matrix-spec-proposals/pull/2346)) and named after
//! the chat. Each remote user is a *puppet*: a virtual user in the namespace the
//! registration reserves (`@<puppet_prefix><platform>_<id>:server`), with the remote
//! display name. A remote message is posted by its puppet into the portal, so it reaches
//! the agents through the ordinary appservice → inbox pipeline, like anyone's.
//!
//! A platform implements one small trait, [`Channel`]: start, stop, send, and what it can
//! do ([`Capabilities`]: text format, length limit, and whether its accounts' agents
//! answer every message or only those the platform marks addressed, see [`Addressing`]);
//! it hands what arrives to the core through [`Inbound`]. Abilities
//! beyond plain text (edits, reactions, typing, media, threads) will be traits of their own
//! the core discovers, added with the first platform that has them — never stub methods.
//!
//! Exactly once, both ways: an inbound message is recorded in the [`PortalStore`] under
//! its platform message ID *before* the platform is acknowledged; the puppet posts it with
//! a transaction ID derived from that ID, and the record is marked delivered after. A
//! redelivery of a delivered message posts nothing; a pending one (a crash between the
//! acknowledgement and the post) is posted at the next start, once. Outbound, the inbox's
//! relay seam records each Matrix event to send (keyed by its event ID) before the event
//! leaves the journal; a worker per account sends it, retrying transient failures, and a
//! permanent failure posts a notice in the portal.
//!
//! What goes out ([`Bridges::relay`]): an agent's answer once it is final (not while
//! `io.agentbus.streaming` marks it, so the final edit of a streamed answer is what is
//! sent), and a Matrix person's message as `Name: text` (relay mode). Puppets' own
//! messages never go back out, and nor does the bot's.

mod http;
pub mod irc;
pub mod names;
pub mod slack;
pub mod telegram;
pub mod webhook;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use ruma::{EventId, OwnedRoomId, OwnedTransactionId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AgentId, ChannelId, Config};
use crate::matrix::MatrixClient;
use crate::store::{BridgedState, Portal, PortalStore, StoreError};

/// How many messages wait for the Matrix side, or for one account's platform, before
/// receiving pushes back (the platform's request waits for its acknowledgement).
const QUEUE: usize = 256;
/// The longest wait between two attempts at sending to a platform.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A remote chat (group, channel, DM) as the platform names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteChat {
    pub id: String,
    /// The chat's name, if the platform gives one; the portal room is named after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A remote user: the platform's ID and display name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteUser {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// What a platform hands the core for each message that arrives: the standard inbound
/// message every platform maps its own to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundMessage {
    /// The account (bot, workspace, endpoint) of the platform it arrived through.
    pub account: String,
    pub chat: RemoteChat,
    pub sender: RemoteUser,
    pub text: String,
    /// The platform's ID of the message: what redeliveries are recognised by.
    pub remote_id: String,
    /// The message addresses the account: a DM, a mention of the bot, a reply to it, a
    /// command. Posted with the account's agent in `m.mentions`, so it is for that agent
    /// (on a platform whose agent answers only when addressed, see [`Addressing`], the
    /// only way to reach it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub addressed: bool,
}

/// What the core asks a platform to send into a remote chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboundMessage {
    /// Stable across retries (the Matrix event ID), for platforms that deduplicate.
    pub id: String,
    pub chat: RemoteChat,
    /// Who said it on Matrix (an agent, or a person relayed).
    pub sender: RemoteUser,
    /// The text as the platform should show it (relayed people: `Name: text`).
    pub text: String,
    /// Relay mode: `text` names its sender already (a Matrix person's message); else it
    /// is an agent's answer, as the agent wrote it.
    #[serde(default)]
    pub relayed: bool,
}

/// How a platform shows text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextFormat {
    /// Plain text; Markdown is sent as written.
    Plain,
    /// Slack's `mrkdwn`: Markdown is rendered to it.
    SlackMrkdwn,
    /// The platform's own HTML subset, which the channel renders the Markdown to.
    Html,
}

/// Which messages in an account's portals its bound agent answers unaddressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressing {
    /// Every message: the account is the conversation (a webhook endpoint).
    Every,
    /// Only those the platform marks [`InboundMessage::addressed`] (group chats where
    /// people talk among themselves too).
    Addressed,
}

/// What a platform declares it can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub text: TextFormat,
    /// The longest text one message may carry, if the platform has a limit.
    pub max_text_len: Option<usize>,
    /// Which messages the account's bound agent answers unaddressed.
    pub addressing: Addressing,
}

/// Why a send failed, and whether to try again.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Try again: after `retry_after` when the platform said (a 429's `Retry-After`), else
    /// after the usual backoff.
    #[error("transient: {reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The platform refused it; another attempt would fare no better.
    #[error("{0}")]
    Permanent(String),
}

/// One account of one platform, as the core drives it.
#[async_trait]
pub trait Channel: Send + Sync {
    /// The platform (`webhook`, `irc`, `telegram`, …): the channel bindings match on.
    fn platform(&self) -> ChannelId;
    /// The account's ID under `bridges.<platform>.accounts`.
    fn account(&self) -> &str;
    fn capabilities(&self) -> Capabilities;
    /// Connects (or, for a platform that calls us, gets ready to be called); what arrives
    /// goes to `inbound`.
    async fn start(&self, inbound: Inbound) -> Result<(), String>;
    /// Disconnects; nothing arrives after it returns.
    async fn stop(&self);
    /// Sends `message` into its remote chat.
    async fn send(&self, message: &OutboundMessage) -> Result<(), SendError>;
}

/// An account's connection to its platform, in the words of mautrix's bridge states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BridgeState {
    /// Configured, not yet started.
    Starting,
    Connecting,
    /// Connected (or, for a platform that calls us, ready to be called).
    Connected,
    /// Lost; reconnecting by itself.
    TransientDisconnect,
    /// The platform refused the credentials: someone must fix the config.
    BadCredentials,
    /// Could not start for another reason.
    UnknownError,
}

impl BridgeState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::TransientDisconnect => "transient_disconnect",
            Self::BadCredentials => "bad_credentials",
            Self::UnknownError => "unknown_error",
        }
    }

    /// Whether the account works, or will by itself.
    pub fn is_healthy(self) -> bool {
        matches!(self, Self::Starting | Self::Connecting | Self::Connected)
    }
}

/// One account's state, for `/ready`, the log and the management rooms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccountState {
    pub platform: ChannelId,
    pub account: String,
    pub state: BridgeState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// When it entered this state (unix ms).
    pub since_ms: u64,
}

/// What [`Inbound::receive`] made of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// New: recorded, and on its way into its portal.
    Accepted,
    /// Seen before: posted already, or (after a crash) on its way again.
    Duplicate,
}

/// The core's intake for one platform, handed to [`Channel::start`].
#[derive(Clone)]
pub struct Inbound {
    core: Arc<Bridges>,
    platform: ChannelId,
    account: String,
}

impl Inbound {
    /// Reports the account's connection state: logged, shown by `/ready`, and posted to
    /// the management rooms when it changed.
    pub fn report(&self, state: BridgeState, detail: Option<String>) {
        self.core
            .report(&self.platform, &self.account, state, detail);
    }

    /// Records `message` (durably: return only then acknowledge it to the platform) and
    /// queues it for its portal; a message seen before is not queued again.
    pub async fn receive(&self, message: InboundMessage) -> Result<Received, StoreError> {
        self.core.receive(&self.platform, message).await
    }
}

/// A message for the Matrix side, as recorded (its key is the record's).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InboundJob {
    platform: ChannelId,
    message: InboundMessage,
}

/// One account's outbound messages, with their record keys, for its worker.
type OutboundQueue = mpsc::Receiver<(String, OutboundJob)>;

/// A message for a platform, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OutboundJob {
    platform: ChannelId,
    account: String,
    room_id: OwnedRoomId,
    message: OutboundMessage,
}

/// A Matrix message in a room, as the inbox's relay seam sees it.
#[derive(Debug, Clone, Copy)]
pub struct Relayable<'a> {
    pub room_id: &'a RoomId,
    pub event_id: &'a EventId,
    pub sender: &'a UserId,
    /// The text (for an edit, the text after it).
    pub text: &'a str,
    /// The edited event, for an edit.
    pub edit_of: Option<&'a EventId>,
    /// An agent's answer still streaming.
    pub streaming: bool,
    pub notice: bool,
}

/// The bridge core: the platforms' accounts, the portals, the puppets, and both queues.
pub struct Bridges {
    config: Arc<Config>,
    matrix: Arc<MatrixClient>,
    store: Arc<dyn PortalStore>,
    channels: BTreeMap<(ChannelId, String), Arc<dyn Channel>>,
    /// The portals by room, for the relay seam (which runs for every message).
    rooms: RwLock<HashMap<OwnedRoomId, Portal>>,
    /// One portal creation at a time, so two first messages of a chat make one room.
    creating: tokio::sync::Mutex<()>,
    /// The display name each puppet was last given by this process.
    profiles: Mutex<HashMap<OwnedUserId, String>>,
    inbound: mpsc::Sender<(String, InboundJob)>,
    inbound_rx: Mutex<Option<mpsc::Receiver<(String, InboundJob)>>>,
    outbound: BTreeMap<(ChannelId, String), mpsc::Sender<(String, OutboundJob)>>,
    outbound_rx: Mutex<Vec<(Arc<dyn Channel>, OutboundQueue)>>,
    /// Each account's connection state.
    states: Mutex<BTreeMap<(ChannelId, String), AccountState>>,
    /// Numbers the state notices, so each has a transaction ID of its own.
    notices: std::sync::atomic::AtomicU64,
    /// Where the state notices are posted from (the tasks are tracked by the runtime's
    /// tracker once started).
    tracker: Mutex<Option<TaskTracker>>,
    /// When this process built the core: part of the state notices' transaction IDs, so
    /// a restart's notices are new ones.
    started_ms: u64,
}

/// Every platform's routes on the bridges' listener; anything else is a 404 with a JSON
/// error body, like every other error of agentbus's listeners.
pub fn routes(
    webhooks: &[Arc<webhook::WebhookChannel>],
    slacks: &[Arc<slack::SlackChannel>],
    telegrams: &[Arc<telegram::TelegramChannel>],
) -> axum::Router {
    axum::Router::new()
        .merge(webhook::routes(webhooks))
        .merge(slack::routes(slacks))
        .merge(telegram::routes(telegrams))
        .fallback(|| async { axum::http::StatusCode::NOT_FOUND })
        .layer(axum::middleware::map_response(crate::net::error_body))
}

/// The record key of an inbound message.
fn inbound_key(platform: &ChannelId, account: &str, remote_id: &str) -> String {
    format!("in/{platform}/{account}/{remote_id}")
}

/// The record key of an outbound message (the Matrix event it relays).
fn outbound_key(event_id: &EventId) -> String {
    format!("out/{event_id}")
}

/// A transaction ID derived from a record key: the same message always posts under the
/// same ID, so the homeserver keeps one event however often it is posted.
fn txn_for(key: &str) -> OwnedTransactionId {
    let digest = Sha256::digest(key.as_bytes());
    format!("bridge.{}", hex::encode(&digest[..16])).into()
}

impl Bridges {
    /// The core over `channels` (every configured account).
    pub fn new(
        config: Arc<Config>,
        matrix: Arc<MatrixClient>,
        store: Arc<dyn PortalStore>,
        channels: Vec<Arc<dyn Channel>>,
    ) -> Arc<Self> {
        let (inbound, inbound_rx) = mpsc::channel(QUEUE);
        let mut outbound = BTreeMap::new();
        let mut outbound_rx = Vec::new();
        let mut by_key = BTreeMap::new();
        let mut states = BTreeMap::new();
        let now = crate::unix_ms();
        for channel in channels {
            let key = (channel.platform(), channel.account().to_owned());
            states.insert(
                key.clone(),
                AccountState {
                    platform: key.0.clone(),
                    account: key.1.clone(),
                    state: BridgeState::Starting,
                    detail: None,
                    since_ms: now,
                },
            );
            let (tx, rx) = mpsc::channel(QUEUE);
            outbound.insert(key.clone(), tx);
            outbound_rx.push((channel.clone(), rx));
            by_key.insert(key, channel);
        }
        Arc::new(Self {
            config,
            matrix,
            store,
            channels: by_key,
            rooms: RwLock::new(HashMap::new()),
            creating: tokio::sync::Mutex::new(()),
            profiles: Mutex::new(HashMap::new()),
            inbound,
            inbound_rx: Mutex::new(Some(inbound_rx)),
            outbound,
            outbound_rx: Mutex::new(outbound_rx),
            states: Mutex::new(states),
            notices: std::sync::atomic::AtomicU64::new(0),
            tracker: Mutex::new(None),
            started_ms: now,
        })
    }

    /// Every account's connection state, by platform and account.
    pub fn states(&self) -> Vec<AccountState> {
        self.states
            .lock()
            .expect("states lock")
            .values()
            .cloned()
            .collect()
    }

    /// Records `account`'s state; a change is logged and posted as a notice in every room
    /// the bot is in that is not a portal — the management rooms, which it joins only on
    /// an admin's invite.
    fn report(
        self: &Arc<Self>,
        platform: &ChannelId,
        account: &str,
        state: BridgeState,
        detail: Option<String>,
    ) {
        let key = (platform.clone(), account.to_owned());
        let changed = {
            let mut states = self.states.lock().expect("states lock");
            let entry = states.entry(key).or_insert_with(|| AccountState {
                platform: platform.clone(),
                account: account.to_owned(),
                state: BridgeState::Starting,
                detail: None,
                since_ms: crate::unix_ms(),
            });
            let changed = entry.state != state;
            if changed {
                entry.since_ms = crate::unix_ms();
            }
            entry.state = state;
            entry.detail = detail.clone();
            changed
        };
        metrics::gauge!("agentbus_bridge_connected", "platform" => platform.to_string(), "account" => account.to_owned())
            .set(if state == BridgeState::Connected { 1.0 } else { 0.0 });
        let detail_text = detail.as_deref().unwrap_or("");
        if state.is_healthy() {
            tracing::info!(platform = %platform, account, state = state.as_str(), detail = detail_text, "bridge state");
        } else {
            tracing::warn!(platform = %platform, account, state = state.as_str(), detail = detail_text, "bridge state");
        }
        // Starting and connecting are steps on the way, not news.
        if !changed || matches!(state, BridgeState::Starting | BridgeState::Connecting) {
            return;
        }
        let Some(tracker) = self.tracker.lock().expect("tracker lock").clone() else {
            return;
        };
        let icon = if state == BridgeState::Connected {
            "✅"
        } else {
            "⚠️"
        };
        let mut body = format!("{icon} Bridge {platform} ({account}): {}", state.as_str());
        if let Some(detail) = detail {
            body.push_str(&format!(" — {detail}"));
        }
        let seq = self
            .notices
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let txn = txn_for(&format!(
            "state/{}/{seq}/{platform}/{account}",
            self.started_ms
        ));
        let core = self.clone();
        tracker.spawn(async move { core.post_state_notice(&body, &txn).await });
    }

    async fn post_state_notice(&self, body: &str, txn: &OwnedTransactionId) {
        let bot = self.matrix.intent(&self.config.sender_user_id());
        let rooms = match bot.joined_rooms().await {
            Ok(rooms) => rooms,
            Err(e) => {
                tracing::debug!(error = %e, "no management rooms for a bridge state notice");
                return;
            }
        };
        let portals: std::collections::HashSet<OwnedRoomId> = self
            .rooms
            .read()
            .expect("portals lock")
            .keys()
            .cloned()
            .collect();
        let content = json!({ "msgtype": "m.notice", "body": body });
        for room in rooms.into_iter().filter(|r| !portals.contains(r)) {
            if let Err(e) = bot.send_message(&room, txn, &content).await {
                tracing::debug!(room_id = %room, error = %e, "a bridge state notice was not posted");
            }
        }
    }

    /// The accounts of `platform`, by account ID.
    pub fn accounts(&self, platform: &ChannelId) -> impl Iterator<Item = &Arc<dyn Channel>> {
        self.channels
            .iter()
            .filter(move |((p, _), _)| p == platform)
            .map(|(_, channel)| channel)
    }

    /// Loads the portals, starts every account and the queues' workers, and queues again
    /// what a previous run recorded and did not deliver. Call once the homeserver is up.
    pub async fn start(self: &Arc<Self>, tracker: &TaskTracker, shutdown: &CancellationToken) {
        *self.tracker.lock().expect("tracker lock") = Some(tracker.clone());
        match self.store.portals().await {
            Ok(portals) => {
                let mut rooms = self.rooms.write().expect("portals lock");
                for portal in portals {
                    rooms.insert(portal.room_id.clone(), portal);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the bridges' portals"),
        }
        if let Some(rx) = self.inbound_rx.lock().expect("queue lock").take() {
            tracker.spawn(self.clone().post_inbound(rx, shutdown.clone()));
        }
        for (channel, rx) in std::mem::take(&mut *self.outbound_rx.lock().expect("queue lock")) {
            tracker.spawn(self.clone().send_outbound(channel, rx, shutdown.clone()));
        }
        for channel in self.channels.values() {
            let inbound = Inbound {
                core: self.clone(),
                platform: channel.platform(),
                account: channel.account().to_owned(),
            };
            if let Err(e) = channel.start(inbound.clone()).await {
                tracing::error!(platform = %channel.platform(), account = channel.account(), error = %e, "bridge could not start");
                inbound.report(BridgeState::UnknownError, Some(e));
            }
        }
        self.requeue().await;
    }

    /// Stops every account.
    pub async fn stop(&self) {
        for channel in self.channels.values() {
            channel.stop().await;
        }
    }

    /// Queues what was recorded and not delivered before a restart.
    async fn requeue(&self) {
        for (prefix, outbound) in [("in/", false), ("out/", true)] {
            let pending = match self.store.pending_bridged(prefix).await {
                Ok(pending) => pending,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the bridges' pending messages");
                    continue;
                }
            };
            if !pending.is_empty() {
                tracing::info!(
                    messages = pending.len(),
                    outbound,
                    "bridged messages from before the restart are delivered now"
                );
            }
            for (key, payload) in pending {
                if outbound {
                    match serde_json::from_slice::<OutboundJob>(&payload) {
                        Ok(job) => self.queue_outbound(key, job).await,
                        Err(e) => {
                            tracing::error!(key, error = %e, "an outbound record is unreadable")
                        }
                    }
                } else {
                    match serde_json::from_slice::<InboundJob>(&payload) {
                        Ok(job) => {
                            let _ = self.inbound.send((key, job)).await;
                        }
                        Err(e) => {
                            tracing::error!(key, error = %e, "an inbound record is unreadable")
                        }
                    }
                }
            }
        }
    }

    async fn receive(
        &self,
        platform: &ChannelId,
        message: InboundMessage,
    ) -> Result<Received, StoreError> {
        let key = inbound_key(platform, &message.account, &message.remote_id);
        let job = InboundJob {
            platform: platform.clone(),
            message,
        };
        let payload = serde_json::to_vec(&job).expect("an inbound message serialises");
        let recorded = self.store.record_bridged(&key, &payload).await?;
        let outcome = if recorded.is_none() {
            "accepted"
        } else {
            "duplicate"
        };
        metrics::counter!("agentbus_bridge_messages_total", "platform" => platform.to_string(), "direction" => "in", "outcome" => outcome)
            .increment(1);
        match recorded {
            None => {
                // A full queue waits here, so the platform's acknowledgement waits too.
                let _ = self.inbound.send((key, job)).await;
                Ok(Received::Accepted)
            }
            Some(BridgedState::Pending | BridgedState::Delivered) => Ok(Received::Duplicate),
        }
    }

    /// The inbound worker: each message into its portal, in arrival order.
    async fn post_inbound(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<(String, InboundJob)>,
        shutdown: CancellationToken,
    ) {
        loop {
            let (key, job) = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = rx.recv() => match next { Some(next) => next, None => return },
            };
            match self.post(&key, &job, &shutdown).await {
                Ok(()) => {
                    if let Err(e) = self.store.finish_bridged(&key).await {
                        tracing::warn!(key, error = %e, "a posted bridged message stays pending (it is not posted twice)");
                    }
                }
                Err(e) => {
                    tracing::error!(platform = %job.platform, account = job.message.account, chat = job.message.chat.id, error = %e, "a bridged message was not posted; it is retried at the next start")
                }
            }
        }
    }

    /// Posts one inbound message: portal, puppet, then the message under its derived
    /// transaction ID.
    async fn post(
        &self,
        key: &str,
        job: &InboundJob,
        shutdown: &CancellationToken,
    ) -> Result<(), String> {
        let message = &job.message;
        let portal = self
            .ensure_portal(&job.platform, &message.account, &message.chat)
            .await?;
        let puppet = self
            .ensure_puppet(&job.platform, &message.sender, &portal.room_id)
            .await?;
        let mut content = json!({ "msgtype": "m.text", "body": message.text });
        if message.addressed
            && let Some(agent) = self.bound_agent(&job.platform, &message.account)
        {
            content["m.mentions"] = json!({ "user_ids": [self.config.user_id(agent.as_str())] });
        }
        let event_id = puppet
            .send_message_until_delivered(&portal.room_id, &txn_for(key), &content, shutdown)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(platform = %job.platform, account = message.account, room_id = %portal.room_id, event_id = %event_id, "bridged message posted");
        Ok(())
    }

    /// The portal of `chat`, created (with its `m.bridge` state, named after the chat,
    /// the account's agent and followers invited) on first contact, renamed when the
    /// chat's name changed.
    async fn ensure_portal(
        &self,
        platform: &ChannelId,
        account: &str,
        chat: &RemoteChat,
    ) -> Result<Portal, String> {
        let _one_at_a_time = self.creating.lock().await;
        let bot = self.matrix.intent(&self.config.sender_user_id());
        let name = chat.name.clone().unwrap_or_else(|| chat.id.clone());
        if let Some(mut portal) = self
            .store
            .portal(platform, account, &chat.id)
            .await
            .map_err(|e| e.to_string())?
        {
            if chat.name.is_some() && portal.name != name {
                bot.set_room_name(&portal.room_id, &name)
                    .await
                    .map_err(|e| format!("cannot rename portal {}: {e}", portal.room_id))?;
                portal.name = name;
                self.store
                    .save_portal(&portal)
                    .await
                    .map_err(|e| e.to_string())?;
                self.rooms
                    .write()
                    .expect("portals lock")
                    .insert(portal.room_id.clone(), portal.clone());
            }
            return Ok(portal);
        }
        let agent = self.bound_agent(platform, account);
        let mut invite: Vec<OwnedUserId> = agent
            .iter()
            .map(|a| self.config.user_id(a.as_str()))
            .collect();
        invite.extend(self.followers(platform, account));
        let state = names::bridge_state(
            &self.config.sender_user_id(),
            platform,
            account,
            &chat.id,
            &name,
        );
        let room_id = bot
            .create_room(&name, &[state], &invite)
            .await
            .map_err(|e| {
                format!(
                    "cannot create the portal of {platform} chat {}: {e}",
                    chat.id
                )
            })?;
        let portal = Portal {
            platform: platform.clone(),
            account: account.to_owned(),
            chat: chat.id.clone(),
            room_id: room_id.clone(),
            name,
        };
        self.store
            .save_portal(&portal)
            .await
            .map_err(|e| e.to_string())?;
        self.rooms
            .write()
            .expect("portals lock")
            .insert(room_id.clone(), portal.clone());
        if let Some(agent) = agent {
            // In before the first message, so it is there to answer it.
            let user = self.config.user_id(agent.as_str());
            if let Err(e) = self.matrix.intent(&user).ensure_joined(&room_id).await {
                tracing::warn!(agent = %agent, room_id = %room_id, error = %e, "the account's agent could not join its new portal");
            }
        }
        tracing::info!(platform = %platform, account, chat = chat.id, room_id = %room_id, "portal created");
        Ok(portal)
    }

    /// The puppet of `user`, registered, named after the remote profile and joined to
    /// `room_id`.
    async fn ensure_puppet(
        &self,
        platform: &ChannelId,
        user: &RemoteUser,
        room_id: &RoomId,
    ) -> Result<crate::matrix::Intent, String> {
        let localpart =
            names::puppet_localpart(&self.config.appservice.puppet_prefix, platform, &user.id);
        let user_id = self.config.user_id(&localpart);
        let intent = self.matrix.intent(&user_id);
        let name = user.name.clone().unwrap_or_else(|| user.id.clone());
        let known = self.profiles.lock().expect("profiles lock").get(&user_id) == Some(&name);
        if !known {
            intent
                .ensure_registered()
                .await
                .map_err(|e| format!("cannot register puppet {user_id}: {e}"))?;
            if let Err(e) = intent.set_display_name(&name).await {
                tracing::warn!(user = %user_id, error = %e, "could not set a puppet's display name");
            }
            self.profiles
                .lock()
                .expect("profiles lock")
                .insert(user_id.clone(), name);
        }
        if let Err(e) = intent.ensure_joined(room_id).await {
            // Not in yet: the bot invites, then the puppet joins.
            tracing::debug!(user = %user_id, room_id = %room_id, error = %e, "puppet not invited yet");
            let bot = self.matrix.intent(&self.config.sender_user_id());
            bot.invite(room_id, &user_id)
                .await
                .map_err(|e| format!("cannot invite puppet {user_id} to {room_id}: {e}"))?;
            intent
                .join_room(room_id)
                .await
                .map_err(|e| format!("puppet {user_id} cannot join {room_id}: {e}"))?;
        }
        Ok(intent)
    }

    /// The agent `bridges.<platform>.accounts.<account>.agent` names.
    fn bound_agent(&self, platform: &ChannelId, account: &str) -> Option<AgentId> {
        self.config
            .bridges
            .binding(platform.as_str(), account)
            .and_then(|b| b.agent.cloned())
    }

    /// The Matrix users invited to the account's new portals.
    fn followers(&self, platform: &ChannelId, account: &str) -> Vec<OwnedUserId> {
        self.config
            .bridges
            .binding(platform.as_str(), account)
            .map(|b| b.invite.to_vec())
            .unwrap_or_default()
    }

    /// The agent a bridged message in `room_id` is for, when it is a portal of an account
    /// bound to one: every message on a platform of [`Addressing::Every`], else those
    /// whose `m.mentions` (`mentions`) name the agent, as an addressed one's do.
    pub fn portal_agent(
        &self,
        room_id: &RoomId,
        mentions: &BTreeSet<OwnedUserId>,
    ) -> Option<AgentId> {
        let (platform, account) = {
            let rooms = self.rooms.read().expect("portals lock");
            let portal = rooms.get(room_id)?;
            (portal.platform.clone(), portal.account.clone())
        };
        let agent = self.bound_agent(&platform, &account)?;
        let addressing = self
            .channels
            .get(&(platform, account))
            .map_or(Addressing::Every, |c| c.capabilities().addressing);
        match addressing {
            Addressing::Every => Some(agent),
            Addressing::Addressed => mentions
                .contains(&self.config.user_id(agent.as_str()))
                .then_some(agent),
        }
    }

    /// The inbox's relay seam: sends `message` out to the platform of the portal it was
    /// said in, when it is one to relay (see the module doc). Returns once the send is
    /// recorded, so an event that leaves the journal has its relay on record.
    pub async fn relay(&self, message: Relayable<'_>) {
        let Some(portal) = self
            .rooms
            .read()
            .expect("portals lock")
            .get(message.room_id)
            .cloned()
        else {
            return;
        };
        let config = &self.config;
        if config.is_puppet(message.sender) || *message.sender == config.sender_user_id() {
            return;
        }
        let relayed = !config.is_own_user(message.sender);
        let (relayed_event, sender, text) = if !relayed {
            // Ours: an agent's (or team's) answer, once it is final.
            if message.streaming {
                return;
            }
            let id = message.sender.localpart();
            let name = config
                .agents
                .iter()
                .find(|a| a.id == id)
                .map(|a| a.display_name().to_owned())
                .unwrap_or_else(|| id.to_owned());
            let sender = RemoteUser {
                id: id.to_owned(),
                name: Some(name),
            };
            (
                message.edit_of.unwrap_or(message.event_id),
                sender,
                message.text.to_owned(),
            )
        } else {
            // A Matrix person, relayed with their name; their edits and notices stay here.
            if message.edit_of.is_some() || message.notice {
                return;
            }
            let name = self.display_name(message.room_id, message.sender).await;
            let sender = RemoteUser {
                id: message.sender.to_string(),
                name: Some(name.clone()),
            };
            (
                message.event_id,
                sender,
                format!("{name}: {}", message.text),
            )
        };
        let key = outbound_key(relayed_event);
        let job = OutboundJob {
            platform: portal.platform.clone(),
            account: portal.account.clone(),
            room_id: portal.room_id.clone(),
            message: OutboundMessage {
                id: relayed_event.to_string(),
                chat: RemoteChat {
                    id: portal.chat.clone(),
                    name: Some(portal.name.clone()),
                },
                sender,
                text,
                relayed,
            },
        };
        let payload = serde_json::to_vec(&job).expect("an outbound message serialises");
        match self.store.record_bridged(&key, &payload).await {
            Ok(None) => self.queue_outbound(key, job).await,
            Ok(Some(_)) => {} // relayed (or on its way) already: a replay, or a later edit
            Err(e) => {
                tracing::error!(room_id = %message.room_id, event_id = %message.event_id, error = %e, "cannot record a message to relay; it is not sent")
            }
        }
    }

    async fn queue_outbound(&self, key: String, job: OutboundJob) {
        match self
            .outbound
            .get(&(job.platform.clone(), job.account.clone()))
        {
            Some(queue) => {
                let _ = queue.send((key, job)).await;
            }
            None => {
                tracing::warn!(platform = %job.platform, account = job.account, "a portal's account is no longer configured; its message is not sent")
            }
        }
    }

    /// `user`'s display name in `room_id`, else their localpart.
    async fn display_name(&self, room_id: &RoomId, user: &UserId) -> String {
        let bot = self.matrix.intent(&self.config.sender_user_id());
        bot.joined_members(room_id)
            .await
            .ok()
            .and_then(|members| {
                members
                    .into_iter()
                    .find(|(id, _)| id == user)
                    .and_then(|(_, name)| name)
            })
            .unwrap_or_else(|| user.localpart().to_owned())
    }

    /// One account's outbound worker: each message in order, retried with backoff while
    /// the platform fails transiently (as long as it says for a 429).
    async fn send_outbound(
        self: Arc<Self>,
        channel: Arc<dyn Channel>,
        mut rx: OutboundQueue,
        shutdown: CancellationToken,
    ) {
        loop {
            let (key, job) = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = rx.recv() => match next { Some(next) => next, None => return },
            };
            let mut backoff = Duration::from_secs(1);
            loop {
                match channel.send(&job.message).await {
                    Ok(()) => {
                        metrics::counter!("agentbus_bridge_messages_total", "platform" => job.platform.to_string(), "direction" => "out", "outcome" => "sent")
                            .increment(1);
                        tracing::info!(platform = %job.platform, account = job.account, room_id = %job.room_id, event_id = job.message.id, "relayed to the platform");
                        break;
                    }
                    Err(SendError::Transient {
                        reason,
                        retry_after,
                    }) => {
                        let wait = retry_after.unwrap_or(backoff).min(MAX_BACKOFF);
                        tracing::warn!(platform = %job.platform, account = job.account, event_id = job.message.id, reason, wait_ms = wait.as_millis() as u64, "sending to the platform failed; trying again");
                        tokio::select! {
                            _ = shutdown.cancelled() => return, // still pending: resent at the next start
                            _ = tokio::time::sleep(wait) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                    Err(SendError::Permanent(reason)) => {
                        metrics::counter!("agentbus_bridge_messages_total", "platform" => job.platform.to_string(), "direction" => "out", "outcome" => "refused")
                            .increment(1);
                        tracing::error!(platform = %job.platform, account = job.account, event_id = job.message.id, reason, "the platform refused a message");
                        self.notify_undelivered(&key, &job, &reason).await;
                        break;
                    }
                }
            }
            if let Err(e) = self.store.finish_bridged(&key).await {
                tracing::warn!(key, error = %e, "a relayed message stays pending and may be sent again after a restart");
            }
        }
    }

    /// A notice in the portal that a message did not reach the platform.
    async fn notify_undelivered(&self, key: &str, job: &OutboundJob, reason: &str) {
        let bot = self.matrix.intent(&self.config.sender_user_id());
        let content = json!({
            "msgtype": "m.notice",
            "body": format!("⚠️ Not delivered to {} ({}): {reason}", job.platform, job.account),
        });
        let txn = txn_for(&format!("{key}/undelivered"));
        if let Err(e) = bot.send_message(&job.room_id, &txn, &content).await {
            tracing::warn!(room_id = %job.room_id, error = %e, "could not post the undelivered notice");
        }
    }
}

/// `agentbus check`'s lines for the bridges: each account, and whether its platform can
/// be reached from here (a warning, not a failure: the platform may be down for a while,
/// and the account reconnects by itself).
pub async fn preflight(config: &Config) -> Vec<String> {
    let mut lines = Vec::new();
    for id in config.bridges.webhook.accounts.keys() {
        lines.push(format!(
            "✓ bridge webhook/{id}: POST /bridges/webhook/{id} on {}",
            config.bridges.listen
        ));
    }
    for (id, account) in &config.bridges.irc.accounts {
        let target = format!("{}:{}", account.server, account.port());
        let reached = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(&target),
        )
        .await;
        lines.push(match reached {
            Ok(Ok(_)) => format!(
                "✓ bridge irc/{id}: {target} accepts connections (channels: {})",
                account.channels.join(", ")
            ),
            Ok(Err(e)) => format!("⚠ bridge irc/{id}: cannot reach {target}: {e}"),
            Err(_) => format!("⚠ bridge irc/{id}: {target} did not answer within 5 s"),
        });
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_ids_follow_from_the_message_alone() {
        let a = inbound_key(&ChannelId::new("webhook"), "shop", "m-1");
        assert_eq!(a, "in/webhook/shop/m-1");
        assert_eq!(txn_for(&a), txn_for(&a.clone()));
        assert_ne!(txn_for(&a), txn_for("in/webhook/shop/m-2"));
        assert_ne!(
            txn_for(&a),
            txn_for("in/webhook/support/m-1"),
            "another account's message of the same ID is another message"
        );
    }
}
