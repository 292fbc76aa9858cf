//! The journal's feed: how freshly journaled events reach the inbox, and the bound on how
//! many may wait there.
//!
//! The transaction handler journals events, then [`FeedSender::submit`]s them; the inbox
//! takes them from the [`FeedReceiver`]. Nothing here is unbounded: the handler first waits
//! in [`Backlog::wait_for_room`] until fewer than the configured number of events are
//! journaled but unfinished, so a homeserver that outruns the inbox sees slower acks —
//! Synapse then simply holds its next transaction — instead of agentbus queueing without
//! limit. The counters double as the `agentbus_journal_*` metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Notify, mpsc};

use super::JournaledEvent;

/// Journaled-but-unfinished events: their count, its bound, and the intake waiting on it.
#[derive(Debug)]
pub struct Backlog {
    max: u64,
    /// Events journaled by this process plus those found in the journal at startup.
    entered: AtomicU64,
    /// Events finished (answered, or nothing to answer) by this process.
    finished: AtomicU64,
    /// Events journaled by the transaction handler (a counter for metrics).
    journaled: AtomicU64,
    freed: Notify,
}

impl Backlog {
    /// A backlog that lets at most `max` events wait.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1) as u64,
            entered: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            journaled: AtomicU64::new(0),
            freed: Notify::new(),
        })
    }

    /// Journaled events not finished yet.
    pub fn pending(&self) -> u64 {
        self.entered
            .load(Ordering::Acquire)
            .saturating_sub(self.finished.load(Ordering::Acquire))
    }

    /// Events the transaction handler journaled since startup.
    pub fn journaled_total(&self) -> u64 {
        self.journaled.load(Ordering::Relaxed)
    }

    /// Events finished since startup.
    pub fn finished_total(&self) -> u64 {
        self.finished.load(Ordering::Relaxed)
    }

    /// Waits until fewer than the bound are pending. A transaction of many events may
    /// overshoot the bound once; the next waits until the inbox has caught up.
    pub async fn wait_for_room(&self) {
        loop {
            let freed = self.freed.notified();
            if self.pending() < self.max {
                return;
            }
            freed.await;
        }
    }

    /// Counts events that entered the journal before this process started (replay).
    pub fn add_replayed(&self, n: usize) {
        self.entered.fetch_add(n as u64, Ordering::AcqRel);
    }

    /// Counts events handed to the inbox again (a redelivered transaction's still-pending
    /// events): they wait like any other, but were not journaled again.
    pub fn add_resubmitted(&self, n: usize) {
        self.entered.fetch_add(n as u64, Ordering::AcqRel);
    }

    /// Counts events the transaction handler journaled.
    pub fn add_journaled(&self, n: usize) {
        self.journaled.fetch_add(n as u64, Ordering::Relaxed);
        self.entered.fetch_add(n as u64, Ordering::AcqRel);
    }

    /// Counts finished events and wakes a waiting intake.
    pub fn finish(&self, n: usize) {
        self.finished.fetch_add(n as u64, Ordering::AcqRel);
        self.freed.notify_waiters();
    }
}

/// The transaction handler's end of the feed.
#[derive(Clone)]
pub struct FeedSender {
    tx: mpsc::UnboundedSender<Vec<JournaledEvent>>,
    backlog: Arc<Backlog>,
}

/// The inbox's end of the feed.
pub struct FeedReceiver {
    rx: mpsc::UnboundedReceiver<Vec<JournaledEvent>>,
}

/// A connected feed whose backlog is bounded by `backlog`. The channel itself needs no
/// bound: nothing enters it without passing [`Backlog::wait_for_room`].
pub fn feed(backlog: Arc<Backlog>) -> (FeedSender, FeedReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (FeedSender { tx, backlog }, FeedReceiver { rx })
}

impl FeedSender {
    /// The backlog this feed counts into.
    pub fn backlog(&self) -> &Arc<Backlog> {
        &self.backlog
    }

    /// Hands journaled events to the inbox. If the inbox has stopped (shutdown), they stay
    /// in the journal and are processed on the next start.
    pub fn submit(&self, events: Vec<JournaledEvent>) {
        if events.is_empty() {
            return;
        }
        self.backlog.add_journaled(events.len());
        self.send(events);
    }

    /// Hands events journaled earlier to the inbox again (it skips those it has), without
    /// counting them as journaled: `agentbus_events_journaled_total` stays a count of
    /// journal writes.
    pub fn resubmit(&self, events: Vec<JournaledEvent>) {
        if events.is_empty() {
            return;
        }
        self.backlog.add_resubmitted(events.len());
        self.send(events);
    }

    fn send(&self, events: Vec<JournaledEvent>) {
        if self.tx.send(events).is_err() {
            tracing::debug!("inbox stopped; events stay journaled for the next start");
        }
    }
}

impl FeedReceiver {
    /// The next submitted batch; `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<Vec<JournaledEvent>> {
        self.rx.recv().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn intake_waits_while_the_backlog_is_full_and_resumes_when_events_finish() {
        let backlog = Backlog::new(3);
        backlog.add_replayed(2);
        backlog.wait_for_room().await;
        backlog.add_journaled(2);
        assert_eq!(backlog.pending(), 4);
        let waiting = tokio::spawn({
            let backlog = backlog.clone();
            async move { backlog.wait_for_room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a full backlog holds the intake");
        backlog.finish(1);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "still 3 of 3 pending");
        backlog.finish(1);
        waiting.await.unwrap();
        assert_eq!(backlog.pending(), 2);
        assert_eq!(backlog.journaled_total(), 2);
        assert_eq!(backlog.finished_total(), 2);
    }

    #[test]
    fn a_resubmitted_event_waits_but_is_not_counted_as_journaled_again() {
        let backlog = Backlog::new(10);
        let (sender, _receiver) = feed(backlog.clone());
        backlog.add_journaled(1);
        sender.resubmit(vec![JournaledEvent {
            seq: 7,
            room_id: ruma::owned_room_id!("!r"),
            event_id: ruma::owned_event_id!("$e"),
            json: serde_json::value::to_raw_value(&serde_json::json!({})).unwrap(),
        }]);
        assert_eq!(backlog.journaled_total(), 1);
        assert_eq!(
            backlog.pending(),
            2,
            "the inbox counts it off when it skips it"
        );
    }
}
