//! Durable state, one async trait per concern: [`JournalStore`] (the transaction journal,
//! dedupe records, partition leases, sent-message records), [`HistoryStore`] (room history),
//! [`SessionStore`] (agents' conversation memory), [`PairingStore`] (DM pairing) and
//! [`TaskStore`] (teams' tasks in progress), [`ScheduleStore`] (scheduled tasks' runs),
//! [`MonitorStore`] (health checks' up/down state and the alerts they posted) and
//! [`PortalStore`] (bridged chats' rooms and the bridges' message records).
//!
//! [`open`] builds the backend `store.backend` names and hands out [`Stores`], one handle
//! per concern. The embedded engines (fjall, the default, and sled) implement a small
//! synchronous [`embedded::Backend`] and get the async traits, the history cache, leases
//! and recovery after a failed write from [`embedded::Embedded`]; a backend shared by
//! several processes (PostgreSQL) implements the async traits itself. Every backend runs
//! the same conformance macros (`journal_conformance_tests!` and its siblings).
//!
//! Time is passed in (`now_ms`, unix milliseconds), never read inside, so tests control it.

pub mod embedded;
pub mod feed;
mod fjall;
mod lease;
mod log;
pub mod private;
mod sled;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ruma::{EventId, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, TransactionId};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use self::fjall::FjallBackend;
pub use self::lease::{Lease, PARTITIONS, Partition};
pub use self::sled::SledBackend;

use crate::config::{AgentId, ChannelId, StoreBackend, StoreConfig};

/// The concerns of one store.
#[derive(Clone)]
pub struct Stores {
    pub journal: Arc<dyn JournalStore>,
    pub history: Arc<dyn HistoryStore>,
    pub sessions: Arc<dyn SessionStore>,
    pub pairing: Arc<dyn PairingStore>,
    pub tasks: Arc<dyn TaskStore>,
    pub schedules: Arc<dyn ScheduleStore>,
    pub monitors: Arc<dyn MonitorStore>,
    pub portals: Arc<dyn PortalStore>,
}

impl Stores {
    /// An embedded engine serving every concern, opened (and reopened after a failure)
    /// with `open`.
    pub fn embedded<B: embedded::Backend>(
        open: impl Fn() -> Result<B, StoreError> + Send + Sync + 'static,
    ) -> Result<Self, StoreError> {
        Ok(Self::of(Arc::new(embedded::Embedded::open(open)?)))
    }

    /// One backend serving every concern.
    pub fn of<S>(store: Arc<S>) -> Self
    where
        S: JournalStore
            + HistoryStore
            + SessionStore
            + PairingStore
            + TaskStore
            + ScheduleStore
            + MonitorStore
            + PortalStore
            + 'static,
    {
        Self {
            journal: store.clone(),
            history: store.clone(),
            sessions: store.clone(),
            pairing: store.clone(),
            tasks: store.clone(),
            schedules: store.clone(),
            monitors: store.clone(),
            portals: store,
        }
    }
}

/// Opens the store `config` describes (`store.backend`, `store.path`), creating the data
/// directory 0700 when it is missing ([`private`]).
pub fn open(config: &StoreConfig) -> Result<Stores, StoreError> {
    private::create_dir(&config.path).map_err(|e| {
        StoreError::Unavailable(format!(
            "cannot create the data directory {}: {e}",
            config.path.display()
        ))
    })?;
    let sled_dir = config.path.join("sled");
    let fjall_dir = config.path.join("fjall");
    match config.backend {
        StoreBackend::Fjall => {
            if sled_dir.join("conf").exists() && !fjall_dir.exists() {
                return Err(StoreError::Unavailable(format!(
                    "{} holds a sled store and store.backend is fjall: set `store.backend: sled` \
                     to keep using it (its journal, history, sessions and pairings are not read by fjall)",
                    sled_dir.display()
                )));
            }
            Stores::embedded(move || FjallBackend::open(&fjall_dir))
        }
        StoreBackend::Sled => Stores::embedded(move || SledBackend::open(&sled_dir)),
    }
}

/// One event as the homeserver delivered it, ready to journal.
#[derive(Debug, Clone)]
pub struct IncomingEvent {
    pub room_id: OwnedRoomId,
    pub event_id: OwnedEventId,
    /// The event JSON exactly as received.
    pub json: Box<RawValue>,
}

/// A journaled event waiting to be processed; `seq` orders the journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournaledEvent {
    pub seq: u64,
    pub room_id: OwnedRoomId,
    pub event_id: OwnedEventId,
    pub json: Box<RawValue>,
}

/// What journaling a transaction did.
#[derive(Debug)]
pub enum JournalOutcome {
    /// The txnId was seen before; nothing was written.
    Duplicate,
    /// The events were written, in order, each with its sequence number.
    Journaled(Vec<JournaledEvent>),
}

/// One line of room history, used as conversation context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub event_id: OwnedEventId,
    pub sender: OwnedUserId,
    pub body: String,
    /// Milliseconds since the epoch (origin_server_ts).
    pub ts: u64,
    /// Root of the thread the line was said in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_root: Option<OwnedEventId>,
    /// Agents the line was routed to (for a person's message).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routed_to: Vec<AgentId>,
}

/// One line of an agent's conversation memory (a session: agent + room + thread).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEntry {
    /// `user` or `assistant`.
    pub role: SessionRole,
    /// What was said; in group rooms a person's line is prefixed with their name.
    pub content: String,
    /// Unix milliseconds.
    pub ts: u64,
}

/// Who said a [`SessionEntry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionRole {
    User,
    Assistant,
}

/// The characters of a pairing code: no 0/O/1/I lookalikes.
pub const PAIRING_CODE_ALPHABET: &str = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789";

/// How long a pairing code stays valid.
pub const PAIRING_TTL: Duration = Duration::from_secs(3600);

/// How many characters a pairing code has.
pub const PAIRING_CODE_LEN: usize = 8;

/// A person waiting for an admin to approve them (DM policy `pairing`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingRequest {
    /// 8 characters from `ABCDEFGHJKLMNPQRSTUVWXYZ23456789` (no 0/O/1/I lookalikes).
    pub code: String,
    /// Channel the sender wrote on, e.g. `matrix`, `telegram`.
    pub channel: ChannelId,
    /// The sender's id on that channel, e.g. `@eve:example.org`.
    pub sender: String,
    /// Unix milliseconds the code was issued.
    pub created_ms: u64,
}

impl PairingRequest {
    /// Whether the request is still live at `now_ms`: it is not older than `ttl`. (A clock
    /// that went backwards makes a request look new, not expired.)
    pub fn is_live(&self, now_ms: u64, ttl: Duration) -> bool {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        now_ms.saturating_sub(self.created_ms) <= ttl_ms
    }
}

/// An approved sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairedSender {
    /// Channel the sender was approved on.
    pub channel: ChannelId,
    /// The sender's id on that channel.
    pub sender: String,
    /// Unix milliseconds of the approval.
    pub approved_ms: u64,
}

/// A pairing code as an admin typed it, in the form it was issued: upper case, without
/// whitespace or `-` (`abcd-efgh` → `ABCDEFGH`).
pub fn normalize_pairing_code(input: &str) -> String {
    input
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .flat_map(char::to_uppercase)
        .collect()
}

/// The live requests among `requests`, oldest first (ties by channel, then sender): what
/// every backend's `pending_pairings` returns.
pub(crate) fn live_oldest_first(
    requests: impl IntoIterator<Item = PairingRequest>,
    now_ms: u64,
    ttl: Duration,
) -> Vec<PairingRequest> {
    let mut live: Vec<PairingRequest> = requests
        .into_iter()
        .filter(|request| request.is_live(now_ms, ttl))
        .collect();
    live.sort_by(|a, b| {
        (a.created_ms, &a.channel, &a.sender).cmp(&(b.created_ms, &b.channel, &b.sender))
    });
    live
}

/// Approved senders ordered by channel, then sender. (Keys of channel ‖ 0xFF ‖ sender put
/// channel `ab` before `a`, so backends sort by the strings.)
pub(crate) fn by_channel_then_sender(mut senders: Vec<PairedSender>) -> Vec<PairedSender> {
    senders.sort_by(|a, b| (&a.channel, &a.sender).cmp(&(&b.channel, &b.sender)));
    senders
}

/// A fresh random pairing code; backends check it against the live ones.
pub(crate) fn random_pairing_code() -> String {
    use rand::Rng;
    let alphabet = PAIRING_CODE_ALPHABET.as_bytes();
    let mut rng = rand::thread_rng();
    (0..PAIRING_CODE_LEN)
        .map(|_| char::from(alphabet[rng.gen_range(0..alphabet.len())]))
        .collect()
}

/// How many lines of history a room keeps; older ones are trimmed.
pub const HISTORY_PER_ROOM: usize = 1000;

/// Which session a line of memory belongs to: an agent's conversation in a room, or in
/// one thread of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub agent: AgentId,
    pub room: OwnedRoomId,
    pub thread: Option<OwnedEventId>,
}

impl SessionKey {
    pub fn new(agent: &AgentId, room: &RoomId, thread: Option<&EventId>) -> Self {
        Self {
            agent: agent.clone(),
            room: room.to_owned(),
            thread: thread.map(ToOwned::to_owned),
        }
    }

