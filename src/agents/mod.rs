//! The agent runtime: turns "agent X answers event E" into a model call and a reply in the
//! room, as the agent's own user. Knows nothing about which platform a message came from.

pub mod format;
pub mod tools;

use std::sync::Arc;
use std::time::Duration;

use ruma::{EventId, OwnedEventId, OwnedTransactionId, RoomId, UserId};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::config::{AgentConfig, Config};
use crate::llm::{ChatMessage, CompletionRequest, LlmError, LlmHub, Role};
use crate::matrix::{MatrixClient, MatrixError};
use crate::store::{HistoryEntry, Store};

/// How long one typing notice lasts; it is refreshed well before it runs out.
const TYPING_TIMEOUT: Duration = Duration::from_secs(30);
const TYPING_REFRESH: Duration = Duration::from_secs(20);
/// How far back in room history to look for the sender↔agent conversation.
const HISTORY_SCAN: usize = 100;

/// The message an agent is answering.
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

/// Runs agents: history, model call, reply.
pub struct AgentRuntime {
    config: Arc<Config>,
    matrix: Arc<MatrixClient>,
    store: Arc<dyn Store>,
    hub: LlmHub,
}

impl AgentRuntime {
    pub fn new(
        config: Arc<Config>,
        matrix: Arc<MatrixClient>,
        store: Arc<dyn Store>,
        hub: LlmHub,
    ) -> Self {
        Self {
            config,
            matrix,
            store,
            hub,
        }
    }

    /// Has `agent` answer `trigger` in its room: typing while the model thinks, then the
    /// answer as a reply — or, when the model fails, a short notice saying so.
    pub async fn answer(
        &self,
        agent: &AgentConfig,
        trigger: &Trigger<'_>,
    ) -> Result<OwnedEventId, MatrixError> {
        let agent_user = self.config.user_id(&agent.id);
        let typing = self.keep_typing(&agent_user, trigger.room_id);
        let outcome = self.think(agent, &agent_user, trigger).await;
        typing.abort();
        if let Err(e) = self
            .matrix
            .set_typing(&agent_user, trigger.room_id, None)
            .await
        {
            tracing::debug!(agent = %agent.id, room_id = %trigger.room_id, error = %e, "could not clear typing");
        }

        let (content, purpose, answer) = match outcome {
            Ok(text) => (reply_content("m.text", &text, trigger), "reply", Some(text)),
            Err(error) => {
                tracing::warn!(agent = %agent.id, room_id = %trigger.room_id, event_id = %trigger.event_id, %error, "model call failed");
                let notice = format!("⚠️ {} could not answer: {error}", agent.display_name());
                (reply_content("m.notice", &notice, trigger), "notice", None)
            }
        };
        let txn_id = derived_txn_id(trigger.event_id, &agent.id, purpose);
        let event_id = self.matrix.send_message(&agent_user, trigger.room_id, &txn_id, &content).await.inspect_err(|e| {
            tracing::error!(agent = %agent.id, room_id = %trigger.room_id, error = %e, "could not send the answer");
        })?;
        if let Some(text) = answer {
            let entry = HistoryEntry {
                event_id: event_id.clone(),
                sender: agent_user,
                body: text,
                ts: crate::unix_ms(),
                thread_root: trigger.thread_root.map(ToOwned::to_owned),
                routed_to: Vec::new(),
            };
            if let Err(e) = self.store.append_history(trigger.room_id, &entry) {
                tracing::warn!(room_id = %trigger.room_id, error = %e, "could not record the answer in history");
            }
        }
        Ok(event_id)
    }

    /// Builds the prompt from the recent sender↔agent conversation and asks the model.
    async fn think(
        &self,
        agent: &AgentConfig,
        agent_user: &UserId,
        trigger: &Trigger<'_>,
    ) -> Result<String, LlmError> {
        let history = self.store.recent_history(trigger.room_id, HISTORY_SCAN).unwrap_or_else(|e| {
            tracing::warn!(room_id = %trigger.room_id, error = %e, "could not read history; answering without context");
            Vec::new()
        });
        let request = CompletionRequest {
            model: String::new(),
            messages: build_messages(agent, agent_user, trigger, &history),
            tools: Vec::new(),
            max_tokens: 0,
        };
        match self.hub.stream(&agent.model_chain(), request).await {
            Ok((_, stream)) => Ok(crate::llm::collect(stream).await?.text),
            Err(failure) => Err(failure
                .attempts
                .last()
                .map(|a| a.error.clone())
                .unwrap_or(LlmError::BadResponse("no model configured".into()))),
        }
    }

