//! The `agentbus.yaml` configuration: its shape, defaults, environment overrides and
//! validation.
//!
//! Every error names the key that is wrong and what to do about it, e.g.
//! `agents[2].provider: unknown provider "openai2"; known: echo, local`. This module reads
//! the file and nothing else; secrets that are generated on first run are persisted by
//! [`crate::appservice::registration`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ruma::{OwnedServerName, OwnedUserId, ServerName, UserId};
use serde::Deserialize;
use url::Url;

mod bridges;
mod ids;
mod llm;
mod monitors;
mod routing;
mod schedules;
mod teams;

pub use self::bridges::{
    AccountBinding, BridgesConfig, IrcAccountConfig, IrcBridgeConfig, IrcSaslConfig,
    SlackAccountConfig, SlackBridgeConfig, TelegramAccountConfig, TelegramBridgeConfig,
    TelegramMode, WebhookAccountConfig, WebhookBridgeConfig, is_irc_channel, is_irc_nick,
};
pub use self::ids::{AgentId, ChannelId, InvalidAgentId, is_valid_localpart};

pub use self::llm::{
    BUILTIN_TOOLS, InputKind, LlmConfig, MemoryConfig, ModelConfig, ModelRef, ProviderApi,
    ProviderConfig, QueueMode, ToolsConfig,
};

pub use self::monitors::{
    AlertsConfig, CheckConfig, CommandCheck, HttpCheck, MonitorCommand, MonitorsConfig, TcpCheck,
};

pub use self::schedules::{
    ActiveHours, AskAgentAction, CatchUp, HeartbeatConfig, RunTeamAction, ScheduleConfig,
    SendMessageAction, TEMPLATE_FIELDS, Timing, time_zone,
};

pub use self::teams::{
    Comparison, Condition, Merger, RuleConfig, StageConfig, TaskMode, TeamBroadcastConfig,
    TeamConfig, TeamLimits, TeamMode,
};

pub use self::routing::{
    AdminConfig, AgentToAgentConfig, BindingConfig, BindingMatch, BroadcastConfig,
    ChannelPolicyConfig, ContextConfig, DmPolicy, GroupPolicy, GroupRoomConfig, KNOWN_CHANNELS,
    KeywordConfig, KeywordRule, LimitsConfig, MentionConfig, RateConfig, RoutingConfig,
};

/// Environment variable that overrides `appservice.as_token`.
pub const ENV_AS_TOKEN: &str = "AGENTBUS_AS_TOKEN";
/// Environment variable that overrides `appservice.hs_token`.
pub const ENV_HS_TOKEN: &str = "AGENTBUS_HS_TOKEN";
/// Environment variable that overrides `admin.token`.
pub const ENV_ADMIN_TOKEN: &str = "AGENTBUS_ADMIN_TOKEN";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The homeserver agentbus is an appservice of.
    pub homeserver: HomeserverConfig,
    /// How the homeserver reaches us, and our identity towards it.
    pub appservice: AppserviceConfig,
    /// Where durable state lives.
    #[serde(default)]
    pub store: StoreConfig,
    /// Model providers, by name; agents refer to them with `provider:`.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Limits shared by every provider: concurrency and retries.
    #[serde(default)]
    pub llm: LlmConfig,
    /// The agents, each one virtual Matrix user.
    pub agents: Vec<AgentConfig>,
    /// Teams of agents, each one virtual Matrix user too, that work on a request together.
    #[serde(default)]
    pub teams: Vec<TeamConfig>,
    /// Tasks that run on their own: cron, every, at (see `schedules.rs`).
    #[serde(default)]
    pub schedules: Vec<ScheduleConfig>,
    /// Health checks that alert a room (see `monitors.rs`).
    #[serde(default)]
    pub monitors: MonitorsConfig,
    /// Routing strategies: mention, keyword, context, broadcast, agent-to-agent.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Which agent owns which conversation, most specific first.
    #[serde(default)]
    pub bindings: Vec<BindingConfig>,
    /// DM and group policies per channel (`matrix`, and bridged platforms).
    #[serde(default)]
    pub channels: BTreeMap<ChannelId, ChannelPolicyConfig>,
    /// The admin API.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Prometheus metrics (`GET /metrics`).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Other platforms bridged into Matrix rooms.
    #[serde(default)]
    pub bridges: BridgesConfig,
}

/// Whether `id` may name a bridge account: lowercase letters, digits, `-` and `_`.
fn is_bridge_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// `metrics:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `GET /metrics` at all.
    #[serde(default = "metrics_enabled")]
    pub enabled: bool,
    /// A listener of its own, e.g. `127.0.0.1:9464`, so the metrics need not be reachable
    /// where the homeserver reaches agentbus; unset: on the appservice listener.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

fn metrics_enabled() -> bool {
    true
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: None,
        }
    }
}

/// `homeserver:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomeserverConfig {
    /// Client-server API base URL, e.g. `http://127.0.0.1:8008`.
    pub url: Url,
    /// The server name in user IDs (`@damon:<server_name>`).
    #[serde(deserialize_with = "server_name")]
    pub server_name: OwnedServerName,
}

/// A server name, refused with the reason when it is not one.
fn server_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<OwnedServerName, D::Error> {
    let raw = String::deserialize(d)?;
    ServerName::parse(&raw).map_err(|_| {
        serde::de::Error::custom(format!(
            "server_name {raw:?} is not a valid server name (a host name or IP, optionally with :port)"
        ))
    })
}