    /// The key the embedded backends store lines under: the parts joined by U+001F, which
    /// never occurs in an ID (the format of earlier versions, so stored memory is kept).
    pub fn storage_key(&self) -> String {
        const SEP: char = '\u{1f}';
        match &self.thread {
            Some(root) => format!("{}{SEP}{}{SEP}{root}", self.agent, self.room),
            None => format!("{}{SEP}{}", self.agent, self.room),
        }
    }
}

/// A storage failure, by what a caller can do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot serve now (I/O error, disk full, being reopened): retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Another holder owns what was asked for (a partition lease): do not retry as is.
    #[error("store conflict: {0}")]
    Conflict(String),
    /// Stored data cannot be read back: retrying will not help.
    #[error("store data corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Which journaled event a finish refers to: its sequence number and its room's partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRef {
    pub seq: u64,
    pub partition: Partition,
}

impl JournaledEvent {
    pub fn reference(&self) -> EventRef {
        EventRef {
            seq: self.seq,
            partition: Partition::of(&self.room_id),
        }
    }
}

/// The transaction journal: what the homeserver handed us, until it is answered.
#[async_trait]
pub trait JournalStore: Send + Sync {
    /// Records `txn_id` and journals `events` in one atomic write that is on stable storage
    /// when this returns — unless the txnId was recorded before, in which case nothing is
    /// written. An event whose event_id was journaled before (in this or any earlier
    /// transaction) is left out, so every event enters the journal at most once.
    async fn journal_transaction(
        &self,
        txn_id: &TransactionId,
        events: Vec<IncomingEvent>,
        now_ms: u64,
    ) -> Result<JournalOutcome, StoreError>;

    /// Claims `partitions` for `holder` until `now_ms + period`: each one that is free,
    /// expired, or already `holder`'s. The lease lists the partitions granted; one held by
    /// another live holder is left out.
    async fn claim(
        &self,
        holder: &str,
        partitions: &[Partition],
        period: Duration,
        now_ms: u64,
    ) -> Result<Lease, StoreError>;

    /// Extends a lease to `now_ms + period`. A partition another holder took over after the
    /// lease expired is dropped from it; [`StoreError::Conflict`] when none is left.
    async fn renew(
        &self,
        lease: &Lease,
        period: Duration,
        now_ms: u64,
    ) -> Result<Lease, StoreError>;

    /// Gives a lease's partitions up at once.
    async fn release(&self, lease: &Lease) -> Result<(), StoreError>;

    /// Up to `limit` journaled events of the lease's partitions not yet finished, in
    /// journal order, after sequence number `after` (from the start when `None`). Replay
    /// pages through the journal with this instead of loading it whole.
    async fn pending_events(
        &self,
        lease: &Lease,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<JournaledEvent>, StoreError>;

    /// Removes finished events from the journal and appends the room history lines they
    /// leave (`history`, in order), in one write: an event replayed after a crash does not
    /// add its line twice. [`StoreError::Conflict`] (and nothing written) when an event is in
    /// a partition the lease does not hold. Written so that it survives the process being
    /// killed, but not synced to disk: a finish lost to a power cut replays an event whose
    /// sends carry derived transaction IDs.
    async fn finish_events(
        &self,
        lease: &Lease,
        events: &[EventRef],
        history: &[(OwnedRoomId, HistoryEntry)],
    ) -> Result<(), StoreError>;

    /// Those of `event_ids` still waiting in the journal. A transaction refused with a 5xx
    /// can still have been written (the engine failed after the write, and recovered it on
    /// reopening), so when its redelivery is a duplicate the handler hands these to the
    /// inbox again; the inbox skips what it already has.
    async fn pending_of(
        &self,
        event_ids: &[OwnedEventId],
    ) -> Result<Vec<JournaledEvent>, StoreError>;

    /// The sequence number of the newest journaled event not finished yet.
    async fn journal_head(&self) -> Result<Option<u64>, StoreError>;

    /// Whether the last write went through (false after a failed one, until the store
    /// recovers): what readiness reports.
    fn is_writable(&self) -> bool {
        true
    }

    /// How many journaled events are not finished yet.
    async fn pending_count(&self) -> Result<usize, StoreError>;

    /// The `origin_server_ts` of the oldest journaled event not finished yet, in any
    /// partition (a read, not a claim): how far behind agentbus is, for metrics.
    async fn oldest_pending_ts(&self) -> Result<Option<u64>, StoreError> {
        let everything = Lease {
            holder: String::new(),
            partitions: Partition::all(),
            expires_ms: u64::MAX,
        };
        let first = self.pending_events(&everything, None, 1).await?;
        Ok(first.first().and_then(|event| {
            #[derive(serde::Deserialize)]
            struct Ts {
                origin_server_ts: u64,
            }
            serde_json::from_str::<Ts>(event.json.get())
                .ok()
                .map(|t| t.origin_server_ts)
        }))
    }

    /// Whether `event_id` was ever journaled (its dedupe record is kept until pruned).
    async fn was_journaled(&self, event_id: &EventId) -> Result<bool, StoreError>;

    /// Forgets txnIds, journaled event_ids and sent-part records written before `cutoff_ms`;
    /// returns how many records went. Homeservers redeliver within minutes, not days.
    async fn prune_dedupe_records(&self, cutoff_ms: u64) -> Result<usize, StoreError>;

    /// Remembers that part `part` of the answer `answer` (a key the caller derives from what
    /// the answer answers) was posted as `event_id`, so a run replayed after a crash edits
    /// that message instead of leaving it half-streamed. Pruned with the dedupe records.
    async fn record_sent_part(
        &self,
        answer: &str,
        part: usize,
        event_id: &EventId,
        now_ms: u64,
    ) -> Result<(), StoreError>;

    /// The parts of `answer` posted so far, in order.
    async fn sent_parts(&self, answer: &str) -> Result<Vec<OwnedEventId>, StoreError>;
}

/// Room history: what was said where, as conversation context.
#[async_trait]
pub trait HistoryStore: Send + Sync {
    /// Appends a line to a room's history; lines beyond the room's newest
    /// [`HISTORY_PER_ROOM`] are trimmed from time to time.
    async fn append_history(
        &self,
        room_id: &RoomId,
        entry: &HistoryEntry,
    ) -> Result<(), StoreError>;

    /// The last `limit` lines of a room's history, oldest first.
    async fn recent_history(
        &self,
        room_id: &RoomId,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError>;
}

/// Agents' conversation memory, per session.
#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Appends lines to a session's memory, then forgets its oldest lines beyond `keep`.
    async fn append_session(
        &self,
        session: &SessionKey,
        entries: &[SessionEntry],
        keep: usize,
    ) -> Result<(), StoreError>;

    /// A session's memory, oldest first (at most the `keep` of the last append).
    async fn session(&self, session: &SessionKey) -> Result<Vec<SessionEntry>, StoreError>;

