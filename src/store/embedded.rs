//! The embedded engines (fjall, sled) behind the async store traits.
//!
//! An engine implements the synchronous [`Backend`]: one process owns its directory, and
//! its calls are short, except the journal write that waits for the disk. [`Embedded`] turns
//! a backend into [`JournalStore`], [`HistoryStore`], [`SessionStore`] and [`PairingStore`]:
//! it runs the synced journal write on the blocking pool, keeps the newest history lines of
//! active rooms in memory, holds the partition leases (one process, so in memory), and heals
//! the backend after a failed write — an engine refuses every write after one failed for lack
//! of space, even once space is freed, so the next call after a failure reopens it from disk
//! and agentbus recovers without a restart.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use ruma::{EventId, OwnedEventId, OwnedRoomId, RoomId, TransactionId};

use super::lease::LeaseTable;
use super::{
    BridgedState, EventRef, HistoryEntry, HistoryStore, IncomingEvent, JournalOutcome,
    JournalStore, JournaledEvent, Lease, MonitorState, MonitorStore, PairedSender, PairingRequest,
    PairingStore, Partition, Portal, PortalStore, ScheduleState, ScheduleStore, SessionEntry,
    SessionKey, SessionStore, StoreError, TaskStore,
};
use crate::config::ChannelId;

