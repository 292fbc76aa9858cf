//! The facts step: everything routing needs beyond the message itself — the room's joined
//! members and config aliases, recent history, who sent the replied-to event (and what it
//! said, which the agents are given as the reply's context), whether the sender is
//! paired — gathered in one place, from caches where it can be. Routing itself then is a
//! pure call.

use std::collections::HashMap;
use std::time::Instant;

use ruma::{OwnedUserId, RoomId, UserId};

use super::decode::{Message, strip_reply_fallback};
use super::{FACTS_RETRY, Inbox, ROUTING_HISTORY};
use crate::config::{AgentId, ChannelId, Config};
use crate::router::{ContextLine, LoopGuard, MessageFacts, RoomFacts, RouteInput};
use crate::store::HistoryEntry;

/// The event a message replies to, as far as it is known.
pub(super) struct Replied {
    pub sender: OwnedUserId,
    /// Its text, without a reply fallback of its own, when it has one.
    pub text: Option<String>,
    /// When it was sent (`origin_server_ts`).
    pub ts: Option<u64>,
}

/// What routing one message looks at, besides the message.
#[derive(Debug, Default)]
pub(super) struct Facts {
    pub room: RoomFacts,
    /// Recent room history, oldest first (empty in a room none of our agents is in).
    pub recent: Vec<HistoryEntry>,
    /// Who sent the event the message replies to, if it is one and that is known.
    pub reply_to_sender: Option<OwnedUserId>,
    /// The text of the event the message replies to, without its own reply fallback,
    /// when it is known and has one.
    pub reply_to_text: Option<String>,
    /// When the replied-to event was sent, when that is known: its text reaches the model
    /// only if every reader of the answer may read it then.
    pub reply_to_ts: Option<u64>,
    /// Whether the sender was approved by pairing.
    pub sender_paired: bool,
    /// Whether another person joined to the room was approved by pairing (looked up
    /// only for a sender the config does not admit: it vouches for a group room).
    pub paired_member_joined: bool,
    /// Whether one of our agents is in the room (else nobody reads its history, so a
    /// line of it can wait for the batched finish).
    pub agents_here: bool,
}

impl Facts {
    /// The message as the router reads it.
    pub fn message<'a>(&'a self, message: &'a Message<'_>) -> MessageFacts<'a> {
        MessageFacts {
            sender: &message.sender,
            body: &message.body,
            formatted_body: message.formatted_body.as_deref(),
            mentions: message.mentions.as_ref(),
            reply_to_sender: self.reply_to_sender.as_deref(),
            thread_root: message.thread_root.as_deref(),
            hops: message.hops,
            ts: message.ts,
        }
    }

    /// Recent history as the router's context lines.
    pub fn context(&self) -> Vec<&dyn ContextLine> {
        self.recent.iter().map(|e| e as &dyn ContextLine).collect()
    }

    /// The router's whole input for `message` in `room_id`.
    pub fn route_input<'a>(
        &'a self,
        room_id: &'a RoomId,
        message: MessageFacts<'a>,
        context: &'a [&'a dyn ContextLine],
        guard: &'a LoopGuard,
    ) -> RouteInput<'a> {
        RouteInput {
            channel: &ChannelId::MATRIX,
            room_id,
            room: &self.room,
            message,
            recent: context,
            sender_paired: self.sender_paired,
            paired_member_joined: self.paired_member_joined,
            guard,
        }
    }
}