    /// Forgets a session's memory; returns how many lines went.
    async fn clear_session(&self, session: &SessionKey) -> Result<usize, StoreError>;
}

/// DM pairing: people waiting for an admin, and the approved ones.
#[async_trait]
pub trait PairingStore: Send + Sync {
    /// The sender's live pairing request, or a new one with a fresh unique code. A request
    /// older than `ttl` (relative to `now_ms`) is expired and replaced. Returns the request
    /// and whether it was created by this call. Callers check [`PairingStore::is_paired`] first.
    async fn pairing_request(
        &self,
        channel: &ChannelId,
        sender: &str,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<(PairingRequest, bool), StoreError>;

    /// Approves the live request with `code` (case-insensitive; spaces and `-` ignored):
    /// removes it and records the sender as paired, atomically. `None` when no live request
    /// has that code.
    async fn approve_pairing(
        &self,
        code: &str,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<Option<PairingRequest>, StoreError>;

    /// Live (unexpired) requests, oldest first.
    async fn pending_pairings(
        &self,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<Vec<PairingRequest>, StoreError>;

    /// Whether `sender` on `channel` was approved.
    async fn is_paired(&self, channel: &ChannelId, sender: &str) -> Result<bool, StoreError>;

    /// Every approved sender, ordered by channel then sender.
    async fn paired_senders(&self) -> Result<Vec<PairedSender>, StoreError>;

    /// Forgets an approval; returns whether there was one.
    async fn revoke_pairing(&self, channel: &ChannelId, sender: &str) -> Result<bool, StoreError>;
}

/// Teams' tasks in progress, each one record under its ID, written as the task moves on
/// so a restarted process resumes it where it was. The record is the caller's (JSON);
/// a write is on disk (surviving a killed process) when it returns.
#[async_trait]
pub trait TaskStore: Send + Sync {
    /// Stores `record` as task `id`'s, replacing what was there.
    async fn save_task(&self, id: &str, record: &[u8]) -> Result<(), StoreError>;

    /// Task `id`'s record, if it has one.
    async fn task(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Forgets task `id`; returns whether it had a record.
    async fn remove_task(&self, id: &str) -> Result<bool, StoreError>;

    /// Every task with a record, by ID.
    async fn tasks(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
}

/// What is known of one scheduled task's runs (by task name). Times are unix ms; a run
/// is named by the time it was scheduled for, which is what its sends derive their
/// transaction IDs from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleState {
    /// The scheduled time of the last run that ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_ms: Option<u64>,
    /// When that run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ended_ms: Option<u64>,
    /// How it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_outcome: Option<RunOutcome>,
    /// The next time the task is due; `None` when it will not run again (a past `at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run_ms: Option<u64>,
    /// What the next run was computed from (the task's timing as written), so a changed
    /// schedule is planned afresh.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub timing: String,
    /// Failed runs in a row.
    #[serde(default)]
    pub failures: u32,
    /// Paused after too many failures: runs only when triggered.
    #[serde(default)]
    pub paused: bool,
    /// The scheduled time of a run that started and has not ended: after a crash, that
    /// run is done again under the same time (so its sends are deduplicated), not anew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight_ms: Option<u64>,
}

/// How a scheduled run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum RunOutcome {
    /// Done; `posted` says whether anything was posted (a heartbeat may have nothing to say).
    Ok {
        posted: bool,
    },
    Failed {
        error: String,
    },
}

/// Scheduled tasks' state, one record per task name; a write is on disk when it returns.
#[async_trait]
pub trait ScheduleStore: Send + Sync {
    /// Task `name`'s state, if it has any.
    async fn schedule_state(&self, name: &str) -> Result<Option<ScheduleState>, StoreError>;

    /// Stores `state` as task `name`'s, replacing what was there.
    async fn save_schedule_state(
        &self,
        name: &str,
        state: &ScheduleState,
    ) -> Result<(), StoreError>;

    /// Every task with a state, by name.
    async fn schedule_states(&self) -> Result<Vec<(String, ScheduleState)>, StoreError>;

    /// Forgets task `name`'s state; returns whether it had one.
    async fn remove_schedule_state(&self, name: &str) -> Result<bool, StoreError>;
}

/// What is known of one health check (by check name): whether it is down, and the
/// transitions between up and down it went through, each numbered. A transition's
/// message derives its transaction ID from its number, so it is posted once whatever
/// restarts happen between the transition and its delivery. Times are unix ms.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorState {
    /// Down: the alert of the outage has been decided (and posted once `notified` catches up).
    #[serde(default)]
    pub down: bool,
    /// Failed checks in a row while up (counting towards `failures_before_alert`).
    #[serde(default)]
    pub failures: u32,
    /// Transitions so far (up → down, down → up): the number of the latest one.
    #[serde(default)]
    pub seq: u64,
    /// The number of the latest transition whose message was delivered.
    #[serde(default)]
    pub notified: u64,
    /// When the latest transition happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_ms: Option<u64>,
    /// When the current (or the latest) outage began: its first failed check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_since_ms: Option<u64>,
    /// What the latest failed check said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Health checks' state, one record per check name; a write is on disk when it returns.
#[async_trait]
pub trait MonitorStore: Send + Sync {
    /// Check `name`'s state, if it has any.
    async fn monitor_state(&self, name: &str) -> Result<Option<MonitorState>, StoreError>;

    /// Stores `state` as check `name`'s, replacing what was there.
    async fn save_monitor_state(&self, name: &str, state: &MonitorState) -> Result<(), StoreError>;

    /// Every check with a state, by name.
    async fn monitor_states(&self) -> Result<Vec<(String, MonitorState)>, StoreError>;
}

/// A remote chat and the Matrix room that is its portal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Portal {
    /// The platform (`webhook`, `telegram`, …).
    pub platform: ChannelId,
    /// The account on that platform the chat was reached through.
    pub account: String,
    /// The chat's ID on the platform.
    pub chat: String,
    pub room_id: OwnedRoomId,
    /// The room's name, as it was last set from the remote chat's.
    pub name: String,
}

/// Where a bridged message stands: recorded (and acknowledged to whoever sent it) but not
/// yet delivered, or delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgedState {
    Pending,
    Delivered,
}

/// The bridges' durable state: which Matrix room is each remote chat's portal, and a record
/// per bridged message in either direction (keyed by the caller, from the platform's
/// message ID or the Matrix event ID), written before the message is acknowledged so a
/// redelivery is recognised and a crash leaves it pending, not lost. A write is on disk
/// when it returns.
#[async_trait]
pub trait PortalStore: Send + Sync {
    /// The portal of chat `chat` of `account` on `platform`, if it has one.
    async fn portal(
        &self,
        platform: &ChannelId,
        account: &str,
        chat: &str,
    ) -> Result<Option<Portal>, StoreError>;

    /// Stores `portal`, replacing the chat's earlier one.
    async fn save_portal(&self, portal: &Portal) -> Result<(), StoreError>;

    /// Every portal, by platform, account and chat.
    async fn portals(&self) -> Result<Vec<Portal>, StoreError>;

    /// Records message `key` with `payload` (the caller's) as pending, unless it has a
    /// record already; returns the state it had (`None`: it is new).
    async fn record_bridged(
        &self,
        key: &str,
        payload: &[u8],
    ) -> Result<Option<BridgedState>, StoreError>;

    /// Marks message `key` delivered (its payload is dropped; the record stays, so a
    /// redelivery is still recognised).
    async fn finish_bridged(&self, key: &str) -> Result<(), StoreError>;

    /// Every pending message whose key starts with `prefix`, by key, with its payload.
    async fn pending_bridged(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
}

/// What the conformance macros share: fixed times, builders and a lease on everything.
#[doc(hidden)]
pub mod conformance {
    pub use crate::config::ChannelId;
    use crate::store::{IncomingEvent, SessionEntry, SessionKey, SessionRole, Stores};

    /// "now" for the writes of these tests.
    pub const NOW: u64 = 1_800_000_000_000;

    pub fn txn(id: &str) -> &ruma::TransactionId {
        id.into()
    }

    /// The session `agent‖room[‖thread]` (parts joined by U+001F).
    pub fn key(joined: &str) -> SessionKey {
        let mut parts = joined.split('\u{1f}');
        let agent = crate::config::AgentId::parse(parts.next().unwrap()).unwrap();
        let room = ruma::RoomId::parse(parts.next().unwrap()).unwrap();
        let thread = parts.next().map(|t| ruma::EventId::parse(t).unwrap());
        SessionKey::new(&agent, &room, thread.as_deref())
    }

    /// A lease on every partition, for a single holder.
    pub async fn all(store: &Stores) -> crate::store::Lease {
        store
            .journal
            .claim(
                "tests",
                &crate::store::Partition::all(),
                std::time::Duration::from_secs(60),
                NOW,
            )
            .await
            .unwrap()
    }

    pub fn event(n: u32, room: &str) -> IncomingEvent {
        IncomingEvent {
            room_id: ruma::RoomId::parse(room).unwrap(),
            event_id: ruma::EventId::parse(format!("$ev{n}")).unwrap(),
            json: serde_json::value::to_raw_value(&serde_json::json!({"n": n})).unwrap(),
        }
    }

    pub fn room_in(partition: crate::store::Partition, n: &mut u32) -> String {
        loop {
            *n += 1;
            let room = format!("!r{n}:x");
            if crate::store::Partition::of(&ruma::RoomId::parse(&room).unwrap()) == partition {
                return room;
            }
        }
    }

    /// Pairing requests live an hour in these tests; `T0` is an arbitrary unix ms.
    pub const PAIRING_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

    pub const PAIRING_TTL_MS: u64 = 3_600_000;

    pub const T0: u64 = 1_700_000_000_000;

    pub fn line(role: SessionRole, content: &str) -> SessionEntry {
        SessionEntry {
            role,
            content: content.into(),
            ts: 1,
        }
    }

    pub fn assert_pairing_code(code: &str) {
        assert_eq!(
            code.chars().count(),
            8,
            "code {code:?} must have 8 characters"
        );
        assert!(
            code.chars()
                .all(|c| "ABCDEFGHJKLMNPQRSTUVWXYZ23456789".contains(c)),
            "code {code:?} must use only the unambiguous alphabet"
        );
    }

    /// The channel named `name`.
    pub fn channel(name: &str) -> ChannelId {
        ChannelId::new(name)
    }

