//! The embedded sled [`Backend`](super::embedded::Backend).
//!
//! Trees: `txns` (txnId → unix ms), `journal` (seq, big-endian → [`JournaledEvent`] JSON),
//! `processed` (event_id → unix ms of journaling: the dedupe record of every event ever
//! journaled), `history` (room_id ‖ 0xFF ‖ seq → [`HistoryEntry`] JSON),
//! `pairing_requests` (channel ‖ 0xFF ‖ sender → [`PairingRequest`] JSON) and `paired`
//! (channel ‖ 0xFF ‖ sender → [`PairedSender`] JSON), `sessions` (session ‖ 0xFF ‖ seq →
//! [`SessionEntry`] JSON), `sent` (answer ‖ 0xFF ‖ part → unix ms ‖ event_id: the
//! messages an answer posted).
//! 0xFF never occurs in UTF-8, so a room's history is one contiguous prefix and a
//! (channel, sender) key is unambiguous.
//!
//! A code is found by scanning `pairing_requests`: it holds one entry per person waiting for
//! an admin, and expired entries are dropped whenever a new request is written.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use ::sled::transaction::{ConflictableTransactionError, TransactionError};
use ::sled::{Db, Transactional, Tree};
use ruma::{EventId, OwnedRoomId, RoomId};

use super::embedded::Backend;
use super::{
    HISTORY_PER_ROOM, HistoryEntry, IncomingEvent, JournalOutcome, JournaledEvent, PairedSender,
    PairingRequest, SessionEntry, StoreError, by_channel_then_sender, live_oldest_first,
    normalize_pairing_code, random_pairing_code,
};
use crate::config::ChannelId;

/// A sled database; one directory on disk.
pub struct SledBackend {
    db: Db,
    txns: Tree,
    journal: Tree,
    processed: Tree,
    history: Tree,
    pairing_requests: Tree,
    paired: Tree,
    sessions: Tree,
    sent: Tree,
    tasks: Tree,
    schedules: Tree,
    monitors: Tree,
    bridges: Tree,
}

/// How many times opening waits 20 ms for sled's file lock (five seconds in all: under load its
/// threads have been seen to hold it for over a second).
const LOCK_WAITS: u32 = 250;

impl SledBackend {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // sled makes its directory itself, with the umask's mode: make it private first.
        super::private::create_dir(dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create store directory {}: {e}",
                dir.display()
            ))
        })?;
        let config = ::sled::Config::new()
            .path(dir)
            // Small writes, flushed explicitly on every journal: no need for a big cache.
            .cache_capacity(64 * 1024 * 1024);
        // sled's background threads let go of the file lock a moment after the last handle
        // is dropped, so reopening right away (after a failed write, or in tests) can find
        // it still held: wait a little for it. Another process holding it still fails.
        let mut waits = LOCK_WAITS;
        let db = loop {
            match config.open() {
                // sled wraps the lock's EWOULDBLOCK in an error of its own words.
                Err(::sled::Error::Io(e))
                    if waits > 0
                        && (e.kind() == std::io::ErrorKind::WouldBlock
                            || e.to_string().contains("could not acquire lock")) =>
                {
                    waits -= 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => {
                    break other.map_err(|e| {
                        StoreError::Unavailable(format!(
                            "cannot open sled store at {}: {e}",
                            dir.display()
                        ))
                    })?;
                }
            }
        };
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| StoreError::Unavailable(format!("cannot open tree {name}: {e}")))
        };
        Ok(Self {
            txns: tree("txns")?,
            journal: tree("journal")?,
            processed: tree("processed")?,
            history: tree("history")?,
            pairing_requests: tree("pairing_requests")?,
            paired: tree("paired")?,
            sessions: tree("sessions")?,
            sent: tree("sent")?,
            tasks: tree("tasks")?,
            schedules: tree("schedules")?,
            monitors: tree("monitors")?,
            bridges: tree("bridges")?,
            db,
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(|e| StoreError::Unavailable(format!("flush failed: {e}")))
    }

    /// Every stored pairing request with its key, expired ones included.
    fn all_pairing_requests(&self) -> Result<Vec<(::sled::IVec, PairingRequest)>, StoreError> {
        self.pairing_requests
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(|e| {
                    StoreError::Unavailable(format!("cannot read pairing requests: {e}"))
                })?;
                Ok((key, decode_pairing_request(&value)?))
            })
            .collect()
    }
}

