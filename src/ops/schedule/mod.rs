//! The scheduler: `schedules:` tasks and agents' heartbeats, each a worker on the
//! server's tracker that sleeps until its next due time (a timer, not a poll), runs, and
//! records the run in the [`ScheduleStore`](crate::store::ScheduleStore).
//!
//! **Once, across crashes.** Before a run starts its scheduled time is stored as in
//! flight; every send of the run derives its transaction ID from the task's name and
//! that time. A process that dies mid-run does the same run again at start-up, under the
//! same time, so whatever it had already posted is deduplicated by the homeserver rather
//! than posted twice. Runs missed while agentbus was down coalesce into one run at
//! start-up (`catch_up: one`) or are skipped (`none`); see [`timing::plan_start`].
//!
//! **Failures.** A run fails when its room cannot be reached, its agent's model does not
//! answer, its team's task cannot run. After `max_failures` in a row the task posts one
//! notice in its room and pauses; a run triggered by hand that succeeds resumes it.
//!
//! **Actions.** `send_message` posts a template as an agent; `ask_agent` runs the agent
//! silently in its session `cron:<task>` (its lane, its memory) and posts the answer as
//! it; `run_team` posts the request as the team and runs the team's task on it in the
//! room; a heartbeat asks the agent with its `HEARTBEAT.md` checklist and posts only an
//! answer other than exactly `HEARTBEAT_OK`.
//!
//! **Heartbeat checklist.** `<store.path>/agents/<agent id>/HEARTBEAT.md` — the agent's
//! workspace directory. Without the file, a beat asks nothing and posts nothing.