    /// Issues a request for `sender` on `channel` at `now` and approves it.
    pub async fn pair(store: &crate::store::Stores, channel: &ChannelId, sender: &str, now: u64) {
        let (request, _) = store
            .pairing
            .pairing_request(channel, sender, now, PAIRING_TTL)
            .await
            .unwrap();
        assert!(
            store
                .pairing
                .approve_pairing(&request.code, now, PAIRING_TTL)
                .await
                .unwrap()
                .is_some()
        );
    }
}

/// The conformance tests of a backend's [`JournalStore`]. Invoke with an expression that builds
/// fresh [`Stores`] (and a guard that keeps its directory) and a function that reopens them:
/// `journal_conformance_tests!(fresh(), reopen);`
#[macro_export]
macro_rules! journal_conformance_tests {
    ($fresh:expr, $reopen:expr) => {
        #[allow(unused_imports)]
        use $crate::store::conformance::*;
        #[allow(unused_imports)]
        use $crate::store::{HistoryEntry, JournalOutcome, PairedSender, SessionRole};

        #[tokio::test]
        async fn journals_and_lists_in_order() {
            let (store, _guard) = $fresh;
            let lease = all(&store).await;
            let out = store.journal.journal_transaction(txn("t1"), vec![event(1, "!a"), event(2, "!b")], NOW).await.unwrap();
            let JournalOutcome::Journaled(journaled) = out else { panic!("expected Journaled") };
            let seqs: Vec<u64> = journaled.iter().map(|e| e.seq).collect();
            assert_eq!(seqs.len(), 2);
            assert!(seqs[0] < seqs[1]);
            store.journal.journal_transaction(txn("t2"), vec![event(3, "!a")], NOW).await.unwrap();
            let pending = store.journal.pending_events(&lease, None, 100).await.unwrap();
            let ids: Vec<&str> = pending.iter().map(|e| e.event_id.as_str()).collect();
            assert_eq!(ids, ["$ev1", "$ev2", "$ev3"]);
            assert_eq!(pending[1].room_id.as_str(), "!b");
            assert_eq!(pending[2].json.get(), r#"{"n":3}"#);
        }

        #[tokio::test]
        async fn the_oldest_pending_event_is_read_across_partitions() {
            let (store, _guard) = $fresh;
            let lease = all(&store).await;
            assert_eq!(store.journal.oldest_pending_ts().await.unwrap(), None);
            let stamped = |n: u32, room: &str, ts: u64| {
                let mut e = event(n, room);
                e.json = serde_json::value::to_raw_value(&serde_json::json!({"n": n, "origin_server_ts": ts})).unwrap();
                e
            };
            let JournalOutcome::Journaled(first) = store
                .journal
                .journal_transaction(txn("t1"), vec![stamped(1, "!a", 1_000), stamped(2, "!zz", 2_000)], NOW)
                .await
                .unwrap()
            else {
                panic!("expected Journaled")
            };
            assert_eq!(store.journal.oldest_pending_ts().await.unwrap(), Some(1_000));
            store.journal.finish_events(&lease, &[first[0].reference()], &[]).await.unwrap();
            assert_eq!(store.journal.oldest_pending_ts().await.unwrap(), Some(2_000));
        }

        #[tokio::test]
        async fn a_repeated_txn_id_writes_nothing() {
            let (store, _guard) = $fresh;
            let lease = all(&store).await;
            store.journal.journal_transaction(txn("t1"), vec![event(1, "!a")], NOW).await.unwrap();
            let again = store.journal.journal_transaction(txn("t1"), vec![event(1, "!a"), event(9, "!a")], NOW).await.unwrap();
            assert!(matches!(again, JournalOutcome::Duplicate));
            assert_eq!(store.journal.pending_events(&lease, None, 100).await.unwrap().len(), 1);
        }

        #[tokio::test]
        async fn an_event_is_journaled_once_whatever_carries_it() {
            let (store, _guard) = $fresh;
            let lease = all(&store).await;
            let JournalOutcome::Journaled(first) =
                store.journal.journal_transaction(txn("t1"), vec![event(1, "!a"), event(1, "!a"), event(2, "!a")], NOW).await.unwrap()
            else {
                panic!("expected Journaled")
            };
            let ids: Vec<&str> = first.iter().map(|e| e.event_id.as_str()).collect();
            assert_eq!(ids, ["$ev1", "$ev2"], "a copy inside one transaction is left out");
            let JournalOutcome::Journaled(second) =
                store.journal.journal_transaction(txn("t2"), vec![event(2, "!a"), event(3, "!a")], NOW).await.unwrap()
            else {
                panic!("expected Journaled")
            };
            assert_eq!(second.len(), 1, "an event from an earlier transaction is left out");
            assert_eq!(second[0].event_id.as_str(), "$ev3");
            store.journal.finish_events(&lease, &[first[0].reference()], &[]).await.unwrap();
            let JournalOutcome::Journaled(third) = store.journal.journal_transaction(txn("t3"), vec![event(1, "!a")], NOW).await.unwrap() else {
                panic!("expected Journaled")
            };
            assert!(third.is_empty(), "a finished event is not journaled again");
            assert_eq!(store.journal.pending_count().await.unwrap(), 2);
        }

        #[tokio::test]
        async fn a_lease_is_exclusive_until_it_expires_then_taken_over() {
            use $crate::store::{Partition, StoreError};
            let (store, _guard) = $fresh;
            let minute = std::time::Duration::from_secs(60);
            let (p0, p1) = (Partition(0), Partition(1));
            let a = store.journal.claim("a", &[p0, p1], minute, NOW).await.unwrap();
            assert_eq!(a.partitions, [p0, p1]);
            assert_eq!(a.expires_ms, NOW + 60_000);
            // b gets nothing while a's lease lives, then takes the partitions over.
            let b = store.journal.claim("b", &[p0, p1], minute, NOW + 59_999).await.unwrap();
            assert!(b.partitions.is_empty(), "{b:?}");
            let b = store.journal.claim("b", &[p1], minute, NOW + 60_001).await.unwrap();
            assert_eq!(b.partitions, [p1]);
            // a's renewal keeps only what it still holds; b's release frees p1 for a again.
            let a = store.journal.renew(&a, minute, NOW + 60_002).await.unwrap();
            assert_eq!(a.partitions, [p0]);
            let lost = $crate::store::Lease { holder: "a".into(), partitions: vec![p1], expires_ms: 0 };
            assert!(matches!(store.journal.renew(&lost, minute, NOW + 60_003).await, Err(StoreError::Conflict(_))));
            store.journal.release(&b).await.unwrap();
            let a = store.journal.claim("a", &[p0, p1], minute, NOW + 60_004).await.unwrap();
            assert_eq!(a.partitions, [p0, p1]);
        }

        #[tokio::test]
        async fn a_holder_sees_and_finishes_only_its_partitions() {
            use $crate::store::{Partition, StoreError};
            let (store, _guard) = $fresh;
            let minute = std::time::Duration::from_secs(60);
            let mut n = 0;
            let (mine, theirs) = (room_in(Partition(3), &mut n), room_in(Partition(4), &mut n));
            let JournalOutcome::Journaled(journaled) = store
                .journal
                .journal_transaction(txn("t1"), vec![event(1, &mine), event(2, &theirs), event(3, &mine)], NOW)
                .await
                .unwrap()
            else {
                panic!("expected Journaled")
            };
            let a = store.journal.claim("a", &[Partition(3)], minute, NOW).await.unwrap();
            let b = store.journal.claim("b", &[Partition(4)], minute, NOW).await.unwrap();
            let seen: Vec<String> = store.journal.pending_events(&a, None, 1).await.unwrap().into_iter().map(|e| e.event_id.to_string()).collect();
            assert_eq!(seen, ["$ev1"], "a page holds the lease's events only");
            let seen: Vec<String> = store.journal.pending_events(&a, None, 10).await.unwrap().into_iter().map(|e| e.event_id.to_string()).collect();
            assert_eq!(seen, ["$ev1", "$ev3"]);
            // a cannot finish b's event, and a refused finish removes nothing.
            let refused = store.journal.finish_events(&a, &[journaled[0].reference(), journaled[1].reference()], &[]).await;
            assert!(matches!(refused, Err(StoreError::Conflict(_))), "{refused:?}");
            assert_eq!(store.journal.pending_count().await.unwrap(), 3);
            store.journal.finish_events(&b, &[journaled[1].reference()], &[]).await.unwrap();
            assert!(store.journal.pending_events(&b, None, 10).await.unwrap().is_empty());
            assert_eq!(store.journal.pending_count().await.unwrap(), 2);
        }

        #[tokio::test]
        async fn sent_parts_are_remembered_per_answer_across_reopening() {
            let (store, guard) = $fresh;
            let (a, b) = (ruma::EventId::parse("$a").unwrap(), ruma::EventId::parse("$b").unwrap());
            store.journal.record_sent_part("answer1", 1, &b, NOW).await.unwrap();
            store.journal.record_sent_part("answer1", 0, &a, NOW).await.unwrap();
            store.journal.record_sent_part("answer10", 0, &b, NOW).await.unwrap();
            let store = ($reopen)(store, &guard);
            assert_eq!(store.journal.sent_parts("answer1").await.unwrap(), vec![a.clone(), b.clone()]);
            assert_eq!(store.journal.sent_parts("answer10").await.unwrap(), vec![b]);
            assert!(store.journal.sent_parts("answer2").await.unwrap().is_empty());
            assert_eq!(store.journal.prune_dedupe_records(NOW + 1).await.unwrap(), 3);
            assert!(store.journal.sent_parts("answer1").await.unwrap().is_empty());
        }

        #[tokio::test]
        async fn finishing_writes_the_history_lines_of_the_events() {
            let (store, guard) = $fresh;
            let lease = all(&store).await;
            let JournalOutcome::Journaled(journaled) =
                store.journal.journal_transaction(txn("t1"), vec![event(1, "!a"), event(2, "!b")], NOW).await.unwrap()
            else {
                panic!("expected Journaled")
            };
            let line = |e: &$crate::store::JournaledEvent| HistoryEntry {
                event_id: e.event_id.clone(),
                sender: ruma::UserId::parse("@alice:x").unwrap(),
                body: format!("said {}", e.event_id),
                ts: 1,
                thread_root: None,
                routed_to: Vec::new(),
            };
            let lines: Vec<(ruma::OwnedRoomId, HistoryEntry)> =
                journaled.iter().map(|e| (e.room_id.clone(), line(e))).collect();
            let refs: Vec<$crate::store::EventRef> = journaled.iter().map(|e| e.reference()).collect();
            store.journal.finish_events(&lease, &refs, &lines).await.unwrap();
            assert_eq!(store.journal.pending_count().await.unwrap(), 0);
            let a = ruma::RoomId::parse("!a").unwrap();
            assert_eq!(store.history.recent_history(&a, 10).await.unwrap(), vec![lines[0].1.clone()]);
            let store = ($reopen)(store, &guard);
            let b = ruma::RoomId::parse("!b").unwrap();
            assert_eq!(store.history.recent_history(&b, 10).await.unwrap(), vec![lines[1].1.clone()]);
            assert_eq!(store.journal.pending_count().await.unwrap(), 0);
        }

        #[tokio::test]
        async fn the_journal_pages_in_order() {
            let (store, _guard) = $fresh;
            let lease = all(&store).await;
            for n in 0..7u32 {
                store.journal.journal_transaction(txn(&format!("t{n}")), vec![event(n, "!a")], NOW).await.unwrap();
            }
            let mut seen = Vec::new();
            let mut after = None;
            loop {
                let page = store.journal.pending_events(&lease, after, 3).await.unwrap();
                if page.is_empty() {
                    break;
                }
                assert!(page.len() <= 3);
                after = page.last().map(|e| e.seq);
                seen.extend(page.into_iter().map(|e| e.event_id.to_string()));
            }
            let expected: Vec<String> = (0..7).map(|n| format!("$ev{n}")).collect();
            assert_eq!(seen, expected);
        }

        #[tokio::test]
        async fn an_empty_transaction_is_still_recorded() {
            let (store, _guard) = $fresh;
            assert!(matches!(store.journal.journal_transaction(txn("t0"), vec![], NOW).await.unwrap(), JournalOutcome::Journaled(v) if v.is_empty()));
            assert!(matches!(store.journal.journal_transaction(txn("t0"), vec![], NOW).await.unwrap(), JournalOutcome::Duplicate));
        }

        #[tokio::test]
        async fn finishing_removes_from_the_journal_and_records_the_event() {
            let (store, _guard) = $fresh;
            let lease = all(&store).await;
            let JournalOutcome::Journaled(journaled) =
                store.journal.journal_transaction(txn("t1"), vec![event(1, "!a"), event(2, "!a")], NOW).await.unwrap()
            else {
                panic!("expected Journaled")
            };
            let ev1 = ruma::EventId::parse("$ev1").unwrap();
            assert!(store.journal.was_journaled(&ev1).await.unwrap());
            assert!(!store.journal.was_journaled(&ruma::EventId::parse("$never").unwrap()).await.unwrap());
            store.journal.finish_events(&lease, &[journaled[0].reference()], &[]).await.unwrap();
            assert!(store.journal.was_journaled(&ev1).await.unwrap());
            let pending = store.journal.pending_events(&lease, None, 100).await.unwrap();
            assert_eq!(pending.len(), 1);
            assert_eq!(pending[0].event_id.as_str(), "$ev2");
        }

        #[tokio::test]
        async fn state_survives_reopening() {
            let (store, guard) = $fresh;
            let lease = all(&store).await;
            let JournalOutcome::Journaled(journaled) =
                store.journal.journal_transaction(txn("t1"), vec![event(1, "!a"), event(2, "!a")], NOW).await.unwrap()
            else {
                panic!("expected Journaled")
            };
            let seqs: Vec<u64> = journaled.iter().map(|e| e.seq).collect();
            store.journal.finish_events(&lease, &[journaled[0].reference()], &[]).await.unwrap();
            let room = ruma::RoomId::parse("!a").unwrap();
            let entry = HistoryEntry {
                event_id: ruma::EventId::parse("$ev1").unwrap(),
                sender: ruma::UserId::parse("@alice:x").unwrap(),
                body: "hello".into(),
                ts: 1,
                thread_root: Some(ruma::EventId::parse("$root").unwrap()),
                routed_to: vec![$crate::config::AgentId::parse("damon").unwrap()],
            };
            store.history.append_history(&room, &entry).await.unwrap();
            let store = ($reopen)(store, &guard);
            let lease = all(&store).await;
            assert!(matches!(store.journal.journal_transaction(txn("t1"), vec![], NOW).await.unwrap(), JournalOutcome::Duplicate));
            assert!(store.journal.was_journaled(&ruma::EventId::parse("$ev1").unwrap()).await.unwrap());
            let pending = store.journal.pending_events(&lease, None, 100).await.unwrap();
            assert_eq!(pending.len(), 1);
            assert_eq!(pending[0].event_id.as_str(), "$ev2");
            assert_eq!(store.history.recent_history(&room, 10).await.unwrap(), vec![entry]);
            // New sequence numbers still sort after the ones journaled before reopening.
            let JournalOutcome::Journaled(later) = store.journal.journal_transaction(txn("t2"), vec![event(3, "!a")], NOW).await.unwrap() else {
                panic!("expected Journaled")
            };
            assert!(later[0].seq > seqs[1]);
        }

        #[tokio::test]
        async fn pruning_forgets_only_old_dedupe_records() {
            let (store, _guard) = $fresh;
            let lease = all(&store).await;
            let JournalOutcome::Journaled(journaled) = store.journal.journal_transaction(txn("t1"), vec![event(1, "!a")], NOW).await.unwrap()
            else {
                panic!("expected Journaled")
            };
            store.journal.finish_events(&lease, &[journaled[0].reference()], &[]).await.unwrap();
            let recorded_before = NOW.saturating_sub(3_600_000);
            assert_eq!(store.journal.prune_dedupe_records(recorded_before).await.unwrap(), 0);
            assert!(store.journal.was_journaled(&journaled[0].event_id).await.unwrap());
            assert_eq!(store.journal.prune_dedupe_records(NOW + 1).await.unwrap(), 2);
            assert!(!store.journal.was_journaled(&journaled[0].event_id).await.unwrap());
            assert!(matches!(store.journal.journal_transaction(txn("t1"), vec![], NOW).await.unwrap(), JournalOutcome::Journaled(_)));
        }
    };
}

/// The conformance tests of a backend's [`HistoryStore`]. Invoke with an expression that builds
/// fresh [`Stores`] (and a guard that keeps its directory) and a function that reopens them:
/// `history_conformance_tests!(fresh(), reopen);`
#[macro_export]
macro_rules! history_conformance_tests {
    ($fresh:expr, $reopen:expr) => {
        #[allow(unused_imports)]
        use $crate::store::conformance::*;
        #[allow(unused_imports)]
        use $crate::store::{HistoryEntry, JournalOutcome, PairedSender, SessionRole};

        #[tokio::test]
        async fn history_is_trimmed_to_its_retention_and_reads_agree_after_reopening() {
            let (store, guard) = $fresh;
            let room = ruma::RoomId::parse("!busy").unwrap();
            let total = $crate::store::HISTORY_PER_ROOM + 300;
            for n in 0..total {
                let entry = HistoryEntry {
                    event_id: ruma::EventId::parse(format!("$t{n}")).unwrap(),
                    sender: ruma::UserId::parse("@alice:x").unwrap(),
                    body: format!("line {n}"),
                    ts: n as u64,
                    thread_root: None,
                    routed_to: Vec::new(),
                };
                store.history.append_history(&room, &entry).await.unwrap();
                if n == 5 {
                    // Warm the cache early so later appends go through it.
                    assert_eq!(
                        store.history.recent_history(&room, 3).await.unwrap().len(),
                        3
                    );
                }
            }
            let cached: Vec<String> = store
                .history
                .recent_history(&room, 100)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.body)
                .collect();
            assert_eq!(cached.len(), 100);
            assert_eq!(cached.last().unwrap(), &format!("line {}", total - 1));
            let store = ($reopen)(store, &guard);
            let all = store
                .history
                .recent_history(&room, 10 * total)
                .await
                .unwrap();
            assert!(
                all.len() < total,
                "trimmed: {} of {total} lines kept",
                all.len()
            );
            assert!(all.len() >= $crate::store::HISTORY_PER_ROOM);
            let from_disk: Vec<String> = store
                .history
                .recent_history(&room, 100)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.body)
                .collect();
            assert_eq!(from_disk, cached);
        }

        #[tokio::test]
        async fn history_is_per_room_bounded_and_oldest_first() {
            let (store, _guard) = $fresh;
            let a = ruma::RoomId::parse("!a").unwrap();
            let b = ruma::RoomId::parse("!ab").unwrap();
            for n in 0..5u64 {
                let entry = HistoryEntry {
                    event_id: ruma::EventId::parse(format!("$h{n}")).unwrap(),
                    sender: ruma::UserId::parse("@alice:x").unwrap(),
                    body: format!("line {n}"),
                    ts: n,
                    thread_root: None,
                    routed_to: Vec::new(),
                };
                store.history.append_history(&a, &entry).await.unwrap();
            }
            store
                .history
                .append_history(
                    &b,
                    &HistoryEntry {
                        event_id: ruma::EventId::parse("$other").unwrap(),
                        sender: ruma::UserId::parse("@bob:x").unwrap(),
                        body: "elsewhere".into(),
                        ts: 9,
                        thread_root: None,
                        routed_to: Vec::new(),
                    },
                )
                .await
                .unwrap();
            let bodies: Vec<String> = store
                .history
                .recent_history(&a, 3)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.body)
                .collect();
            assert_eq!(bodies, ["line 2", "line 3", "line 4"]);
            assert_eq!(store.history.recent_history(&b, 3).await.unwrap().len(), 1);
            assert!(
                store
                    .history
                    .recent_history(&ruma::RoomId::parse("!none").unwrap(), 3)
                    .await
                    .unwrap()
                    .is_empty()
            );
        }
    };
}

/// The conformance tests of a backend's [`SessionStore`]. Invoke with an expression that builds
/// fresh [`Stores`] (and a guard that keeps its directory) and a function that reopens them:
/// `session_conformance_tests!(fresh(), reopen);`
#[macro_export]
macro_rules! session_conformance_tests {
    ($fresh:expr, $reopen:expr) => {
        #[allow(unused_imports)]
        use $crate::store::conformance::*;
        #[allow(unused_imports)]
        use $crate::store::{HistoryEntry, JournalOutcome, PairedSender, SessionRole};

        #[tokio::test]
        async fn sessions_are_separate_bounded_and_oldest_first() {
            let (store, _guard) = $fresh;
            for i in 0..5 {
                store
                    .sessions
                    .append_session(
                        &key("damon\u{1f}!a"),
                        &[
                            line(SessionRole::User, &format!("q{i}")),
                            line(SessionRole::Assistant, &format!("a{i}")),
                        ],
                        4,
                    )
                    .await
                    .unwrap();
            }
            store
                .sessions
                .append_session(
                    &key("damon\u{1f}!a\u{1f}$t"),
                    &[line(SessionRole::User, "in thread")],
                    4,
                )
                .await
                .unwrap();
            let contents: Vec<String> = store
                .sessions
                .session(&key("damon\u{1f}!a"))
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.content)
                .collect();
            assert_eq!(contents, ["q3", "a3", "q4", "a4"]);
            assert_eq!(
                store
                    .sessions
                    .session(&key("damon\u{1f}!a\u{1f}$t"))
                    .await
                    .unwrap()
                    .len(),
                1
            );
            assert!(
                store
                    .sessions
                    .session(&key("coder\u{1f}!a"))
                    .await
                    .unwrap()
                    .is_empty()
            );
        }

        #[tokio::test]
        async fn clearing_a_session_leaves_the_others_and_survives_reopening() {
            let (store, guard) = $fresh;
            {
                store
                    .sessions
                    .append_session(
                        &key("damon\u{1f}!a"),
                        &[
                            line(SessionRole::User, "one"),
                            line(SessionRole::Assistant, "two"),
                        ],
                        10,
                    )
                    .await
                    .unwrap();
                store
                    .sessions
                    .append_session(
                        &key("damon\u{1f}!a\u{1f}$t"),
                        &[line(SessionRole::User, "thread")],
                        10,
                    )
                    .await
                    .unwrap();
                store
                    .sessions
                    .append_session(
                        &key("coder\u{1f}!a"),
                        &[line(SessionRole::User, "other")],
                        10,
                    )
                    .await
                    .unwrap();
                assert_eq!(
                    store
                        .sessions
                        .clear_session(&key("damon\u{1f}!a"))
                        .await
                        .unwrap(),
                    2
                );
                assert_eq!(
                    store
                        .sessions
                        .clear_session(&key("damon\u{1f}!a"))
                        .await
                        .unwrap(),
                    0
                );
            }
            let store = ($reopen)(store, &guard);
            assert!(
                store
                    .sessions
                    .session(&key("damon\u{1f}!a"))
                    .await
                    .unwrap()
                    .is_empty()
            );
            assert_eq!(
                store
                    .sessions
                    .session(&key("damon\u{1f}!a\u{1f}$t"))
                    .await
                    .unwrap()[0]
                    .content,
                "thread"
            );
            assert_eq!(
                store.sessions.session(&key("coder\u{1f}!a")).await.unwrap()[0].content,
                "other"
            );
        }
    };
}

