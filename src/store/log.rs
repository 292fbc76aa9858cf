//! The journal of the fjall engine: an append-only log of segment files, not LSM entries.
//!
//! The journal is a queue — written once, read once in order, then forgotten — so it gains
//! nothing from a sorted tree and pays for one (memtable inserts, lookups, flushes and
//! compaction of every event twice). Here a transaction is **one appended record**, synced
//! with `fdatasync` before the homeserver's 200 (one sync covers every transaction waiting
//! meanwhile: group commit); finishing events appends a small record naming their sequence
//! numbers. What is still pending, and the dedupe window of txnIds and event IDs, live in
//! memory and are rebuilt by reading the segments at open.
//!
//! Layout: `journal/<segment, 16 hex digits>.log`, each a run of records
//! `length (u32 LE) ‖ crc32 of payload (u32 LE) ‖ payload`. A payload is
//!
//! - `1 ‖ unix ms (u64) ‖ txn digest (16 bytes) ‖ n (u32) ‖ n × (seq (u64) ‖ room_id (u16 len ‖
//!   bytes) ‖ event_id (u16 len ‖ bytes) ‖ event JSON (u32 len ‖ bytes))` — a transaction;
//! - `2 ‖ n (u32) ‖ n × seq (u64)` — these events are finished.
//!
//! Integers are little-endian. A record torn by a crash or a full disk can only be the last
//! one of the last segment: opening cuts it off (it was never acknowledged). A bad record
//! anywhere else is corruption and opening refuses.
//!
//! The dedupe window remembers the last [`DEDUPE_EVENTS`] event IDs and [`DEDUPE_TXNS`]
//! transactions (a 128-bit SHA-256 prefix each, so memory is ~60 bytes an entry whatever the
//! IDs' length) and no record older than pruning's cutoff. A segment is deleted once none
//! of its events is pending and all its records are older than that cutoff.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ruma::{EventId, OwnedEventId};
use serde_json::value::RawValue;

use super::{IncomingEvent, JournalOutcome, JournaledEvent, StoreError};

/// A segment is closed and a new one started once it is this long.
const SEGMENT_BYTES: u64 = 64 << 20;
/// Event IDs remembered for dedupe (about 32 MiB of memory when full).
pub(super) const DEDUPE_EVENTS: usize = 1 << 19;
/// Transactions remembered for dedupe.
pub(super) const DEDUPE_TXNS: usize = 1 << 17;
/// The largest record accepted when reading (a transaction is capped far below this by the
/// HTTP body limit).
const MAX_RECORD: usize = 1 << 30;
const TXN: u8 = 1;
const FINISHED: u8 = 2;

type Digest = u128;

fn digest(bytes: &[u8]) -> Digest {
    use sha2::{Digest as _, Sha256};
    let hash = Sha256::digest(bytes);
    u128::from_le_bytes(hash[..16].try_into().expect("a SHA-256 hash has 32 bytes"))
}

fn io_error(what: &str) -> impl Fn(io::Error) -> StoreError + '_ {
    move |e| StoreError::Unavailable(format!("{what}: {e}"))
}

/// Recently seen keys, oldest first, bounded in number.
struct Window {
    /// digest → sequence number (0 for transactions).
    map: HashMap<Digest, u64>,
    /// (digest, unix ms), in the order they were added.
    order: VecDeque<(Digest, u64)>,
    cap: usize,
}

impl Window {
    fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    fn get(&self, key: Digest) -> Option<u64> {
        self.map.get(&key).copied()
    }

    /// Adds `key`; past the cap, the oldest keys are forgotten unless `keep` says their
    /// value is still needed (a pending event keeps its record).
    fn insert(&mut self, key: Digest, value: u64, ms: u64, keep: impl Fn(u64) -> bool) {
        if self.map.insert(key, value).is_none() {
            self.order.push_back((key, ms));
        }
        while self.order.len() > self.cap {
            let Some((old, _)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&old).is_some_and(|v| !keep(*v)) {
                self.map.remove(&old);
            }
        }
    }

