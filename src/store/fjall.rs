//! The embedded fjall [`Backend`], agentbus's default engine. The journal is not in the LSM
//! tree: it is the append-only [`JournalLog`] in `event-log/` (a transaction is one appended
//! record, synced with `fdatasync` before the homeserver gets its 200; concurrent
//! transactions share one sync), which also holds the txnId / event_id dedupe window. The
//! fjall keyspace holds everything that is read by key:
//!
//! Partitions: `history` (room_id ‖ 0xFF ‖ seq → [`HistoryEntry`] JSON; a person's line is
//! keyed by its event's journal seq, so writing it again after a crash overwrites it),
//! `pairing_requests` and `paired` (channel ‖ 0xFF ‖ sender → [`PairingRequest`] /
//! [`PairedSender`] JSON), `sessions` (session ‖ 0xFF ‖ seq → [`SessionEntry`] JSON), `sent`
//! (answer ‖ 0xFF ‖ part → unix ms ‖ event_id) and `meta` (the sequence reservation). 0xFF
//! never occurs in UTF-8, so a room's history is one contiguous prefix and a (channel,
//! sender) key is unambiguous.
//!
//! Every write reaches the operating system before it returns, so it survives the process
//! being killed; only the journal's transaction records are synced to the disk before they
//! return, so after a power cut the newest history lines, finishes and session lines may be
//! missing (events replay).
//!
//! fjall does not lock its directory; [`FjallBackend::open`] takes an exclusive lock on a
//! `LOCK` file in it, so a second agentbus on the same store fails at start.

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ::fjall::{Config, Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode};
use ruma::{EventId, OwnedEventId, OwnedRoomId, RoomId};

use super::embedded::Backend;
use super::log::JournalLog;
use super::{
    HISTORY_PER_ROOM, HistoryEntry, IncomingEvent, JournalOutcome, JournaledEvent, PairedSender,
    PairingRequest, SessionEntry, StoreError, by_channel_then_sender, live_oldest_first,
    normalize_pairing_code, random_pairing_code,
};
use crate::config::ChannelId;

/// Sequence numbers are reserved on disk this many at a time.
const SEQ_BLOCK: u64 = 1 << 16;
/// The journal log's directory inside the store (see [`super::log`]).
const LOG_DIR: &str = "event-log";
/// A room's history is trimmed to [`HISTORY_PER_ROOM`] about once every this many appends.
const TRIM_EVERY: u64 = 256;
/// How many times opening waits 20 ms for the directory's lock (a reopen in the same
/// process can race the previous handle's background threads).
const LOCK_WAITS: u32 = 250;

/// A fjall keyspace; one directory on disk.
pub struct FjallBackend {
    keyspace: Keyspace,
    /// The journal proper: pending events and the dedupe window.
    log: JournalLog,
    history: PartitionHandle,
    pairing_requests: PartitionHandle,
    paired: PartitionHandle,
    sessions: PartitionHandle,
    sent: PartitionHandle,
    tasks: PartitionHandle,
    schedules: PartitionHandle,
    monitors: PartitionHandle,
    bridges: PartitionHandle,
    meta: PartitionHandle,
    /// Next sequence number, and the end of the block reserved on disk.
    next_seq: AtomicU64,
    reserved: Mutex<u64>,
    /// Serialises pairing's read-modify-write.
    pairing: Mutex<()>,
    _lock: File,
}

fn unavailable(what: &str) -> impl Fn(::fjall::Error) -> StoreError + '_ {
    move |e| StoreError::Unavailable(format!("{what}: {e}"))
}

fn corrupt(what: &str) -> impl Fn(serde_json::Error) -> StoreError + '_ {
    move |e| StoreError::Corrupt(format!("{what}: {e}"))
}

fn encode<T: serde::Serialize>(value: &T, what: &str) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value)
        .map_err(|e| StoreError::Unavailable(format!("cannot encode {what}: {e}")))
}

/// name ‖ 0xFF: the prefix of one room's history, one session or one answer's parts.
fn prefix(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 9);
    key.extend_from_slice(name.as_bytes());
    key.push(0xFF);
    key
}

