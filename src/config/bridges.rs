//! `bridges:` — the platforms bridged into Matrix rooms, and where their webhooks listen.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ruma::OwnedUserId;
use serde::Deserialize;
use url::Url;

use super::AgentId;

/// `bridges:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgesConfig {
    /// The listener of the platforms' webhook routes (`/bridges/...`), apart from the
    /// appservice and admin APIs so a proxy can expose it alone; default `127.0.0.1:9010`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The generic signed webhook.
    #[serde(default)]
    pub webhook: WebhookBridgeConfig,
    /// IRC networks.
    #[serde(default)]
    pub irc: IrcBridgeConfig,
    /// Slack workspaces, over the Events API and the Web API.
    #[serde(default)]
    pub slack: SlackBridgeConfig,
    /// Telegram bots (the Bot API).
    #[serde(default)]
    pub telegram: TelegramBridgeConfig,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9010))
}

impl Default for BridgesConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            webhook: WebhookBridgeConfig::default(),
            irc: IrcBridgeConfig::default(),
            slack: SlackBridgeConfig::default(),
            telegram: TelegramBridgeConfig::default(),
        }
    }
}

impl BridgesConfig {
    /// Whether any platform account is configured (else the bridges do not start).
    pub fn any(&self) -> bool {
        self.listens() || !self.irc.accounts.is_empty()
    }

    /// Whether a platform that calls us is configured (else no listener opens).
    pub fn listens(&self) -> bool {
        !self.webhook.accounts.is_empty()
            || !self.slack.accounts.is_empty()
            || !self.telegram.accounts.is_empty()
    }

    /// Every configured account of every platform: platform, account ID, binding.
    pub fn accounts(&self) -> Vec<(&'static str, &str, AccountBinding<'_>)> {
        let mut all = Vec::new();
        for platform in ["webhook", "irc", "slack", "telegram"] {
            let ids: Vec<&String> = match platform {
                "webhook" => self.webhook.accounts.keys().collect(),
                "irc" => self.irc.accounts.keys().collect(),
                "slack" => self.slack.accounts.keys().collect(),
                _ => self.telegram.accounts.keys().collect(),
            };
            for id in ids {
                if let Some(binding) = self.binding(platform, id) {
                    all.push((platform, id.as_str(), binding));
                }
            }
        }
        all
    }

    /// The agent and followers of `platform`'s `account`, whatever the platform.
    pub fn binding(&self, platform: &str, account: &str) -> Option<AccountBinding<'_>> {
        match platform {
            "webhook" => self.webhook.accounts.get(account).map(|a| AccountBinding {
                agent: a.agent.as_ref(),
                invite: &a.invite,
            }),
            "irc" => self.irc.accounts.get(account).map(|a| AccountBinding {
                agent: a.agent.as_ref(),
                invite: &a.invite,
            }),
            "slack" => self.slack.accounts.get(account).map(|a| AccountBinding {
                agent: a.agent.as_ref(),
                invite: &a.invite,
            }),
            "telegram" => self.telegram.accounts.get(account).map(|a| AccountBinding {
                agent: a.agent.as_ref(),
                invite: &a.invite,
            }),
            _ => None,
        }
    }
}

/// What every platform's account says about Matrix: the agent bound to it and who is
/// invited to its portals.
#[derive(Debug, Clone, Copy)]
pub struct AccountBinding<'a> {
    pub agent: Option<&'a AgentId>,
    pub invite: &'a [OwnedUserId],
}

/// `bridges.irc:`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IrcBridgeConfig {
    /// The connections by ID, one per network (and nick).
    #[serde(default)]
    pub accounts: BTreeMap<String, IrcAccountConfig>,
}

