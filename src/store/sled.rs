//! The embedded sled backend of [`Store`].
//!
//! Trees: `txns` (txnId → unix ms), `journal` (seq, big-endian → [`JournaledEvent`] JSON),
//! `processed` (event_id → unix ms), `history` (room_id ‖ 0xFF ‖ seq → [`HistoryEntry`] JSON).
//! 0xFF never occurs in UTF-8, so a room's history is one contiguous prefix.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ::sled::transaction::{ConflictableTransactionError, TransactionError};
use ::sled::{Db, Transactional, Tree};
use ruma::{EventId, RoomId};

use super::{HistoryEntry, IncomingEvent, JournalOutcome, JournaledEvent, Store, StoreError};

/// sled-backed [`Store`]; one directory on disk.
pub struct SledStore {
    db: Db,
    txns: Tree,
    journal: Tree,
    processed: Tree,
    history: Tree,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = ::sled::Config::new()
            .path(dir)
            // Small writes, flushed explicitly on every journal: no need for a big cache.
            .cache_capacity(64 * 1024 * 1024)
            .open()
            .map_err(|e| StoreError(format!("cannot open sled store at {}: {e}", dir.display())))?;
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| StoreError(format!("cannot open tree {name}: {e}")))
        };
        Ok(Self {
            txns: tree("txns")?,
            journal: tree("journal")?,
            processed: tree("processed")?,
            history: tree("history")?,
            db,
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(|e| StoreError(format!("flush failed: {e}")))
    }
}

fn now_ms() -> [u8; 8] {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    ms.to_be_bytes()
}

fn history_key(room_id: &RoomId, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(room_id.as_str().len() + 9);
    key.extend_from_slice(room_id.as_bytes());
    key.push(0xFF);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

impl Store for SledStore {
    fn journal_transaction(
        &self,
        txn_id: &str,
        events: Vec<IncomingEvent>,
    ) -> Result<JournalOutcome, StoreError> {
        // Sequence numbers are taken before the transaction: sled may run the closure more
        // than once, and a gap in the sequence is harmless.
        let mut records = Vec::with_capacity(events.len());
        for event in events {
            let seq = self
                .db
                .generate_id()
                .map_err(|e| StoreError(format!("cannot allocate sequence: {e}")))?;
            let record = JournaledEvent {
                seq,
                room_id: event.room_id,
                event_id: event.event_id,
                json: event.json,
            };
            let bytes = serde_json::to_vec(&record)
                .map_err(|e| StoreError(format!("cannot encode event: {e}")))?;
            records.push((record, bytes));
        }
        let stamp = now_ms();
        let result = (&self.txns, &self.journal).transaction(|(txns, journal)| {
            if txns.get(txn_id.as_bytes())?.is_some() {
                return Err(ConflictableTransactionError::Abort(()));
            }
            txns.insert(txn_id.as_bytes(), &stamp)?;
            for (record, bytes) in &records {
                journal.insert(&record.seq.to_be_bytes(), bytes.as_slice())?;
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                self.flush()?;
                Ok(JournalOutcome::Journaled(
                    records.into_iter().map(|(record, _)| record).collect(),
                ))
            }
            Err(TransactionError::Abort(())) => Ok(JournalOutcome::Duplicate),
            Err(TransactionError::Storage(e)) => Err(StoreError(format!(
                "cannot journal transaction {txn_id}: {e}"
            ))),
        }
    }

    fn pending_events(&self) -> Result<Vec<JournaledEvent>, StoreError> {
        self.journal
            .iter()
            .map(|item| {
                let (_, value) =
                    item.map_err(|e| StoreError(format!("cannot read journal: {e}")))?;
                serde_json::from_slice(&value)
                    .map_err(|e| StoreError(format!("corrupt journal entry: {e}")))
            })
            .collect()
    }

    fn is_processed(&self, event_id: &EventId) -> Result<bool, StoreError> {
        self.processed
            .contains_key(event_id.as_bytes())
            .map_err(|e| StoreError(format!("cannot read processed events: {e}")))
    }

    fn finish_event(&self, seq: u64, event_id: &EventId) -> Result<(), StoreError> {
        let stamp = now_ms();
        (&self.journal, &self.processed)
            .transaction(|(journal, processed)| {
                journal.remove(&seq.to_be_bytes())?;
                processed.insert(event_id.as_bytes(), &stamp)?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| StoreError(format!("cannot finish event {event_id}: {e:?}")))?;
        self.flush()
    }

    fn prune_dedupe_records(&self, age: std::time::Duration) -> Result<usize, StoreError> {
        let cutoff = u64::from_be_bytes(now_ms()).saturating_sub(age.as_millis() as u64);
        let mut removed = 0;
        for tree in [&self.txns, &self.processed] {
            for item in tree.iter() {
                let (key, stamp) =
                    item.map_err(|e| StoreError(format!("cannot scan dedupe records: {e}")))?;
                let recorded = stamp
                    .as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                if recorded < cutoff {
                    tree.remove(key)
                        .map_err(|e| StoreError(format!("cannot prune dedupe records: {e}")))?;
                    removed += 1;
                }
            }
        }
        self.flush()?;
        Ok(removed)
    }

    fn append_history(&self, room_id: &RoomId, entry: &HistoryEntry) -> Result<(), StoreError> {
        let seq = self
            .db
            .generate_id()
            .map_err(|e| StoreError(format!("cannot allocate sequence: {e}")))?;
        let bytes = serde_json::to_vec(entry)
            .map_err(|e| StoreError(format!("cannot encode history: {e}")))?;
        self.history
            .insert(history_key(room_id, seq), bytes)
            .map_err(|e| StoreError(format!("cannot append history of {room_id}: {e}")))?;
        Ok(())
    }

    fn recent_history(
        &self,
        room_id: &RoomId,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let mut prefix = room_id.as_bytes().to_vec();
        prefix.push(0xFF);
        let mut entries = self
            .history
            .scan_prefix(prefix)
            .rev()
            .take(limit)
            .map(|item| {
                let (_, value) =
                    item.map_err(|e| StoreError(format!("cannot read history: {e}")))?;
                serde_json::from_slice(&value)
                    .map_err(|e| StoreError(format!("corrupt history entry: {e}")))
            })
            .collect::<Result<Vec<HistoryEntry>, _>>()?;
        entries.reverse();
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::SledStore;

    fn fresh() -> (SledStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (SledStore::open(dir.path()).unwrap(), dir)
    }

    fn reopen(store: SledStore, dir: &tempfile::TempDir) -> SledStore {
        drop(store);
        SledStore::open(dir.path()).unwrap()
    }

    crate::store_conformance_tests!(fresh(), reopen);
}
