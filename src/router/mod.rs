//! Pure routing: who answers a message, and why. No I/O, no clock, no async: the inbox
//! gathers the facts (room members, recent history, pairing state), [`Router::route`]
//! decides, and the same call explains a route from the CLI and the admin API.
//!
//! # Order of decision
//!
//! 1. **Who sent it.** The appservice bot never routes. An agent's message routes only
//!    when `routing.agent_to_agent` is on, both agents are allowed, the hop counter is under
//!    `max_hops`, the pair is not cooling down — and then only by explicit mention.
//! 2. **Admission** ([`admission`], the same policy that decides invites). DMs:
//!    `channels.<ch>.dm_policy` (`pairing`, `allowlist`, `open`, `disabled`). Group rooms:
//!    `group_policy` (`open`, `allowlist`, `disabled`), `group_allow_from`, and whether an
//!    admitted or paired person vouches for the room. A refused message is never
//!    answered; an unknown sender gets a pairing code, not answers.
//! 3. **Strategies**, the first that names an agent allowed in the room wins:
//!    explicit mention > reply to an agent / thread an agent answered in > broadcast
//!    (`@all`, `@room`) > keyword > context (follow-up with the last agent) > the DM's agent
//!    or, with `auto_reply`, the room's bound agent > nobody. In group rooms that
//!    `require_mention` (the default) only addressed messages route: mention, reply,
//!    thread, broadcast and keyword rules, not context or auto-reply.
//!
//! An agent is *allowed* in a room when it is joined and, in a group room with an
//! `agents:` list, listed there. Nothing routes to any other agent.

mod admission;
mod bindings;
pub mod explain;
mod guard;
mod keyword;
mod mention;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use regex::Regex;
use ruma::events::Mentions;
use ruma::{EventId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use wildmatch::WildMatch;

pub use self::admission::{Act, Admission, Place, Standing};
pub use self::bindings::{BindingHit, Conversation, Tier};
pub use self::guard::LoopGuard;
use self::keyword::KeywordMatcher;
use self::mention::{
    TypedNames, contains_at_name, pill_targets, strip_reply_fallback, strip_reply_html,
};
use crate::config::{
    AgentId, ChannelId, ChannelPolicyConfig, Config, GroupRoomConfig, RoutingConfig,
};

/// An agent as the router sees it: its user, the names people type for it and its
/// mention patterns.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Agent id (= localpart).
    pub id: AgentId,
    pub user_id: OwnedUserId,
    /// Lower-cased names that may follow an `@`: localpart, display name, aliases.
    names: Vec<String>,
    patterns: Vec<Regex>,
    /// A team's user: it takes tasks, and is not one of "every agent" of a broadcast.
    pub team: bool,
}

impl Candidate {
    /// A candidate with the given names (matched case-insensitively after `@`).
    fn new(id: &AgentId, user_id: OwnedUserId, names: impl IntoIterator<Item = String>) -> Self {
        let mut all: Vec<String> = std::iter::once(id.to_string())
            .chain(names)
            .map(|n| n.trim().to_lowercase())
            .collect();
        all.retain(|n| !n.is_empty());
        // Longest first, so `@Damon Bot` is not cut short by `@Damon`.
        all.sort_by_key(|n| std::cmp::Reverse(n.len()));
        all.dedup();
        Self {
            id: id.clone(),
            user_id,
            names: all,
            patterns: Vec::new(),
            team: false,
        }
    }