/// `appservice:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppserviceConfig {
    /// Registration ID (default `agentbus`); also used in the ping endpoint path.
    #[serde(default = "default_appservice_id")]
    pub id: String,
    /// Address the appservice HTTP server listens on (default `127.0.0.1:9000`).
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// URL the homeserver uses to reach us (default `http://<bind>`).
    #[serde(default)]
    pub url: Option<Url>,
    /// Localpart of the appservice's own bot user (default `agentbus`).
    #[serde(default = "default_sender_localpart")]
    pub sender_localpart: String,
    /// Token we present to the homeserver. Generated and saved on first run when absent;
    /// `AGENTBUS_AS_TOKEN` overrides it.
    #[serde(default)]
    pub as_token: Option<String>,
    /// Token the homeserver presents to us. Generated and saved on first run when absent;
    /// `AGENTBUS_HS_TOKEN` overrides it.
    #[serde(default)]
    pub hs_token: Option<String>,
    /// Localpart prefix reserved for puppet users of bridged platforms (default `_bridge_`).
    #[serde(default = "default_puppet_prefix")]
    pub puppet_prefix: String,
    /// How many journaled events may wait for the inbox (default 10000). When that many
    /// are waiting, acknowledging the next transaction waits until the inbox catches up,
    /// so a homeserver that outruns agentbus sees slower acks and memory stays bounded.
    #[serde(default = "default_max_backlog")]
    pub max_backlog: usize,
    /// How long a client of the listener may take to send a request's head (default
    /// `10s`), counted from when its connection can take a request: as it opens, and after
    /// each answer — so an idle kept-alive connection is closed after this too.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a connection may stay open with no request in progress, whatever it is
    /// doing (default `60s`); an idle connection closes at the sooner of this and
    /// `header_read_timeout`.
    #[serde(default = "default_listener_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most connections open at once (default 512); more wait in the listen queue until
    /// one closes. At most half the open-file limit is used, whatever this says.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_max_backlog() -> usize {
    10_000
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_listener_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_connections() -> usize {
    512
}

/// The bounds of the listener's timeouts: a shorter one closes connections before a
/// homeserver on the other side of the world has sent anything; a longer one lets every
/// connection that sends nothing hold a slot for that long.
const LISTENER_TIMEOUTS: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(3600);
/// The bounds of `appservice.max_connections`: the homeserver, the admin API, metrics
/// scrapes and a reverse proxy share the slots; no open-file limit allows more than the top.
const MAX_CONNECTIONS: std::ops::RangeInclusive<usize> = 8..=1 << 20;

/// `store:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Storage engine (default `fjall`, embedded in the data directory).
    #[serde(default)]
    pub backend: StoreBackend,
    /// Data directory (default `./data`, relative to the config file): the database and
    /// generated tokens live here.
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
}

/// `store.backend`: which engine keeps agentbus's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// fjall, embedded, in `store.path/fjall`: the default.
    #[default]
    Fjall,
    /// sled, embedded, in `store.path/sled`: for stores earlier versions wrote.
    Sled,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::default(),
            path: default_store_path(),
        }
    }
}

/// One entry of `agents:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Matrix localpart: the agent is `@<id>:<server_name>`.
    pub id: AgentId,
    /// Display name shown in clients (default: the id).
    #[serde(default)]
    pub display_name: Option<String>,
    /// Other names people type after `@` to mention the agent (e.g. `戴蒙`).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Regular expressions that also count as a mention (case-insensitive), e.g.
    /// `^damon[,:]`.
    #[serde(default)]
    pub mention_patterns: Vec<String>,
    /// The agent conversations fall back to when no binding names one (default: the
    /// first agent).
    #[serde(default)]
    pub default: bool,
    /// Avatar as an `mxc://` URI.
    #[serde(default)]
    pub avatar: Option<String>,
    /// Name of an entry in `providers:`.
    pub provider: String,
    /// Model name passed to the provider (required unless the provider is `echo`).
    #[serde(default)]
    pub model: Option<String>,
    /// System prompt.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Models tried in order when `model` fails, each as `provider/model`.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// The `provider/model` that answers images when `model` reads only text.
    #[serde(default)]
    pub image_model: Option<String>,
    /// Messages arriving while the agent is busy in the same session: `queue` (answered
    /// in order, default) or `collect` (answered together as the next turn).
    #[serde(default)]
    pub queue: QueueMode,
    /// Most messages waiting per session; more get a "busy" notice (default 10).
    #[serde(default = "default_queue_limit")]
    pub queue_limit: usize,
    /// How much of each session's history is kept and sent.
    #[serde(default)]
    pub memory: MemoryConfig,
    /// Which built-in tools the agent may call.
    #[serde(default)]
    pub tools: ToolsConfig,
    /// Go through `HEARTBEAT.md` every so often and post only what needs saying.
    #[serde(default)]
    pub heartbeat: Option<HeartbeatConfig>,
}

impl AgentConfig {
    /// The name people see.
    pub fn display_name(&self) -> &str {
        self.display_name.as_deref().unwrap_or(&self.id)
    }

    /// The agent's main model, then its fallbacks, in the order they are tried. Entries
    /// that do not parse are skipped (validation reports them).
    pub fn model_chain(&self) -> Vec<ModelRef> {
        let main = ModelRef {
            provider: self.provider.clone(),
            model: self.model.clone().unwrap_or_default(),
        };
        std::iter::once(main)
            .chain(self.fallbacks.iter().filter_map(|f| ModelRef::parse(f)))
            .collect()
    }

    /// The model that reads images for this agent when its own does not, if any.
    pub fn image_model_ref(&self) -> Option<ModelRef> {
        self.image_model.as_deref().and_then(ModelRef::parse)
    }
}

