//! Wiring: builds the services from a config and runs them until shutdown.
//!
//! [`serve`] takes a bound listener and a shutdown token, so tests run it on
//! `127.0.0.1:0` and stop it at will. Shutdown stops the HTTP server, lets each room
//! worker finish the event in hand, and leaves the rest journaled for the next start.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::inbox::InboxReceiver;
use crate::matrix::{MatrixClient, RetryPolicy};
use crate::ops::checks::{self, CheckFailure, EXIT_LOCAL_SETUP};
use crate::store::{SledStore, Store};
use crate::{AppState, appservice};

/// How long txnIds and processed event_ids are remembered for deduplication.
const DEDUPE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long shutdown waits for in-flight answers before leaving them to the journal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Everything built from the config, before anything runs.
pub struct Services {
    pub state: Arc<AppState>,
    receiver: InboxReceiver,
}

impl Services {
    /// Opens the store and builds the shared state. `config` must have its tokens resolved
    /// ([`crate::appservice::registration::ensure_tokens`]).
    pub fn build(config: Config) -> Result<Self, CheckFailure> {
        let store_dir = config.store.path.join("sled");
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&store_dir).map_err(|e| {
            CheckFailure::new(
                EXIT_LOCAL_SETUP,
                format!("✗ {e} — is another agentbus using this store.path?"),
            )
        })?);
        let as_token = config
            .appservice
            .as_token
            .as_deref()
            .expect("tokens are resolved before building services");
        let matrix = MatrixClient::new(
            config.homeserver.url.as_str(),
            as_token,
            RetryPolicy::default(),
        );
        let (state, receiver) = AppState::new(config, store, matrix);
        Ok(Self { state, receiver })
    }
}

/// Runs agentbus on `listener` until `shutdown` is cancelled: HTTP first (the homeserver's
/// ping needs it), then the startup checks, agent profiles, and the inbox — which replays
/// whatever the journal still holds before taking new events.
pub async fn serve(
    services: Services,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), CheckFailure> {
    let Services { state, receiver } = services;
    let config = state.config.clone();
    let http = tokio::spawn({
        let app = appservice::router(state.clone());
        let shutdown = shutdown.clone();
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }
    });

    let passed = match checks::run_homeserver_checks(&config, &state.matrix).await {
        Ok(passed) => passed,
        Err(failure) => {
            shutdown.cancel();
            let _ = http.await;
            return Err(failure);
        }
    };
    for line in passed {
        tracing::info!("{line}");
    }
    provision_agents(&config, &state.matrix).await;

    tokio::spawn(prune_daily(state.store.clone(), shutdown.clone()));
    let pending = state.store.pending_events().map_err(|e| {
        CheckFailure::new(EXIT_LOCAL_SETUP, format!("✗ cannot read the journal: {e}"))
    })?;
    state.processor.resolve_aliases().await;
    let inbox_task = tokio::spawn(
        state
            .processor
            .clone()
            .run(pending, receiver, shutdown.clone()),
    );
    tracing::info!(agents = config.agents.len(), "agentbus is running");

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    if let Ok(Err(e)) = http.await {
        tracing::warn!(error = %e, "HTTP server ended with an error");
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, inbox_task)
        .await
        .is_err()
    {
        tracing::warn!(
            "answers still in flight at shutdown stay journaled and are redone on the next start"
        );
    }
    Ok(())
}

/// Prunes old dedupe records now and once a day until shutdown.
async fn prune_daily(store: Arc<dyn Store>, shutdown: CancellationToken) {
    loop {
        let pruning = store.clone();
        match tokio::task::spawn_blocking(move || pruning.prune_dedupe_records(DEDUPE_RETENTION))
            .await
        {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(records = n, "pruned old txnId / event_id dedupe records"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not prune dedupe records"),
            Err(e) => tracing::warn!(error = %e, "dedupe pruning task failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(24 * 3600)) => {}
        }
    }
}

/// Registers every agent and sets its profile. Failures are logged, not fatal: an agent
/// whose profile could not be set still answers.
pub async fn provision_agents(config: &Config, matrix: &MatrixClient) {
    for agent in &config.agents {
        let user = config.user_id(&agent.id);
        if let Err(e) = matrix.ensure_registered(&agent.id).await {
            tracing::error!(agent = %agent.id, error = %e, "could not register agent user");
            continue;
        }
        if let Err(e) = matrix.set_display_name(&user, agent.display_name()).await {
            tracing::warn!(agent = %agent.id, error = %e, "could not set display name");
        }
        if let Some(avatar) = &agent.avatar {
            let url = ruma::OwnedMxcUri::from(avatar.as_str());
            match url.validate() {
                Ok(_) => {
                    if let Err(e) = matrix.set_avatar_url(&user, url).await {
                        tracing::warn!(agent = %agent.id, error = %e, "could not set avatar");
                    }
                }
                Err(e) => {
                    tracing::warn!(agent = %agent.id, error = %e, "avatar is not a valid mxc:// URI")
                }
            }
        }
        tracing::info!(agent = %agent.id, user = %user, "agent ready");
    }
}