/// The conformance tests of a backend's [`PairingStore`]. Invoke with an expression that builds
/// fresh [`Stores`] (and a guard that keeps its directory) and a function that reopens them:
/// `pairing_conformance_tests!(fresh(), reopen);`
#[macro_export]
macro_rules! pairing_conformance_tests {
    ($fresh:expr, $reopen:expr) => {
        #[allow(unused_imports)]
        use $crate::store::conformance::*;
        #[allow(unused_imports)]
        use $crate::store::{HistoryEntry, JournalOutcome, PairedSender, SessionRole};

        #[tokio::test]
        async fn a_pairing_request_is_reused_while_live() {
            let (store, _guard) = $fresh;
            let (first, created) = store
                .pairing
                .pairing_request(&channel("matrix"), "@eve:x", T0, PAIRING_TTL)
                .await
                .unwrap();
            assert!(created);
            assert_pairing_code(&first.code);
            assert_eq!(
                (
                    first.channel.as_str(),
                    first.sender.as_str(),
                    first.created_ms
                ),
                ("matrix", "@eve:x", T0)
            );
            // Still live at exactly `ttl` old: the same request, not a new one.
            let (again, created) = store
                .pairing
                .pairing_request(
                    &channel("matrix"),
                    "@eve:x",
                    T0 + PAIRING_TTL_MS,
                    PAIRING_TTL,
                )
                .await
                .unwrap();
            assert!(!created);
            assert_eq!(again, first);
            assert_eq!(
                store
                    .pairing
                    .pending_pairings(T0 + 1, PAIRING_TTL)
                    .await
                    .unwrap(),
                vec![first]
            );
        }

        #[tokio::test]
        async fn each_sender_gets_its_own_code() {
            let (store, _guard) = $fresh;
            let mut codes = std::collections::HashSet::new();
            for n in 0..40 {
                let (request, created) = store
                    .pairing
                    .pairing_request(
                        &channel("matrix"),
                        &format!("@user{n}:x"),
                        T0 + n,
                        PAIRING_TTL,
                    )
                    .await
                    .unwrap();
                assert!(created);
                assert_pairing_code(&request.code);
                assert!(codes.insert(request.code), "codes must be unique");
            }
            // The same id on another channel is another person.
            let (other, created) = store
                .pairing
                .pairing_request(&channel("telegram"), "@user0:x", T0, PAIRING_TTL)
                .await
                .unwrap();
            assert!(created);
            assert!(!codes.contains(&other.code));
            assert_eq!(
                store
                    .pairing
                    .pending_pairings(T0 + 100, PAIRING_TTL)
                    .await
                    .unwrap()
                    .len(),
                41
            );
        }

        #[tokio::test]
        async fn an_expired_pairing_request_is_replaced() {
            let (store, _guard) = $fresh;
            let (old, _) = store
                .pairing
                .pairing_request(&channel("matrix"), "@eve:x", T0, PAIRING_TTL)
                .await
                .unwrap();
            let later = T0 + PAIRING_TTL_MS + 1;
            let (new, created) = store
                .pairing
                .pairing_request(&channel("matrix"), "@eve:x", later, PAIRING_TTL)
                .await
                .unwrap();
            assert!(created);
            assert_pairing_code(&new.code);
            assert_ne!(new.code, old.code);
            assert_eq!(new.created_ms, later);
            assert_eq!(
                store
                    .pairing
                    .pending_pairings(later, PAIRING_TTL)
                    .await
                    .unwrap(),
                vec![new.clone()]
            );
            // The old code is dead; the new one works.
            assert_eq!(
                store
                    .pairing
                    .approve_pairing(&old.code, later, PAIRING_TTL)
                    .await
                    .unwrap(),
                None
            );
            assert!(
                !store
                    .pairing
                    .is_paired(&channel("matrix"), "@eve:x")
                    .await
                    .unwrap()
            );
            assert_eq!(
                store
                    .pairing
                    .approve_pairing(&new.code, later, PAIRING_TTL)
                    .await
                    .unwrap(),
                Some(new)
            );
        }

        #[tokio::test]
        async fn approving_pairs_the_sender_once() {
            let (store, _guard) = $fresh;
            let (request, _) = store
                .pairing
                .pairing_request(&channel("matrix"), "@eve:x", T0, PAIRING_TTL)
                .await
                .unwrap();
            let (bystander, _) = store
                .pairing
                .pairing_request(&channel("matrix"), "@bob:x", T0, PAIRING_TTL)
                .await
                .unwrap();
            assert!(
                !store
                    .pairing
                    .is_paired(&channel("matrix"), "@eve:x")
                    .await
                    .unwrap()
            );
            // As an admin might type it: lower case, dashed, padded.
            let typed = format!(
                " {}-{} ",
                request.code[..4].to_lowercase(),
                request.code[4..].to_lowercase()
            );
            let approved = store
                .pairing
                .approve_pairing(&typed, T0 + 10, PAIRING_TTL)
                .await
                .unwrap();
            assert_eq!(approved, Some(request.clone()));
            assert!(
                store
                    .pairing
                    .is_paired(&channel("matrix"), "@eve:x")
                    .await
                    .unwrap()
            );
            assert!(
                !store
                    .pairing
                    .is_paired(&channel("matrix"), "@bob:x")
                    .await
                    .unwrap()
            );
            assert_eq!(
                store
                    .pairing
                    .pending_pairings(T0 + 10, PAIRING_TTL)
                    .await
                    .unwrap(),
                vec![bystander]
            );
            assert_eq!(
                store.pairing.paired_senders().await.unwrap(),
                vec![PairedSender {
                    channel: "matrix".into(),
                    sender: "@eve:x".into(),
                    approved_ms: T0 + 10
                }]
            );
            assert_eq!(
                store
                    .pairing
                    .approve_pairing(&request.code, T0 + 20, PAIRING_TTL)
                    .await
                    .unwrap(),
                None
            );
            assert_eq!(
                store.pairing.paired_senders().await.unwrap()[0].approved_ms,
                T0 + 10
            );
        }

        #[tokio::test]
        async fn an_unknown_or_expired_code_approves_nothing() {
            let (store, _guard) = $fresh;
            let (request, _) = store
                .pairing
                .pairing_request(&channel("matrix"), "@eve:x", T0, PAIRING_TTL)
                .await
                .unwrap();
            // A valid-looking code that differs from the issued one in its first character.
            let wrong: String = std::iter::once(if request.code.starts_with('A') {
                'B'
            } else {
                'A'
            })
            .chain(request.code.chars().skip(1))
            .collect();
            for code in [wrong.as_str(), "", "-", &request.code[..7]] {
                assert_eq!(
                    store
                        .pairing
                        .approve_pairing(code, T0, PAIRING_TTL)
                        .await
                        .unwrap(),
                    None,
                    "code {code:?}"
                );
            }
            assert_eq!(
                store
                    .pairing
                    .approve_pairing(&request.code, T0 + PAIRING_TTL_MS + 1, PAIRING_TTL)
                    .await
                    .unwrap(),
                None
            );
            assert!(
                !store
                    .pairing
                    .is_paired(&channel("matrix"), "@eve:x")
                    .await
                    .unwrap()
            );
            assert!(store.pairing.paired_senders().await.unwrap().is_empty());
            assert_eq!(
                store
                    .pairing
                    .pending_pairings(T0, PAIRING_TTL)
                    .await
                    .unwrap(),
                vec![request]
            );
        }

        #[tokio::test]
        async fn pending_pairings_are_live_and_oldest_first() {
            let (store, _guard) = $fresh;
            let (a, _) = store
                .pairing
                .pairing_request(&channel("matrix"), "@a:x", T0, PAIRING_TTL)
                .await
                .unwrap();
            let (b, _) = store
                .pairing
                .pairing_request(&channel("matrix"), "@b:x", T0 + 10, PAIRING_TTL)
                .await
                .unwrap();
            let (c, _) = store
                .pairing
                .pairing_request(&channel("telegram"), "42", T0 + 5, PAIRING_TTL)
                .await
                .unwrap();
            assert_eq!(
                store
                    .pairing
                    .pending_pairings(T0 + 10, PAIRING_TTL)
                    .await
                    .unwrap(),
                vec![a, c.clone(), b.clone()]
            );
            // `a` is now older than the ttl; `c` is exactly ttl old and still live.
            assert_eq!(
                store
                    .pairing
                    .pending_pairings(T0 + 5 + PAIRING_TTL_MS, PAIRING_TTL)
                    .await
                    .unwrap(),
                vec![c, b]
            );
            assert!(
                store
                    .pairing
                    .pending_pairings(T0 + 11 + PAIRING_TTL_MS, PAIRING_TTL)
                    .await
                    .unwrap()
                    .is_empty()
            );
        }

        #[tokio::test]
        async fn pairing_is_per_channel_and_ordered() {
            let (store, _guard) = $fresh;
            pair(&store, &channel("matrix"), "@z:x", T0).await;
            pair(&store, &channel("m"), "@b:x", T0 + 1).await;
            pair(&store, &channel("matrix"), "@a:x", T0 + 2).await;
            pair(&store, &channel("telegram"), "@a:x", T0 + 3).await;
            assert!(
                store
                    .pairing
                    .is_paired(&channel("matrix"), "@z:x")
                    .await
                    .unwrap()
            );
            assert!(
                !store
                    .pairing
                    .is_paired(&channel("telegram"), "@z:x")
                    .await
                    .unwrap()
            );
            assert!(
                !store
                    .pairing
                    .is_paired(&channel("m"), "@a:x")
                    .await
                    .unwrap()
            );
            assert!(
                !store
                    .pairing
                    .is_paired(&channel("matrix"), "@z")
                    .await
                    .unwrap()
            );
            let listed: Vec<(ChannelId, String)> = store
                .pairing
                .paired_senders()
                .await
                .unwrap()
                .into_iter()
                .map(|p| (p.channel, p.sender))
                .collect();
            let expected = [
                ("m", "@b:x"),
                ("matrix", "@a:x"),
                ("matrix", "@z:x"),
                ("telegram", "@a:x"),
            ];
            assert_eq!(listed, expected.map(|(c, s)| (channel(c), s.to_string())));
        }

        #[tokio::test]
        async fn revoking_forgets_an_approval() {
            let (store, _guard) = $fresh;
            pair(&store, &channel("matrix"), "@eve:x", T0).await;
            pair(&store, &channel("matrix"), "@bob:x", T0).await;
            assert!(
                !store
                    .pairing
                    .revoke_pairing(&channel("telegram"), "@eve:x")
                    .await
                    .unwrap()
            );
            assert!(
                store
                    .pairing
                    .revoke_pairing(&channel("matrix"), "@eve:x")
                    .await
                    .unwrap()
            );
            assert!(
                !store
                    .pairing
                    .is_paired(&channel("matrix"), "@eve:x")
                    .await
                    .unwrap()
            );
            assert!(
                !store
                    .pairing
                    .revoke_pairing(&channel("matrix"), "@eve:x")
                    .await
                    .unwrap()
            );
            let left: Vec<String> = store
                .pairing
                .paired_senders()
                .await
                .unwrap()
                .into_iter()
                .map(|p| p.sender)
                .collect();
            assert_eq!(left, ["@bob:x"]);
            // A revoked sender can pair again with a new request.
            let (request, created) = store
                .pairing
                .pairing_request(&channel("matrix"), "@eve:x", T0 + 1, PAIRING_TTL)
                .await
                .unwrap();
            assert!(created);
            assert!(
                store
                    .pairing
                    .approve_pairing(&request.code, T0 + 1, PAIRING_TTL)
                    .await
                    .unwrap()
                    .is_some()
            );
            assert!(
                store
                    .pairing
                    .is_paired(&channel("matrix"), "@eve:x")
                    .await
                    .unwrap()
            );
        }

        #[tokio::test]
        async fn pairings_survive_reopening() {
            let (store, guard) = $fresh;
            pair(&store, &channel("matrix"), "@eve:x", T0).await;
            let (waiting, _) = store
                .pairing
                .pairing_request(&channel("matrix"), "@bob:x", T0 + 1, PAIRING_TTL)
                .await
                .unwrap();
            let store = ($reopen)(store, &guard);
            assert!(
                store
                    .pairing
                    .is_paired(&channel("matrix"), "@eve:x")
                    .await
                    .unwrap()
            );
            assert_eq!(
                store.pairing.paired_senders().await.unwrap(),
                vec![PairedSender {
                    channel: "matrix".into(),
                    sender: "@eve:x".into(),
                    approved_ms: T0
                }]
            );
            assert_eq!(
                store
                    .pairing
                    .pending_pairings(T0 + 2, PAIRING_TTL)
                    .await
                    .unwrap(),
                vec![waiting.clone()]
            );
            let (again, created) = store
                .pairing
                .pairing_request(&channel("matrix"), "@bob:x", T0 + 2, PAIRING_TTL)
                .await
                .unwrap();
            assert!(!created);
            assert_eq!(again, waiting);
            assert_eq!(
                store
                    .pairing
                    .approve_pairing(&waiting.code, T0 + 3, PAIRING_TTL)
                    .await
                    .unwrap(),
                Some(waiting)
            );
            let store = ($reopen)(store, &guard);
            assert!(
                store
                    .pairing
                    .is_paired(&channel("matrix"), "@bob:x")
                    .await
                    .unwrap()
            );
            assert!(
                store
                    .pairing
                    .pending_pairings(T0 + 3, PAIRING_TTL)
                    .await
                    .unwrap()
                    .is_empty()
            );
        }
    };
}

