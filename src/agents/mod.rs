//! The agent runtime: turns "agent X answers these messages" into model calls and a
//! streamed reply in the room, as the agent's own user. Knows nothing about which platform
//! a message came from.
//!
//! - [`session`]: one lane per session (agent + room + thread), queue or collect.
//! - [`memory`]: the session's stored history, fitted to a token budget.
//! - [`stream`]: the answer as a message plus throttled edits.
//! - [`tools`]: the built-in tools and the allow/deny policy.
//! - [`notices`]: everything an agent says that is not a model's answer.

pub mod memory;
pub mod notices;
pub mod session;
pub mod stream;
pub mod tools;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt;
use ruma::{
    EventId, OwnedEventId, OwnedMxcUri, OwnedRoomId, OwnedTransactionId, OwnedUserId, RoomId,
    UserId,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AgentConfig, Config, ModelRef};
use crate::llm::{ChatMessage, Collector, CompletionRequest, Delta, Image, LlmError, LlmHub, Role};
use crate::matrix::keys::HOPS_KEY;
use crate::matrix::{MatrixClient, Undelivered};
use crate::store::{HistoryEntry, SessionEntry, SessionKey, SessionRole, Stores};

pub use session::{Job, Submitted};

/// How long one typing notice lasts; it is refreshed well before it runs out.
const TYPING_TIMEOUT: Duration = Duration::from_secs(30);
const TYPING_REFRESH: Duration = Duration::from_secs(20);
/// Typing is shown only for an answer that takes longer than this to appear: a quick one
/// costs the homeserver no typing requests at all.
const TYPING_DELAY: Duration = stream::EDIT_INTERVAL;

/// How a job's answer ended, for whoever waits on it (the inbox finishes the event then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// What the agent had to say (an answer or a notice) is in the room.
    Delivered,
    /// It could not be posted for a reason that will not heal (the agent left the room, …).
    Undeliverable,
    /// Shutdown came first; the event stays journaled and is answered after the restart.
    Interrupted,
}

impl Delivery {
    fn of(result: Result<(), Undelivered>) -> Self {
        match result {
            Ok(()) => Delivery::Delivered,
            Err(Undelivered::Permanent(_)) => Delivery::Undeliverable,
            Err(Undelivered::Stopped) => Delivery::Interrupted,
        }
    }
}
/// The largest image passed to a model.
pub const MAX_IMAGE_BYTES: usize = 10 * 1024 * 1024;

/// The message an agent is answering, borrowed (for replies and notices).
#[derive(Debug, Clone, Copy)]
pub struct Trigger<'a> {
    pub room_id: &'a RoomId,
    pub event_id: &'a EventId,
    pub sender: &'a UserId,
    pub body: &'a str,
    /// Root of the thread the message was sent in, if any.
    pub thread_root: Option<&'a EventId>,
    /// Hop counter the answer carries (`io.agentbus.hops`): one more than the trigger's.
    pub hops: u32,
}

/// An image attached to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub mxc: OwnedMxcUri,
    /// `info.mimetype`, when the sender gave one.
    pub mime: Option<String>,
    /// `info.size`, when the sender gave one.
    pub size: Option<u64>,
    /// The file name.
    pub name: String,
}

/// A message an agent is to answer, owned so it can wait in a session's queue.
#[derive(Debug, Clone)]
pub struct Turn {
    pub room_id: OwnedRoomId,
    pub event_id: OwnedEventId,
    pub sender: OwnedUserId,
    /// The sender's display name (prefixed to their lines in group rooms).
    pub sender_name: String,
    /// The text (for an image: its caption, if any).
    pub body: String,
    pub image: Option<ImageRef>,
    pub thread_root: Option<OwnedEventId>,
    /// Hop counter the answer carries.
    pub hops: u32,
    /// Whether the room has more people than the sender and agents (names are prefixed).
    pub group: bool,
}

impl Turn {
    /// The borrowed view used for replies and notices.
    pub fn trigger(&self) -> Trigger<'_> {
        Trigger {
            room_id: &self.room_id,
            event_id: &self.event_id,
            sender: &self.sender,
            body: &self.body,
            thread_root: self.thread_root.as_deref(),
            hops: self.hops,
        }
    }

    /// The line stored in memory and sent to the model for this message.
    fn line(&self) -> String {
        let mut text = match &self.image {
            Some(image) if self.body.trim().is_empty() || self.body == image.name => {
                format!("[image: {}]", image.name)
            }
            Some(image) => format!("[image: {}] {}", image.name, self.body),
            None => self.body.clone(),
        };
        if self.group {
            text = format!("{}: {text}", self.sender_name);
        }
        text
    }
}