    /// Forgets keys added before `cutoff_ms`; returns how many.
    fn prune(&mut self, cutoff_ms: u64, keep: impl Fn(u64) -> bool) -> usize {
        let mut removed = 0;
        while let Some(&(key, ms)) = self.order.front() {
            if ms >= cutoff_ms {
                break;
            }
            self.order.pop_front();
            if self.map.get(&key).is_some_and(|v| !keep(*v)) {
                self.map.remove(&key);
                removed += 1;
            }
        }
        removed
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Segment {
    /// Events of this segment not finished yet.
    pending: usize,
    /// The newest record's unix ms.
    newest_ms: u64,
    /// The highest sequence number in it.
    newest_seq: Option<u64>,
}

struct Pending {
    segment: u64,
    event: JournaledEvent,
}

struct Inner {
    file: Arc<File>,
    /// The segment being appended to, and its length.
    segment: u64,
    bytes: u64,
    segments: BTreeMap<u64, Segment>,
    txns: Window,
    events: Window,
    pending: BTreeMap<u64, Pending>,
    /// The highest sequence number ever written.
    newest_seq: Option<u64>,
    /// A write that failed and could not be undone: nothing more is appended.
    broken: bool,
    buf: Vec<u8>,
}

/// The journal log of one store directory.
pub(super) struct JournalLog {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Group commit: how many transaction records were appended, and how many are known synced.
    written: AtomicU64,
    synced: Mutex<u64>,
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:016x}.log"))
}

fn open_segment(dir: &Path, segment: u64) -> Result<File, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = segment_path(dir, segment);
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(super::private::FILE_MODE)
        .open(&path)
        .map_err(io_error(&format!("cannot open {}", path.display())))?;
    // The new file's name must survive a power cut too.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("cannot sync the journal directory"))?;
    Ok(file)
}

/// A cursor over one record's payload.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    }
    fn u32(&mut self) -> Option<usize> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn u128(&mut self) -> Option<u128> {
        self.take(16)
            .map(|b| u128::from_le_bytes(b.try_into().expect("16 bytes")))
    }
    fn str16(&mut self) -> Option<&'a str> {
        let n = self.u16()?;
        std::str::from_utf8(self.take(n)?).ok()
    }
    fn str32(&mut self) -> Option<&'a str> {
        let n = self.u32()?;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// One record read back.
enum Record {
    Txn {
        ms: u64,
        txn: Digest,
        events: Vec<(u64, String, String, String)>,
    },
    Finished(Vec<u64>),
}

fn decode(payload: &[u8]) -> Option<Record> {
    let mut r = Reader(payload);
    match r.u8()? {
        TXN => {
            let ms = r.u64()?;
            let txn = r.u128()?;
            let n = r.u32()?;
            let mut events = Vec::with_capacity(n.min(4096));
            for _ in 0..n {
                let seq = r.u64()?;
                let room = r.str16()?.to_owned();
                let event = r.str16()?.to_owned();
                let json = r.str32()?.to_owned();
                events.push((seq, room, event, json));
            }
            Some(Record::Txn { ms, txn, events })
        }
        FINISHED => {
            let n = r.u32()?;
            let mut seqs = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                seqs.push(r.u64()?);
            }
            Some(Record::Finished(seqs))
        }
        _ => None,
    }
}

