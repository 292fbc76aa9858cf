//! The inbox: per-room ordered workers that drain the journal.
//!
//! The transaction handler journals events and submits them to the journal's feed; a
//! dispatcher hands each to its room's worker. A worker processes its room's events one
//! at a time, in journal order: `decode` makes each a typed value, then the
//! `stages` run on it — the bridges' relay hook, `commands`, `facts`, routing,
//! and the chosen agents' jobs — and the event leaves the journal once its answers are
//! delivered. On startup the journal's unprocessed events are replayed first.

mod commands;
pub mod decode;
mod facts;
mod limits;
mod stages;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ruma::events::Mentions;
use ruma::{OwnedRoomId, OwnedUserId, RoomId};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use self::decode::{Inbound, decode};
use self::facts::Facts;
use crate::agents::{AgentRuntime, Delivery, Outcome};
use crate::collab::Collab;
use crate::config::{ChannelId, Config};
use crate::matrix::MatrixClient;
use crate::router::explain::{Explain, ExplainError, RouteQuery};
use crate::router::{LoopGuard, MessageFacts, RoomFacts, RouteDecision, Router};
use crate::store::feed::{Backlog, FeedReceiver};
use crate::store::{EventRef, HistoryEntry, JournaledEvent, Lease, Partition, Stores};

/// Who this process is, as a lease holder: host and process ID.
fn lease_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}

/// At most this many room lookups (members) are asked of the homeserver at once. A burst
/// of events in a thousand new rooms made a thousand workers ask at the same moment: the
/// homeserver's listen queue overflowed, and connections waited for TCP's SYN retries (up
/// to half a minute) while the rooms' events held the backlog full.
const LOOKUPS_AT_ONCE: usize = 16;
/// How long a failed room lookup (members, aliases) is remembered before asking again.
const FACTS_RETRY: Duration = Duration::from_secs(30);
/// Journaled events read per page while replaying.
const REPLAY_PAGE: usize = 512;
/// A room worker hands its finished events over after at most this many.
const FINISH_BATCH: usize = 256;
/// The finisher writes at most this many finished events at once.
const FINISH_WRITE: usize = 4096;
/// A room worker with nothing to do for this long exits; the next event starts a new one.
const WORKER_IDLE: Duration = Duration::from_secs(300);
/// Recent room history handed to the router (threads and replies are looked up in it).
pub const ROUTING_HISTORY: usize = 100;

impl Explain for Inbox {
    fn explain<'a>(
        &'a self,
        query: &'a RouteQuery,
    ) -> futures::future::BoxFuture<'a, Result<RouteDecision, ExplainError>> {
        Box::pin(self.explain_route(query))
    }
}

/// How long this process's claim on the journal's partitions lasts; it is renewed at a
/// third of that.
const LEASE_PERIOD: Duration = Duration::from_secs(60);

/// Processes events: the per-room logic every worker runs.
pub struct Inbox {
    config: Arc<Config>,
    store: Stores,
    /// The journal partitions this process drains (all of them, with an embedded store).
    lease: RwLock<Lease>,
    matrix: Arc<MatrixClient>,
    runtime: Arc<AgentRuntime>,
    /// Teams' tasks.
    collab: Arc<Collab>,
    router: Router,
    guard: Mutex<LoopGuard>,
    backlog: Arc<Backlog>,
    /// Where room workers hand their finished events to the finisher, which writes
    /// everyone's in one write (with a thousand busy rooms, a write per room's batch was
    /// most of the drain's cost).
    finishing: mpsc::UnboundedSender<Finished>,
    finished: Mutex<Option<mpsc::UnboundedReceiver<Finished>>>,
    /// Sequence numbers handed to room workers and not finished yet: an event handed over
    /// again (a redelivered transaction) is skipped.
    in_flight: Arc<Mutex<std::collections::HashSet<u64>>>,
    /// Bounds the room lookups in flight ([`LOOKUPS_AT_ONCE`]).
    lookups: tokio::sync::Semaphore,
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
    /// The rooms each capped sender brought agents into since start-up
    /// (`channels.<ch>.max_rooms_per_sender`).
    pulled: Mutex<HashMap<OwnedUserId, std::collections::BTreeSet<OwnedRoomId>>>,
    /// Per-sender and per-room limits on model-backed answers (`routing.limits`).
    limits: limits::Limits,
    /// Who answers management commands (`ops`), once wired.
    management: std::sync::OnceLock<Arc<dyn Management>>,
    /// The bridge core, for the relay seam and portals' agents; unset without bridges.
    bridges: std::sync::OnceLock<Arc<crate::bridges::Bridges>>,
}