/// Why a turn ended without a (whole) answer.
#[derive(Debug)]
enum Ended {
    /// Say this to the room, as one notice.
    Notice(String),
    /// The answer could not be posted.
    Undelivered(Undelivered),
}

use Ended::Notice;

/// Runs agents: sessions, memory, model calls with tools, streamed replies.
pub struct AgentRuntime {
    config: Arc<Config>,
    matrix: Arc<MatrixClient>,
    store: Stores,
    hub: LlmHub,
    tools: tools::Tools,
    lanes: Mutex<HashMap<SessionKey, mpsc::Sender<session::Queued>>>,
    /// Lanes and typing loops run here, so shutdown waits for them.
    tracker: TaskTracker,
    /// Cancelled when shutdown's grace period is over: runs stop waiting for the model and
    /// the homeserver, and their events stay journaled.
    stop: CancellationToken,
    /// Cancelled when shutdown begins: idle lanes end instead of waiting for more work.
    closing: CancellationToken,
}

impl AgentRuntime {
    pub fn new(
        config: Arc<Config>,
        matrix: Arc<MatrixClient>,
        store: Stores,
        hub: LlmHub,
        tracker: TaskTracker,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            matrix,
            store,
            hub,
            tools: tools::Tools::new(),
            lanes: Mutex::new(HashMap::new()),
            tracker,
            stop,
            closing: CancellationToken::new(),
        })
    }

    /// Shutdown has begun: lanes finish what they hold, then end.
    pub fn close(&self) {
        self.closing.cancel();
    }

    /// Answers `turns` (one, or several collected) in their session: typing while the
    /// model thinks (if it takes a while), the answer streamed as a reply to the last one —
    /// or one notice saying why there is none.
    async fn run_turns(
        &self,
        agent: &AgentConfig,
        session: &SessionKey,
        turns: &[Turn],
    ) -> Delivery {
        let last = turns.last().expect("a run has at least one turn");
        let agent_user = self.config.user_id(&agent.id);
        let typing = self.keep_typing(&agent_user, &last.room_id);
        let outcome = self.converse(agent, &agent_user, session, turns).await;
        typing.stop(&self.matrix).await;
        match outcome {
            Ok(()) => Delivery::Delivered,
            Err(Ended::Undelivered(e)) => {
                if let Undelivered::Permanent(error) = &e {
                    tracing::error!(agent = %agent.id, room_id = %last.room_id, %error, "could not post the answer");
                }
                Delivery::of(Err(e))
            }
            Err(Notice(text)) => {
                self.notice(&agent.id, &last.trigger(), "notice", &text)
                    .await
            }
        }
    }

    /// Sends `text` as an `m.notice` reply from agent `agent_id`, waiting out a homeserver
    /// outage. The transaction ID comes from the trigger and `purpose`, so a replayed event
    /// does not notify twice.
    pub async fn notice(
        &self,
        agent_id: &str,
        trigger: &Trigger<'_>,
        purpose: &str,
        text: &str,
    ) -> Delivery {
        let agent_user = self.config.user_id(agent_id);
        let content = reply_content("m.notice", text, trigger);
        let txn = derived_txn_id(trigger.event_id, agent_id, purpose);
        let sent = self
            .matrix
            .send_message_until_delivered(&agent_user, trigger.room_id, &txn, &content, &self.stop)
            .await;
        if let Err(Undelivered::Permanent(e)) = &sent {
            tracing::error!(agent = agent_id, room_id = %trigger.room_id, purpose, error = %e, "could not send a notice");
        }
        Delivery::of(sent.map(|_| ()))
    }

    /// `!reset`: forgets the session and says so.
    async fn reset(&self, agent: &AgentConfig, session: &SessionKey, turn: &Turn) -> Delivery {
        let text = match self.store.sessions.clear_session(session).await {
            Ok(lines) => {
                tracing::info!(agent = %agent.id, room_id = %turn.room_id, lines, "session reset");
                notices::reset_done(agent, lines)
            }
            Err(e) => {
                tracing::error!(agent = %agent.id, room_id = %turn.room_id, error = %e, "could not reset the session");
                notices::reset_failed(agent)
            }
        };
        self.notice(&agent.id, &turn.trigger(), "reset", &text)
            .await
    }

    /// The model chain for these turns: the agent's own models, or — for images the main
    /// model cannot read — the image-capable ones or the agent's `image_model`.
    fn chain_for(&self, agent: &AgentConfig, images: bool) -> Result<Vec<ModelRef>, Ended> {
        let chain = agent.model_chain();
        if !images || self.hub.model(&chain[0]).accepts_images() {
            return Ok(chain);
        }
        if let Some(image_model) = agent.image_model_ref() {
            return Ok(vec![image_model]);
        }
        Err(Notice(notices::text_only_model(agent, &chain[0])))
    }

    /// Downloads a turn's image as the agent, for the model.
    async fn fetch_image(
        &self,
        agent: &AgentConfig,
        agent_user: &UserId,
        image: &ImageRef,
    ) -> Result<Image, Ended> {
        let too_big = || Notice(notices::image_too_big(agent, &image.name, MAX_IMAGE_BYTES));
        if image.size.is_some_and(|s| s > MAX_IMAGE_BYTES as u64) {
            return Err(too_big());
        }
        let (bytes, content_type) = self.matrix.download_media(agent_user, &image.mxc).await.map_err(|e| {
            tracing::warn!(agent = %agent.id, mxc = %image.mxc, error = %e, "could not download an image");
            Notice(notices::image_download_failed(agent, &image.name, &e))
        })?;
        if bytes.len() > MAX_IMAGE_BYTES {
            return Err(too_big());
        }
        let mime = image
            .mime
            .clone()
            .or(content_type)
            .filter(|m| m.starts_with("image/"))
            .unwrap_or_else(|| "image/png".to_owned());
        Ok(Image {
            mime,
            base64: base64::engine::general_purpose::STANDARD.encode(&bytes),
        })
    }

    /// The prompt: system prompt, the session's remembered lines that fit the budget, and
    /// these turns.
    async fn prompt(
        &self,
        agent: &AgentConfig,
        model: &ModelRef,
        session: &SessionKey,
        turns: &[Turn],
        images: Vec<Image>,
    ) -> Vec<ChatMessage> {
        let mut system = agent
            .system_prompt
            .clone()
            .unwrap_or_default()
            .trim()
            .to_owned();
        if turns.iter().any(|t| t.group) {
            if !system.is_empty() {
                system.push_str("\n\n");
            }
            system.push_str(&format!(
                "You are {}, one of several AI agents in a group chat. Each person's message starts with their name.",
                agent.display_name()
            ));
        }
        let question = turns.iter().map(Turn::line).collect::<Vec<_>>().join("\n");
        let current = ChatMessage::new(Role::User, question).with_images(images);
        let stored = self.store.sessions.session(session).await.unwrap_or_else(|e| {
            tracing::warn!(agent = %agent.id, error = %e, "could not read the session; answering without memory");
            Vec::new()
        });
        memory::assemble(
            &system,
            &stored,
            current,
            &agent.memory,
            &self.hub.model(model),
        )
    }

    /// One turn: model calls (with tool rounds) streamed into the room, then memory.
    async fn converse(
        &self,
        agent: &AgentConfig,
        agent_user: &UserId,
        session: &SessionKey,
        turns: &[Turn],
    ) -> Result<(), Ended> {
        let last = turns.last().expect("a run has at least one turn");
        let chain = self.chain_for(agent, turns.iter().any(|t| t.image.is_some()))?;
        let mut images = Vec::new();
        for image in turns.iter().filter_map(|t| t.image.as_ref()) {
            images.push(self.fetch_image(agent, agent_user, image).await?);
        }
        let mut messages = self.prompt(agent, &chain[0], session, turns, images).await;
        let mut mentions: Vec<String> = Vec::new();
        for turn in turns {
            if !mentions.iter().any(|m| m == turn.sender.as_str()) {
                mentions.push(turn.sender.to_string());
            }
        }
        let mut writer = stream::AnswerWriter::new(
            &self.matrix,
            Some(self.store.journal.as_ref()),
            &self.stop,
            stream::Destination {
                agent_id: &agent.id,
                agent_user,
                room_id: &last.room_id,
                reply_to: &last.event_id,
                thread_root: last.thread_root.as_deref(),
                mention: mentions,
                hops: last.hops,
            },
        )
        .await;
        let specs = self.tools.specs(&agent.tools);
        let ctx = tools::ToolContext {
            history: self.store.history.as_ref(),
            room_id: &last.room_id,
        };
        let mut cut_off: Option<LlmError> = None;
        for round in 0..agent.tools.max_iterations {
            // The last round offers no tools, so the model has to answer.
            let offer = if round + 1 < agent.tools.max_iterations {
                specs.clone()
            } else {
                Vec::new()
            };
            let request = CompletionRequest {
                model: String::new(),
                messages: messages.clone(),
                tools: offer,
                max_tokens: 0,
            };
            let started = tokio::select! {
                started = self.hub.stream(&chain, request) => started,
                _ = self.stop.cancelled() => return Err(Ended::Undelivered(Undelivered::Stopped)),
            };
            let (used, mut deltas) = match started {
                Ok(started) => started,
                Err(failure) => {
                    tracing::warn!(agent = %agent.id, room_id = %last.room_id, %failure, "no model answered");
                    if writer.text().trim().is_empty() {
                        return Err(Notice(notices::no_model_answered(agent, &failure)));
                    }
                    cut_off = failure.attempts.last().map(|a| a.error.clone());
                    break;
                }
            };
            if used != chain[0] {
                tracing::info!(agent = %agent.id, model = %used, "answered by a fallback model");
            }
            let mut collector = Collector::default();
            loop {
                let delta = tokio::select! {
                    delta = deltas.next() => delta,
                    _ = self.stop.cancelled() => {
                        return Err(Ended::Undelivered(Undelivered::Stopped));
                    }
                };
                let Some(delta) = delta else { break };
                match delta {
                    Ok(Delta::Text(text)) => {
                        writer.push(&text).await;
                        collector.push(Delta::Text(text));
                    }
                    Ok(other) => collector.push(other),
                    Err(error) => {
                        tracing::warn!(agent = %agent.id, room_id = %last.room_id, %error, "the answer broke off");
                        cut_off = Some(error);
                        break;
                    }
                }
            }
            drop(deltas);
            let completion = collector.finish();
            if cut_off.is_some() || completion.tool_calls.is_empty() {
                break;
            }
            messages.push(ChatMessage::tool_request(
                completion.text.clone(),
                completion.tool_calls.clone(),
            ));
            for call in &completion.tool_calls {
                let outcome = self.tools.call(&agent.tools, &ctx, call).await;
                tracing::info!(agent = %agent.id, room_id = %last.room_id, tool = %call.name, arguments = %call.arguments, ok = outcome.ok, result_bytes = outcome.text.len(), "tool call");
                messages.push(ChatMessage::tool_result(call, outcome.text));
            }
            writer.paragraph_break();
        }
        let answer = writer.text().trim().to_owned();
        if answer.is_empty() {
            return Err(Notice(match cut_off {
                Some(error) => notices::broke_off(agent, &error),
                None => notices::empty_answer(agent),
            }));
        }
        let parts = writer.finish().await.map_err(Ended::Undelivered)?;
        let now = crate::unix_ms();
        for part in &parts {
            let entry = HistoryEntry {
                event_id: part.event_id.clone(),
                sender: agent_user.to_owned(),
                body: part.text.clone(),
                ts: now,
                thread_root: last.thread_root.clone(),
                routed_to: Vec::new(),
            };
            if let Err(e) = self
                .store
                .history
                .append_history(&last.room_id, &entry)
                .await
            {
                tracing::warn!(room_id = %last.room_id, error = %e, "could not record the answer in history");
            }
        }
        let mut lines: Vec<SessionEntry> = turns
            .iter()
            .map(|t| SessionEntry {
                role: SessionRole::User,
                content: t.line(),
                ts: now,
            })
            .collect();
        lines.push(SessionEntry {
            role: SessionRole::Assistant,
            content: answer,
            ts: now,
        });
        if let Err(e) = self
            .store
            .sessions
            .append_session(session, &lines, agent.memory.max_messages)
            .await
        {
            tracing::warn!(agent = %agent.id, error = %e, "could not remember the turn");
        }
        match cut_off {
            Some(error) => Err(Notice(notices::cut_off(agent, &error))),
            None => Ok(()),
        }
    }

    /// Shows the agent typing after [`TYPING_DELAY`], refreshed until stopped.
    fn keep_typing(&self, agent_user: &UserId, room_id: &RoomId) -> Typing {
        let matrix = self.matrix.clone();
        let (user, room) = (agent_user.to_owned(), room_id.to_owned());
        let shown = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cancel = self.stop.child_token();
        let task = self.tracker.spawn({
            let (shown, cancel) = (shown.clone(), cancel.clone());
            let (user, room) = (user.clone(), room.clone());
            async move {
                let mut wait = TYPING_DELAY;
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    shown.store(true, std::sync::atomic::Ordering::Release);
                    if let Err(e) = matrix.set_typing(&user, &room, Some(TYPING_TIMEOUT)).await {
                        tracing::debug!(agent = %user, room_id = %room, error = %e, "could not set typing");
                    }
                    wait = TYPING_REFRESH;
                }
            }
        });
        Typing {
            task,
            cancel,
            shown,
            user,
            room,
        }
    }
}