    /// Every configured agent, in config order, then every team.
    pub fn all_from_config(config: &Config) -> Vec<Candidate> {
        let teams = config.teams.iter().map(|t| {
            let names = t
                .display_name
                .iter()
                .cloned()
                .chain(t.aliases.iter().cloned());
            let mut candidate = Candidate::new(&t.id, config.user_id(&t.id), names);
            candidate.team = true;
            candidate
        });
        config
            .agents
            .iter()
            .map(|a| {
                let names = a
                    .display_name
                    .iter()
                    .cloned()
                    .chain(a.aliases.iter().cloned());
                let mut candidate = Candidate::new(&a.id, config.user_id(&a.id), names);
                candidate.patterns = a
                    .mention_patterns
                    .iter()
                    .filter_map(|p| Regex::new(&format!("(?i:{p})")).ok())
                    .collect();
                candidate
            })
            .chain(teams)
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
    /// Sender of the event this message replies to (`m.in_reply_to`), if known.
    pub reply_to_sender: Option<&'a UserId>,
    /// Root of the thread the message is in.
    pub thread_root: Option<&'a EventId>,
    /// Agent-to-agent hop counter carried in the content (`io.agentbus.hops`); 0 from people.
    pub hops: u32,
    /// origin_server_ts, in milliseconds.
    pub ts: u64,
}

/// What we know about the room the message is in.
#[derive(Debug, Clone, Default)]
pub struct RoomFacts {
    /// Users whose membership is `join`.
    pub joined: BTreeSet<OwnedUserId>,
    /// Aliases the room is known by in the config (resolved to this room at startup).
    pub aliases: Vec<String>,
}

/// A line of recent room history as the router reads it (the store's history entries
/// are one; the router does not depend on how they are kept).
pub trait ContextLine: Send + Sync {
    fn event_id(&self) -> &EventId;
    fn sender(&self) -> &UserId;
    /// Milliseconds since the epoch.
    fn ts(&self) -> u64;
    /// Root of the thread the line was said in.
    fn thread_root(&self) -> Option<&EventId>;
    /// Agents the line was routed to (for a person's message).
    fn routed_to(&self) -> &[AgentId];
}

/// Everything one decision looks at.
#[derive(Clone, Copy)]
pub struct RouteInput<'a> {
    /// `matrix`, or the bridged platform the room is a portal of.
    pub channel: &'a ChannelId,
    pub room_id: &'a RoomId,
    pub room: &'a RoomFacts,
    pub message: MessageFacts<'a>,
    /// Recent room history, oldest first, without this message.
    pub recent: &'a [&'a dyn ContextLine],
    /// Whether the sender was approved by pairing on this channel.
    pub sender_paired: bool,
    /// Whether a person other than the sender who was approved by pairing is joined
    /// (members matching `allow_from` the router sees itself): such a person vouches for a
    /// group room (see [`admission`]).
    pub paired_member_joined: bool,
    pub guard: &'a LoopGuard,
}

/// The rule that decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    Mention,
    Reply,
    Thread,
    Broadcast,
    Keyword,
    Context,
    DirectMessage,
    AutoReply,
    /// A room whose work goes to a team (`groups.<room>.team`): the team takes it.
    Team,
    /// An unknown DM sender: the agent sends a pairing code and nothing else.
    Pairing,
    /// A policy or the loop guard refused the message.
    Refused,
    Nobody,
}

impl Strategy {
    /// The name the JSON and the metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Mention => "mention",
            Strategy::Reply => "reply",
            Strategy::Thread => "thread",
            Strategy::Broadcast => "broadcast",
            Strategy::Keyword => "keyword",
            Strategy::Context => "context",
            Strategy::DirectMessage => "direct_message",
            Strategy::AutoReply => "auto_reply",
            Strategy::Team => "team",
            Strategy::Pairing => "pairing",
            Strategy::Refused => "refused",
            Strategy::Nobody => "nobody",
        }
    }
}

/// Who answers and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteDecision {
    /// Agent ids, in config order.
    pub targets: Vec<AgentId>,
    pub strategy: Strategy,
    /// One line a person can read, naming the rule.
    pub reason: String,
    /// With [`Strategy::Pairing`]: the agent that sends the pairing code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairing_agent: Option<AgentId>,
}

impl RouteDecision {
    fn nobody(reason: impl Into<String>) -> Self {
        Self::without_targets(Strategy::Nobody, reason)
    }