fn history_key(room_id: &RoomId, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(room_id.as_str().len() + 9);
    key.extend_from_slice(room_id.as_bytes());
    key.push(0xFF);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// session ‖ 0xFF: the prefix of one session's lines.
fn session_prefix(session: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(session.len() + 9);
    key.extend_from_slice(session.as_bytes());
    key.push(0xFF);
    key
}

/// channel ‖ 0xFF ‖ sender: the key of both pairing trees.
fn pairing_key(channel: &ChannelId, sender: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(channel.len() + 1 + sender.len());
    key.extend_from_slice(channel.as_bytes());
    key.push(0xFF);
    key.extend_from_slice(sender.as_bytes());
    key
}

fn decode_pairing_request(bytes: &[u8]) -> Result<PairingRequest, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("corrupt pairing request: {e}")))
}

fn encode<T: serde::Serialize>(value: &T, what: &str) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value)
        .map_err(|e| StoreError::Unavailable(format!("cannot encode {what}: {e}")))
}

/// A room's history is trimmed to [`HISTORY_PER_ROOM`] about once every this many appends.
const TRIM_EVERY: u64 = 64;

impl SledBackend {
    /// The last `limit` lines of a room's history from disk, oldest first.
    fn history_from_disk(
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
                    item.map_err(|e| StoreError::Unavailable(format!("cannot read history: {e}")))?;
                serde_json::from_slice(&value)
                    .map_err(|e| StoreError::Corrupt(format!("corrupt history entry: {e}")))
            })
            .collect::<Result<Vec<HistoryEntry>, _>>()?;
        entries.reverse();
        Ok(entries)
    }

    /// Forgets a room's lines beyond its newest [`HISTORY_PER_ROOM`].
    fn trim_history(&self, room_id: &RoomId) -> Result<(), StoreError> {
        let mut prefix = room_id.as_bytes().to_vec();
        prefix.push(0xFF);
        let keys: Vec<::sled::IVec> = self
            .history
            .scan_prefix(&prefix)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot read history of {room_id}: {e}"))
            })?;
        let excess = keys.len().saturating_sub(HISTORY_PER_ROOM);
        if excess == 0 {
            return Ok(());
        }
        let mut batch = ::sled::Batch::default();
        for key in &keys[..excess] {
            batch.remove(key.clone());
        }
        self.history
            .apply_batch(batch)
            .map_err(|e| StoreError::Unavailable(format!("cannot trim history of {room_id}: {e}")))
    }
}

impl Backend for SledBackend {
    fn journal_transaction(
        &self,
        txn_id: &str,
        events: Vec<IncomingEvent>,
        now_ms: u64,
    ) -> Result<JournalOutcome, StoreError> {
        // Sequence numbers are taken before the transaction: sled may run the closure more
        // than once, and a gap in the sequence is harmless.
        let mut records = Vec::with_capacity(events.len());
        for event in events {
            let seq = self
                .db
                .generate_id()
                .map_err(|e| StoreError::Unavailable(format!("cannot allocate sequence: {e}")))?;
            let record = JournaledEvent {
                seq,
                room_id: event.room_id,
                event_id: event.event_id,
                json: event.json,
            };
            let bytes = serde_json::to_vec(&record)
                .map_err(|e| StoreError::Unavailable(format!("cannot encode event: {e}")))?;
            records.push((record, bytes));
        }
        let stamp = now_ms.to_be_bytes();
        let result = (&self.txns, &self.journal, &self.processed).transaction(
            |(txns, journal, processed)| {
                if txns.get(txn_id.as_bytes())?.is_some() {
                    return Err(ConflictableTransactionError::Abort(()));
                }
                txns.insert(txn_id.as_bytes(), &stamp)?;
                // `processed` is the dedupe record of every event_id ever journaled; a
                // copy (the same event twice in one transaction, or again in another) is
                // left out here, so nothing downstream can see it twice.
                let mut kept = Vec::with_capacity(records.len());
                for (i, (record, bytes)) in records.iter().enumerate() {
                    if processed.get(record.event_id.as_bytes())?.is_some() {
                        continue;
                    }
                    processed.insert(record.event_id.as_bytes(), &stamp)?;
                    journal.insert(&record.seq.to_be_bytes(), bytes.as_slice())?;
                    kept.push(i);
                }
                Ok(kept)
            },
        );
        match result {
            Ok(kept) => {
                self.flush()?;
                let mut records: Vec<Option<JournaledEvent>> =
                    records.into_iter().map(|(r, _)| Some(r)).collect();
                Ok(JournalOutcome::Journaled(
                    kept.into_iter().filter_map(|i| records[i].take()).collect(),
                ))
            }
            Err(TransactionError::Abort(())) => Ok(JournalOutcome::Duplicate),
            Err(TransactionError::Storage(e)) => Err(StoreError::Unavailable(format!(
                "cannot journal transaction {txn_id}: {e}"
            ))),
        }
    }