fn pairing_key(channel: &ChannelId, sender: &str) -> Vec<u8> {
    let mut key = prefix(channel);
    key.extend_from_slice(sender.as_bytes());
    key
}

fn stamp_of(value: &[u8]) -> u64 {
    value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    super::private::create_dir(dir).map_err(|e| {
        StoreError::Unavailable(format!(
            "cannot create store directory {}: {e}",
            dir.display()
        ))
    })?;
    let path = dir.join("LOCK");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(super::private::FILE_MODE)
        .open(&path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    let mut waits = LOCK_WAITS;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if waits > 0 => {
                waits -= 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Unavailable(format!(
                    "{} is in use by another agentbus process",
                    dir.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::Unavailable(format!(
                    "cannot lock {}: {e}",
                    path.display()
                )));
            }
        }
    }
}

impl FjallBackend {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let lock = lock_dir(dir)?;
        let keyspace = Config::new(dir)
            // A journal that outgrows its flushed memtables makes fjall hold writes back (half
            // a second per write past 90 % of `max_journaling_size`): two flush workers keep
            // up with a sustained transaction load where one fell behind.
            .flush_workers(2)
            .compaction_workers(1)
            .max_write_buffer_size(64 * 1024 * 1024)
            .open()
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot open fjall store at {}: {e}",
                    dir.display()
                ))
            })?;
        let partition = |name: &str| {
            keyspace
                .open_partition(name, PartitionCreateOptions::default())
                .map_err(unavailable(&format!("cannot open partition {name}")))
        };
        let meta = partition("meta")?;
        let log = JournalLog::open(&dir.join(LOG_DIR))?;
        let reserved_on_disk = meta
            .get("seq")
            .map_err(unavailable("cannot read the sequence reservation"))?
            .map(|v| stamp_of(&v))
            .unwrap_or(0);
        let last_journaled = log.newest_seq().map_or(0, |seq| seq + 1);
        let next = reserved_on_disk.max(last_journaled);
        Ok(Self {
            log,
            history: partition("history")?,
            pairing_requests: partition("pairing_requests")?,
            paired: partition("paired")?,
            sessions: partition("sessions")?,
            sent: partition("sent")?,
            tasks: partition("tasks")?,
            schedules: partition("schedules")?,
            monitors: partition("monitors")?,
            bridges: partition("bridges")?,
            meta,
            keyspace,
            next_seq: AtomicU64::new(next),
            reserved: Mutex::new(next),
            pairing: Mutex::new(()),
            _lock: lock,
        })
    }

    /// `n` fresh sequence numbers, increasing across restarts: a block is reserved on disk
    /// before any number of it is handed out.
    fn seqs(&self, n: u64) -> Result<u64, StoreError> {
        let first = self.next_seq.fetch_add(n, Ordering::AcqRel);
        let end = first + n;
        let mut reserved = self.reserved.lock().expect("sequence lock");
        if end > *reserved {
            let block = end + SEQ_BLOCK;
            self.meta
                .insert("seq", block.to_be_bytes())
                .map_err(unavailable("cannot reserve sequence numbers"))?;
            self.keyspace
                .persist(PersistMode::SyncData)
                .map_err(unavailable("cannot sync the sequence reservation"))?;
            *reserved = block;
        }
        Ok(first)
    }

    fn all_pairing_requests(&self) -> Result<Vec<(Vec<u8>, PairingRequest)>, StoreError> {
        self.pairing_requests
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(unavailable("cannot read pairing requests"))?;
                let request = serde_json::from_slice(&value).map_err(corrupt("pairing request"))?;
                Ok((key.to_vec(), request))
            })
            .collect()
    }

    fn keys_with_prefix(
        &self,
        tree: &PartitionHandle,
        key: &[u8],
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        tree.prefix(key)
            .map(|item| {
                item.map(|(k, _)| k.to_vec())
                    .map_err(unavailable("cannot scan the store"))
            })
            .collect()
    }

    fn trim_history(&self, room_id: &RoomId) -> Result<(), StoreError> {
        let keys = self.keys_with_prefix(&self.history, &prefix(room_id.as_str()))?;
        let excess = keys.len().saturating_sub(HISTORY_PER_ROOM);
        if excess == 0 {
            return Ok(());
        }
        let mut batch = self.keyspace.batch();
        for key in &keys[..excess] {
            batch.remove(&self.history, key.as_slice());
        }
        batch
            .commit()
            .map_err(unavailable(&format!("cannot trim history of {room_id}")))
    }
}