impl ContextLine for HistoryEntry {
    fn event_id(&self) -> &ruma::EventId {
        &self.event_id
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn ts(&self) -> u64 {
        self.ts
    }
    fn thread_root(&self) -> Option<&ruma::EventId> {
        self.thread_root.as_deref()
    }
    fn routed_to(&self) -> &[AgentId] {
        &self.routed_to
    }
}

/// The room aliases the config names: group settings and binding peers.
pub(super) fn config_aliases(config: &Config) -> Vec<String> {
    let named: std::collections::BTreeSet<&String> = config
        .channels
        .values()
        .flat_map(|c| c.groups.keys())
        .chain(
            config
                .bindings
                .iter()
                .filter_map(|b| b.matches.peer.as_ref()),
        )
        .filter(|key| key.starts_with('#'))
        .collect();
    named.into_iter().cloned().collect()
}

impl Inbox {
    /// Gathers the facts for routing `message`: the room's members and aliases; recent
    /// history and the replied-to event's sender only where one of our agents is in the
    /// room (elsewhere the router decides "nobody" before looking at them, and reading
    /// history is most of an unanswered event's cost); and the sender's pairing.
    pub(super) async fn gather_facts(&self, message: &Message<'_>) -> Facts {
        let room = self.room_facts(message.room_id).await;
        let agents_here = self
            .router
            .candidates()
            .iter()
            .any(|c| room.joined.contains(&c.user_id));
        let recent = if agents_here {
            self.recent_history(message.room_id).await
        } else {
            Vec::new()
        };
        let (reply_to_sender, reply_to_text, reply_to_ts) = match &message.reply_to {
            Some(id) => match self.replied_to(message.room_id, &room, &recent, id).await {
                Some(Replied { sender, text, ts }) => (Some(sender), text, ts),
                None => (None, None, None),
            },
            None => (None, None, None),
        };
        // Pairing matters only where an agent could answer.
        let sender_paired = agents_here && self.sender_paired(&message.sender).await;
        let paired_member_joined = agents_here
            && !sender_paired
            && self
                .router
                .needs_vouching(&ChannelId::MATRIX, &message.sender)
            && self.paired_member_joined(&room, &message.sender).await;
        Facts {
            sender_paired,
            paired_member_joined,
            agents_here,
            room,
            recent,
            reply_to_sender,
            reply_to_text,
            reply_to_ts,
        }
    }