    fn pending_events(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<JournaledEvent>, StoreError> {
        let range = match after {
            Some(seq) => self.journal.range((seq.saturating_add(1)).to_be_bytes()..),
            None => self.journal.iter(),
        };
        range
            .take(limit)
            .map(|item| {
                let (_, value) =
                    item.map_err(|e| StoreError::Unavailable(format!("cannot read journal: {e}")))?;
                serde_json::from_slice(&value)
                    .map_err(|e| StoreError::Corrupt(format!("corrupt journal entry: {e}")))
            })
            .collect()
    }

    fn pending_of(
        &self,
        _event_ids: &[ruma::OwnedEventId],
    ) -> Result<Vec<JournaledEvent>, StoreError> {
        // sled's journal write is one transaction: a refused one was not written.
        Ok(Vec::new())
    }

    fn journal_head(&self) -> Result<Option<u64>, StoreError> {
        let last = self
            .journal
            .last()
            .map_err(|e| StoreError::Unavailable(format!("cannot read journal: {e}")))?;
        Ok(last.and_then(|(key, _)| key.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    fn pending_count(&self) -> Result<usize, StoreError> {
        Ok(self.journal.len())
    }

    fn was_journaled(&self, event_id: &EventId) -> Result<bool, StoreError> {
        self.processed
            .contains_key(event_id.as_bytes())
            .map_err(|e| StoreError::Unavailable(format!("cannot read processed events: {e}")))
    }

    fn finish_events(
        &self,
        seqs: &[u64],
        history: &[(OwnedRoomId, HistoryEntry)],
    ) -> Result<(), StoreError> {
        // sled batches one tree at a time: the lines go first, so a crash in between
        // repeats a line rather than losing one.
        for (room_id, entry) in history {
            self.append_history(room_id, entry)?;
        }
        let mut batch = ::sled::Batch::default();
        for seq in seqs {
            batch.remove(&seq.to_be_bytes());
        }
        self.journal.apply_batch(batch).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot finish {} journaled events: {e}",
                seqs.len()
            ))
        })
    }

    fn prune_dedupe_records(&self, cutoff: u64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for tree in [&self.txns, &self.processed, &self.sent] {
            for item in tree.iter() {
                let (key, stamp) = item.map_err(|e| {
                    StoreError::Unavailable(format!("cannot scan dedupe records: {e}"))
                })?;
                // Every record here starts with the unix ms it was written at.
                let recorded = stamp
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                if recorded < cutoff {
                    tree.remove(key).map_err(|e| {
                        StoreError::Unavailable(format!("cannot prune dedupe records: {e}"))
                    })?;
                    removed += 1;
                }
            }
        }
        self.flush()?;
        Ok(removed)
    }

    fn record_sent_part(
        &self,
        answer: &str,
        part: usize,
        event_id: &EventId,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut key = session_prefix(answer);
        key.extend_from_slice(&(part as u32).to_be_bytes());
        let mut value = now_ms.to_be_bytes().to_vec();
        value.extend_from_slice(event_id.as_bytes());
        self.sent
            .insert(key, value)
            .map_err(|e| StoreError::Unavailable(format!("cannot record a sent message: {e}")))?;
        self.flush()
    }

    fn sent_parts(&self, answer: &str) -> Result<Vec<ruma::OwnedEventId>, StoreError> {
        self.sent
            .scan_prefix(session_prefix(answer))
            .values()
            .map(|value| {
                let value = value.map_err(|e| {
                    StoreError::Unavailable(format!("cannot read sent messages: {e}"))
                })?;
                let id = std::str::from_utf8(value.get(8..).unwrap_or_default())
                    .ok()
                    .and_then(|s| EventId::parse(s).ok())
                    .ok_or_else(|| StoreError::Corrupt("corrupt sent-message record".into()))?;
                Ok(id)
            })
            .collect()
    }