    fn refused(reason: impl Into<String>) -> Self {
        Self::without_targets(Strategy::Refused, reason)
    }

    fn without_targets(strategy: Strategy, reason: impl Into<String>) -> Self {
        Self {
            targets: Vec::new(),
            strategy,
            reason: reason.into(),
            pairing_agent: None,
        }
    }
}

/// Sender globs, compiled.
#[derive(Debug, Clone)]
struct Globs(Vec<WildMatch>);

impl Globs {
    fn new(globs: &[String]) -> Self {
        Self(
            globs
                .iter()
                .map(|g| WildMatch::new_case_insensitive(g.trim()))
                .collect(),
        )
    }

    fn matches(&self, sender: &str) -> bool {
        self.0.iter().any(|g| g.matches(sender))
    }
}

#[derive(Debug, Clone)]
struct ChannelRules {
    policy: ChannelPolicyConfig,
    allow_from: Globs,
    group_allow_from: Globs,
}

impl ChannelRules {
    /// The room's own `groups:` entry, by room ID or one of its config aliases (not `*`).
    fn own_entry(&self, room_id: &RoomId, aliases: &[String]) -> Option<&GroupRoomConfig> {
        let groups = &self.policy.groups;
        std::iter::once(room_id.as_str())
            .chain(aliases.iter().map(String::as_str))
            .find_map(|key| groups.get(key))
    }

    fn new(policy: ChannelPolicyConfig) -> Self {
        Self {
            allow_from: Globs::new(&policy.allow_from),
            group_allow_from: Globs::new(&policy.group_allow_from),
            policy,
        }
    }
}

/// The settings of one group room after merging its own entry over `*`.
#[derive(Debug)]
struct RoomSettings<'c> {
    /// Whether the room has an entry of its own (for `group_policy: allowlist`).
    listed: bool,
    require_mention: bool,
    auto_reply: bool,
    /// Anyone here may broadcast.
    broadcast: bool,
    agents: Option<&'c [AgentId]>,
    /// The team the room's work goes to (`groups.<room>.team`).
    team: Option<&'c AgentId>,
}

/// Who sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SenderKind {
    Person,
    Agent(usize),
    Bot,
}

/// The routing rules of a config, compiled once and then asked per message.
#[derive(Debug, Clone)]
pub struct Router {
    candidates: Vec<Candidate>,
    bot: OwnedUserId,
    routing: RoutingConfig,
    keywords: KeywordMatcher,
    typed_names: TypedNames,
    bindings: bindings::Bindings,
    channels: BTreeMap<ChannelId, ChannelRules>,
    default_channel: ChannelRules,
    /// Per candidate: listed in `routing.agent_to_agent.allow`.
    agent_to_agent: Vec<bool>,
    broadcast_trigger: String,
    /// `routing.broadcast.allow_from`.
    broadcast_from: Globs,
}

impl Router {
    /// Compiles the routing rules of a validated config.
    pub fn new(config: &Config) -> Self {
        let candidates = Candidate::all_from_config(config);
        let index = |id: &AgentId| candidates.iter().position(|c| c.id == *id);
        let default_agent = config.agents.iter().position(|a| a.default).unwrap_or(0);
        Self {
            keywords: KeywordMatcher::new(&config.routing.keyword.rules, index),
            typed_names: TypedNames::new(candidates.iter().map(|c| c.names.as_slice())),
            bindings: bindings::Bindings::new(&config.bindings, default_agent, index),
            agent_to_agent: candidates
                .iter()
                .map(|c| config.routing.agent_to_agent.allow.contains(&c.id))
                .collect(),
            channels: config
                .channels
                .iter()
                .map(|(name, policy)| (name.clone(), ChannelRules::new(policy.clone())))
                .collect(),
            default_channel: ChannelRules::new(ChannelPolicyConfig::default()),
            broadcast_trigger: config.routing.broadcast.trigger.trim().to_lowercase(),
            broadcast_from: Globs::new(&config.routing.broadcast.allow_from),
            routing: config.routing.clone(),
            bot: config.sender_user_id(),
            candidates,
        }
    }