pub mod api;
pub mod timing;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ruma::{EventId, OwnedEventId, OwnedRoomId, RoomAliasId, RoomId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::agents::{
    AgentRuntime, Assignment, Delivery, Destination, Ended, Job, Reason, Submitted, Turn,
};
use crate::collab::Collab;
use crate::config::{ActiveHours, AgentId, CatchUp, Config, ScheduleConfig, Timing};
use crate::matrix::keys::HOPS_KEY;
use crate::matrix::{MatrixClient, Undelivered};
use crate::store::{RunOutcome, ScheduleState, SessionKey, Stores};

/// What a heartbeat's model answers when there is nothing to say.
pub const HEARTBEAT_OK: &str = "HEARTBEAT_OK";

/// The checklist file of an agent's heartbeat, in its workspace.
pub const HEARTBEAT_FILE: &str = "HEARTBEAT.md";

/// The longest one timer of a task's worker sleeps.
const LONGEST_SLEEP: Duration = Duration::from_secs(24 * 3600);

/// The workspace directory of `agent`: `<store.path>/agents/<id>`.
pub fn workspace(config: &Config, agent: &AgentId) -> PathBuf {
    config.store.path.join("agents").join(agent.as_str())
}

/// What a task does when it runs.
#[derive(Debug, Clone)]
enum Action {
    Send {
        agent: AgentId,
        text: String,
    },
    Ask {
        agent: AgentId,
        prompt: String,
    },
    Team {
        team: AgentId,
        prompt: String,
    },
    Heartbeat {
        agent: AgentId,
        hours: Option<ActiveHours>,
    },
}

impl Action {
    /// Who posts the task's messages (and its failure notice).
    fn poster(&self) -> &AgentId {
        match self {
            Action::Send { agent, .. }
            | Action::Ask { agent, .. }
            | Action::Heartbeat { agent, .. } => agent,
            Action::Team { team, .. } => team,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Action::Send { .. } => "send_message",
            Action::Ask { .. } => "ask_agent",
            Action::Team { .. } => "run_team",
            Action::Heartbeat { .. } => "heartbeat",
        }
    }
}

/// One task, compiled from the config.
struct Entry {
    name: String,
    timing: Timing,
    /// The timing as written: a stored plan made from another one is redone.
    timing_key: String,
    room: String,
    zone: chrono_tz::Tz,
    action: Action,
    catch_up: CatchUp,
    max_failures: u32,
    enabled: bool,
    /// Held for a run and for every change of the task's state: a triggered run and a
    /// scheduled one never overlap.
    lock: tokio::sync::Mutex<()>,
}

impl Entry {
    fn of_schedule(task: &ScheduleConfig) -> Option<Entry> {
        let timing = task.timing().ok()?;
        let timing_key = match (&task.cron, task.every, &task.at) {
            (Some(cron), _, _) => format!("cron {cron} {}", task.zone()),
            (_, Some(every), _) => format!("every {}", humantime::format_duration(every)),
            (_, _, Some(at)) => format!("at {at}"),
            _ => return None,
        };
        let action = if let Some(a) = &task.send_message {
            Action::Send {
                agent: a.agent.clone(),
                text: a.text.clone(),
            }
        } else if let Some(a) = &task.ask_agent {
            Action::Ask {
                agent: a.agent.clone(),
                prompt: a.prompt.clone(),
            }
        } else if let Some(a) = &task.run_team {
            Action::Team {
                team: a.team.clone(),
                prompt: a.prompt.clone(),
            }
        } else {
            return None;
        };
        Some(Entry {
            name: task.name.clone(),
            timing,
            timing_key,
            room: task.room.clone(),
            zone: task.zone(),
            action,
            catch_up: task.catch_up,
            max_failures: task.max_failures,
            enabled: task.enabled,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    fn of_heartbeat(agent: &crate::config::AgentConfig) -> Option<Entry> {
        let heartbeat = agent.heartbeat.as_ref()?;
        Some(Entry {
            name: heartbeat_name(&agent.id),
            timing: Timing::Every(heartbeat.interval),
            timing_key: format!("every {}", humantime::format_duration(heartbeat.interval)),
            room: heartbeat.room.clone(),
            zone: heartbeat.zone(),
            action: Action::Heartbeat {
                agent: agent.id.clone(),
                hours: heartbeat.active_hours(),
            },
            // A missed beat is not worth making up for: the next one comes soon.
            catch_up: CatchUp::None,
            max_failures: 3,
            enabled: true,
            lock: tokio::sync::Mutex::new(()),
        })
    }
}

/// The task name of `agent`'s heartbeat (a `:` no `schedules:` name has).
pub fn heartbeat_name(agent: &AgentId) -> String {
    format!("heartbeat:{agent}")
}

/// How a run went.
#[derive(Debug)]
enum Ran {
    /// Done; whether anything was posted.
    Done { posted: bool },
    /// Not run: a heartbeat outside its active hours.
    Skipped,
    /// Failed; why.
    Failed(String),
    /// Shutdown came first: the run stays in flight and is done again after the restart.
    Interrupted,
}

/// One task as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskView {
    pub name: String,
    /// `send_message`, `ask_agent`, `run_team` or `heartbeat`.
    pub kind: String,
    /// When it runs, as written (`every 30m`, `cron 0 8 * * mon-fri Europe/Berlin`).
    pub schedule: String,
    pub room: String,
    pub enabled: bool,
    pub paused: bool,
    /// Failed runs in a row.
    pub failures: u32,
    /// The scheduled time of the last run that ended (RFC 3339, UTC).
    pub last_run: Option<String>,
    pub last_outcome: Option<RunOutcome>,
    /// When it is next due (RFC 3339, UTC); none when it will not run on its own.
    pub next_run: Option<String>,
    /// Whether a run is in progress (or was, when the process stopped).
    pub running: bool,
}

/// Runs the scheduled tasks and heartbeats.
pub struct Scheduler {
    config: Arc<Config>,
    store: Stores,
    matrix: Arc<MatrixClient>,
    runtime: Arc<AgentRuntime>,
    collab: Arc<Collab>,
    entries: Vec<Arc<Entry>>,
    by_name: HashMap<String, usize>,
    /// Shutdown's grace is over: a run waiting for the homeserver gives up.
    stop: CancellationToken,
}

/// Why a task could not be triggered.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("no scheduled task is named {0:?}")]
    Unknown(String),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
}

impl Scheduler {
    pub fn new(
        config: Arc<Config>,
        store: Stores,
        matrix: Arc<MatrixClient>,
        runtime: Arc<AgentRuntime>,
        collab: Arc<Collab>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let entries: Vec<Arc<Entry>> = config
            .schedules
            .iter()
            .filter_map(Entry::of_schedule)
            .chain(config.agents.iter().filter_map(Entry::of_heartbeat))
            .map(Arc::new)
            .collect();
        let by_name = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Arc::new(Self {
            config,
            store,
            matrix,
            runtime,
            collab,
            entries,
            by_name,
            stop,
        })
    }

