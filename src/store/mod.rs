//! Durable state behind one narrow trait: the transaction journal, the processed-event
//! record, room history and DM pairing (pending requests and approved senders).
//!
//! Callers hold an `Arc<dyn Store>`; [`SledStore`] is the embedded default. Every backend
//! runs the same [`store_conformance_tests!`] so a second one is provably equivalent.

pub mod feed;
mod recovering;
mod sled;

use std::time::Duration;

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use self::sled::SledStore;

use std::sync::Arc;

use crate::config::{StoreBackend, StoreConfig};

/// Opens the store `config` describes (`store.backend`, `store.path`).
pub fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    match config.backend {
        StoreBackend::Sled => {
            let dir = config.path.join("sled");
            let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir)?);
            let reopen: recovering::Reopen =
                Box::new(move || Ok(Arc::new(SledStore::open(&dir)?) as Arc<dyn Store>));
            Ok(Arc::new(recovering::Recovering::new(store, reopen)))
        }
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
    pub routed_to: Vec<String>,
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
    pub channel: String,
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
    pub channel: String,
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

/// A storage failure; the message names what was being done.
#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

/// Durable state of the appservice.
pub trait Store: Send + Sync {
    /// Records `txn_id` and journals `events` in one atomic, flushed write — unless the
    /// txnId was recorded before, in which case nothing is written. An event whose
    /// event_id was journaled before (in this or any earlier transaction) is left out, so
    /// every event enters the journal at most once.
    fn journal_transaction(
        &self,
        txn_id: &str,
        events: Vec<IncomingEvent>,
    ) -> Result<JournalOutcome, StoreError>;

