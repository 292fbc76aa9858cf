//! An answer as it streams into a room: once the answer has taken longer than the edit
//! interval, what there is so far posts a message, later text edits it (`m.replace`) at most
//! about once an interval, and the last edit carries the whole answer. An answer that is
//! done within the first interval is posted once, whole, without edits. An answer too long
//! for one event continues in further messages, split between paragraphs (see
//! [`crate::render::split_answer`]).
//!
//! Exactly once across crashes: every send has a transaction ID derived from what it is —
//! a new part from the answer and its index, an edit from a digest of the content it sets —
//! and every part posted is recorded in the store, so a run replayed after a crash edits
//! the messages the first run left behind instead of posting again, and its final edit can
//! never collide with an earlier partial one.

use ruma::{EventId, OwnedEventId, RoomId, UserId};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::AgentId;
use crate::matrix::keys::{HOPS_KEY, STREAMING_KEY};
use crate::matrix::{MatrixClient, Undelivered};
use crate::render::{MAX_PART_BYTES, formatted_part, split_answer};
use crate::store::JournalStore;

/// The least time between two edits of a streaming answer (Synapse rate-limits senders,
/// and clients re-render every edit); also how long an answer may take before its first
/// words are shown.
pub const EDIT_INTERVAL: Duration = Duration::from_secs(1);

/// Where an answer goes and what it answers.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub agent_id: AgentId,
    pub agent_user: &'a UserId,
    pub room_id: &'a RoomId,
    /// What the answer's transaction IDs and sent-part records derive from: the message
    /// answered (the last one, for a collected turn).
    pub origin: &'a EventId,
    /// Keeps two runs of the agent from the same origin apart (see
    /// [`Reason::scope`](super::Reason)); empty for the answer to a room event.
    pub scope: &'a str,
    pub relation: Relation<'a>,
    /// People to mention in the first part.
    pub mention: Vec<String>,
    pub hops: u32,
}

/// How the answer's first message relates to the room.
#[derive(Debug, Clone, Copy)]
pub enum Relation<'a> {
    /// A reply to `to`, in thread `thread_root` when it is in one.
    Reply {
        to: &'a EventId,
        thread_root: Option<&'a EventId>,
    },
    /// A message in the thread rooted at `root`, replying to nothing in it.
    Thread { root: &'a EventId },
    /// A top-level message.
    None,
}

impl Target<'_> {
    /// The key this answer's sends and records derive from: what it answers, and who.
    fn answer_key(&self) -> String {
        if self.scope.is_empty() {
            format!("{}\u{1f}{}", self.origin, self.agent_id)
        } else {
            format!("{}\u{1f}{}\u{1f}{}", self.origin, self.agent_id, self.scope)
        }
    }

    /// The transaction ID of the send for `purpose`.
    fn txn_id(&self, purpose: &str) -> ruma::OwnedTransactionId {
        if self.scope.is_empty() {
            super::derived_txn_id(self.origin, &self.agent_id, purpose)
        } else {
            let scoped = format!("{}\u{1f}{purpose}", self.scope);
            super::derived_txn_id(self.origin, &self.agent_id, &scoped)
        }
    }

    /// The thread the answer's messages are in, if any.
    fn thread_root(&self) -> Option<&EventId> {
        match self.relation {
            Relation::Reply { thread_root, .. } => thread_root,
            Relation::Thread { root } => Some(root),
            Relation::None => None,
        }
    }
}

/// One message of the answer as it was last sent.
#[derive(Debug, Clone)]
pub struct SentPart {
    pub event_id: OwnedEventId,
    pub text: String,
    /// Whether it was last sent marked as still streaming.
    streaming: bool,
}

/// Streams one answer into the room.
pub struct AnswerWriter<'a> {
    matrix: &'a MatrixClient,
    /// Where posted parts are recorded (none in unit tests of the wire shape).
    store: Option<&'a dyn JournalStore>,
    stop: &'a CancellationToken,
    to: Target<'a>,
    text: String,
    parts: Vec<SentPart>,
    started: Instant,
    last_send: Option<Instant>,
    interval: Duration,
}