    /// Starts one worker per enabled task on `tracker`; they end on `shutdown`.
    pub fn start(
        self: &Arc<Self>,
        tracker: &tokio_util::task::TaskTracker,
        shutdown: &CancellationToken,
    ) {
        for entry in &self.entries {
            if !entry.enabled {
                continue;
            }
            tracker.spawn(self.clone().run_entry(entry.clone(), shutdown.clone()));
        }
        if !self.entries.is_empty() {
            tracing::info!(tasks = self.entries.len(), "scheduler started");
        }
    }

    /// Every task with what is known of its runs, in config order (heartbeats last).
    pub async fn list(&self) -> Result<Vec<TaskView>, crate::store::StoreError> {
        let states: HashMap<String, ScheduleState> = self
            .store
            .schedules
            .schedule_states()
            .await?
            .into_iter()
            .collect();
        Ok(self
            .entries
            .iter()
            .map(|entry| view(entry, states.get(&entry.name)))
            .collect())
    }

    /// Runs task `name` now (whatever its schedule, active hours or pause) and returns
    /// how it stands after the run.
    pub async fn trigger(&self, name: &str) -> Result<TaskView, TriggerError> {
        let entry = self
            .by_name
            .get(name)
            .map(|&i| self.entries[i].clone())
            .ok_or_else(|| TriggerError::Unknown(name.to_owned()))?;
        let scheduled = crate::unix_ms();
        tracing::info!(task = %entry.name, "task triggered by hand");
        let state = self.fire(&entry, scheduled, true, None).await?;
        Ok(view(&entry, Some(&state)))
    }

    async fn state(&self, name: &str) -> ScheduleState {
        match self.store.schedules.schedule_state(name).await {
            Ok(state) => state.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(task = name, error = %e, "could not read the task's state");
                ScheduleState::default()
            }
        }
    }

    async fn save(
        &self,
        name: &str,
        state: &ScheduleState,
    ) -> Result<(), crate::store::StoreError> {
        self.store
            .schedules
            .save_schedule_state(name, state)
            .await
            .inspect_err(
                |e| tracing::warn!(task = name, error = %e, "could not save the task's state"),
            )
    }

