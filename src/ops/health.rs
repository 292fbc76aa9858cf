//! `GET /health` and `GET /ready`, for container and load-balancer probes (no token).
//!
//! `/health` says the process answers HTTP: always `200 {"status":"ok"}`.
//!
//! `/ready` runs the checks and answers `200` when agentbus can do its work, `503` when
//! not, with one entry per check:
//!
//! ```json
//! {"status": "ready",
//!  "checks": {
//!    "store":      {"ok": true, "detail": "writable"},
//!    "homeserver": {"ok": true, "detail": "reachable (spec v1.12)"},
//!    "appservice_ping": {"ok": true, "detail": "the homeserver reached agentbus in 4 ms"},
//!    "providers":  {"ok": true, "critical": false,
//!                   "providers": {"openai": {"state": "ok", "at_ms": 1767000000000}}}}}
//! ```
//!
//! The store, the homeserver and the ping decide the status. The providers are reported
//! but not critical: a model outage is not helped by taking agentbus out of rotation —
//! it still takes every event and answers with a notice. The homeserver checks are
//! cached for a few seconds, so a probe every second does not become a request storm.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::matrix::MatrixClient;
use crate::net::Contact;
use crate::store::JournalStore;

/// How long one homeserver probe may take before it counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the homeserver checks' answer is reused.
const CACHE_FOR: Duration = Duration::from_secs(5);

/// How a provider's last model call went, as `/ready` reports it.
#[derive(Debug, Clone)]
pub struct ProviderCall {
    pub name: String,
    /// `None`: no call since start.
    pub ok: Option<bool>,
    pub at_ms: Option<u64>,
    pub error: Option<String>,
}

/// The providers' last calls, read at each `/ready`.
pub type ProviderCalls = Arc<dyn Fn() -> Vec<ProviderCall> + Send + Sync>;

/// A bridged platform account's connection state, as `/ready` reports it.
#[derive(Debug, Clone)]
pub struct BridgeAccount {
    pub platform: String,
    pub account: String,
    pub state: &'static str,
    /// Connected, or on its way there by itself.
    pub healthy: bool,
    pub detail: Option<String>,
    pub since_ms: u64,
}

/// The bridge accounts' states, read at each `/ready`.
pub type BridgeAccounts = Arc<dyn Fn() -> Vec<BridgeAccount> + Send + Sync>;

/// What `/ready` checks.
pub struct Readiness {
    journal: Arc<dyn JournalStore>,
    matrix: Arc<MatrixClient>,
    contact: Arc<Contact>,
    appservice_id: String,
    providers: ProviderCalls,
    bridges: std::sync::OnceLock<BridgeAccounts>,
    cached: tokio::sync::Mutex<Option<(Instant, Check, Check)>>,
}

/// One check's result.
#[derive(Debug, Clone)]
struct Check {
    ok: bool,
    detail: String,
}

impl Check {
    fn json(&self) -> Value {
        json!({ "ok": self.ok, "detail": self.detail })
    }
}

impl Readiness {
    pub fn new(
        journal: Arc<dyn JournalStore>,
        matrix: Arc<MatrixClient>,
        contact: Arc<Contact>,
        appservice_id: String,
        providers: ProviderCalls,
    ) -> Arc<Self> {
        Arc::new(Self {
            journal,
            matrix,
            contact,
            appservice_id,
            providers,
            bridges: std::sync::OnceLock::new(),
            cached: tokio::sync::Mutex::new(None),
        })
    }

    /// Reports the bridge accounts too (not critical: one platform's outage is no reason
    /// to take agentbus out of rotation).
    pub fn set_bridges(&self, accounts: BridgeAccounts) {
        let _ = self.bridges.set(accounts);
    }

    /// Every check; whether all the critical ones passed.
    pub async fn report(&self) -> (bool, Value) {
        let store = if self.journal.is_writable() {
            Check {
                ok: true,
                detail: "writable".into(),
            }
        } else {
            Check {
                ok: false,
                detail: "the last write failed (disk full or read-only?); it recovers by itself when writes succeed".into(),
            }
        };
        let (homeserver, ping) = self.homeserver_checks().await;
        let providers = (self.providers)();
        let providers_json: serde_json::Map<String, Value> = providers
            .iter()
            .map(|p| {
                let state = match p.ok {
                    None => "unused",
                    Some(true) => "ok",
                    Some(false) => "failing",
                };
                let mut entry = json!({ "state": state });
                if let Some(at) = p.at_ms {
                    entry["at_ms"] = at.into();
                }
                if let Some(error) = &p.error {
                    entry["error"] = error.clone().into();
                }
                (p.name.clone(), entry)
            })
            .collect();
        let providers_ok = providers.iter().all(|p| p.ok != Some(false));
        let ready = store.ok && homeserver.ok && ping.ok;
        let mut body = json!({
            "status": if ready { "ready" } else { "not_ready" },
            "checks": {
                "store": store.json(),
                "homeserver": homeserver.json(),
                "appservice_ping": ping.json(),
                "providers": { "ok": providers_ok, "critical": false, "providers": providers_json },
            }
        });
        let accounts = self.bridges.get().map(|f| f()).unwrap_or_default();
        if !accounts.is_empty() {
            let ok = accounts.iter().all(|a| a.healthy);
            let accounts: serde_json::Map<String, Value> = accounts
                .into_iter()
                .map(|a| {
                    let mut entry = json!({ "state": a.state, "since_ms": a.since_ms });
                    if let Some(detail) = a.detail {
                        entry["detail"] = detail.into();
                    }
                    (format!("{}/{}", a.platform, a.account), entry)
                })
                .collect();
            body["checks"]["bridges"] =
                json!({ "ok": ok, "critical": false, "accounts": accounts });
        }
        (ready, body)
    }

