//! Session lanes: one run at a time per session (agent + room + thread). Messages that
//! reach a busy session wait in its bounded queue and are answered in order, or — with
//! `queue: collect` — together as the next turn. Different sessions run in parallel.

use crate::store::SessionKey;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{AgentRuntime, Delivery, Turn};
use crate::config::QueueMode;

/// A lane with nothing to do for this long ends; the next message starts a new one.
const LANE_IDLE: Duration = Duration::from_secs(120);

/// Work for a session.
#[derive(Debug, Clone)]
pub enum Job {
    /// Answer a message.
    Turn(Turn),
    /// `!reset`: forget the session's memory, answering `Turn`'s message with a notice.
    Reset(Turn),
}

impl Job {
    fn turn(&self) -> &Turn {
        match self {
            Job::Turn(t) | Job::Reset(t) => t,
        }
    }
}

/// A job and who waits for it to be done.
pub(super) struct Queued {
    job: Job,
    done: oneshot::Sender<Delivery>,
}

/// What submitting a job did.
#[derive(Debug)]
pub enum Submitted {
    /// Queued; the receiver resolves with how its answer ended.
    Queued(oneshot::Receiver<Delivery>),
    /// The session's queue is full; nothing was queued.
    Busy,
}

impl AgentRuntime {
    /// Queues `job` for `agent` in the job's session, starting the session's lane if it
    /// is not running.
    pub fn submit(self: &Arc<Self>, agent: &str, job: Job) -> Submitted {
        let Some(index) = self.config.agents.iter().position(|a| a.id == agent) else {
            tracing::error!(agent, "job for an agent that is not configured");
            return Submitted::Busy;
        };
        let turn = job.turn();
        let key = SessionKey::new(agent, &turn.room_id, turn.thread_root.as_deref());
        let (done, receiver) = oneshot::channel();
        let mut queued = Queued { job, done };
        let mut lanes = self.lanes.lock().expect("lanes lock");
        loop {
            let lane = lanes.entry(key.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(self.config.agents[index].queue_limit);
                self.tracker
                    .spawn(self.clone().run_lane(index, key.clone(), rx));
                tx
            });
            match lane.try_send(queued) {
                Ok(()) => return Submitted::Queued(receiver),
                Err(mpsc::error::TrySendError::Full(_)) => return Submitted::Busy,
                // The lane went idle and ended: start a fresh one.
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    lanes.remove(&key);
                    queued = back;
                }
            }
        }
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
            match first.job {
                Job::Reset(turn) => {
                    let delivery = self.reset(agent, &key, &turn).await;
                    let _ = first.done.send(delivery);
                }
                Job::Turn(turn) => {
                    let mut turns = vec![turn];
                    let mut waiting = vec![first.done];
                    if agent.queue == QueueMode::Collect {
                        while let Some(Queued {
                            job: Job::Turn(_), ..
                        }) = pending.front()
                        {
                            let Some(Queued {
                                job: Job::Turn(turn),
                                done,
                            }) = pending.pop_front()
                            else {
                                unreachable!("front was a turn");
                            };
                            turns.push(turn);
                            waiting.push(done);
                        }
                    }
                    let delivery = self.run_turns(agent, &key, &turns).await;
                    for done in waiting {
                        let _ = done.send(delivery);
                    }
                }
            }
        }
    }
}