    /// Whether `sender` was approved by pairing; a store error counts as "no".
    pub(super) async fn sender_paired(&self, sender: &UserId) -> bool {
        self.store
            .pairing
            .is_paired(&ChannelId::MATRIX, sender.as_str())
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read pairing approvals; treating sender as unpaired");
                false
            })
    }

    /// The config's aliases that resolved to `room_id`.
    pub(super) fn aliases_of(&self, room_id: &RoomId) -> Vec<String> {
        self.aliases
            .read()
            .expect("alias lock")
            .get(room_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether a person in the room other than `sender` was approved by pairing.
    pub(super) async fn paired_member_joined(&self, room: &RoomFacts, sender: &UserId) -> bool {
        for user in room
            .joined
            .iter()
            .filter(|u| *u != sender && !self.config.is_own_agent_or_bot(u))
        {
            if self.sender_paired(user).await {
                return true;
            }
        }
        false
    }

    /// Resolves the config's room aliases (group settings, binding peers) that have not
    /// resolved yet, so routing can match a room by either name. Called at startup and
    /// again whenever a room's facts are fetched while some are still unresolved: a room
    /// created after agentbus started is picked up.
    pub async fn resolve_aliases(&self) {
        *self.aliases_tried.lock().expect("alias lock") = Some(Instant::now());
        let pending = std::mem::take(&mut *self.unresolved.lock().expect("alias lock"));
        if pending.is_empty() {
            return;
        }
        let mut still = Vec::new();
        let mut resolved = false;
        for alias in pending {
            let Ok(parsed) = ruma::RoomAliasId::parse(alias.as_str()) else {
                tracing::warn!(alias = %alias, "not a valid room alias; ignored");
                continue;
            };
            match self.matrix.resolve_alias(&parsed).await {
                Ok(room_id) => {
                    tracing::debug!(alias = %alias, room_id = %room_id, "resolved room alias from the config");
                    self.aliases
                        .write()
                        .expect("alias lock")
                        .entry(room_id)
                        .or_default()
                        .push(alias);
                    resolved = true;
                }
                Err(e) => {
                    tracing::debug!(alias = %alias, error = %e, "room alias from the config does not resolve (yet)");
                    still.push(alias);
                }
            }
        }
        self.unresolved.lock().expect("alias lock").extend(still);
        if resolved {
            self.rooms.lock().expect("room cache lock").clear();
        }
    }

    /// A member's display name in `room_id`, else their localpart.
    pub(super) fn display_name(&self, room_id: &RoomId, user: &UserId) -> String {
        self.names
            .lock()
            .expect("names lock")
            .get(room_id)
            .and_then(|names| names.get(user))
            .cloned()
            .unwrap_or_else(|| user.localpart().to_owned())
    }

    /// The room history routing looks at; a store error means routing without context.
    pub(super) async fn recent_history(&self, room_id: &RoomId) -> Vec<HistoryEntry> {
        self.store
            .history
            .recent_history(room_id, ROUTING_HISTORY)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(room_id = %room_id, error = %e, "could not read history; routing without context");
                Vec::new()
            })
    }

    /// Who sent `event_id` and its text (without a reply fallback of its own): from
    /// recent history, else asked of the homeserver as an agent in the room.
    pub(super) async fn replied_to(
        &self,
        room_id: &RoomId,
        room: &RoomFacts,
        recent: &[HistoryEntry],
        event_id: &ruma::EventId,
    ) -> Option<Replied> {
        let text = |body: &str| {
            let text = strip_reply_fallback(body).trim();
            (!text.is_empty()).then(|| text.to_owned())
        };
        if let Some(entry) = recent.iter().find(|e| e.event_id == event_id) {
            return Some(Replied {
                sender: entry.sender.clone(),
                text: text(&entry.body),
                ts: Some(entry.ts),
            });
        }
        let reader = self
            .router
            .candidates()
            .iter()
            .find(|c| room.joined.contains(&c.user_id))?;
        match self
            .matrix
            .intent(&reader.user_id)
            .event_gist(room_id, event_id)
            .await
        {
            Ok(gist) => Some(Replied {
                text: gist.body.as_deref().and_then(text),
                sender: gist.sender,
                ts: gist.ts,
            }),
            Err(e) => {
                tracing::debug!(room_id = %room_id, event_id = %event_id, error = %e, "cannot read the replied-to event");
                None
            }
        }
    }

    /// The joined members of `room_id`: cached — a room none of our agents is in too —
    /// and refreshed after any membership change in it. A lookup that failed is retried
    /// after [`FACTS_RETRY`], not for every event.
    pub(super) async fn room_facts(&self, room_id: &RoomId) -> RoomFacts {
        if let Some((facts, expires)) = self.rooms.lock().expect("room cache lock").get(room_id)
            && expires.is_none_or(|at| Instant::now() < at)
        {
            return facts.clone();
        }
        let retry_aliases = {
            let tried = self.aliases_tried.lock().expect("alias lock");
            tried.is_none_or(|at| at.elapsed() >= FACTS_RETRY)
        };
        if retry_aliases {
            self.resolve_aliases().await;
        }
        let aliases = self
            .aliases
            .read()
            .expect("alias lock")
            .get(room_id)
            .cloned()
            .unwrap_or_default();
        let mut expires = None;
        let mut facts = RoomFacts {
            joined: Default::default(),
            aliases,
        };
        // Ask as each agent in turn; only one that is in the room may see its members.
        let _turn = self
            .lookups
            .acquire()
            .await
            .expect("the lookup semaphore is never closed");
        if let Some((facts, expires)) = self.rooms.lock().expect("room cache lock").get(room_id)
            && expires.is_none_or(|at| Instant::now() < at)
        {
            return facts.clone(); // learnt while waiting for a turn
        }
        for candidate in self.router.candidates() {
            match self
                .matrix
                .intent(&candidate.user_id)
                .joined_members(room_id)
                .await
            {
                Ok(members) => {
                    let names: HashMap<OwnedUserId, String> = members
                        .iter()
                        .filter_map(|(id, name)| Some((id.clone(), name.clone()?)))
                        .collect();
                    self.names
                        .lock()
                        .expect("names lock")
                        .insert(room_id.to_owned(), names);
                    facts.joined = members.into_iter().map(|(id, _)| id).collect();
                    break;
                }
                Err(e) if e.errcode() == Some("M_FORBIDDEN") => continue,
                Err(e) => {
                    tracing::warn!(room_id = %room_id, error = %e, "could not read room members");
                    expires = Some(Instant::now() + FACTS_RETRY);
                    break;
                }
            }
        }
        self.rooms
            .lock()
            .expect("room cache lock")
            .insert(room_id.to_owned(), (facts.clone(), expires));
        facts
    }

    /// Forgets what is cached about `room_id`'s members (its membership changed).
    pub(super) fn forget_members(&self, room_id: &RoomId) {
        self.rooms.lock().expect("room cache lock").remove(room_id);
        self.names.lock().expect("names lock").remove(room_id);
    }
}