/// A running typing loop (see [`AgentRuntime::keep_typing`]).
struct Typing {
    task: tokio::task::JoinHandle<()>,
    cancel: CancellationToken,
    shown: Arc<std::sync::atomic::AtomicBool>,
    user: OwnedUserId,
    room: OwnedRoomId,
}

impl Typing {
    /// Ends the loop and clears the notice, if one was shown.
    async fn stop(self, matrix: &MatrixClient) {
        self.cancel.cancel();
        let _ = self.task.await;
        if self.shown.load(std::sync::atomic::Ordering::Acquire)
            && let Err(e) = matrix.set_typing(&self.user, &self.room, None).await
        {
            tracing::debug!(agent = %self.user, room_id = %self.room, error = %e, "could not clear typing");
        }
    }
}

/// An `m.room.message` content replying to the trigger (in its thread when it was in one)
/// and mentioning its sender.
pub fn reply_content(msgtype: &str, body: &str, trigger: &Trigger<'_>) -> serde_json::Value {
    let relates_to = match trigger.thread_root {
        Some(root) => json!({
            "rel_type": "m.thread",
            "event_id": root,
            "is_falling_back": false,
            "m.in_reply_to": { "event_id": trigger.event_id },
        }),
        None => json!({ "m.in_reply_to": { "event_id": trigger.event_id } }),
    };
    json!({
        "msgtype": msgtype,
        "body": body,
        "m.mentions": { "user_ids": [trigger.sender] },
        "m.relates_to": relates_to,
        HOPS_KEY: trigger.hops,
    })
}

