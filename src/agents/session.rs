//! Session lanes: one run at a time per session (agent + room + thread). Jobs that reach
//! a busy session wait in its bounded queue and run in order, or — with `queue: collect`
//! — replies to room messages waiting together become the next turn. Different sessions
//! run in parallel. Every job carries a cancellation token, registered under its session
//! until its outcome is sent, so a run can be stopped by its handle or with its session.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::future::{FutureExt, select_all};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{AgentRuntime, Assignment, Ended, Job, Outcome, RunHandle};
use crate::config::QueueMode;
use crate::store::SessionKey;

/// A lane with nothing to do for this long ends; the next message starts a new one.
const LANE_IDLE: Duration = Duration::from_secs(120);

/// A job, its cancellation token, and who waits for its outcome.
pub(super) struct Queued {
    job: Job,
    /// Which registered run it is (see [`AgentRuntime::cancel_session`]).
    id: u64,
    cancel: CancellationToken,
    done: oneshot::Sender<Outcome>,
}

/// What submitting a job did.
#[derive(Debug)]
pub enum Submitted {
    /// Queued: `outcome` resolves when the run is over; `handle` cancels it.
    Queued {
        outcome: oneshot::Receiver<Outcome>,
        handle: RunHandle,
    },
    /// The session's queue is full; nothing was queued.
    Busy,
    /// The job names an agent that is not configured, or has no inputs: a bug of the
    /// caller's (logged); nothing was queued.
    Refused,
}

/// The tokens of one run (at least one): a collected turn stops when any of its askers
/// cancels.
pub(super) struct Cancel(Vec<CancellationToken>);

impl Cancel {
    /// Resolves once any token is cancelled.
    pub(super) async fn cancelled(&self) {
        select_all(self.0.iter().map(|t| t.cancelled().boxed())).await;
    }
}

