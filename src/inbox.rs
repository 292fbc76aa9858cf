//! The inbox: per-room ordered workers that drain the journal.
//!
//! The transaction handler journals events and [`InboxSender::submit`]s them; a dispatcher
//! hands each to its room's worker (bounded queue: a full one makes the dispatcher wait,
//! nothing is dropped). A worker processes its room's events one at a time, in journal
//! order: skip what was processed before, join on invites, skip our own users' events,
//! route the rest and have the chosen agents answer, then mark the event processed. On
//! startup the journal's unprocessed events are replayed first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ruma::events::Mentions;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::agents::{AgentRuntime, Trigger};
use crate::config::Config;
use crate::matrix::MatrixClient;
use crate::router::{Candidate, MessageFacts, RoomFacts, route_message};
use crate::store::{HistoryEntry, JournaledEvent, Store};

/// Events queued per room before the dispatcher waits.
const ROOM_QUEUE: usize = 256;
/// A room worker with nothing to do for this long exits; the next event starts a new one.
const WORKER_IDLE: Duration = Duration::from_secs(300);

/// The handle the transaction handler submits journaled events through.
#[derive(Clone)]
pub struct InboxSender(mpsc::UnboundedSender<Vec<JournaledEvent>>);

/// The receiving end, consumed by [`Inbox::run`].
pub struct InboxReceiver(mpsc::UnboundedReceiver<Vec<JournaledEvent>>);

/// A connected sender/receiver pair.
pub fn channel() -> (InboxSender, InboxReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (InboxSender(tx), InboxReceiver(rx))
}

impl InboxReceiver {
    /// The next submitted batch; `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<Vec<JournaledEvent>> {
        self.0.recv().await
    }
}

impl InboxSender {
    /// Queues journaled events for processing. If the inbox has stopped (shutdown), they
    /// stay in the journal and are processed on the next start.
    pub fn submit(&self, events: Vec<JournaledEvent>) {
        if !events.is_empty() && self.0.send(events).is_err() {
            tracing::debug!("inbox stopped; events stay journaled for the next start");
        }
    }
}