    /// One task's worker: plans the start (catch-up, a run interrupted by a crash), then
    /// sleeps until each due time and runs.
    async fn run_entry(self: Arc<Self>, entry: Arc<Entry>, shutdown: CancellationToken) {
        let plan = {
            let _held = entry.lock.lock().await;
            let mut state = self.state(&entry.name).await;
            let now = crate::unix_ms();
            let plan = timing::plan_start(
                &entry.timing,
                &entry.timing_key,
                &state,
                entry.catch_up,
                now,
            );
            state.next_run_ms = plan.next;
            state.timing = entry.timing_key.clone();
            let _ = self.save(&entry.name, &state).await;
            if let Some(next) = plan.next {
                tracing::info!(task = %entry.name, next_run = %timing::rfc3339(next), "task scheduled");
            }
            plan
        };
        if let Some(scheduled) = plan.run_now {
            tracing::info!(task = %entry.name, scheduled = %timing::rfc3339(scheduled), "running a task missed or interrupted while agentbus was down");
            let _ = self.fire(&entry, scheduled, false, None).await;
        }
        loop {
            let Some(due) = self.state(&entry.name).await.next_run_ms else {
                tracing::info!(task = %entry.name, "task will not run again on its own");
                return;
            };
            let left = due.saturating_sub(crate::unix_ms());
            if left > 0 {
                // A far-off time is slept towards a day at a time, so a clock that was
                // set in between is read again.
                let wait = Duration::from_millis(left).min(LONGEST_SLEEP);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                if crate::unix_ms() < due {
                    continue;
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
            // The clock may say a little less than the timer did. Due times that passed
            // while the process could not run (a suspended machine) coalesce into one.
            let now = crate::unix_ms().max(due);
            let (latest, next) = timing::coalesce(&entry.timing, due, now);
            let _ = self.fire(&entry, latest, false, Some(next)).await;
        }
    }

    /// Does the run scheduled for `scheduled`: marks it in flight (moving the task's next
    /// due time to `next` in the same write, so a crash cannot lose the run between the
    /// two), runs it, records how it went; pauses the task (with one notice) when it has
    /// failed `max_failures` times in a row. A paused task runs only when `manual`.
    async fn fire(
        &self,
        entry: &Entry,
        scheduled: u64,
        manual: bool,
        next: Option<Option<u64>>,
    ) -> Result<ScheduleState, crate::store::StoreError> {
        let _held = entry.lock.lock().await;
        let mut state = self.state(&entry.name).await;
        if let Some(next) = next {
            state.next_run_ms = next;
        }
        if state.paused && !manual {
            tracing::debug!(task = %entry.name, "task paused after failures; not run");
            // A run by hand that a crash cut off is not redone for a paused task either.
            state.in_flight_ms = None;
            self.save(&entry.name, &state).await?;
            return Ok(state);
        }
        state.in_flight_ms = Some(scheduled);
        self.save(&entry.name, &state).await?;
        let ran = self.execute(entry, scheduled, manual).await;
        let mut state = self.state(&entry.name).await;
        match ran {
            Ran::Interrupted => {
                tracing::info!(task = %entry.name, "task run interrupted by shutdown; it is done again after the restart");
                return Ok(state);
            }
            Ran::Skipped => {}
            Ran::Done { posted } => {
                tracing::info!(task = %entry.name, posted, "task ran");
                state.last_run_ms = Some(scheduled);
                state.last_ended_ms = Some(crate::unix_ms());
                state.last_outcome = Some(RunOutcome::Ok { posted });
                state.failures = 0;
                if state.paused {
                    tracing::info!(task = %entry.name, "task resumed after a successful run");
                }
                state.paused = false;
            }
            Ran::Failed(error) => {
                state.last_run_ms = Some(scheduled);
                state.last_ended_ms = Some(crate::unix_ms());
                state.failures += 1;
                tracing::warn!(task = %entry.name, failures = state.failures, %error, "task run failed");
                if state.failures >= entry.max_failures && !state.paused {
                    state.paused = true;
                    self.say_paused(entry, scheduled, state.failures, &error)
                        .await;
                }
                state.last_outcome = Some(RunOutcome::Failed { error });
            }
        }
        state.in_flight_ms = None;
        self.save(&entry.name, &state).await?;
        Ok(state)
    }

    /// The one notice of a task that paused.
    async fn say_paused(&self, entry: &Entry, scheduled: u64, failures: u32, error: &str) {
        let Ok(room) = self.resolve_room(&entry.room).await else {
            tracing::error!(task = %entry.name, room = %entry.room, "task paused; its room cannot be reached to say so");
            return;
        };
        let poster = entry.action.poster();
        let text = format!(
            "⚠️ Scheduled task \"{}\" failed {failures} times in a row and is paused. Last error: {error}. \
             Run it by hand (agentbus tasks run {}) to try again; it resumes when a run succeeds.",
            entry.name, entry.name
        );
        let content = json!({
            "msgtype": "m.notice",
            "body": text,
            "m.mentions": {},
            HOPS_KEY: 1,
        });
        let origin = run_origin(&entry.name, scheduled);
        let txn = crate::agents::derived_txn_id(
            &origin,
            poster,
            &format!("schedule:{}\u{1f}paused", entry.name),
        );
        let user = self.config.user_id(poster);
        if let Err(e) = self
            .matrix
            .intent(&user)
            .send_message_until_delivered(&room, &txn, &content, &self.stop)
            .await
        {
            tracing::error!(task = %entry.name, room_id = %room, error = ?e, "could not post the task's failure notice");
        }
    }

    async fn resolve_room(&self, room: &str) -> Result<OwnedRoomId, String> {
        if room.starts_with('#') {
            let alias = RoomAliasId::parse(room).map_err(|e| format!("{room:?}: {e}"))?;
            self.matrix
                .resolve_alias(&alias)
                .await
                .map_err(|e| format!("the alias {room} does not resolve: {e}"))
        } else {
            RoomId::parse(room).map_err(|e| format!("{room:?}: {e}"))
        }
    }

    async fn execute(&self, entry: &Entry, scheduled: u64, manual: bool) -> Ran {
        if let Action::Heartbeat {
            hours: Some(hours), ..
        } = &entry.action
            && !manual
            && !hours.contains(timing::minute_of_day(scheduled, entry.zone))
        {
            tracing::debug!(task = %entry.name, "heartbeat outside its active hours");
            return Ran::Skipped;
        }
        let room = match self.resolve_room(&entry.room).await {
            Ok(room) => room,
            Err(e) => return Ran::Failed(e),
        };
        let poster = entry.action.poster();
        let poster_user = self.config.user_id(poster);
        if let Err(e) = self.matrix.intent(&poster_user).ensure_joined(&room).await {
            return Ran::Failed(format!("@{poster} cannot join {room}: {e}"));
        }
        let origin = run_origin(&entry.name, scheduled);
        let reason = Reason::Schedule {
            task: entry.name.clone(),
        };
        match &entry.action {
            Action::Send { agent, text } => {
                let text = timing::fill(text, scheduled, entry.zone);
                self.post(agent, &room, &origin, &reason, &text).await
            }
            Action::Ask { agent, prompt } => {
                let prompt = timing::fill(prompt, scheduled, entry.zone);
                match self
                    .ask(entry, agent, &room, &origin, &reason, prompt, scheduled)
                    .await
                {
                    Ok(text) => self.post(agent, &room, &origin, &reason, &text).await,
                    Err(ran) => ran,
                }
            }
            Action::Heartbeat { agent, .. } => {
                let path = workspace(&self.config, agent).join(HEARTBEAT_FILE);
                let checklist = match tokio::fs::read_to_string(&path).await {
                    Ok(text) if !text.trim().is_empty() => text,
                    Ok(_) => return Ran::Done { posted: false },
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        tracing::debug!(task = %entry.name, path = %path.display(), "no heartbeat checklist; nothing to check");
                        return Ran::Done { posted: false };
                    }
                    Err(e) => return Ran::Failed(format!("cannot read {}: {e}", path.display())),
                };
                let prompt = heartbeat_prompt(&checklist);
                match self
                    .ask(entry, agent, &room, &origin, &reason, prompt, scheduled)
                    .await
                {
                    Ok(text) if text.trim() == HEARTBEAT_OK => Ran::Done { posted: false },
                    Ok(text) => self.post(agent, &room, &origin, &reason, &text).await,
                    Err(ran) => ran,
                }
            }
            Action::Team { team, prompt } => {
                let prompt = timing::fill(prompt, scheduled, entry.zone);
                self.run_team(entry, team, &room, &origin, &reason, prompt, scheduled)
                    .await
            }
        }
    }

    async fn post(
        &self,
        agent: &AgentId,
        room: &RoomId,
        origin: &EventId,
        reason: &Reason,
        text: &str,
    ) -> Ran {
        match self
            .runtime
            .post_as(agent, room, origin, reason, text)
            .await
        {
            Ok(events) => Ran::Done {
                posted: !events.is_empty(),
            },
            Err(Undelivered::Stopped) => Ran::Interrupted,
            Err(Undelivered::Permanent(e)) => {
                Ran::Failed(format!("@{agent} could not post in {room}: {e}"))
            }
        }
    }

    /// Runs `agent` silently on `prompt` in its session `cron:<task>`; its answer.
    #[allow(clippy::too_many_arguments)]
    async fn ask(
        &self,
        entry: &Entry,
        agent: &AgentId,
        room: &RoomId,
        origin: &EventId,
        reason: &Reason,
        prompt: String,
        scheduled: u64,
    ) -> Result<String, Ran> {
        let turn = Turn {
            room_id: room.to_owned(),
            event_id: origin.to_owned(),
            sender: self.config.sender_user_id(),
            sender_name: format!("scheduled task {}", entry.name),
            body: prompt,
            image: None,
            reply_to: None,
            thread_root: None,
            hops: 0,
            group: false,
            ts: scheduled,
        };
        let job = Job::Answer(Assignment {
            session: SessionKey::new(agent, room, Some(&session_thread(&entry.name))),
            inputs: vec![turn],
            reason: reason.clone(),
            destination: Destination::Silent,
            schema: None,
        });
        let outcome = match self.runtime.submit(job) {
            Submitted::Queued { outcome, .. } => outcome,
            Submitted::Busy => return Err(Ran::Failed(format!("@{agent} is busy"))),
            Submitted::Refused => return Err(Ran::Failed(format!("@{agent} cannot run"))),
        };
        let Ok(outcome) = outcome.await else {
            return Err(Ran::Interrupted);
        };
        match outcome.ended {
            Ended::Finished if outcome.text.trim().is_empty() => {
                Err(Ran::Failed(format!("@{agent} answered nothing")))
            }
            Ended::Finished => Ok(outcome.text),
            Ended::Failed(notice) => Err(Ran::Failed(notice)),
            Ended::TimedOut => Err(Ran::Failed(format!(
                "@{agent}'s model did not answer in time"
            ))),
            Ended::Cancelled => Err(Ran::Failed(format!("@{agent} was stopped"))),
            Ended::Undeliverable(why) => Err(Ran::Failed(why)),
            Ended::Interrupted => Err(Ran::Interrupted),
        }
    }

    /// Posts the request as the team and runs the team's task on it. The request's
    /// transaction ID comes from the run, so after a crash the same request event comes
    /// back, and the team resumes (or does not repeat) its task on it.
    #[allow(clippy::too_many_arguments)]
    async fn run_team(
        &self,
        entry: &Entry,
        team: &AgentId,
        room: &RoomId,
        origin: &EventId,
        reason: &Reason,
        prompt: String,
        scheduled: u64,
    ) -> Ran {
        // The team invites its members who are not in the room; in a room they may join
        // without an invite (a public one) they join first, in case it cannot invite.
        if let Some(config) = self.config.team(team) {
            for member in config.members() {
                let user = self.config.user_id(&member);
                if let Err(e) = self.matrix.intent(&user).ensure_joined(room).await {
                    tracing::debug!(task = %entry.name, agent = %member, error = %e, "a team member could not join by itself; the team invites it");
                }
            }
        }
        let events = match self
            .runtime
            .post_as(team, room, origin, reason, &prompt)
            .await
        {
            Ok(events) => events,
            Err(Undelivered::Stopped) => return Ran::Interrupted,
            Err(Undelivered::Permanent(e)) => {
                return Ran::Failed(format!("@{team} could not post in {room}: {e}"));
            }
        };
        let Some(request) = events.first().cloned() else {
            return Ran::Failed("the team's request was not posted".into());
        };
        let turn = Turn {
            room_id: room.to_owned(),
            event_id: request,
            sender: self.config.user_id(team),
            sender_name: format!("scheduled task {}", entry.name),
            body: prompt,
            image: None,
            reply_to: None,
            thread_root: None,
            hops: 1,
            group: false,
            ts: scheduled,
        };
        match self.collab.start(team, turn, false).await {
            Some(Delivery::Delivered) => Ran::Done { posted: true },
            Some(Delivery::Interrupted) => Ran::Interrupted,
            Some(Delivery::Undeliverable) => {
                Ran::Failed(format!("@{team}'s task could not post in {room}"))
            }
            None => Ran::Failed(format!("@{team}'s task did not run")),
        }
    }
}

/// The event ID a run's sends derive their transaction IDs from: the task's name and the
/// run's scheduled time (not a real event; nothing else derives from it).
fn run_origin(name: &str, scheduled: u64) -> OwnedEventId {
    EventId::parse(format!("$schedule-{}-{scheduled}", hex::encode(name)))
        .expect("hex and digits form an event ID")
}

/// The thread part of the session a task's agent runs in: `cron:<task>`.
fn session_thread(name: &str) -> OwnedEventId {
    EventId::parse(format!("$cron:{name}"))
        .or_else(|_| EventId::parse(format!("$cron-{}", hex::encode(name))))
        .expect("hex forms an event ID")
}

/// What a heartbeat asks the agent.
fn heartbeat_prompt(checklist: &str) -> String {
    format!(
        "Heartbeat: go through your checklist below. If nothing needs attention, answer exactly \
         {HEARTBEAT_OK} and nothing else. Otherwise write the message to post in the room.\n\n\
         {checklist}"
    )
}

fn view(entry: &Entry, state: Option<&ScheduleState>) -> TaskView {
    let state = state.cloned().unwrap_or_default();
    // A stored plan of another timing is redone at start-up: do not show it.
    let next = (entry.enabled && state.timing == entry.timing_key)
        .then_some(state.next_run_ms)
        .flatten();
    TaskView {
        name: entry.name.clone(),
        kind: entry.action.kind().to_owned(),
        schedule: entry.timing_key.clone(),
        room: entry.room.clone(),
        enabled: entry.enabled,
        paused: state.paused,
        failures: state.failures,
        last_run: state.last_run_ms.map(timing::rfc3339),
        last_outcome: state.last_outcome,
        next_run: next.map(timing::rfc3339),
        running: state.in_flight_ms.is_some(),
    }
}

/// The tasks of `config` as `store` has them, for when no agentbus is running.
pub async fn list_stored(
    config: &Config,
    store: &Stores,
) -> Result<Vec<TaskView>, crate::store::StoreError> {
    let states: HashMap<String, ScheduleState> = store
        .schedules
        .schedule_states()
        .await?
        .into_iter()
        .collect();
    Ok(config
        .schedules
        .iter()
        .filter_map(Entry::of_schedule)
        .chain(config.agents.iter().filter_map(Entry::of_heartbeat))
        .map(|entry| view(&entry, states.get(&entry.name)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runs_origin_and_session_are_named_after_the_task() {
        assert_eq!(
            run_origin("morning", 1_800_000_000_000).as_str(),
            "$schedule-6d6f726e696e67-1800000000000"
        );
        assert_ne!(run_origin("morning", 1), run_origin("morning", 2));
        assert_eq!(session_thread("morning").as_str(), "$cron:morning");
        assert!(
            session_thread("heartbeat:da/mon")
                .as_str()
                .starts_with("$cron")
        );
    }
}