/// A synchronous embedded engine; see the async traits for what each call means.
pub trait Backend: Send + Sync + 'static {
    fn journal_transaction(
        &self,
        txn_id: &str,
        events: Vec<IncomingEvent>,
        now_ms: u64,
    ) -> Result<JournalOutcome, StoreError>;
    /// Pending events of every partition.
    fn pending_events(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<JournaledEvent>, StoreError>;
    fn pending_of(&self, event_ids: &[OwnedEventId]) -> Result<Vec<JournaledEvent>, StoreError>;
    fn journal_head(&self) -> Result<Option<u64>, StoreError>;
    fn pending_count(&self) -> Result<usize, StoreError>;
    fn was_journaled(&self, event_id: &EventId) -> Result<bool, StoreError>;
    /// Removes `seqs` from the journal and appends `history`, atomically where the engine
    /// can.
    fn finish_events(
        &self,
        seqs: &[u64],
        history: &[(OwnedRoomId, HistoryEntry)],
    ) -> Result<(), StoreError>;
    fn prune_dedupe_records(&self, cutoff_ms: u64) -> Result<usize, StoreError>;
    fn record_sent_part(
        &self,
        answer: &str,
        part: usize,
        event_id: &EventId,
        now_ms: u64,
    ) -> Result<(), StoreError>;
    fn sent_parts(&self, answer: &str) -> Result<Vec<OwnedEventId>, StoreError>;
    fn append_session(
        &self,
        session: &str,
        entries: &[SessionEntry],
        keep: usize,
    ) -> Result<(), StoreError>;
    fn session(&self, session: &str) -> Result<Vec<SessionEntry>, StoreError>;
    fn clear_session(&self, session: &str) -> Result<usize, StoreError>;
    /// Appends a line; the backend trims the room to its retention from time to time.
    fn append_history(&self, room_id: &RoomId, entry: &HistoryEntry) -> Result<(), StoreError>;
    /// The last `limit` lines from disk, oldest first.
    fn read_history(&self, room_id: &RoomId, limit: usize)
    -> Result<Vec<HistoryEntry>, StoreError>;
    fn pairing_request(
        &self,
        channel: &ChannelId,
        sender: &str,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<(PairingRequest, bool), StoreError>;
    fn approve_pairing(
        &self,
        code: &str,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<Option<PairingRequest>, StoreError>;
    fn pending_pairings(
        &self,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<Vec<PairingRequest>, StoreError>;
    fn is_paired(&self, channel: &ChannelId, sender: &str) -> Result<bool, StoreError>;
    fn paired_senders(&self) -> Result<Vec<PairedSender>, StoreError>;
    fn revoke_pairing(&self, channel: &ChannelId, sender: &str) -> Result<bool, StoreError>;
    fn save_task(&self, id: &str, record: &[u8]) -> Result<(), StoreError>;
    fn task(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn remove_task(&self, id: &str) -> Result<bool, StoreError>;
    fn tasks(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    fn save_schedule(&self, name: &str, record: &[u8]) -> Result<(), StoreError>;
    fn schedule(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn remove_schedule(&self, name: &str) -> Result<bool, StoreError>;
    fn schedules(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    fn save_monitor(&self, name: &str, record: &[u8]) -> Result<(), StoreError>;
    fn monitor(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn monitors(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// The bridges' records (portals, bridged messages) by key.
    fn bridge_record(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn save_bridge_record(&self, key: &str, record: &[u8]) -> Result<(), StoreError>;
    /// Every bridge record whose key starts with `prefix`, in key order.
    fn bridge_records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
}

/// How a backend is opened (again).
type Opener<B> = Box<dyn Fn() -> Result<B, StoreError> + Send + Sync>;

/// An embedded backend behind the async store traits.
pub struct Embedded<B: Backend> {
    inner: RwLock<Option<Arc<B>>>,
    failed: AtomicBool,
    open: Opener<B>,
    leases: LeaseTable,
    recent: Mutex<RecentHistory>,
    /// Serialises the bridges' record-unless-recorded.
    bridged: Mutex<()>,
}

impl<B: Backend> Embedded<B> {
    /// Opens the backend with `open`, which is called again to reopen it after a failure.
    pub fn open(
        open: impl Fn() -> Result<B, StoreError> + Send + Sync + 'static,
    ) -> Result<Self, StoreError> {
        let backend = open()?;
        Ok(Self {
            inner: RwLock::new(Some(Arc::new(backend))),
            failed: AtomicBool::new(false),
            open: Box::new(open),
            leases: LeaseTable::default(),
            recent: Mutex::new(RecentHistory::default()),
            bridged: Mutex::new(()),
        })
    }

    /// Whether the last call failed.
    pub fn is_failing(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The backend to call, reopened first if the last call failed.
    fn backend(&self) -> Result<Arc<B>, StoreError> {
        if self.failed.load(Ordering::Acquire) {
            self.try_reopen();
        }
        self.inner
            .read()
            .expect("store lock")
            .clone()
            .ok_or_else(|| {
                StoreError::Unavailable("it could not be reopened after a failed write".into())
            })
    }

    /// Notes a failure, so the next call reopens the backend.
    fn note<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e @ StoreError::Unavailable(_)) = &result
            && !self.failed.swap(true, Ordering::AcqRel)
        {
            tracing::error!(error = %e, "store call failed (disk full?); it is reopened on the next call");
        }
        result
    }

    fn with<T>(&self, call: impl FnOnce(&B) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let backend = self.backend()?;
        let result = call(&backend);
        self.note(result)
    }

    fn try_reopen(&self) {
        let mut inner = self.inner.write().expect("store lock");
        if !self.failed.load(Ordering::Acquire) {
            return; // another caller reopened it meanwhile
        }
        // Every handle must go before the engine can take its lock again.
        drop(inner.take());
        match (self.open)() {
            Ok(backend) => {
                *inner = Some(Arc::new(backend));
                self.failed.store(false, Ordering::Release);
                tracing::info!("store reopened after a failure; writing again");
            }
            Err(e) => tracing::warn!(error = %e, "store still cannot be reopened"),
        }
    }

    #[cfg(test)]
    pub(crate) fn fail_once(&self) {
        let _ = self.note::<()>(Err(StoreError::Unavailable(
            "No space left on device".into(),
        )));
    }
}

#[async_trait]
impl<B: Backend> JournalStore for Embedded<B> {
    async fn journal_transaction(
        &self,
        txn_id: &TransactionId,
        events: Vec<IncomingEvent>,
        now_ms: u64,
    ) -> Result<JournalOutcome, StoreError> {
        let backend = self.backend()?;
        let txn_id = txn_id.to_string();
        // The write waits for the disk: keep it off the async workers.
        let result = tokio::task::spawn_blocking(move || {
            backend.journal_transaction(&txn_id, events, now_ms)
        })
        .await
        .unwrap_or_else(|e| {
            Err(StoreError::Unavailable(format!(
                "journal write aborted: {e}"
            )))
        });
        self.note(result)
    }

    async fn claim(
        &self,
        holder: &str,
        partitions: &[Partition],
        period: Duration,
        now_ms: u64,
    ) -> Result<Lease, StoreError> {
        Ok(self.leases.claim(holder, partitions, period, now_ms))
    }

    async fn renew(
        &self,
        lease: &Lease,
        period: Duration,
        now_ms: u64,
    ) -> Result<Lease, StoreError> {
        self.leases.renew(lease, period, now_ms)
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.leases.release(lease);
        Ok(())
    }

    async fn pending_events(
        &self,
        lease: &Lease,
        mut after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<JournaledEvent>, StoreError> {
        let mut events = Vec::new();
        while events.len() < limit {
            let page = self.with(|b| b.pending_events(after, limit))?;
            let Some(last) = page.last() else { break };
            after = Some(last.seq);
            let full = page.len() == limit;
            events.extend(
                page.into_iter()
                    .filter(|e| lease.holds(Partition::of(&e.room_id))),
            );
            if !full {
                break;
            }
        }
        events.truncate(limit);
        Ok(events)
    }

    async fn finish_events(
        &self,
        lease: &Lease,
        events: &[EventRef],
        history: &[(OwnedRoomId, HistoryEntry)],
    ) -> Result<(), StoreError> {
        for event in events {
            self.leases.check(lease, event.partition)?;
        }
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        let backend = self.backend()?;
        let lines = history.to_vec();
        // An engine may hold a write back while it flushes: keep that off the async workers.
        let result = tokio::task::spawn_blocking(move || backend.finish_events(&seqs, &lines))
            .await
            .unwrap_or_else(|e| {
                Err(StoreError::Unavailable(format!(
                    "finish write aborted: {e}"
                )))
            });
        self.note(result)?;
        let mut cache = self.recent.lock().expect("history cache lock");
        for (room_id, entry) in history {
            cache.push(room_id, entry);
        }
        Ok(())
    }

    async fn pending_of(
        &self,
        event_ids: &[OwnedEventId],
    ) -> Result<Vec<JournaledEvent>, StoreError> {
        self.with(|b| b.pending_of(event_ids))
    }

    fn is_writable(&self) -> bool {
        !self.is_failing()
    }

    async fn journal_head(&self) -> Result<Option<u64>, StoreError> {
        self.with(|b| b.journal_head())
    }

    async fn pending_count(&self) -> Result<usize, StoreError> {
        self.with(|b| b.pending_count())
    }

    async fn was_journaled(&self, event_id: &EventId) -> Result<bool, StoreError> {
        self.with(|b| b.was_journaled(event_id))
    }

    async fn prune_dedupe_records(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
        self.with(|b| b.prune_dedupe_records(cutoff_ms))
    }

    async fn record_sent_part(
        &self,
        answer: &str,
        part: usize,
        event_id: &EventId,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.with(|b| b.record_sent_part(answer, part, event_id, now_ms))
    }

    async fn sent_parts(&self, answer: &str) -> Result<Vec<OwnedEventId>, StoreError> {
        self.with(|b| b.sent_parts(answer))
    }
}

#[async_trait]
impl<B: Backend> HistoryStore for Embedded<B> {
    async fn append_history(
        &self,
        room_id: &RoomId,
        entry: &HistoryEntry,
    ) -> Result<(), StoreError> {
        self.with(|b| b.append_history(room_id, entry))?;
        self.recent
            .lock()
            .expect("history cache lock")
            .push(room_id, entry);
        Ok(())
    }

    async fn recent_history(
        &self,
        room_id: &RoomId,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        if limit <= CACHED_LINES
            && let Some(lines) = self
                .recent
                .lock()
                .expect("history cache lock")
                .get(room_id, limit)
        {
            return Ok(lines);
        }
        let read = self.with(|b| b.read_history(room_id, limit.max(CACHED_LINES)))?;
        self.recent
            .lock()
            .expect("history cache lock")
            .fill(room_id, &read);
        let skip = read.len().saturating_sub(limit);
        Ok(read[skip..].to_vec())
    }
}

#[async_trait]
impl<B: Backend> SessionStore for Embedded<B> {
    async fn append_session(
        &self,
        session: &SessionKey,
        entries: &[SessionEntry],
        keep: usize,
    ) -> Result<(), StoreError> {
        self.with(|b| b.append_session(&session.storage_key(), entries, keep))
    }

    async fn session(&self, session: &SessionKey) -> Result<Vec<SessionEntry>, StoreError> {
        self.with(|b| b.session(&session.storage_key()))
    }

    async fn clear_session(&self, session: &SessionKey) -> Result<usize, StoreError> {
        self.with(|b| b.clear_session(&session.storage_key()))
    }
}

#[async_trait]
impl<B: Backend> TaskStore for Embedded<B> {
    async fn save_task(&self, id: &str, record: &[u8]) -> Result<(), StoreError> {
        self.with(|b| b.save_task(id, record))
    }

    async fn task(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|b| b.task(id))
    }

    async fn remove_task(&self, id: &str) -> Result<bool, StoreError> {
        self.with(|b| b.remove_task(id))
    }

    async fn tasks(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.with(|b| b.tasks())
    }
}

fn decode_monitor(name: &str, bytes: &[u8]) -> Result<MonitorState, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("the state of health check {name}: {e}")))
}

#[async_trait]
impl<B: Backend> MonitorStore for Embedded<B> {
    async fn monitor_state(&self, name: &str) -> Result<Option<MonitorState>, StoreError> {
        self.with(|b| b.monitor(name))?
            .map(|bytes| decode_monitor(name, &bytes))
            .transpose()
    }

    async fn save_monitor_state(&self, name: &str, state: &MonitorState) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(state).map_err(|e| {
            StoreError::Unavailable(format!("cannot encode health check {name}: {e}"))
        })?;
        self.with(|b| b.save_monitor(name, &bytes))
    }

    async fn monitor_states(&self) -> Result<Vec<(String, MonitorState)>, StoreError> {
        self.with(|b| b.monitors())?
            .into_iter()
            .map(|(name, bytes)| {
                let state = decode_monitor(&name, &bytes)?;
                Ok((name, state))
            })
            .collect()
    }
}

/// The key of a portal's record: platform, account and chat, joined by U+001F.
fn portal_key(platform: &ChannelId, account: &str, chat: &str) -> String {
    format!("portal\u{1f}{platform}\u{1f}{account}\u{1f}{chat}")
}

/// A bridged message's record: a state byte (`p` pending, `d` delivered), then the payload.
fn bridged_key(key: &str) -> String {
    format!("msg\u{1f}{key}")
}

const PENDING: u8 = b'p';
const DELIVERED: u8 = b'd';

#[async_trait]
impl<B: Backend> PortalStore for Embedded<B> {
    async fn portal(
        &self,
        platform: &ChannelId,
        account: &str,
        chat: &str,
    ) -> Result<Option<Portal>, StoreError> {
        self.with(|b| b.bridge_record(&portal_key(platform, account, chat)))?
            .map(|bytes| {
                serde_json::from_slice(&bytes).map_err(|e| {
                    StoreError::Corrupt(format!("the portal of {platform} chat {chat}: {e}"))
                })
            })
            .transpose()
    }

    async fn save_portal(&self, portal: &Portal) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(portal)
            .map_err(|e| StoreError::Unavailable(format!("cannot encode a portal: {e}")))?;
        let key = portal_key(&portal.platform, &portal.account, &portal.chat);
        self.with(|b| b.save_bridge_record(&key, &bytes))
    }

    async fn portals(&self) -> Result<Vec<Portal>, StoreError> {
        self.with(|b| b.bridge_records("portal\u{1f}"))?
            .into_iter()
            .map(|(key, bytes)| {
                serde_json::from_slice(&bytes)
                    .map_err(|e| StoreError::Corrupt(format!("the portal {key:?}: {e}")))
            })
            .collect()
    }

    async fn record_bridged(
        &self,
        key: &str,
        payload: &[u8],
    ) -> Result<Option<BridgedState>, StoreError> {
        let stored = bridged_key(key);
        let _one_at_a_time = self.bridged.lock().expect("bridged lock");
        match self.with(|b| b.bridge_record(&stored))? {
            Some(record) if record.first() == Some(&DELIVERED) => Ok(Some(BridgedState::Delivered)),
            Some(_) => Ok(Some(BridgedState::Pending)),
            None => {
                let mut record = Vec::with_capacity(payload.len() + 1);
                record.push(PENDING);
                record.extend_from_slice(payload);
                self.with(|b| b.save_bridge_record(&stored, &record))?;
                Ok(None)
            }
        }
    }

    async fn finish_bridged(&self, key: &str) -> Result<(), StoreError> {
        self.with(|b| b.save_bridge_record(&bridged_key(key), &[DELIVERED]))
    }

    async fn pending_bridged(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let records = self.with(|b| b.bridge_records(&bridged_key(prefix)))?;
        Ok(records
            .into_iter()
            .filter(|(_, record)| record.first() == Some(&PENDING))
            .map(|(key, record)| {
                let key = key.strip_prefix("msg\u{1f}").unwrap_or(&key).to_owned();
                (key, record[1..].to_vec())
            })
            .collect())
    }
}

fn decode_schedule(name: &str, bytes: &[u8]) -> Result<ScheduleState, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("the state of scheduled task {name}: {e}")))
}

#[async_trait]
impl<B: Backend> ScheduleStore for Embedded<B> {
    async fn schedule_state(&self, name: &str) -> Result<Option<ScheduleState>, StoreError> {
        self.with(|b| b.schedule(name))?
            .map(|bytes| decode_schedule(name, &bytes))
            .transpose()
    }

    async fn save_schedule_state(
        &self,
        name: &str,
        state: &ScheduleState,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(state).map_err(|e| {
            StoreError::Unavailable(format!("cannot encode scheduled task {name}: {e}"))
        })?;
        self.with(|b| b.save_schedule(name, &bytes))
    }

    async fn schedule_states(&self) -> Result<Vec<(String, ScheduleState)>, StoreError> {
        self.with(|b| b.schedules())?
            .into_iter()
            .map(|(name, bytes)| {
                let state = decode_schedule(&name, &bytes)?;
                Ok((name, state))
            })
            .collect()
    }

    async fn remove_schedule_state(&self, name: &str) -> Result<bool, StoreError> {
        self.with(|b| b.remove_schedule(name))
    }
}

#[async_trait]
impl<B: Backend> PairingStore for Embedded<B> {
    async fn pairing_request(
        &self,
        channel: &ChannelId,
        sender: &str,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<(PairingRequest, bool), StoreError> {
        self.with(|b| b.pairing_request(channel, sender, now_ms, ttl))
    }

    async fn approve_pairing(
        &self,
        code: &str,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<Option<PairingRequest>, StoreError> {
        self.with(|b| b.approve_pairing(code, now_ms, ttl))
    }

    async fn pending_pairings(
        &self,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<Vec<PairingRequest>, StoreError> {
        self.with(|b| b.pending_pairings(now_ms, ttl))
    }

    async fn is_paired(&self, channel: &ChannelId, sender: &str) -> Result<bool, StoreError> {
        self.with(|b| b.is_paired(channel, sender))
    }

    async fn paired_senders(&self) -> Result<Vec<PairedSender>, StoreError> {
        self.with(|b| b.paired_senders())
    }

    async fn revoke_pairing(&self, channel: &ChannelId, sender: &str) -> Result<bool, StoreError> {
        self.with(|b| b.revoke_pairing(channel, sender))
    }
}

/// How many of a room's newest lines the in-memory cache keeps (routing reads 100 per
/// message; reading and parsing them from disk each time was most of a message's cost).
const CACHED_LINES: usize = 128;
/// How many rooms the cache holds before it forgets one.
const CACHED_ROOMS: usize = 4096;

/// The newest lines of recently active rooms, kept in step with every append.
#[derive(Default)]
struct RecentHistory {
    rooms: HashMap<OwnedRoomId, VecDeque<HistoryEntry>>,
}

impl RecentHistory {
    fn get(&self, room_id: &RoomId, limit: usize) -> Option<Vec<HistoryEntry>> {
        let lines = self.rooms.get(room_id)?;
        let skip = lines.len().saturating_sub(limit);
        Some(lines.iter().skip(skip).cloned().collect())
    }

    /// Caches what was read from disk (the newest lines, oldest first).
    fn fill(&mut self, room_id: &RoomId, lines: &[HistoryEntry]) {
        if self.rooms.len() >= CACHED_ROOMS
            && let Some(victim) = self.rooms.keys().next().cloned()
        {
            self.rooms.remove(&victim);
        }
        let skip = lines.len().saturating_sub(CACHED_LINES);
        self.rooms
            .insert(room_id.to_owned(), lines[skip..].iter().cloned().collect());
    }

    /// Appends to a cached room; an uncached room is read from disk when next asked.
    fn push(&mut self, room_id: &RoomId, entry: &HistoryEntry) {
        if let Some(lines) = self.rooms.get_mut(room_id) {
            lines.push_back(entry.clone());
            if lines.len() > CACHED_LINES {
                lines.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::store::FjallBackend;

    #[tokio::test]
    async fn a_failure_reopens_the_backend_on_the_next_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let opened = Arc::new(AtomicUsize::new(0));
        let store = Embedded::open({
            let opened = opened.clone();
            move || {
                opened.fetch_add(1, Ordering::SeqCst);
                FjallBackend::open(&path)
            }
        })
        .unwrap();
        let txn: &TransactionId = "t1".into();
        store.journal_transaction(txn, Vec::new(), 1).await.unwrap();
        // A call that fails marks the store failing; the next one reopens it from disk.
        store.fail_once();
        assert!(store.is_failing());
        assert!(matches!(
            store.journal_transaction(txn, Vec::new(), 2).await.unwrap(),
            JournalOutcome::Duplicate
        ));
        assert!(!store.is_failing());
        assert_eq!(
            opened.load(Ordering::SeqCst),
            2,
            "opened, then reopened once"
        );
    }

    #[tokio::test]
    async fn a_conflict_is_not_a_failure_of_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let store = Embedded::open(move || FjallBackend::open(&path)).unwrap();
        let minute = Duration::from_secs(60);
        let theirs = store.claim("b", &[Partition(1)], minute, 0).await.unwrap();
        let mine = store.claim("a", &[Partition(0)], minute, 0).await.unwrap();
        let event = EventRef {
            seq: 0,
            partition: Partition(1),
        };
        let refused = store.finish_events(&mine, &[event], &[]).await;
        assert!(
            matches!(refused, Err(StoreError::Conflict(_))),
            "{refused:?}"
        );
        assert!(!store.is_failing(), "a conflict does not reopen the store");
        store.finish_events(&theirs, &[event], &[]).await.unwrap();
    }
}