/// A message that may be a management command, with what its handler needs to know.
#[derive(Debug, Clone)]
pub struct ManagementRequest {
    pub room_id: OwnedRoomId,
    pub event_id: ruma::OwnedEventId,
    pub sender: OwnedUserId,
    pub body: String,
    /// Whether the room is a management room: the appservice's bot is in it.
    pub management_room: bool,
    /// Who answers: the bot where it is in the room, else the first of our users there
    /// (by user ID).
    pub reply_as: OwnedUserId,
}

/// Answers management commands; the inbox hands it every message of a person that
/// starts with `!`, before routing.
pub trait Management: Send + Sync {
    /// Handles `request` if it is a management command (answering it); returns whether
    /// it was one, so it is not routed to agents as well.
    fn handle<'a>(&'a self, request: &'a ManagementRequest)
    -> futures::future::BoxFuture<'a, bool>;

    /// Whether `user` may manage agentbus (the bot joins a room on such a user's invite).
    fn may_manage(&self, user: &ruma::UserId) -> bool;
}

impl Inbox {
    /// Wires the management commands (once; later calls are ignored).
    pub fn set_management(&self, management: Arc<dyn Management>) {
        let _ = self.management.set(management);
    }

    /// Hands the inbox the bridge core (portals' relay and agents).
    pub fn set_bridges(&self, bridges: Arc<crate::bridges::Bridges>) {
        let _ = self.bridges.set(bridges);
    }

