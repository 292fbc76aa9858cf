//! A store that heals itself after a write failed for lack of space (or any other I/O
//! error): sled sets a sticky error flag after one failed write and refuses everything
//! from then on, even once space is freed. The next call after a failure reopens the
//! database from disk, so agentbus recovers by itself without a restart; while it cannot
//! reopen, every call fails with a clear error (the homeserver retries its transaction).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use ruma::{EventId, OwnedEventId, RoomId};

use super::{
    HistoryEntry, IncomingEvent, JournalOutcome, JournaledEvent, PairedSender, PairingRequest,
    SessionEntry, Store, StoreError,
};

/// How a [`Recovering`] store opens its backend again.
pub type Reopen = Box<dyn Fn() -> Result<Arc<dyn Store>, StoreError> + Send + Sync>;

/// A backend that is reopened after any failed call.
pub struct Recovering {
    inner: RwLock<Option<Arc<dyn Store>>>,
    failed: AtomicBool,
    reopen: Reopen,
}

impl Recovering {
    /// Wraps `store`, reopened with `reopen` after a failure.
    pub fn new(store: Arc<dyn Store>, reopen: Reopen) -> Self {
        Self {
            inner: RwLock::new(Some(store)),
            failed: AtomicBool::new(false),
            reopen,
        }
    }

    /// Whether the last call failed.
    #[cfg(test)]
    fn is_failing(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn with<T>(
        &self,
        call: impl FnOnce(&dyn Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.failed.load(Ordering::Acquire) {
            self.try_reopen();
        }
        let store = self
            .inner
            .read()
            .expect("store lock")
            .clone()
            .ok_or_else(|| {
                StoreError(
                    "store unavailable: it could not be reopened after a failed write".into(),
                )
            })?;
        let result = call(store.as_ref());
        if let Err(e) = &result
            && !self.failed.swap(true, Ordering::AcqRel)
        {
            tracing::error!(error = %e, "store call failed (disk full?); it is reopened on the next call");
        }
        result
    }

    fn try_reopen(&self) {
        let mut inner = self.inner.write().expect("store lock");
        if !self.failed.load(Ordering::Acquire) {
            return; // another caller reopened it meanwhile
        }
        // Every handle must go before sled can take its lock again.
        drop(inner.take());
        match (self.reopen)() {
            Ok(store) => {
                *inner = Some(store);
                self.failed.store(false, Ordering::Release);
                tracing::info!("store reopened after a failure; writing again");
            }
            Err(e) => tracing::warn!(error = %e, "store still cannot be reopened"),
        }
    }
}

impl Store for Recovering {
    fn journal_transaction(
        &self,
        txn_id: &str,
        events: Vec<IncomingEvent>,
    ) -> Result<JournalOutcome, StoreError> {
        self.with(|s| s.journal_transaction(txn_id, events))
    }
    fn pending_events(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<JournaledEvent>, StoreError> {
        self.with(|s| s.pending_events(after, limit))
    }
    fn journal_head(&self) -> Result<Option<u64>, StoreError> {
        self.with(|s| s.journal_head())
    }
    fn pending_count(&self) -> Result<usize, StoreError> {
        self.with(|s| s.pending_count())
    }
    fn was_journaled(&self, event_id: &EventId) -> Result<bool, StoreError> {
        self.with(|s| s.was_journaled(event_id))
    }
    fn finish_events(&self, seqs: &[u64]) -> Result<(), StoreError> {
        self.with(|s| s.finish_events(seqs))
    }
    fn prune_dedupe_records(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
        self.with(|s| s.prune_dedupe_records(cutoff_ms))
    }
    fn record_sent_part(
        &self,
        answer: &str,
        part: usize,
        event_id: &EventId,
    ) -> Result<(), StoreError> {
        self.with(|s| s.record_sent_part(answer, part, event_id))
    }
    fn sent_parts(&self, answer: &str) -> Result<Vec<OwnedEventId>, StoreError> {
        self.with(|s| s.sent_parts(answer))
    }
    fn append_session(
        &self,
        session: &str,
        entries: &[SessionEntry],
        keep: usize,
    ) -> Result<(), StoreError> {
        self.with(|s| s.append_session(session, entries, keep))
    }
    fn session(&self, session: &str) -> Result<Vec<SessionEntry>, StoreError> {
        self.with(|s| s.session(session))
    }
    fn clear_session(&self, session: &str) -> Result<usize, StoreError> {
        self.with(|s| s.clear_session(session))
    }
    fn append_history(&self, room_id: &RoomId, entry: &HistoryEntry) -> Result<(), StoreError> {
        self.with(|s| s.append_history(room_id, entry))
    }
    fn recent_history(
        &self,
        room_id: &RoomId,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        self.with(|s| s.recent_history(room_id, limit))
    }
    fn pairing_request(
        &self,
        channel: &str,
        sender: &str,
        now_ms: u64,
        ttl: std::time::Duration,
    ) -> Result<(PairingRequest, bool), StoreError> {
        self.with(|s| s.pairing_request(channel, sender, now_ms, ttl))
    }
    fn approve_pairing(
        &self,
        code: &str,
        now_ms: u64,
        ttl: std::time::Duration,
    ) -> Result<Option<PairingRequest>, StoreError> {
        self.with(|s| s.approve_pairing(code, now_ms, ttl))
    }
    fn pending_pairings(
        &self,
        now_ms: u64,
        ttl: std::time::Duration,
    ) -> Result<Vec<PairingRequest>, StoreError> {
        self.with(|s| s.pending_pairings(now_ms, ttl))
    }
    fn is_paired(&self, channel: &str, sender: &str) -> Result<bool, StoreError> {
        self.with(|s| s.is_paired(channel, sender))
    }
    fn paired_senders(&self) -> Result<Vec<PairedSender>, StoreError> {
        self.with(|s| s.paired_senders())
    }
    fn revoke_pairing(&self, channel: &str, sender: &str) -> Result<bool, StoreError> {
        self.with(|s| s.revoke_pairing(channel, sender))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    #[test]
    fn a_failure_reopens_the_backend_on_the_next_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let reopen: Reopen = {
            let (path, opened) = (path.clone(), opened.clone());
            Box::new(move || {
                opened.fetch_add(1, Ordering::SeqCst);
                Ok(Arc::new(SledStore::open(&path)?) as Arc<dyn Store>)
            })
        };
        let store = Recovering::new(Arc::new(SledStore::open(&path).unwrap()), reopen);
        store.journal_transaction("t1", Vec::new()).unwrap();
        // A call that fails marks the store failing; the next one reopens it.
        let failed: Result<(), StoreError> =
            store.with(|_| Err(StoreError("No space left on device".into())));
        assert!(failed.is_err());
        assert!(store.is_failing());
        assert!(matches!(
            store.journal_transaction("t1", Vec::new()).unwrap(),
            JournalOutcome::Duplicate
        ));
        assert!(!store.is_failing());
        assert_eq!(
            opened.load(Ordering::SeqCst),
            1,
            "reopened once, from disk, with its state"
        );
    }
}
