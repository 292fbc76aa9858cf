//! Decoding: each journaled event becomes one typed [`Inbound`] value, the only shape the
//! inbox's stages look at.
//!
//! It runs for every event the homeserver sends, so it reads each event once, borrowing
//! what it can from the journal's copy: the envelope (type, sender, timestamp, state key)
//! is read with the content kept as an unparsed slice, then the content is read straight
//! into the typed struct for its event type — no `serde_json::Value` tree, no second
//! parse of the whole event. The room and event IDs come from the journal, which read
//! them at intake.
//!
//! The pieces are ruma's types (identifiers, [`Mentions`], [`InReplyTo`], [`RelationType`],
//! [`ImageInfo`], [`MembershipState`], [`HistoryVisibility`], [`ReactionEventContent`], …). ruma's whole-content
//! types (`RoomMessageEventContent`, `AnySyncTimelineEvent`) are not used for the hot
//! `m.room.message` path: each re-reads the JSON several times (a raw copy, then once for
//! the relation, once for mentions, once for the msgtype, once for the variant) and fails
//! the whole event on one odd field. Fields that people's clients could get wrong — and
//! that routing read leniently before this module existed — are read leniently here
//! too: a malformed `m.mentions` is "no mentions", not an unreadable message. (Such a
//! field's few bytes are read twice — once to find its end, once as its type — which
//! costs far less than a tree of the whole content.)
//!
//! Spec: <https://spec.matrix.org/v1.18/client-server-api/#events>

use std::borrow::Cow;

use ruma::events::Mentions;
use ruma::events::TimelineEventType;
use ruma::events::reaction::ReactionEventContent;
use ruma::events::relation::{InReplyTo, RelationType};
use ruma::events::room::ImageInfo;
use ruma::events::room::history_visibility::HistoryVisibility;
use ruma::events::room::member::MembershipState;
use ruma::events::room::redaction::RoomRedactionEventContent;
use ruma::{EventEncryptionAlgorithm, EventId, OwnedEventId, OwnedMxcUri, OwnedUserId, RoomId};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::agents::ImageRef;
use crate::matrix::keys::{HOPS_KEY, STREAMING_KEY, TASK_KEY};
use crate::store::JournaledEvent;

/// One event, typed by what the inbox does with it.
#[derive(Debug)]
pub enum Inbound<'a> {
    /// `m.room.message`: something someone said.
    Message(Box<Message<'a>>),
    /// `m.room.member`: someone joined, left or was invited.
    Membership(Membership),
    /// `m.room.history_visibility`: who may read the room's history from now on.
    HistoryVisibility(HistoryVisibilityChange),
    /// `m.reaction`: an annotation on another event.
    Reaction(Reaction),
    /// `m.room.redaction`: another event was removed.
    Redaction(Redaction),
    /// `m.room.encrypted`: a message agents cannot read.
    Encrypted(Encrypted),
    /// Any other event type (state, calls, polls, …): nothing to do today.
    Other { kind: TimelineEventType },
}

/// An `m.room.message`, with what its relations, mentions and our own keys say.
#[derive(Debug)]
pub struct Message<'a> {
    pub event_id: &'a EventId,
    pub room_id: &'a RoomId,
    pub sender: OwnedUserId,
    /// `origin_server_ts`, in milliseconds (0 if the event had none).
    pub ts: u64,
    pub msgtype: MsgType,
    /// The plain-text body, reply fallback included as the sender sent it.
    pub body: Cow<'a, str>,
    /// `formatted_body` (HTML), if any.
    pub formatted_body: Option<Cow<'a, str>>,
    /// The picture of an `m.image` with unencrypted media (`url`); an encrypted `file`
    /// cannot be fetched today and is left out.
    pub image: Option<ImageRef>,
    /// The event this message really replies to (`m.in_reply_to`). In a thread, clients
    /// also point `m.in_reply_to` at the thread's latest event with `is_falling_back`, for
    /// clients without threads: that is not a reply, and is `None` here.
    pub reply_to: Option<OwnedEventId>,
    /// Root of the thread the message is in (`rel_type: m.thread`).
    pub thread_root: Option<OwnedEventId>,
    /// Set when the message is an edit (`rel_type: m.replace`) of an earlier one.
    pub edit: Option<Edit<'a>>,
    /// `m.mentions`, when the sender's client sent it (intentional mentions).
    pub mentions: Option<Mentions>,
    /// Agent-to-agent hop counter (`io.agentbus.hops`); 0 from people.
    pub hops: u32,
    /// Our agent's answer is still streaming (`io.agentbus.streaming`; for an edit, in
    /// its `m.new_content`, where the edit says whether the text is final).
    pub streaming: bool,
    /// A team posted it for one of its tasks (`io.agentbus.task`).
    pub in_task: bool,
}

