//! What is asked of an agent and what comes back: a [`Job`] names the session, the inputs,
//! why the agent runs and where its answer goes; the run ends in an [`Outcome`] (the text,
//! the events posted, token usage, how it ended), and a [`RunHandle`] cancels it.

use ruma::{EventId, OwnedEventId, OwnedRoomId, RoomId};
use tokio_util::sync::CancellationToken;

use super::Turn;
use crate::config::AgentId;
use crate::llm::{AnswerSchema, Usage};
use crate::store::SessionKey;

/// Work for a session.
#[derive(Debug, Clone)]
pub enum Job {
    /// Run the agent on inputs and deliver its answer.
    Answer(Assignment),
    /// `!reset`: forget the session's memory, answering `turn` with a notice.
    Reset { session: SessionKey, turn: Turn },
}

impl Job {
    /// The inbox's job: `agent` answers `turn` with a reply to it, in its thread if it was
    /// sent in one, in the session of that room and thread.
    pub fn reply(agent: &AgentId, turn: Turn) -> Job {
        Job::Answer(Assignment {
            session: SessionKey::new(agent, &turn.room_id, turn.thread_root.as_deref()),
            destination: Destination::Reply {
                room: turn.room_id.clone(),
                to: turn.event_id.clone(),
                thread_root: turn.thread_root.clone(),
            },
            reason: Reason::RoomEvent,
            inputs: vec![turn],
            schema: None,
        })
    }

    /// `!reset` of `agent`'s session in `turn`'s room and thread.
    pub fn reset(agent: &AgentId, turn: Turn) -> Job {
        Job::Reset {
            session: SessionKey::new(agent, &turn.room_id, turn.thread_root.as_deref()),
            turn,
        }
    }

    /// The session the job runs in; its `agent` is who runs it.
    pub fn session(&self) -> &SessionKey {
        match self {
            Job::Answer(a) => &a.session,
            Job::Reset { session, .. } => session,
        }
    }

    /// The message the job was asked with last (the one a notice about it answers).
    pub(super) fn last_turn(&self) -> Option<&Turn> {
        match self {
            Job::Answer(a) => a.inputs.last(),
            Job::Reset { turn, .. } => Some(turn),
        }
    }
}

/// A run of an agent: in which session, on what, why, and where the answer goes.
#[derive(Debug, Clone)]
pub struct Assignment {
    /// Whose memory the run reads and extends; `session.agent` is the agent that runs.
    pub session: SessionKey,
    /// The messages to answer, oldest first (at least one). The last one's event ID,
    /// with the agent and the reason, is what every send of the run derives its
    /// transaction ID from, so a replayed run edits what the first one posted.
    pub inputs: Vec<Turn>,
    pub reason: Reason,
    pub destination: Destination,
    /// The answer must be a JSON object of this schema (structured output): the model is
    /// offered no tools and its text is the JSON. `None` for an ordinary answer.
    pub schema: Option<AnswerSchema>,
}

impl Assignment {
    /// The event the run's transaction IDs and sent-part records derive from: the message
    /// replied to, else the last input.
    pub(super) fn origin(&self) -> &EventId {
        match &self.destination {
            Destination::Reply { to, .. } => to,
            _ => {
                &self
                    .inputs
                    .last()
                    .expect("an assignment has inputs")
                    .event_id
            }
        }
    }

    /// Whether a `queue: collect` session may answer this together with the next ones:
    /// only plain replies to room messages, whose inputs the collected turn joins.
    pub(super) fn collectable(&self) -> bool {
        self.reason == Reason::RoomEvent && matches!(self.destination, Destination::Reply { .. })
    }
}

/// Why an agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// A message in a room was routed to it (the inbox).
    RoomEvent,
    /// A scheduled task fired.
    Schedule { task: String },
    /// A step of a team's task (pipeline, broadcast, merge).
    Collaboration { step: String },
}

impl Reason {
    /// What keeps this run's sends apart from another run of the same agent for the same
    /// message (a team may ask one agent twice); empty for a room event, so the answers to
    /// room messages keep the transaction IDs they always had.
    pub(super) fn scope(&self) -> String {
        match self {
            Reason::RoomEvent => String::new(),
            Reason::Schedule { task } => format!("schedule:{task}"),
            Reason::Collaboration { step } => format!("step:{step}"),
        }
    }
}

/// Where a run's answer goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A reply to event `to` in `room`, in thread `thread_root` when it is in one, mentioning
    /// the last input's sender (the inbox's answers).
    Reply {
        room: OwnedRoomId,
        to: OwnedEventId,
        thread_root: Option<OwnedEventId>,
    },
    /// A new message in the thread rooted at `root`, replying to nothing in it.
    Thread {
        room: OwnedRoomId,
        root: OwnedEventId,
    },
    /// A new top-level message in `room`.
    NewMessage { room: OwnedRoomId },
    /// Nowhere: the model runs, nothing is posted (no typing either), and the text comes
    /// back in the [`Outcome`] — for a step whose answer another step uses.
    Silent,
}