    /// Shows the agent typing, refreshed until the returned task is aborted.
    fn keep_typing(&self, agent_user: &UserId, room_id: &RoomId) -> tokio::task::JoinHandle<()> {
        let matrix = self.matrix.clone();
        let (user, room) = (agent_user.to_owned(), room_id.to_owned());
        tokio::spawn(async move {
            loop {
                if let Err(e) = matrix.set_typing(&user, &room, Some(TYPING_TIMEOUT)).await {
                    tracing::debug!(agent = %user, room_id = %room, error = %e, "could not set typing");
                }
                tokio::time::sleep(TYPING_REFRESH).await;
            }
        })
    }
}

/// System prompt, then the last `context_messages` lines between the sender and the agent
/// (oldest first, the trigger itself excluded), then the trigger.
pub fn build_messages(
    agent: &AgentConfig,
    agent_user: &UserId,
    trigger: &Trigger<'_>,
    history: &[HistoryEntry],
) -> Vec<ChatMessage> {
    let mut messages = Vec::new();
    if let Some(prompt) = agent
        .system_prompt
        .as_deref()
        .filter(|p| !p.trim().is_empty())
    {
        messages.push(ChatMessage::new(Role::System, prompt));
    }
    let context: Vec<&HistoryEntry> = history
        .iter()
        .filter(|e| {
            e.event_id != trigger.event_id && (e.sender == trigger.sender || e.sender == agent_user)
        })
        .collect();
    let skip = context.len().saturating_sub(agent.memory.max_messages);
    for entry in &context[skip..] {
        let role = if entry.sender == agent_user {
            Role::Assistant
        } else {
            Role::User
        };
        messages.push(ChatMessage::new(role, entry.body.clone()));
    }
    messages.push(ChatMessage::new(Role::User, trigger.body));
    messages
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
        crate::inbox::HOPS_KEY: trigger.hops,
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
    use ruma::{OwnedUserId, owned_event_id, owned_room_id, owned_user_id};

    use super::*;

    fn agent() -> AgentConfig {
        serde_yaml::from_str(
            "{ id: damon, provider: echo, system_prompt: You are Damon., memory: { max_messages: 2 } }",
        )
        .unwrap()
    }

    fn line(id: &str, sender: &OwnedUserId, body: &str) -> HistoryEntry {
        HistoryEntry {
            event_id: EventId::parse(id).unwrap(),
            sender: sender.clone(),
            body: body.into(),
            ts: 0,
            thread_root: None,
            routed_to: Vec::new(),
        }
    }

    #[test]
    fn context_is_the_last_lines_between_sender_and_agent() {
        let (alice, bob, damon) = (
            owned_user_id!("@alice:hs"),
            owned_user_id!("@bob:hs"),
            owned_user_id!("@damon:hs"),
        );
        let room = owned_room_id!("!r");
        let now = owned_event_id!("$now");
        let history = vec![
            line("$1", &alice, "old question"),
            line("$2", &damon, "old answer"),
            line("$3", &bob, "bob chatter"),
            line("$4", &alice, "second question"),
            line("$5", &damon, "second answer"),
            line("$now", &alice, "the question"),
        ];
        let trigger = Trigger {
            room_id: &room,
            event_id: &now,
            sender: &alice,
            body: "the question",
            thread_root: None,
            hops: 1,
        };
        let messages = build_messages(&agent(), &damon, &trigger, &history);
        assert_eq!(
            messages,
            vec![
                ChatMessage::new(Role::System, "You are Damon."),
                ChatMessage::new(Role::User, "second question"),
                ChatMessage::new(Role::Assistant, "second answer"),
                ChatMessage::new(Role::User, "the question"),
            ]
        );
    }

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
