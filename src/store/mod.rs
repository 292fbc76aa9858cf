//! Durable state behind one narrow trait: the transaction journal, the processed-event
//! record and room history.
//!
//! Callers hold an `Arc<dyn Store>`; [`SledStore`] is the embedded default. Every backend
//! runs the same [`store_conformance_tests!`] so a second one is provably equivalent.

mod sled;

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use self::sled::SledStore;

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
}

/// A storage failure; the message names what was being done.
#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

/// Durable state of the appservice.
pub trait Store: Send + Sync {
    /// Records `txn_id` and journals `events` in one atomic, flushed write — unless the
    /// txnId was recorded before, in which case nothing is written.
    fn journal_transaction(
        &self,
        txn_id: &str,
        events: Vec<IncomingEvent>,
    ) -> Result<JournalOutcome, StoreError>;

    /// Every journaled event not yet finished, in journal order.
    fn pending_events(&self) -> Result<Vec<JournaledEvent>, StoreError>;

    /// Whether `event_id` was finished before (under any transaction).
    fn is_processed(&self, event_id: &ruma::EventId) -> Result<bool, StoreError>;

    /// Removes journal entry `seq` and records `event_id` as processed, atomically.
    fn finish_event(&self, seq: u64, event_id: &ruma::EventId) -> Result<(), StoreError>;

    /// Forgets txnIds and processed event_ids recorded more than `age` ago; returns how
    /// many records were removed. Homeservers redeliver within minutes, not days.
    fn prune_dedupe_records(&self, age: std::time::Duration) -> Result<usize, StoreError>;

    /// Appends a line to a room's history.
    fn append_history(&self, room_id: &RoomId, entry: &HistoryEntry) -> Result<(), StoreError>;

    /// The last `limit` lines of a room's history, oldest first.
    fn recent_history(
        &self,
        room_id: &RoomId,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError>;
}

/// The tests every [`Store`] backend must pass. Invoke with an expression that builds a
/// fresh store and a function that reopens it from the same place:
/// `store_conformance_tests!(fresh_store(), |s| reopen(s));`
#[macro_export]
macro_rules! store_conformance_tests {
    ($fresh:expr, $reopen:expr) => {
        use $crate::store::{HistoryEntry, IncomingEvent, JournalOutcome, Store};

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
            let pending = store.pending_events().unwrap();
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
            assert_eq!(store.pending_events().unwrap().len(), 1);
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
            assert!(!store.is_processed(&ev1).unwrap());
            store.finish_event(seqs[0], &ev1).unwrap();
            assert!(store.is_processed(&ev1).unwrap());
            let pending = store.pending_events().unwrap();
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
            store.finish_event(seqs[0], &ruma::EventId::parse("$ev1").unwrap()).unwrap();
            let room = ruma::RoomId::parse("!a").unwrap();
            let entry = HistoryEntry {
                event_id: ruma::EventId::parse("$ev1").unwrap(),
                sender: ruma::UserId::parse("@alice:x").unwrap(),
                body: "hello".into(),
                ts: 1,
            };
            store.append_history(&room, &entry).unwrap();
            let store = ($reopen)(store, &guard);
            assert!(matches!(store.journal_transaction("t1", vec![]).unwrap(), JournalOutcome::Duplicate));
            assert!(store.is_processed(&ruma::EventId::parse("$ev1").unwrap()).unwrap());
            let pending = store.pending_events().unwrap();
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
            store.finish_event(journaled[0].seq, &journaled[0].event_id).unwrap();
            assert_eq!(store.prune_dedupe_records(std::time::Duration::from_secs(3600)).unwrap(), 0);
            assert!(store.is_processed(&journaled[0].event_id).unwrap());
            std::thread::sleep(std::time::Duration::from_millis(5));
            assert_eq!(store.prune_dedupe_records(std::time::Duration::ZERO).unwrap(), 2);
            assert!(!store.is_processed(&journaled[0].event_id).unwrap());
            assert!(matches!(store.journal_transaction("t1", vec![]).unwrap(), JournalOutcome::Journaled(_)));
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
                };
                store.append_history(&a, &entry).unwrap();
            }
            store
                .append_history(&b, &HistoryEntry {
                    event_id: ruma::EventId::parse("$other").unwrap(),
                    sender: ruma::UserId::parse("@bob:x").unwrap(),
                    body: "elsewhere".into(),
                    ts: 9,
                })
                .unwrap();
            let bodies: Vec<String> = store.recent_history(&a, 3).unwrap().into_iter().map(|e| e.body).collect();
            assert_eq!(bodies, ["line 2", "line 3", "line 4"]);
            assert_eq!(store.recent_history(&b, 3).unwrap().len(), 1);
            assert!(store.recent_history(&ruma::RoomId::parse("!none").unwrap(), 3).unwrap().is_empty());
        }
    };
}