    /// The agents, in config order.
    pub fn candidates(&self) -> &[Candidate] {
        &self.candidates
    }

    /// The candidate whose user is `user`.
    pub fn agent_of(&self, user: &UserId) -> Option<&Candidate> {
        self.candidates.iter().find(|c| c.user_id == user)
    }

    /// Decides who answers.
    pub fn route(&self, input: &RouteInput<'_>) -> RouteDecision {
        let message = &input.message;
        let kind = self.sender_kind(message.sender);
        let a2a = &self.routing.agent_to_agent;
        if let SenderKind::Bot = kind {
            return RouteDecision::nobody("sent by the appservice's own bot user");
        }
        if let SenderKind::Agent(from) = kind {
            let id = &self.candidates[from].id;
            if !a2a.enabled {
                return RouteDecision::nobody(format!(
                    "sent by our agent @{id}; routing.agent_to_agent is off"
                ));
            }
            if !self.agent_to_agent[from] {
                return RouteDecision::refused(format!(
                    "sent by @{id}, which is not in routing.agent_to_agent.allow"
                ));
            }
            if message.hops >= a2a.max_hops {
                return RouteDecision::refused(format!(
                    "loop guard: hop {} reached routing.agent_to_agent.max_hops = {}",
                    message.hops, a2a.max_hops
                ));
            }
        }

        let joined: Vec<usize> = (0..self.candidates.len())
            .filter(|&i| input.room.joined.contains(&self.candidates[i].user_id))
            .collect();
        if joined.is_empty() {
            return RouteDecision::nobody("no agent is joined to this room");
        }
        let is_dm = kind == SenderKind::Person
            && joined.len() == 1
            && input.room.joined.len() == 2
            && input.room.joined.contains(message.sender);
        let rules = self
            .channels
            .get(input.channel)
            .unwrap_or(&self.default_channel);
        let settings = (!is_dm).then(|| self.room_settings(rules, input));

        // Who may answer here.
        let mut allowed = vec![false; self.candidates.len()];
        let mut cooled = Vec::new();
        for &i in &joined {
            let id = &self.candidates[i].id;
            let listed = settings
                .as_ref()
                .and_then(|s| s.agents)
                .is_none_or(|agents| agents.contains(id));
            allowed[i] = listed
                && match kind {
                    SenderKind::Agent(from) => {
                        let warm =
                            !input
                                .guard
                                .is_cooled(&self.candidates[from].id, id, message.ts);
                        if !warm {
                            cooled.push(format!("@{id}"));
                        }
                        i != from && self.agent_to_agent[i] && warm
                    }
                    _ => true,
                };
        }
        if !allowed.contains(&true) {
            return if cooled.is_empty() {
                RouteDecision::nobody("no agent in this room may answer here")
            } else {
                RouteDecision::refused(format!(
                    "loop guard: {} cooling down after too many agent-to-agent events",
                    cooled.join(", ")
                ))
            };
        }

        // The pairing code, when one is due, comes from the first agent that may answer.
        let speaker = allowed.iter().position(|&a| a).unwrap_or(joined[0]);
        if kind == SenderKind::Person
            && let Some(refusal) =
                self.check_policy(input, rules, settings.as_ref(), is_dm, speaker)
        {
            return refusal;
        }

        let lowered = strip_reply_fallback(message.body).to_lowercase();
        let routing = &self.routing;

        if routing.mention.enabled {
            let (mentioned, how) = self.find_mentions(message, &lowered, &allowed);
            if !mentioned.is_empty() {
                let names = self.names(&mentioned);
                return self.decide(
                    mentioned,
                    Strategy::Mention,
                    format!("mentioned {names} ({how})"),
                );
            }
        }
        if let SenderKind::Agent(from) = kind {
            return RouteDecision::nobody(format!(
                "a message from @{} routes only by explicit mention",
                self.candidates[from].id
            ));
        }

        if routing.context.enabled {
            if let Some(agent) = message
                .reply_to_sender
                .and_then(|user| self.index_of(user))
                .filter(|&i| allowed[i])
            {
                let reason = format!("reply to a message of @{}", self.candidates[agent].id);
                return self.decide(vec![agent], Strategy::Reply, reason);
            }
            if let Some(root) = message.thread_root
                && let Some(agent) = self.thread_agent(root, input.recent, &allowed)
            {
                let reason = format!(
                    "thread continues with @{}, who answered in it",
                    self.candidates[agent].id
                );
                return self.decide(vec![agent], Strategy::Thread, reason);
            }
        }

        if routing.broadcast.enabled
            && self.may_broadcast(message.sender, rules, settings.as_ref())
            && let Some(how) = self.broadcast_trigger(message, &lowered)
        {
            // A room whose work goes to a team broadcasts through the team.
            if let Some(team) = settings.as_ref().and_then(|s| s.team)
                && let Some(i) = self.candidates.iter().position(|c| c.id == *team)
                && allowed[i]
            {
                let reason = format!("broadcast ({how}) through the room's team @{team}");
                return self.decide(vec![i], Strategy::Broadcast, reason);
            }
            let everyone: Vec<usize> = (0..allowed.len())
                .filter(|&i| allowed[i] && !self.candidates[i].team)
                .collect();
            let reason = format!(
                "broadcast ({how}) to every agent allowed here: {}",
                self.names(&everyone)
            );
            return self.decide(everyone, Strategy::Broadcast, reason);
        }

        // A room whose work goes to a team: what nobody was addressed by is its task.
        let unaddressed_ok = settings.as_ref().is_none_or(|s| !s.require_mention);
        if let Some(team) = settings
            .as_ref()
            .filter(|_| unaddressed_ok)
            .and_then(|s| s.team)
            && let Some(i) = self.candidates.iter().position(|c| c.id == *team)
            && allowed[i]
        {
            let reason = format!("the room's work goes to team @{team} (groups team:)");
            return self.decide(vec![i], Strategy::Team, reason);
        }

        if routing.keyword.enabled
            && let Some(hit) = self.keywords.best(&lowered, message.body, |i| allowed[i])
        {
            let reason = format!(
                "keyword {:?} → @{} (routing.keyword.rules[{}])",
                hit.matched, self.candidates[hit.agent].id, hit.rule
            );
            return self.decide(vec![hit.agent], Strategy::Keyword, reason);
        }

        if routing.context.enabled
            && unaddressed_ok
            && let Some((agent, idle)) = self.continuation(input, &allowed)
        {
            let reason = format!(
                "follow-up: continues with @{} (last exchange {} ago; lookback {}, idle_timeout {})",
                self.candidates[agent].id,
                humantime::format_duration(round_secs(idle)),
                routing.context.lookback,
                humantime::format_duration(routing.context.idle_timeout),
            );
            return self.decide(vec![agent], Strategy::Context, reason);
        }

        match &settings {
            None => {
                let agent = joined[0];
                let reason = format!("direct message with @{}", self.candidates[agent].id);
                self.decide(vec![agent], Strategy::DirectMessage, reason)
            }
            Some(s) if s.auto_reply => {
                let hit = self
                    .bindings
                    .resolve(&self.conversation(input, is_dm), |i| allowed[i]);
                if allowed[hit.agent] {
                    let reason = format!(
                        "auto_reply: @{} owns this room by {}",
                        self.candidates[hit.agent].id,
                        hit.describe()
                    );
                    self.decide(vec![hit.agent], Strategy::AutoReply, reason)
                } else {
                    RouteDecision::nobody(format!(
                        "auto_reply is on but the owning agent @{} ({}) is not allowed in this room",
                        self.candidates[hit.agent].id,
                        hit.describe()
                    ))
                }
            }
            Some(s) if s.require_mention => RouteDecision::nobody(
                "group room that requires a mention, and nothing addressed an agent",
            ),
            Some(_) => RouteDecision::nobody("no routing rule matched"),
        }
    }