    pub fn new(
        config: Arc<Config>,
        store: Stores,
        matrix: Arc<MatrixClient>,
        runtime: Arc<AgentRuntime>,
        collab: Arc<Collab>,
        backlog: Arc<Backlog>,
    ) -> Arc<Self> {
        let (finishing, finished) = mpsc::unbounded_channel();
        Arc::new(Self {
            finishing,
            finished: Mutex::new(Some(finished)),
            lookups: tokio::sync::Semaphore::new(LOOKUPS_AT_ONCE),
            in_flight: Arc::default(),
            lease: RwLock::new(Lease {
                holder: lease_holder(),
                partitions: Vec::new(),
                expires_ms: 0,
            }),
            router: Router::new(&config),
            backlog,
            aliases_tried: Mutex::new(None),
            store,
            matrix,
            runtime,
            collab,
            guard: Mutex::new(LoopGuard::default()),
            rooms: Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            aliases: RwLock::new(HashMap::new()),
            pulled: Mutex::new(HashMap::new()),
            limits: limits::Limits::new(&config.routing.limits),
            management: std::sync::OnceLock::new(),
            bridges: std::sync::OnceLock::new(),
            unresolved: Mutex::new(facts::config_aliases(&config)),
            config,
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
        let recent = self.recent_history(&room_id).await;
        let reply_to_sender = match query.reply_to.as_deref() {
            None => None,
            Some(user) if user.starts_with('@') => Some(
                ruma::UserId::parse(user).map_err(|e| bad("invalid reply_to user ID", user, &e))?,
            ),
            Some(event) => {
                let event_id = ruma::EventId::parse(event)
                    .map_err(|e| bad("invalid reply_to event ID", event, &e))?;
                self.replied_to(&room_id, &room, &recent, &event_id)
                    .await
                    .map(|replied| replied.sender)
            }
        };
        let sender_paired = self.sender_paired(&sender).await;
        let paired_member_joined = !sender_paired
            && self.router.needs_vouching(&ChannelId::MATRIX, &sender)
            && self.paired_member_joined(&room, &sender).await;
        let facts = Facts {
            sender_paired,
            paired_member_joined,
            agents_here: true,
            room,
            recent,
            reply_to_sender,
            reply_to_text: None,
            reply_to_ts: None,
        };
        let message = MessageFacts {
            sender: &sender,
            body: &query.text,
            formatted_body: query.formatted_body.as_deref(),
            mentions: mentions.as_ref(),
            reply_to_sender: facts.reply_to_sender.as_deref(),
            thread_root: thread_root.as_deref(),
            hops: 0,
            ts: crate::unix_ms(),
        };
        Ok(self.decide(&room_id, &facts, message))
    }

    /// The lease this process holds now.
    fn lease(&self) -> Lease {
        self.lease.read().expect("lease lock").clone()
    }

    /// Claims every partition of the journal: an embedded store belongs to this process.
    async fn claim_partitions(&self) {
        let holder = self.lease().holder;
        match self
            .store
            .journal
            .claim(&holder, &Partition::all(), LEASE_PERIOD, crate::unix_ms())
            .await
        {
            Ok(lease) => *self.lease.write().expect("lease lock") = lease,
            Err(e) => tracing::error!(error = %e, "cannot claim the journal's partitions"),
        }
    }

    /// Renews the lease at a third of its period until `shutdown`. It is not released at
    /// shutdown: answers still finishing in the grace period finish under it.
    async fn keep_lease(self: Arc<Self>, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(LEASE_PERIOD / 3);
        every.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = every.tick() => {}
            }
            let lease = self.lease();
            match self
                .store
                .journal
                .renew(&lease, LEASE_PERIOD, crate::unix_ms())
                .await
            {
                Ok(renewed) => *self.lease.write().expect("lease lock") = renewed,
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew the journal lease; claiming again");
                    self.claim_partitions().await;
                }
            }
        }
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
        self.claim_partitions().await;
        tracker.spawn(self.clone().keep_lease(shutdown.clone()));
        if let Some(finished) = self.finished.lock().expect("finisher lock").take() {
            tracker.spawn(self.clone().run_finisher(finished, shutdown.clone()));
        }
        if let Some(last) = replay_up_to {
            let mut after = None;
            let mut replayed = 0usize;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.backlog.wait_for_room() => {}
                }
                let lease = self.lease();
                let page = match self
                    .store
                    .journal
                    .pending_events(&lease, after, REPLAY_PAGE)
                    .await
                {
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
        if !self
            .in_flight
            .lock()
            .expect("in-flight lock")
            .insert(event.seq)
        {
            // Handed over again (a redelivered transaction): it is on its way already.
            tracing::debug!(event_id = %event.event_id, "event already in hand; skipped");
            self.backlog.finish(1);
            return;
        }
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
        let mut done = Finished::default();
        loop {
            let next = if done.events.len() < FINISH_BATCH {
                queue.try_recv().ok()
            } else {
                None
            };
            let event = match next {
                Some(event) => event,
                None => {
                    self.finish(&mut done).await;
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
                            self.finish(&mut done).await;
                            tracing::debug!(room_id = %room_id, "room worker idle; stopping");
                            return;
                        }
                    }
                }
            };
            self.process(&event, &mut done, &tracker).await;
        }
    }

    /// Hands a room worker's finished events to the finisher.
    async fn finish(&self, done: &mut Finished) {
        if done.events.is_empty() {
            return;
        }
        if let Err(mpsc::error::SendError(mut back)) = self.finishing.send(std::mem::take(done)) {
            // No finisher (not started, or stopped): write them here.
            self.write_finished(&mut back).await;
        }
    }

    /// Writes what the room workers finished, everyone's together, until `shutdown`; then
    /// what was handed over before it.
    async fn run_finisher(
        self: Arc<Self>,
        mut finished: mpsc::UnboundedReceiver<Finished>,
        shutdown: CancellationToken,
    ) {
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                first = finished.recv() => first,
            };
            let Some(mut batch) = first else { return };
            while batch.events.len() < FINISH_WRITE {
                let Ok(more) = finished.try_recv() else { break };
                batch.events.extend(more.events);
                batch.lines.extend(more.lines);
            }
            self.write_finished(&mut batch).await;
        }
        finished.close();
        let mut rest = Finished::default();
        while let Ok(more) = finished.try_recv() {
            rest.events.extend(more.events);
            rest.lines.extend(more.lines);
        }
        self.write_finished(&mut rest).await;
    }

    /// Finishes the events in `done` (removes them from the journal, writes the history
    /// lines they left) in one write.
    async fn write_finished(&self, done: &mut Finished) {
        if done.events.is_empty() {
            return;
        }
        let lease = self.lease();
        let (events, lines) = (&done.events, &done.lines);
        match self
            .store
            .journal
            .finish_events(&lease, events, lines)
            .await
        {
            Ok(()) => {
                let mut in_flight = self.in_flight.lock().expect("in-flight lock");
                for event in events {
                    in_flight.remove(&event.seq);
                }
                drop(in_flight);
                self.backlog.finish(events.len())
            }
            Err(e) => {
                tracing::error!(events = events.len(), error = %e, "could not finish events; they are redone on the next start")
            }
        }
        done.events.clear();
        done.lines.clear();
    }

    /// Processes one journaled event: routes it and queues the answers in their sessions.
    /// An event with nothing to answer joins `done`; one with answers leaves the journal
    /// once every answer is delivered (or known undeliverable), so a crash or shutdown in
    /// between answers it again after the restart. The room worker does not wait.
    async fn process(&self, event: &JournaledEvent, done: &mut Finished, tracker: &TaskTracker) {
        // Every line about the event names its room and event.
        let span =
            tracing::info_span!("event", room_id = %event.room_id, event_id = %event.event_id);
        let Processed { answers, line } = self.process_new(event).instrument(span).await;
        if answers.is_empty() {
            done.events.push(event.reference());
            done.lines.extend(line);
            return;
        }
        if let Some((room_id, line)) = line {
            self.append_history(&room_id, &line).await;
        }
        let (store, backlog, event) = (
            self.store.journal.clone(),
            self.backlog.clone(),
            event.clone(),
        );
        let lease = self.lease();
        let in_flight = self.in_flight.clone();
        tracker.spawn(async move {
            let outcomes = futures::future::join_all(answers).await;
            // A dropped sender (a lane that died) counts as done: the error was logged.
            if outcomes.contains(&Some(Delivery::Interrupted)) {
                tracing::info!(event_id = %event.event_id, "answer interrupted by shutdown; the event stays journaled");
                return;
            }
            match store.finish_events(&lease, &[event.reference()], &[]).await {
                Ok(()) => {
                    in_flight.lock().expect("in-flight lock").remove(&event.seq);
                    backlog.finish(1)
                }
                Err(e) => tracing::error!(event_id = %event.event_id, error = %e, "could not finish event"),
            }
        });
    }

    /// Decodes an event and runs the stages for its kind.
    async fn process_new(&self, event: &JournaledEvent) -> Processed {
        let inbound = match decode(event) {
            Ok(inbound) => inbound,
            Err(e) => {
                tracing::warn!(event_id = %event.event_id, error = %e, "skipping an event we cannot read");
                return Processed::default();
            }
        };
        let answers = match inbound {
            Inbound::Message(message) => return self.on_message(&message).await,
            Inbound::Membership(member) => {
                self.on_member(&event.room_id, &member).await;
                Vec::new()
            }
            Inbound::HistoryVisibility(change) => {
                self.on_history_visibility(&event.room_id, &change);
                Vec::new()
            }
            Inbound::Encrypted(encrypted) => held(
                self.on_encrypted(&event.room_id, &event.event_id, &encrypted)
                    .await,
            ),
            Inbound::Reaction(reaction) => {
                self.on_reaction(&event.room_id, &reaction);
                Vec::new()
            }
            Inbound::Redaction(_) | Inbound::Other { .. } => Vec::new(),
        };
        Processed {
            answers,
            line: None,
        }
    }
}