impl<'a> AnswerWriter<'a> {
    /// A writer for one answer. Parts an earlier run of the same answer posted (found in
    /// `store`) are taken over and edited. `stop` ends the wait for a homeserver that is
    /// down (shutdown).
    pub async fn new(
        matrix: &'a MatrixClient,
        store: Option<&'a dyn JournalStore>,
        stop: &'a CancellationToken,
        to: Target<'a>,
    ) -> Self {
        let earlier = match store {
            Some(store) => store.sent_parts(&to.answer_key()).await.unwrap_or_else(|e| {
                tracing::warn!(agent = to.agent_id.as_str(), error = %e, "cannot read the messages an earlier run posted");
                Vec::new()
            }),
            None => Vec::new(),
        };
        let parts = earlier
            .into_iter()
            .map(|event_id| SentPart {
                event_id,
                // Unknown: whatever the room shows is replaced by the next send.
                text: String::new(),
                streaming: true,
            })
            .collect::<Vec<_>>();
        if !parts.is_empty() {
            tracing::info!(agent = to.agent_id.as_str(), room_id = %to.room_id, parts = parts.len(), "taking over an answer an earlier run had started");
        }
        Self {
            matrix,
            store,
            stop,
            to,
            text: String::new(),
            parts,
            started: Instant::now(),
            last_send: None,
            interval: EDIT_INTERVAL,
        }
    }

    /// The answer so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether anything of the answer is in the room yet.
    pub fn posted(&self) -> bool {
        !self.parts.is_empty()
    }

    /// Appends streamed text; posts or edits once the answer has run for the edit
    /// interval and then at most once an interval. These sends are best effort: one that
    /// fails (the homeserver is down) is superseded by the next, and the final one is
    /// delivered come what may.
    pub async fn push(&mut self, delta: &str) {
        self.text.push_str(delta);
        let since = self.last_send.unwrap_or(self.started);
        if since.elapsed() >= self.interval && !self.text.trim().is_empty() {
            if let Err(e) = self.flush(false).await {
                tracing::debug!(agent = self.to.agent_id.as_str(), room_id = %self.to.room_id, error = %e, "a streaming update was not sent; the next one catches up");
            }
            self.last_send = Some(Instant::now());
        }
    }

    /// Separates what comes next (after a tool round) from what was said.
    pub fn paragraph_break(&mut self) {
        if !self.text.trim().is_empty() && !self.text.ends_with("\n\n") {
            self.text.push_str("\n\n");
        }
    }

    /// Ends the answer with `line` as a paragraph of its own, sending nothing yet: the
    /// final send carries it.
    pub fn append_line(&mut self, line: &str) {
        self.text = self.text.trim_end().to_owned();
        self.paragraph_break();
        self.text.push_str(line);
    }

    /// Sends the whole answer (the final edit, or the only message) and returns every
    /// message it is in. Waits out a homeserver outage.
    pub async fn finish(mut self) -> Result<Vec<SentPart>, Undelivered> {
        self.text = self.text.trim_end().to_owned();
        if !self.text.is_empty() {
            self.flush(true).await?;
        }
        Ok(self.parts)
    }