    fn append_session(
        &self,
        session: &str,
        entries: &[SessionEntry],
        keep: usize,
    ) -> Result<(), StoreError> {
        let prefix = session_prefix(session);
        let mut batch = ::sled::Batch::default();
        for entry in entries {
            let seq = self
                .db
                .generate_id()
                .map_err(|e| StoreError::Unavailable(format!("cannot allocate sequence: {e}")))?;
            let mut key = prefix.clone();
            key.extend_from_slice(&seq.to_be_bytes());
            let bytes = serde_json::to_vec(entry)
                .map_err(|e| StoreError::Unavailable(format!("cannot encode session line: {e}")))?;
            batch.insert(key, bytes);
        }
        self.sessions
            .apply_batch(batch)
            .map_err(|e| StoreError::Unavailable(format!("cannot append to session: {e}")))?;
        // Forget the oldest lines beyond `keep`.
        let keys: Vec<::sled::IVec> = self
            .sessions
            .scan_prefix(&prefix)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::Unavailable(format!("cannot read session: {e}")))?;
        if keys.len() > keep {
            let mut batch = ::sled::Batch::default();
            for key in &keys[..keys.len() - keep] {
                batch.remove(key);
            }
            self.sessions
                .apply_batch(batch)
                .map_err(|e| StoreError::Unavailable(format!("cannot trim session: {e}")))?;
        }
        Ok(())
    }

    fn session(&self, session: &str) -> Result<Vec<SessionEntry>, StoreError> {
        self.sessions
            .scan_prefix(session_prefix(session))
            .values()
            .map(|value| {
                let value = value
                    .map_err(|e| StoreError::Unavailable(format!("cannot read session: {e}")))?;
                serde_json::from_slice(&value)
                    .map_err(|e| StoreError::Corrupt(format!("corrupt session line: {e}")))
            })
            .collect()
    }

    fn clear_session(&self, session: &str) -> Result<usize, StoreError> {
        let mut batch = ::sled::Batch::default();
        let mut removed = 0;
        for key in self.sessions.scan_prefix(session_prefix(session)).keys() {
            batch.remove(
                key.map_err(|e| StoreError::Unavailable(format!("cannot read session: {e}")))?,
            );
            removed += 1;
        }
        self.sessions
            .apply_batch(batch)
            .map_err(|e| StoreError::Unavailable(format!("cannot clear session: {e}")))?;
        self.flush()?;
        Ok(removed)
    }

    fn append_history(&self, room_id: &RoomId, entry: &HistoryEntry) -> Result<(), StoreError> {
        let seq = self
            .db
            .generate_id()
            .map_err(|e| StoreError::Unavailable(format!("cannot allocate sequence: {e}")))?;
        let bytes = serde_json::to_vec(entry)
            .map_err(|e| StoreError::Unavailable(format!("cannot encode history: {e}")))?;
        self.history
            .insert(history_key(room_id, seq), bytes)
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot append history of {room_id}: {e}"))
            })?;
        if seq % TRIM_EVERY == 0 {
            self.trim_history(room_id)?;
        }
        Ok(())
    }

    fn read_history(
        &self,
        room_id: &RoomId,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        self.history_from_disk(room_id, limit)
    }

    fn pairing_request(
        &self,
        channel: &ChannelId,
        sender: &str,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<(PairingRequest, bool), StoreError> {
        let key = pairing_key(channel, sender);
        let existing = self
            .pairing_requests
            .get(&key)
            .map_err(|e| StoreError::Unavailable(format!("cannot read pairing requests: {e}")))?;
        if let Some(bytes) = existing {
            let request = decode_pairing_request(&bytes)?;
            if request.is_live(now_ms, ttl) {
                return Ok((request, false));
            }
        }
        // A new code must differ from every stored one: live codes must stay unique, and
        // never reusing an expired code keeps a stale code from approving someone else.
        let stored = self.all_pairing_requests()?;
        let taken: HashSet<&str> = stored.iter().map(|(_, r)| r.code.as_str()).collect();
        let code = loop {
            let code = random_pairing_code();
            if !taken.contains(code.as_str()) {
                break code;
            }
        };
        let expired: Vec<&[u8]> = stored
            .iter()
            .filter(|(k, r)| !r.is_live(now_ms, ttl) && k.as_ref() != key.as_slice())
            .map(|(k, _)| k.as_ref())
            .collect();
        let request = PairingRequest {
            code,
            channel: channel.clone(),
            sender: sender.to_owned(),
            created_ms: now_ms,
        };
        let bytes = encode(&request, "pairing request")?;
        // Another caller may have issued a request for this sender since the read above:
        // re-check inside the transaction and keep theirs if it is live.
        let outcome = self
            .pairing_requests
            .transaction(|tree| {
                if let Some(current) = tree.get(&key)? {
                    let current = decode_pairing_request(&current)
                        .map_err(ConflictableTransactionError::Abort)?;
                    if current.is_live(now_ms, ttl) {
                        return Ok(Some(current));
                    }
                }
                for old in &expired {
                    // Only drop it if nobody replaced it meanwhile.
                    if let Some(current) = tree.get(old)? {
                        let current = decode_pairing_request(&current)
                            .map_err(ConflictableTransactionError::Abort)?;
                        if !current.is_live(now_ms, ttl) {
                            tree.remove(*old)?;
                        }
                    }
                }
                tree.insert(key.as_slice(), bytes.as_slice())?;
                Ok(None)
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => StoreError::Unavailable(format!(
                    "cannot issue pairing code for {sender} on {channel}: {e}"
                )),
            })?;
        match outcome {
            Some(current) => Ok((current, false)),
            None => {
                self.flush()?;
                Ok((request, true))
            }
        }
    }

    fn approve_pairing(
        &self,
        code: &str,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<Option<PairingRequest>, StoreError> {
        let code = normalize_pairing_code(code);
        if code.is_empty() {
            return Ok(None);
        }
        let Some((key, request)) = self
            .all_pairing_requests()?
            .into_iter()
            .find(|(_, r)| r.code == code && r.is_live(now_ms, ttl))
        else {
            return Ok(None);
        };
        let paired = encode(
            &PairedSender {
                channel: request.channel.clone(),
                sender: request.sender.clone(),
                approved_ms: now_ms,
            },
            "paired sender",
        )?;
        // The request may have been approved or replaced since the scan: approve only if the
        // same live code is still there.
        let approved = (&self.pairing_requests, &self.paired)
            .transaction(|(requests, paired_tree)| {
                let Some(current) = requests.get(&key)? else {
                    return Ok(false);
                };
                let current = decode_pairing_request(&current)
                    .map_err(ConflictableTransactionError::Abort)?;
                if current.code != code || !current.is_live(now_ms, ttl) {
                    return Ok(false);
                }
                requests.remove(&key)?;
                paired_tree.insert(&key, paired.as_slice())?;
                Ok(true)
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => {
                    StoreError::Unavailable(format!("cannot approve pairing code {code}: {e}"))
                }
            })?;
        if !approved {
            return Ok(None);
        }
        self.flush()?;
        Ok(Some(request))
    }

    fn pending_pairings(
        &self,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<Vec<PairingRequest>, StoreError> {
        Ok(live_oldest_first(
            self.all_pairing_requests()?.into_iter().map(|(_, r)| r),
            now_ms,
            ttl,
        ))
    }

    fn is_paired(&self, channel: &ChannelId, sender: &str) -> Result<bool, StoreError> {
        self.paired
            .contains_key(pairing_key(channel, sender))
            .map_err(|e| StoreError::Unavailable(format!("cannot read paired senders: {e}")))
    }

    fn paired_senders(&self) -> Result<Vec<PairedSender>, StoreError> {
        let senders = self
            .paired
            .iter()
            .map(|item| {
                let (_, value) = item.map_err(|e| {
                    StoreError::Unavailable(format!("cannot read paired senders: {e}"))
                })?;
                serde_json::from_slice(&value)
                    .map_err(|e| StoreError::Corrupt(format!("corrupt paired sender: {e}")))
            })
            .collect::<Result<Vec<PairedSender>, _>>()?;
        Ok(by_channel_then_sender(senders))
    }

    fn revoke_pairing(&self, channel: &ChannelId, sender: &str) -> Result<bool, StoreError> {
        let removed = self
            .paired
            .remove(pairing_key(channel, sender))
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot revoke pairing of {sender} on {channel}: {e}"
                ))
            })?;
        if removed.is_some() {
            self.flush()?;
        }
        Ok(removed.is_some())
    }

    fn save_task(&self, id: &str, record: &[u8]) -> Result<(), StoreError> {
        self.tasks
            .insert(id.as_bytes(), record)
            .map_err(|e| StoreError::Unavailable(format!("cannot save task {id}: {e}")))?;
        self.flush()
    }

    fn task(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.tasks
            .get(id.as_bytes())
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| StoreError::Unavailable(format!("cannot read task {id}: {e}")))
    }

    fn remove_task(&self, id: &str) -> Result<bool, StoreError> {
        let removed = self
            .tasks
            .remove(id.as_bytes())
            .map_err(|e| StoreError::Unavailable(format!("cannot remove task {id}: {e}")))?;
        if removed.is_some() {
            self.flush()?;
        }
        Ok(removed.is_some())
    }

    fn tasks(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.tasks
            .iter()
            .map(|item| {
                let (key, value) =
                    item.map_err(|e| StoreError::Unavailable(format!("cannot read tasks: {e}")))?;
                let id = String::from_utf8(key.to_vec())
                    .map_err(|_| StoreError::Corrupt("a task ID is not UTF-8".into()))?;
                Ok((id, value.to_vec()))
            })
            .collect()
    }

    fn save_schedule(&self, name: &str, record: &[u8]) -> Result<(), StoreError> {
        self.schedules
            .insert(name.as_bytes(), record)
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot save scheduled task {name}: {e}"))
            })?;
        self.flush()
    }

    fn schedule(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.schedules
            .get(name.as_bytes())
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| StoreError::Unavailable(format!("cannot read scheduled task {name}: {e}")))
    }

    fn remove_schedule(&self, name: &str) -> Result<bool, StoreError> {
        let removed = self.schedules.remove(name.as_bytes()).map_err(|e| {
            StoreError::Unavailable(format!("cannot remove scheduled task {name}: {e}"))
        })?;
        if removed.is_some() {
            self.flush()?;
        }
        Ok(removed.is_some())
    }

    fn schedules(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.schedules
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(|e| {
                    StoreError::Unavailable(format!("cannot read scheduled tasks: {e}"))
                })?;
                let name = String::from_utf8(key.to_vec()).map_err(|_| {
                    StoreError::Corrupt("a scheduled task's name is not UTF-8".into())
                })?;
                Ok((name, value.to_vec()))
            })
            .collect()
    }

    fn save_monitor(&self, name: &str, record: &[u8]) -> Result<(), StoreError> {
        self.monitors.insert(name.as_bytes(), record).map_err(|e| {
            StoreError::Unavailable(format!("cannot save health check {name}: {e}"))
        })?;
        self.flush()
    }

    fn monitor(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.monitors
            .get(name.as_bytes())
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| StoreError::Unavailable(format!("cannot read health check {name}: {e}")))
    }

    fn monitors(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.monitors
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(|e| {
                    StoreError::Unavailable(format!("cannot read health checks: {e}"))
                })?;
                let name = String::from_utf8(key.to_vec()).map_err(|_| {
                    StoreError::Corrupt("a health check's name is not UTF-8".into())
                })?;
                Ok((name, value.to_vec()))
            })
            .collect()
    }

    fn bridge_record(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.bridges
            .get(key.as_bytes())
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| StoreError::Unavailable(format!("cannot read the bridges' records: {e}")))
    }

    fn save_bridge_record(&self, key: &str, record: &[u8]) -> Result<(), StoreError> {
        self.bridges
            .insert(key.as_bytes(), record)
            .map_err(|e| StoreError::Unavailable(format!("cannot save a bridge record: {e}")))?;
        self.flush()
    }

    fn bridge_records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.bridges
            .scan_prefix(prefix.as_bytes())
            .map(|item| {
                let (key, value) = item.map_err(|e| {
                    StoreError::Unavailable(format!("cannot read the bridges' records: {e}"))
                })?;
                let key = String::from_utf8(key.to_vec()).map_err(|_| {
                    StoreError::Corrupt("a bridge record's key is not UTF-8".into())
                })?;
                Ok((key, value.to_vec()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::SledBackend;
    use crate::store::Stores;

    fn open(dir: &std::path::Path) -> Stores {
        let dir = dir.to_owned();
        Stores::embedded(move || SledBackend::open(&dir)).unwrap()
    }

    fn fresh() -> (Stores, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (open(dir.path()), dir)
    }

    fn reopen(stores: Stores, dir: &tempfile::TempDir) -> Stores {
        drop(stores);
        open(dir.path())
    }

    crate::store_conformance_tests!(fresh(), reopen);

    #[test]
    fn pairing_keys_are_channel_0xff_sender_as_earlier_versions_wrote_them() {
        let key = super::pairing_key(&crate::config::ChannelId::MATRIX, "@eve:x");
        assert_eq!(key, b"matrix\xff@eve:x");
    }
}
