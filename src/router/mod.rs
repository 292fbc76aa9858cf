//! Pure routing: who answers a message. No I/O and no async, so every rule is unit-tested.
//!
//! This is the first routing: in a DM (two members) the agent in the room answers every
//! message; in a group room an agent answers when mentioned — through `m.mentions`, a
//! matrix.to pill, or a typed `@localpart` / `@display name` / `@alias` (CJK included).

use std::collections::BTreeSet;

use ruma::events::Mentions;
use ruma::{OwnedUserId, UserId};
use serde::Serialize;

use crate::config::Config;

/// An agent as the router sees it: its user and the names people type for it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Agent id (= localpart).
    pub id: String,
    pub user_id: OwnedUserId,
    /// Lower-cased names that may follow an `@`: localpart, display name, aliases.
    names: Vec<String>,
}

impl Candidate {
    /// A candidate with the given names (matched case-insensitively after `@`).
    pub fn new(id: &str, user_id: OwnedUserId, names: impl IntoIterator<Item = String>) -> Self {
        let mut all: Vec<String> = std::iter::once(id.to_owned())
            .chain(names)
            .map(|n| n.trim().to_lowercase())
            .collect();
        all.retain(|n| !n.is_empty());
        // Longest first, so `@Damon Bot` is not cut short by `@Damon`.
        all.sort_by_key(|n| std::cmp::Reverse(n.len()));
        all.dedup();
        Self {
            id: id.to_owned(),
            user_id,
            names: all,
        }
    }

    /// Every configured agent, in config order.
    pub fn all_from_config(config: &Config) -> Vec<Candidate> {
        config
            .agents
            .iter()
            .map(|a| {
                let names = a
                    .display_name
                    .iter()
                    .cloned()
                    .chain(a.aliases.iter().cloned());
                Candidate::new(&a.id, config.user_id(&a.id), names)
            })
            .collect()
    }
}

/// A message, reduced to what routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct MessageFacts<'a> {
    pub sender: &'a UserId,
    pub body: &'a str,
    pub formatted_body: Option<&'a str>,
    pub mentions: Option<&'a Mentions>,
    /// Whether the sender is one of our own virtual users.
    pub from_own_user: bool,
}

/// What we know about the room the message is in.
#[derive(Debug, Clone, Default)]
pub struct RoomFacts {
    /// Users whose membership is `join`.
    pub joined: BTreeSet<OwnedUserId>,
}

/// The rule that decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    Mention,
    DirectMessage,
    Nobody,
}

/// Who answers and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteDecision {
    /// Agent ids, in config order.
    pub targets: Vec<String>,
    pub strategy: Strategy,
    /// One line a person can read, naming the rule.
    pub reason: String,
}

impl RouteDecision {
    fn nobody(reason: impl Into<String>) -> Self {
        Self {
            targets: Vec::new(),
            strategy: Strategy::Nobody,
            reason: reason.into(),
        }
    }
}

/// Decides which of `candidates` answer `message` in a room described by `room`.
pub fn route_message(
    message: &MessageFacts<'_>,
    room: &RoomFacts,
    candidates: &[Candidate],
) -> RouteDecision {
    if message.from_own_user {
        return RouteDecision::nobody(
            "sender is one of our own virtual users (agent-to-agent is off)",
        );
    }
    let present: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| room.joined.contains(&c.user_id))
        .collect();
    if present.is_empty() {
        return RouteDecision::nobody("no agent is joined to this room");
    }

    let (mentioned, how) = find_mentions(message, &present);
    if !mentioned.is_empty() {
        let names: Vec<String> = mentioned.iter().map(|c| format!("@{}", c.id)).collect();
        return RouteDecision {
            reason: format!("mentioned {} ({how})", names.join(", ")),
            targets: mentioned.into_iter().map(|c| c.id.clone()).collect(),
            strategy: Strategy::Mention,
        };
    }

    if room.joined.len() == 2 && present.len() == 1 && room.joined.contains(message.sender) {
        return RouteDecision {
            targets: vec![present[0].id.clone()],
            strategy: Strategy::DirectMessage,
            reason: format!("direct message with @{}", present[0].id),
        };
    }
    RouteDecision::nobody("group room and no agent was mentioned")
}