/// Reads the next record of `reader`: `Ok(None)` at a clean end, `Err(())` at a torn or
/// corrupt record.
fn read_record(reader: &mut impl Read, buf: &mut Vec<u8>) -> Result<Option<(usize, Record)>, ()> {
    let mut header = [0u8; 8];
    let mut got = 0;
    while got < header.len() {
        match reader.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len > MAX_RECORD {
        return Err(());
    }
    buf.resize(len, 0);
    reader.read_exact(buf).map_err(|_| ())?;
    if crc32fast::hash(buf) != crc {
        return Err(());
    }
    let record = decode(buf).ok_or(())?;
    Ok(Some((8 + len, record)))
}

impl JournalLog {
    /// Opens the log in `dir` (created if missing), reading every segment back.
    pub(super) fn open(dir: &Path) -> Result<Self, StoreError> {
        super::private::create_dir(dir)
            .map_err(io_error(&format!("cannot create {}", dir.display())))?;
        let mut numbers: Vec<u64> = fs::read_dir(dir)
            .map_err(io_error(&format!("cannot list {}", dir.display())))?
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                u64::from_str_radix(name.strip_suffix(".log")?, 16).ok()
            })
            .collect();
        numbers.sort_unstable();
        let mut segments = BTreeMap::new();
        let mut txns = Window::new(DEDUPE_TXNS);
        let mut events = Window::new(DEDUPE_EVENTS);
        let mut raw: BTreeMap<u64, (u64, String, String, String)> = BTreeMap::new();
        let mut newest_seq: Option<u64> = None;
        let mut last_len = 0u64;
        let mut buf = Vec::new();
        for (i, &number) in numbers.iter().enumerate() {
            let path = segment_path(dir, number);
            let file =
                File::open(&path).map_err(io_error(&format!("cannot open {}", path.display())))?;
            let mut reader = BufReader::with_capacity(1 << 20, file);
            let mut segment = Segment::default();
            let mut offset = 0u64;
            loop {
                match read_record(&mut reader, &mut buf) {
                    Ok(None) => break,
                    Ok(Some((len, record))) => {
                        offset += len as u64;
                        match record {
                            Record::Txn {
                                ms,
                                txn,
                                events: list,
                            } => {
                                segment.newest_ms = segment.newest_ms.max(ms);
                                txns.insert(txn, 0, ms, |_| false);
                                for (seq, room, event, json) in list {
                                    newest_seq = newest_seq.max(Some(seq));
                                    segment.newest_seq = segment.newest_seq.max(Some(seq));
                                    events.insert(digest(event.as_bytes()), seq, ms, |s| {
                                        raw.contains_key(&s)
                                    });
                                    raw.insert(seq, (number, room, event, json));
                                    segment.pending += 1;
                                }
                            }
                            Record::Finished(seqs) => {
                                for seq in seqs {
                                    if let Some((from, ..)) = raw.remove(&seq) {
                                        if from == number {
                                            segment.pending -= 1;
                                        } else if let Some(s) = segments.get_mut(&from) {
                                            let s: &mut Segment = s;
                                            s.pending = s.pending.saturating_sub(1);
                                        }
                                    }
                                }
                            }
                        }
                    }
                    Err(()) if i + 1 == numbers.len() => {
                        // A torn tail: cut it off; it was never acknowledged.
                        tracing::warn!(segment = %path.display(), offset, "journal ends in a torn record (a crash or a full disk while writing); cutting it off");
                        OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .and_then(|f| f.set_len(offset).and_then(|()| f.sync_all()))
                            .map_err(io_error(&format!(
                                "cannot cut the torn end of {}",
                                path.display()
                            )))?;
                        break;
                    }
                    Err(()) => {
                        return Err(StoreError::Corrupt(format!(
                            "journal segment {} has a bad record at byte {offset}",
                            path.display()
                        )));
                    }
                }
            }
            last_len = offset;
            segments.insert(number, segment);
        }
        let mut pending = BTreeMap::new();
        for (seq, (segment, room, event, json)) in raw {
            let corrupt =
                |what: &str| StoreError::Corrupt(format!("journal entry {seq}: bad {what}"));
            let event = JournaledEvent {
                seq,
                room_id: room.try_into().map_err(|_| corrupt("room_id"))?,
                event_id: event.try_into().map_err(|_| corrupt("event_id"))?,
                json: RawValue::from_string(json).map_err(|_| corrupt("JSON"))?,
            };
            pending.insert(seq, Pending { segment, event });
        }
        let (segment, bytes) = match numbers.last() {
            Some(&last) if last_len < SEGMENT_BYTES => (last, last_len),
            Some(&last) => (last + 1, 0),
            None => (1, 0),
        };
        let file = open_segment(dir, segment)?;
        segments.entry(segment).or_default();
        Ok(Self {
            dir: dir.to_owned(),
            inner: Mutex::new(Inner {
                file: Arc::new(file),
                segment,
                bytes,
                segments,
                txns,
                events,
                pending,
                newest_seq,
                broken: false,
                buf: Vec::new(),
            }),
            written: AtomicU64::new(0),
            synced: Mutex::new(0),
        })
    }

    /// The highest sequence number in the log, pending or not.
    pub(super) fn newest_seq(&self) -> Option<u64> {
        self.lock().newest_seq
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("journal log lock")
    }

    /// Journals a transaction: events already seen (or twice in it) are left out, the rest
    /// get sequence numbers from `seqs` and are on stable storage when this returns.
    pub(super) fn journal(
        &self,
        txn_key: &str,
        incoming: Vec<IncomingEvent>,
        now_ms: u64,
        seqs: impl FnOnce(u64) -> Result<u64, StoreError>,
    ) -> Result<JournalOutcome, StoreError> {
        let (ticket, journaled) = {
            let mut inner = self.lock();
            let txn = digest(txn_key.as_bytes());
            if inner.txns.get(txn).is_some() {
                return Ok(JournalOutcome::Duplicate);
            }
            let mut fresh = Vec::with_capacity(incoming.len());
            let mut here = HashSet::with_capacity(incoming.len());
            for event in incoming {
                let key = digest(event.event_id.as_bytes());
                if here.insert(key) && inner.events.get(key).is_none() {
                    fresh.push((key, event));
                }
            }
            let first = seqs(fresh.len() as u64)?;
            let mut buf = std::mem::take(&mut inner.buf);
            buf.clear();
            buf.push(TXN);
            buf.extend_from_slice(&now_ms.to_le_bytes());
            buf.extend_from_slice(&txn.to_le_bytes());
            buf.extend_from_slice(&(fresh.len() as u32).to_le_bytes());
            for (seq, (_, event)) in (first..).zip(&fresh) {
                buf.extend_from_slice(&seq.to_le_bytes());
                for id in [event.room_id.as_str(), event.event_id.as_str()] {
                    // Matrix IDs are at most 255 bytes (spec: "Identifier grammar").
                    let id = id.as_bytes();
                    let len = u16::try_from(id.len())
                        .map_err(|_| StoreError::Corrupt(format!("an ID of {} bytes", id.len())))?;
                    buf.extend_from_slice(&len.to_le_bytes());
                    buf.extend_from_slice(id);
                }
                let json = event.json.get().as_bytes();
                buf.extend_from_slice(&(json.len() as u32).to_le_bytes());
                buf.extend_from_slice(json);
            }
            let appended = inner.append(&self.dir, &buf);
            inner.buf = buf;
            appended?;
            inner.txns.insert(txn, 0, now_ms, |_| false);
            let segment = inner.segment;
            let mut journaled = Vec::with_capacity(fresh.len());
            for (seq, (key, event)) in (first..).zip(fresh) {
                let event = JournaledEvent {
                    seq,
                    room_id: event.room_id,
                    event_id: event.event_id,
                    json: event.json,
                };
                let Inner {
                    events, pending, ..
                } = &mut *inner;
                events.insert(key, seq, now_ms, |s| pending.contains_key(&s));
                pending.insert(
                    seq,
                    Pending {
                        segment,
                        event: event.clone(),
                    },
                );
                journaled.push(event);
            }
            let count = journaled.len();
            let newest = journaled.last().map(|e: &JournaledEvent| e.seq);
            let entry = inner.segments.entry(segment).or_default();
            entry.pending += count;
            entry.newest_ms = entry.newest_ms.max(now_ms);
            entry.newest_seq = entry.newest_seq.max(newest);
            inner.newest_seq = inner.newest_seq.max(newest);
            (self.written.fetch_add(1, Ordering::AcqRel) + 1, journaled)
        };
        self.sync(ticket)?;
        Ok(JournalOutcome::Journaled(journaled))
    }

    /// Waits until append number `ticket` is on stable storage; one `fdatasync` covers every
    /// append made before it starts.
    fn sync(&self, ticket: u64) -> Result<(), StoreError> {
        let mut synced = self.synced.lock().expect("journal sync lock");
        if *synced >= ticket {
            return Ok(()); // another caller's sync covered this append
        }
        let upto = self.written.load(Ordering::Acquire);
        // A segment closed since is synced when it is closed; the open one covers the rest.
        let file = self.lock().file.clone();
        file.sync_data()
            .map_err(io_error("cannot sync the journal"))?;
        *synced = upto;
        Ok(())
    }

    /// Records that `seqs` are finished. It reaches the operating system before returning
    /// (it survives the process being killed) and the disk with the next journal sync.
    pub(super) fn finish(&self, seqs: &[u64]) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let known: Vec<u64> = seqs
            .iter()
            .copied()
            .filter(|s| inner.pending.contains_key(s))
            .collect();
        if known.is_empty() {
            return Ok(());
        }
        let mut buf = std::mem::take(&mut inner.buf);
        buf.clear();
        buf.push(FINISHED);
        buf.extend_from_slice(&(known.len() as u32).to_le_bytes());
        for seq in &known {
            buf.extend_from_slice(&seq.to_le_bytes());
        }
        let appended = inner.append(&self.dir, &buf);
        inner.buf = buf;
        appended?;
        for seq in known {
            if let Some(done) = inner.pending.remove(&seq)
                && let Some(segment) = inner.segments.get_mut(&done.segment)
            {
                segment.pending = segment.pending.saturating_sub(1);
            }
        }
        Ok(())
    }

    /// Up to `limit` pending events after `after`, oldest first.
    pub(super) fn pending_events(&self, after: Option<u64>, limit: usize) -> Vec<JournaledEvent> {
        let start = after.map_or(0, |seq| seq.saturating_add(1));
        self.lock()
            .pending
            .range(start..)
            .take(limit)
            .map(|(_, p)| p.event.clone())
            .collect()
    }

    /// The pending events among `event_ids`.
    pub(super) fn pending_of(&self, event_ids: &[OwnedEventId]) -> Vec<JournaledEvent> {
        let inner = self.lock();
        event_ids
            .iter()
            .filter_map(|id| inner.events.get(digest(id.as_bytes())))
            .filter_map(|seq| inner.pending.get(&seq))
            .map(|p| p.event.clone())
            .collect()
    }

    /// The newest pending event's sequence number.
    pub(super) fn head(&self) -> Option<u64> {
        self.lock().pending.last_key_value().map(|(seq, _)| *seq)
    }

    pub(super) fn pending_count(&self) -> usize {
        self.lock().pending.len()
    }

    /// The sequence number `event_id` was journaled with, while it is in the dedupe window.
    pub(super) fn seq_of(&self, event_id: &EventId) -> Option<u64> {
        self.seqs_of([event_id]).pop().flatten()
    }

    /// [`Self::seq_of`] for many events, in their order, under one lock.
    pub(super) fn seqs_of<'a>(
        &self,
        event_ids: impl IntoIterator<Item = &'a EventId>,
    ) -> Vec<Option<u64>> {
        let digests: Vec<Digest> = event_ids
            .into_iter()
            .map(|id| digest(id.as_bytes()))
            .collect();
        let inner = self.lock();
        digests.into_iter().map(|d| inner.events.get(d)).collect()
    }

    /// Forgets dedupe records older than `cutoff_ms` and deletes the segments nothing needs
    /// any more; returns how many records were forgotten.
    pub(super) fn prune(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
        let mut inner = self.lock();
        let Inner {
            txns,
            events,
            pending,
            ..
        } = &mut *inner;
        let removed = txns.prune(cutoff_ms, |_| false)
            + events.prune(cutoff_ms, |s| pending.contains_key(&s));
        inner.delete_segments(&self.dir, cutoff_ms)?;
        Ok(removed)
    }
}

