//! The routing part of `agentbus.yaml`: `routing:` (strategies), `bindings:` (which agent
//! owns which conversation), `channels:` (DM and group policies per channel) and `admin:`.
//! [`crate::router`] compiles these into its matchers; this module only describes them and
//! checks them.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{AgentId, ChannelId};

/// Channels a conversation can come from: Matrix itself and the bridged platforms.
pub const KNOWN_CHANNELS: &[&str] = &[
    "matrix", "telegram", "slack", "dingtalk", "feishu", "wecom", "irc", "webhook",
];

/// `routing:`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    #[serde(default)]
    pub mention: MentionConfig,
    #[serde(default)]
    pub keyword: KeywordConfig,
    #[serde(default)]
    pub context: ContextConfig,
    #[serde(default)]
    pub broadcast: BroadcastConfig,
    #[serde(default)]
    pub agent_to_agent: AgentToAgentConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// `routing.limits:` — how many model-backed answers people can cause: a token bucket per
/// sender and one per room. Each agent that answers a message takes one; an empty bucket
/// refills evenly over `per`. A message over a limit is not answered, and the first one
/// gets a notice saying so.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "default_sender_rate")]
    pub per_sender: RateConfig,
    #[serde(default = "default_room_rate")]
    pub per_room: RateConfig,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            per_sender: default_sender_rate(),
            per_room: default_room_rate(),
        }
    }
}

/// `{ answers: 60, per: 10m }`: at most `answers` at once, refilled over `per`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    pub answers: u32,
    #[serde(with = "humantime_serde")]
    pub per: Duration,
}

fn default_sender_rate() -> RateConfig {
    RateConfig {
        answers: 60,
        per: Duration::from_secs(600),
    }
}

fn default_room_rate() -> RateConfig {
    RateConfig {
        answers: 120,
        per: Duration::from_secs(600),
    }
}

/// `routing.mention:` — `@name`, pills, `m.mentions`, aliases and per-agent patterns.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MentionConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
}

impl Default for MentionConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// `routing.keyword:` — words that send a message to an agent without a mention.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeywordConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub rules: Vec<KeywordRule>,
}

impl Default for KeywordConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            rules: Vec::new(),
        }
    }
}

/// One keyword rule: any of `keywords` (case-insensitive; Latin words on word boundaries,
/// CJK anywhere) or `regex` sends the message to `agent`. The highest `priority` wins; on a
/// tie, the rule written first.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeywordRule {
    #[serde(default)]
    pub keywords: Vec<String>,
    #[serde(default)]
    pub regex: Option<String>,
    pub agent: AgentId,
    #[serde(default)]
    pub priority: i32,
}

/// `routing.context:` — replies, threads, and follow-ups continue with the same agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How many recent room messages to look back through for the sender's last exchange.
    #[serde(default = "default_lookback")]
    pub lookback: usize,
    /// A follow-up later than this after the last exchange starts afresh.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            lookback: default_lookback(),
            idle_timeout: default_idle_timeout(),
        }
    }
}

/// `routing.broadcast:` — `@all` (and `@room`) goes to every agent allowed in the room.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BroadcastConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_broadcast_trigger")]
    pub trigger: String,
    /// Sender globs who may broadcast, besides the channel's `allow_from` (the admins);
    /// anyone may in a room whose `groups:` entry sets `broadcast: true`. Everyone else's
    /// `@all` is an ordinary message.
    #[serde(default)]
    pub allow_from: Vec<String>,
}

impl Default for BroadcastConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            trigger: default_broadcast_trigger(),
            allow_from: Vec::new(),
        }
    }
}

/// `routing.agent_to_agent:` — whether agents' own messages may route to other agents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentToAgentConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Agents that may talk to each other; both ends must be listed.
    #[serde(default)]
    pub allow: Vec<AgentId>,
    /// Longest chain of agent messages started by one human message.
    #[serde(default = "default_max_hops")]
    pub max_hops: u32,
    /// A pair exchanging more than this many events within `pair_window` is cooled down.
    #[serde(default = "default_pair_limit")]
    pub pair_limit: usize,
    #[serde(default = "default_minute", with = "humantime_serde")]
    pub pair_window: Duration,
    #[serde(default = "default_minute", with = "humantime_serde")]
    pub cooldown: Duration,
}

impl Default for AgentToAgentConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            allow: Vec::new(),
            max_hops: default_max_hops(),
            pair_limit: default_pair_limit(),
            pair_window: default_minute(),
            cooldown: default_minute(),
        }
    }
}

/// One entry of `bindings:`: conversations matching every field of `match` belong to
/// `agent`. The most specific binding wins (see [`crate::router`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingConfig {
    pub agent: AgentId,
    #[serde(rename = "match")]
    pub matches: BindingMatch,
}