impl Destination {
    /// The room the answer is posted in, unless it is silent.
    pub fn room(&self) -> Option<&RoomId> {
        match self {
            Destination::Reply { room, .. }
            | Destination::Thread { room, .. }
            | Destination::NewMessage { room } => Some(room),
            Destination::Silent => None,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The answer as the model gave it (so far, when cancelled); empty when there was none
    /// (a notice, a failure, a reset).
    pub text: String,
    /// Every event the run posted, in order: the answer's messages, then a notice if one
    /// was said.
    pub events: Vec<OwnedEventId>,
    /// Tokens the provider reported, summed over the run's model calls (tool rounds);
    /// `None` when no call reported any.
    pub usage: Option<Usage>,
    pub ended: Ended,
}

impl Outcome {
    /// An outcome that posted nothing and answered nothing.
    pub(super) fn ended(ended: Ended) -> Self {
        Self {
            text: String::new(),
            events: Vec::new(),
            usage: None,
            ended,
        }
    }

    /// What the inbox needs of it: whether the event it answers may leave the journal.
    pub fn delivery(&self) -> Delivery {
        match self.ended {
            // Cancelled is over, unlike Interrupted: nobody wants the answer after a restart.
            Ended::Finished | Ended::Failed(_) | Ended::Cancelled | Ended::TimedOut => {
                Delivery::Delivered
            }
            Ended::Undeliverable(_) => Delivery::Undeliverable,
            Ended::Interrupted => Delivery::Interrupted,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The whole answer is where it was to go.
    Finished,
    /// There is no (whole) answer; this notice, naming the cause, was said instead (not
    /// posted for a silent run).
    Failed(String),
    /// Cancelled through its [`RunHandle`] or [`AgentRuntime::cancel_session`](super::AgentRuntime::cancel_session):
    /// what was posted is finalised with a line saying it was stopped, or a notice says so.
    Cancelled,
    /// The model hung: it did not answer or stopped sending within its provider's
    /// `timeout`, on every try; the notice saying so was posted.
    TimedOut,
    /// Shutdown came first; nothing more was posted, and the event stays journaled to be
    /// answered after the restart.
    Interrupted,
    /// What there was to say could not be posted for a reason that will not heal (the
    /// agent left the room, …).
    Undeliverable(String),
}

/// How a job's answer ended, as the inbox needs it (the event is finished then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// What the agent had to say (an answer or a notice) is in the room.
    Delivered,
    /// It could not be posted for a reason that will not heal (the agent left the room, …).
    Undeliverable,
    /// Shutdown came first; the event stays journaled and is answered after the restart.
    Interrupted,
}

/// Cancels one run, queued or running. Dropping it cancels nothing.
#[derive(Debug, Clone)]
pub struct RunHandle {
    pub(super) token: CancellationToken,
}

impl RunHandle {
    /// Stops the run: the model stream is dropped, typing ends, and what was posted is
    /// finalised as stopped. A run still queued ends as soon as its turn comes. Cancelling
    /// a run that has ended does nothing.
    pub fn cancel(&self) {
        self.token.cancel();
    }

    /// Whether [`RunHandle::cancel`] was called (on this handle or for its session).
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_shutdown_keeps_the_event_journaled() {
        let delivery = |ended| Outcome::ended(ended).delivery();
        assert_eq!(delivery(Ended::Finished), Delivery::Delivered);
        assert_eq!(delivery(Ended::Failed("no".into())), Delivery::Delivered);
        assert_eq!(delivery(Ended::TimedOut), Delivery::Delivered);
        assert_eq!(
            delivery(Ended::Cancelled),
            Delivery::Delivered,
            "a cancelled run is over: nobody wants it answered after a restart"
        );
        assert_eq!(
            delivery(Ended::Undeliverable("left".into())),
            Delivery::Undeliverable
        );
        assert_eq!(delivery(Ended::Interrupted), Delivery::Interrupted);
    }

    #[test]
    fn the_inbox_job_replies_in_the_thread_of_its_turn() {
        let turn = Turn {
            room_id: ruma::owned_room_id!("!r"),
            event_id: ruma::owned_event_id!("$q"),
            sender: ruma::owned_user_id!("@ann:hs"),
            sender_name: "ann".into(),
            body: "hi".into(),
            image: None,
            reply_to: None,
            thread_root: Some(ruma::owned_event_id!("$root")),
            hops: 1,
            group: false,
            ts: 1_718_000_000_000,
        };
        let damon = AgentId::parse("damon").unwrap();
        let Job::Answer(job) = Job::reply(&damon, turn) else {
            panic!("a reply is an answer");
        };
        let (room, root) = (ruma::owned_room_id!("!r"), ruma::owned_event_id!("$root"));
        assert_eq!(job.session, SessionKey::new(&damon, &room, Some(&root)));
        assert_eq!(
            job.destination,
            Destination::Reply {
                room,
                to: ruma::owned_event_id!("$q"),
                thread_root: Some(root),
            }
        );
        assert_eq!(job.reason, Reason::RoomEvent);
        assert!(job.collectable());
        assert_eq!(job.origin(), "$q");
        assert_eq!(
            job.reason.scope(),
            "",
            "room events keep their transaction IDs"
        );
    }
}
