//! The composition root: builds every service once from the config, serves HTTP, starts the
//! workers on one [`TaskTracker`], and runs until shutdown.
//!
//! [`serve`] takes a bound listener and a shutdown token, so tests run it on `127.0.0.1:0`
//! and stop it at will. Shutdown stops intake first (the HTTP server, the inbox taking new
//! events), lets answers in flight finish for a grace period, then stops what is left; an
//! event whose answer did not finish stays journaled and is answered on the next start.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agents::AgentRuntime;
use crate::appservice::{self, AppState};
use crate::bridges::{self, Bridges, Channel, irc, slack, telegram, webhook};
use crate::collab::Collab;
use crate::config::Config;
use crate::inbox::Inbox;
use crate::llm::{LlmHub, build_providers};
use crate::matrix::{MatrixClient, RetryPolicy};
use crate::net::listener::{self, ListenerLimits};
use crate::ops::api::{self, AdminState};
use crate::ops::checks::{self, CheckFailure, EXIT_LOCAL_SETUP};
use crate::ops::commands::Commands;
use crate::ops::health::{ProviderCall, ProviderCalls, Readiness};
use crate::ops::metrics::{self, Scrape};
use crate::ops::monitor::Monitor;
use crate::ops::schedule::{self, Scheduler};
use crate::store::feed::{self, Backlog, FeedReceiver};
use crate::store::{self, JournalStore, Stores};

/// How long txnIds and journaled event_ids are remembered for deduplication.
const DEDUPE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long shutdown waits for in-flight answers before leaving them to the journal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Everything built from the config, before anything runs.
pub struct Services {
    pub config: Arc<Config>,
    pub store: Stores,
    pub matrix: Arc<MatrixClient>,
    pub inbox: Arc<Inbox>,
    pub runtime: Arc<AgentRuntime>,
    collab: Arc<Collab>,
    pub backlog: Arc<Backlog>,
    appservice: Arc<AppState>,
    admin: Arc<AdminState>,
    readiness: Arc<Readiness>,
    scrape: Arc<Scrape>,
    pub scheduler: Arc<Scheduler>,
    monitor: Arc<Monitor>,
    pub bridges: Arc<Bridges>,
    /// The webhook accounts, whose routes the bridges' listener serves.
    webhooks: Vec<Arc<webhook::WebhookChannel>>,
    /// The Slack accounts, whose Events API routes the bridges' listener serves.
    slack: Vec<Arc<slack::SlackChannel>>,
    /// The Telegram bots; those in webhook mode have routes on the bridges' listener.
    telegrams: Vec<Arc<telegram::TelegramChannel>>,
    /// Taken by [`Services::start_workers`].
    feed: Option<FeedReceiver>,
    tracker: TaskTracker,
    /// Cancelled when the grace period is over: answers stop waiting and stay journaled.
    stop: CancellationToken,
}

impl Services {
    /// Opens the store the config names and builds the services. `config` must have its
    /// tokens resolved ([`crate::appservice::registration::ensure_tokens`]).
    pub fn build(config: Config) -> Result<Self, CheckFailure> {
        for (id, account) in &config.bridges.webhook.accounts {
            webhook::secret(id, &account.secret_env)
                .map_err(|e| CheckFailure::new(EXIT_LOCAL_SETUP, format!("✗ {e}")))?;
        }
        for (id, account) in &config.bridges.irc.accounts {
            let variables = account
                .password_env
                .iter()
                .map(|v| ("password_env", v))
                .chain(
                    account
                        .sasl
                        .iter()
                        .map(|s| ("sasl.password_env", &s.password_env)),
                );
            for (key, variable) in variables {
                if std::env::var(variable).map_or(true, |v| v.is_empty()) {
                    return Err(CheckFailure::new(
                        EXIT_LOCAL_SETUP,
                        format!(
                            "✗ bridges.irc.accounts.{id}.{key} names {variable}, which is not set: \
                             set it to the password"
                        ),
                    ));
                }
            }
        }
        for (id, account) in &config.bridges.slack.accounts {
            slack::credentials(id, account)
                .map_err(|e| CheckFailure::new(EXIT_LOCAL_SETUP, format!("✗ {e}")))?;
        }
        for (id, account) in &config.bridges.telegram.accounts {
            telegram::credentials(id, account)
                .map_err(|e| CheckFailure::new(EXIT_LOCAL_SETUP, format!("✗ {e}")))?;
        }
        let store = store::open(&config.store).map_err(|e| {
            CheckFailure::new(
                EXIT_LOCAL_SETUP,
                format!("✗ {e} — is another agentbus using this store.path?"),
            )
        })?;
        Ok(Self::with_store(config, store))
    }