    /// The homeserver reachable, and its ping of agentbus, from the cache when fresh.
    async fn homeserver_checks(&self) -> (Check, Check) {
        let mut cached = self.cached.lock().await;
        if let Some((at, homeserver, ping)) = cached.as_ref()
            && at.elapsed() < CACHE_FOR
        {
            return (homeserver.clone(), ping.clone());
        }
        let homeserver = match tokio::time::timeout(PROBE_TIMEOUT, self.matrix.get_versions()).await
        {
            Ok(Ok(versions)) => Check {
                ok: true,
                detail: format!(
                    "reachable (spec {})",
                    versions.last().map_or("?", String::as_str)
                ),
            },
            Ok(Err(e)) => Check {
                ok: false,
                detail: format!("unreachable: {e}"),
            },
            Err(_) => Check {
                ok: false,
                detail: format!(
                    "unreachable: no answer within {} s",
                    PROBE_TIMEOUT.as_secs()
                ),
            },
        };
        let ping = if homeserver.ok {
            self.ping().await
        } else {
            Check {
                ok: false,
                detail: "not tried: the homeserver is unreachable".into(),
            }
        };
        *cached = Some((Instant::now(), homeserver.clone(), ping.clone()));
        (homeserver, ping)
    }

    async fn ping(&self) -> Check {
        match tokio::time::timeout(
            PROBE_TIMEOUT,
            self.matrix.ping_appservice(&self.appservice_id),
        )
        .await
        {
            Ok(Ok(took)) => Check {
                ok: true,
                detail: format!("the homeserver reached agentbus in {} ms", took.as_millis()),
            },
            Ok(Err(_)) if self.contact.saw_wrong_token() => Check {
                ok: false,
                detail: "the homeserver calls agentbus with a different hs_token: regenerate the registration and restart the homeserver".into(),
            },
            // Synapse answers a ping with 502 while it is already delivering to us.
            Ok(Err(e)) if self.contact.reached_us() => Check {
                ok: true,
                detail: format!("the ping answered {e}, but the homeserver delivers to agentbus with the right token"),
            },
            Ok(Err(e)) => Check {
                ok: false,
                detail: format!("the homeserver cannot reach agentbus: {e}"),
            },
            Err(_) => Check {
                ok: false,
                detail: format!("no ping answer within {} s", PROBE_TIMEOUT.as_secs()),
            },
        }
    }
}

/// `GET /health`.
pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /ready`.
pub async fn ready(State(readiness): State<Arc<Readiness>>) -> (StatusCode, Json<Value>) {
    let (ready, body) = readiness.report().await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::RetryPolicy;
    use crate::store::FjallBackend;
    use crate::store::embedded::Embedded;

    #[tokio::test]
    async fn the_store_check_fails_while_writes_fail_and_recovers_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let store = Arc::new(Embedded::open(move || FjallBackend::open(&path)).unwrap());
        // Nothing listens on port 9 of loopback: the homeserver is down.
        let matrix = MatrixClient::new("http://127.0.0.1:9", "as", RetryPolicy::default());
        let providers: ProviderCalls = Arc::new(|| {
            vec![ProviderCall {
                name: "main".into(),
                ok: None,
                at_ms: None,
                error: None,
            }]
        });
        let readiness = Readiness::new(
            store.clone(),
            matrix,
            Arc::default(),
            "agentbus".into(),
            providers,
        );
        let (ready, body) = readiness.report().await;
        assert!(!ready, "{body}");
        assert_eq!(body["status"], "not_ready");
        assert_eq!(body["checks"]["store"]["ok"], true);
        assert_eq!(body["checks"]["homeserver"]["ok"], false);
        assert!(
            body["checks"]["homeserver"]["detail"]
                .as_str()
                .unwrap()
                .starts_with("unreachable: "),
            "{body}"
        );
        assert_eq!(body["checks"]["appservice_ping"]["ok"], false);
        assert_eq!(
            body["checks"]["providers"]["providers"]["main"]["state"],
            "unused"
        );

        store.fail_once();
        let (_, body) = readiness.report().await;
        assert_eq!(body["checks"]["store"]["ok"], false, "{body}");
        // The next call reopens the store from disk; it writes again.
        store.journal_head().await.unwrap();
        let (_, body) = readiness.report().await;
        assert_eq!(body["checks"]["store"]["ok"], true, "{body}");
    }
}