/// `bindings[].match:`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingMatch {
    /// `matrix`, `telegram`, …
    #[serde(default)]
    pub channel: Option<ChannelId>,
    /// The bot account on that channel; `*` matches any.
    #[serde(default)]
    pub account: Option<String>,
    /// A room ID or alias, a DM peer's user ID, a bridged chat ID; `*` matches any.
    #[serde(default)]
    pub peer: Option<String>,
    /// A server / workspace (Discord guild, Slack workspace, …).
    #[serde(default)]
    pub guild: Option<String>,
    #[serde(default)]
    pub team: Option<String>,
    /// With `guild`: the sender must hold one of these roles.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// How direct messages from people are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DmPolicy {
    /// Unknown senders get a pairing code and nothing else until an admin approves it.
    #[default]
    Pairing,
    /// Only senders matching `allow_from`.
    Allowlist,
    /// Anyone.
    Open,
    /// Agents never answer DMs.
    Disabled,
}

/// Which group rooms agents answer in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupPolicy {
    /// Any room an agent was invited to.
    #[default]
    Open,
    /// Only rooms listed under `groups:` (not `*`).
    Allowlist,
    /// Agents never answer in group rooms.
    Disabled,
}

/// `channels.<name>:` — the policies of one channel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelPolicyConfig {
    #[serde(default)]
    pub dm_policy: DmPolicy,
    /// Sender globs (`@*:example.org`) let into DMs under `allowlist`, and without pairing
    /// under `pairing`.
    #[serde(default)]
    pub allow_from: Vec<String>,
    #[serde(default)]
    pub group_policy: GroupPolicy,
    /// When set, only senders matching one of these globs are answered in group rooms.
    #[serde(default)]
    pub group_allow_from: Vec<String>,
    /// Per-room settings by room ID or alias; `*` sets the defaults for every room.
    #[serde(default)]
    pub groups: BTreeMap<String, GroupRoomConfig>,
    /// How many rooms one sender not in `allow_from` may bring agents into (invites
    /// beyond it are declined); counted since start-up.
    #[serde(default = "default_rooms_per_sender")]
    pub max_rooms_per_sender: usize,
}

impl Default for ChannelPolicyConfig {
    fn default() -> Self {
        Self {
            dm_policy: DmPolicy::default(),
            allow_from: Vec::new(),
            group_policy: GroupPolicy::default(),
            group_allow_from: Vec::new(),
            groups: BTreeMap::new(),
            max_rooms_per_sender: default_rooms_per_sender(),
        }
    }
}

fn default_rooms_per_sender() -> usize {
    10
}

/// `channels.<name>.groups.<room>:`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRoomConfig {
    /// Answer only messages addressed to an agent (mention, reply, thread, `@all`,
    /// keyword). Default true, or false when `auto_reply` is on.
    #[serde(default)]
    pub require_mention: Option<bool>,
    /// Agents that may answer in this room (default: every agent in it).
    #[serde(default)]
    pub agents: Option<Vec<AgentId>>,
    /// The room's bound agent answers every message nobody else was addressed by.
    #[serde(default)]
    pub auto_reply: Option<bool>,
    /// Anyone in the room may broadcast (`@all`, `@room`), not only the senders in
    /// `allow_from` and `routing.broadcast.allow_from`.
    #[serde(default)]
    pub broadcast: Option<bool>,
    /// The team the room's work goes to: with `require_mention: false`, every message
    /// nobody was addressed by becomes a task of this team, and `@all` its broadcast.
    #[serde(default)]
    pub team: Option<AgentId>,
}

/// `admin:` — the HTTP admin API (`/api/v1/*`) and the CLI that talks to it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer token of the admin API. Generated and saved on first run when absent;
    /// `AGENTBUS_ADMIN_TOKEN` overrides it.
    #[serde(default)]
    pub token: Option<String>,
    /// Who may run management commands (`!agents`, `!pairing approve …`) in Matrix: user
    /// ID globs such as `@alice:example.org` or `@*:ops.example.org`. Empty: nobody.
    #[serde(default)]
    pub users: Vec<String>,
}

impl AdminConfig {
    /// Whether `user` matches one of [`AdminConfig::users`].
    pub fn is_admin(&self, user: &str) -> bool {
        self.users
            .iter()
            .any(|glob| wildmatch::WildMatch::new(glob).matches(user))
    }
}

/// A regex error on one line: `invalid regex: unclosed group`.
pub(super) fn regex_problem(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text.lines().last().unwrap_or_default();
    format!("invalid regex: {}", last.trim_start_matches("error: "))
}