/// Processes events: the per-room logic every worker runs.
pub struct Inbox {
    config: Arc<Config>,
    store: Arc<dyn Store>,
    matrix: Arc<MatrixClient>,
    runtime: AgentRuntime,
    candidates: Vec<Candidate>,
    rooms: Mutex<HashMap<OwnedRoomId, RoomFacts>>,
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
        runtime: AgentRuntime,
    ) -> Arc<Self> {
        let candidates = Candidate::all_from_config(&config);
        Arc::new(Self {
            config,
            store,
            matrix,
            runtime,
            candidates,
            rooms: Mutex::new(HashMap::new()),
        })
    }

    /// Drains `pending` (the journal at startup) and then everything submitted through the
    /// receiver, until `shutdown`. Returns once every worker has stopped.
    pub async fn run(
        self: Arc<Self>,
        pending: Vec<JournaledEvent>,
        mut receiver: InboxReceiver,
        shutdown: CancellationToken,
    ) {
        if !pending.is_empty() {
            tracing::info!(
                events = pending.len(),
                "replaying journaled events from before the restart"
            );
        }
        let mut workers: HashMap<OwnedRoomId, mpsc::Sender<JournaledEvent>> = HashMap::new();
        let mut tasks = tokio::task::JoinSet::new();
        for event in pending {
            self.dispatch(event, &mut workers, &mut tasks, &shutdown)
                .await;
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                batch = receiver.0.recv() => match batch {
                    Some(batch) => for event in batch {
                        self.dispatch(event, &mut workers, &mut tasks, &shutdown).await;
                    },
                    None => break,
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        drop(workers);
        while tasks.join_next().await.is_some() {}
    }

    async fn dispatch(
        self: &Arc<Self>,
        mut event: JournaledEvent,
        workers: &mut HashMap<OwnedRoomId, mpsc::Sender<JournaledEvent>>,
        tasks: &mut tokio::task::JoinSet<()>,
        shutdown: &CancellationToken,
    ) {
        loop {
            let sender = workers.entry(event.room_id.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(ROOM_QUEUE);
                tasks.spawn(
                    self.clone()
                        .run_worker(event.room_id.clone(), rx, shutdown.clone()),
                );
                tx
            });
            match sender.send(event).await {
                Ok(()) => return,
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
        mut queue: mpsc::Receiver<JournaledEvent>,
        shutdown: CancellationToken,
    ) {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = tokio::time::timeout(WORKER_IDLE, queue.recv()) => next,
            };
            match next {
                Ok(Some(event)) => self.process(&event).await,
                Ok(None) => return,
                Err(_idle) => {
                    // Refuse new events, then finish the ones that slipped in.
                    queue.close();
                    while let Ok(event) = queue.try_recv() {
                        self.process(&event).await;
                    }
                    tracing::debug!(room_id = %room_id, "room worker idle; stopping");
                    return;
                }
            }
        }
    }

    /// Processes one journaled event at most once, then removes it from the journal.
    pub async fn process(&self, event: &JournaledEvent) {
        match self.store.is_processed(&event.event_id) {
            Ok(true) => tracing::debug!(event_id = %event.event_id, "already processed; skipping"),
            Ok(false) => self.process_new(event).await,
            Err(e) => {
                tracing::error!(event_id = %event.event_id, error = %e, "cannot check the processed record; processing anyway")
            }
        }
        if let Err(e) = self.store.finish_event(event.seq, &event.event_id) {
            tracing::error!(event_id = %event.event_id, error = %e, "could not mark event processed");
        }
    }

    async fn process_new(&self, event: &JournaledEvent) {
        let envelope: Envelope = match serde_json::from_str(event.json.get()) {
            Ok(envelope) => envelope,
            Err(e) => {
                tracing::warn!(event_id = %event.event_id, error = %e, "skipping an event we cannot read");
                return;
            }
        };
        match envelope.kind.as_str() {
            "m.room.member" => self.on_member(&event.room_id, &envelope).await,
            "m.room.message" => self.on_message(event, &envelope).await,
            "m.room.encrypted" => self.on_encrypted(event, &envelope).await,
            _ => {}
        }
    }

    async fn on_member(&self, room_id: &RoomId, envelope: &Envelope) {
        self.rooms.lock().expect("room cache lock").remove(room_id);
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

    async fn on_message(&self, event: &JournaledEvent, envelope: &Envelope) {
        let from_own_user = self.config.is_own_user(&envelope.sender);
        if from_own_user {
            return;
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
            return;
        }
        let Some(body) = content.get("body").and_then(|b| b.as_str()) else {
            return;
        };
        let entry = HistoryEntry {
            event_id: event.event_id.clone(),
            sender: envelope.sender.clone(),
            body: body.to_owned(),
            ts: envelope.origin_server_ts,
        };
        if let Err(e) = self.store.append_history(&event.room_id, &entry) {
            tracing::warn!(room_id = %event.room_id, error = %e, "could not record message in history");
        }

        let mentions: Option<Mentions> = content
            .get("m.mentions")
            .and_then(|m| serde_json::from_value(m.clone()).ok());
        let room = self.room_facts(&event.room_id).await;
        let facts = MessageFacts {
            sender: &envelope.sender,
            body,
            formatted_body: content.get("formatted_body").and_then(|f| f.as_str()),
            mentions: mentions.as_ref(),
            from_own_user,
        };
        let decision = route_message(&facts, &room, &self.candidates);
        tracing::info!(
            room_id = %event.room_id, sender = %envelope.sender, event_id = %event.event_id,
            targets = ?decision.targets, reason = %decision.reason, "routed"
        );
        let thread_root: Option<OwnedEventId> = (rel_type == Some("m.thread"))
            .then(|| {
                relation
                    .and_then(|r| r.get("event_id"))
                    .and_then(|e| e.as_str())
            })
            .flatten()
            .and_then(|e| ruma::EventId::parse(e).ok());
        let trigger = Trigger {
            room_id: &event.room_id,
            event_id: &event.event_id,
            sender: &envelope.sender,
            body,
            thread_root: thread_root.as_deref(),
        };
        let answers = decision
            .targets
            .iter()
            .filter_map(|id| self.config.agents.iter().find(|a| &a.id == id))
            .map(|agent| {
                let trigger = &trigger;
                async move {
                    // Failures are logged inside `answer`; one agent's failure does not stop the others.
                    let _ = self.runtime.answer(agent, trigger).await;
                }
            });
        futures::future::join_all(answers).await;
    }

    /// An encrypted message cannot be read; the room's first agent says so rather than
    /// staying silent.
    async fn on_encrypted(&self, event: &JournaledEvent, envelope: &Envelope) {
        if self.config.is_own_user(&envelope.sender) {
            return;
        }
        let room = self.room_facts(&event.room_id).await;
        let Some(agent) = self
            .candidates
            .iter()
            .find(|c| room.joined.contains(&c.user_id))
        else {
            return;
        };
        let trigger = Trigger {
            room_id: &event.room_id,
            event_id: &event.event_id,
            sender: &envelope.sender,
            body: "",
            thread_root: None,
        };
        let text = "🔒 This message is end-to-end encrypted and agents cannot read it. \
                    Please talk to agents in an unencrypted room (in Element: start the chat with encryption turned off).";
        let content = crate::agents::reply_content("m.notice", text, &trigger);
        let txn = crate::agents::derived_txn_id(&event.event_id, &agent.id, "encrypted");
        if let Err(e) = self
            .matrix
            .send_message(&agent.user_id, &event.room_id, &txn, &content)
            .await
        {
            tracing::error!(agent = %agent.id, room_id = %event.room_id, error = %e, "could not send the encryption notice");
        }
    }

    /// The joined members of `room_id`: cached, refreshed after any membership change.
    async fn room_facts(&self, room_id: &RoomId) -> RoomFacts {
        if let Some(facts) = self.rooms.lock().expect("room cache lock").get(room_id) {
            return facts.clone();
        }
        // Ask as each agent in turn; only one that is in the room may see its members.
        for candidate in &self.candidates {
            match self
                .matrix
                .joined_members(&candidate.user_id, room_id)
                .await
            {
                Ok(members) => {
                    let facts = RoomFacts {
                        joined: members.into_iter().collect(),
                    };
                    self.rooms
                        .lock()
                        .expect("room cache lock")
                        .insert(room_id.to_owned(), facts.clone());
                    return facts;
                }
                Err(e) if e.errcode() == Some("M_FORBIDDEN") => continue,
                Err(e) => {
                    tracing::warn!(room_id = %room_id, error = %e, "could not read room members");
                    return RoomFacts::default();
                }
            }
        }
        RoomFacts::default()
    }
}