    /// Builds the services over an open store.
    pub fn with_store(config: Config, store: Stores) -> Self {
        let config = Arc::new(config);
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
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let runtime = AgentRuntime::new(
            config.clone(),
            matrix.clone(),
            store.clone(),
            LlmHub::new(config.clone(), build_providers(&config)),
            tracker.clone(),
            stop.clone(),
        );
        let backlog = Backlog::new(config.appservice.max_backlog);
        let (sender, receiver) = feed::feed(backlog.clone());
        let collab = Collab::new(
            config.clone(),
            runtime.clone(),
            matrix.clone(),
            store.clone(),
            tracker.clone(),
            stop.clone(),
        );
        let inbox = Inbox::new(
            config.clone(),
            store.clone(),
            matrix.clone(),
            runtime.clone(),
            collab.clone(),
            backlog.clone(),
        );
        let appservice = AppState::new(
            config.clone(),
            store.journal.clone(),
            sender,
            matrix.clone(),
        );
        let scheduler = Scheduler::new(
            config.clone(),
            store.clone(),
            matrix.clone(),
            runtime.clone(),
            collab.clone(),
            stop.clone(),
        );
        let monitor = Monitor::new(config.clone(), store.clone(), matrix.clone());
        let admin = AdminState::new(
            config.admin.token.as_deref().unwrap_or_default(),
            store.clone(),
            inbox.clone(),
        );
        let providers: ProviderCalls = {
            let runtime = runtime.clone();
            Arc::new(move || {
                runtime
                    .hub()
                    .last_calls()
                    .into_iter()
                    .map(|(name, last)| ProviderCall {
                        name,
                        ok: last.as_ref().map(|l| l.ok),
                        at_ms: last.as_ref().map(|l| l.at_ms),
                        error: last.and_then(|l| l.error),
                    })
                    .collect()
            })
        };
        let readiness = Readiness::new(
            store.journal.clone(),
            matrix.clone(),
            appservice.contact.clone(),
            config.appservice.id.clone(),
            providers,
        );
        let commands = Commands::new(
            config.clone(),
            store.clone(),
            runtime.clone(),
            collab.clone(),
            matrix.clone(),
            readiness.clone(),
            scheduler.clone(),
        );
        let webhooks = webhook::channels(&config);
        let slack = slack::channels(&config);
        let telegrams = telegram::channels(&config);
        let mut channels: Vec<Arc<dyn Channel>> = webhooks
            .iter()
            .map(|c| c.clone() as Arc<dyn Channel>)
            .chain(slack.iter().map(|c| c.clone() as Arc<dyn Channel>))
            .chain(telegrams.iter().map(|c| c.clone() as Arc<dyn Channel>))
            .collect();
        channels.extend(
            irc::channels(&config)
                .into_iter()
                .map(|c| c as Arc<dyn Channel>),
        );
        let bridges = Bridges::new(
            config.clone(),
            matrix.clone(),
            store.portals.clone(),
            channels,
        );
        inbox.set_bridges(bridges.clone());
        let states = Arc::downgrade(&bridges);
        readiness.set_bridges(Arc::new(move || {
            states
                .upgrade()
                .map(|b| b.states())
                .unwrap_or_default()
                .into_iter()
                .map(|s| crate::ops::health::BridgeAccount {
                    platform: s.platform.to_string(),
                    account: s.account,
                    state: s.state.as_str(),
                    healthy: s.state.is_healthy(),
                    detail: s.detail,
                    since_ms: s.since_ms,
                })
                .collect()
        }));
        let explain: Arc<dyn crate::router::explain::Explain> = inbox.clone();
        commands.set_explain(Arc::downgrade(&explain));
        inbox.set_management(commands);
        let scrape = Arc::new(Scrape {
            backlog: backlog.clone(),
            journal: store.journal.clone(),
            runtime: runtime.clone(),
        });
        Self {
            config,
            store,
            matrix,
            inbox,
            runtime,
            collab,
            backlog,
            appservice,
            admin,
            readiness,
            scrape,
            scheduler,
            monitor,
            bridges,
            webhooks,
            slack,
            telegrams,
            feed: Some(receiver),
            tracker,
            stop,
        }
    }