fn default_appservice_id() -> String {
    "agentbus".to_owned()
}
fn default_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9000))
}
fn default_sender_localpart() -> String {
    "agentbus".to_owned()
}
fn default_puppet_prefix() -> String {
    "_bridge_".to_owned()
}
fn default_store_path() -> PathBuf {
    PathBuf::from("./data")
}
fn default_queue_limit() -> usize {
    10
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The YAML does not have the expected shape; `message` starts with the key path.
    #[error("{}{message}", if path.as_os_str().is_empty() { String::new() } else { format!("{}: ", path.display()) })]
    Parse { path: PathBuf, message: String },
    /// The YAML parsed but some values are unusable.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

impl Config {
    /// Reads, parses, overrides from the process environment, and validates `path`.
    /// Relative paths inside the file are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        if config.store.path.is_relative() {
            let base = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            config.store.path = base.join(&config.store.path);
        }
        config.apply_env(|name| std::env::var(name).ok());
        config.validate()?;
        Ok(config)
    }

    /// Parses YAML text, naming the offending key on error (serde_yaml tracks the path,
    /// e.g. `agents[0]: unknown field …`). Does not validate.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        serde_yaml::from_str(text).map_err(|err| ConfigError::Parse {
            path: PathBuf::new(),
            message: err.to_string(),
        })
    }

    /// Applies environment overrides for secrets; `env` looks a variable up.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        if let Some(token) = env(ENV_AS_TOKEN).filter(|t| !t.is_empty()) {
            self.appservice.as_token = Some(token);
        }
        if let Some(token) = env(ENV_HS_TOKEN).filter(|t| !t.is_empty()) {
            self.appservice.hs_token = Some(token);
        }
        if let Some(token) = env(ENV_ADMIN_TOKEN).filter(|t| !t.is_empty()) {
            self.admin.token = Some(token);
        }
    }

    /// Checks cross-references and value shapes; collects every problem, one line each.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut problem = |key: String, what: String| problems.push(format!("{key}: {what}"));

        if self.homeserver.url.scheme() != "http" && self.homeserver.url.scheme() != "https" {
            problem(
                "homeserver.url".into(),
                "must be an http:// or https:// URL".into(),
            );
        }
        for (i, glob) in self.admin.users.iter().enumerate() {
            if !glob.starts_with('@') || !glob.contains(':') {
                problem(
                    format!("admin.users[{i}]"),
                    format!(
                        "{glob:?} is not a user ID glob like \"@alice:example.org\" or \"@*:example.org\""
                    ),
                );
            }
        }
        let appservice = &self.appservice;
        if appservice.id.is_empty() {
            problem("appservice.id".into(), "must not be empty".into());
        }
        if !is_valid_localpart(&appservice.sender_localpart) {
            problem(
                "appservice.sender_localpart".into(),
                format!(
                    "{:?} is not a valid Matrix localpart (use a-z, 0-9, . _ = - /)",
                    appservice.sender_localpart
                ),
            );
        }
        if !is_valid_localpart(&appservice.puppet_prefix) {
            problem(
                "appservice.puppet_prefix".into(),
                format!(
                    "{:?} is not a valid Matrix localpart prefix",
                    appservice.puppet_prefix
                ),
            );
        }
        for (key, token) in [
            ("appservice.as_token", &appservice.as_token),
            ("appservice.hs_token", &appservice.hs_token),
        ] {
            if token.as_deref().is_some_and(str::is_empty) {
                problem(
                    key.into(),
                    "must not be empty (remove the key to have one generated)".into(),
                );
            }
        }
        if appservice.as_token.is_some() && appservice.as_token == appservice.hs_token {
            problem(
                "appservice.hs_token".into(),
                "must differ from as_token".into(),
            );
        }

        for (name, provider) in &self.providers {
            llm::validate_provider(name, provider, &mut problem);
        }
        if self.appservice.max_backlog < 100 {
            problem(
                "appservice.max_backlog".into(),
                "must be at least 100 (a homeserver sends up to 100 events per transaction)".into(),
            );
        }
        for (key, timeout) in [
            (
                "appservice.header_read_timeout",
                appservice.header_read_timeout,
            ),
            ("appservice.idle_timeout", appservice.idle_timeout),
        ] {
            if !LISTENER_TIMEOUTS.contains(&timeout) {
                problem(
                    key.into(),
                    format!(
                        "{} must be between 100ms and 1h",
                        humantime::format_duration(timeout)
                    ),
                );
            }
        }
        if !MAX_CONNECTIONS.contains(&appservice.max_connections) {
            problem(
                "appservice.max_connections".into(),
                format!(
                    "{} must be between {} and {} (the homeserver, the admin API and metrics share them)",
                    appservice.max_connections,
                    MAX_CONNECTIONS.start(),
                    MAX_CONNECTIONS.end()
                ),
            );
        }
        if self.llm.max_concurrency == 0 {
            problem("llm.max_concurrency".into(), "must be at least 1".into());
        }

        let known: Vec<&str> = self.providers.keys().map(String::as_str).collect();
        let mut seen = std::collections::HashSet::new();
        if self.agents.is_empty() {
            problem("agents".into(), "at least one agent is required".into());
        }
        for (i, agent) in self.agents.iter().enumerate() {
            let at = format!("agents[{i}]");
            if let Err(invalid) = agent.id.validate() {
                problem(format!("{at}.id"), invalid.to_string());
            } else if !seen.insert(agent.id.as_str()) {
                problem(
                    format!("{at}.id"),
                    format!("duplicate agent id {:?}", agent.id),
                );
            }
            if agent.id == appservice.sender_localpart {
                problem(
                    format!("{at}.id"),
                    format!("{:?} is the appservice's own sender_localpart", agent.id),
                );
            }
            if agent.id.starts_with(&appservice.puppet_prefix) {
                problem(
                    format!("{at}.id"),
                    format!(
                        "{:?} starts with the reserved puppet prefix {:?}",
                        agent.id, appservice.puppet_prefix
                    ),
                );
            }
            match self.providers.get(&agent.provider) {
                None => problem(
                    format!("{at}.provider"),
                    format!(
                        "unknown provider {:?}; known: {}",
                        agent.provider,
                        if known.is_empty() {
                            "(none configured)".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                ),
                Some(p)
                    if p.api != ProviderApi::Echo
                        && agent.model.as_deref().unwrap_or("").is_empty() =>
                {
                    problem(
                        format!("{at}.model"),
                        format!("is required for provider {:?}", agent.provider),
                    );
                }
                Some(_) => {}
            }
            llm::validate_agent(&at, agent, &self.providers, &mut problem);
            if let Some(avatar) = &agent.avatar
                && !avatar.starts_with("mxc://")
            {
                problem(
                    format!("{at}.avatar"),
                    format!("{avatar:?} must be an mxc:// URI (upload the image first)"),
                );
            }
            if let Some(heartbeat) = &agent.heartbeat {
                schedules::validate_heartbeat(&at, heartbeat, &mut problem);
            }
            for (j, alias) in agent.aliases.iter().enumerate() {
                if alias.trim().is_empty() {
                    problem(format!("{at}.aliases[{j}]"), "must not be empty".into());
                }
            }
            for (j, pattern) in agent.mention_patterns.iter().enumerate() {
                if let Err(e) = regex::Regex::new(pattern) {
                    problem(
                        format!("{at}.mention_patterns[{j}]"),
                        routing::regex_problem(&e),
                    );
                }
            }
        }
        for (i, team) in self.teams.iter().enumerate() {
            let at = format!("teams[{i}].id");
            if let Err(invalid) = team.id.validate() {
                problem(at, invalid.to_string());
            } else if !seen.insert(team.id.as_str()) {
                problem(
                    at,
                    format!("{:?} is already the id of an agent or a team", team.id),
                );
            } else if team.id == appservice.sender_localpart
                || team.id.starts_with(&appservice.puppet_prefix)
            {
                problem(
                    at,
                    format!(
                        "{:?} is the appservice's own user or has its puppet prefix",
                        team.id
                    ),
                );
            }
        }
        teams::validate(
            &self.teams,
            &|id| self.agents.iter().any(|a| a.id == *id),
            &mut problem,
        );
        schedules::validate(
            &self.schedules,
            &|id| self.agents.iter().any(|a| a.id == *id),
            &|id| self.team(id).is_some(),
            &mut problem,
        );
        monitors::validate(
            &self.monitors,
            &|id| self.agents.iter().any(|a| a.id == *id),
            &mut problem,
        );
        let defaults: Vec<usize> = (0..self.agents.len())
            .filter(|&i| self.agents[i].default)
            .collect();
        if let [_, second, ..] = defaults[..] {
            problem(
                format!("agents[{second}].default"),
                format!(
                    "only one agent may be the default; agents[{}] already is",
                    defaults[0]
                ),
            );
        }
        routing::validate(
            &self.routing,
            &self.bindings,
            &self.channels,
            &self.admin,
            &|id| self.agents.iter().any(|a| a.id == *id) || self.team(id).is_some(),
            &mut problem,
        );
        for (channel, policy) in &self.channels {
            for (room, group) in &policy.groups {
                if let Some(team) = &group.team
                    && self.team(team).is_none()
                {
                    problem(
                        format!("channels.{channel}.groups.{room:?}.team"),
                        format!("unknown team {team:?}"),
                    );
                }
            }
        }
        for (platform, id, binding) in self.bridges.accounts() {
            let at = format!("bridges.{platform}.accounts.{id}");
            if !is_bridge_id(id) {
                problem(
                    at.clone(),
                    "an account ID uses a-z, 0-9, - and _ only (it is part of URLs and of portals' state keys)"
                        .into(),
                );
            }
            if let Some(agent) = binding.agent
                && !self.agents.iter().any(|a| a.id == *agent)
            {
                problem(format!("{at}.agent"), format!("unknown agent {agent:?}"));
            }
        }
        for (id, account) in &self.bridges.webhook.accounts {
            let at = format!("bridges.webhook.accounts.{id}");
            if account.secret_env.trim().is_empty() {
                problem(
                    format!("{at}.secret_env"),
                    "names the environment variable holding the shared secret".into(),
                );
            }
            if !matches!(account.outbound_url.scheme(), "http" | "https") {
                problem(
                    format!("{at}.outbound_url"),
                    "must be an http:// or https:// URL".into(),
                );
            }
        }
        for (id, account) in &self.bridges.irc.accounts {
            let at = format!("bridges.irc.accounts.{id}");
            if account.server.trim().is_empty() || account.server.contains(char::is_whitespace) {
                problem(format!("{at}.server"), "names the IRC server's host".into());
            }
            if !is_irc_nick(&account.nick) {
                problem(
                    format!("{at}.nick"),
                    format!(
                        "{:?} is not an IRC nick (a letter or one of []\\`_^{{|}} first, then those, digits or -)",
                        account.nick
                    ),
                );
            }
            for channel in &account.channels {
                if !is_irc_channel(channel) {
                    problem(
                        format!("{at}.channels"),
                        format!("{channel:?} is not a channel name (#name, no spaces or commas)"),
                    );
                }
            }
            if let Some(sasl) = &account.sasl
                && (sasl.username.trim().is_empty() || sasl.password_env.trim().is_empty())
            {
                problem(
                    format!("{at}.sasl"),
                    "needs username and password_env (the variable holding the password)".into(),
                );
            }
        }

        for (id, account) in &self.bridges.slack.accounts {
            let at = format!("bridges.slack.accounts.{id}");
            for (key, env, what) in [
                ("bot_token_env", &account.bot_token_env, "the bot token"),
                (
                    "signing_secret_env",
                    &account.signing_secret_env,
                    "the signing secret",
                ),
            ] {
                if env.trim().is_empty() {
                    problem(
                        format!("{at}.{key}"),
                        format!("names the environment variable holding {what}"),
                    );
                }
            }
            if !matches!(account.api_url.scheme(), "http" | "https") {
                problem(
                    format!("{at}.api_url"),
                    "must be an http:// or https:// URL".into(),
                );
            }
        }

        for (id, account) in &self.bridges.telegram.accounts {
            let at = format!("bridges.telegram.accounts.{id}");
            if account.token_env.trim().is_empty() {
                problem(
                    format!("{at}.token_env"),
                    "names the environment variable holding the bot token".into(),
                );
            }
            match &account.secret_token_env {
                Some(env) if env.trim().is_empty() => problem(
                    format!("{at}.secret_token_env"),
                    "names the environment variable holding the webhook's secret token".into(),
                ),
                None if account.mode == TelegramMode::Webhook => problem(
                    format!("{at}.secret_token_env"),
                    "is required in webhook mode: Telegram's requests are told from others \
                     by the secret token given to setWebhook"
                        .into(),
                ),
                _ => {}
            }
            if !matches!(account.api_url.scheme(), "http" | "https") {
                problem(
                    format!("{at}.api_url"),
                    "must be an http:// or https:// URL".into(),
                );
            }
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The URL the homeserver should use to reach the appservice.
    pub fn appservice_url(&self) -> Url {
        self.appservice.url.clone().unwrap_or_else(|| {
            Url::parse(&format!("http://{}", self.appservice.bind))
                .expect("socket address forms a URL")
        })
    }

    /// `@<localpart>:<server_name>`.
    pub fn user_id(&self, localpart: &str) -> OwnedUserId {
        UserId::parse(format!("@{localpart}:{}", self.homeserver.server_name))
            .expect("localparts are validated")
    }

    /// The appservice's own bot user.
    pub fn sender_user_id(&self) -> OwnedUserId {
        self.user_id(&self.appservice.sender_localpart)
    }

    /// Whether `user` belongs to our namespace (an agent, the bot, or a puppet), i.e. one of
    /// our own virtual users sent it.
    pub fn is_own_user(&self, user: &UserId) -> bool {
        if user.server_name() != self.homeserver.server_name {
            return false;
        }
        let local = user.localpart();
        local == self.appservice.sender_localpart
            || local.starts_with(&self.appservice.puppet_prefix)
            || self.agents.iter().any(|a| a.id == local)
            || self.teams.iter().any(|t| t.id == local)
    }

    /// Whether `user` is one of ours that speaks for agentbus (an agent, a team, the bot),
    /// not a bridged person's puppet: puppets stand for people, and are treated as people.
    pub fn is_own_agent_or_bot(&self, user: &UserId) -> bool {
        self.is_own_user(user) && !self.is_puppet(user)
    }

    /// Whether `user` is the puppet of a bridged platform's user.
    pub fn is_puppet(&self, user: &UserId) -> bool {
        user.server_name() == self.homeserver.server_name
            && user.localpart().starts_with(&self.appservice.puppet_prefix)
    }

    /// The team `id`, if it is one.
    pub fn team(&self, id: &AgentId) -> Option<&TeamConfig> {
        self.teams.iter().find(|t| t.id == *id)
    }

    /// The agent `id`, if it is one.
    pub fn agent(&self, id: &AgentId) -> Option<&AgentConfig> {
        self.agents.iter().find(|a| a.id == *id)
    }

    /// The team whose user is `user`.
    pub fn team_by_user(&self, user: &UserId) -> Option<&TeamConfig> {
        if user.server_name() != self.homeserver.server_name {
            return None;
        }
        self.teams.iter().find(|t| t.id == user.localpart())
    }

    /// The policies of `channel` (defaults when the file has none for it).
    pub fn channel_policy(&self, channel: &ChannelId) -> std::borrow::Cow<'_, ChannelPolicyConfig> {
        match self.channels.get(channel) {
            Some(policy) => std::borrow::Cow::Borrowed(policy),
            None => std::borrow::Cow::Owned(ChannelPolicyConfig::default()),
        }
    }

    /// The agent whose user ID is `user`.
    pub fn agent_by_user(&self, user: &UserId) -> Option<&AgentConfig> {
        if user.server_name() != self.homeserver.server_name {
            return None;
        }
        self.agents.iter().find(|a| a.id == user.localpart())
    }
}

impl fmt::Display for ProviderApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
homeserver: { url: "http://127.0.0.1:8008", server_name: localhost }
appservice: { id: agentbus, bind: "127.0.0.1:9000" }
providers:
  local: { api: openai-completions, base_url: "http://127.0.0.1:8080/v1", api_key_env: LOCAL_KEY }
  dashscope: { api: openai-completions, base_url: "https://dashscope.aliyuncs.com/compatible-mode/v1" }
agents:
  - { id: damon, display_name: Damon, aliases: ["戴蒙"], provider: local, model: smol }
  - { id: coder, provider: dashscope, model: qwen-max }
  - { id: researcher, provider: local, model: smol }
"#;

    fn error_of(text: &str) -> String {
        match Config::parse(text).and_then(|c| c.validate().map(|()| c)) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_good_config_parses_with_defaults() {
        let config = Config::parse(GOOD).unwrap();
        config.validate().unwrap();
        assert_eq!(config.agents.len(), 3);
        assert_eq!(config.agents[1].display_name(), "coder");
        assert_eq!(config.agents[0].memory.max_messages, 40);
        assert_eq!(config.appservice.sender_localpart, "agentbus");
        assert_eq!(config.appservice.puppet_prefix, "_bridge_");
        assert_eq!(config.providers["local"].timeout, Duration::from_secs(60));
        assert_eq!(config.appservice_url().as_str(), "http://127.0.0.1:9000/");
        assert_eq!(config.user_id("damon").as_str(), "@damon:localhost");
    }

    #[test]
    fn unknown_provider_names_the_key_and_the_known_ones() {
        let text = GOOD.replace(
            "{ id: researcher, provider: local",
            "{ id: researcher, provider: openai2",
        );
        assert_eq!(
            error_of(&text),
            r#"agents[2].provider: unknown provider "openai2"; known: dashscope, local"#
        );
    }

    #[test]
    fn teams_parse_with_their_limits_and_are_own_users() {
        let text = format!(
            "{GOOD}teams:\n  - {{ id: devteam, mode: star, coordinator: damon, workers: [coder, researcher], limits: {{ timeout: 5m }} }}\n"
        );
        let config = Config::parse(&text).unwrap();
        config.validate().unwrap();
        let team = config.team(&AgentId::parse("devteam").unwrap()).unwrap();
        assert_eq!(team.limits.timeout, Duration::from_secs(300));
        assert_eq!(team.limits.max_agent_turns, 12);
        assert_eq!(team.members().len(), 3);
        assert!(config.is_own_user(&config.user_id("devteam")));
        assert!(config.team_by_user(&config.user_id("damon")).is_none());
    }

    #[test]
    fn a_broken_team_is_named_key_by_key() {
        let text = format!(
            r#"{GOOD}teams:
  - {{ id: damon, mode: star, workers: [coder] }}
  - {{ id: pipe, mode: pipeline, stages: [{{ name: a, agent: nobody }}, {{ name: a, agent: coder }}] }}
  - {{ id: mix, mode: hybrid, coordinator: damon, rules: [{{ when: "length >> 3", mode: broadcast }}], limits: {{ token_budget: 0 }} }}
channels: {{ matrix: {{ groups: {{ "!r:hs": {{ team: ghost }} }} }} }}
"#
        );
        let err = error_of(&text);
        for expected in [
            r#"teams[0].id: "damon" is already the id of an agent or a team"#,
            "teams[0].coordinator: star needs a coordinator and at least one worker",
            r#"teams[1].stages[0].agent: unknown agent "nobody""#,
            "teams[1].stages[1].name: stage names must be non-empty and unique",
            r#"teams[2].rules[0].when: "length >> 3": "> 3" is not a whole number"#,
            "teams[2].workers: broadcast needs at least one worker (rules[0] picks it)",
            "teams[2].limits.token_budget: must be more than 0",
            r#"channels.matrix.groups."!r:hs".team: unknown team "ghost""#,
        ] {
            assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
        }
    }

    #[test]
    fn schedules_and_heartbeats_parse_with_their_defaults() {
        let text = format!(
            r##"{GOOD}schedules:
  - {{ name: morning, cron: "0 8 * * mon-fri", timezone: Europe/Berlin, room: "!r:hs", send_message: {{ as: damon, text: "Today is {{{{weekday}}}} {{{{date}}}}" }} }}
  - {{ name: brief, every: 30m, room: "#ops:hs", ask_agent: {{ agent: coder, prompt: "Brief us" }}, catch_up: none, max_failures: 5, enabled: false }}
  - {{ name: xmas, at: "2026-12-24T09:00:00+01:00", room: "!r:hs", send_message: {{ as: damon, text: hi }} }}
"##
        )
        .replace(
            "provider: dashscope, model: qwen-max }",
            "provider: dashscope, model: qwen-max, heartbeat: { interval: 1h, active_hours: \"08:00-22:00\", timezone: Asia/Shanghai, room: \"!r:hs\" } }",
        );
        let config = Config::parse(&text).unwrap();
        config.validate().unwrap();
        let [morning, brief, xmas] = &config.schedules[..] else {
            panic!("three schedules")
        };
        assert_eq!(
            (morning.catch_up, morning.max_failures, morning.enabled),
            (CatchUp::One, 3, true)
        );
        assert_eq!(
            (brief.catch_up, brief.max_failures, brief.enabled),
            (CatchUp::None, 5, false)
        );
        assert!(matches!(morning.timing(), Ok(Timing::Cron { .. })));
        assert!(matches!(brief.timing(), Ok(Timing::Every(d)) if d == Duration::from_secs(1800)));
        assert!(matches!(xmas.timing(), Ok(Timing::At(1_798_099_200_000))));
        let heartbeat = config.agents[1].heartbeat.as_ref().unwrap();
        assert_eq!(heartbeat.interval, Duration::from_secs(3600));
        assert_eq!(
            heartbeat.active_hours(),
            Some(ActiveHours {
                start: 480,
                end: 1320
            })
        );
    }

    #[test]
    fn a_broken_schedule_is_named_key_by_key() {
        let text = format!(
            r#"{GOOD}schedules:
  - {{ name: "bad name", cron: "0 25 * * *", room: "!r:hs", send_message: {{ as: ghost, text: "{{{{day}}}}" }} }}
  - {{ name: b, every: 1m, at: "2026-01-01T00:00:00Z", room: "lobby", ask_agent: {{ agent: damon, prompt: hi }}, run_team: {{ team: nope, prompt: hi }}, max_failures: 0 }}
  - {{ name: b, cron: "* * * * *", timezone: Mars/Olympus, room: "!r:hs" }}
  - {{ name: d, at: tomorrow, timezone: Europe/Nowhere, room: "!r:hs", send_message: {{ as: damon, text: hi }} }}
"#
        )
        .replace(
            "provider: dashscope, model: qwen-max }",
            "provider: dashscope, model: qwen-max, heartbeat: { interval: 0s, active_hours: \"8-22\", room: lobby } }",
        );
        let err = error_of(&text);
        for expected in [
            r#"schedules[0].name: "bad name" must be 1-64 letters, digits, `-`, `_` or `.`"#,
            r#"schedules[0].cron: "0 25 * * *" is not a cron pattern"#,
            r#"schedules[0].send_message.as: unknown agent "ghost""#,
            "schedules[0].send_message.text: unknown placeholder {{day}}",
            "schedules[1].cron: give only one of cron, every and at",
            r#"schedules[1].room: "lobby" is not a room ID (!abc:server) or alias (#name:server)"#,
            "schedules[1].send_message: give only one of send_message, ask_agent and run_team",
            r#"schedules[1].run_team.team: unknown team "nope""#,
            "schedules[1].max_failures: must be at least 1",
            r#"schedules[2].name: duplicate task name "b""#,
            r#"schedules[2].timezone: "Mars/Olympus" is not an IANA time zone"#,
            "schedules[2].send_message: needs one action: send_message, ask_agent or run_team",
            r#"schedules[3].at: "tomorrow" is not an RFC 3339 time"#,
            r#"schedules[3].timezone: "Europe/Nowhere" is not an IANA time zone"#,
            "agents[1].heartbeat.interval: must be at least 1s",
            r#"agents[1].heartbeat.active_hours: "8-22" must be HH:MM-HH:MM"#,
            r#"agents[1].heartbeat.room: "lobby" is not a room ID"#,
        ] {
            assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
        }
        assert_eq!(err.matches("Mars/Olympus").count(), 1, "once:\n{err}");
        let err = error_of(&format!(
            "{GOOD}schedules: [{{ name: a, every: soon, room: \"!r:hs\" }}]\n"
        ));
        assert!(err.starts_with("schedules[0].every: "), "{err}");
    }

    #[test]
    fn a_misspelt_key_is_named() {
        let text = GOOD.replace("display_name: Damon", "dispaly_name: Damon");
        let err = error_of(&text);
        assert!(
            err.starts_with("agents[0]: unknown field `dispaly_name`"),
            "{err}"
        );
    }

    #[test]
    fn a_wrongly_typed_value_is_named() {
        let text = GOOD.replace(r#"bind: "127.0.0.1:9000""#, "bind: nine-thousand");
        let err = error_of(&text);
        assert!(
            err.starts_with("appservice.bind: invalid socket address"),
            "{err}"
        );
        let text = GOOD.replace("server_name: localhost", "server_name: \"bad name!\"");
        assert_eq!(
            error_of(&text),
            r#"homeserver: server_name "bad name!" is not a valid server name (a host name or IP, optionally with :port) at line 2 column 13"#
        );
    }

    #[test]
    fn every_problem_is_reported_once_per_line() {
        let text = GOOD
            .replace(
                "{ id: coder, provider: dashscope, model: qwen-max }",
                "{ id: Coder, provider: dashscope }",
            )
            .replace("{ id: researcher,", "{ id: damon,");
        let err = error_of(&text);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(
            lines,
            [
                r#"agents[1].id: "Coder" is not a valid Matrix localpart (use a-z, 0-9, . _ = - /)"#,
                r#"agents[1].model: is required for provider "dashscope""#,
                r#"agents[2].id: duplicate agent id "damon""#,
            ]
        );
    }

    #[test]
    fn openai_provider_needs_a_base_url_and_avatars_must_be_mxc() {
        let text = GOOD
            .replace(r#"base_url: "http://127.0.0.1:8080/v1", "#, "")
            .replace(
                "aliases: [\"戴蒙\"]",
                "avatar: \"https://example.org/a.png\"",
            );
        let err = error_of(&text);
        assert!(
            err.contains("providers.local.base_url: is required for api: openai-completions"),
            "{err}"
        );
        assert!(
            err.contains("agents[0].avatar: \"https://example.org/a.png\" must be an mxc:// URI"),
            "{err}"
        );
    }

    #[test]
    fn model_mistakes_name_their_keys() {
        let text = format!(
            r#"{GOOD}
llm: {{ max_concurrency: 0 }}
"#
        )
        .replace(
            r#"api_key_env: LOCAL_KEY }"#,
            r#"api_key_env: LOCAL_KEY, max_concurrency: 0, models: [{ id: smol, input: [image], context_window: 512, max_tokens: 1024 }] }"#,
        )
        .replace(
            "provider: dashscope, model: qwen-max }",
            "provider: dashscope, model: qwen-max, fallbacks: [qwen-plus, nowhere/x], image_model: local/smol, queue_limit: 0, memory: { max_message_chars: 50 }, tools: { allow: [fetch_url, web_search], deny: [\"*time\"], max_iterations: 0 } }",
        );
        let err = error_of(&text);
        for expected in [
            "llm.max_concurrency: must be at least 1",
            "providers.local.max_concurrency: must be at least 1",
            "providers.local.models[0].input: must include text",
            "providers.local.models[0].context_window: 512 leaves no room for the prompt next to max_tokens 1024",
            "agents[1].fallbacks[0]: \"qwen-plus\" must be written provider/model",
            "agents[1].fallbacks[1]: unknown provider \"nowhere\" in \"nowhere/x\"",
            "agents[1].queue_limit: must be at least 1",
            "agents[1].memory.max_message_chars: 50 is too few to keep the start and end of a long message; use at least 200",
            "agents[1].tools.allow[1]: \"web_search\" matches no tool; the tools are current_time, fetch_url, search_room_history",
            "agents[1].tools.max_iterations: must be at least 1",
        ] {
            assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
        }
        assert!(
            !err.contains("tools.deny"),
            "*time matches current_time: {err}"
        );
    }

    #[test]
    fn an_image_model_must_read_images_and_model_refs_split_at_the_first_slash() {
        let text = GOOD.replace(
            "provider: dashscope, model: qwen-max }",
            "provider: dashscope, model: qwen-max, image_model: local/smol }",
        );
        assert!(
            error_of(&text).contains("agents[1].image_model: \"local/smol\" does not read images"),
            "{}",
            error_of(&text)
        );
        let fine = text.replace(
            r#"api_key_env: LOCAL_KEY }"#,
            r#"api_key_env: LOCAL_KEY, models: [{ id: smol, input: [text, image] }] }"#,
        );
        let config = Config::parse(&fine).unwrap();
        config.validate().unwrap();
        assert_eq!(
            ModelRef::parse("siliconflow/Qwen/Qwen2.5-7B-Instruct"),
            Some(ModelRef {
                provider: "siliconflow".into(),
                model: "Qwen/Qwen2.5-7B-Instruct".into()
            })
        );
        let chain: Vec<String> = config.agents[1]
            .model_chain()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(chain, ["dashscope/qwen-max"]);
        assert_eq!(
            config.providers["local"].model("smol").context_window,
            8192,
            "defaults for what the entry leaves out"
        );
    }

    #[test]
    fn listener_limits_have_defaults_and_refuse_nonsense() {
        let config = Config::parse(GOOD).unwrap();
        let appservice = &config.appservice;
        assert_eq!(
            (
                appservice.header_read_timeout,
                appservice.idle_timeout,
                appservice.max_connections
            ),
            (Duration::from_secs(10), Duration::from_secs(60), 512)
        );
        let text = GOOD.replace(
            r#"bind: "127.0.0.1:9000" }"#,
            r#"bind: "127.0.0.1:9000", header_read_timeout: 0s, idle_timeout: 2h, max_connections: 0 }"#,
        );
        let err = error_of(&text);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(
            lines,
            [
                "appservice.header_read_timeout: 0s must be between 100ms and 1h",
                "appservice.idle_timeout: 2h must be between 100ms and 1h",
                "appservice.max_connections: 0 must be between 8 and 1048576 (the homeserver, the admin API and metrics share them)",
            ]
        );
        let text = GOOD.replace(
            r#"bind: "127.0.0.1:9000" }"#,
            r#"bind: "127.0.0.1:9000", header_read_timeout: 1s, idle_timeout: 500ms, max_connections: 64 }"#,
        );
        let config = Config::parse(&text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.appservice.idle_timeout, Duration::from_millis(500));
        let err = error_of(&GOOD.replace("bind:", "header_read_timeout: soon, bind:"));
        assert!(
            err.starts_with("appservice.header_read_timeout: "),
            "a duration that does not parse names its key: {err}"
        );
    }

    #[test]
    fn environment_overrides_secrets() {
        let mut config =
            Config::parse(&GOOD.replace("bind:", "as_token: from-file, bind:")).unwrap();
        config.apply_env(|name| match name {
            ENV_AS_TOKEN => Some("from-env-as".into()),
            ENV_HS_TOKEN => Some("from-env-hs".into()),
            _ => None,
        });
        assert_eq!(config.appservice.as_token.as_deref(), Some("from-env-as"));
        assert_eq!(config.appservice.hs_token.as_deref(), Some("from-env-hs"));
    }

    #[test]
    fn own_users_are_recognised() {
        let config = Config::parse(GOOD).unwrap();
        let user = |s: &str| UserId::parse(s).unwrap();
        assert!(config.is_own_user(&user("@damon:localhost")));
        assert!(config.is_own_user(&user("@agentbus:localhost")));
        assert!(config.is_own_user(&user("@_bridge_tg_42:localhost")));
        assert!(!config.is_own_user(&user("@damon:elsewhere.org")));
        assert!(!config.is_own_user(&user("@alice:localhost")));
        assert_eq!(
            config.agent_by_user(&user("@coder:localhost")).unwrap().id,
            "coder"
        );
    }

    #[test]
    fn routing_mistakes_name_their_keys() {
        let text = format!(
            "{GOOD}{}",
            r#"
routing:
  keyword:
    rules:
      - { keywords: ["代码"], agent: coderr }
      - { regex: "fix(", agent: coder }
      - { agent: damon }
  agent_to_agent: { enabled: true, allow: [damon, ghost], max_hops: 0 }
bindings:
  - { agent: coder, match: {} }
  - { agent: nobody, match: { channel: telegramm, roles: [admin] } }
channels:
  matrix:
    dm_policy: allowlist
    groups:
      "!room:localhost": { agents: [coder, ghost], auto_reply: true, require_mention: true }
  matrx: {}
"#
        );
        let err = error_of(&text);
        let lines: Vec<&str> = err.lines().collect();
        let expected = [
            r#"routing.keyword.rules[0].agent: unknown agent "coderr""#,
            r#"routing.agent_to_agent.allow[1]: unknown agent "ghost""#,
            r#"bindings[1].agent: unknown agent "nobody""#,
            r#"channels.matrix.groups.!room:localhost.agents[1]: unknown agent "ghost""#,
            "routing.keyword.rules[2]: needs `keywords` or `regex`",
            "bindings[0].match: needs at least one of channel, account, peer, guild, team",
            "bindings[1].match.roles: needs `guild`",
            "channels.matrix.allow_from: is empty, so dm_policy: allowlist lets nobody in (use dm_policy: disabled for that)",
            "channels.matrix.groups.!room:localhost.auto_reply: contradicts require_mention: true (auto_reply answers unaddressed messages)",
            "routing.agent_to_agent.max_hops: must be at least 1",
        ];
        for line in expected {
            assert!(lines.contains(&line), "missing {line:?} in:\n{err}");
        }
        assert!(
            lines.contains(&"routing.keyword.rules[1].regex: invalid regex: unclosed group"),
            "{err}"
        );
        assert!(
            lines.iter().any(|l| l.starts_with(
                r#"bindings[1].match.channel: unknown channel "telegramm"; known: matrix, telegram"#
            )),
            "{err}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("channels.matrx: unknown channel; known: matrix")),
            "{err}"
        );
        assert_eq!(lines.len(), expected.len() + 3, "{err}");
    }

    #[test]
    fn routing_defaults() {
        let config = Config::parse(GOOD).unwrap();
        let routing = &config.routing;
        assert!(routing.mention.enabled && routing.keyword.enabled && routing.broadcast.enabled);
        assert_eq!(routing.broadcast.trigger, "@all");
        assert_eq!(
            (routing.context.lookback, routing.context.idle_timeout),
            (5, Duration::from_secs(600))
        );
        let a2a = &routing.agent_to_agent;
        assert!(!a2a.enabled);
        assert_eq!((a2a.max_hops, a2a.pair_limit), (3, 20));
        let matrix = config.channel_policy(&ChannelId::MATRIX);
        assert_eq!(matrix.dm_policy, DmPolicy::Pairing);
        assert_eq!(matrix.group_policy, GroupPolicy::Open);
        let mut config = config;
        config.apply_env(|name| (name == ENV_ADMIN_TOKEN).then(|| "from-env".to_owned()));
        assert_eq!(config.admin.token.as_deref(), Some("from-env"));
    }

    #[test]
    fn missing_file_is_named() {
        let err = Config::load(Path::new("/nonexistent/agentbus.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("cannot read config file /nonexistent/agentbus.yaml"),
            "{err}"
        );
    }
}