#[cfg(test)]
mod tests {
    use ruma::{OwnedEventId, owned_event_id, owned_user_id};
    use serde_json::value::RawValue;

    use super::*;
    use crate::inbox::decode::{Inbound, decode};
    use crate::router::{Router, Strategy};
    use crate::store::JournaledEvent;

    const CONFIG: &str = r#"
homeserver: { url: "http://127.0.0.1:1", server_name: example.org }
appservice: { as_token: a, hs_token: h }
providers: { echo: { api: echo } }
agents: [ { id: damon, provider: echo }, { id: coder, provider: echo } ]
"#;

    fn journaled(json: &str) -> JournaledEvent {
        let value: serde_json::Value = serde_json::from_str(json).unwrap();
        JournaledEvent {
            seq: 1,
            room_id: value["room_id"].as_str().unwrap().try_into().unwrap(),
            event_id: value["event_id"].as_str().unwrap().try_into().unwrap(),
            json: RawValue::from_string(json.to_owned()).unwrap(),
        }
    }

    fn message(event: &JournaledEvent) -> Box<Message<'_>> {
        match decode(event).unwrap() {
            Inbound::Message(m) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// A group room with both agents and two people.
    fn group_room() -> RoomFacts {
        RoomFacts {
            joined: [
                owned_user_id!("@damon:example.org"),
                owned_user_id!("@coder:example.org"),
                owned_user_id!("@alice:example.org"),
                owned_user_id!("@bob:example.org"),
            ]
            .into(),
            aliases: vec!["#release:example.org".to_owned()],
        }
    }

    fn line(
        event_id: OwnedEventId,
        sender: &str,
        thread_root: Option<OwnedEventId>,
    ) -> HistoryEntry {
        HistoryEntry {
            event_id,
            sender: sender.try_into().unwrap(),
            body: "earlier".to_owned(),
            ts: 1_718_000_000_000,
            thread_root,
            routed_to: Vec::new(),
        }
    }

    fn route(facts: &Facts, message: &Message<'_>) -> crate::router::RouteDecision {
        // Everyone on the test server is admitted (the admission rules have tests of
        // their own in the router).
        let config = crate::config::Config::parse(&format!(
            "{CONFIG}channels: {{ matrix: {{ allow_from: ['@*:example.org'] }} }}\n"
        ))
        .unwrap();
        let router = Router::new(&config);
        let guard = LoopGuard::default();
        let context = facts.context();
        router.route(&facts.route_input(message.room_id, facts.message(message), &context, &guard))
    }

    #[test]
    fn the_router_reads_the_decoded_message_and_the_gathered_facts() {
        let event = journaled(include_str!(
            "../../tests/fixtures/events/element-thread-reply.json"
        ));
        let m = message(&event);
        let facts = Facts {
            room: group_room(),
            recent: vec![line(owned_event_id!("$x"), "@bob:example.org", None)],
            reply_to_sender: Some(owned_user_id!("@coder:example.org")),
            reply_to_text: None,
            reply_to_ts: None,
            sender_paired: true,
            paired_member_joined: false,
            agents_here: true,
        };
        let context = facts.context();
        let guard = LoopGuard::default();
        let input = facts.route_input(m.room_id, facts.message(&m), &context, &guard);
        assert_eq!(*input.channel, ChannelId::MATRIX);
        assert_eq!(input.room_id, "!wSBuIXxGsHUpwsgadq:example.org");
        assert_eq!(input.room.aliases, ["#release:example.org"]);
        assert!(input.sender_paired);
        assert_eq!(input.recent.len(), 1);
        assert_eq!(input.recent[0].sender(), "@bob:example.org");
        let facts_of = &input.message;
        assert_eq!(facts_of.sender, "@alice:example.org");
        assert_eq!(facts_of.body, "exactly this one");
        assert_eq!(facts_of.formatted_body, None);
        assert_eq!(
            facts_of.reply_to_sender.map(|u| u.as_str()),
            Some("@coder:example.org")
        );
        assert_eq!(
            facts_of.thread_root.map(|e| e.as_str()),
            Some("$RootOfTheThread000000000000000000000000000")
        );
        assert!(
            facts_of
                .mentions
                .is_some_and(|m| m.user_ids.contains(&owned_user_id!("@coder:example.org")))
        );
        assert_eq!((facts_of.hops, facts_of.ts), (0, 1_718_000_200_000));
    }

    #[test]
    fn a_fluffychat_reply_to_an_agent_routes_to_that_agent() {
        let event = journaled(include_str!(
            "../../tests/fixtures/events/fluffychat-reply.json"
        ));
        let m = message(&event);
        let facts = Facts {
            room: group_room(),
            reply_to_sender: Some(owned_user_id!("@damon:example.org")),
            ..Facts::default()
        };
        let decision = route(&facts, &m);
        assert_eq!(decision.targets, ["damon"], "{}", decision.reason);
        assert_eq!(decision.strategy, Strategy::Reply);
    }

    #[test]
    fn a_thread_fallback_follows_the_thread_not_its_latest_event() {
        let event = journaled(include_str!(
            "../../tests/fixtures/events/element-thread-fallback.json"
        ));
        let m = message(&event);
        let root = owned_event_id!("$RootOfTheThread000000000000000000000000000");
        // coder answered in the thread; damon wrote its latest event, which the fallback
        // names — it is not a reply to damon.
        let facts = Facts {
            room: group_room(),
            recent: vec![
                line(root.clone(), "@alice:example.org", None),
                line(
                    owned_event_id!("$answer"),
                    "@coder:example.org",
                    Some(root.clone()),
                ),
            ],
            reply_to_sender: None,
            reply_to_text: None,
            reply_to_ts: None,
            sender_paired: false,
            paired_member_joined: false,
            agents_here: true,
        };
        assert!(m.reply_to.is_none());
        let decision = route(&facts, &m);
        assert_eq!(decision.targets, ["coder"], "{}", decision.reason);
        assert_eq!(decision.strategy, Strategy::Thread);
    }

    #[test]
    fn config_aliases_are_the_aliases_the_config_names_once_each() {
        let config = crate::config::Config::parse(&format!(
            r##"{CONFIG}
channels:
  matrix:
    groups: {{ "#ops:example.org": {{}}, "!raw:example.org": {{}}, "*": {{}} }}
bindings:
  - {{ agent: damon, match: {{ peer: "#ops:example.org" }} }}
  - {{ agent: coder, match: {{ peer: "#dev:example.org" }} }}
"##
        ))
        .unwrap();
        assert_eq!(
            config_aliases(&config),
            ["#dev:example.org", "#ops:example.org"]
        );
    }
}