impl Backend for FjallBackend {
    fn journal_transaction(
        &self,
        txn_id: &str,
        events: Vec<IncomingEvent>,
        now_ms: u64,
    ) -> Result<JournalOutcome, StoreError> {
        self.log.journal(txn_id, events, now_ms, |n| self.seqs(n))
    }

    fn pending_events(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<JournaledEvent>, StoreError> {
        Ok(self.log.pending_events(after, limit))
    }

    fn pending_of(&self, event_ids: &[OwnedEventId]) -> Result<Vec<JournaledEvent>, StoreError> {
        Ok(self.log.pending_of(event_ids))
    }

    fn journal_head(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.log.head())
    }

    fn pending_count(&self) -> Result<usize, StoreError> {
        Ok(self.log.pending_count())
    }

    fn was_journaled(&self, event_id: &EventId) -> Result<bool, StoreError> {
        Ok(self.log.seq_of(event_id).is_some())
    }

    fn finish_events(
        &self,
        seqs: &[u64],
        history: &[(OwnedRoomId, HistoryEntry)],
    ) -> Result<(), StoreError> {
        // History first, keyed by the event's own sequence number where it has one: if the
        // process dies before the finish record is written, the replay writes the same keys
        // again instead of a second copy.
        if !history.is_empty() {
            let mut batch = self.keyspace.batch();
            let mut trim = Vec::new();
            let known = self.log.seqs_of(history.iter().map(|(_, e)| &*e.event_id));
            for ((room_id, entry), seq) in history.iter().zip(known) {
                let seq = match seq {
                    Some(seq) => seq,
                    None => self.seqs(1)?,
                };
                let mut key = prefix(room_id.as_str());
                key.extend_from_slice(&seq.to_be_bytes());
                batch.insert(&self.history, key, encode(entry, "history")?);
                if seq % TRIM_EVERY == 0 {
                    trim.push(room_id);
                }
            }
            batch.commit().map_err(unavailable(&format!(
                "cannot write the history of {} finished events",
                seqs.len()
            )))?;
            for room_id in trim {
                self.trim_history(room_id)?;
            }
        }
        self.log.finish(seqs)
    }

    fn prune_dedupe_records(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
        let mut removed = self.log.prune(cutoff_ms)?;
        for tree in [&self.sent] {
            let mut batch = self.keyspace.batch();
            for item in tree.iter() {
                let (key, stamp) = item.map_err(unavailable("cannot scan dedupe records"))?;
                // Every record here starts with the unix ms it was written at.
                if stamp_of(&stamp) < cutoff_ms {
                    batch.remove(tree, key);
                    removed += 1;
                }
            }
            batch
                .commit()
                .map_err(unavailable("cannot prune dedupe records"))?;
        }
        Ok(removed)
    }

    fn record_sent_part(
        &self,
        answer: &str,
        part: usize,
        event_id: &EventId,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut key = prefix(answer);
        key.extend_from_slice(&(part as u32).to_be_bytes());
        let mut value = now_ms.to_be_bytes().to_vec();
        value.extend_from_slice(event_id.as_bytes());
        self.sent
            .insert(key, value)
            .map_err(unavailable("cannot record a sent message"))
    }

    fn sent_parts(&self, answer: &str) -> Result<Vec<OwnedEventId>, StoreError> {
        self.sent
            .prefix(prefix(answer))
            .map(|item| {
                let (_, value) = item.map_err(unavailable("cannot read sent messages"))?;
                std::str::from_utf8(value.get(8..).unwrap_or_default())
                    .ok()
                    .and_then(|s| EventId::parse(s).ok())
                    .ok_or_else(|| StoreError::Corrupt("sent-message record".into()))
            })
            .collect()
    }

