//! The admin side of the CLI (`agentbus route`, `agentbus pairing …`, `agentbus tasks …`): it asks the running
//! agentbus through the admin API, and when none is running it does the same work itself
//! against the store and the homeserver. Either way the answer is the same.

use std::net::SocketAddr;

use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{ChannelId, Config};
use crate::ops::api::{self, ApproveRequest, PairingState, RevokeRequest};
use crate::ops::checks::{CheckFailure, EXIT_LOCAL_SETUP};
use crate::ops::schedule::{self, TaskView};
use crate::router::RouteDecision;
use crate::router::explain::{ExplainError, RouteQuery};
use crate::server::Services;
use crate::store::{self, PairingRequest, Stores};

/// Exit code of an admin command whose request was refused (bad query, unknown code).
pub const EXIT_REFUSED: i32 = 1;

/// How a call to the admin API ended.
enum Call<T> {
    Done(T),
    /// Nothing listens on `appservice.bind`: no agentbus is running.
    NotRunning,
}

/// A client of the running agentbus's admin API.
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl AdminClient {
    /// A client for the agentbus `config` describes (its `appservice.bind`, with a wildcard
    /// address replaced by loopback).
    pub fn for_config(config: &Config) -> Self {
        let mut addr: SocketAddr = config.appservice.bind;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        Self {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
            token: config.admin.token.clone().unwrap_or_default(),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<Call<T>, CheckFailure> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) if e.is_connect() => return Ok(Call::NotRunning),
            Err(e) => {
                return Err(CheckFailure::new(
                    EXIT_LOCAL_SETUP,
                    format!("✗ admin API at {} failed: {e}", self.base),
                ));
            }
        };
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| {
            CheckFailure::new(
                EXIT_LOCAL_SETUP,
                format!("✗ admin API answer unreadable: {e}"),
            )
        })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            let code = if status.as_u16() == 401 {
                EXIT_LOCAL_SETUP
            } else {
                EXIT_REFUSED
            };
            return Err(CheckFailure::new(
                code,
                format!("✗ {message} (HTTP {status})"),
            ));
        }
        serde_json::from_slice(&bytes).map(Call::Done).map_err(|e| {
            CheckFailure::new(
                EXIT_LOCAL_SETUP,
                format!("✗ admin API answer unreadable: {e}"),
            )
        })
    }
}

fn open_store(config: &Config) -> Result<Stores, CheckFailure> {
    store::open(&config.store).map_err(|e| {
        CheckFailure::new(
            EXIT_LOCAL_SETUP,
            format!("✗ {e} — is an agentbus running on another address with this store.path?"),
        )
    })
}

/// Explains how `query` would be routed.
pub async fn route(config: &Config, query: &RouteQuery) -> Result<RouteDecision, CheckFailure> {
    let client = AdminClient::for_config(config);
    if let Call::Done(decision) = client
        .call(Method::POST, "/api/v1/router/test", Some(query))
        .await?
    {
        return Ok(decision);
    }
    // No agentbus running: route with our own store and the homeserver.
    let services = Services::build(config.clone())?;
    services.inbox.resolve_aliases().await;
    services
        .inbox
        .explain_route(query)
        .await
        .map_err(|ExplainError::BadQuery(e)| CheckFailure::new(EXIT_REFUSED, format!("✗ {e}")))
}

/// Pending pairing requests and approved senders.
pub async fn pairing_list(config: &Config) -> Result<PairingState, CheckFailure> {
    let client = AdminClient::for_config(config);
    if let Call::Done(state) = client
        .call(Method::GET, "/api/v1/pairing", None::<&()>)
        .await?
    {
        return Ok(state);
    }
    api::read_pairings(open_store(config)?.pairing.as_ref())
        .await
        .map_err(|e| CheckFailure::new(EXIT_LOCAL_SETUP, format!("✗ {e}")))
}

/// Approves the pairing request with `code`.
pub async fn pairing_approve(config: &Config, code: &str) -> Result<PairingRequest, CheckFailure> {
    let client = AdminClient::for_config(config);
    let body = ApproveRequest {
        code: code.to_owned(),
    };
    if let Call::Done(request) = client
        .call(Method::POST, "/api/v1/pairing/approve", Some(&body))
        .await?
    {
        return Ok(request);
    }
    api::approve(open_store(config)?.pairing.as_ref(), code)
        .await
        .map_err(|e| CheckFailure::new(EXIT_LOCAL_SETUP, format!("✗ {e}")))?
        .ok_or_else(|| CheckFailure::new(EXIT_REFUSED, format!("✗ {}", api::unknown_code(code))))
}

/// Forgets the approval of `sender` on `channel`.
pub async fn pairing_revoke(
    config: &Config,
    channel: &ChannelId,
    sender: &str,
) -> Result<(), CheckFailure> {
    let client = AdminClient::for_config(config);
    let body = RevokeRequest {
        channel: channel.clone(),
        sender: sender.to_owned(),
    };
    if let Call::Done(_) = client
        .call::<serde_json::Value>(Method::POST, "/api/v1/pairing/revoke", Some(&body))
        .await?
    {
        return Ok(());
    }
    let store = open_store(config)?;
    match store.pairing.revoke_pairing(channel, sender).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(CheckFailure::new(
            EXIT_REFUSED,
            format!("✗ {sender} is not paired on {channel}"),
        )),
        Err(e) => Err(CheckFailure::new(EXIT_LOCAL_SETUP, format!("✗ {e}"))),
    }
}

/// Every scheduled task and heartbeat with its last and next run: from the running
/// agentbus, else as the store has them.
pub async fn tasks_list(config: &Config) -> Result<Vec<TaskView>, CheckFailure> {
    let client = AdminClient::for_config(config);
    if let Call::Done(tasks) = client
        .call(Method::GET, "/api/v1/tasks", None::<&()>)
        .await?
    {
        return Ok(tasks);
    }
    schedule::list_stored(config, &open_store(config)?)
        .await
        .map_err(|e| CheckFailure::new(EXIT_LOCAL_SETUP, format!("✗ {e}")))
}

/// Runs task `name` now in the running agentbus (its agents and lanes are there) and
/// returns how the task stands after the run.
pub async fn tasks_run(config: &Config, name: &str) -> Result<TaskView, CheckFailure> {
    let client = AdminClient::for_config(config);
    let path = format!(
        "/api/v1/tasks/{}/trigger",
        percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC)
    );
    match client.call(Method::POST, &path, None::<&()>).await? {
        Call::Done(view) => Ok(view),
        Call::NotRunning => Err(CheckFailure::new(
            EXIT_REFUSED,
            format!(
                "✗ no agentbus is running on {}: start it (agentbus serve) to run a task",
                config.appservice.bind
            ),
        )),
    }
}