    fn decide(&self, mut agents: Vec<usize>, strategy: Strategy, reason: String) -> RouteDecision {
        agents.sort_unstable();
        agents.dedup();
        RouteDecision {
            targets: agents
                .into_iter()
                .map(|i| self.candidates[i].id.clone())
                .collect(),
            strategy,
            reason,
            pairing_agent: None,
        }
    }

    fn names(&self, agents: &[usize]) -> String {
        let mut names = String::with_capacity(agents.len() * 12);
        for (n, &i) in agents.iter().enumerate() {
            if n > 0 {
                names.push_str(", ");
            }
            names.push('@');
            names.push_str(&self.candidates[i].id);
        }
        names
    }

    fn index_of(&self, user: &UserId) -> Option<usize> {
        self.candidates.iter().position(|c| c.user_id == user)
    }

    fn sender_kind(&self, sender: &UserId) -> SenderKind {
        if sender == self.bot {
            SenderKind::Bot
        } else if let Some(i) = self.index_of(sender) {
            SenderKind::Agent(i)
        } else {
            // People, including the puppets of bridged people.
            SenderKind::Person
        }
    }

    fn room_settings<'c>(
        &self,
        rules: &'c ChannelRules,
        input: &RouteInput<'_>,
    ) -> RoomSettings<'c> {
        let own = rules.own_entry(input.room_id, &input.room.aliases);
        let star = rules.policy.groups.get("*");
        let pick = |f: &dyn Fn(&'c GroupRoomConfig) -> Option<bool>| {
            own.and_then(f).or_else(|| star.and_then(f))
        };
        let auto_reply = pick(&|g| g.auto_reply).unwrap_or(false);
        RoomSettings {
            listed: own.is_some(),
            require_mention: pick(&|g| g.require_mention).unwrap_or(!auto_reply),
            auto_reply,
            broadcast: pick(&|g| g.broadcast).unwrap_or(false),
            team: own
                .and_then(|g| g.team.as_ref())
                .or_else(|| star.and_then(|g| g.team.as_ref())),
            agents: own
                .and_then(|g| g.agents.as_deref())
                .or_else(|| star.and_then(|g| g.agents.as_deref())),
        }
    }

    /// Admission of a person's message (see [`admission`]); `Some` refuses or asks to pair,
    /// the pairing code coming from `speaker`.
    fn check_policy(
        &self,
        input: &RouteInput<'_>,
        rules: &ChannelRules,
        settings: Option<&RoomSettings<'_>>,
        is_dm: bool,
        speaker: usize,
    ) -> Option<RouteDecision> {
        let sender = input.message.sender.as_str();
        let place = if is_dm {
            Place::Dm
        } else {
            let listed = settings.is_some_and(|s| s.listed);
            Place::Group {
                listed,
                vouched: listed || input.paired_member_joined || self.member_vouches(input, rules),
            }
        };
        let standing = rules.standing(sender, input.sender_paired, place);
        match rules.admit(input.channel, sender, standing, place, Act::Message) {
            Admission::Admit => None,
            Admission::Pair { reason } => Some(RouteDecision {
                targets: Vec::new(),
                strategy: Strategy::Pairing,
                reason,
                pairing_agent: Some(self.candidates[speaker].id.clone()),
            }),
            Admission::Refuse { reason } => Some(RouteDecision::refused(reason)),
        }
    }

    /// Whether a joined person other than the sender is admitted by the channel's globs.
    fn member_vouches(&self, input: &RouteInput<'_>, rules: &ChannelRules) -> bool {
        input.room.joined.iter().any(|user| {
            user != input.message.sender
                && self.sender_kind(user) == SenderKind::Person
                && (rules.allow_from.matches(user.as_str())
                    || rules.group_allow_from.matches(user.as_str()))
        })
    }

    /// Whether `sender` is unknown to the channel's globs and `dm_policy` in a group room:
    /// only then does it matter whether a paired person vouches for the room (the inbox
    /// looks that up only when asked).
    pub fn needs_vouching(&self, channel: &ChannelId, sender: &UserId) -> bool {
        let rules = self.channels.get(channel).unwrap_or(&self.default_channel);
        let place = Place::Group {
            listed: false,
            vouched: false,
        };
        self.sender_kind(sender) == SenderKind::Person
            && rules.standing(sender.as_str(), false, place) == Standing::Unknown
    }

    /// How many rooms `sender` may bring agents into, or `None` when uncapped (our own
    /// users, senders in `allow_from`).
    pub fn room_cap(&self, channel: &ChannelId, sender: &UserId) -> Option<usize> {
        let rules = self.channels.get(channel).unwrap_or(&self.default_channel);
        (self.sender_kind(sender) == SenderKind::Person
            && !rules.allow_from.matches(sender.as_str()))
        .then_some(rules.policy.max_rooms_per_sender)
    }

    /// Admission of an invite of one of our agents into `room_id` (known by `aliases` in
    /// the config) from `inviter`: [`Admission::Admit`] and [`Admission::Pair`] join,
    /// [`Admission::Refuse`] declines. `is_direct` is the invite's own flag.
    pub fn admit_invite(
        &self,
        channel: &ChannelId,
        inviter: &UserId,
        inviter_paired: bool,
        room_id: &RoomId,
        aliases: &[String],
        is_direct: bool,
    ) -> Admission {
        if self.sender_kind(inviter) != SenderKind::Person {
            // Our own bot and agents bring agents in on the operator's behalf.
            return Admission::Admit;
        }
        let rules = self.channels.get(channel).unwrap_or(&self.default_channel);
        let place = if is_direct {
            Place::Dm
        } else {
            let listed = rules.own_entry(room_id, aliases).is_some();
            Place::Group {
                listed,
                vouched: listed,
            }
        };
        let standing = rules.standing(inviter.as_str(), inviter_paired, place);
        rules.admit(channel, inviter.as_str(), standing, place, Act::Invite)
    }

    /// The allowed candidates a message explicitly mentions, and how they were found.
    /// A reply's `m.mentions` names the replied-to user; that alone is a reply, not an
    /// explicit mention.
    fn find_mentions(
        &self,
        message: &MessageFacts<'_>,
        lowered: &str,
        allowed: &[bool],
    ) -> (Vec<usize>, &'static str) {
        let allowed_ids = || (0..self.candidates.len()).filter(|&i| allowed[i]);
        let reply_target = message.reply_to_sender;
        if let Some(mentions) = message.mentions {
            let found: Vec<usize> = allowed_ids()
                .filter(|&i| {
                    let user = &self.candidates[i].user_id;
                    mentions.user_ids.contains(user) && reply_target != Some(user.as_ref())
                })
                .collect();
            if !found.is_empty() {
                return (found, "m.mentions");
            }
        }
        if let Some(html) = message.formatted_body {
            let pilled = pill_targets(&strip_reply_html(html));
            let found: Vec<usize> = allowed_ids()
                .filter(|&i| pilled.contains(&self.candidates[i].user_id))
                .collect();
            if !found.is_empty() {
                return (found, "matrix.to pill");
            }
        }
        let mut named = vec![false; self.candidates.len()];
        self.typed_names.find(lowered, &mut named);
        let typed: Vec<usize> = allowed_ids().filter(|&i| named[i]).collect();
        if !typed.is_empty() {
            return (typed, "typed @name");
        }
        let patterned: Vec<usize> = allowed_ids()
            .filter(|&i| {
                self.candidates[i]
                    .patterns
                    .iter()
                    .any(|p| p.is_match(lowered))
            })
            .collect();
        (patterned, "mention pattern")
    }

    /// Whether `sender` may make every agent here answer at once: the admins
    /// (`allow_from`, `routing.broadcast.allow_from`) anywhere, anyone in a room that opts
    /// in with `broadcast: true`. One `@all` costs a model call per agent.
    fn may_broadcast(
        &self,
        sender: &UserId,
        rules: &ChannelRules,
        settings: Option<&RoomSettings<'_>>,
    ) -> bool {
        settings.is_some_and(|s| s.broadcast)
            || rules.allow_from.matches(sender.as_str())
            || self.broadcast_from.matches(sender.as_str())
    }

    fn broadcast_trigger(&self, message: &MessageFacts<'_>, lowered: &str) -> Option<&str> {
        if message.mentions.is_some_and(|m| m.room) {
            return Some("m.mentions.room");
        }
        let trigger = &self.broadcast_trigger;
        let typed = match trigger.strip_prefix('@') {
            Some(name) => contains_at_name(lowered, name),
            None => lowered.contains(trigger.as_str()),
        };
        if typed {
            Some(self.routing.broadcast.trigger.as_str())
        } else if contains_at_name(lowered, "room") {
            Some("@room")
        } else {
            None
        }
    }

    /// The agent that last answered in the thread rooted at `root`, or wrote its root.
    fn thread_agent(
        &self,
        root: &EventId,
        recent: &[&dyn ContextLine],
        allowed: &[bool],
    ) -> Option<usize> {
        recent
            .iter()
            .rev()
            .filter(|e| e.thread_root() == Some(root) || e.event_id() == root)
            .find_map(|e| self.index_of(e.sender()).filter(|&i| allowed[i]))
    }

    /// The agent the sender was just talking to (in the same thread or main timeline):
    /// their last routed message within the last `lookback` messages went to exactly one
    /// agent, and the exchange is not older than `idle_timeout`.
    fn continuation(&self, input: &RouteInput<'_>, allowed: &[bool]) -> Option<(usize, Duration)> {
        let context = &self.routing.context;
        let message = &input.message;
        let window = &input.recent[input.recent.len().saturating_sub(context.lookback)..];
        let same_line = |e: &&&dyn ContextLine| e.thread_root() == message.thread_root;
        let (position, last) = window
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, e)| same_line(e))
            .find(|(_, e)| e.sender() == message.sender && !e.routed_to().is_empty())?;
        let [agent_id] = last.routed_to() else {
            return None;
        };
        let agent = self.candidates.iter().position(|c| c.id == *agent_id)?;
        if !allowed[agent] {
            return None;
        }
        let agent_user = &self.candidates[agent].user_id;
        let latest = window[position..]
            .iter()
            .filter(|e| e.sender() == agent_user)
            .map(|e| e.ts())
            .chain([last.ts()])
            .max()
            .unwrap_or(last.ts());
        let idle = Duration::from_millis(message.ts.saturating_sub(latest));
        (idle <= context.idle_timeout).then_some((agent, idle))
    }

    /// The conversation as bindings see it.
    fn conversation(&self, input: &RouteInput<'_>, is_dm: bool) -> Conversation {
        let mut room_peers: Vec<String> = std::iter::once(input.room_id.to_string())
            .chain(input.room.aliases.iter().cloned())
            .collect();
        if is_dm {
            room_peers.push(input.message.sender.to_string());
        }
        let (peers, parent_peers) = match input.message.thread_root {
            Some(root) => (vec![root.to_string()], room_peers),
            None => (room_peers, Vec::new()),
        };
        Conversation {
            peers,
            parent_peers,
            ..Conversation::new(input.channel.clone())
        }
    }
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

#[cfg(test)]
mod tests;