    /// Up to `limit` journaled events not yet finished, in journal order, starting after
    /// sequence number `after` (from the start when `None`). Replay pages through the
    /// journal with this instead of loading it whole.
    fn pending_events(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<JournaledEvent>, StoreError>;

    /// The sequence number of the newest journaled event not finished yet.
    fn journal_head(&self) -> Result<Option<u64>, StoreError>;

    /// How many journaled events are not finished yet.
    fn pending_count(&self) -> Result<usize, StoreError>;

    /// Whether `event_id` was ever journaled (its dedupe record is kept until pruned).
    fn was_journaled(&self, event_id: &ruma::EventId) -> Result<bool, StoreError>;

    /// Removes the journal entries `seqs`. Not flushed by itself: a finish lost in a crash
    /// only replays an event whose outbound sends carry derived transaction IDs.
    fn finish_events(&self, seqs: &[u64]) -> Result<(), StoreError>;

    /// Forgets txnIds and journaled event_ids recorded before `cutoff_ms` (unix ms); returns
    /// how many records were removed. Homeservers redeliver within minutes, not days.
    fn prune_dedupe_records(&self, cutoff_ms: u64) -> Result<usize, StoreError>;

    /// Remembers that part `part` of the answer `answer` (a key the caller derives from
    /// what the answer answers) was posted as `event_id`, so a run replayed after a crash
    /// edits that message instead of leaving it half-streamed. Pruned with the dedupe records.
    fn record_sent_part(
        &self,
        answer: &str,
        part: usize,
        event_id: &ruma::EventId,
    ) -> Result<(), StoreError>;

    /// The parts of `answer` posted so far, in order.
    fn sent_parts(&self, answer: &str) -> Result<Vec<OwnedEventId>, StoreError>;

    /// Appends lines to a session's memory, then forgets its oldest lines beyond `keep`.
    /// `session` is an opaque key (agent, room and thread joined by the caller).
    fn append_session(
        &self,
        session: &str,
        entries: &[SessionEntry],
        keep: usize,
    ) -> Result<(), StoreError>;

    /// A session's memory, oldest first (at most the `keep` of the last append).
    fn session(&self, session: &str) -> Result<Vec<SessionEntry>, StoreError>;

    /// Forgets a session's memory; returns how many lines went.
    fn clear_session(&self, session: &str) -> Result<usize, StoreError>;

    /// Appends a line to a room's history; lines beyond the room's newest
    /// [`HISTORY_PER_ROOM`] are trimmed from time to time.
    fn append_history(&self, room_id: &RoomId, entry: &HistoryEntry) -> Result<(), StoreError>;

    /// The last `limit` lines of a room's history, oldest first.
    fn recent_history(
        &self,
        room_id: &RoomId,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError>;

    /// The sender's live pairing request, or a new one with a fresh unique code. A request
    /// older than `ttl` (relative to `now_ms`) is expired and replaced. Returns the request
    /// and whether it was created by this call. Callers check [`Store::is_paired`] first.
    fn pairing_request(
        &self,
        channel: &str,
        sender: &str,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<(PairingRequest, bool), StoreError>;

    /// Approves the live request with `code` (case-insensitive; spaces and `-` ignored):
    /// removes it and records the sender as paired, atomically. `None` when no live request
    /// has that code.
    fn approve_pairing(
        &self,
        code: &str,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<Option<PairingRequest>, StoreError>;

    /// Live (unexpired) requests, oldest first.
    fn pending_pairings(
        &self,
        now_ms: u64,
        ttl: Duration,
    ) -> Result<Vec<PairingRequest>, StoreError>;

    /// Whether `sender` on `channel` was approved.
    fn is_paired(&self, channel: &str, sender: &str) -> Result<bool, StoreError>;

    /// Every approved sender, ordered by channel then sender.
    fn paired_senders(&self) -> Result<Vec<PairedSender>, StoreError>;

    /// Forgets an approval; returns whether there was one.
    fn revoke_pairing(&self, channel: &str, sender: &str) -> Result<bool, StoreError>;
}

/// The tests every [`Store`] backend must pass. Invoke with an expression that builds a
/// fresh store and a function that reopens it from the same place:
/// `store_conformance_tests!(fresh_store(), |s| reopen(s));`
#[macro_export]
macro_rules! store_conformance_tests {
    ($fresh:expr, $reopen:expr) => {
        use $crate::store::{HistoryEntry, IncomingEvent, JournalOutcome, PairedSender, SessionEntry, SessionRole, Store};

        fn event(n: u32, room: &str) -> IncomingEvent {
            IncomingEvent {
                room_id: ruma::RoomId::parse(room).unwrap(),
                event_id: ruma::EventId::parse(format!("$ev{n}")).unwrap(),
                json: serde_json::value::to_raw_value(&serde_json::json!({"n": n})).unwrap(),
            }
        }

        #[test]
        fn journals_and_lists_in_order() {
            let (store, _guard) = $fresh;
            let out = store.journal_transaction("t1", vec![event(1, "!a"), event(2, "!b")]).unwrap();
            let JournalOutcome::Journaled(journaled) = out else { panic!("expected Journaled") };
            let seqs: Vec<u64> = journaled.iter().map(|e| e.seq).collect();
            assert_eq!(seqs.len(), 2);
            assert!(seqs[0] < seqs[1]);
            store.journal_transaction("t2", vec![event(3, "!a")]).unwrap();
            let pending = store.pending_events(None, 100).unwrap();
            let ids: Vec<&str> = pending.iter().map(|e| e.event_id.as_str()).collect();
            assert_eq!(ids, ["$ev1", "$ev2", "$ev3"]);
            assert_eq!(pending[1].room_id.as_str(), "!b");
            assert_eq!(pending[2].json.get(), r#"{"n":3}"#);
        }

        #[test]
        fn a_repeated_txn_id_writes_nothing() {
            let (store, _guard) = $fresh;
            store.journal_transaction("t1", vec![event(1, "!a")]).unwrap();
            let again = store.journal_transaction("t1", vec![event(1, "!a"), event(9, "!a")]).unwrap();
            assert!(matches!(again, JournalOutcome::Duplicate));
            assert_eq!(store.pending_events(None, 100).unwrap().len(), 1);
        }

        #[test]
        fn an_event_is_journaled_once_whatever_carries_it() {
            let (store, _guard) = $fresh;
            let JournalOutcome::Journaled(first) =
                store.journal_transaction("t1", vec![event(1, "!a"), event(1, "!a"), event(2, "!a")]).unwrap()
            else {
                panic!("expected Journaled")
            };
            let ids: Vec<&str> = first.iter().map(|e| e.event_id.as_str()).collect();
            assert_eq!(ids, ["$ev1", "$ev2"], "a copy inside one transaction is left out");
            let JournalOutcome::Journaled(second) =
                store.journal_transaction("t2", vec![event(2, "!a"), event(3, "!a")]).unwrap()
            else {
                panic!("expected Journaled")
            };
            assert_eq!(second.len(), 1, "an event from an earlier transaction is left out");
            assert_eq!(second[0].event_id.as_str(), "$ev3");
            store.finish_events(&[first[0].seq]).unwrap();
            let JournalOutcome::Journaled(third) = store.journal_transaction("t3", vec![event(1, "!a")]).unwrap() else {
                panic!("expected Journaled")
            };
            assert!(third.is_empty(), "a finished event is not journaled again");
            assert_eq!(store.pending_count().unwrap(), 2);
        }

        #[test]
        fn sent_parts_are_remembered_per_answer_across_reopening() {
            let (store, guard) = $fresh;
            let (a, b) = (ruma::EventId::parse("$a").unwrap(), ruma::EventId::parse("$b").unwrap());
            store.record_sent_part("answer1", 1, &b).unwrap();
            store.record_sent_part("answer1", 0, &a).unwrap();
            store.record_sent_part("answer10", 0, &b).unwrap();
            let store = ($reopen)(store, &guard);
            assert_eq!(store.sent_parts("answer1").unwrap(), vec![a.clone(), b.clone()]);
            assert_eq!(store.sent_parts("answer10").unwrap(), vec![b]);
            assert!(store.sent_parts("answer2").unwrap().is_empty());
            assert_eq!(store.prune_dedupe_records($crate::unix_ms() + 1).unwrap(), 3);
            assert!(store.sent_parts("answer1").unwrap().is_empty());
        }

        #[test]
        fn the_journal_pages_in_order() {
            let (store, _guard) = $fresh;
            for n in 0..7u32 {
                store.journal_transaction(&format!("t{n}"), vec![event(n, "!a")]).unwrap();
            }
            let mut seen = Vec::new();
            let mut after = None;
            loop {
                let page = store.pending_events(after, 3).unwrap();
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

        #[test]
        fn an_empty_transaction_is_still_recorded() {
            let (store, _guard) = $fresh;
            assert!(matches!(store.journal_transaction("t0", vec![]).unwrap(), JournalOutcome::Journaled(v) if v.is_empty()));
            assert!(matches!(store.journal_transaction("t0", vec![]).unwrap(), JournalOutcome::Duplicate));
        }

        #[test]
        fn finishing_removes_from_the_journal_and_records_the_event() {
            let (store, _guard) = $fresh;
            let JournalOutcome::Journaled(journaled) =
                store.journal_transaction("t1", vec![event(1, "!a"), event(2, "!a")]).unwrap()
            else {
                panic!("expected Journaled")
            };
            let seqs: Vec<u64> = journaled.iter().map(|e| e.seq).collect();
            let ev1 = ruma::EventId::parse("$ev1").unwrap();
            assert!(store.was_journaled(&ev1).unwrap());
            assert!(!store.was_journaled(&ruma::EventId::parse("$never").unwrap()).unwrap());
            store.finish_events(&seqs[..1]).unwrap();
            assert!(store.was_journaled(&ev1).unwrap());
            let pending = store.pending_events(None, 100).unwrap();
            assert_eq!(pending.len(), 1);
            assert_eq!(pending[0].event_id.as_str(), "$ev2");
        }

        #[test]
        fn state_survives_reopening() {
            let (store, guard) = $fresh;
            let JournalOutcome::Journaled(journaled) =
                store.journal_transaction("t1", vec![event(1, "!a"), event(2, "!a")]).unwrap()
            else {
                panic!("expected Journaled")
            };
            let seqs: Vec<u64> = journaled.iter().map(|e| e.seq).collect();
            store.finish_events(&seqs[..1]).unwrap();
            let room = ruma::RoomId::parse("!a").unwrap();
            let entry = HistoryEntry {
                event_id: ruma::EventId::parse("$ev1").unwrap(),
                sender: ruma::UserId::parse("@alice:x").unwrap(),
                body: "hello".into(),
                ts: 1,
                thread_root: Some(ruma::EventId::parse("$root").unwrap()),
                routed_to: vec!["damon".into()],
            };
            store.append_history(&room, &entry).unwrap();
            let store = ($reopen)(store, &guard);
            assert!(matches!(store.journal_transaction("t1", vec![]).unwrap(), JournalOutcome::Duplicate));
            assert!(store.was_journaled(&ruma::EventId::parse("$ev1").unwrap()).unwrap());
            let pending = store.pending_events(None, 100).unwrap();
            assert_eq!(pending.len(), 1);
            assert_eq!(pending[0].event_id.as_str(), "$ev2");
            assert_eq!(store.recent_history(&room, 10).unwrap(), vec![entry]);
            // New sequence numbers still sort after the ones journaled before reopening.
            let JournalOutcome::Journaled(later) = store.journal_transaction("t2", vec![event(3, "!a")]).unwrap() else {
                panic!("expected Journaled")
            };
            assert!(later[0].seq > seqs[1]);
        }

        #[test]
        fn pruning_forgets_only_old_dedupe_records() {
            let (store, _guard) = $fresh;
            let JournalOutcome::Journaled(journaled) = store.journal_transaction("t1", vec![event(1, "!a")]).unwrap()
            else {
                panic!("expected Journaled")
            };
            store.finish_events(&[journaled[0].seq]).unwrap();
            let recorded_before = $crate::unix_ms().saturating_sub(3_600_000);
            assert_eq!(store.prune_dedupe_records(recorded_before).unwrap(), 0);
            assert!(store.was_journaled(&journaled[0].event_id).unwrap());
            assert_eq!(store.prune_dedupe_records($crate::unix_ms() + 1).unwrap(), 2);
            assert!(!store.was_journaled(&journaled[0].event_id).unwrap());
            assert!(matches!(store.journal_transaction("t1", vec![]).unwrap(), JournalOutcome::Journaled(_)));
        }

        #[test]
        fn history_is_trimmed_to_its_retention_and_reads_agree_after_reopening() {
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
                store.append_history(&room, &entry).unwrap();
                if n == 5 {
                    // Warm the cache early so later appends go through it.
                    assert_eq!(store.recent_history(&room, 3).unwrap().len(), 3);
                }
            }
            let cached: Vec<String> = store.recent_history(&room, 100).unwrap().into_iter().map(|e| e.body).collect();
            assert_eq!(cached.len(), 100);
            assert_eq!(cached.last().unwrap(), &format!("line {}", total - 1));
            let store = ($reopen)(store, &guard);
            let all = store.recent_history(&room, 10 * total).unwrap();
            assert!(all.len() < total, "trimmed: {} of {total} lines kept", all.len());
            assert!(all.len() >= $crate::store::HISTORY_PER_ROOM);
            let from_disk: Vec<String> = store.recent_history(&room, 100).unwrap().into_iter().map(|e| e.body).collect();
            assert_eq!(from_disk, cached);
        }

        #[test]
        fn history_is_per_room_bounded_and_oldest_first() {
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
                store.append_history(&a, &entry).unwrap();
            }
            store
                .append_history(&b, &HistoryEntry {
                    event_id: ruma::EventId::parse("$other").unwrap(),
                    sender: ruma::UserId::parse("@bob:x").unwrap(),
                    body: "elsewhere".into(),
                    ts: 9,
                    thread_root: None,
                    routed_to: Vec::new(),
                })
                .unwrap();
            let bodies: Vec<String> = store.recent_history(&a, 3).unwrap().into_iter().map(|e| e.body).collect();
            assert_eq!(bodies, ["line 2", "line 3", "line 4"]);
            assert_eq!(store.recent_history(&b, 3).unwrap().len(), 1);
            assert!(store.recent_history(&ruma::RoomId::parse("!none").unwrap(), 3).unwrap().is_empty());
        }

        /// Pairing requests live an hour in these tests; `T0` is an arbitrary unix ms.
        const PAIRING_TTL: std::time::Duration = std::time::Duration::from_secs(3600);
        const PAIRING_TTL_MS: u64 = 3_600_000;
        const T0: u64 = 1_700_000_000_000;

        fn line(role: SessionRole, content: &str) -> SessionEntry {
            SessionEntry { role, content: content.into(), ts: 1 }
        }

        #[test]
        fn sessions_are_separate_bounded_and_oldest_first() {
            let (store, _guard) = $fresh;
            for i in 0..5 {
                store
                    .append_session("damon\u{1f}!a", &[line(SessionRole::User, &format!("q{i}")), line(SessionRole::Assistant, &format!("a{i}"))], 4)
                    .unwrap();
            }
            store.append_session("damon\u{1f}!a\u{1f}$t", &[line(SessionRole::User, "in thread")], 4).unwrap();
            let contents: Vec<String> = store.session("damon\u{1f}!a").unwrap().into_iter().map(|e| e.content).collect();
            assert_eq!(contents, ["q3", "a3", "q4", "a4"]);
            assert_eq!(store.session("damon\u{1f}!a\u{1f}$t").unwrap().len(), 1);
            assert!(store.session("coder\u{1f}!a").unwrap().is_empty());
        }

        #[test]
        fn clearing_a_session_leaves_the_others_and_survives_reopening() {
            let (store, guard) = $fresh;
            {
                store.append_session("damon\u{1f}!a", &[line(SessionRole::User, "one"), line(SessionRole::Assistant, "two")], 10).unwrap();
                store.append_session("damon\u{1f}!a\u{1f}$t", &[line(SessionRole::User, "thread")], 10).unwrap();
                store.append_session("coder\u{1f}!a", &[line(SessionRole::User, "other")], 10).unwrap();
                assert_eq!(store.clear_session("damon\u{1f}!a").unwrap(), 2);
                assert_eq!(store.clear_session("damon\u{1f}!a").unwrap(), 0);
            }
            let store = $reopen(store, &guard);
            assert!(store.session("damon\u{1f}!a").unwrap().is_empty());
            assert_eq!(store.session("damon\u{1f}!a\u{1f}$t").unwrap()[0].content, "thread");
            assert_eq!(store.session("coder\u{1f}!a").unwrap()[0].content, "other");
        }

        fn assert_pairing_code(code: &str) {
            assert_eq!(code.chars().count(), 8, "code {code:?} must have 8 characters");
            assert!(
                code.chars().all(|c| "ABCDEFGHJKLMNPQRSTUVWXYZ23456789".contains(c)),
                "code {code:?} must use only the unambiguous alphabet"
            );
        }

        /// Issues a request for `sender` on `channel` at `now` and approves it.
        fn pair<S: Store>(store: &S, channel: &str, sender: &str, now: u64) {
            let (request, _) = store.pairing_request(channel, sender, now, PAIRING_TTL).unwrap();
            assert!(store.approve_pairing(&request.code, now, PAIRING_TTL).unwrap().is_some());
        }

        #[test]
        fn a_pairing_request_is_reused_while_live() {
            let (store, _guard) = $fresh;
            let (first, created) = store.pairing_request("matrix", "@eve:x", T0, PAIRING_TTL).unwrap();
            assert!(created);
            assert_pairing_code(&first.code);
            assert_eq!((first.channel.as_str(), first.sender.as_str(), first.created_ms), ("matrix", "@eve:x", T0));
            // Still live at exactly `ttl` old: the same request, not a new one.
            let (again, created) =
                store.pairing_request("matrix", "@eve:x", T0 + PAIRING_TTL_MS, PAIRING_TTL).unwrap();
            assert!(!created);
            assert_eq!(again, first);
            assert_eq!(store.pending_pairings(T0 + 1, PAIRING_TTL).unwrap(), vec![first]);
        }

        #[test]
        fn each_sender_gets_its_own_code() {
            let (store, _guard) = $fresh;
            let mut codes = std::collections::HashSet::new();
            for n in 0..40 {
                let (request, created) =
                    store.pairing_request("matrix", &format!("@user{n}:x"), T0 + n, PAIRING_TTL).unwrap();
                assert!(created);
                assert_pairing_code(&request.code);
                assert!(codes.insert(request.code), "codes must be unique");
            }
            // The same id on another channel is another person.
            let (other, created) = store.pairing_request("telegram", "@user0:x", T0, PAIRING_TTL).unwrap();
            assert!(created);
            assert!(!codes.contains(&other.code));
            assert_eq!(store.pending_pairings(T0 + 100, PAIRING_TTL).unwrap().len(), 41);
        }

        #[test]
        fn an_expired_pairing_request_is_replaced() {
            let (store, _guard) = $fresh;
            let (old, _) = store.pairing_request("matrix", "@eve:x", T0, PAIRING_TTL).unwrap();
            let later = T0 + PAIRING_TTL_MS + 1;
            let (new, created) = store.pairing_request("matrix", "@eve:x", later, PAIRING_TTL).unwrap();
            assert!(created);
            assert_pairing_code(&new.code);
            assert_ne!(new.code, old.code);
            assert_eq!(new.created_ms, later);
            assert_eq!(store.pending_pairings(later, PAIRING_TTL).unwrap(), vec![new.clone()]);
            // The old code is dead; the new one works.
            assert_eq!(store.approve_pairing(&old.code, later, PAIRING_TTL).unwrap(), None);
            assert!(!store.is_paired("matrix", "@eve:x").unwrap());
            assert_eq!(store.approve_pairing(&new.code, later, PAIRING_TTL).unwrap(), Some(new));
        }

        #[test]
        fn approving_pairs_the_sender_once() {
            let (store, _guard) = $fresh;
            let (request, _) = store.pairing_request("matrix", "@eve:x", T0, PAIRING_TTL).unwrap();
            let (bystander, _) = store.pairing_request("matrix", "@bob:x", T0, PAIRING_TTL).unwrap();
            assert!(!store.is_paired("matrix", "@eve:x").unwrap());
            // As an admin might type it: lower case, dashed, padded.
            let typed = format!(" {}-{} ", request.code[..4].to_lowercase(), request.code[4..].to_lowercase());
            let approved = store.approve_pairing(&typed, T0 + 10, PAIRING_TTL).unwrap();
            assert_eq!(approved, Some(request.clone()));
            assert!(store.is_paired("matrix", "@eve:x").unwrap());
            assert!(!store.is_paired("matrix", "@bob:x").unwrap());
            assert_eq!(store.pending_pairings(T0 + 10, PAIRING_TTL).unwrap(), vec![bystander]);
            assert_eq!(
                store.paired_senders().unwrap(),
                vec![PairedSender { channel: "matrix".into(), sender: "@eve:x".into(), approved_ms: T0 + 10 }]
            );
            assert_eq!(store.approve_pairing(&request.code, T0 + 20, PAIRING_TTL).unwrap(), None);
            assert_eq!(store.paired_senders().unwrap()[0].approved_ms, T0 + 10);
        }

        #[test]
        fn an_unknown_or_expired_code_approves_nothing() {
            let (store, _guard) = $fresh;
            let (request, _) = store.pairing_request("matrix", "@eve:x", T0, PAIRING_TTL).unwrap();
            // A valid-looking code that differs from the issued one in its first character.
            let wrong: String = std::iter::once(if request.code.starts_with('A') { 'B' } else { 'A' })
                .chain(request.code.chars().skip(1))
                .collect();
            for code in [wrong.as_str(), "", "-", &request.code[..7]] {
                assert_eq!(store.approve_pairing(code, T0, PAIRING_TTL).unwrap(), None, "code {code:?}");
            }
            assert_eq!(store.approve_pairing(&request.code, T0 + PAIRING_TTL_MS + 1, PAIRING_TTL).unwrap(), None);
            assert!(!store.is_paired("matrix", "@eve:x").unwrap());
            assert!(store.paired_senders().unwrap().is_empty());
            assert_eq!(store.pending_pairings(T0, PAIRING_TTL).unwrap(), vec![request]);
        }

        #[test]
        fn pending_pairings_are_live_and_oldest_first() {
            let (store, _guard) = $fresh;
            let (a, _) = store.pairing_request("matrix", "@a:x", T0, PAIRING_TTL).unwrap();
            let (b, _) = store.pairing_request("matrix", "@b:x", T0 + 10, PAIRING_TTL).unwrap();
            let (c, _) = store.pairing_request("telegram", "42", T0 + 5, PAIRING_TTL).unwrap();
            assert_eq!(store.pending_pairings(T0 + 10, PAIRING_TTL).unwrap(), vec![a, c.clone(), b.clone()]);
            // `a` is now older than the ttl; `c` is exactly ttl old and still live.
            assert_eq!(store.pending_pairings(T0 + 5 + PAIRING_TTL_MS, PAIRING_TTL).unwrap(), vec![c, b]);
            assert!(store.pending_pairings(T0 + 11 + PAIRING_TTL_MS, PAIRING_TTL).unwrap().is_empty());
        }

        #[test]
        fn pairing_is_per_channel_and_ordered() {
            let (store, _guard) = $fresh;
            pair(&store, "matrix", "@z:x", T0);
            pair(&store, "m", "@b:x", T0 + 1);
            pair(&store, "matrix", "@a:x", T0 + 2);
            pair(&store, "telegram", "@a:x", T0 + 3);
            assert!(store.is_paired("matrix", "@z:x").unwrap());
            assert!(!store.is_paired("telegram", "@z:x").unwrap());
            assert!(!store.is_paired("m", "@a:x").unwrap());
            assert!(!store.is_paired("matrix", "@z").unwrap());
            let listed: Vec<(String, String)> =
                store.paired_senders().unwrap().into_iter().map(|p| (p.channel, p.sender)).collect();
            let expected = [("m", "@b:x"), ("matrix", "@a:x"), ("matrix", "@z:x"), ("telegram", "@a:x")];
            assert_eq!(listed, expected.map(|(c, s)| (c.to_string(), s.to_string())));
        }

        #[test]
        fn revoking_forgets_an_approval() {
            let (store, _guard) = $fresh;
            pair(&store, "matrix", "@eve:x", T0);
            pair(&store, "matrix", "@bob:x", T0);
            assert!(!store.revoke_pairing("telegram", "@eve:x").unwrap());
            assert!(store.revoke_pairing("matrix", "@eve:x").unwrap());
            assert!(!store.is_paired("matrix", "@eve:x").unwrap());
            assert!(!store.revoke_pairing("matrix", "@eve:x").unwrap());
            let left: Vec<String> = store.paired_senders().unwrap().into_iter().map(|p| p.sender).collect();
            assert_eq!(left, ["@bob:x"]);
            // A revoked sender can pair again with a new request.
            let (request, created) = store.pairing_request("matrix", "@eve:x", T0 + 1, PAIRING_TTL).unwrap();
            assert!(created);
            assert!(store.approve_pairing(&request.code, T0 + 1, PAIRING_TTL).unwrap().is_some());
            assert!(store.is_paired("matrix", "@eve:x").unwrap());
        }

        #[test]
        fn pairings_survive_reopening() {
            let (store, guard) = $fresh;
            pair(&store, "matrix", "@eve:x", T0);
            let (waiting, _) = store.pairing_request("matrix", "@bob:x", T0 + 1, PAIRING_TTL).unwrap();
            let store = ($reopen)(store, &guard);
            assert!(store.is_paired("matrix", "@eve:x").unwrap());
            assert_eq!(
                store.paired_senders().unwrap(),
                vec![PairedSender { channel: "matrix".into(), sender: "@eve:x".into(), approved_ms: T0 }]
            );
            assert_eq!(store.pending_pairings(T0 + 2, PAIRING_TTL).unwrap(), vec![waiting.clone()]);
            let (again, created) = store.pairing_request("matrix", "@bob:x", T0 + 2, PAIRING_TTL).unwrap();
            assert!(!created);
            assert_eq!(again, waiting);
            assert_eq!(store.approve_pairing(&waiting.code, T0 + 3, PAIRING_TTL).unwrap(), Some(waiting));
            let store = ($reopen)(store, &guard);
            assert!(store.is_paired("matrix", "@bob:x").unwrap());
            assert!(store.pending_pairings(T0 + 3, PAIRING_TTL).unwrap().is_empty());
        }
    };
}

#[cfg(test)]
mod tests {
    use super::{
        PAIRING_CODE_ALPHABET, PAIRING_CODE_LEN, normalize_pairing_code, random_pairing_code,
    };

    #[test]
    fn pairing_codes_are_normalized_as_typed() {
        assert_eq!(normalize_pairing_code("abcd-efgh"), "ABCDEFGH");
        assert_eq!(normalize_pairing_code(" Ab Cd - 2345 "), "ABCD2345");
        assert_eq!(normalize_pairing_code("ABCDEFGH"), "ABCDEFGH");
        assert_eq!(normalize_pairing_code(" - "), "");
    }

    #[test]
    fn random_pairing_codes_use_the_alphabet() {
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
