//! An answer as it streams into a room: the first text posts a message, later text edits
//! it (`m.replace`) at most about once a second, the last edit carries the whole answer.
//! An answer too long for one event continues in further messages, split between
//! paragraphs (see [`super::format::split_answer`]).

use std::time::{Duration, Instant};

use ruma::{EventId, OwnedEventId, RoomId, UserId};
use serde_json::{Value, json};

use super::format::{MAX_PART_BYTES, formatted_part, split_answer};
use crate::matrix::{MatrixClient, MatrixError};

/// Content key marking a message whose text is still streaming; the final edit drops it,
/// so bridges and bots can wait for the whole answer.
pub const STREAMING_KEY: &str = "io.agentbus.streaming";

/// The least time between two edits of a streaming answer (Synapse rate-limits senders,
/// and clients re-render every edit).
pub const EDIT_INTERVAL: Duration = Duration::from_secs(1);

/// Where an answer goes and what it answers.
#[derive(Debug, Clone)]
pub struct Destination<'a> {
    pub agent_id: &'a str,
    pub agent_user: &'a UserId,
    pub room_id: &'a RoomId,
    /// The message answered (the last one, for a collected turn).
    pub reply_to: &'a EventId,
    pub thread_root: Option<&'a EventId>,
    /// People to mention in the first part.
    pub mention: Vec<String>,
    pub hops: u32,
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
    to: Destination<'a>,
    text: String,
    parts: Vec<SentPart>,
    last_send: Option<Instant>,
    edits: u32,
    interval: Duration,
}

impl<'a> AnswerWriter<'a> {
    pub fn new(matrix: &'a MatrixClient, to: Destination<'a>) -> Self {
        Self {
            matrix,
            to,
            text: String::new(),
            parts: Vec::new(),
            last_send: None,
            edits: 0,
            interval: EDIT_INTERVAL,
        }
    }

    /// The answer so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Appends streamed text; posts or edits when the first text arrives or the last send
    /// is older than the edit interval.
    pub async fn push(&mut self, delta: &str) -> Result<(), MatrixError> {
        self.text.push_str(delta);
        let due = self
            .last_send
            .is_none_or(|at| at.elapsed() >= self.interval);
        if due && !self.text.trim().is_empty() {
            self.flush(false).await?;
        }
        Ok(())
    }

    /// Separates what comes next (after a tool round) from what was said.
    pub fn paragraph_break(&mut self) {
        if !self.text.trim().is_empty() && !self.text.ends_with("\n\n") {
            self.text.push_str("\n\n");
        }
    }

    /// Sends the whole answer (the final edit) and returns every message it is in.
    pub async fn finish(mut self) -> Result<Vec<SentPart>, MatrixError> {
        self.text = self.text.trim_end().to_owned();
        if !self.text.is_empty() {
            self.flush(true).await?;
        }
        Ok(self.parts)
    }

    /// Brings the room up to date with `self.text`; `done` sends it as final.
    async fn flush(&mut self, done: bool) -> Result<(), MatrixError> {
        let wanted = split_answer(self.text.trim_end(), MAX_PART_BYTES);
        let last = wanted.len() - 1;
        for (i, part) in wanted.iter().enumerate() {
            // Only the last part can still grow.
            let streaming = !done && i == last;
            match self.parts.get(i) {
                Some(sent) if sent.text == *part && sent.streaming == streaming => {}
                Some(sent) => {
                    let event_id = sent.event_id.clone();
                    self.edits += 1;
                    let txn = super::derived_txn_id(
                        self.to.reply_to,
                        self.to.agent_id,
                        &format!("part{i}-edit{}", self.edits),
                    );
                    let content = self.edit_content(&event_id, part, i, streaming);
                    self.matrix
                        .send_message(self.to.agent_user, self.to.room_id, &txn, &content)
                        .await?;
                    self.parts[i].text = part.clone();
                    self.parts[i].streaming = streaming;
                }
                None => {
                    let txn = super::derived_txn_id(
                        self.to.reply_to,
                        self.to.agent_id,
                        &format!("part{i}"),
                    );
                    let content = self.new_content(part, i, streaming);
                    let event_id = self
                        .matrix
                        .send_message(self.to.agent_user, self.to.room_id, &txn, &content)
                        .await?;
                    self.parts.push(SentPart {
                        event_id,
                        text: part.clone(),
                        streaming,
                    });
                }
            }
        }
        self.last_send = Some(Instant::now());
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

    /// A new message: the first part replies to the trigger (in its thread when it was in
    /// one); later parts follow in the same thread or timeline.
    fn new_content(&self, text: &str, index: usize, streaming: bool) -> Value {
        let mut content = self.body(text, index, streaming);
        let relates_to = match (self.to.thread_root, index) {
            (Some(root), 0) => json!({
                "rel_type": "m.thread", "event_id": root, "is_falling_back": false,
                "m.in_reply_to": { "event_id": self.to.reply_to },
            }),
            (Some(root), _) => json!({
                "rel_type": "m.thread", "event_id": root, "is_falling_back": true,
                "m.in_reply_to": { "event_id": self.parts.last().map(|p| &p.event_id) },
            }),
            (None, 0) => json!({ "m.in_reply_to": { "event_id": self.to.reply_to } }),
            (None, _) => Value::Null,
        };
        if !relates_to.is_null() {
            content["m.relates_to"] = relates_to;
        }
        content[crate::inbox::HOPS_KEY] = json!(self.to.hops);
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
        content[crate::inbox::HOPS_KEY] = json!(self.to.hops);
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

    #[tokio::test]
    async fn first_words_post_later_words_edit_and_the_final_edit_is_whole() {
        let (matrix, sent) = sink().await;
        let (agent, room, question) = (
            owned_user_id!("@damon:hs"),
            owned_room_id!("!r"),
            owned_event_id!("$q"),
        );
        let mut writer = AnswerWriter::new(
            &matrix,
            Destination {
                agent_id: "damon",
                agent_user: &agent,
                room_id: &room,
                reply_to: &question,
                thread_root: None,
                mention: vec!["@alice:hs".into()],
                hops: 1,
            },
        );
        writer.interval = Duration::from_secs(3600);
        writer.push("Hello ").await.unwrap();
        writer.push("**world**").await.unwrap();
        writer.push(", again.").await.unwrap();
        assert_eq!(sent.lock().unwrap().len(), 1, "edits wait for the interval");
        let parts = writer.finish().await.unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].text, "Hello **world**, again.");

        let sent = sent.lock().unwrap();
        let (first, last) = (&sent[0]["content"], &sent[1]["content"]);
        assert_eq!(first["body"], "Hello");
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

    #[tokio::test]
    async fn a_long_answer_continues_in_a_second_message_in_the_thread() {
        let (matrix, sent) = sink().await;
        let (agent, room, question, root) = (
            owned_user_id!("@damon:hs"),
            owned_room_id!("!r"),
            owned_event_id!("$q"),
            owned_event_id!("$root"),
        );
        let mut writer = AnswerWriter::new(
            &matrix,
            Destination {
                agent_id: "damon",
                agent_user: &agent,
                room_id: &room,
                reply_to: &question,
                thread_root: Some(&root),
                mention: vec!["@alice:hs".into()],
                hops: 1,
            },
        );
        // Three paragraphs of a third each: one too many for one message.
        let paragraph = "word ".repeat(MAX_PART_BYTES / 15);
        writer.push(&paragraph).await.unwrap();
        writer.paragraph_break();
        writer.push(&paragraph).await.unwrap();
        writer.paragraph_break();
        writer.push(&paragraph).await.unwrap();
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