impl Inner {
    /// Deletes the closed segments nothing needs: none of their events pending, and every
    /// record older than `cutoff_ms` or out of the dedupe window already.
    fn delete_segments(&mut self, dir: &Path, cutoff_ms: u64) -> Result<(), StoreError> {
        let oldest_remembered = self
            .events
            .order
            .front()
            .and_then(|(key, _)| self.events.get(*key));
        let current = self.segment;
        let done: Vec<u64> = self
            .segments
            .iter()
            .filter(|(n, s)| {
                let forgotten = match (s.newest_seq, oldest_remembered) {
                    (Some(newest), Some(oldest)) => newest < oldest,
                    _ => false,
                };
                **n != current && s.pending == 0 && (s.newest_ms < cutoff_ms || forgotten)
            })
            .map(|(n, _)| *n)
            .collect();
        for number in done {
            let path = segment_path(dir, number);
            fs::remove_file(&path)
                .map_err(io_error(&format!("cannot delete {}", path.display())))?;
            self.segments.remove(&number);
        }
        Ok(())
    }

    /// Appends one record (`payload` framed), starting a new segment first if this one is
    /// full. A failed write is cut back off, so the log never holds half a record.
    fn append(&mut self, dir: &Path, payload: &[u8]) -> Result<(), StoreError> {
        if self.broken {
            return Err(StoreError::Unavailable(
                "an earlier journal write could not be undone; reopen the store".into(),
            ));
        }
        if self.bytes >= SEGMENT_BYTES {
            // Everything in the closing segment reaches the disk before appends move on, so
            // a sync of the new segment covers all earlier appends.
            self.file
                .sync_data()
                .map_err(io_error("cannot sync a full journal segment"))?;
            let next = self.segment + 1;
            self.file = Arc::new(open_segment(dir, next)?);
            self.segment = next;
            self.bytes = 0;
            self.segments.entry(next).or_default();
            // Segments the dedupe window has moved past go now, not at the daily prune.
            if let Err(e) = self.delete_segments(dir, 0) {
                tracing::warn!(error = %e, "could not delete an old journal segment");
            }
        }
        let mut framed = Vec::with_capacity(8 + payload.len());
        framed.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        framed.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        framed.extend_from_slice(payload);
        match (&*self.file).write_all(&framed) {
            Ok(()) => {
                self.bytes += framed.len() as u64;
                Ok(())
            }
            Err(e) => {
                if self.file.set_len(self.bytes).is_err() {
                    self.broken = true;
                }
                Err(StoreError::Unavailable(format!(
                    "cannot write the journal: {e}"
                )))
            }
        }
    }
}