fn yes() -> bool {
    true
}
fn default_lookback() -> usize {
    5
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_broadcast_trigger() -> String {
    "@all".to_owned()
}
fn default_max_hops() -> u32 {
    3
}
fn default_pair_limit() -> usize {
    20
}
fn default_minute() -> Duration {
    Duration::from_secs(60)
}

/// Validates the routing-related sections; `agent_known` tells whether an agent id exists.
pub(super) fn validate(
    routing: &RoutingConfig,
    bindings: &[BindingConfig],
    channels: &BTreeMap<ChannelId, ChannelPolicyConfig>,
    admin: &AdminConfig,
    agent_known: &dyn Fn(&AgentId) -> bool,
    problem: &mut dyn FnMut(String, String),
) {
    let mut unknown_agent = |key: String, id: &AgentId| {
        if !agent_known(id) {
            problem(key, format!("unknown agent {id:?}"));
            true
        } else {
            false
        }
    };
    let mut later = Vec::new();
    for (i, rule) in routing.keyword.rules.iter().enumerate() {
        let at = format!("routing.keyword.rules[{i}]");
        unknown_agent(format!("{at}.agent"), &rule.agent);
        if rule.keywords.is_empty() && rule.regex.is_none() {
            later.push((at.clone(), "needs `keywords` or `regex`".to_owned()));
        }
        for (j, keyword) in rule.keywords.iter().enumerate() {
            if keyword.trim().is_empty() {
                later.push((
                    format!("{at}.keywords[{j}]"),
                    "must not be empty".to_owned(),
                ));
            }
        }
        if let Some(regex) = &rule.regex
            && let Err(e) = regex::Regex::new(regex)
        {
            later.push((format!("{at}.regex"), regex_problem(&e)));
        }
    }
    for (i, id) in routing.agent_to_agent.allow.iter().enumerate() {
        unknown_agent(format!("routing.agent_to_agent.allow[{i}]"), id);
    }
    for (i, binding) in bindings.iter().enumerate() {
        let at = format!("bindings[{i}]");
        unknown_agent(format!("{at}.agent"), &binding.agent);
        let m = &binding.matches;
        if m.channel.is_none()
            && m.account.is_none()
            && m.peer.is_none()
            && m.guild.is_none()
            && m.team.is_none()
        {
            later.push((
                format!("{at}.match"),
                "needs at least one of channel, account, peer, guild, team".to_owned(),
            ));
        }
        if !m.roles.is_empty() && m.guild.is_none() {
            later.push((format!("{at}.match.roles"), "needs `guild`".to_owned()));
        }
        if let Some(channel) = &m.channel
            && !KNOWN_CHANNELS.contains(&channel.as_str())
        {
            later.push((
                format!("{at}.match.channel"),
                format!(
                    "unknown channel {channel:?}; known: {}",
                    KNOWN_CHANNELS.join(", ")
                ),
            ));
        }
    }
    for (name, channel) in channels {
        let at = format!("channels.{name}");
        if !KNOWN_CHANNELS.contains(&name.as_str()) {
            later.push((
                at.clone(),
                format!("unknown channel; known: {}", KNOWN_CHANNELS.join(", ")),
            ));
        }
        for (key, globs) in [
            ("allow_from", &channel.allow_from),
            ("group_allow_from", &channel.group_allow_from),
        ] {
            for (j, glob) in globs.iter().enumerate() {
                if glob.trim().is_empty() {
                    later.push((format!("{at}.{key}[{j}]"), "must not be empty".to_owned()));
                }
            }
        }
        if channel.dm_policy == DmPolicy::Allowlist && channel.allow_from.is_empty() {
            later.push((
                format!("{at}.allow_from"),
                "is empty, so dm_policy: allowlist lets nobody in (use dm_policy: disabled for that)"
                    .to_owned(),
            ));
        }
        for (room, settings) in &channel.groups {
            let at = format!("{at}.groups.{room}");
            for (j, id) in settings.agents.iter().flatten().enumerate() {
                unknown_agent(format!("{at}.agents[{j}]"), id);
            }
            if settings.auto_reply == Some(true) && settings.require_mention == Some(true) {
                later.push((
                    format!("{at}.auto_reply"),
                    "contradicts require_mention: true (auto_reply answers unaddressed messages)"
                        .to_owned(),
                ));
            }
        }
    }
    if routing.broadcast.trigger.trim().is_empty() {
        later.push((
            "routing.broadcast.trigger".to_owned(),
            "must not be empty".to_owned(),
        ));
    }
    if routing.context.lookback == 0 && routing.context.enabled {
        later.push((
            "routing.context.lookback".to_owned(),
            "must be at least 1 (or set routing.context.enabled: false)".to_owned(),
        ));
    }
    if routing.agent_to_agent.max_hops == 0 && routing.agent_to_agent.enabled {
        later.push((
            "routing.agent_to_agent.max_hops".to_owned(),
            "must be at least 1".to_owned(),
        ));
    }
    for (key, rate) in [
        ("routing.limits.per_sender", routing.limits.per_sender),
        ("routing.limits.per_room", routing.limits.per_room),
    ] {
        if rate.answers == 0 || rate.per.is_zero() {
            later.push((
                key.to_owned(),
                "needs answers and per above zero (e.g. { answers: 60, per: 10m })".to_owned(),
            ));
        }
    }
    if admin.token.as_deref().is_some_and(str::is_empty) {
        later.push((
            "admin.token".to_owned(),
            "must not be empty (remove the key to have one generated)".to_owned(),
        ));
    }
    for (key, what) in later {
        problem(key, what);
    }
}