/// `bridges.irc.accounts.<id>:` — one connection to one IRC network.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IrcAccountConfig {
    /// The server's host name.
    pub server: String,
    /// Default 6697 with TLS, 6667 without.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub tls: bool,
    /// The bot's nick; when taken, `nick_`, `nick__`, … are tried.
    pub nick: String,
    /// The channels joined, one portal each (`#agentbus`). Private messages to the nick
    /// are portals too, one per sender.
    #[serde(default)]
    pub channels: Vec<String>,
    /// The environment variable holding the server password (`PASS`), if the server has one.
    #[serde(default)]
    pub password_env: Option<String>,
    /// SASL PLAIN: the account name, and the environment variable holding its password.
    #[serde(default)]
    pub sasl: Option<IrcSaslConfig>,
    /// The agent that answers in this account's portals without being mentioned.
    #[serde(default)]
    pub agent: Option<AgentId>,
    /// Matrix users invited to each new portal of this account.
    #[serde(default)]
    pub invite: Vec<OwnedUserId>,
}

impl IrcAccountConfig {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(if self.tls { 6697 } else { 6667 })
    }
}

/// Whether `nick` is a nick (RFC 2812 §2.3.1: a letter or special first, then letters,
/// digits, specials or `-`; at most 30, what most networks allow).
pub fn is_irc_nick(nick: &str) -> bool {
    let special = |c: char| "[]\\`_^{|}".contains(c);
    let mut chars = nick.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || special(c))
        && chars.all(|c| c.is_ascii_alphanumeric() || special(c) || c == '-')
        && nick.len() <= 30
}

/// Whether `name` is a channel name (RFC 2812 §1.3: `#` or `&`, then no space, comma or
/// BEL, at most 50 characters).
pub fn is_irc_channel(name: &str) -> bool {
    (name.starts_with('#') || name.starts_with('&'))
        && name.len() > 1
        && name.len() <= 50
        && !name.contains([' ', ',', '\x07', ':'])
}

/// `bridges.irc.accounts.<id>.sasl:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IrcSaslConfig {
    pub username: String,
    pub password_env: String,
}

/// `bridges.telegram:`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelegramBridgeConfig {
    /// The bots by ID: a webhook-mode bot is `POST /bridges/telegram/<id>`.
    #[serde(default)]
    pub accounts: BTreeMap<String, TelegramAccountConfig>,
}

/// How a Telegram bot gets its updates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TelegramMode {
    /// Telegram POSTs them to `/bridges/telegram/<id>` (the operator calls `setWebhook`).
    #[default]
    Webhook,
    /// agentbus asks for them with `getUpdates` (no public URL needed).
    Polling,
}

/// `bridges.telegram.accounts.<id>:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelegramAccountConfig {
    /// The environment variable holding the bot token @BotFather gave.
    pub token_env: String,
    /// The environment variable holding the `secret_token` given to `setWebhook`, which
    /// Telegram sends back in `X-Telegram-Bot-Api-Secret-Token`; required in webhook mode.
    #[serde(default)]
    pub secret_token_env: Option<String>,
    #[serde(default)]
    pub mode: TelegramMode,
    /// The Bot API server; default `https://api.telegram.org`.
    #[serde(default = "default_telegram_api")]
    pub api_url: Url,
    /// The agent that answers in this bot's private chats, and in its groups when the
    /// bot is addressed (`@botname`, a reply to the bot, a `/command`).
    #[serde(default)]
    pub agent: Option<AgentId>,
    /// Matrix users invited to each new portal of this bot, to follow and join in.
    #[serde(default)]
    pub invite: Vec<OwnedUserId>,
}

fn default_telegram_api() -> Url {
    Url::parse("https://api.telegram.org").expect("a valid URL")
}

/// `bridges.webhook:`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookBridgeConfig {
    /// The accounts by ID: each is `POST /bridges/webhook/<id>`.
    #[serde(default)]
    pub accounts: BTreeMap<String, WebhookAccountConfig>,
}

