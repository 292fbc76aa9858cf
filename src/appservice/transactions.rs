//! `PUT /_matrix/app/v1/transactions/{txnId}` ([spec](https://spec.matrix.org/v1.18/application-service-api/#put_matrixappv1transactionstxnid))
//!
//! Synapse keeps one transaction in flight, times out after 60 s and backs off for up to
//! 512 s after a single failure, so this handler only does durable bookkeeping: dedupe
//! the txnId, journal the events and the txnId in one atomic flushed write, hand them to
//! the inbox, answer 200. A redelivered txnId answers 200 and writes nothing.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use ruma::{OwnedEventId, OwnedRoomId, OwnedTransactionId, TransactionId};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::ApiError;
use super::AppState;
use crate::store::{IncomingEvent, JournalOutcome};

/// The key a transaction is deduplicated by: its txnId and a digest of its event IDs. A
/// retry carries the same events (the homeserver re-serialises them, so the bytes differ,
/// but the IDs do not); a homeserver whose database was reset starts counting txnIds from 1
/// again, and those new transactions must not be mistaken for retries of old ones.
fn dedupe_key(txn_id: &TransactionId, events: &[IncomingEvent]) -> OwnedTransactionId {
    use sha2::{Digest, Sha256};
    let mut digest = Sha256::new();
    for event in events {
        digest.update(event.event_id.as_bytes());
        digest.update([0]);
    }
    format!("{txn_id}\0{}", &hex::encode(digest.finalize())[..16]).into()
}

#[derive(Deserialize)]
struct TransactionBody {
    events: Vec<Box<RawValue>>,
    // `ephemeral` (typing, receipts) is best-effort and unused so far; `de.*` and
    // `org.matrix.msc*` extensions are ignored alike.
}

/// The parts of an event the journal indexes by.
#[derive(Deserialize)]
struct EventIds {
    event_id: OwnedEventId,
    room_id: OwnedRoomId,
}

pub async fn put_transaction(
    State(state): State<Arc<AppState>>,
    txn_id: Result<Path<OwnedTransactionId>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(txn_id) = txn_id?;
    let events = parse_transaction(&body?)?;
    let count = events.len();
    // Back-pressure: while the inbox has a full backlog, the ack waits (the homeserver
    // holds its next transaction meanwhile), so nothing queues without bound.
    state.feed.backlog().wait_for_room().await;
    let txn = dedupe_key(&txn_id, &events);
    let event_ids: Vec<ruma::OwnedEventId> = events.iter().map(|e| e.event_id.clone()).collect();
    let outcome = state
        .journal
        .journal_transaction(&txn, events, crate::unix_ms())
        .await
        .map_err(|e| {
            metrics::counter!("agentbus_transactions_total", "outcome" => "refused").increment(1);
            tracing::error!(txn_id = ?txn_id, error = %e, "could not journal transaction; the homeserver will retry");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", e.to_string())
        })?;
    match outcome {
        JournalOutcome::Duplicate => {
            metrics::counter!("agentbus_transactions_total", "outcome" => "duplicate").increment(1);
            tracing::debug!(txn_id = ?txn_id, "transaction already journaled; acknowledging again");
            // A refused attempt may have been written after all: make sure the inbox has
            // what is still waiting (it skips what it has).
            match state.journal.pending_of(&event_ids).await {
                Ok(pending) => state.feed.resubmit(pending),
                Err(e) => {
                    tracing::error!(txn_id = ?txn_id, error = %e, "could not check a redelivered transaction; the homeserver will retry");
                    return Err(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "M_UNKNOWN",
                        e.to_string(),
                    ));
                }
            }
        }
        JournalOutcome::Journaled(journaled) => {
            metrics::counter!("agentbus_transactions_total", "outcome" => "accepted").increment(1);
            metrics::counter!("agentbus_events_received_total").increment(count as u64);
            tracing::debug!(txn_id = ?txn_id, events = count, "transaction journaled");
            state.feed.submit(journaled);
        }
    }
    Ok(Json(serde_json::json!({})))
}

/// Parses a transaction body into journal-ready events. Not JSON → `M_NOT_JSON`; JSON of
/// the wrong shape → `M_BAD_JSON`. An event without `event_id`/`room_id` cannot be
/// journaled or answered; it is logged and skipped rather than failing the transaction,
/// which the homeserver would otherwise redeliver forever.
fn parse_transaction(body: &[u8]) -> Result<Vec<IncomingEvent>, ApiError> {
    let parsed: TransactionBody = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::new(
            StatusCode::BAD_REQUEST,
            "M_BAD_JSON",
            format!("transaction body has the wrong shape: {e}"),
        ),
        _ => ApiError::new(
            StatusCode::BAD_REQUEST,
            "M_NOT_JSON",
            format!("transaction body is not valid JSON: {e}"),
        ),
    })?;
    let mut events = Vec::with_capacity(parsed.events.len());
    for json in parsed.events {
        match serde_json::from_str::<EventIds>(json.get()) {
            Ok(ids) => events.push(IncomingEvent {
                room_id: ids.room_id,
                event_id: ids.event_id,
                json,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "skipping an event without a valid event_id and room_id")
            }
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_classified() {
        let not_json = parse_transaction(b"{not json").unwrap_err();
        assert_eq!(
            (not_json.status, not_json.errcode),
            (StatusCode::BAD_REQUEST, "M_NOT_JSON")
        );
        let wrong_shape = parse_transaction(br#"{"events": {"a": 1}}"#).unwrap_err();
        assert_eq!(wrong_shape.errcode, "M_BAD_JSON");
        let missing = parse_transaction(br#"{"ephemeral": []}"#).unwrap_err();
        assert_eq!(missing.errcode, "M_BAD_JSON");
    }

    #[test]
    fn events_without_ids_are_skipped_and_the_rest_kept_in_order() {
        let body = br#"{"events": [
            {"event_id": "$1", "room_id": "!r:hs", "type": "m.room.message"},
            {"type": "m.typing"},
            {"event_id": "$2", "room_id": "!r2", "type": "m.room.message"}
        ]}"#;
        let events = parse_transaction(body).unwrap();
        let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids, ["$1", "$2"]);
        assert!(events[1].json.get().contains("\"!r2\""));
    }
}