impl Message<'_> {
    /// Whether this is an `m.notice`, which by convention bots never answer.
    pub fn is_notice(&self) -> bool {
        self.msgtype == MsgType::Notice
    }

    /// What the sender wrote: the body without the quote of the replied-to message that
    /// older clients put in front of a reply or a thread message. That quote is the
    /// replying client's to write, so it may say anything about anyone; nothing reads
    /// it. (`formatted_body`'s `<mx-reply>` counterpart never reaches a model or the
    /// history: both take the plain body.)
    pub fn text(&self) -> &str {
        if self.reply_to.is_some() || self.thread_root.is_some() {
            strip_reply_fallback(&self.body)
        } else {
            &self.body
        }
    }
}

/// `body` without a leading [reply fallback](https://spec.matrix.org/v1.18/client-server-api/#fallbacks-for-rich-replies):
/// `> <@sender:server> quoted` (or `> * <@sender…>` for an emote), more `>` lines, and
/// the blank line after them. A body that does not open that way is returned whole, so
/// a quote the person typed stays.
pub fn strip_reply_fallback(body: &str) -> &str {
    if !(body.starts_with("> <") || body.starts_with("> * <")) {
        return body;
    }
    let mut rest = body;
    while rest.starts_with('>') {
        rest = rest.split_once('\n').map_or("", |(_, tail)| tail);
    }
    rest.strip_prefix("\r\n")
        .or_else(|| rest.strip_prefix('\n'))
        .unwrap_or(rest)
}

/// An edit: which message it replaces and, if given, the new text.
#[derive(Debug)]
pub struct Edit<'a> {
    /// The replaced event; `None` only for an edit whose `event_id` is malformed — it is
    /// still an edit, and still not a new question.
    pub target: Option<OwnedEventId>,
    /// `m.new_content.body`: the text as it reads after the edit.
    pub new_body: Option<Cow<'a, str>>,
}

/// An `m.room.message`'s `msgtype`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MsgType {
    Text,
    Emote,
    Notice,
    Image,
    File,
    Audio,
    Video,
    Location,
    /// Anything else, or none at all (then the string is empty).
    Other(String),
}