/// Every concern's conformance tests, each in its own module.
#[macro_export]
macro_rules! store_conformance_tests {
    ($fresh:expr, $reopen:expr) => {
        mod journal {
            use super::*;
            $crate::journal_conformance_tests!($fresh, $reopen);
        }
        mod history {
            use super::*;
            $crate::history_conformance_tests!($fresh, $reopen);
        }
        mod sessions {
            use super::*;
            $crate::session_conformance_tests!($fresh, $reopen);
        }
        mod pairing {
            use super::*;
            $crate::pairing_conformance_tests!($fresh, $reopen);
        }
        mod tasks {
            use super::*;
            $crate::task_conformance_tests!($fresh, $reopen);
        }
        mod schedules {
            use super::*;
            $crate::schedule_conformance_tests!($fresh, $reopen);
        }
        mod monitors {
            use super::*;
            $crate::monitor_conformance_tests!($fresh, $reopen);
        }
        mod portals {
            use super::*;
            $crate::portal_conformance_tests!($fresh, $reopen);
        }
    };
}

/// [`MonitorStore`] conformance: states replace, survive a reopen and list by name.
#[doc(hidden)]
#[macro_export]
macro_rules! monitor_conformance_tests {
    ($fresh:expr, $reopen:expr) => {
        #[tokio::test]
        async fn monitor_states_replace_survive_a_reopen_and_list_by_name() {
            use $crate::store::MonitorState;
            use $crate::store::conformance::NOW;
            let (store, guard) = $fresh;
            assert_eq!(store.monitors.monitor_state("conduit").await.unwrap(), None);
            let failing = MonitorState {
                failures: 1,
                down_since_ms: Some(NOW),
                error: Some("HTTP 503 Service Unavailable".into()),
                ..Default::default()
            };
            store
                .monitors
                .save_monitor_state("conduit", &failing)
                .await
                .unwrap();
            let alerted = MonitorState {
                down: true,
                failures: 2,
                seq: 1,
                notified: 1,
                changed_ms: Some(NOW + 1),
                ..failing.clone()
            };
            store
                .monitors
                .save_monitor_state("conduit", &alerted)
                .await
                .unwrap();
            let up = MonitorState::default();
            store.monitors.save_monitor_state("pg", &up).await.unwrap();
            let store = $reopen(store, &guard);
            assert_eq!(
                store.monitors.monitor_state("conduit").await.unwrap(),
                Some(alerted.clone()),
                "the alerted outage survives a restart"
            );
            assert_eq!(
                store.monitors.monitor_states().await.unwrap(),
                vec![("conduit".to_owned(), alerted), ("pg".to_owned(), up)]
            );
        }
    };
}