    /// What the homeserver has shown of itself to the HTTP API (for the startup checks).
    pub fn contact(&self) -> Arc<crate::net::Contact> {
        self.appservice.contact.clone()
    }

    /// Every HTTP route agentbus serves: the appservice API, the admin API, metrics;
    /// every error answered with a Matrix error body.
    pub fn app(&self) -> axum::Router {
        appservice::router(self.appservice.clone())
            .merge(api::routes(self.admin.clone()))
            .merge(schedule::api::routes(self.scheduler.clone()).route_layer(
                axum::middleware::from_fn_with_state(self.admin.clone(), api::require_admin_token),
            ))
            .merge(api::probe_routes(
                self.readiness.clone(),
                (self.config.metrics.enabled && self.config.metrics.listen.is_none())
                    .then(|| self.scrape.clone()),
            ))
            .fallback(appservice::unrecognized)
            .layer(axum::middleware::map_response(crate::net::error_body))
    }

    /// The listener's timeouts and connection cap, from `appservice:`.
    pub fn listener_limits(&self) -> ListenerLimits {
        let appservice = &self.config.appservice;
        ListenerLimits {
            header_read_timeout: appservice.header_read_timeout,
            idle_timeout: appservice.idle_timeout,
            max_connections: appservice.max_connections,
        }
    }

    /// Starts the inbox — replaying the journal up to `replay_up_to` first — the
    /// scheduler's tasks, the health monitors and the daily pruning, on the tracker;
    /// returns at once. `shutdown` stops intake.
    pub fn start_workers(&mut self, replay_up_to: Option<u64>, shutdown: &CancellationToken) {
        let Some(feed) = self.feed.take() else {
            tracing::warn!("the workers were started already");
            return;
        };
        self.tracker.spawn(self.inbox.clone().run(
            replay_up_to,
            feed,
            shutdown.clone(),
            self.tracker.clone(),
        ));
        self.scheduler.start(&self.tracker, shutdown);
        self.monitor.start(&self.tracker, shutdown);
        self.tracker.spawn(prune_daily(
            self.store.journal.clone(),
            self.collab.clone(),
            shutdown.clone(),
        ));
    }

    /// After `shutdown`: waits up to `grace` for the tracked tasks (answers in flight),
    /// then stops the rest and waits for them to notice. Returns whether everything
    /// finished within the grace period.
    pub async fn drain(self, grace: Duration) -> bool {
        self.bridges.stop().await;
        self.runtime.close();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            return true;
        }
        tracing::warn!(
            "answers still in flight at shutdown stay journaled and are redone on the next start"
        );
        self.stop.cancel();
        self.tracker.wait().await;
        false
    }

    /// The sequence number of the newest journaled event: what replay covers. Taken before
    /// the listener opens, so replay and newly delivered events never overlap.
    pub async fn journal_head(&self) -> Result<Option<u64>, CheckFailure> {
        self.store.journal.journal_head().await.map_err(|e| {
            CheckFailure::new(EXIT_LOCAL_SETUP, format!("✗ cannot read the journal: {e}"))
        })
    }
}

