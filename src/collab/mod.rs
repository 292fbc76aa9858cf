//! Teams at work: one request, several agents, all of it in the room.
//!
//! A message routed to a team becomes a **task**. The task runs in the thread of the
//! request: the team's user posts one status message there and edits it as the task moves
//! on (which mode, who is running, how it ended and why); every step is an agent's run
//! through its own session lane ([`AgentRuntime::submit`]), posted as that agent. The
//! modes:
//!
//! - **star** ([`star`]): the coordinator plans (`@worker: part` lines), each hand-off
//!   is posted by the coordinator mentioning the worker, the workers answer in parallel in
//!   the thread (and may hand off further, up to `max_depth`), and the coordinator posts
//!   the integrated answer.
//! - **pipeline** ([`pipeline`]): stages in order, each given the last one's output.
//! - **broadcast** ([`broadcast`]): every worker answers; a summary links each answer,
//!   marking the ones that miss the timeout late (they still appear, and join it).
//! - **hybrid**: rules (or the coordinator's model, answering with structured output: a
//!   mode and its reason) pick one of those, or `direct`.
//!
//! **Limits** (`teams[].limits`) are enforced here, not by a prompt: agent turns, fan-out
//! per plan, delegation depth, wall-clock time, tokens (the providers' usage, summed) and
//! hand-offs between the same two agents. Reaching one ends the task, saying which.
//!
//! **Stop**: `!stop` in the room, or a 🛑 / ❌ reaction on the request or the status,
//! cancels every running step (their model streams are closed) and finalises what they
//! had posted as stopped.
//!
//! **Restarts**: the request stays in the journal until its task ends, and the task's
//! record ([`TaskStore`](crate::store::TaskStore)) holds every finished step. After a
//! restart the task picks up where it was: a finished step is never run again, the
//! interrupted one runs again (its sends derive their transaction IDs from the step, so
//! it edits what it had posted), and the status says it resumed. A graceful shutdown
//! says in the status that the task was interrupted before the process exits. A task
//! that ended keeps its record, so a replayed request is not answered twice.

mod broadcast;
mod pipeline;
pub mod plan;
mod record;
mod star;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agents::{
    AgentRuntime, AnswerSchema, Assignment, Delivery, Destination, Ended, Job, Outcome, Reason,
    Submitted, Turn, derived_txn_id,
};
use crate::config::{AgentId, Config, TaskMode, TeamConfig, TeamMode};
use crate::matrix::keys::{HOPS_KEY, TASK_KEY};
use crate::matrix::{MatrixClient, Undelivered};
use crate::store::{SessionKey, Stores};

use self::record::{StepRecord, TaskRecord};

/// How long shutdown tries to say in a task's status that it was interrupted.
const INTERRUPTED_STATUS_WAIT: Duration = Duration::from_secs(5);

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Done,
    /// A step failed in a way that stops the task (a pipeline stage, say); why.
    Failed(String),
    /// Stopped by a person (`!stop`, a reaction): who.
    Cancelled(OwnedUserId),
    /// The task's wall-clock limit.
    TimedOut(Duration),
    /// Another limit: which, and what it was.
    Limit(String),
    /// Shutdown: the request stays journaled and the task resumes after the restart.
    Interrupted,
}

impl End {
    /// The label of the task-outcome metric.
    fn outcome(&self) -> &'static str {
        match self {
            End::Done => "done",
            End::Failed(_) => "failed",
            End::Cancelled(_) => "cancelled",
            End::TimedOut(_) => "timed_out",
            End::Limit(_) => "limit",
            End::Interrupted => "interrupted",
        }
    }

    fn describe(&self) -> String {
        match self {
            End::Done => "✅ done".to_owned(),
            End::Failed(why) => format!("❌ failed: {why}"),
            End::Cancelled(by) => format!("🛑 cancelled by {by}"),
            End::TimedOut(after) => format!(
                "⏱ timed out: the task ran longer than its limit of {} (limits.timeout)",
                humantime::format_duration(*after)
            ),
            End::Limit(which) => format!("⛔ stopped: {which}"),
            End::Interrupted => "⏸ interrupted by a restart; it resumes".to_owned(),
        }
    }
}