/// Events a room worker has done with, waiting to be finished in one write, and the
/// history lines they leave.
#[derive(Default)]
struct Finished {
    events: Vec<EventRef>,
    lines: Vec<(OwnedRoomId, HistoryEntry)>,
}

/// What processing one event left.
#[derive(Default)]
struct Processed {
    /// The answers the event waits for.
    answers: Answers,
    /// A history line nobody reads before the event's finish (a room none of our agents
    /// is in), written with it.
    line: Option<(OwnedRoomId, HistoryEntry)>,
}

/// How each answer an event waits for ended, as the agents deliver them; `None` for a run
/// dropped unanswered (its lane died, which is logged).
type Answers = Vec<futures::future::BoxFuture<'static, Option<Delivery>>>;

/// What a queued run's outcome means for its event ([`Outcome::delivery`]).
fn answer(
    outcome: oneshot::Receiver<Outcome>,
) -> futures::future::BoxFuture<'static, Option<Delivery>> {
    Box::pin(async move { outcome.await.ok().map(|o| o.delivery()) })
}

/// A notice sent inline that shutdown interrupted holds its event in the journal, like an
/// answer would; anything else has nothing left to wait for.
fn held(delivery: Delivery) -> Answers {
    if delivery != Delivery::Interrupted {
        return Vec::new();
    }
    vec![Box::pin(std::future::ready(Some(delivery)))]
}