/// Runs agentbus on `listener` until `shutdown` is cancelled: HTTP first (the homeserver's
/// ping needs it), then the startup checks, agent profiles, and the inbox — which replays
/// whatever the journal held before taking new events.
pub async fn serve(
    mut services: Services,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), CheckFailure> {
    let config = services.config.clone();
    let replay_up_to = services.journal_head().await?;
    let pending = services.store.journal.pending_count().await.unwrap_or(0);
    if config.metrics.enabled {
        metrics::install();
        services.tracker.spawn(metrics::upkeep(shutdown.clone()));
    }
    let metrics_http = match (config.metrics.enabled, config.metrics.listen) {
        (true, Some(addr)) => {
            let metrics_listener = TcpListener::bind(addr).await.map_err(|e| {
                CheckFailure::new(
                    EXIT_LOCAL_SETUP,
                    format!("✗ cannot listen on metrics.listen {addr}: {e}"),
                )
            })?;
            tracing::info!(%addr, "metrics listening");
            Some(tokio::spawn(listener::serve(
                metrics_listener,
                api::metrics_routes(services.scrape.clone()),
                services.listener_limits(),
                shutdown.clone(),
            )))
        }
        _ => None,
    };
    let http = tokio::spawn(listener::serve(
        listener,
        services.app(),
        services.listener_limits(),
        shutdown.clone(),
    ));

    let passed = match checks::run_homeserver_checks(
        &config,
        &services.matrix,
        &services.appservice.contact,
    )
    .await
    {
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
    provision_agents(&config, &services.matrix).await;

    services.inbox.resolve_aliases().await;
    if pending > 0 {
        tracing::info!(
            events = pending,
            "replaying journaled events from before the restart"
        );
    }
    services.start_workers(replay_up_to, &shutdown);
    if config.bridges.any() {
        services.bridges.start(&services.tracker, &shutdown).await;
    }
    let bridges_http = if config.bridges.listens() {
        let addr = config.bridges.listen;
        let bridges_listener = match TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(e) => {
                shutdown.cancel();
                let _ = http.await;
                return Err(CheckFailure::new(
                    EXIT_LOCAL_SETUP,
                    format!("✗ cannot listen on bridges.listen {addr}: {e}"),
                ));
            }
        };
        tracing::info!(%addr, "bridges listening");
        Some(tokio::spawn(listener::serve(
            bridges_listener,
            bridges::routes(&services.webhooks, &services.slack, &services.telegrams),
            services.listener_limits(),
            shutdown.clone(),
        )))
    } else {
        None
    };
    tracing::info!(agents = config.agents.len(), "agentbus is running");

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    if let Err(e) = http.await {
        tracing::warn!(error = %e, "HTTP server ended with an error");
    }
    if let Some(bridges_http) = bridges_http
        && let Err(e) = bridges_http.await
    {
        tracing::warn!(error = %e, "bridges HTTP server ended with an error");
    }
    if let Some(metrics_http) = metrics_http
        && let Err(e) = metrics_http.await
    {
        tracing::warn!(error = %e, "metrics HTTP server ended with an error");
    }
    if services.drain(SHUTDOWN_GRACE).await {
        tracing::info!("every answer in flight finished; stopped");
    }
    Ok(())
}

/// Prunes old dedupe records now and once a day until shutdown.
async fn prune_daily(
    store: Arc<dyn JournalStore>,
    collab: Arc<Collab>,
    shutdown: CancellationToken,
) {
    loop {
        let cutoff = crate::unix_ms()
            .saturating_sub(u64::try_from(DEDUPE_RETENTION.as_millis()).unwrap_or(0));
        match store.prune_dedupe_records(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(records = n, "pruned old txnId / event_id dedupe records"),
            Err(e) => tracing::warn!(error = %e, "could not prune dedupe records"),
        }
        match collab.prune_ended(cutoff).await {
            0 => {}
            n => tracing::info!(records = n, "pruned the records of long-ended team tasks"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(24 * 3600)) => {}
        }
    }
}

/// Registers every agent and team and sets its profile. Failures are logged, not fatal:
/// an agent whose profile could not be set still answers.
pub async fn provision_agents(config: &Config, matrix: &MatrixClient) {
    let profiles = config
        .agents
        .iter()
        .map(|a| (&a.id, a.display_name(), &a.avatar))
        .chain(
            config
                .teams
                .iter()
                .map(|t| (&t.id, t.display_name(), &t.avatar)),
        );
    for (id, display_name, avatar) in profiles {
        let user = config.user_id(id);
        let intent = matrix.intent(&user);
        if let Err(e) = intent.ensure_registered().await {
            tracing::error!(agent = %id, error = %e, "could not register agent user");
            continue;
        }
        if let Err(e) = intent.set_display_name(display_name).await {
            tracing::warn!(agent = %id, error = %e, "could not set display name");
        }
        if let Some(avatar) = avatar {
            let url = ruma::OwnedMxcUri::from(avatar.as_str());
            match url.validate() {
                Ok(_) => {
                    if let Err(e) = intent.set_avatar_url(url).await {
                        tracing::warn!(agent = %id, error = %e, "could not set avatar");
                    }
                }
                Err(e) => {
                    tracing::warn!(agent = %id, error = %e, "avatar is not a valid mxc:// URI")
                }
            }
        }
        tracing::info!(agent = %id, user = %user, "agent ready");
    }
}