/// `bridges.webhook.accounts.<id>:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookAccountConfig {
    /// The environment variable holding the shared secret both directions are signed with.
    pub secret_env: String,
    /// Where messages from Matrix (agents' answers, relayed people) are POSTed.
    pub outbound_url: Url,
    /// The agent that answers in this account's portals without being mentioned.
    #[serde(default)]
    pub agent: Option<AgentId>,
    /// Matrix users invited to each new portal of this account, to follow and join in.
    #[serde(default)]
    pub invite: Vec<OwnedUserId>,
}

/// `bridges.slack:`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackBridgeConfig {
    /// The Slack apps by ID: each is `POST /bridges/slack/<id>`, its Events API request URL.
    #[serde(default)]
    pub accounts: BTreeMap<String, SlackAccountConfig>,
}

/// `bridges.slack.accounts.<id>:` — one Slack app installed in one workspace.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackAccountConfig {
    /// The environment variable holding the app's bot token (`xoxb-…`, "OAuth & Permissions").
    pub bot_token_env: String,
    /// The environment variable holding the app's signing secret ("Basic Information").
    pub signing_secret_env: String,
    /// The Web API's base URL; default `https://slack.com/api`.
    #[serde(default = "default_slack_api_url")]
    pub api_url: Url,
    /// The agent that answers in this account's portals (and is the one an `@app` mention
    /// addresses).
    #[serde(default)]
    pub agent: Option<AgentId>,
    /// Matrix users invited to each new portal of this account, to follow and join in.
    #[serde(default)]
    pub invite: Vec<OwnedUserId>,
}

fn default_slack_api_url() -> Url {
    Url::parse("https://slack.com/api").expect("a valid URL")
}

#[cfg(test)]
mod tests {
    /// The commented `bridges:` example of `agentbus.example.yaml`, uncommented, is a valid
    /// config.
    #[test]
    fn the_commented_bridges_example_is_valid() {
        let example = include_str!("../../agentbus.example.yaml");
        let mut text = String::new();
        let mut in_block = false;
        for line in example.lines() {
            if line == "# bridges:" {
                in_block = true;
            } else if in_block && !line.starts_with("#   ") {
                in_block = false;
            }
            if in_block {
                text.push_str(&line[2..]);
            } else {
                text.push_str(line);
            }
            text.push('\n');
        }
        let config = crate::config::Config::parse(&text).unwrap();
        config.validate().unwrap();
        let shop = &config.bridges.webhook.accounts["shop"];
        assert_eq!(shop.secret_env, "AGENTBUS_WEBHOOK_SHOP_SECRET");
        assert_eq!(shop.agent.as_ref().map(|a| a.as_str()), Some("damon"));
        assert_eq!(config.bridges.listen.port(), 9010);
        let local = &config.bridges.irc.accounts["local"];
        assert_eq!((local.nick.as_str(), local.port()), ("agentbus", 6667));
        assert_eq!(local.channels, ["#agentbus"]);
        let binding = config.bridges.binding("irc", "local").unwrap();
        assert_eq!(binding.agent.map(|a| a.as_str()), Some("damon"));
        let team = &config.bridges.slack.accounts["team"];
        assert_eq!(team.bot_token_env, "AGENTBUS_SLACK_TEAM_BOT_TOKEN");
        assert_eq!(
            team.signing_secret_env,
            "AGENTBUS_SLACK_TEAM_SIGNING_SECRET"
        );
        assert_eq!(team.api_url.as_str(), "https://slack.com/api");
        assert_eq!(team.agent.as_ref().map(|a| a.as_str()), Some("damon"));
        let bot = &config.bridges.telegram.accounts["support"];
        assert_eq!(bot.token_env, "AGENTBUS_TELEGRAM_SUPPORT_TOKEN");
        assert_eq!(
            bot.secret_token_env.as_deref(),
            Some("AGENTBUS_TELEGRAM_SUPPORT_SECRET")
        );
        assert_eq!(bot.mode, super::TelegramMode::Webhook);
        assert_eq!(bot.api_url.as_str(), "https://api.telegram.org/");
        assert_eq!(bot.agent.as_ref().map(|a| a.as_str()), Some("damon"));
    }