/// What one step is asked.
pub(crate) struct Step {
    /// Unique in the task: the record's key, and part of the step's transaction IDs.
    pub name: String,
    pub agent: AgentId,
    pub prompt: String,
    /// Posted in the task's thread, or silent (its text is for another step).
    pub posted: bool,
    /// How long it may take (a pipeline stage's `timeout`).
    pub timeout: Option<Duration>,
}

/// What came of a step.
#[derive(Debug, Clone)]
pub(crate) struct Done {
    pub text: String,
    pub events: Vec<OwnedEventId>,
    /// `None` when it answered; else why not.
    pub failure: Option<String>,
    /// Replayed from the record: it finished before a restart.
    pub replayed: bool,
}

/// A task while it runs: what every step shares.
pub(crate) struct Task {
    pub id: String,
    pub team: TeamConfig,
    pub room: OwnedRoomId,
    /// The request, as people sent it.
    pub request: Turn,
    /// The thread the task runs in (the request's own, or the one it started).
    pub root: OwnedEventId,
    pub cancel: CancellationToken,
    /// Why the task is ending, set by whoever ends it first.
    end: Mutex<Option<End>>,
    record: tokio::sync::Mutex<TaskRecord>,
    /// The status message, once posted: a stop reaction on it is looked up here, never
    /// waiting for the record (held while it is saved).
    status: Mutex<Option<OwnedEventId>>,
    /// Which run of the task this process is ([`TaskRecord::runs`]).
    generation: u32,
}

impl Task {
    /// Ends the task for `why` unless something ended it first; cancels every step.
    pub fn end(&self, why: End) {
        let mut end = self.end.lock().expect("task end lock");
        if end.is_none() {
            *end = Some(why);
        }
        drop(end);
        self.cancel.cancel();
    }

    fn ended(&self) -> Option<End> {
        self.end.lock().expect("task end lock").clone()
    }

    /// Who asked, as the steps' prompts name them: the label agents use for a speaker
    /// (display name cleaned, next to the user ID), so a display name cannot pass for
    /// someone else or break a prompt's lines.
    pub fn asker(&self) -> String {
        crate::agents::lines::label(&self.request.sender_name, &self.request.sender)
    }
}

/// Runs teams' tasks.
pub struct Collab {
    config: Arc<Config>,
    runtime: Arc<AgentRuntime>,
    matrix: Arc<MatrixClient>,
    store: Stores,
    tracker: TaskTracker,
    /// Shutdown: tasks stop waiting and stay journaled.
    stop: CancellationToken,
    running: Mutex<HashMap<String, Arc<Task>>>,
}

