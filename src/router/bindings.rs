//! Bindings: which agent owns a conversation. Deterministic, most specific first:
//! peer > parent peer (a thread inherits its room) > peer `*` > guild + roles > guild >
//! team > account > account `*` > channel > the default agent. Every field of a binding
//! must match; within one tier the binding written first wins.

use std::fmt;

use serde::Serialize;

use crate::config::{AgentId, BindingConfig, BindingMatch, ChannelId};

/// Where a message was said, as bindings see it. For Matrix the channel is `matrix` and
/// the peers are the room ID, its aliases and, in a DM, the person; in a thread the peer
/// is the thread root and the room becomes the parent peer. Bridged platforms fill in
/// account, guild, team and roles too.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub channel: ChannelId,
    pub account: Option<String>,
    pub peers: Vec<String>,
    pub parent_peers: Vec<String>,
    pub guild: Option<String>,
    pub team: Option<String>,
    pub roles: Vec<String>,
}

impl Conversation {
    /// A conversation on `channel` that nothing else is known of yet.
    pub fn new(channel: ChannelId) -> Self {
        Self {
            channel,
            account: None,
            peers: Vec::new(),
            parent_peers: Vec::new(),
            guild: None,
            team: None,
            roles: Vec::new(),
        }
    }
}

/// How specific a binding is; lower sorts first and wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Peer,
    ParentPeer,
    AnyPeer,
    GuildRoles,
    Guild,
    Team,
    Account,
    AnyAccount,
    Channel,
    Default,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Peer => "peer",
            Tier::ParentPeer => "parent peer",
            Tier::AnyPeer => "peer *",
            Tier::GuildRoles => "guild + roles",
            Tier::Guild => "guild",
            Tier::Team => "team",
            Tier::Account => "account",
            Tier::AnyAccount => "account *",
            Tier::Channel => "channel",
            Tier::Default => "default agent",
        })
    }
}

/// The binding that decided: the agent (candidate index), its tier and its position in
/// `bindings:` (none for the default agent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingHit {
    pub agent: usize,
    pub tier: Tier,
    pub binding: Option<usize>,
}

impl BindingHit {
    /// `bindings[2] (peer)` or `the default agent`.
    pub fn describe(&self) -> String {
        match self.binding {
            Some(i) => format!("bindings[{i}] ({})", self.tier),
            None => "the default agent".to_owned(),
        }
    }
}

#[derive(Debug, Clone)]
struct Compiled {
    tier: Tier,
    index: usize,
    agent: usize,
    matches: BindingMatch,
}

/// The bindings of a config, sorted by tier.
#[derive(Debug, Clone)]
pub(super) struct Bindings {
    sorted: Vec<Compiled>,
    default_agent: usize,
}

impl Bindings {
    pub fn new(
        bindings: &[BindingConfig],
        default_agent: usize,
        agent_index: impl Fn(&AgentId) -> Option<usize>,
    ) -> Self {
        let mut sorted: Vec<Compiled> = bindings
            .iter()
            .enumerate()
            .filter_map(|(index, b)| {
                Some(Compiled {
                    tier: tier_of(&b.matches),
                    index,
                    agent: agent_index(&b.agent)?,
                    matches: b.matches.clone(),
                })
            })
            .collect();
        sorted.sort_by_key(|c| (c.tier, c.index));
        Self {
            sorted,
            default_agent,
        }
    }

    /// The binding owning `conversation`, among those whose agent passes `allowed`.
    pub fn resolve(
        &self,
        conversation: &Conversation,
        allowed: impl Fn(usize) -> bool,
    ) -> BindingHit {
        let exact_peer = || self.sorted.iter().take_while(|c| c.tier == Tier::Peer);
        let found = exact_peer()
            .find(|c| allowed(c.agent) && matches(c, conversation, &conversation.peers))
            .map(|c| (c, Tier::Peer))
            .or_else(|| {
                exact_peer()
                    .find(|c| {
                        allowed(c.agent) && matches(c, conversation, &conversation.parent_peers)
                    })
                    .map(|c| (c, Tier::ParentPeer))
            })
            .or_else(|| {
                self.sorted
                    .iter()
                    .skip_while(|c| c.tier == Tier::Peer)
                    .find(|c| allowed(c.agent) && matches(c, conversation, &conversation.peers))
                    .map(|c| (c, c.tier))
            });
        match found {
            Some((c, tier)) => BindingHit {
                agent: c.agent,
                tier,
                binding: Some(c.index),
            },
            None => BindingHit {
                agent: self.default_agent,
                tier: Tier::Default,
                binding: None,
            },
        }
    }
}

/// The tier of a binding: its most specific field.
fn tier_of(m: &BindingMatch) -> Tier {
    match (&m.peer, &m.guild, &m.team, &m.account) {
        (Some(peer), ..) if peer != "*" => Tier::Peer,
        (Some(_), ..) => Tier::AnyPeer,
        (None, Some(_), ..) if !m.roles.is_empty() => Tier::GuildRoles,
        (None, Some(_), ..) => Tier::Guild,
        (None, None, Some(_), _) => Tier::Team,
        (None, None, None, Some(account)) if account != "*" => Tier::Account,
        (None, None, None, Some(_)) => Tier::AnyAccount,
        (None, None, None, None) => Tier::Channel,
    }
}