    /// Brings the room up to date with `self.text`; `done` sends it as final, retrying
    /// until the homeserver takes it.
    async fn flush(&mut self, done: bool) -> Result<(), Undelivered> {
        let wanted = split_answer(self.text.trim_end(), MAX_PART_BYTES);
        let last = wanted.len() - 1;
        for (i, part) in wanted.iter().enumerate() {
            // Only the last part can still grow.
            let streaming = !done && i == last;
            let (txn, content) = match self.parts.get(i) {
                Some(sent) if sent.text == *part && sent.streaming == streaming => continue,
                Some(sent) => {
                    let content = self.edit_content(&sent.event_id, part, i, streaming);
                    // From the content it sets: a replayed run's final edit differs from
                    // every partial edit before it, and an identical resend is deduplicated.
                    let digest = Sha256::digest(content.to_string().as_bytes());
                    let purpose = format!("part{i}-edit-{}", &hex::encode(digest)[..16]);
                    (self.to.txn_id(&purpose), content)
                }
                None => (
                    self.to.txn_id(&format!("part{i}")),
                    self.new_content(part, i, streaming),
                ),
            };
            let event_id = if done {
                self.matrix
                    .intent(self.to.agent_user)
                    .send_message_until_delivered(self.to.room_id, &txn, &content, self.stop)
                    .await?
            } else {
                self.matrix
                    .intent(self.to.agent_user)
                    .send_message_once(self.to.room_id, &txn, &content)
                    .await
                    .map_err(Undelivered::Permanent)?
            };
            match self.parts.get_mut(i) {
                Some(sent) => {
                    sent.text = part.clone();
                    sent.streaming = streaming;
                }
                None => {
                    if let Some(store) = self.store
                        && let Err(e) = store
                            .record_sent_part(&self.to.answer_key(), i, &event_id, crate::unix_ms())
                            .await
                    {
                        tracing::warn!(agent = self.to.agent_id.as_str(), error = %e, "could not record a posted message");
                    }
                    self.parts.push(SentPart {
                        event_id,
                        text: part.clone(),
                        streaming,
                    });
                }
            }
        }
        Ok(())
    }

    /// The message content of part `index` with `text`, without relations.
    fn body(&self, text: &str, index: usize, streaming: bool) -> Value {
        let mut content = json!({ "msgtype": "m.text", "body": text });
        if streaming {
            content[STREAMING_KEY] = json!(true);
        }
        if let Some(html) = formatted_part(text) {
            content["format"] = json!("org.matrix.custom.html");
            content["formatted_body"] = json!(html);
        }
        content["m.mentions"] = if index == 0 {
            json!({ "user_ids": self.to.mention })
        } else {
            json!({})
        };
        content
    }

    /// A new message: the first part relates as the target says (a reply to the trigger,
    /// in its thread when it was in one); later parts follow in the same thread or
    /// timeline.
    fn new_content(&self, text: &str, index: usize, streaming: bool) -> Value {
        let mut content = self.body(text, index, streaming);
        let relates_to = match (self.to.relation, index) {
            (
                Relation::Reply {
                    to,
                    thread_root: Some(root),
                },
                0,
            ) => json!({
                "rel_type": "m.thread", "event_id": root, "is_falling_back": false,
                "m.in_reply_to": { "event_id": to },
            }),
            // In a thread without replying to anyone: the reply is only the fallback for
            // clients without threads (spec: threading, fallback for unthreaded clients).
            (Relation::Thread { root }, 0) => json!({
                "rel_type": "m.thread", "event_id": root, "is_falling_back": true,
                "m.in_reply_to": { "event_id": root },
            }),
            (
                Relation::Reply {
                    to,
                    thread_root: None,
                },
                0,
            ) => {
                json!({ "m.in_reply_to": { "event_id": to } })
            }
            (_, 0) => Value::Null,
            (_, _) => match self.to.thread_root() {
                Some(root) => json!({
                    "rel_type": "m.thread", "event_id": root, "is_falling_back": true,
                    "m.in_reply_to": { "event_id": self.parts.last().map(|p| &p.event_id) },
                }),
                None => Value::Null,
            },
        };
        if !relates_to.is_null() {
            content["m.relates_to"] = relates_to;
        }
        content[HOPS_KEY] = json!(self.to.hops);
        content
    }