impl MsgType {
    fn from_wire(msgtype: &str) -> Self {
        match msgtype {
            "m.text" => Self::Text,
            "m.emote" => Self::Emote,
            "m.notice" => Self::Notice,
            "m.image" => Self::Image,
            "m.file" => Self::File,
            "m.audio" => Self::Audio,
            "m.video" => Self::Video,
            "m.location" => Self::Location,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// An `m.room.member` event.
#[derive(Debug)]
pub struct Membership {
    pub sender: OwnedUserId,
    /// Whose membership changed (`state_key`), when it is a valid user ID.
    pub target: Option<OwnedUserId>,
    /// `None` when the content has no readable `membership`.
    pub membership: Option<MembershipState>,
    /// The invite's `is_direct` flag: the inviter means the room as a DM.
    pub is_direct: bool,
    /// `origin_server_ts`, in milliseconds (0 if the event had none).
    pub ts: u64,
}

/// An `m.room.history_visibility` state event (state key empty).
#[derive(Debug)]
pub struct HistoryVisibilityChange {
    pub sender: OwnedUserId,
    pub visibility: HistoryVisibility,
    /// `origin_server_ts`, in milliseconds (0 if the event had none): the setting holds
    /// for events from then on.
    pub ts: u64,
}

/// An `m.reaction` event.
#[derive(Debug)]
pub struct Reaction {
    pub sender: OwnedUserId,
    /// The event reacted to.
    pub target: OwnedEventId,
    /// The reaction itself, usually one emoji.
    pub key: String,
}

/// An `m.room.redaction` event.
#[derive(Debug)]
pub struct Redaction {
    pub sender: OwnedUserId,
    /// The removed event: `content.redacts` from room version 11, the top-level `redacts`
    /// before.
    pub redacts: Option<OwnedEventId>,
    pub reason: Option<String>,
}

/// An `m.room.encrypted` event.
#[derive(Debug)]
pub struct Encrypted {
    pub sender: OwnedUserId,
    /// `None` when the content does not name a readable algorithm.
    pub algorithm: Option<EventEncryptionAlgorithm>,
}

/// Why an event could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not an event at all: no `type` or no valid `sender`.
    #[error("not a Matrix event: {0}")]
    Envelope(#[source] serde_json::Error),
    /// A known event type whose content lacks what defines it (a message without a body,
    /// a reaction without its annotation).
    #[error("{kind} event with content that cannot be read: {source}")]
    Content {
        kind: TimelineEventType,
        #[source]
        source: serde_json::Error,
    },
}

/// Decodes one journaled event.
pub fn decode(event: &JournaledEvent) -> Result<Inbound<'_>, DecodeError> {
    let envelope: Envelope<'_> =
        serde_json::from_str(event.json.get()).map_err(DecodeError::Envelope)?;
    let content = envelope.content.map_or("{}", RawValue::get);
    let sender = envelope.sender;
    Ok(match envelope.kind {
        kind @ TimelineEventType::RoomMessage => {
            let content: MessageContent<'_> = read(kind, content)?;
            Inbound::Message(Box::new(content.into_message(
                event,
                sender,
                envelope.origin_server_ts,
            )))
        }
        kind @ TimelineEventType::RoomMember => {
            let content: MemberContent = read(kind, content)?;
            Inbound::Membership(Membership {
                sender,
                target: envelope.state_key.and_then(|key| key.parse().ok()),
                membership: content.membership,
                is_direct: content.is_direct == Some(true),
                ts: envelope.origin_server_ts,
            })
        }
        kind @ TimelineEventType::RoomHistoryVisibility
            if envelope.state_key.as_deref() == Some("") =>
        {
            let content: HistoryVisibilityContent = read(kind, content)?;
            Inbound::HistoryVisibility(HistoryVisibilityChange {
                sender,
                visibility: content.history_visibility,
                ts: envelope.origin_server_ts,
            })
        }
        kind @ TimelineEventType::Reaction => {
            let content: ReactionEventContent = read(kind, content)?;
            Inbound::Reaction(Reaction {
                sender,
                target: content.relates_to.event_id,
                key: content.relates_to.key,
            })
        }
        kind @ TimelineEventType::RoomRedaction => {
            let content: RoomRedactionEventContent = read(kind, content)?;
            Inbound::Redaction(Redaction {
                sender,
                redacts: content.redacts.or(envelope.redacts),
                reason: content.reason,
            })
        }
        kind @ TimelineEventType::RoomEncrypted => {
            let content: EncryptedContent = read(kind, content)?;
            Inbound::Encrypted(Encrypted {
                sender,
                algorithm: content.algorithm,
            })
        }
        kind => Inbound::Other { kind },
    })
}

/// Reads the content of a `kind` event as `T`.
fn read<'a, T: Deserialize<'a>>(
    kind: TimelineEventType,
    content: &'a str,
) -> Result<T, DecodeError> {
    serde_json::from_str(content).map_err(|source| DecodeError::Content { kind, source })
}

/// The top level of an event; `content` stays unparsed until its type is known.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: TimelineEventType,
    sender: OwnedUserId,
    #[serde(default)]
    origin_server_ts: u64,
    #[serde(default, borrow)]
    state_key: Option<Cow<'a, str>>,
    /// Redactions before room version 11 name their target here.
    #[serde(default, deserialize_with = "lenient")]
    redacts: Option<OwnedEventId>,
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
}

/// An `m.room.message` content, read in one pass.
///
/// Our own keys (`io.agentbus.*`, [`HOPS_KEY`], [`STREAMING_KEY`]) are fields here rather
/// than a struct flattened beside the spec's: serde's `flatten` buffers the whole content
/// into a generic tree first, which costs what this module exists to avoid.
#[derive(Deserialize)]
struct MessageContent<'a> {
    #[serde(default, borrow, deserialize_with = "lenient")]
    msgtype: Option<Text<'a>>,
    #[serde(borrow)]
    body: Cow<'a, str>,
    #[serde(default, borrow, deserialize_with = "lenient")]
    formatted_body: Option<Text<'a>>,
    #[serde(default, deserialize_with = "lenient")]
    url: Option<OwnedMxcUri>,
    #[serde(default, deserialize_with = "lenient")]
    info: Option<ImageInfo>,
    #[serde(default, borrow, deserialize_with = "lenient")]
    filename: Option<Text<'a>>,
    #[serde(rename = "m.relates_to", default, deserialize_with = "lenient")]
    relates_to: Option<RelatesTo>,
    #[serde(
        rename = "m.new_content",
        default,
        borrow,
        deserialize_with = "lenient"
    )]
    new_content: Option<NewContent<'a>>,
    #[serde(rename = "m.mentions", default, deserialize_with = "lenient")]
    mentions: Option<Mentions>,
    #[serde(rename = "io.agentbus.hops", default, deserialize_with = "lenient")]
    hops: Option<u64>,
    #[serde(
        rename = "io.agentbus.streaming",
        default,
        deserialize_with = "lenient"
    )]
    streaming: Option<bool>,
    #[serde(rename = "io.agentbus.task", default, deserialize_with = "lenient")]
    task: Option<String>,
}

