//! Startup checks, in order, each with a one-line human message and its own exit code:
//! config valid (2), homeserver reachable (3), as_token valid (4), homeserver can reach us (5).
//! Local setup problems (store, listener, token file) exit with 6.

use std::fmt;

use crate::config::Config;
use crate::matrix::{MatrixClient, MatrixError};
use crate::net::Contact;

/// A check that failed: what to print and which exit code to leave with.
#[derive(Debug)]
pub struct CheckFailure {
    pub code: i32,
    pub message: String,
}

impl fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CheckFailure {}

pub const EXIT_CONFIG: i32 = 2;
pub const EXIT_HOMESERVER_UNREACHABLE: i32 = 3;
pub const EXIT_TOKEN_REJECTED: i32 = 4;
pub const EXIT_PING_FAILED: i32 = 5;
pub const EXIT_LOCAL_SETUP: i32 = 6;

impl CheckFailure {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Runs the homeserver checks in order; returns one line per passed check, or the first
/// failure. The appservice HTTP server must already be listening for the ping to pass.
pub async fn run_homeserver_checks(
    config: &Config,
    matrix: &MatrixClient,
    contact: &Contact,
) -> Result<Vec<String>, CheckFailure> {
    let url = config.homeserver.url.as_str().trim_end_matches('/');
    let mut passed = Vec::new();

    let versions = matrix.get_versions().await.map_err(|e| {
        CheckFailure::new(
            EXIT_HOMESERVER_UNREACHABLE,
            format!("✗ homeserver unreachable at {url}: {e} — is it running, and is homeserver.url right?"),
        )
    })?;
    passed.push(format!(
        "✓ homeserver reachable at {url} (spec {})",
        versions.last().map(String::as_str).unwrap_or("?")
    ));

    let me = matrix.whoami().await.map_err(|e| {
        let hint = match &e {
            MatrixError::Permanent { errcode, .. } if errcode == "M_UNKNOWN_TOKEN" || errcode == "M_FORBIDDEN" => {
                " — the homeserver does not know our as_token: add the file from `agentbus registration` to its app_service_config_files and restart it"
            }
            _ => "",
        };
        CheckFailure::new(EXIT_TOKEN_REJECTED, format!("✗ as_token rejected by the homeserver: {e}{hint}"))
    })?;
    let expected = config.sender_user_id();
    if me != expected {
        return Err(CheckFailure::new(
            EXIT_TOKEN_REJECTED,
            format!(
                "✗ as_token belongs to {me}, expected {expected} — the registration's sender_localpart differs from the config; regenerate it"
            ),
        ));
    }
    passed.push(format!("✓ as_token accepted (acting as {me})"));

    let agentbus_url = config.appservice_url();
    let agentbus_url = agentbus_url.as_str().trim_end_matches('/');
    // `send` already retries a 5xx (a homeserver hiccup) with backoff.
    match matrix.ping_appservice(&config.appservice.id).await {
        Ok(duration) => passed.push(format!(
            "✓ homeserver reached agentbus ({} ms round trip)",
            duration.as_millis()
        )),
        Err(_) if contact.saw_wrong_token() => {
            return Err(CheckFailure::new(
                EXIT_PING_FAILED,
                "✗ the homeserver reached agentbus with a different hs_token: regenerate the registration (`agentbus registration`) and restart the homeserver",
            ));
        }
        // Synapse's recover-on-ping can answer 502 (AlreadyCalled) while its queued
        // transactions are already arriving: the homeserver plainly reaches us.
        Err(e) if contact.reached_us() => passed.push(format!(
            "⚠ the homeserver's ping answered {e}, but it is delivering to agentbus at {agentbus_url} with the right hs_token; going on"
        )),
        Err(e) => {
            return Err(CheckFailure::new(
                EXIT_PING_FAILED,
                format!(
                    "✗ the homeserver cannot reach agentbus at {agentbus_url}: {e} — check appservice.url (and the registration's url) is reachable from the homeserver"
                ),
            ));
        }
    }
    Ok(passed)
}
