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
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9010))
}

impl Default for BridgesConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            webhook: WebhookBridgeConfig::default(),
        }
    }
}

impl BridgesConfig {
    /// Whether any platform account is configured (else no listener opens).
    pub fn any(&self) -> bool {
        !self.webhook.accounts.is_empty()
    }
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