/// Whether every field of the binding matches; its peer is compared with `peers`.
fn matches(c: &Compiled, conversation: &Conversation, peers: &[String]) -> bool {
    let m = &c.matches;
    let same = |want: &Option<String>, have: &Option<String>| match want {
        None => true,
        Some(w) if w == "*" => true,
        Some(w) => have.as_deref() == Some(w.as_str()),
    };
    m.channel
        .as_ref()
        .is_none_or(|ch| *ch == conversation.channel)
        && same(&m.account, &conversation.account)
        && m.peer.as_ref().is_none_or(|p| {
            if p == "*" {
                true
            } else {
                peers.iter().any(|have| have == p)
            }
        })
        && same(&m.guild, &conversation.guild)
        && same(&m.team, &conversation.team)
        && (m.roles.is_empty() || m.roles.iter().any(|r| conversation.roles.contains(r)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENTS: [&str; 4] = ["main", "a", "b", "c"];

    fn bindings(yaml: &str) -> Bindings {
        let parsed: Vec<BindingConfig> = serde_yaml::from_str(yaml).unwrap();
        Bindings::new(&parsed, 0, |id| AGENTS.iter().position(|a| a == id))
    }

    fn conversation(fields: &[(&str, &str)]) -> Conversation {
        let mut c = Conversation::new(ChannelId::MATRIX);
        for (key, value) in fields {
            let v = value.to_string();
            match *key {
                "channel" => c.channel = ChannelId::new(v),
                "account" => c.account = Some(v),
                "peer" => c.peers.push(v),
                "parent" => c.parent_peers.push(v),
                "guild" => c.guild = Some(v),
                "team" => c.team = Some(v),
                "role" => c.roles.push(v),
                other => panic!("unknown field {other}"),
            }
        }
        c
    }

    /// Every tier beats every tier below it: for each pair (higher, lower) a conversation
    /// matching both goes to the higher one, whatever their order in the file.
    #[test]
    fn each_tier_beats_every_lower_tier() {
        let tiers: [(&str, Tier); 9] = [
            ("{ peer: '!room' }", Tier::Peer),
            ("{ peer: '!parent' }", Tier::ParentPeer),
            ("{ peer: '*' }", Tier::AnyPeer),
            ("{ guild: g, roles: [admin] }", Tier::GuildRoles),
            ("{ guild: g }", Tier::Guild),
            ("{ team: t }", Tier::Team),
            ("{ account: acct }", Tier::Account),
            ("{ account: '*' }", Tier::AnyAccount),
            ("{ channel: telegram }", Tier::Channel),
        ];
        let conv = conversation(&[
            ("channel", "telegram"),
            ("account", "acct"),
            ("peer", "!room"),
            ("parent", "!parent"),
            ("guild", "g"),
            ("team", "t"),
            ("role", "admin"),
        ]);
        for (hi, (high, high_tier)) in tiers.iter().enumerate() {
            for (low, low_tier) in &tiers[hi + 1..] {
                // The lower tier is written first, so only specificity can pick the higher.
                let yaml = format!("[{{ agent: b, match: {low} }}, {{ agent: a, match: {high} }}]");
                let hit = bindings(&yaml).resolve(&conv, |_| true);
                assert_eq!(hit.agent, 1, "{high_tier} should beat {low_tier}");
                assert_eq!(hit.tier, *high_tier);
                assert_eq!(hit.binding, Some(1));
            }
        }
    }

    #[test]
    fn all_fields_must_match_and_the_first_binding_of_a_tier_wins() {
        let b = bindings(
            "[ { agent: a, match: { channel: slack, peer: '!room' } },
               { agent: b, match: { peer: '!room' } },
               { agent: c, match: { peer: '!room' } } ]",
        );
        let hit = b.resolve(&conversation(&[("peer", "!room")]), |_| true);
        assert_eq!((hit.agent, hit.binding), (2, Some(1)));
        assert_eq!(hit.describe(), "bindings[1] (peer)");
    }

    #[test]
    fn nothing_matching_falls_back_to_the_default_agent() {
        let b = bindings(
            "[ { agent: a, match: { peer: '!other' } }, { agent: b, match: { guild: g, roles: [x] } } ]",
        );
        let hit = b.resolve(
            &conversation(&[("peer", "!room"), ("guild", "g"), ("role", "y")]),
            |_| true,
        );
        assert_eq!(hit.agent, 0);
        assert_eq!(hit.tier, Tier::Default);
        assert_eq!(hit.describe(), "the default agent");
    }

    #[test]
    fn a_thread_inherits_its_rooms_binding() {
        let b = bindings("[ { agent: a, match: { peer: '!room' } } ]");
        let hit = b.resolve(
            &conversation(&[("peer", "$thread"), ("parent", "!room")]),
            |_| true,
        );
        assert_eq!((hit.agent, hit.tier), (1, Tier::ParentPeer));
    }

    #[test]
    fn bindings_to_disallowed_agents_are_passed_over() {
        let b = bindings(
            "[ { agent: a, match: { peer: '!room' } }, { agent: b, match: { channel: matrix } } ]",
        );
        let hit = b.resolve(&conversation(&[("peer", "!room")]), |agent| agent != 1);
        assert_eq!((hit.agent, hit.tier), (2, Tier::Channel));
    }
}