/// [`PortalStore`] conformance: portals replace and survive a reopen; a bridged message is
/// recorded once, stays pending across a reopen, and is remembered once delivered.
#[doc(hidden)]
#[macro_export]
macro_rules! portal_conformance_tests {
    ($fresh:expr, $reopen:expr) => {
        #[tokio::test]
        async fn portals_replace_and_survive_a_reopen() {
            use $crate::config::ChannelId;
            use $crate::store::Portal;
            let (store, guard) = $fresh;
            let webhook = ChannelId::new("webhook");
            assert_eq!(
                store.portals.portal(&webhook, "shop", "c1").await.unwrap(),
                None
            );
            let first = Portal {
                platform: webhook.clone(),
                account: "shop".into(),
                chat: "c1".into(),
                room_id: ruma::owned_room_id!("!a:x"),
                name: "Orders".into(),
            };
            store.portals.save_portal(&first).await.unwrap();
            let renamed = Portal {
                name: "Orders (EU)".into(),
                ..first.clone()
            };
            store.portals.save_portal(&renamed).await.unwrap();
            let other = Portal {
                account: "support".into(),
                room_id: ruma::owned_room_id!("!b:x"),
                ..first.clone()
            };
            store.portals.save_portal(&other).await.unwrap();
            let store = $reopen(store, &guard);
            assert_eq!(
                store.portals.portal(&webhook, "shop", "c1").await.unwrap(),
                Some(renamed.clone())
            );
            assert_eq!(
                store
                    .portals
                    .portal(&ChannelId::new("telegram"), "shop", "c1")
                    .await
                    .unwrap(),
                None,
                "the same chat ID on another platform is another chat"
            );
            assert_eq!(store.portals.portals().await.unwrap(), vec![renamed, other]);
        }

        #[tokio::test]
        async fn a_bridged_message_is_recorded_once_and_stays_pending_until_delivered() {
            use $crate::store::BridgedState;
            let (store, guard) = $fresh;
            assert_eq!(
                store
                    .portals
                    .record_bridged("in/a/1", b"one")
                    .await
                    .unwrap(),
                None
            );
            assert_eq!(
                store
                    .portals
                    .record_bridged("in/a/1", b"again")
                    .await
                    .unwrap(),
                Some(BridgedState::Pending)
            );
            assert_eq!(
                store
                    .portals
                    .record_bridged("out/$e", b"two")
                    .await
                    .unwrap(),
                None
            );
            let store = $reopen(store, &guard);
            assert_eq!(
                store.portals.pending_bridged("in/").await.unwrap(),
                vec![("in/a/1".to_owned(), b"one".to_vec())],
                "the first payload is kept, and only the prefix's"
            );
            store.portals.finish_bridged("in/a/1").await.unwrap();
            let store = $reopen(store, &guard);
            assert!(
                store
                    .portals
                    .pending_bridged("in/")
                    .await
                    .unwrap()
                    .is_empty()
            );
            assert_eq!(
                store
                    .portals
                    .record_bridged("in/a/1", b"late")
                    .await
                    .unwrap(),
                Some(BridgedState::Delivered),
                "a redelivery after delivery is still recognised"
            );
            assert_eq!(store.portals.pending_bridged("").await.unwrap().len(), 1);
        }
    };
}