    fn append_session(
        &self,
        session: &str,
        entries: &[SessionEntry],
        keep: usize,
    ) -> Result<(), StoreError> {
        let start = prefix(session);
        let first = self.seqs(entries.len() as u64)?;
        let mut batch = self.keyspace.batch();
        for (seq, entry) in (first..).zip(entries) {
            let mut key = start.clone();
            key.extend_from_slice(&seq.to_be_bytes());
            batch.insert(&self.sessions, key, encode(entry, "session line")?);
        }
        batch
            .commit()
            .map_err(unavailable("cannot append to session"))?;
        let keys = self.keys_with_prefix(&self.sessions, &start)?;
        if keys.len() > keep {
            let mut batch = self.keyspace.batch();
            for key in &keys[..keys.len() - keep] {
                batch.remove(&self.sessions, key.as_slice());
            }
            batch.commit().map_err(unavailable("cannot trim session"))?;
        }
        Ok(())
    }

    fn session(&self, session: &str) -> Result<Vec<SessionEntry>, StoreError> {
        self.sessions
            .prefix(prefix(session))
            .map(|item| {
                let (_, value) = item.map_err(unavailable("cannot read session"))?;
                serde_json::from_slice(&value).map_err(corrupt("session line"))
            })
            .collect()
    }

    fn clear_session(&self, session: &str) -> Result<usize, StoreError> {
        let keys = self.keys_with_prefix(&self.sessions, &prefix(session))?;
        let mut batch = self.keyspace.batch();
        for key in &keys {
            batch.remove(&self.sessions, key.as_slice());
        }
        batch
            .commit()
            .map_err(unavailable("cannot clear session"))?;
        Ok(keys.len())
    }

    fn append_history(&self, room_id: &RoomId, entry: &HistoryEntry) -> Result<(), StoreError> {
        let seq = self.seqs(1)?;
        let mut key = prefix(room_id.as_str());
        key.extend_from_slice(&seq.to_be_bytes());
        self.history
            .insert(key, encode(entry, "history")?)
            .map_err(unavailable(&format!("cannot append history of {room_id}")))?;
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
        let mut entries = self
            .history
            .prefix(prefix(room_id.as_str()))
            .rev()
            .take(limit)
            .map(|item| {
                let (_, value) = item.map_err(unavailable("cannot read history"))?;
                serde_json::from_slice(&value).map_err(corrupt("history entry"))
            })
            .collect::<Result<Vec<HistoryEntry>, _>>()?;
        entries.reverse();
        Ok(entries)
    }

