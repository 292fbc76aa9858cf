//! The inbox: per-room ordered workers that drain the journal.
//!
//! The transaction handler journals events and [`InboxSender::submit`]s them; a dispatcher
//! hands each to its room's worker (bounded queue: a full one makes the dispatcher wait,
//! nothing is dropped). A worker processes its room's events one at a time, in journal
//! order: skip what was processed before, join on invites, skip our own users' events,
//! route the rest and have the chosen agents answer, then mark the event processed. On
//! startup the journal's unprocessed events are replayed first.

pub mod decode;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ruma::events::Mentions;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agents::{AgentRuntime, Delivery, ImageRef, Job, Submitted, Trigger, Turn, notices};
use crate::config::Config;
use crate::matrix::MatrixClient;
use crate::matrix::keys::HOPS_KEY;
use crate::router::explain::{Explain, ExplainError, RouteQuery};
use crate::router::{
    LoopGuard, MATRIX, MessageFacts, RoomFacts, RouteDecision, RouteInput, Router, Strategy,
};
use crate::store::feed::{Backlog, FeedReceiver};
use crate::store::{HistoryEntry, JournaledEvent, PAIRING_TTL, Store};

/// How long a failed room lookup (members, aliases) is remembered before asking again.
const FACTS_RETRY: Duration = Duration::from_secs(30);
/// Journaled events read per page while replaying.
const REPLAY_PAGE: usize = 512;
/// At most this many finished events are removed from the journal in one write.
const FINISH_BATCH: usize = 256;
/// A room worker with nothing to do for this long exits; the next event starts a new one.
const WORKER_IDLE: Duration = Duration::from_secs(300);
/// Recent room history handed to the router (threads and replies are looked up in it).
pub const ROUTING_HISTORY: usize = 100;

impl crate::router::ContextLine for HistoryEntry {
    fn event_id(&self) -> &ruma::EventId {
        &self.event_id
    }
    fn sender(&self) -> &ruma::UserId {
        &self.sender
    }
    fn ts(&self) -> u64 {
        self.ts
    }
    fn thread_root(&self) -> Option<&ruma::EventId> {
        self.thread_root.as_deref()
    }
    fn routed_to(&self) -> &[String] {
        &self.routed_to
    }
}

impl Explain for Inbox {
    fn explain<'a>(
        &'a self,
        query: &'a RouteQuery,
    ) -> futures::future::BoxFuture<'a, Result<RouteDecision, ExplainError>> {
        Box::pin(self.explain_route(query))
    }
}

/// The room aliases the config names: group settings and binding peers.
fn config_aliases(config: &Config) -> Vec<String> {
    let named: std::collections::BTreeSet<&String> = config
        .channels
        .values()
        .flat_map(|c| c.groups.keys())
        .chain(
            config
                .bindings
                .iter()
                .filter_map(|b| b.matches.peer.as_ref()),
        )
        .filter(|key| key.starts_with('#'))
        .collect();
    named.into_iter().cloned().collect()
}

/// Processes events: the per-room logic every worker runs.
pub struct Inbox {
    config: Arc<Config>,
    store: Arc<dyn Store>,
    matrix: Arc<MatrixClient>,
    runtime: Arc<AgentRuntime>,
    router: Router,
    guard: Mutex<LoopGuard>,
    backlog: Arc<Backlog>,
    /// Room facts by room; an entry learnt from a failure carries when to ask again.
    rooms: Mutex<HashMap<OwnedRoomId, (RoomFacts, Option<Instant>)>>,
    /// Display names of joined members, by room (cached with `rooms`).
    names: Mutex<HashMap<OwnedRoomId, HashMap<OwnedUserId, String>>>,
    /// Aliases named in the config, by the room they resolved to.
    aliases: RwLock<HashMap<OwnedRoomId, Vec<String>>>,
    /// Aliases named in the config that did not resolve yet (the room may not exist yet).
    unresolved: Mutex<Vec<String>>,
    /// When unresolved aliases were last looked up (at most once per [`FACTS_RETRY`]).
    aliases_tried: Mutex<Option<Instant>>,
}

/// The fields of an event the inbox looks at.
#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    sender: OwnedUserId,
    #[serde(default)]
    state_key: Option<String>,
    #[serde(default)]
    content: serde_json::Value,
    #[serde(default)]
    origin_server_ts: u64,
}

