//! The embedded engines side by side, through the same `Backend` calls the running binary
//! makes for an event no agent answers: journal a 100-event transaction (synced to disk),
//! then finish the 100 with their history lines in one write. One thread, no
//! HTTP: what the storage engine alone allows.
//!
//! `cargo bench --bench engines`

use std::time::Duration;

use agentbus::store::embedded::Backend;
use agentbus::store::{FjallBackend, HistoryEntry, IncomingEvent, JournalOutcome, SledBackend};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};

const EVENTS: usize = 100;
const ROOMS: usize = 1000;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn event(n: usize) -> IncomingEvent {
    let room_id = OwnedRoomId::try_from(format!("!room{}:localhost", n % ROOMS)).unwrap();
    let event_id = OwnedEventId::try_from(format!("$event{n}")).unwrap();
    let json = serde_json::value::to_raw_value(&serde_json::json!({
        "type": "m.room.message", "room_id": room_id, "event_id": event_id,
        "sender": "@load:localhost", "origin_server_ts": 1_700_000_000_000u64,
        "content": {"msgtype": "m.text", "body": format!("load message number {n}")},
    }))
    .unwrap();
    IncomingEvent {
        room_id,
        event_id,
        json,
    }
}

/// One transaction in and out: journal, history per event, one finish.
fn round(backend: &dyn Backend, txn: usize, sender: &OwnedUserId) {
    let events: Vec<IncomingEvent> = (txn * EVENTS..(txn + 1) * EVENTS).map(event).collect();
    let JournalOutcome::Journaled(journaled) = backend
        .journal_transaction(&format!("t{txn}"), events, 1_700_000_000_000)
        .unwrap()
    else {
        panic!("a fresh txnId is journaled");
    };
    let lines: Vec<(OwnedRoomId, HistoryEntry)> = journaled
        .iter()
        .map(|event| {
            let line = HistoryEntry {
                event_id: event.event_id.clone(),
                sender: sender.clone(),
                body: "load message".into(),
                ts: 1_700_000_000_000,
                thread_root: None,
                routed_to: Vec::new(),
            };
            (event.room_id.clone(), line)
        })
        .collect();
    let seqs: Vec<u64> = journaled.iter().map(|e| e.seq).collect();
    backend.finish_events(&seqs, &lines).unwrap();
}

fn engines(c: &mut Criterion) {
    let sender = OwnedUserId::try_from("@load:localhost").unwrap();
    let mut group = c.benchmark_group("transaction_in_and_out");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.measurement_time(Duration::from_secs(10));
    let dirs = tempfile::tempdir().unwrap();
    let fjall = FjallBackend::open(&dirs.path().join("fjall")).unwrap();
    let sled = SledBackend::open(&dirs.path().join("sled")).unwrap();
    for (name, backend) in [("fjall", &fjall as &dyn Backend), ("sled", &sled)] {
        let mut txn = 0;
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                round(backend, txn, &sender);
                txn += 1;
            })
        });
    }
    group.finish();
}

criterion_group!(benches, engines);
criterion_main!(benches);