// serde's attributes need literals: hold them to the shared constants at compile time.
const _: () = {
    assert!(matches!(HOPS_KEY.as_bytes(), b"io.agentbus.hops"));
    assert!(matches!(STREAMING_KEY.as_bytes(), b"io.agentbus.streaming"));
    assert!(matches!(TASK_KEY.as_bytes(), b"io.agentbus.task"));
};

/// `m.relates_to`: every field on its own, so one malformed field does not hide the
/// others (an edit with a bad target is still an edit).
#[derive(Deserialize)]
struct RelatesTo {
    #[serde(default, deserialize_with = "lenient")]
    rel_type: Option<RelationType>,
    #[serde(default, deserialize_with = "lenient")]
    event_id: Option<OwnedEventId>,
    #[serde(default, deserialize_with = "lenient")]
    is_falling_back: Option<bool>,
    #[serde(rename = "m.in_reply_to", default, deserialize_with = "lenient")]
    in_reply_to: Option<InReplyTo>,
}

/// `m.new_content` of an edit: only its text is kept.
#[derive(Deserialize)]
struct NewContent<'a> {
    #[serde(default, borrow, deserialize_with = "lenient")]
    body: Option<Text<'a>>,
    /// An edit of a streaming answer says in its new content whether the text is final.
    #[serde(
        rename = "io.agentbus.streaming",
        default,
        deserialize_with = "lenient"
    )]
    streaming: Option<bool>,
}

#[derive(Deserialize)]
struct MemberContent {
    #[serde(default, deserialize_with = "lenient")]
    membership: Option<MembershipState>,
    #[serde(default, deserialize_with = "lenient")]
    is_direct: Option<bool>,
}

#[derive(Deserialize)]
struct HistoryVisibilityContent {
    history_visibility: HistoryVisibility,
}

#[derive(Deserialize)]
struct EncryptedContent {
    #[serde(default, deserialize_with = "lenient")]
    algorithm: Option<EventEncryptionAlgorithm>,
}

/// A string borrowed from the event where it has no escapes.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// Reads a field as `T`, or as absent if it is there but not a `T`.
fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let raw = <&'de RawValue>::deserialize(deserializer)?;
    Ok(serde_json::from_str(raw.get()).ok())
}