/// A transaction ID derived from what caused the send, so a retried or replayed send is
/// deduplicated by the homeserver instead of posting twice.
pub fn derived_txn_id(trigger: &EventId, agent: &str, purpose: &str) -> OwnedTransactionId {
    let digest = Sha256::digest(format!("{trigger}\0{agent}\0{purpose}").as_bytes());
    OwnedTransactionId::from(format!("agentbus-{}", &hex::encode(digest)[..32]))
}

#[cfg(test)]
mod tests {
    use ruma::{owned_event_id, owned_room_id, owned_user_id};

    use super::*;

    #[test]
    fn replies_relate_to_the_trigger_and_stay_in_its_thread() {
        let (room, alice) = (owned_room_id!("!r"), owned_user_id!("@alice:hs"));
        let (event, root) = (owned_event_id!("$e"), owned_event_id!("$root"));
        let mut trigger = Trigger {
            room_id: &room,
            event_id: &event,
            sender: &alice,
            body: "hi",
            thread_root: None,
            hops: 1,
        };
        let plain = reply_content("m.text", "hello", &trigger);
        assert_eq!(
            plain["m.relates_to"],
            json!({ "m.in_reply_to": { "event_id": "$e" } })
        );
        assert_eq!(plain["m.mentions"], json!({ "user_ids": ["@alice:hs"] }));
        assert_eq!(plain["io.agentbus.hops"], 1);
        trigger.thread_root = Some(&root);
        let threaded = reply_content("m.notice", "oops", &trigger);
        assert_eq!(threaded["msgtype"], "m.notice");
        assert_eq!(threaded["m.relates_to"]["rel_type"], "m.thread");
        assert_eq!(threaded["m.relates_to"]["event_id"], "$root");
        assert_eq!(threaded["m.relates_to"]["m.in_reply_to"]["event_id"], "$e");
    }

    #[test]
    fn transaction_ids_are_deterministic_and_distinct_per_agent_and_purpose() {
        let event = owned_event_id!("$e");
        assert_eq!(
            derived_txn_id(&event, "damon", "reply"),
            derived_txn_id(&event, "damon", "reply")
        );
        assert_ne!(
            derived_txn_id(&event, "damon", "reply"),
            derived_txn_id(&event, "coder", "reply")
        );
        assert_ne!(
            derived_txn_id(&event, "damon", "reply"),
            derived_txn_id(&event, "damon", "notice")
        );
    }
}