    fn pairing_request(
        &self,
        channel: &ChannelId,
        sender: &str,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<(PairingRequest, bool), StoreError> {
        let _one_at_a_time = self.pairing.lock().expect("pairing lock");
        let key = pairing_key(channel, sender);
        let stored = self.all_pairing_requests()?;
        if let Some((_, request)) = stored.iter().find(|(k, _)| *k == key)
            && request.is_live(now_ms, ttl)
        {
            return Ok((request.clone(), false));
        }
        // A new code must differ from every stored one: live codes must stay unique, and
        // never reusing an expired code keeps a stale code from approving someone else.
        let taken: HashSet<&str> = stored.iter().map(|(_, r)| r.code.as_str()).collect();
        let code = loop {
            let code = random_pairing_code();
            if !taken.contains(code.as_str()) {
                break code;
            }
        };
        let request = PairingRequest {
            code,
            channel: channel.clone(),
            sender: sender.to_owned(),
            created_ms: now_ms,
        };
        let mut batch = self.keyspace.batch();
        for (old, r) in &stored {
            if !r.is_live(now_ms, ttl) && *old != key {
                batch.remove(&self.pairing_requests, old.as_slice());
            }
        }
        batch.insert(
            &self.pairing_requests,
            key,
            encode(&request, "pairing request")?,
        );
        batch.commit().map_err(unavailable(&format!(
            "cannot issue pairing code for {sender} on {channel}"
        )))?;
        Ok((request, true))
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
        let _one_at_a_time = self.pairing.lock().expect("pairing lock");
        let Some((key, request)) = self
            .all_pairing_requests()?
            .into_iter()
            .find(|(_, r)| r.code == code && r.is_live(now_ms, ttl))
        else {
            return Ok(None);
        };
        let paired = PairedSender {
            channel: request.channel.clone(),
            sender: request.sender.clone(),
            approved_ms: now_ms,
        };
        let mut batch = self.keyspace.batch();
        batch.remove(&self.pairing_requests, key.as_slice());
        batch.insert(&self.paired, key, encode(&paired, "paired sender")?);
        batch
            .commit()
            .map_err(unavailable(&format!("cannot approve pairing code {code}")))?;
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
            .map_err(unavailable("cannot read paired senders"))
    }

    fn paired_senders(&self) -> Result<Vec<PairedSender>, StoreError> {
        let senders = self
            .paired
            .iter()
            .map(|item| {
                let (_, value) = item.map_err(unavailable("cannot read paired senders"))?;
                serde_json::from_slice(&value).map_err(corrupt("paired sender"))
            })
            .collect::<Result<Vec<PairedSender>, _>>()?;
        Ok(by_channel_then_sender(senders))
    }

    fn revoke_pairing(&self, channel: &ChannelId, sender: &str) -> Result<bool, StoreError> {
        let key = pairing_key(channel, sender);
        let _one_at_a_time = self.pairing.lock().expect("pairing lock");
        let was = self
            .paired
            .contains_key(&key)
            .map_err(unavailable("cannot read paired senders"))?;
        if was {
            self.paired.remove(key).map_err(unavailable(&format!(
                "cannot revoke pairing of {sender} on {channel}"
            )))?;
        }
        Ok(was)
    }

    // fjall writes to its journal file on insert: a killed process loses none of it.
    fn save_task(&self, id: &str, record: &[u8]) -> Result<(), StoreError> {
        self.tasks
            .insert(id, record)
            .map_err(unavailable(&format!("cannot save task {id}")))
    }

    fn task(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.tasks
            .get(id)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(unavailable(&format!("cannot read task {id}")))
    }

    fn remove_task(&self, id: &str) -> Result<bool, StoreError> {
        let was = self
            .tasks
            .contains_key(id)
            .map_err(unavailable("cannot read tasks"))?;
        if was {
            self.tasks
                .remove(id)
                .map_err(unavailable(&format!("cannot remove task {id}")))?;
        }
        Ok(was)
    }

    fn tasks(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.tasks
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(unavailable("cannot read tasks"))?;
                let id = String::from_utf8(key.to_vec())
                    .map_err(|_| StoreError::Corrupt("a task ID is not UTF-8".into()))?;
                Ok((id, value.to_vec()))
            })
            .collect()
    }

    fn save_schedule(&self, name: &str, record: &[u8]) -> Result<(), StoreError> {
        self.schedules
            .insert(name, record)
            .map_err(unavailable(&format!("cannot save scheduled task {name}")))
    }

    fn schedule(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.schedules
            .get(name)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(unavailable(&format!("cannot read scheduled task {name}")))
    }

    fn remove_schedule(&self, name: &str) -> Result<bool, StoreError> {
        let was = self
            .schedules
            .contains_key(name)
            .map_err(unavailable("cannot read scheduled tasks"))?;
        if was {
            self.schedules
                .remove(name)
                .map_err(unavailable(&format!("cannot remove scheduled task {name}")))?;
        }
        Ok(was)
    }

    fn schedules(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.schedules
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(unavailable("cannot read scheduled tasks"))?;
                let name = String::from_utf8(key.to_vec()).map_err(|_| {
                    StoreError::Corrupt("a scheduled task's name is not UTF-8".into())
                })?;
                Ok((name, value.to_vec()))
            })
            .collect()
    }

    fn save_monitor(&self, name: &str, record: &[u8]) -> Result<(), StoreError> {
        self.monitors
            .insert(name, record)
            .map_err(unavailable(&format!("cannot save health check {name}")))
    }

    fn monitor(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.monitors
            .get(name)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(unavailable(&format!("cannot read health check {name}")))
    }

    fn monitors(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.monitors
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(unavailable("cannot read health checks"))?;
                let name = String::from_utf8(key.to_vec()).map_err(|_| {
                    StoreError::Corrupt("a health check's name is not UTF-8".into())
                })?;
                Ok((name, value.to_vec()))
            })
            .collect()
    }

    fn bridge_record(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.bridges
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(unavailable("cannot read the bridges' records"))
    }

    fn save_bridge_record(&self, key: &str, record: &[u8]) -> Result<(), StoreError> {
        self.bridges
            .insert(key, record)
            .map_err(unavailable("cannot save a bridge record"))
    }

    fn bridge_records(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.bridges
            .prefix(prefix)
            .map(|item| {
                let (key, value) = item.map_err(unavailable("cannot read the bridges' records"))?;
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
    use super::FjallBackend;
    use crate::store::Stores;

    fn open(dir: &std::path::Path) -> Stores {
        let dir = dir.to_owned();
        Stores::embedded(move || FjallBackend::open(&dir)).unwrap()
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

    #[tokio::test]
    async fn what_the_store_creates_itself_is_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let config = crate::config::StoreConfig {
            path: root.path().join("data"),
            ..Default::default()
        };
        let store = crate::store::open(&config).unwrap();
        store
            .journal
            .journal_transaction("t1".into(), Vec::new(), 1)
            .await
            .unwrap();
        let mode = |p: &str| {
            let path = config.path.join(p);
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777
        };
        // agentbus's own directories and files; what fjall creates inside follows the
        // process umask, which the binary sets to 077 (tests/privacy.rs).
        for dir in ["", "fjall", "fjall/event-log"] {
            assert_eq!(mode(dir), 0o700, "{dir:?}");
        }
        assert_eq!(mode("fjall/LOCK"), 0o600);
        assert_eq!(mode("fjall/event-log/0000000000000001.log"), 0o600);
    }

    #[test]
    fn pairing_keys_are_channel_0xff_sender_as_earlier_versions_wrote_them() {
        let key = super::pairing_key(&crate::config::ChannelId::MATRIX, "@eve:x");
        assert_eq!(key, b"matrix\xff@eve:x");
    }

    /// The sequence numbers of the pending events among `ids`.
    async fn pending_seqs(store: &Stores, ids: &[ruma::OwnedEventId]) -> Vec<u64> {
        let pending = store.journal.pending_of(ids).await.unwrap();
        pending.iter().map(|e| e.seq).collect()
    }

    #[tokio::test]
    async fn a_journaled_event_is_found_by_its_id_until_it_is_finished() {
        use crate::store::{IncomingEvent, JournalOutcome, Partition};
        let (store, dir) = fresh();
        let event = |n: u32| IncomingEvent {
            room_id: ruma::RoomId::parse("!a").unwrap(),
            event_id: ruma::EventId::parse(format!("$e{n}")).unwrap(),
            json: serde_json::value::to_raw_value(&serde_json::json!({ "n": n })).unwrap(),
        };
        let JournalOutcome::Journaled(journaled) = store
            .journal
            .journal_transaction("t1".into(), vec![event(1), event(2)], 1)
            .await
            .unwrap()
        else {
            panic!("expected Journaled")
        };
        let ids: Vec<ruma::OwnedEventId> = ["$e1", "$e2", "$never"]
            .iter()
            .map(|id| ruma::EventId::parse(*id).unwrap())
            .collect();
        let store = reopen(store, &dir);
        let found = pending_seqs(&store, &ids).await;
        assert_eq!(found, [journaled[0].seq, journaled[1].seq]);
        let lease = store
            .journal
            .claim(
                "t",
                &Partition::all(),
                std::time::Duration::from_secs(60),
                1,
            )
            .await
            .unwrap();
        store
            .journal
            .finish_events(&lease, &[journaled[0].reference()], &[])
            .await
            .unwrap();
        let found = pending_seqs(&store, &ids).await;
        assert_eq!(found, [journaled[1].seq], "a finished event is not pending");
    }
}