/// The candidates a message mentions, in candidate order, and how they were found.
fn find_mentions<'c>(
    message: &MessageFacts<'_>,
    present: &[&'c Candidate],
) -> (Vec<&'c Candidate>, &'static str) {
    // m.mentions is authoritative when it names any of our agents; clients that send an
    // empty m.mentions for a typed "@damon" still get the text rules below.
    if let Some(mentions) = message.mentions {
        let found: Vec<&Candidate> = present
            .iter()
            .copied()
            .filter(|c| mentions.user_ids.contains(&c.user_id))
            .collect();
        if !found.is_empty() {
            return (found, "m.mentions");
        }
    }
    if let Some(html) = message.formatted_body {
        let pilled = pill_targets(&strip_reply_html(html));
        let found: Vec<&Candidate> = present
            .iter()
            .copied()
            .filter(|c| pilled.contains(&c.user_id))
            .collect();
        if !found.is_empty() {
            return (found, "matrix.to pill");
        }
    }
    let text = strip_reply_fallback(message.body).to_lowercase();
    let found: Vec<&Candidate> = present
        .iter()
        .copied()
        .filter(|c| c.names.iter().any(|name| contains_at_name(&text, name)))
        .collect();
    (found, "typed @name")
}

/// Whether `text` (lower-cased) contains `@name` as a mention: not glued to a preceding
/// Latin word (so `bob@damon.org` does not count), and — for a name ending in a Latin letter or
/// digit — not followed by another one (so `@damon` does not match `@damonx`). CJK names
/// have no word boundaries and match wherever they appear.
fn contains_at_name(text: &str, name: &str) -> bool {
    let needle_len = 1 + name.len();
    let mut from = 0;
    while let Some(pos) = text[from..].find('@') {
        let at = from + pos;
        from = at + 1;
        if !text[at + 1..].starts_with(name) {
            continue;
        }
        // Only a Latin word glued to the `@` (an e-mail address) disqualifies it; CJK text
        // runs straight into mentions.
        let before_ok = text[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        let after_ok = match (
            name.chars().next_back(),
            text[at + needle_len..].chars().next(),
        ) {
            (Some(last), Some(next)) if is_word_char(last) && last.is_ascii() => {
                !is_word_char(next)
            }
            _ => true,
        };
        if before_ok && after_ok {
            return true;
        }
    }
    false
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// User IDs linked with `https://matrix.to/#/@user:server` pills.
fn pill_targets(html: &str) -> BTreeSet<OwnedUserId> {
    const PREFIX: &str = "matrix.to/#/";
    let mut found = BTreeSet::new();
    let mut rest = html;
    while let Some(pos) = rest.find(PREFIX) {
        rest = &rest[pos + PREFIX.len()..];
        let end = rest.find(['"', '\'', '?', '>', ' ']).unwrap_or(rest.len());
        let raw = &rest[..end];
        let decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
        if let Ok(user) = UserId::parse(decoded.as_ref()) {
            found.insert(user);
        }
    }
    found
}

/// Drops the `<mx-reply>…</mx-reply>` quote older clients prepend to replies, so quoting
/// an agent's message is not a mention of it.
fn strip_reply_html(html: &str) -> String {
    match (html.find("<mx-reply>"), html.find("</mx-reply>")) {
        (Some(start), Some(end)) if end > start => {
            format!("{}{}", &html[..start], &html[end + "</mx-reply>".len()..])
        }
        _ => html.to_owned(),
    }
}

/// Drops leading `> ` quote lines of a plain-text reply fallback.
fn strip_reply_fallback(body: &str) -> &str {
    if !body.starts_with("> ") {
        return body;
    }
    let mut rest = body;
    while rest.starts_with('>') {
        rest = rest.split_once('\n').map_or("", |(_, tail)| tail);
    }
    rest.trim_start_matches('\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> OwnedUserId {
        UserId::parse(s).unwrap()
    }

    fn candidates() -> Vec<Candidate> {
        vec![
            Candidate::new(
                "damon",
                user("@damon:hs"),
                ["Damon".to_owned(), "戴蒙".to_owned()],
            ),
            Candidate::new("coder", user("@coder:hs"), ["Code Monkey".to_owned()]),
            Candidate::new("researcher", user("@researcher:hs"), []),
        ]
    }

    fn room(members: &[&str]) -> RoomFacts {
        RoomFacts {
            joined: members.iter().map(|m| user(m)).collect(),
        }
    }

    fn route(body: &str, room_facts: &RoomFacts) -> RouteDecision {
        let alice = user("@alice:hs");
        let message = MessageFacts {
            sender: &alice,
            body,
            formatted_body: None,
            mentions: None,
            from_own_user: false,
        };
        route_message(&message, room_facts, &candidates())
    }

    #[test]
    fn in_a_dm_the_agent_answers_everything() {
        let decision = route("hello there", &room(&["@alice:hs", "@damon:hs"]));
        assert_eq!(decision.targets, ["damon"]);
        assert_eq!(decision.strategy, Strategy::DirectMessage);
        assert_eq!(decision.reason, "direct message with @damon");
    }

    #[test]
    fn in_a_group_only_the_mentioned_agent_answers() {
        let group = room(&["@alice:hs", "@bob:hs", "@damon:hs", "@coder:hs"]);
        let cases: &[(&str, &[&str])] = &[
            ("hello there", &[]),
            ("@coder fix this", &["coder"]),
            ("hey @Coder, fix this", &["coder"]),
            ("@damon:hs what's up", &["damon"]),
            ("@戴蒙 你好", &["damon"]),
            ("你好@戴蒙帮我看看", &["damon"]),
            ("@code monkey please", &["coder"]),
            ("@damon and @coder both", &["damon", "coder"]),
            ("@damonx is not damon", &[]),
            ("mail bob@damon.org", &[]),
            ("@researcher is not in this room", &[]),
            ("> <@alice:hs> @damon said\n\nthanks all", &[]),
        ];
        for (body, expected) in cases {
            let decision = route(body, &group);
            assert_eq!(
                decision.targets, *expected,
                "body {body:?}: {}",
                decision.reason
            );
            let strategy = if expected.is_empty() {
                Strategy::Nobody
            } else {
                Strategy::Mention
            };
            assert_eq!(decision.strategy, strategy, "body {body:?}");
        }
    }

    #[test]
    fn a_two_member_room_without_the_sender_is_not_a_dm() {
        let decision = route("hi", &room(&["@damon:hs", "@coder:hs"]));
        assert!(decision.targets.is_empty());
    }

    #[test]
    fn m_mentions_are_authoritative_when_they_name_an_agent() {
        let group = room(&["@alice:hs", "@damon:hs", "@coder:hs"]);
        let alice = user("@alice:hs");
        let mut mentions = Mentions::new();
        mentions.user_ids.insert(user("@coder:hs"));
        let message = MessageFacts {
            sender: &alice,
            body: "Damon's idea: @damon look",
            formatted_body: None,
            mentions: Some(&mentions),
            from_own_user: false,
        };
        let decision = route_message(&message, &group, &candidates());
        assert_eq!(decision.targets, ["coder"]);
        assert_eq!(decision.reason, "mentioned @coder (m.mentions)");

        // An empty m.mentions falls back to the text rules.
        let empty = Mentions::new();
        let message = MessageFacts {
            mentions: Some(&empty),
            ..message
        };
        assert_eq!(
            route_message(&message, &group, &candidates()).targets,
            ["damon"]
        );
    }

    #[test]
    fn a_pill_mentions_its_user() {
        let group = room(&["@alice:hs", "@damon:hs", "@coder:hs"]);
        let alice = user("@alice:hs");
        let message = MessageFacts {
            sender: &alice,
            body: "Coder: look",
            formatted_body: Some(r#"<a href="https://matrix.to/#/%40coder%3Ahs">Coder</a>: look"#),
            mentions: None,
            from_own_user: false,
        };
        let decision = route_message(&message, &group, &candidates());
        assert_eq!(decision.targets, ["coder"]);
        assert_eq!(decision.reason, "mentioned @coder (matrix.to pill)");
    }

    #[test]
    fn our_own_users_never_route() {
        let damon = user("@damon:hs");
        let message = MessageFacts {
            sender: &damon,
            body: "@coder hi",
            formatted_body: None,
            mentions: None,
            from_own_user: true,
        };
        let decision = route_message(&message, &room(&["@damon:hs", "@coder:hs"]), &candidates());
        assert!(decision.targets.is_empty());
        assert_eq!(decision.strategy, Strategy::Nobody);
    }

    #[test]
    fn no_agent_in_the_room_means_nobody() {
        let decision = route("@damon hi", &room(&["@alice:hs", "@bob:hs"]));
        assert_eq!(decision.reason, "no agent is joined to this room");
    }
}