impl AgentRuntime {
    /// Queues `job` in its session, starting the session's lane if it is not running.
    pub fn submit(self: &Arc<Self>, job: Job) -> Submitted {
        let key = job.session().clone();
        let Some(index) = self.config.agents.iter().position(|a| a.id == key.agent) else {
            tracing::error!(agent = %key.agent, "job for an agent that is not configured");
            return Submitted::Refused;
        };
        if job.last_turn().is_none() {
            tracing::error!(agent = %key.agent, room_id = %key.room, "job without inputs");
            return Submitted::Refused;
        }
        let (done, outcome) = oneshot::channel();
        let cancel = CancellationToken::new();
        let id = self.run_ids.fetch_add(1, Ordering::Relaxed);
        let handle = RunHandle {
            token: cancel.clone(),
        };
        // Registered before it can run, so even a run that ends at once is unregistered.
        self.register_run(&key, id, &cancel);
        let mut queued = Queued {
            job,
            id,
            cancel,
            done,
        };
        let mut lanes = self.lanes.lock().expect("lanes lock");
        loop {
            let lane = lanes.entry(key.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(self.config.agents[index].queue_limit);
                self.tracker
                    .spawn(self.clone().run_lane(index, key.clone(), rx));
                tx
            });
            match lane.try_send(queued) {
                Ok(()) => return Submitted::Queued { outcome, handle },
                Err(mpsc::error::TrySendError::Full(_)) => {
                    drop(lanes);
                    self.unregister_run(&key, id);
                    return Submitted::Busy;
                }
                // The lane went idle and ended: start a fresh one.
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    lanes.remove(&key);
                    queued = back;
                }
            }
        }
    }

    /// Cancels every run of `session`, the running one and those queued; returns how many
    /// were not cancelled already. What each had posted is finalised as stopped.
    pub fn cancel_session(&self, session: &SessionKey) -> usize {
        let runs = self.runs.lock().expect("runs lock");
        let Some(tokens) = runs.get(session) else {
            return 0;
        };
        let mut cancelled = 0;
        for (_, token) in tokens {
            if !token.is_cancelled() {
                token.cancel();
                cancelled += 1;
            }
        }
        cancelled
    }

    /// `!stop` in `room`: cancels every run of every session there (see
    /// [`AgentRuntime::cancel_session`]); returns how many were not cancelled already.
    pub fn cancel_room(&self, room: &ruma::RoomId) -> usize {
        let runs = self.runs.lock().expect("runs lock");
        let mut cancelled = 0;
        for (_, token) in runs
            .iter()
            .filter(|(session, _)| session.room == room)
            .flat_map(|(_, tokens)| tokens)
        {
            if !token.is_cancelled() {
                token.cancel();
                cancelled += 1;
            }
        }
        cancelled
    }

    /// `agent`'s sessions with work, and its jobs waiting behind their runs.
    pub fn load_of(&self, agent: &crate::config::AgentId) -> (usize, usize) {
        let lanes = self.lanes.lock().expect("lanes lock");
        let busy = lanes
            .iter()
            .filter(|(session, lane)| &session.agent == agent && !lane.is_closed());
        busy.fold((0, 0), |(sessions, queued), (_, lane)| {
            (sessions + 1, queued + lane.max_capacity() - lane.capacity())
        })
    }

    /// How many jobs wait in the sessions' queues for the run ahead of them.
    pub fn queued(&self) -> usize {
        self.lanes
            .lock()
            .expect("lanes lock")
            .values()
            .filter(|l| !l.is_closed())
            .map(|l| l.max_capacity() - l.capacity())
            .sum()
    }

    /// How many sessions have a running lane.
    pub fn active_sessions(&self) -> usize {
        self.lanes
            .lock()
            .expect("lanes lock")
            .values()
            .filter(|l| !l.is_closed())
            .count()
    }

    fn register_run(&self, session: &SessionKey, id: u64, token: &CancellationToken) {
        self.runs
            .lock()
            .expect("runs lock")
            .entry(session.clone())
            .or_default()
            .push((id, token.clone()));
    }

    fn unregister_run(&self, session: &SessionKey, id: u64) {
        let mut runs = self.runs.lock().expect("runs lock");
        if let Some(tokens) = runs.get_mut(session) {
            tokens.retain(|(i, _)| *i != id);
            if tokens.is_empty() {
                runs.remove(session);
            }
        }
    }

    /// Hands `outcome` to whoever waits for job `queued`, which is no longer cancellable.
    fn complete(&self, session: &SessionKey, queued: Queued, outcome: Outcome) {
        self.unregister_run(session, queued.id);
        let _ = queued.done.send(outcome);
    }

    async fn run_lane(
        self: Arc<Self>,
        index: usize,
        key: SessionKey,
        mut queue: mpsc::Receiver<Queued>,
    ) {
        let agent = &self.config.agents[index];
        let mut pending: VecDeque<Queued> = VecDeque::new();
        loop {
            if pending.is_empty() {
                // Idle for a while, or shutdown with nothing left to answer: the lane ends.
                let next = tokio::select! {
                    next = tokio::time::timeout(LANE_IDLE, queue.recv()) => next.ok(),
                    _ = self.closing.cancelled() => None,
                };
                match next {
                    Some(Some(next)) => pending.push_back(next),
                    Some(None) => return,
                    None => {
                        queue.close();
                        while let Ok(next) = queue.try_recv() {
                            pending.push_back(next);
                        }
                        if pending.is_empty() {
                            let mut lanes = self.lanes.lock().expect("lanes lock");
                            if lanes.get(&key).is_some_and(|l| l.is_closed()) {
                                lanes.remove(&key);
                            }
                            return;
                        }
                    }
                }
            }
            if agent.queue == QueueMode::Collect {
                while let Ok(next) = queue.try_recv() {
                    pending.push_back(next);
                }
            }
            let first = pending.pop_front().expect("pending is not empty");
            if first.cancel.is_cancelled() {
                // Cancelled while it waited: it never starts.
                let outcome = self.stopped_before_start(agent, &first.job).await;
                self.complete(&key, first, outcome);
                continue;
            }
            let collect = agent.queue == QueueMode::Collect
                && matches!(&first.job, Job::Answer(a) if a.collectable());
            let mut together = vec![first];
            while collect
                && pending
                    .front()
                    .is_some_and(|next| matches!(&next.job, Job::Answer(a) if a.collectable()))
            {
                let next = pending.pop_front().expect("front is an answer");
                if next.cancel.is_cancelled() {
                    let outcome = self.stopped_before_start(agent, &next.job).await;
                    self.complete(&key, next, outcome);
                } else {
                    together.push(next);
                }
            }
            let cancel = Cancel(together.iter().map(|q| q.cancel.clone()).collect());
            let outcome = match &together[0].job {
                Job::Reset { turn, .. } => self.reset(agent, &key, turn).await,
                Job::Answer(_) => {
                    let assignment = collected(&together);
                    // Every line about the run names its agent, room and event.
                    let span = tracing::info_span!(
                        "run",
                        agent = %agent.id,
                        room_id = %key.room,
                        event_id = %assignment.origin(),
                    );
                    self.run_assignment(agent, &assignment, &cancel)
                        .instrument(span)
                        .await
                }
            };
            for queued in together {
                self.complete(&key, queued, outcome.clone());
            }
        }
    }

    /// A job cancelled before it started: the stopped notice where its answer would have
    /// gone (none for a silent one).
    async fn stopped_before_start(&self, agent: &crate::config::AgentConfig, job: &Job) -> Outcome {
        let assignment = match job {
            Job::Answer(assignment) => assignment.clone(),
            Job::Reset { session, turn } => match Job::reply(&session.agent, turn.clone()) {
                Job::Answer(assignment) => assignment,
                Job::Reset { .. } => unreachable!("Job::reply is an answer"),
            },
        };
        self.stopped_without_answer(agent, &assignment, Outcome::ended(Ended::Cancelled))
            .await
    }
}

/// One assignment for jobs answered together: the last one's, with every job's inputs.
fn collected(together: &[Queued]) -> Assignment {
    let assignments: Vec<&Assignment> = together
        .iter()
        .map(|q| match &q.job {
            Job::Answer(a) => a,
            Job::Reset { .. } => unreachable!("only answers are collected"),
        })
        .collect();
    let mut assignment = (*assignments.last().expect("a run has a job")).clone();
    assignment.inputs = assignments
        .iter()
        .flat_map(|a| a.inputs.iter().cloned())
        .collect();
    assignment
}