impl Collab {
    pub fn new(
        config: Arc<Config>,
        runtime: Arc<AgentRuntime>,
        matrix: Arc<MatrixClient>,
        store: Stores,
        tracker: TaskTracker,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            runtime,
            matrix,
            store,
            tracker,
            stop,
            running: Mutex::new(HashMap::new()),
        })
    }

    /// Starts (or, after a restart, resumes) `team`'s task for `request`; `broadcast`
    /// when it was asked with `@all`. Resolves when the task is over, with what it means
    /// for the request's event.
    pub fn start(
        self: &Arc<Self>,
        team: &AgentId,
        request: Turn,
        broadcast: bool,
    ) -> BoxFuture<'static, Option<Delivery>> {
        let this = self.clone();
        let team = team.clone();
        let handle = self.tracker.spawn(async move {
            let team = this.config.team(&team).cloned()?;
            Some(this.run(team, request, broadcast).await)
        });
        Box::pin(async move { handle.await.ok().flatten() })
    }

    /// Forgets the records of tasks that ended before `cutoff_ms` (unix ms): by then the
    /// journal's dedupe records of their requests are gone too, so nothing can replay
    /// them. Returns how many were forgotten.
    pub async fn prune_ended(&self, cutoff_ms: u64) -> usize {
        record::prune_ended(self.store.tasks.as_ref(), cutoff_ms).await
    }

    /// `!stop` by `by` in `room`: ends every task running there. Returns how many.
    pub fn stop_room(&self, room: &RoomId, by: &ruma::UserId) -> usize {
        self.stop_where(by, |t| t.room == room)
    }

    /// A stop reaction by `by` on `event`: ends the task whose request or status it is.
    pub fn stop_event(&self, room: &RoomId, event: &ruma::EventId, by: &ruma::UserId) -> bool {
        self.stop_where(by, |t| {
            t.room == room
                && (t.request.event_id == event
                    || t.root == event
                    || t.status.lock().expect("status lock").as_deref() == Some(event))
        }) > 0
    }

    /// Ends, as cancelled by `by`, every running task `matches`; returns how many.
    fn stop_where(&self, by: &ruma::UserId, matches: impl Fn(&Task) -> bool) -> usize {
        let running = self.running.lock().expect("running tasks lock");
        let mut stopped = 0;
        for task in running.values().filter(|t| matches(t)) {
            task.end(End::Cancelled(by.to_owned()));
            stopped += 1;
        }
        stopped
    }

    async fn run(self: &Arc<Self>, team: TeamConfig, request: Turn, broadcast: bool) -> Delivery {
        let id = format!("{}:{}", team.id, request.event_id);
        let stored = match self.store.tasks.task(&id).await {
            Ok(stored) => stored.and_then(|bytes| TaskRecord::decode(&bytes)),
            Err(e) => {
                tracing::warn!(task = %id, error = %e, "could not read the task's record; starting it afresh");
                None
            }
        };
        if stored.as_ref().is_some_and(|r| r.ended) {
            tracing::info!(task = %id, "task already ended before a restart; not run again");
            return Delivery::Delivered;
        }
        let resumed = stored.is_some();
        let mut record = stored.unwrap_or_else(|| TaskRecord::new(crate::unix_ms()));
        let (mode, why) = match record.mode {
            Some(mode) => (mode, record.why.clone().unwrap_or_default()),
            None => {
                self.pick_mode(&team, &request, broadcast, &mut record)
                    .await
            }
        };
        record.mode = Some(mode);
        record.why = Some(why.clone());
        record.runs += 1;
        let generation = record.runs;
        let root = request
            .thread_root
            .clone()
            .unwrap_or_else(|| request.event_id.clone());
        let task = Arc::new(Task {
            id: id.clone(),
            room: request.room_id.clone(),
            root,
            // Not shutdown's child: a stopped task finalises its steps as stopped, an
            // interrupted one leaves them to resume.
            cancel: CancellationToken::new(),
            end: Mutex::new(None),
            status: Mutex::new(record.status.clone()),
            generation,
            record: tokio::sync::Mutex::new(record),
            team,
            request,
        });
        self.running
            .lock()
            .expect("running tasks lock")
            .insert(id.clone(), task.clone());
        {
            // The run count is on disk before this run's first edit.
            let record = task.record.lock().await;
            self.save(&task, &record).await;
        }
        tracing::info!(task = %id, mode = mode.as_str(), resumed, "task started");
        self.bring_in_members(&task).await;
        let mut opening = why;
        if resumed {
            opening.push_str(" — resumed after a restart");
        }
        self.set_status(&task, &opening).await;
        let deadline = {
            let started = task.record.lock().await.started_ms;
            let elapsed = crate::unix_ms().saturating_sub(started);
            task.team
                .limits
                .timeout
                .saturating_sub(Duration::from_millis(elapsed))
        };
        let body = async {
            match mode {
                TaskMode::Star => star::run(self, &task).await,
                TaskMode::Pipeline => pipeline::run(self, &task).await,
                TaskMode::Broadcast => broadcast::run(self, &task).await,
                TaskMode::Direct => self.direct(&task).await,
            }
        };
        let limit = task.team.limits.timeout;
        let mut body = std::pin::pin!(body);
        let outcome = tokio::select! {
            end = &mut body => end,
            _ = tokio::time::sleep(deadline) => {
                task.end(End::TimedOut(limit));
                // The steps see the cancellation: they stop their runs, which finalise
                // what they posted, and return.
                body.await
            }
        };
        let end = task.ended().unwrap_or(outcome);
        self.running.lock().expect("running tasks lock").remove(&id);
        if end == End::Interrupted || self.stop.is_cancelled() {
            tracing::info!(task = %id, "task interrupted by shutdown; it resumes after the restart");
            self.say_interrupted(&task).await;
            return Delivery::Interrupted;
        }
        self.finish(&task, &end).await
    }

    /// Records the end, says it in the status (and, for an end people should notice, in
    /// a message of its own), and lets the request leave the journal.
    async fn finish(&self, task: &Task, end: &End) -> Delivery {
        tracing::info!(task = %task.id, end = ?end, "task ended");
        let summary = {
            let record = task.record.lock().await;
            let mode = record.mode.map_or("unknown", TaskMode::as_str);
            metrics::counter!("agentbus_team_tasks_total", "mode" => mode, "outcome" => end.outcome())
                .increment(1);
            format!(
                "{} ({} agent turns, {} tokens)",
                end.describe(),
                record.turns,
                record.tokens
            )
        };
        self.set_status(task, &summary).await;
        if !matches!(end, End::Done) {
            let text = format!("{} — {}", task.team.display_name(), end.describe());
            if let Err(e) = self
                .post(task, &task.team.id, "ended", &text, &[], true)
                .await
            {
                tracing::warn!(task = %task.id, error = %e, "could not say how the task ended");
            }
        }
        let mut record = task.record.lock().await;
        record.ended = true;
        record.ended_ms = crate::unix_ms();
        self.save(task, &record).await;
        Delivery::Delivered
    }

    /// Shutdown interrupted the task: says so in its status, trying for at most
    /// [`INTERRUPTED_STATUS_WAIT`] (shutdown's own token is cancelled by now, and a
    /// homeserver that is down must not hold the process up). The restart edits it again.
    async fn say_interrupted(&self, task: &Task) {
        let line = End::Interrupted.describe();
        // A token of its own: the timeout, not shutdown, bounds the tries.
        let said = tokio::time::timeout(
            INTERRUPTED_STATUS_WAIT,
            self.set_status_until(task, &line, &CancellationToken::new()),
        )
        .await;
        if said.is_err() {
            tracing::warn!(task = %task.id, "could not say in the status that the task was interrupted");
        }
    }

    /// The mode of a new task, and the line saying how it was chosen.
    async fn pick_mode(
        &self,
        team: &TeamConfig,
        request: &Turn,
        broadcast: bool,
        record: &mut TaskRecord,
    ) -> (TaskMode, String) {
        if broadcast {
            return (
                TaskMode::Broadcast,
                "broadcast (asked with @all)".to_owned(),
            );
        }
        match team.mode {
            TeamMode::Star => (TaskMode::Star, "star".to_owned()),
            TeamMode::Pipeline => (TaskMode::Pipeline, "pipeline".to_owned()),
            TeamMode::Broadcast => (TaskMode::Broadcast, "broadcast".to_owned()),
            TeamMode::Hybrid => {
                if let Some((mode, i, when)) = plan::classify(&team.rules, &request.body) {
                    return (
                        mode,
                        format!("hybrid → {} (rules[{i}]: {when})", mode.as_str()),
                    );
                }
                let asked = match (&team.classifier, &team.coordinator) {
                    (true, Some(coordinator)) => {
                        // The classifier's call counts in the task's limits like any turn.
                        let (asked, tokens) = self.ask_classifier(team, coordinator, request).await;
                        record.turns += 1;
                        record.tokens += tokens;
                        asked
                    }
                    _ => None,
                };
                if let Some((mode, reason)) = asked {
                    let why = match reason {
                        Some(reason) => format!("the coordinator's model chose it: {reason}"),
                        None => "the coordinator's model chose it".to_owned(),
                    };
                    return (mode, format!("hybrid → {} ({why})", mode.as_str()));
                }
                (
                    team.default_mode,
                    format!(
                        "hybrid → {} (no rule matched: default_mode)",
                        team.default_mode.as_str()
                    ),
                )
            }
        }
    }

    /// Asks the coordinator's model (silently) to pick one of the modes the team can run,
    /// as structured output: the mode and its reason (`None` when the model ignored the
    /// schema and only named a mode), and the tokens the call used.
    async fn ask_classifier(
        &self,
        team: &TeamConfig,
        coordinator: &AgentId,
        request: &Turn,
    ) -> (Option<(TaskMode, Option<String>)>, u64) {
        let modes: Vec<TaskMode> = [
            TaskMode::Star,
            TaskMode::Pipeline,
            TaskMode::Broadcast,
            TaskMode::Direct,
        ]
        .into_iter()
        .filter(|m| team.can_run(*m))
        .collect();
        let mut turn = request.clone();
        turn.body = plan::classifier_prompt(&request.body, &modes);
        turn.group = false;
        turn.reply_to = None;
        let job = Job::Answer(Assignment {
            session: SessionKey::new(coordinator, &request.room_id, Some(&request.event_id)),
            inputs: vec![turn],
            reason: Reason::Collaboration {
                step: format!("{}:classify", team.id),
            },
            destination: Destination::Silent,
            schema: Some(AnswerSchema {
                name: "team_mode".into(),
                schema: plan::classifier_schema(&modes),
            }),
        });
        let Submitted::Queued { outcome, .. } = self.runtime.submit(job) else {
            return (None, 0);
        };
        let Ok(outcome) = outcome.await else {
            return (None, 0);
        };
        let tokens = outcome
            .usage
            .map_or(0, |u| u.input_tokens + u.output_tokens);
        let picked = match plan::classifier_answer(&outcome.text, &modes) {
            plan::Classified::Chose { mode, reason } => Some((mode, Some(reason))),
            plan::Classified::Named(mode) => {
                tracing::info!(team = %team.id, mode = mode.as_str(), "the classifier answered without JSON; took the mode it named");
                Some((mode, None))
            }
            plan::Classified::Nothing(why) => {
                tracing::info!(team = %team.id, why = %why, "the classifier picked no mode");
                None
            }
        };
        (picked, tokens)
    }

    /// `direct`: the coordinator answers alone, in the thread.
    async fn direct(&self, task: &Task) -> End {
        let Some(coordinator) = task.team.coordinator.clone() else {
            return End::Failed("the team has no coordinator".into());
        };
        self.set_status(task, &format!("@{coordinator} answers"))
            .await;
        let step = Step {
            name: "answer".into(),
            agent: coordinator,
            prompt: task.request.body.clone(),
            posted: true,
            timeout: None,
        };
        match self.step(task, step).await {
            Ok(done) => match done.failure {
                None => End::Done,
                Some(why) => End::Failed(why),
            },
            Err(end) => end,
        }
    }

    /// Invites the team's agents that are not in the room (as the team) and joins them.
    async fn bring_in_members(&self, task: &Task) {
        let team_user = self.config.user_id(&task.team.id);
        let joined = match self
            .matrix
            .intent(&team_user)
            .joined_members(&task.room)
            .await
        {
            Ok(members) => members.into_iter().map(|(id, _)| id).collect::<Vec<_>>(),
            Err(e) => {
                tracing::warn!(task = %task.id, error = %e, "could not list the room's members");
                return;
            }
        };
        for agent in task.team.members() {
            let user = self.config.user_id(&agent);
            if joined.contains(&user) {
                continue;
            }
            if let Err(e) = self
                .matrix
                .intent(&team_user)
                .invite(&task.room, &user)
                .await
            {
                tracing::warn!(task = %task.id, agent = %agent, error = %e, "could not invite a team member");
                continue;
            }
            if let Err(e) = self.matrix.intent(&user).join_room(&task.room).await {
                tracing::warn!(task = %task.id, agent = %agent, error = %e, "a team member could not join");
            }
        }
    }

    /// Runs one step, or replays it from the record when it finished before a restart.
    /// `Err` when the task is ending (stopped, a limit, shutdown): the step's partial
    /// answer was finalised as stopped.
    pub(crate) async fn step(&self, task: &Task, step: Step) -> Result<Done, End> {
        if let Some(done) = task.record.lock().await.steps.get(&step.name) {
            return Ok(Done {
                text: done.text.clone(),
                events: done.events.clone(),
                failure: done.failure.clone(),
                replayed: true,
            });
        }
        if let Some(end) = task.ended() {
            return Err(end);
        }
        {
            let mut record = task.record.lock().await;
            let max = task.team.limits.max_agent_turns;
            if record.turns >= max {
                drop(record);
                let end = End::Limit(format!(
                    "{max} agent turns reached (limits.max_agent_turns)"
                ));
                task.end(end.clone());
                return Err(end);
            }
            record.turns += 1;
        }
        let mut turn = task.request.clone();
        turn.body = step.prompt;
        turn.group = false;
        turn.reply_to = None;
        turn.hops = task.request.hops + 1;
        turn.thread_root = Some(task.root.clone());
        let destination = if step.posted {
            Destination::Thread {
                room: task.room.clone(),
                root: task.root.clone(),
            }
        } else {
            Destination::Silent
        };
        let job = Job::Answer(Assignment {
            session: SessionKey::new(&step.agent, &task.room, Some(&task.root)),
            inputs: vec![turn],
            reason: Reason::Collaboration {
                step: format!("{}:{}", task.id, step.name),
            },
            destination,
            schema: None,
        });
        let (outcome, handle) = match self.runtime.submit(job) {
            Submitted::Queued { outcome, handle } => (outcome, handle),
            Submitted::Busy => {
                return Ok(self
                    .remember(task, &step.name, failed(format!("@{} is busy", step.agent)))
                    .await);
            }
            Submitted::Refused => {
                return Ok(self
                    .remember(
                        task,
                        &step.name,
                        failed(format!("@{} cannot run", step.agent)),
                    )
                    .await);
            }
        };
        let timeout = step.timeout.unwrap_or(Duration::MAX);
        let mut outcome = std::pin::pin!(outcome);
        let mut timed_out = false;
        let finished: Option<Outcome> = tokio::select! {
            outcome = &mut outcome => outcome.ok(),
            // Shutdown: the runtime ends the run as interrupted by itself.
            _ = self.stop.cancelled() => (&mut outcome).await.ok(),
            _ = task.cancel.cancelled() => {
                handle.cancel();
                let _ = (&mut outcome).await;
                None
            }
            _ = tokio::time::sleep(timeout) => {
                timed_out = true;
                handle.cancel();
                (&mut outcome).await.ok()
            }
        };
        let Some(outcome) = finished else {
            return Err(task.ended().unwrap_or(End::Interrupted));
        };
        let tokens = outcome
            .usage
            .map_or(0, |u| u.input_tokens + u.output_tokens);
        let failure = match &outcome.ended {
            _ if timed_out => Some(format!(
                "@{} took longer than {}",
                step.agent,
                humantime::format_duration(timeout)
            )),
            Ended::Finished => None,
            Ended::Failed(notice) => Some(notice.clone()),
            Ended::TimedOut => Some(format!("@{}'s model did not answer in time", step.agent)),
            Ended::Cancelled => Some(format!("@{} was stopped", step.agent)),
            Ended::Undeliverable(why) => Some(format!(
                "@{}'s answer could not be posted: {why}",
                step.agent
            )),
            Ended::Interrupted => return Err(End::Interrupted),
        };
        let done = Done {
            text: outcome.text,
            events: outcome.events,
            failure,
            replayed: false,
        };
        let over_budget = {
            let mut record = task.record.lock().await;
            record.tokens += tokens;
            record.tokens > task.team.limits.token_budget
        };
        let done = self.remember(task, &step.name, done).await;
        if over_budget {
            let end = End::Limit(format!(
                "the token budget of {} was used up (limits.token_budget)",
                task.team.limits.token_budget
            ));
            task.end(end.clone());
            return Err(end);
        }
        Ok(done)
    }

    /// Keeps a finished step in the task's record, on disk.
    async fn remember(&self, task: &Task, name: &str, done: Done) -> Done {
        let mut record = task.record.lock().await;
        record.steps.insert(
            name.to_owned(),
            StepRecord {
                text: done.text.clone(),
                events: done.events.clone(),
                failure: done.failure.clone(),
            },
        );
        self.save(task, &record).await;
        tracing::debug!(task = %task.id, step = name, "step kept in the task's record");
        done
    }

    async fn save(&self, task: &Task, record: &TaskRecord) {
        if let Err(e) = self.store.tasks.save_task(&task.id, &record.encode()).await {
            tracing::warn!(task = %task.id, error = %e, "could not save the task's record");
        }
    }

    /// Edits the status message to `line` (posting it first if the task has none).
    pub(crate) async fn set_status(&self, task: &Task, line: &str) {
        self.set_status_until(task, line, &self.stop).await;
    }

    /// [`Collab::set_status`], retrying until it is delivered or `stop` is cancelled.
    async fn set_status_until(&self, task: &Task, line: &str, stop: &CancellationToken) {
        let text = format!("🧭 {} · {}", task.team.display_name(), line);
        let existing = task.record.lock().await.status.clone();
        let result = match existing {
            None => {
                let sent = self
                    .post_until(task, &task.team.id, "status", &text, &[], true, stop)
                    .await;
                if let Ok(event) = &sent {
                    *task.status.lock().expect("status lock") = Some(event.clone());
                    let mut record = task.record.lock().await;
                    record.status = Some(event.clone());
                    self.save(task, &record).await;
                }
                sent.map(|_| ())
            }
            Some(status) => {
                self.edit_until(task, &task.team.id, &status, &text, stop)
                    .await;
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::warn!(task = %task.id, error = %e, "could not post the task's status");
        }
    }

    /// Edits `event`, posted by `from` for the task, to say `text` (as a notice).
    pub(crate) async fn edit(
        &self,
        task: &Task,
        from: &AgentId,
        event: &ruma::EventId,
        text: &str,
    ) {
        self.edit_until(task, from, event, text, &self.stop).await;
    }

    /// [`Collab::edit`], retrying until it is delivered or `stop` is cancelled. The
    /// transaction ID names the text and the run, so the same words said again after a
    /// restart are a new edit.
    async fn edit_until(
        &self,
        task: &Task,
        from: &AgentId,
        event: &ruma::EventId,
        text: &str,
        stop: &CancellationToken,
    ) {
        let content = json!({
            "msgtype": "m.notice",
            "body": format!("* {text}"),
            "m.new_content": { "msgtype": "m.notice", "body": text, "m.mentions": {} },
            "m.relates_to": { "rel_type": "m.replace", "event_id": event },
            "m.mentions": {},
            TASK_KEY: task.id,
            HOPS_KEY: task.request.hops + 1,
        });
        let txn = derived_txn_id(
            &task.request.event_id,
            from,
            &format!(
                "{}:edit:{event}:{}:{}",
                task.id,
                task.generation,
                digest(text)
            ),
        );
        if let Err(e) = self
            .matrix
            .intent(&self.config.user_id(from))
            .send_message_until_delivered(&task.room, &txn, &content, stop)
            .await
        {
            tracing::warn!(task = %task.id, error = %e, "could not edit the task's message");
        }
    }

    /// Posts `text` as `from` (an agent or the team) in the task's thread, mentioning
    /// `mention`; `purpose` keeps its transaction ID apart from the task's other posts.
    pub(crate) async fn post(
        &self,
        task: &Task,
        from: &AgentId,
        purpose: &str,
        text: &str,
        mention: &[OwnedUserId],
        notice: bool,
    ) -> Result<OwnedEventId, Undelivered> {
        self.post_until(task, from, purpose, text, mention, notice, &self.stop)
            .await
    }

    /// [`Collab::post`], retrying until it is delivered or `stop` is cancelled.
    #[allow(clippy::too_many_arguments)]
    async fn post_until(
        &self,
        task: &Task,
        from: &AgentId,
        purpose: &str,
        text: &str,
        mention: &[OwnedUserId],
        notice: bool,
        stop: &CancellationToken,
    ) -> Result<OwnedEventId, Undelivered> {
        let msgtype = if notice { "m.notice" } else { "m.text" };
        let content = json!({
            "msgtype": msgtype,
            "body": text,
            "m.mentions": { "user_ids": mention },
            "m.relates_to": {
                "rel_type": "m.thread", "event_id": task.root, "is_falling_back": true,
                "m.in_reply_to": { "event_id": task.root },
            },
            TASK_KEY: task.id,
            HOPS_KEY: task.request.hops + 1,
        });
        let txn = derived_txn_id(
            &task.request.event_id,
            from,
            &format!("{}:{purpose}", task.id),
        );
        self.matrix
            .intent(&self.config.user_id(from))
            .send_message_until_delivered(&task.room, &txn, &content, stop)
            .await
    }

    /// An agent's display name.
    pub(crate) fn name_of(&self, agent: &AgentId) -> String {
        self.config
            .agent(agent)
            .map_or_else(|| agent.to_string(), |a| a.display_name().to_owned())
    }

    pub(crate) fn user_of(&self, agent: &AgentId) -> OwnedUserId {
        self.config.user_id(agent)
    }
}

fn failed(why: String) -> Done {
    Done {
        text: String::new(),
        events: Vec::new(),
        failure: Some(why),
        replayed: false,
    }
}

/// A short digest of `text`, the same in every process, for transaction IDs.
fn digest(text: &str) -> String {
    use sha2::Digest as _;
    hex::encode(&sha2::Sha256::digest(text.as_bytes())[..8])
}