    /// An edit replacing `event_id`'s content with `text` (spec: event replacements). The
    /// fallback body is `* text`; mentions live in `m.new_content` so nobody is pinged
    /// again.
    fn edit_content(&self, event_id: &EventId, text: &str, index: usize, streaming: bool) -> Value {
        let new_content = self.body(text, index, streaming);
        let mut content = json!({
            "msgtype": "m.text",
            "body": format!("* {text}"),
            "m.new_content": new_content,
            "m.relates_to": { "rel_type": "m.replace", "event_id": event_id },
            "m.mentions": {},
        });
        if let Some(html) = new_content.get("formatted_body").and_then(Value::as_str) {
            content["format"] = json!("org.matrix.custom.html");
            content["formatted_body"] = json!(format!("* {html}"));
        }
        content[HOPS_KEY] = json!(self.to.hops);
        content
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::Json;
    use axum::extract::Path;
    use axum::routing::put;
    use ruma::{owned_event_id, owned_room_id, owned_user_id};

    use super::*;
    use crate::matrix::RetryPolicy;

    /// A homeserver that records every message sent and hands out event IDs.
    async fn sink() -> (Arc<MatrixClient>, Arc<Mutex<Vec<Value>>>) {
        let sent: Arc<Mutex<Vec<Value>>> = Arc::default();
        let record = sent.clone();
        let app = axum::Router::new().route(
            "/_matrix/client/v3/rooms/{room}/send/{kind}/{txn}",
            put(
                move |Path((_, _, txn)): Path<(String, String, String)>,
                      Json(content): Json<Value>| {
                    let record = record.clone();
                    async move {
                        let mut sent = record.lock().unwrap();
                        sent.push(json!({ "txn": txn, "content": content }));
                        Json(json!({ "event_id": format!("$e{}", sent.len()) }))
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (MatrixClient::new(&url, "as", RetryPolicy::default()), sent)
    }

    fn destination<'a>(
        agent: &'a ruma::UserId,
        room: &'a ruma::RoomId,
        question: &'a ruma::EventId,
        thread_root: Option<&'a ruma::EventId>,
    ) -> Target<'a> {
        Target {
            agent_id: AgentId::parse("damon").unwrap(),
            agent_user: agent,
            room_id: room,
            origin: question,
            scope: "",
            relation: Relation::Reply {
                to: question,
                thread_root,
            },
            mention: vec!["@alice:hs".into()],
            hops: 1,
        }
    }

    #[tokio::test]
    async fn an_answer_done_within_the_interval_is_posted_once_without_edits() {
        let (matrix, sent) = sink().await;
        let (agent, room, question) = (
            owned_user_id!("@damon:hs"),
            owned_room_id!("!r"),
            owned_event_id!("$q"),
        );
        let stop = CancellationToken::new();
        let mut writer = AnswerWriter::new(
            &matrix,
            None,
            &stop,
            destination(&agent, &room, &question, None),
        )
        .await;
        writer.interval = Duration::from_secs(3600);
        writer.push("Hello ").await;
        writer.push("**world**").await;
        assert!(
            sent.lock().unwrap().is_empty(),
            "nothing is shown before the interval"
        );
        let parts = writer.finish().await.unwrap();
        assert_eq!(parts.len(), 1);
        let sent = sent.lock().unwrap();
        assert_eq!(sent.len(), 1, "one request: the whole answer");
        let only = &sent[0]["content"];
        assert_eq!(only["body"], "Hello **world**");
        assert!(only.get(STREAMING_KEY).is_none());
        assert_eq!(only["m.relates_to"]["m.in_reply_to"]["event_id"], "$q");
        assert_eq!(only["m.mentions"]["user_ids"], json!(["@alice:hs"]));
    }

    #[tokio::test(start_paused = true)]
    async fn first_words_post_after_the_interval_later_words_edit_and_the_final_edit_is_whole() {
        let (matrix, sent) = sink().await;
        let (agent, room, question) = (
            owned_user_id!("@damon:hs"),
            owned_room_id!("!r"),
            owned_event_id!("$q"),
        );
        let stop = CancellationToken::new();
        let mut writer = AnswerWriter::new(
            &matrix,
            None,
            &stop,
            destination(&agent, &room, &question, None),
        )
        .await;
        writer.push("Hello ").await;
        assert!(sent.lock().unwrap().is_empty());
        tokio::time::advance(EDIT_INTERVAL).await;
        writer.push("**world**").await;
        writer.push(", again.").await;
        assert_eq!(sent.lock().unwrap().len(), 1, "edits wait for the interval");
        let parts = writer.finish().await.unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].text, "Hello **world**, again.");

        let sent = sent.lock().unwrap();
        let (first, last) = (&sent[0]["content"], &sent[1]["content"]);
        assert_eq!(first["body"], "Hello **world**");
        assert_eq!(first[STREAMING_KEY], true);
        assert_eq!(first["m.relates_to"]["m.in_reply_to"]["event_id"], "$q");
        assert_eq!(first["m.mentions"]["user_ids"], json!(["@alice:hs"]));
        assert_eq!(first["io.agentbus.hops"], 1);
        assert_eq!(
            last["m.relates_to"],
            json!({"rel_type": "m.replace", "event_id": "$e1"})
        );
        assert_eq!(last["body"], "* Hello **world**, again.");
        assert_eq!(last["m.mentions"], json!({}));
        let new = &last["m.new_content"];
        assert_eq!(new["body"], "Hello **world**, again.");
        assert!(
            new.get(STREAMING_KEY).is_none(),
            "the final edit is not streaming"
        );
        assert_eq!(new["m.mentions"]["user_ids"], json!(["@alice:hs"]));
        assert_ne!(sent[0]["txn"], sent[1]["txn"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replayed_run_edits_the_message_of_the_crashed_one_with_fresh_transaction_ids() {
        let (matrix, sent) = sink().await;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open(&crate::config::StoreConfig {
            path: dir.path().to_owned(),
            ..Default::default()
        })
        .unwrap();
        let (agent, room, question) = (
            owned_user_id!("@damon:hs"),
            owned_room_id!("!r"),
            owned_event_id!("$q"),
        );
        let stop = CancellationToken::new();
        // The first run posts and edits, then "crashes" (is dropped) before finishing.
        let mut first = AnswerWriter::new(
            &matrix,
            Some(store.journal.as_ref()),
            &stop,
            destination(&agent, &room, &question, None),
        )
        .await;
        tokio::time::advance(EDIT_INTERVAL).await;
        first.push("The answer ").await;
        tokio::time::advance(EDIT_INTERVAL).await;
        first.push("is").await;
        drop(first);
        let partial_txns: Vec<Value> = sent
            .lock()
            .unwrap()
            .iter()
            .map(|s| s["txn"].clone())
            .collect();
        assert_eq!(partial_txns.len(), 2);

        // The replay streams the same words again and finishes.
        let mut replay = AnswerWriter::new(
            &matrix,
            Some(store.journal.as_ref()),
            &stop,
            destination(&agent, &room, &question, None),
        )
        .await;
        tokio::time::advance(EDIT_INTERVAL).await;
        replay.push("The answer ").await;
        replay.push("is 42.").await;
        let parts = replay.finish().await.unwrap();
        assert_eq!(
            parts[0].event_id, "$e1",
            "the replay edits the first run's message"
        );
        let sent = sent.lock().unwrap();
        let news = sent
            .iter()
            .filter(|s| s["content"]["m.relates_to"]["rel_type"] != "m.replace")
            .count();
        assert_eq!(news, 1, "no second message");
        let last = sent.last().unwrap();
        assert_eq!(
            last["content"]["m.new_content"]["body"],
            "The answer is 42."
        );
        assert!(
            last["content"]["m.new_content"]
                .get(STREAMING_KEY)
                .is_none()
        );
        assert!(
            !partial_txns.contains(&last["txn"]),
            "the final edit's transaction ID is new, so the homeserver cannot swallow it"
        );
    }

    #[tokio::test]
    async fn a_thread_post_or_new_message_replies_to_nobody_and_a_scope_gets_its_own_ids() {
        let (matrix, sent) = sink().await;
        let (agent, room, question, root) = (
            owned_user_id!("@damon:hs"),
            owned_room_id!("!r"),
            owned_event_id!("$q"),
            owned_event_id!("$root"),
        );
        let stop = CancellationToken::new();
        let post = |scope, relation| Target {
            agent_id: AgentId::parse("damon").unwrap(),
            agent_user: &agent,
            room_id: &room,
            origin: &question,
            scope,
            relation,
            mention: Vec::new(),
            hops: 2,
        };
        for target in [
            post(
                "",
                Relation::Reply {
                    to: &question,
                    thread_root: None,
                },
            ),
            post("step:merge", Relation::Thread { root: &root }),
            post("schedule:daily", Relation::None),
        ] {
            let mut writer = AnswerWriter::new(&matrix, None, &stop, target).await;
            writer.push("Done.").await;
            writer.finish().await.unwrap();
        }
        let sent = sent.lock().unwrap();
        let (reply, thread, top) = (&sent[0], &sent[1], &sent[2]);
        assert_eq!(
            reply["content"]["m.relates_to"]["m.in_reply_to"]["event_id"],
            "$q"
        );
        assert_eq!(
            thread["content"]["m.relates_to"],
            json!({"rel_type": "m.thread", "event_id": "$root", "is_falling_back": true,
                   "m.in_reply_to": {"event_id": "$root"}})
        );
        assert!(
            top["content"].get("m.relates_to").is_none(),
            "{}",
            top["content"]
        );
        assert_eq!(top["content"]["m.mentions"], json!({"user_ids": []}));
        assert_eq!(
            reply["txn"],
            json!(
                crate::agents::derived_txn_id(
                    &question,
                    &AgentId::parse("damon").unwrap(),
                    "part0"
                )
                .as_str()
            ),
            "an answer to a room event keeps the transaction ID it always had"
        );
        assert_ne!(reply["txn"], thread["txn"]);
        assert_ne!(thread["txn"], top["txn"]);
    }

    #[tokio::test]
    async fn a_long_answer_continues_in_a_second_message_in_the_thread() {
        let (matrix, sent) = sink().await;
        let (agent, room, question, root) = (
            owned_user_id!("@damon:hs"),
            owned_room_id!("!r"),
            owned_event_id!("$q"),
            owned_event_id!("$root"),
        );
        let stop = CancellationToken::new();
        let mut writer = AnswerWriter::new(
            &matrix,
            None,
            &stop,
            destination(&agent, &room, &question, Some(&root)),
        )
        .await;
        // Three paragraphs of a third each: one too many for one message.
        let paragraph = "word ".repeat(MAX_PART_BYTES / 15);
        writer.push(&paragraph).await;
        writer.paragraph_break();
        writer.push(&paragraph).await;
        writer.paragraph_break();
        writer.push(&paragraph).await;
        let parts = writer.finish().await.unwrap();
        assert_eq!(
            parts.len(),
            2,
            "two paragraphs fit the first message, the third goes on"
        );
        let sent = sent.lock().unwrap();
        let news: Vec<&Value> = sent
            .iter()
            .map(|s| &s["content"])
            .filter(|c| c["m.relates_to"]["rel_type"] != "m.replace")
            .collect();
        assert_eq!(news.len(), 2);
        assert_eq!(news[0]["m.relates_to"]["rel_type"], "m.thread");
        assert_eq!(news[0]["m.relates_to"]["m.in_reply_to"]["event_id"], "$q");
        assert_eq!(news[1]["m.relates_to"]["rel_type"], "m.thread");
        assert_eq!(news[1]["m.relates_to"]["event_id"], "$root");
        assert_eq!(
            news[1]["m.mentions"],
            json!({}),
            "only the first part pings"
        );
        for part in &parts {
            assert!(part.text.len() <= MAX_PART_BYTES);
        }
    }
}