impl Inbox {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        matrix: Arc<MatrixClient>,
        runtime: Arc<AgentRuntime>,
        backlog: Arc<Backlog>,
    ) -> Arc<Self> {
        Arc::new(Self {
            router: Router::new(&config),
            backlog,
            aliases_tried: Mutex::new(None),
            store,
            matrix,
            runtime,
            guard: Mutex::new(LoopGuard::default()),
            rooms: Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            aliases: RwLock::new(HashMap::new()),
            unresolved: Mutex::new(config_aliases(&config)),
            config,
        })
    }

    /// Resolves the config's room aliases (group settings, binding peers) that have not
    /// resolved yet, so routing can match a room by either name. Called at startup and
    /// again whenever a room's facts are fetched while some are still unresolved: a room
    /// created after agentbus started is picked up.
    pub async fn resolve_aliases(&self) {
        *self.aliases_tried.lock().expect("alias lock") = Some(Instant::now());
        let pending = std::mem::take(&mut *self.unresolved.lock().expect("alias lock"));
        if pending.is_empty() {
            return;
        }
        let mut still = Vec::new();
        let mut resolved = false;
        for alias in pending {
            let Ok(parsed) = ruma::RoomAliasId::parse(alias.as_str()) else {
                tracing::warn!(alias = %alias, "not a valid room alias; ignored");
                continue;
            };
            match self.matrix.resolve_alias(&parsed).await {
                Ok(room_id) => {
                    tracing::debug!(alias = %alias, room_id = %room_id, "resolved room alias from the config");
                    self.aliases
                        .write()
                        .expect("alias lock")
                        .entry(room_id)
                        .or_default()
                        .push(alias);
                    resolved = true;
                }
                Err(e) => {
                    tracing::debug!(alias = %alias, error = %e, "room alias from the config does not resolve (yet)");
                    still.push(alias);
                }
            }
        }
        self.unresolved.lock().expect("alias lock").extend(still);
        if resolved {
            self.rooms.lock().expect("room cache lock").clear();
        }
    }

    /// Routes `message` in `room_id` under the current loop-guard state.
    fn decide(
        &self,
        room_id: &RoomId,
        room: &RoomFacts,
        recent: &[HistoryEntry],
        message: MessageFacts<'_>,
    ) -> RouteDecision {
        let sender_paired = self
            .store
            .is_paired(MATRIX, message.sender.as_str())
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read pairing approvals; treating sender as unpaired");
                false
            });
        let guard = self.guard.lock().expect("loop guard lock");
        let recent: Vec<&dyn crate::router::ContextLine> = recent
            .iter()
            .map(|e| e as &dyn crate::router::ContextLine)
            .collect();
        self.router.route(&RouteInput {
            channel: MATRIX,
            room_id,
            room,
            message,
            recent: &recent,
            sender_paired,
            guard: &guard,
        })
    }

    /// Answers a [`RouteQuery`] the way a real message would be routed now, without
    /// sending or recording anything.
    pub async fn explain_route(&self, query: &RouteQuery) -> Result<RouteDecision, ExplainError> {
        let bad = |what: &str, value: &str, e: &dyn std::fmt::Display| {
            ExplainError::BadQuery(format!("{what} {value:?}: {e}"))
        };
        let room_id: OwnedRoomId = if query.room.starts_with('#') {
            let alias = ruma::RoomAliasId::parse(query.room.as_str())
                .map_err(|e| bad("invalid room alias", &query.room, &e))?;
            self.matrix
                .resolve_alias(&alias)
                .await
                .map_err(|e| bad("cannot resolve room alias", &query.room, &e))?
        } else {
            RoomId::parse(query.room.as_str())
                .map_err(|e| bad("invalid room ID", &query.room, &e))?
        };
        let sender = ruma::UserId::parse(query.sender.as_str())
            .map_err(|e| bad("invalid sender user ID", &query.sender, &e))?;
        let mentions = match &query.mentions {
            None if !query.room_mention => None,
            listed => {
                let mut mentions = Mentions::new();
                for user in listed.iter().flatten() {
                    mentions.user_ids.insert(
                        ruma::UserId::parse(user.as_str())
                            .map_err(|e| bad("invalid mentioned user ID", user, &e))?,
                    );
                }
                mentions.room = query.room_mention;
                Some(mentions)
            }
        };
        let thread_root = query
            .thread
            .as_deref()
            .map(|t| {
                ruma::EventId::parse(t).map_err(|e| bad("invalid thread root event ID", t, &e))
            })
            .transpose()?;
        let room = self.room_facts(&room_id).await;
        let recent = self.recent_history(&room_id);
        let reply_to_sender = match query.reply_to.as_deref() {
            None => None,
            Some(user) if user.starts_with('@') => Some(
                ruma::UserId::parse(user).map_err(|e| bad("invalid reply_to user ID", user, &e))?,
            ),
            Some(event) => {
                let event_id = ruma::EventId::parse(event)
                    .map_err(|e| bad("invalid reply_to event ID", event, &e))?;
                self.sender_of(&room_id, &room, &recent, &event_id).await
            }
        };
        let now = crate::unix_ms();
        let message = MessageFacts {
            sender: &sender,
            body: &query.text,
            formatted_body: query.formatted_body.as_deref(),
            mentions: mentions.as_ref(),
            reply_to_sender: reply_to_sender.as_deref(),
            thread_root: thread_root.as_deref(),
            hops: 0,
            ts: now,
        };
        Ok(self.decide(&room_id, &room, &recent, message))
    }

    /// Replays the journal's events up to `replay_up_to` (the last sequence number
    /// journaled before the HTTP listener started, so replay and the feed never overlap),
    /// then takes what the feed brings, until `shutdown`. Room workers and the answers they
    /// wait for run on `tracker`; the caller waits for it to drain.
    pub async fn run(
        self: Arc<Self>,
        replay_up_to: Option<u64>,
        mut feed: FeedReceiver,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let mut workers: HashMap<OwnedRoomId, mpsc::UnboundedSender<JournaledEvent>> =
            HashMap::new();
        if let Some(last) = replay_up_to {
            let mut after = None;
            let mut replayed = 0usize;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.backlog.wait_for_room() => {}
                }
                let page = match self.store.pending_events(after, REPLAY_PAGE) {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the journal; events stay journaled for the next start");
                        break;
                    }
                };
                let page: Vec<JournaledEvent> =
                    page.into_iter().take_while(|e| e.seq <= last).collect();
                let Some(tail) = page.last() else { break };
                after = Some(tail.seq);
                replayed += page.len();
                self.backlog.add_replayed(page.len());
                for event in page {
                    self.dispatch(event, &mut workers, &shutdown, &tracker);
                }
            }
            if replayed > 0 {
                tracing::info!(
                    events = replayed,
                    "replayed journaled events from before the restart"
                );
            }
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                batch = feed.recv() => match batch {
                    Some(batch) => for event in batch {
                        self.dispatch(event, &mut workers, &shutdown, &tracker);
                    },
                    None => break,
                },
            }
        }
    }

    /// Hands `event` to its room's worker, starting one if needed. Never waits: each room
    /// has its own queue, bounded together by the backlog the intake waits on, so a busy
    /// room cannot hold up another.
    fn dispatch(
        self: &Arc<Self>,
        mut event: JournaledEvent,
        workers: &mut HashMap<OwnedRoomId, mpsc::UnboundedSender<JournaledEvent>>,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) {
        loop {
            let mut fresh = false;
            let sender = workers.entry(event.room_id.clone()).or_insert_with(|| {
                fresh = true;
                let (tx, rx) = mpsc::unbounded_channel();
                tracker.spawn(self.clone().run_worker(
                    event.room_id.clone(),
                    rx,
                    shutdown.clone(),
                    tracker.clone(),
                ));
                tx
            });
            match sender.send(event) {
                Ok(()) => return,
                // A worker started just now that is gone already: the runtime is shutting
                // down. The event stays journaled for the next start.
                Err(mpsc::error::SendError(returned)) if fresh => {
                    tracing::debug!(event_id = %returned.event_id, "runtime shutting down; event stays journaled");
                    workers.remove(&returned.room_id);
                    return;
                }
                // The worker went idle and closed its queue: start a fresh one.
                Err(mpsc::error::SendError(returned)) => {
                    workers.remove(&returned.room_id);
                    event = returned;
                }
            }
        }
    }

    async fn run_worker(
        self: Arc<Self>,
        room_id: OwnedRoomId,
        mut queue: mpsc::UnboundedReceiver<JournaledEvent>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        // Events with nothing left to wait for, finished together in one write.
        let mut done: Vec<u64> = Vec::new();
        loop {
            let next = if done.len() < FINISH_BATCH {
                queue.try_recv().ok()
            } else {
                None
            };
            let event = match next {
                Some(event) => event,
                None => {
                    self.finish(&mut done);
                    let next = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        next = tokio::time::timeout(WORKER_IDLE, queue.recv()) => next,
                    };
                    match next {
                        Ok(Some(event)) => event,
                        Ok(None) => return,
                        Err(_idle) => {
                            // Refuse new events, then finish the ones that slipped in.
                            queue.close();
                            while let Ok(event) = queue.try_recv() {
                                self.process(&event, &mut done, &tracker).await;
                            }
                            self.finish(&mut done);
                            tracing::debug!(room_id = %room_id, "room worker idle; stopping");
                            return;
                        }
                    }
                }
            };
            self.process(&event, &mut done, &tracker).await;
        }
    }

    /// Finishes the events in `done` (removes them from the journal) in one write.
    fn finish(&self, done: &mut Vec<u64>) {
        if done.is_empty() {
            return;
        }
        match self.store.finish_events(done) {
            Ok(()) => self.backlog.finish(done.len()),
            Err(e) => {
                tracing::error!(events = done.len(), error = %e, "could not finish events; they are redone on the next start")
            }
        }
        done.clear();
    }

    /// Processes one journaled event: routes it and queues the answers in their sessions.
    /// An event with nothing to answer joins `done`; one with answers leaves the journal
    /// once every answer is delivered (or known undeliverable), so a crash or shutdown in
    /// between answers it again after the restart. The room worker does not wait.
    pub async fn process(
        &self,
        event: &JournaledEvent,
        done: &mut Vec<u64>,
        tracker: &TaskTracker,
    ) {
        let answers = self.process_new(event).await;
        if answers.is_empty() {
            done.push(event.seq);
            return;
        }
        let (store, backlog, event) = (self.store.clone(), self.backlog.clone(), event.clone());
        tracker.spawn(async move {
            let outcomes = futures::future::join_all(answers).await;
            // A dropped sender (a lane that died) counts as done: the error was logged.
            if outcomes.iter().any(|o| matches!(o, Ok(Delivery::Interrupted))) {
                tracing::info!(event_id = %event.event_id, "answer interrupted by shutdown; the event stays journaled");
                return;
            }
            match store.finish_events(&[event.seq]) {
                Ok(()) => backlog.finish(1),
                Err(e) => tracing::error!(event_id = %event.event_id, error = %e, "could not finish event"),
            }
        });
    }

    async fn process_new(
        &self,
        event: &JournaledEvent,
    ) -> Vec<tokio::sync::oneshot::Receiver<Delivery>> {
        let envelope: Envelope = match serde_json::from_str(event.json.get()) {
            Ok(envelope) => envelope,
            Err(e) => {
                tracing::warn!(event_id = %event.event_id, error = %e, "skipping an event we cannot read");
                return Vec::new();
            }
        };
        match envelope.kind.as_str() {
            "m.room.member" => self.on_member(&event.room_id, &envelope).await,
            "m.room.message" => return self.on_message(event, &envelope).await,
            "m.room.encrypted" => return held(self.on_encrypted(event, &envelope).await),
            _ => {}
        }
        Vec::new()
    }

    async fn on_member(&self, room_id: &RoomId, envelope: &Envelope) {
        self.rooms.lock().expect("room cache lock").remove(room_id);
        self.names.lock().expect("names lock").remove(room_id);
        let Some(target) = envelope
            .state_key
            .as_deref()
            .and_then(|s| ruma::UserId::parse(s).ok())
        else {
            return;
        };
        let Some(agent) = self.config.agent_by_user(&target) else {
            return;
        };
        if envelope.content.get("membership").and_then(|m| m.as_str()) != Some("invite") {
            return;
        }
        match self.matrix.join_room(&target, room_id).await {
            Ok(()) => {
                tracing::info!(agent = %agent.id, room_id = %room_id, inviter = %envelope.sender, "joined on invite")
            }
            Err(e) => {
                tracing::error!(agent = %agent.id, room_id = %room_id, error = %e, "could not join on invite")
            }
        }
    }

    async fn on_message(
        &self,
        event: &JournaledEvent,
        envelope: &Envelope,
    ) -> Vec<tokio::sync::oneshot::Receiver<Delivery>> {
        let from_own_user = self.config.is_own_user(&envelope.sender);
        if from_own_user && !self.config.routing.agent_to_agent.enabled {
            return Vec::new();
        }
        let content = &envelope.content;
        let msgtype = content
            .get("msgtype")
            .and_then(|m| m.as_str())
            .unwrap_or("");
        let relation = content.get("m.relates_to");
        let rel_type = relation
            .and_then(|r| r.get("rel_type"))
            .and_then(|r| r.as_str());
        // Edits are not new questions, and by convention bots never answer notices.
        if rel_type == Some("m.replace") || msgtype == "m.notice" {
            return Vec::new();
        }
        let Some(body) = content.get("body").and_then(|b| b.as_str()) else {
            return Vec::new();
        };
        let image = (msgtype == "m.image").then(|| image_ref(content)).flatten();
        let thread_root: Option<OwnedEventId> = (rel_type == Some("m.thread"))
            .then(|| {
                relation
                    .and_then(|r| r.get("event_id"))
                    .and_then(|e| e.as_str())
            })
            .flatten()
            .and_then(|e| ruma::EventId::parse(e).ok());
        let reply_to: Option<OwnedEventId> = relation
            .and_then(|r| r.get("m.in_reply_to"))
            .and_then(|r| r.get("event_id"))
            .and_then(|e| e.as_str())
            .and_then(|e| ruma::EventId::parse(e).ok())
            // In a thread, clients point m.in_reply_to at the latest event as a fallback.
            .filter(|_| {
                relation
                    .and_then(|r| r.get("is_falling_back"))
                    .and_then(|f| f.as_bool())
                    != Some(true)
            });
        let hops = content
            .get(HOPS_KEY)
            .and_then(|h| h.as_u64())
            .map_or(0, |h| h.min(u64::from(u32::MAX)) as u32);
        let mentions: Option<Mentions> = content
            .get("m.mentions")
            .and_then(|m| serde_json::from_value(m.clone()).ok());

        let room = self.room_facts(&event.room_id).await;
        // In a room none of our agents is in, the router decides "nobody" before it looks
        // at history: do not read it (most of an unanswered event's cost).
        let agents_here = self
            .router
            .candidates()
            .iter()
            .any(|c| room.joined.contains(&c.user_id));
        let recent = if agents_here {
            self.recent_history(&event.room_id)
        } else {
            Vec::new()
        };
        let reply_to_sender = match &reply_to {
            Some(id) => self.sender_of(&event.room_id, &room, &recent, id).await,
            None => None,
        };
        let message = MessageFacts {
            sender: &envelope.sender,
            body,
            formatted_body: content.get("formatted_body").and_then(|f| f.as_str()),
            mentions: mentions.as_ref(),
            reply_to_sender: reply_to_sender.as_deref(),
            thread_root: thread_root.as_deref(),
            hops,
            ts: envelope.origin_server_ts,
        };
        let decision = self.decide(&event.room_id, &room, &recent, message);
        if decision.targets.is_empty() {
            tracing::debug!(
                room_id = %event.room_id, sender = %envelope.sender, event_id = %event.event_id,
                reason = %decision.reason, "routed to nobody"
            );
        } else {
            tracing::info!(
                room_id = %event.room_id, sender = %envelope.sender, event_id = %event.event_id,
                targets = ?decision.targets, strategy = ?decision.strategy, reason = %decision.reason, "routed"
            );
        }

        // Our agents' answers are recorded by the runtime as they are sent.
        if !from_own_user {
            let entry = HistoryEntry {
                event_id: event.event_id.clone(),
                sender: envelope.sender.clone(),
                body: body.to_owned(),
                ts: envelope.origin_server_ts,
                thread_root: thread_root.clone(),
                routed_to: decision.targets.clone(),
            };
            if let Err(e) = self.store.append_history(&event.room_id, &entry) {
                tracing::warn!(room_id = %event.room_id, error = %e, "could not record message in history");
            }
        }
        if let Some(from) = self.router.agent_of(&envelope.sender) {
            let a2a = &self.config.routing.agent_to_agent;
            let mut guard = self.guard.lock().expect("loop guard lock");
            for target in &decision.targets {
                if guard.record(
                    &from.id,
                    target,
                    envelope.origin_server_ts,
                    a2a.pair_limit,
                    a2a.pair_window,
                    a2a.cooldown,
                ) {
                    tracing::warn!(room_id = %event.room_id, from = %from.id, to = %target, "loop guard: agent pair cooled down");
                }
            }
        }

        let turn = Turn {
            room_id: event.room_id.clone(),
            event_id: event.event_id.clone(),
            sender: envelope.sender.clone(),
            sender_name: self.display_name(&event.room_id, &envelope.sender),
            body: body.to_owned(),
            image,
            thread_root,
            hops: hops + 1,
            group: room
                .joined
                .iter()
                .filter(|u| !self.config.is_own_user(u))
                .count()
                > 1,
        };
        if decision.strategy == Strategy::Pairing {
            if let Some(agent) = &decision.pairing_agent {
                return held(self.send_pairing_code(agent, &turn.trigger()).await);
            }
            return Vec::new();
        }
        let reset = is_reset(body);
        let mut answers = Vec::new();
        for agent in decision
            .targets
            .iter()
            .filter_map(|id| self.config.agents.iter().find(|a| &a.id == id))
        {
            let job = if reset {
                Job::Reset(turn.clone())
            } else {
                Job::Turn(turn.clone())
            };
            match self.runtime.submit(&agent.id, job) {
                Submitted::Queued(done) => {
                    tracing::info!(agent = %agent.id, room_id = %event.room_id, event_id = %event.event_id, "queued for the agent");
                    answers.push(done);
                }
                Submitted::Busy => {
                    tracing::warn!(agent = %agent.id, room_id = %event.room_id, event_id = %event.event_id, "session queue full; message not queued");
                    let text = notices::busy(agent);
                    let said = self
                        .runtime
                        .notice(&agent.id, &turn.trigger(), "busy", &text)
                        .await;
                    answers.extend(held(said));
                }
            }
        }
        answers
    }

    /// A member's display name in `room_id`, else their localpart.
    fn display_name(&self, room_id: &RoomId, user: &ruma::UserId) -> String {
        self.names
            .lock()
            .expect("names lock")
            .get(room_id)
            .and_then(|names| names.get(user))
            .cloned()
            .unwrap_or_else(|| user.localpart().to_owned())
    }

    /// The room history routing looks at; a store error means routing without context.
    fn recent_history(&self, room_id: &RoomId) -> Vec<HistoryEntry> {
        self.store
            .recent_history(room_id, ROUTING_HISTORY)
            .unwrap_or_else(|e| {
                tracing::warn!(room_id = %room_id, error = %e, "could not read history; routing without context");
                Vec::new()
            })
    }

    /// Who sent `event_id`: from recent history, else asked of the homeserver as an agent
    /// in the room.
    async fn sender_of(
        &self,
        room_id: &RoomId,
        room: &RoomFacts,
        recent: &[HistoryEntry],
        event_id: &ruma::EventId,
    ) -> Option<OwnedUserId> {
        if let Some(entry) = recent.iter().find(|e| e.event_id == event_id) {
            return Some(entry.sender.clone());
        }
        let reader = self
            .router
            .candidates()
            .iter()
            .find(|c| room.joined.contains(&c.user_id))?;
        match self
            .matrix
            .event_sender(&reader.user_id, room_id, event_id)
            .await
        {
            Ok(sender) => Some(sender),
            Err(e) => {
                tracing::debug!(room_id = %room_id, event_id = %event_id, error = %e, "cannot read the replied-to event");
                None
            }
        }
    }

    /// Tells an unknown DM sender their pairing code, and nothing else.
    async fn send_pairing_code(&self, agent_id: &str, trigger: &Trigger<'_>) -> Delivery {
        let now = crate::unix_ms();
        let request = match self.store.pairing_request(
            MATRIX,
            trigger.sender.as_str(),
            now,
            PAIRING_TTL,
        ) {
            Ok((request, created)) => {
                if created {
                    tracing::info!(sender = %trigger.sender, code = %request.code, "pairing requested; approve with `agentbus pairing approve {}`", request.code);
                }
                request
            }
            Err(e) => {
                tracing::error!(sender = %trigger.sender, error = %e, "could not issue a pairing code");
                return Delivery::Undeliverable;
            }
        };
        let text = notices::pairing_code(&request.code, PAIRING_TTL);
        self.runtime
            .notice(agent_id, trigger, "pairing", &text)
            .await
    }

    /// An encrypted message cannot be read; the room's first agent says so rather than
    /// staying silent.
    async fn on_encrypted(&self, event: &JournaledEvent, envelope: &Envelope) -> Delivery {
        if self.config.is_own_user(&envelope.sender) {
            return Delivery::Delivered;
        }
        let room = self.room_facts(&event.room_id).await;
        let Some(agent) = self
            .router
            .candidates()
            .iter()
            .find(|c| room.joined.contains(&c.user_id))
        else {
            return Delivery::Delivered;
        };
        let trigger = Trigger {
            room_id: &event.room_id,
            event_id: &event.event_id,
            sender: &envelope.sender,
            body: "",
            thread_root: None,
            hops: 1,
        };
        self.runtime
            .notice(&agent.id, &trigger, "encrypted", notices::encrypted())
            .await
    }

    /// The joined members of `room_id`: cached — a room none of our agents is in too —
    /// and refreshed after any membership change in it. A lookup that failed is retried
    /// after [`FACTS_RETRY`], not for every event.
    async fn room_facts(&self, room_id: &RoomId) -> RoomFacts {
        if let Some((facts, expires)) = self.rooms.lock().expect("room cache lock").get(room_id)
            && expires.is_none_or(|at| Instant::now() < at)
        {
            return facts.clone();
        }
        let retry_aliases = {
            let tried = self.aliases_tried.lock().expect("alias lock");
            tried.is_none_or(|at| at.elapsed() >= FACTS_RETRY)
        };
        if retry_aliases {
            self.resolve_aliases().await;
        }
        let aliases = self
            .aliases
            .read()
            .expect("alias lock")
            .get(room_id)
            .cloned()
            .unwrap_or_default();
        let mut expires = None;
        let mut facts = RoomFacts {
            joined: Default::default(),
            aliases,
        };
        // Ask as each agent in turn; only one that is in the room may see its members.
        for candidate in self.router.candidates() {
            match self
                .matrix
                .joined_members(&candidate.user_id, room_id)
                .await
            {
                Ok(members) => {
                    let names: HashMap<OwnedUserId, String> = members
                        .iter()
                        .filter_map(|(id, name)| Some((id.clone(), name.clone()?)))
                        .collect();
                    self.names
                        .lock()
                        .expect("names lock")
                        .insert(room_id.to_owned(), names);
                    facts.joined = members.into_iter().map(|(id, _)| id).collect();
                    break;
                }
                Err(e) if e.errcode() == Some("M_FORBIDDEN") => continue,
                Err(e) => {
                    tracing::warn!(room_id = %room_id, error = %e, "could not read room members");
                    expires = Some(Instant::now() + FACTS_RETRY);
                    break;
                }
            }
        }
        self.rooms
            .lock()
            .expect("room cache lock")
            .insert(room_id.to_owned(), (facts.clone(), expires));
        facts
    }
}

/// A notice sent inline that shutdown interrupted holds its event in the journal, like an
/// answer would; anything else has nothing left to wait for.
fn held(delivery: Delivery) -> Vec<tokio::sync::oneshot::Receiver<Delivery>> {
    if delivery != Delivery::Interrupted {
        return Vec::new();
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let _ = tx.send(delivery);
    vec![rx]
}

/// Whether `body` is the `!reset` command (optionally followed by mentions).
fn is_reset(body: &str) -> bool {
    let body = body.trim();
    body == "!reset" || body.starts_with("!reset ")
}

/// The image of an `m.image` content: `url` (unencrypted media only) and `info`.
fn image_ref(content: &serde_json::Value) -> Option<ImageRef> {
    let mxc = content.get("url")?.as_str()?;
    let info = content.get("info");
    let name = content
        .get("filename")
        .or_else(|| content.get("body"))
        .and_then(|n| n.as_str())
        .unwrap_or("image")
        .to_owned();
    Some(ImageRef {
        mxc: mxc.into(),
        mime: info
            .and_then(|i| i.get("mimetype"))
            .and_then(|m| m.as_str())
            .map(str::to_owned),
        size: info.and_then(|i| i.get("size")).and_then(|s| s.as_u64()),
        name,
    })
}