impl Drop for JournalLog {
    fn drop(&mut self) {
        if let Ok(inner) = self.inner.lock() {
            let _ = inner.file.sync_data();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u32, room: &str) -> IncomingEvent {
        IncomingEvent {
            room_id: room.try_into().unwrap(),
            event_id: format!("$ev{n}").try_into().unwrap(),
            json: RawValue::from_string(format!(r#"{{"n":{n}}}"#)).unwrap(),
        }
    }

    fn counter() -> impl Fn(u64) -> Result<u64, StoreError> {
        let next = std::sync::atomic::AtomicU64::new(10);
        move |n| Ok(next.fetch_add(n, Ordering::SeqCst))
    }

    /// The pending events' IDs, oldest first.
    fn pending_ids(log: &JournalLog) -> Vec<String> {
        let pending = log.pending_events(None, 10);
        pending.iter().map(|e| e.event_id.to_string()).collect()
    }

    fn journaled(outcome: JournalOutcome) -> Vec<JournaledEvent> {
        match outcome {
            JournalOutcome::Journaled(events) => events,
            JournalOutcome::Duplicate => panic!("expected Journaled"),
        }
    }

    #[test]
    fn a_torn_last_record_is_cut_off_and_the_rest_survives() {
        let dir = tempfile::tempdir().unwrap();
        let seqs = counter();
        {
            let log = JournalLog::open(dir.path()).unwrap();
            journaled(log.journal("t1", vec![event(1, "!a:x")], 1, &seqs).unwrap());
            journaled(log.journal("t2", vec![event(2, "!a:x")], 1, &seqs).unwrap());
        }
        // A crash in the middle of the third record's write.
        let path = segment_path(dir.path(), 1);
        let whole = fs::metadata(&path).unwrap().len();
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(file);
        let log = JournalLog::open(dir.path()).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), whole);
        let ids = pending_ids(&log);
        assert_eq!(ids, ["$ev1", "$ev2"]);
        // Appends go on after the cut.
        journaled(log.journal("t3", vec![event(3, "!a:x")], 1, &seqs).unwrap());
        drop(log);
        assert_eq!(JournalLog::open(dir.path()).unwrap().pending_count(), 3);
    }

    #[test]
    fn a_bad_record_before_the_last_segment_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let seqs = counter();
        drop(JournalLog::open(dir.path()).unwrap());
        let log = JournalLog::open(dir.path()).unwrap();
        journaled(log.journal("t1", vec![event(1, "!a:x")], 1, &seqs).unwrap());
        drop(log);
        // A second segment follows, so the first one's damage cannot be a torn tail.
        fs::write(segment_path(dir.path(), 2), b"").unwrap();
        let path = segment_path(dir.path(), 1);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        fs::write(&path, bytes).unwrap();
        assert!(matches!(
            JournalLog::open(dir.path()),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn finished_events_stay_finished_and_their_segments_go_after_pruning() {
        let dir = tempfile::tempdir().unwrap();
        let seqs = counter();
        let log = JournalLog::open(dir.path()).unwrap();
        let first = journaled(
            log.journal("t1", vec![event(1, "!a:x"), event(2, "!b:x")], 5, &seqs)
                .unwrap(),
        );
        log.finish(&[first[0].seq]).unwrap();
        drop(log);
        let log = JournalLog::open(dir.path()).unwrap();
        let ids = pending_ids(&log);
        assert_eq!(ids, ["$ev2"]);
        assert!(
            log.seq_of(&first[0].event_id).is_some(),
            "a finished event is still deduplicated"
        );
        log.finish(&[first[1].seq]).unwrap();
        // Force a segment change, then prune: the old segment has nothing pending and is old.
        log.lock().bytes = SEGMENT_BYTES;
        journaled(
            log.journal("t2", vec![event(3, "!a:x")], 50, &seqs)
                .unwrap(),
        );
        assert_eq!(log.prune(10).unwrap(), 3);
        assert!(!segment_path(dir.path(), 1).exists());
        assert!(segment_path(dir.path(), 2).exists());
        assert!(log.seq_of(&first[0].event_id).is_none());
        drop(log);
        let log = JournalLog::open(dir.path()).unwrap();
        assert_eq!(log.pending_count(), 1);
        assert_eq!(log.newest_seq(), Some(first[1].seq + 1));
    }

    #[test]
    fn a_segment_the_dedupe_window_moved_past_goes_when_the_next_one_starts() {
        let dir = tempfile::tempdir().unwrap();
        let seqs = counter();
        let log = JournalLog::open(dir.path()).unwrap();
        log.lock().events.cap = 2;
        let first = journaled(
            log.journal("t1", vec![event(1, "!a:x"), event(2, "!a:x")], 5, &seqs)
                .unwrap(),
        );
        log.finish(&first.iter().map(|e| e.seq).collect::<Vec<_>>())
            .unwrap();
        log.lock().bytes = SEGMENT_BYTES;
        let second = journaled(
            log.journal("t2", (3..=5).map(|n| event(n, "!a:x")).collect(), 5, &seqs)
                .unwrap(),
        );
        // Starting segment 2, the window still held segment 1's events.
        assert!(segment_path(dir.path(), 1).exists());
        log.lock().bytes = SEGMENT_BYTES;
        journaled(log.journal("t3", vec![event(6, "!a:x")], 5, &seqs).unwrap());
        assert!(
            !segment_path(dir.path(), 1).exists(),
            "every event of it finished and forgotten"
        );
        assert!(
            segment_path(dir.path(), 2).exists(),
            "its events are pending"
        );
        drop(log);
        let log = JournalLog::open(dir.path()).unwrap();
        let ids = pending_ids(&log);
        assert_eq!(ids, ["$ev3", "$ev4", "$ev5", "$ev6"]);
        assert_eq!(log.seq_of(&second[2].event_id), Some(second[2].seq));
    }

    #[test]
    fn the_dedupe_window_is_bounded_but_keeps_pending_events() {
        let mut window = Window::new(2);
        window.insert(1, 100, 1, |_| false);
        window.insert(2, 200, 1, |seq| seq == 100);
        window.insert(3, 300, 1, |seq| seq == 100);
        assert_eq!(window.order.len(), 2);
        assert_eq!(window.get(1), Some(100), "pending: kept");
        window.insert(4, 400, 1, |_| false);
        assert_eq!(window.get(2), None, "finished and oldest: forgotten");
        assert_eq!(window.get(4), Some(400));
    }
}