impl<'a> MessageContent<'a> {
    fn into_message(self, event: &'a JournaledEvent, sender: OwnedUserId, ts: u64) -> Message<'a> {
        let msgtype = MsgType::from_wire(self.msgtype.as_ref().map_or("", |t| &t.0));
        let image = match (&msgtype, self.url) {
            (MsgType::Image, Some(mxc)) => Some(ImageRef {
                mxc,
                mime: self.info.as_ref().and_then(|i| i.mimetype.clone()),
                size: self.info.as_ref().and_then(|i| i.size).map(u64::from),
                name: self
                    .filename
                    .map_or_else(|| self.body.clone().into_owned(), |f| f.0.into_owned()),
            }),
            _ => None,
        };
        let (mut reply_to, mut thread_root, mut edit) = (None, None, None);
        let mut streaming = self.streaming.unwrap_or(false);
        if let Some(relation) = self.relates_to {
            match relation.rel_type {
                Some(RelationType::Thread) => thread_root = relation.event_id,
                Some(RelationType::Replacement) => {
                    let (new_body, new_streaming) = self
                        .new_content
                        .map_or((None, None), |c| (c.body, c.streaming));
                    streaming |= new_streaming == Some(true);
                    edit = Some(Edit {
                        target: relation.event_id,
                        new_body: new_body.map(|b| b.0),
                    })
                }
                _ => {}
            }
            if relation.is_falling_back != Some(true) {
                reply_to = relation.in_reply_to.map(|r| r.event_id);
            }
        }
        Message {
            event_id: &event.event_id,
            room_id: &event.room_id,
            sender,
            ts,
            msgtype,
            body: self.body,
            formatted_body: self.formatted_body.map(|f| f.0),
            image,
            reply_to,
            thread_root,
            edit,
            mentions: self.mentions,
            hops: self
                .hops
                .map_or(0, |h| u32::try_from(h).unwrap_or(u32::MAX)),
            streaming,
            in_task: self.task.is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use ruma::{owned_event_id, owned_user_id};

    use super::*;

    /// A journaled event as the journal hands it over: its IDs read at intake.
    fn journaled(json: &str) -> JournaledEvent {
        #[derive(Deserialize)]
        struct Ids {
            room_id: ruma::OwnedRoomId,
            event_id: OwnedEventId,
        }
        let ids: Ids = serde_json::from_str(json).expect("fixture has IDs");
        JournaledEvent {
            seq: 1,
            room_id: ids.room_id,
            event_id: ids.event_id,
            json: RawValue::from_string(json.to_owned()).expect("fixture is JSON"),
        }
    }

    fn message(event: &JournaledEvent) -> Box<Message<'_>> {
        match decode(event) {
            Ok(Inbound::Message(message)) => message,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    macro_rules! fixture {
        ($name:literal) => {
            journaled(include_str!(concat!(
                "../../tests/fixtures/events/",
                $name,
                ".json"
            )))
        };
    }

    #[test]
    fn an_element_reply_keeps_its_fallback_and_names_the_replied_to_event() {
        let event = fixture!("element-reply-with-fallback");
        let m = message(&event);
        assert_eq!(m.sender, "@alice:example.org");
        assert_eq!(m.room_id, "!wSBuIXxGsHUpwsgadq:example.org");
        assert_eq!(m.event_id, "$eUxbKvq9l0bkfXHc5kLgW7bmN9TzBFqQ3tLGvQiu0sA");
        assert_eq!(m.ts, 1_718_000_000_123);
        assert_eq!(m.msgtype, MsgType::Text);
        assert!(
            m.body
                .starts_with("> <@damon:example.org> The nightly build")
        );
        assert!(
            m.body.ends_with("Can you raise the limit? \"now\""),
            "escapes are decoded"
        );
        assert!(
            m.formatted_body
                .as_deref()
                .unwrap()
                .starts_with("<mx-reply>")
        );
        assert_eq!(
            m.reply_to,
            Some(owned_event_id!(
                "$Bq8pkNmz9Xn3Z3HcuGQ1cyQ1pSxYQhK7b9gMCV2x1Qo"
            ))
        );
        assert_eq!(m.thread_root, None);
        assert!(m.edit.is_none());
        let mentions = m.mentions.as_ref().expect("Element sends m.mentions");
        assert!(
            mentions
                .user_ids
                .contains(&owned_user_id!("@damon:example.org"))
        );
        assert!(!mentions.room);
        assert_eq!((m.hops, m.streaming), (0, false));
        assert_eq!(m.text(), "Can you raise the limit? \"now\"");
    }

    #[test]
    fn the_text_of_a_reply_is_what_its_sender_typed() {
        for (body, text) in [
            ("> <@d:hs> quoted\n\nactual", "actual"),
            ("> <@d:hs> one\n> two\n\nactual\nsecond", "actual\nsecond"),
            ("> * <@d:hs> waves\n\nhi", "hi"),
            ("> <@d:hs> quoted\r\n\r\nactual", "actual"),
            // Only the quoting shape of a fallback is one; a quote the person typed stays.
            (
                "> to be or not\n\nthat is it",
                "> to be or not\n\nthat is it",
            ),
            ("plain", "plain"),
            ("> <@d:hs> only a quote", ""),
        ] {
            assert_eq!(strip_reply_fallback(body), text, "{body:?}");
        }
        // A message that is not a reply keeps its body whole.
        let event = fixture!("element-room-mention");
        let m = message(&event);
        assert_eq!(m.text(), m.body);
    }

    #[test]
    fn a_plain_body_is_borrowed_from_the_journal_not_copied() {
        let event = fixture!("element-room-mention");
        let m = message(&event);
        assert!(matches!(m.body, Cow::Borrowed(_)));
    }

    #[test]
    fn a_thread_message_falling_back_is_in_the_thread_but_no_reply() {
        let event = fixture!("element-thread-fallback");
        let m = message(&event);
        assert_eq!(
            m.thread_root,
            Some(owned_event_id!(
                "$RootOfTheThread000000000000000000000000000"
            ))
        );
        assert_eq!(
            m.reply_to, None,
            "the fallback points at the latest event only"
        );
        let mentions = m.mentions.as_ref().expect("empty m.mentions is still sent");
        assert!(mentions.user_ids.is_empty() && !mentions.room);
    }

    #[test]
    fn a_quoting_reply_inside_a_thread_is_both() {
        let event = fixture!("element-thread-reply");
        let m = message(&event);
        assert_eq!(
            m.thread_root,
            Some(owned_event_id!(
                "$RootOfTheThread000000000000000000000000000"
            ))
        );
        assert_eq!(
            m.reply_to,
            Some(owned_event_id!(
                "$QuotedInTheThread0000000000000000000000000"
            ))
        );
    }

    #[test]
    fn an_edit_names_its_target_and_new_text() {
        let event = fixture!("element-edit");
        let m = message(&event);
        let edit = m.edit.as_ref().expect("m.replace is an edit");
        assert_eq!(
            edit.target,
            Some(owned_event_id!(
                "$OriginalEvent000000000000000000000000000000"
            ))
        );
        assert_eq!(
            edit.new_body.as_deref(),
            Some("@damon could you look at the arm64 runner?")
        );
        assert_eq!(m.body, " * @damon could you look at the arm64 runner?");
        assert_eq!(m.reply_to, None);
    }

    #[test]
    fn an_edit_with_a_malformed_target_is_still_an_edit() {
        let event = journaled(
            r#"{"type":"m.room.message","room_id":"!r:hs","event_id":"$e","sender":"@a:hs",
                "content":{"msgtype":"m.text","body":" * hi",
                           "m.relates_to":{"rel_type":"m.replace","event_id":42}}}"#,
        );
        let m = message(&event);
        assert!(m.edit.as_ref().is_some_and(|e| e.target.is_none()));
    }

    #[test]
    fn an_edit_of_a_streaming_answer_says_in_its_new_content_whether_it_is_final() {
        let edit = |new_content: &str| {
            journaled(&format!(
                r#"{{"type":"m.room.message","room_id":"!r:hs","event_id":"$e","sender":"@damon:hs",
                    "content":{{"msgtype":"m.text","body":"* partial",
                               "m.new_content":{new_content},
                               "m.relates_to":{{"rel_type":"m.replace","event_id":"$answer"}}}}}}"#
            ))
        };
        let still = edit(r#"{"msgtype":"m.text","body":"partial","io.agentbus.streaming":true}"#);
        assert!(
            message(&still).streaming,
            "an intermediate edit is still streaming"
        );
        let last = edit(r#"{"msgtype":"m.text","body":"partial and final"}"#);
        let m = message(&last);
        assert!(!m.streaming, "the final edit drops the mark");
        assert_eq!(
            m.edit.unwrap().new_body.as_deref(),
            Some("partial and final")
        );
    }

    #[test]
    fn a_room_mention_is_read_from_intentional_mentions() {
        let event = fixture!("element-room-mention");
        let m = message(&event);
        let mentions = m.mentions.as_ref().unwrap();
        assert!(mentions.room);
        assert!(mentions.user_ids.is_empty());
    }

    #[test]
    fn an_element_image_has_its_media_file_name_and_caption() {
        let event = fixture!("element-image");
        let m = message(&event);
        assert_eq!(m.msgtype, MsgType::Image);
        assert_eq!(m.body, "what does this error mean?");
        let image = m.image.as_ref().expect("m.image with url");
        assert_eq!(image.mxc, "mxc://example.org/AbCdEfGhIjKlMnOpQrStUvWx");
        assert_eq!(image.mime.as_deref(), Some("image/png"));
        assert_eq!(image.size, Some(184_302));
        assert_eq!(image.name, "Screenshot 2024-06-10 at 10.21.04.png");
    }

    #[test]
    fn a_fluffychat_image_without_filename_is_named_by_its_body() {
        let event = fixture!("fluffychat-image");
        let m = message(&event);
        let image = m.image.as_ref().expect("m.image with url");
        assert_eq!(image.name, "image_picker_3A1C.jpg");
        assert_eq!(image.mime.as_deref(), Some("image/jpeg"));
        assert!(m.mentions.is_none(), "FluffyChat sent no m.mentions");
    }

    #[test]
    fn a_fluffychat_reply_names_the_agents_answer() {
        let event = fixture!("fluffychat-reply");
        let m = message(&event);
        assert_eq!(
            m.reply_to,
            Some(owned_event_id!(
                "$AgentAnswer000000000000000000000000000000"
            ))
        );
        assert!(m.body.ends_with("Yes please 🙏"));
    }

    #[test]
    fn a_bridge_notice_is_a_notice_and_a_puppets_message_is_text() {
        let event = fixture!("mautrix-telegram-notice");
        let notice = message(&event);
        assert!(notice.is_notice());
        let event = fixture!("mautrix-puppet-message");
        let puppet = message(&event);
        assert_eq!(puppet.msgtype, MsgType::Text);
        assert!(!puppet.is_notice());
        assert_eq!(puppet.sender, "@telegram_123456789:example.org");
        assert_eq!(puppet.body, "@damon what is blocking the release?");
    }

    #[test]
    fn our_own_keys_are_read_beside_the_spec_ones() {
        let event = fixture!("agent-streaming-answer");
        let m = message(&event);
        assert_eq!(m.hops, 2);
        assert!(m.streaming);
        assert!(
            m.mentions
                .as_ref()
                .unwrap()
                .user_ids
                .contains(&owned_user_id!("@coder:example.org"))
        );
    }

    #[test]
    fn odd_values_of_lenient_fields_read_as_absent() {
        let event = journaled(
            r#"{"type":"m.room.message","room_id":"!r:hs","event_id":"$e","sender":"@a:hs",
                "content":{"body":"hi","m.mentions":"everyone","io.agentbus.hops":"99",
                           "io.agentbus.streaming":1,"formatted_body":7,
                           "m.relates_to":{"m.in_reply_to":{"event_id":"not an id"}}}}"#,
        );
        let m = message(&event);
        assert_eq!(m.msgtype, MsgType::Other(String::new()));
        assert!(m.mentions.is_none());
        assert_eq!((m.hops, m.streaming), (0, false));
        assert!(m.formatted_body.is_none());
        assert!(m.reply_to.is_none());
    }

    #[test]
    fn a_huge_hop_count_saturates() {
        let event = journaled(
            r#"{"type":"m.room.message","room_id":"!r:hs","event_id":"$e","sender":"@a:hs",
                "content":{"msgtype":"m.text","body":"hi","io.agentbus.hops":18446744073709551615}}"#,
        );
        assert_eq!(message(&event).hops, u32::MAX);
    }

    #[test]
    fn an_encrypted_event_names_its_algorithm() {
        let event = fixture!("element-encrypted");
        match decode(&event).unwrap() {
            Inbound::Encrypted(e) => {
                assert_eq!(e.sender, "@alice:example.org");
                assert_eq!(e.algorithm, Some(EventEncryptionAlgorithm::MegolmV1AesSha2));
            }
            other => panic!("expected encrypted, got {other:?}"),
        }
        // Whatever its content, an encrypted event is one agents cannot read.
        let odd = journaled(
            r#"{"type":"m.room.encrypted","room_id":"!r:hs","event_id":"$e","sender":"@a:hs","content":{"algorithm":5}}"#,
        );
        assert!(matches!(
            decode(&odd),
            Ok(Inbound::Encrypted(Encrypted {
                algorithm: None,
                ..
            }))
        ));
    }

    #[test]
    fn an_invite_names_whom_it_invites() {
        let event = fixture!("member-invite");
        match decode(&event).unwrap() {
            Inbound::Membership(m) => {
                assert_eq!(m.sender, "@alice:example.org");
                assert_eq!(m.target, Some(owned_user_id!("@damon:example.org")));
                assert_eq!(m.membership, Some(MembershipState::Invite));
                assert_eq!(m.ts, 1_718_001_200_000);
            }
            other => panic!("expected a membership, got {other:?}"),
        }
    }

    #[test]
    fn a_history_visibility_change_names_the_setting_and_when() {
        let event = journaled(
            r#"{"type":"m.room.history_visibility","room_id":"!r:hs","event_id":"$e","sender":"@a:hs",
                "state_key":"","origin_server_ts":1718001200000,"content":{"history_visibility":"joined"}}"#,
        );
        match decode(&event).unwrap() {
            Inbound::HistoryVisibility(change) => {
                assert_eq!(change.sender, "@a:hs");
                assert_eq!(change.visibility, HistoryVisibility::Joined);
                assert_eq!(change.ts, 1_718_001_200_000);
            }
            other => panic!("expected a history visibility change, got {other:?}"),
        }
        // A value the spec does not name is kept as it is (and read as `joined` later).
        let custom = journaled(
            r#"{"type":"m.room.history_visibility","room_id":"!r:hs","event_id":"$e","sender":"@a:hs",
                "state_key":"","content":{"history_visibility":"org.example.members_only"}}"#,
        );
        assert!(matches!(
            decode(&custom),
            Ok(Inbound::HistoryVisibility(HistoryVisibilityChange { visibility, .. }))
                if visibility.as_str() == "org.example.members_only"
        ));
        // With a state key it is no room setting; without a setting it cannot be read.
        let keyed = journaled(
            r#"{"type":"m.room.history_visibility","room_id":"!r:hs","event_id":"$e","sender":"@a:hs",
                "state_key":"x","content":{"history_visibility":"shared"}}"#,
        );
        assert!(matches!(decode(&keyed), Ok(Inbound::Other { .. })));
        let empty = journaled(
            r#"{"type":"m.room.history_visibility","room_id":"!r:hs","event_id":"$e","sender":"@a:hs",
                "state_key":"","content":{}}"#,
        );
        assert!(matches!(decode(&empty), Err(DecodeError::Content { .. })));
    }

    #[test]
    fn a_reaction_names_its_target_and_key() {
        let event = fixture!("reaction");
        match decode(&event).unwrap() {
            Inbound::Reaction(r) => {
                assert_eq!(r.target, "$AgentAnswer000000000000000000000000000000");
                assert_eq!(r.key, "👍️");
            }
            other => panic!("expected a reaction, got {other:?}"),
        }
    }

    #[test]
    fn a_redaction_names_its_target_in_old_and_new_rooms() {
        for (event, reason) in [
            (fixture!("redaction-v11"), Some("wrong room")),
            (fixture!("redaction-v10"), None),
        ] {
            match decode(&event).unwrap() {
                Inbound::Redaction(r) => {
                    assert_eq!(
                        r.redacts,
                        Some(owned_event_id!(
                            "$AgentAnswer000000000000000000000000000000"
                        ))
                    );
                    assert_eq!(r.reason.as_deref(), reason);
                }
                other => panic!("expected a redaction, got {other:?}"),
            }
        }
    }

    #[test]
    fn other_event_types_are_other() {
        let event = journaled(
            r#"{"type":"m.room.topic","room_id":"!r:hs","event_id":"$e","sender":"@a:hs","state_key":"","content":{"topic":"release"}}"#,
        );
        assert!(matches!(
            decode(&event),
            Ok(Inbound::Other {
                kind: TimelineEventType::RoomTopic
            })
        ));
        let custom = journaled(
            r#"{"type":"org.example.custom","room_id":"!r:hs","event_id":"$e","sender":"@a:hs","content":{}}"#,
        );
        match decode(&custom).unwrap() {
            Inbound::Other { kind } => assert_eq!(kind.to_string(), "org.example.custom"),
            other => panic!("expected other, got {other:?}"),
        }
    }

    #[test]
    fn malformed_events_are_typed_errors() {
        let cases = [
            // Not an object at all.
            (r#"["m.room.message"]"#, "envelope"),
            // No sender.
            (
                r#"{"type":"m.room.message","content":{"body":"hi"}}"#,
                "envelope",
            ),
            // A sender that is no user ID.
            (
                r#"{"type":"m.room.message","sender":"alice","content":{"body":"hi"}}"#,
                "envelope",
            ),
            // No type.
            (r#"{"sender":"@a:hs","content":{"body":"hi"}}"#, "envelope"),
            // A message without a body, or with a body that is no string.
            (
                r#"{"type":"m.room.message","sender":"@a:hs","content":{"msgtype":"m.text"}}"#,
                "content",
            ),
            (
                r#"{"type":"m.room.message","sender":"@a:hs","content":{"body":["hi"]}}"#,
                "content",
            ),
            // A message without content (redacted).
            (r#"{"type":"m.room.message","sender":"@a:hs"}"#, "content"),
            // A reaction without its annotation.
            (
                r#"{"type":"m.reaction","sender":"@a:hs","content":{"m.relates_to":{"rel_type":"m.annotation"}}}"#,
                "content",
            ),
        ];
        for (json, expected) in cases {
            let event = JournaledEvent {
                seq: 1,
                room_id: ruma::owned_room_id!("!r:hs"),
                event_id: owned_event_id!("$e"),
                json: RawValue::from_string(json.to_owned()).unwrap(),
            };
            let got = match decode(&event) {
                Err(DecodeError::Envelope(_)) => "envelope",
                Err(DecodeError::Content { ref kind, .. }) => {
                    assert_ne!(kind.to_string(), "", "{json}");
                    "content"
                }
                Ok(inbound) => panic!("{json} decoded as {inbound:?}"),
            };
            assert_eq!(got, expected, "{json}");
        }
    }
}