    #[test]
    fn a_telegram_account_is_checked() {
        let base = include_str!("../../agentbus.example.yaml");
        let text = format!(
            "{base}\nbridges:\n  telegram:\n    accounts:\n      \"Bot 1\": {{ token_env: \" \", \
             api_url: \"ftp://x\", agent: ghost }}\n      poller: {{ token_env: T, mode: polling }}\n"
        );
        let err = crate::config::Config::parse(&text)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        for wanted in [
            "bridges.telegram.accounts.Bot 1: an account ID uses a-z, 0-9, - and _ only",
            "bridges.telegram.accounts.Bot 1.agent: unknown agent \"ghost\"",
            "bridges.telegram.accounts.Bot 1.token_env: names the environment variable",
            "bridges.telegram.accounts.Bot 1.secret_token_env: is required in webhook mode",
            "bridges.telegram.accounts.Bot 1.api_url: must be an http:// or https:// URL",
        ] {
            assert!(err.contains(wanted), "missing {wanted:?} in:\n{err}");
        }
        assert!(
            !err.contains("poller"),
            "a polling bot needs no secret token:\n{err}"
        );
        let polling = "bridges: { telegram: { accounts: { p: { token_env: T, mode: polling } } } }";
        let config = crate::config::Config::parse(&format!("{base}\n{polling}\n")).unwrap();
        assert_eq!(
            config.bridges.telegram.accounts["p"].mode,
            super::TelegramMode::Polling
        );
    }

    #[test]
    fn a_webhook_account_is_checked() {
        let base = include_str!("../../agentbus.example.yaml");
        let text = format!(
            "{base}\nbridges:\n  webhook:\n    accounts:\n      \"Shop/1\": {{ secret_env: \" \", \
             outbound_url: \"ftp://x\", agent: ghost }}\n  irc:\n    accounts:\n      \
             net: {{ server: \"\", nick: \"1bad\", channels: [\"nochan\"], \
             sasl: {{ username: u, password_env: \"\" }} }}\n"
        );
        let err = crate::config::Config::parse(&text)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        for wanted in [
            "bridges.webhook.accounts.Shop/1: an account ID uses a-z, 0-9, - and _ only",
            "bridges.webhook.accounts.Shop/1.agent: unknown agent \"ghost\"",
            "bridges.webhook.accounts.Shop/1.secret_env: names the environment variable",
            "bridges.webhook.accounts.Shop/1.outbound_url: must be an http:// or https:// URL",
            "bridges.irc.accounts.net.server: names the IRC server's host",
            "bridges.irc.accounts.net.nick: \"1bad\" is not an IRC nick",
            "bridges.irc.accounts.net.channels: \"nochan\" is not a channel name",
            "bridges.irc.accounts.net.sasl: needs username and password_env",
        ] {
            assert!(err.contains(wanted), "missing {wanted:?} in:\n{err}");
        }
    }

    #[test]
    fn a_slack_account_is_checked() {
        let base = include_str!("../../agentbus.example.yaml");
        let text = format!(
            "{base}\nbridges:\n  slack:\n    accounts:\n      \"Team 1\": {{ bot_token_env: \"\", \
             signing_secret_env: \" \", api_url: \"ftp://x\", agent: ghost }}\n"
        );
        let err = crate::config::Config::parse(&text)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        for wanted in [
            "bridges.slack.accounts.Team 1: an account ID uses a-z, 0-9, - and _ only",
            "bridges.slack.accounts.Team 1.agent: unknown agent \"ghost\"",
            "bridges.slack.accounts.Team 1.bot_token_env: names the environment variable",
            "bridges.slack.accounts.Team 1.signing_secret_env: names the environment variable",
            "bridges.slack.accounts.Team 1.api_url: must be an http:// or https:// URL",
        ] {
            assert!(err.contains(wanted), "missing {wanted:?} in:\n{err}");
        }
    }
}