/// [`ScheduleStore`] conformance: states replace, survive a reopen, list by name and are
/// forgotten.
#[doc(hidden)]
#[macro_export]
macro_rules! schedule_conformance_tests {
    ($fresh:expr, $reopen:expr) => {
        #[tokio::test]
        async fn schedule_states_replace_survive_a_reopen_and_are_forgotten() {
            use $crate::store::conformance::NOW;
            use $crate::store::{RunOutcome, ScheduleState};
            let (store, guard) = $fresh;
            assert_eq!(
                store.schedules.schedule_state("morning").await.unwrap(),
                None
            );
            let planned = ScheduleState {
                next_run_ms: Some(NOW),
                timing: "every 30m".into(),
                ..Default::default()
            };
            store
                .schedules
                .save_schedule_state("morning", &planned)
                .await
                .unwrap();
            let running = ScheduleState {
                in_flight_ms: Some(NOW),
                ..planned.clone()
            };
            store
                .schedules
                .save_schedule_state("morning", &running)
                .await
                .unwrap();
            let failed = ScheduleState {
                last_run_ms: Some(NOW - 1),
                last_ended_ms: Some(NOW),
                last_outcome: Some(RunOutcome::Failed {
                    error: "no model".into(),
                }),
                failures: 3,
                paused: true,
                ..Default::default()
            };
            store
                .schedules
                .save_schedule_state("brief", &failed)
                .await
                .unwrap();
            let store = $reopen(store, &guard);
            assert_eq!(
                store.schedules.schedule_state("morning").await.unwrap(),
                Some(running.clone()),
                "the in-flight marker survives a restart"
            );
            assert_eq!(
                store.schedules.schedule_states().await.unwrap(),
                vec![
                    ("brief".to_owned(), failed),
                    ("morning".to_owned(), running)
                ]
            );
            assert!(
                store
                    .schedules
                    .remove_schedule_state("brief")
                    .await
                    .unwrap()
            );
            assert!(
                !store
                    .schedules
                    .remove_schedule_state("brief")
                    .await
                    .unwrap()
            );
            let store = $reopen(store, &guard);
            assert_eq!(store.schedules.schedule_state("brief").await.unwrap(), None);
            assert_eq!(store.schedules.schedule_states().await.unwrap().len(), 1);
        }
    };
}

/// [`TaskStore`] conformance: records replace, survive a reopen and are forgotten.
#[doc(hidden)]
#[macro_export]
macro_rules! task_conformance_tests {
    ($fresh:expr, $reopen:expr) => {
        #[tokio::test]
        async fn task_records_replace_survive_a_reopen_and_are_forgotten() {
            let (store, guard) = $fresh;
            assert_eq!(store.tasks.task("devteam:$a").await.unwrap(), None);
            store.tasks.save_task("devteam:$a", b"one").await.unwrap();
            store.tasks.save_task("devteam:$a", b"two").await.unwrap();
            store.tasks.save_task("devteam:$b", b"three").await.unwrap();
            let store = $reopen(store, &guard);
            assert_eq!(
                store.tasks.task("devteam:$a").await.unwrap().as_deref(),
                Some(&b"two"[..])
            );
            assert_eq!(
                store.tasks.tasks().await.unwrap(),
                vec![
                    ("devteam:$a".to_owned(), b"two".to_vec()),
                    ("devteam:$b".to_owned(), b"three".to_vec())
                ]
            );
            assert!(store.tasks.remove_task("devteam:$a").await.unwrap());
            assert!(!store.tasks.remove_task("devteam:$a").await.unwrap());
            let store = $reopen(store, &guard);
            assert_eq!(store.tasks.task("devteam:$a").await.unwrap(), None);
            assert_eq!(store.tasks.tasks().await.unwrap().len(), 1);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::{
        PAIRING_CODE_ALPHABET, PAIRING_CODE_LEN, PairedSender, PairingRequest, SessionKey,
        normalize_pairing_code, random_pairing_code,
    };
    use crate::config::{AgentId, ChannelId};

    #[test]
    fn pairing_records_are_the_json_earlier_versions_stored() {
        let stored = r#"{"code":"ABCDEFGH","channel":"telegram","sender":"42","created_ms":7}"#;
        let request: PairingRequest = serde_json::from_str(stored).unwrap();
        assert_eq!(request.channel, ChannelId::new("telegram"));
        assert_eq!(serde_json::to_string(&request).unwrap(), stored);
        let stored = r#"{"channel":"matrix","sender":"@eve:x","approved_ms":9}"#;
        let paired: PairedSender = serde_json::from_str(stored).unwrap();
        assert_eq!(paired.channel, ChannelId::MATRIX);
        assert_eq!(serde_json::to_string(&paired).unwrap(), stored);
    }

    #[test]
    fn session_storage_keys_keep_the_format_stores_were_written_with() {
        let damon = AgentId::parse("damon").unwrap();
        let room = ruma::owned_room_id!("!r:hs");
        let root = ruma::owned_event_id!("$root");
        assert_eq!(
            SessionKey::new(&damon, &room, None)
                .storage_key()
                .as_bytes(),
            b"damon\x1f!r:hs"
        );
        assert_eq!(
            SessionKey::new(&damon, &room, Some(&root))
                .storage_key()
                .as_bytes(),
            b"damon\x1f!r:hs\x1f$root"
        );
    }

    #[tokio::test]
    async fn pairing_codes_are_normalized_as_typed() {
        assert_eq!(normalize_pairing_code("abcd-efgh"), "ABCDEFGH");
        assert_eq!(normalize_pairing_code(" Ab Cd - 2345 "), "ABCD2345");
        assert_eq!(normalize_pairing_code("ABCDEFGH"), "ABCDEFGH");
        assert_eq!(normalize_pairing_code(" - "), "");
    }

    #[tokio::test]
    async fn random_pairing_codes_use_the_alphabet() {
        for _ in 0..200 {
            let code = random_pairing_code();
            assert_eq!(code.len(), PAIRING_CODE_LEN);
            assert!(
                code.chars().all(|c| PAIRING_CODE_ALPHABET.contains(c)),
                "{code}"
            );
        }
    }
}
