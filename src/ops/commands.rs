//! Management commands in Matrix, for the admins of `admin.users`.
//!
//! The management room is a room the appservice's bot (`@agentbus:server`) is in: an
//! admin invites it, to a DM usually, and it joins (anyone else's invite is declined).
//! There a command is typed as is (`!agents`); in any other room it takes the prefix
//! `!agentbus` (`!agentbus agents`). The bot answers with a notice that replies to the
//! command (where the bot is not in the room, one of our agents who is answers for it),
//! its transaction ID derived from the command's event, so a command replayed after a
//! restart is answered once.
//!
//! | command | what it does |
//! |---|---|
//! | `!agents` | each agent: model, running and queued answers |
//! | `!route <text>` | routes `<text>` as the admin's message in this room, without sending anything |
//! | `!pairing list` / `approve CODE` / `revoke USER` | DM pairing |
//! | `!status` | the readiness checks |
//! | `!tasks` / `!task run NAME` | the scheduled tasks; run one now |
//! | `!reset @agent [ROOM]` | the agent forgets its conversation in the room (default: this one) |
//! | `!stop [ROOM]` | stops every team task and answer running in the room (default: this one) |
//! | `!help` | the list |
//!
//! Anything else that looks like a command gets the list; a non-admin gets a refusal.

use std::sync::{Arc, OnceLock, Weak};

use futures::future::BoxFuture;
use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::json;

use super::api::{approve, read_pairings};
use super::health::Readiness;
use super::schedule::{Scheduler, TaskView};
use crate::agents::AgentRuntime;
use crate::collab::Collab;
use crate::config::{AgentId, ChannelId, Config};
use crate::inbox::{Management, ManagementRequest};
use crate::matrix::MatrixClient;
use crate::router::explain::{Explain, RouteQuery};
use crate::store::{SessionKey, Stores};

/// The prefix outside the management room.
pub const PREFIX: &str = "!agentbus";

/// A command, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Agents,
    Route(String),
    PairingList,
    PairingApprove(String),
    PairingRevoke(String),
    Status,
    Reset {
        agent: String,
        room: Option<String>,
    },
    Stop {
        room: Option<String>,
    },
    Tasks,
    TaskRun(String),
    Help,
    /// A word we do not know (or a known one with the wrong arguments): the help, with why.
    Unknown(String),
}

/// The command in `body`, if it is one: in the management room any `!word`, elsewhere
/// only after [`PREFIX`].
pub fn parse(body: &str, management_room: bool) -> Option<Command> {
    let body = body.trim();
    let rest = match body.strip_prefix(PREFIX) {
        Some(rest) if rest.is_empty() || rest.starts_with(char::is_whitespace) => rest.trim(),
        _ if management_room => body.strip_prefix('!')?,
        _ => return None,
    };
    let (word, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let args: Vec<&str> = args.split_whitespace().collect();
    let wrong = |usage: &str| Command::Unknown(format!("usage: {usage}"));
    Some(match (word, args.as_slice()) {
        ("agents", []) => Command::Agents,
        ("route", []) => wrong("!route <text>"),
        ("route", _) => Command::Route(rest["route".len()..].trim().to_owned()),
        ("pairing", ["list"] | []) => Command::PairingList,
        ("pairing", ["approve", code]) => Command::PairingApprove((*code).to_owned()),
        ("pairing", ["revoke", user]) => Command::PairingRevoke((*user).to_owned()),
        ("pairing", _) => wrong("!pairing list | approve CODE | revoke USER"),
        ("status", []) => Command::Status,
        ("tasks", []) => Command::Tasks,
        ("task", ["run", name]) => Command::TaskRun((*name).to_owned()),
        ("task", _) => wrong("!task run NAME"),
        ("reset", [agent]) => Command::Reset {
            agent: (*agent).to_owned(),
            room: None,
        },
        ("reset", [agent, room]) => Command::Reset {
            agent: (*agent).to_owned(),
            room: Some((*room).to_owned()),
        },
        ("reset", _) => wrong("!reset @agent [ROOM]"),
        ("stop", []) => Command::Stop { room: None },
        ("stop", [room]) => Command::Stop {
            room: Some((*room).to_owned()),
        },
        ("help" | "", _) => Command::Help,
        (other, _) => Command::Unknown(format!("unknown command !{other}")),
    })
}

const HELP: &str = "agentbus commands (in the management room as is, elsewhere after !agentbus):\n\
!agents — each agent's model, running and queued answers\n\
!route <text> — who would answer <text> here, and why (nothing is sent)\n\
!pairing list | approve CODE | revoke USER — DM pairing\n\
!status — the readiness checks\n\
!tasks — the scheduled tasks with their last and next runs\n\
!task run NAME — run a scheduled task now\n\
!reset @agent [ROOM] — the agent forgets its conversation in the room\n\
!stop [ROOM] — stop every task and answer running in the room\n\
!help — this list";

/// Answers management commands (the inbox hands them over).
pub struct Commands {
    config: Arc<Config>,
    store: Stores,
    runtime: Arc<AgentRuntime>,
    collab: Arc<Collab>,
    matrix: Arc<MatrixClient>,
    readiness: Arc<Readiness>,
    scheduler: Arc<Scheduler>,
    /// The inbox, which holds these commands: weak, so neither keeps the other alive.
    explain: OnceLock<Weak<dyn Explain>>,
}

impl Commands {
    pub fn new(
        config: Arc<Config>,
        store: Stores,
        runtime: Arc<AgentRuntime>,
        collab: Arc<Collab>,
        matrix: Arc<MatrixClient>,
        readiness: Arc<Readiness>,
        scheduler: Arc<Scheduler>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            store,
            runtime,
            collab,
            matrix,
            readiness,
            scheduler,
            explain: OnceLock::new(),
        })
    }

    /// What `!route` asks (the inbox, once it exists).
    pub fn set_explain(&self, explain: Weak<dyn Explain>) {
        let _ = self.explain.set(explain);
    }

    async fn run(&self, request: &ManagementRequest, command: Command) -> String {
        match command {
            Command::Help => HELP.to_owned(),
            Command::Unknown(why) => format!("{why}\n\n{HELP}"),
            Command::Agents => self.agents(),
            Command::Route(text) => self.route(request, text).await,
            Command::PairingList => self.pairing_list().await,
            Command::PairingApprove(code) => {
                match approve(self.store.pairing.as_ref(), &code).await {
                    Ok(Some(approved)) => {
                        tracing::info!(sender = %approved.sender, by = %request.sender, "pairing approved in Matrix");
                        format!("✅ approved {} on {}", approved.sender, approved.channel)
                    }
                    Ok(None) => format!("no pending pairing request has the code {code}"),
                    Err(e) => format!("❌ could not approve: {e}"),
                }
            }
            Command::PairingRevoke(user) => {
                let matrix = ChannelId::from("matrix");
                match self.store.pairing.revoke_pairing(&matrix, &user).await {
                    Ok(true) => format!("✅ {user} is no longer paired"),
                    Ok(false) => format!("{user} is not paired"),
                    Err(e) => format!("❌ could not revoke: {e}"),
                }
            }
            Command::Status => self.status().await,
            Command::Tasks => self.tasks().await,
            Command::TaskRun(name) => match self.scheduler.trigger(&name).await {
                Ok(task) => {
                    tracing::info!(task = %name, by = %request.sender, "scheduled task run by a management command");
                    format!("▶ ran {name}: {}", task_line(&task))
                }
                Err(e) => format!("❌ {e}"),
            },
            Command::Reset { agent, room } => self.reset(request, &agent, room).await,
            Command::Stop { room } => {
                let room = match self.room_arg(request, room).await {
                    Ok(room) => room,
                    Err(why) => return why,
                };
                let tasks = self.collab.stop_room(&room, &request.sender);
                let runs = self.runtime.cancel_room(&room);
                tracing::info!(room_id = %room, by = %request.sender, tasks, runs, "stopped by a management command");
                format!("🛑 stopped {tasks} team task(s) and {runs} answer(s) in {room}")
            }
        }
    }

    fn agents(&self) -> String {
        let mut lines = vec![format!("{} agents:", self.config.agents.len())];
        for agent in &self.config.agents {
            let (running, queued) = self.runtime.load_of(&agent.id);
            let state = if running == 0 {
                "idle".to_owned()
            } else {
                format!("answering in {running} session(s), {queued} queued")
            };
            lines.push(format!(
                "• {} ({}) — {} — {state}",
                agent.display_name(),
                self.config.user_id(&agent.id),
                agent
                    .model_chain()
                    .first()
                    .map_or_else(String::new, ToString::to_string),
            ));
        }
        for team in &self.config.teams {
            lines.push(format!(
                "• team {} ({}) — {} — {} member(s)",
                team.display_name(),
                self.config.user_id(&team.id),
                format!("{:?}", team.mode).to_lowercase(),
                team.members().len(),
            ));
        }
        lines.join("\n")
    }

    async fn route(&self, request: &ManagementRequest, text: String) -> String {
        let Some(explain) = self.explain.get().and_then(Weak::upgrade) else {
            return "routing is not ready yet".to_owned();
        };
        let query = RouteQuery {
            room: request.room_id.to_string(),
            sender: request.sender.to_string(),
            text,
            formatted_body: None,
            mentions: None,
            room_mention: false,
            reply_to: None,
            thread: None,
        };
        match explain.explain(&query).await {
            Ok(decision) if decision.targets.is_empty() => format!(
                "nobody would answer ({}): {}",
                decision.strategy.as_str(),
                decision.reason
            ),
            Ok(decision) => format!(
                "{} would answer ({}): {}",
                decision
                    .targets
                    .iter()
                    .map(|a| format!("@{a}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                decision.strategy.as_str(),
                decision.reason
            ),
            Err(e) => format!("❌ {e}"),
        }
    }

    async fn tasks(&self) -> String {
        match self.scheduler.list().await {
            Ok(tasks) if tasks.is_empty() => {
                "no scheduled tasks (schedules: in the config)".to_owned()
            }
            Ok(tasks) => {
                let mut lines = vec![format!("{} scheduled task(s):", tasks.len())];
                lines.extend(
                    tasks
                        .iter()
                        .map(|t| format!("• {} — {}", t.name, task_line(t))),
                );
                lines.join("\n")
            }
            Err(e) => format!("❌ could not read the tasks: {e}"),
        }
    }

    async fn pairing_list(&self) -> String {
        match read_pairings(self.store.pairing.as_ref()).await {
            Ok(state) => {
                let mut lines = vec![format!("{} pending:", state.pending.len())];
                lines.extend(
                    state
                        .pending
                        .iter()
                        .map(|p| format!("• {} on {} — code {}", p.sender, p.channel, p.code)),
                );
                lines.push(format!("{} approved:", state.approved.len()));
                lines.extend(
                    state
                        .approved
                        .iter()
                        .map(|p| format!("• {} on {}", p.sender, p.channel)),
                );
                lines.join("\n")
            }
            Err(e) => format!("❌ could not read the pairings: {e}"),
        }
    }

    async fn status(&self) -> String {
        let (ready, report) = self.readiness.report().await;
        let mut lines = vec![if ready {
            "✅ ready".to_owned()
        } else {
            "❌ not ready".to_owned()
        }];
        for check in ["store", "homeserver", "appservice_ping"] {
            let entry = &report["checks"][check];
            let mark = if entry["ok"] == true { "✓" } else { "✗" };
            lines.push(format!(
                "{mark} {check}: {}",
                entry["detail"].as_str().unwrap_or_default()
            ));
        }
        if let Some(providers) = report["checks"]["providers"]["providers"].as_object() {
            for (name, entry) in providers {
                let state = entry["state"].as_str().unwrap_or_default();
                let mark = if state == "failing" { "✗" } else { "✓" };
                let error = entry["error"]
                    .as_str()
                    .map(|e| format!(" — {e}"))
                    .unwrap_or_default();
                lines.push(format!("{mark} provider {name}: {state}{error}"));
            }
        }
        if let Some(accounts) = report["checks"]["bridges"]["accounts"].as_object() {
            for (name, entry) in accounts {
                let state = entry["state"].as_str().unwrap_or_default();
                let mark = if matches!(state, "connected" | "connecting" | "starting") {
                    "✓"
                } else {
                    "✗"
                };
                let detail = entry["detail"]
                    .as_str()
                    .map(|d| format!(" — {d}"))
                    .unwrap_or_default();
                lines.push(format!("{mark} bridge {name}: {state}{detail}"));
            }
        }
        lines.join("\n")
    }

    async fn reset(
        &self,
        request: &ManagementRequest,
        agent: &str,
        room: Option<String>,
    ) -> String {
        let id = agent.trim_start_matches('@');
        let id = id.split_once(':').map_or(id, |(local, _)| local);
        let Some(agent) = AgentId::parse(id)
            .ok()
            .and_then(|id| self.config.agent(&id))
        else {
            return format!("no agent is called {agent}");
        };
        let room = match self.room_arg(request, room).await {
            Ok(room) => room,
            Err(why) => return why,
        };
        match self
            .store
            .sessions
            .clear_session(&SessionKey::new(&agent.id, &room, None))
            .await
        {
            Ok(lines) => {
                tracing::info!(agent = %agent.id, room_id = %room, by = %request.sender, lines, "session reset by a management command");
                format!(
                    "🧹 {} forgot {lines} line(s) of its conversation in {room}",
                    agent.display_name()
                )
            }
            Err(e) => format!("❌ could not reset: {e}"),
        }
    }

    /// A command's room argument (an ID or an alias), or the room it was typed in.
    async fn room_arg(
        &self,
        request: &ManagementRequest,
        room: Option<String>,
    ) -> Result<OwnedRoomId, String> {
        let Some(room) = room else {
            return Ok(request.room_id.clone());
        };
        if let Ok(id) = RoomId::parse(&room) {
            return Ok(id);
        }
        let alias = ruma::RoomAliasId::parse(&room)
            .map_err(|_| format!("{room} is neither a room ID (!…) nor an alias (#…)"))?;
        self.matrix
            .resolve_alias(&alias)
            .await
            .map_err(|e| format!("cannot find {room}: {e}"))
    }

    /// Posts `text` as the bot (or, where it is not in the room, as one of our agents
    /// who is), replying to the command.
    async fn reply(&self, request: &ManagementRequest, text: &str) {
        let content = json!({
            "msgtype": "m.notice",
            "body": text,
            "m.mentions": { "user_ids": [request.sender] },
            "m.relates_to": { "m.in_reply_to": { "event_id": request.event_id } },
        });
        let txn = {
            use sha2::Digest as _;
            let digest = sha2::Sha256::digest(format!("management\0{}", request.event_id));
            ruma::OwnedTransactionId::from(format!("agentbus-{}", &hex::encode(digest)[..32]))
        };
        if let Err(e) = self
            .matrix
            .intent(&request.reply_as)
            .send_message(&request.room_id, &txn, &content)
            .await
        {
            tracing::warn!(room_id = %request.room_id, error = %e, "could not answer a management command");
        }
    }

    fn is_admin(&self, user: &UserId) -> bool {
        self.config.admin.is_admin(user.as_str())
    }
}

impl Management for Commands {
    fn handle<'a>(&'a self, request: &'a ManagementRequest) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let Some(command) = parse(&request.body, request.management_room) else {
                return false;
            };
            let text = if self.is_admin(&request.sender) {
                tracing::info!(room_id = %request.room_id, sender = %request.sender, command = ?command, "management command");
                self.run(request, command).await
            } else {
                tracing::info!(room_id = %request.room_id, sender = %request.sender, "management command refused: not an admin");
                "⛔ only the admins in admin.users may run agentbus commands".to_owned()
            };
            self.reply(request, &text).await;
            true
        })
    }

    fn may_manage(&self, user: &UserId) -> bool {
        self.is_admin(user)
    }
}

/// A task's line in `!tasks`: kind, schedule, state, last and next run.
fn task_line(task: &TaskView) -> String {
    let state = if !task.enabled {
        "disabled".to_owned()
    } else if task.paused {
        format!("paused after {} failures", task.failures)
    } else if task.running {
        "running".to_owned()
    } else {
        "scheduled".to_owned()
    };
    let last = match (&task.last_run, &task.last_outcome) {
        (Some(at), Some(outcome)) => format!(
            "last {at} ({})",
            serde_json::to_value(outcome)
                .map(|v| match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                })
                .unwrap_or_default()
        ),
        (Some(at), None) => format!("last {at}"),
        _ => "never ran".to_owned(),
    };
    let next = task
        .next_run
        .as_deref()
        .map_or_else(|| "not due again".to_owned(), |at| format!("next {at}"));
    format!(
        "{} {} in {} — {state} — {last} — {next}",
        task.kind, task.schedule, task.room
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_in_the_management_room_as_is_and_elsewhere_after_the_prefix() {
        assert_eq!(parse("!agents", true), Some(Command::Agents));
        assert_eq!(
            parse("!agents", false),
            None,
            "an ordinary room needs the prefix"
        );
        assert_eq!(parse("!agentbus agents", false), Some(Command::Agents));
        assert_eq!(parse("!agentbus", false), Some(Command::Help));
        assert_eq!(parse("!agentbusy", false), None);
        assert_eq!(parse("hello", true), None);
        assert_eq!(
            parse("!route  who knows @coder stuff", true),
            Some(Command::Route("who knows @coder stuff".into()))
        );
        assert_eq!(
            parse("!pairing approve AB12CD", true),
            Some(Command::PairingApprove("AB12CD".into()))
        );
        assert_eq!(parse("!pairing", true), Some(Command::PairingList));
        assert_eq!(
            parse("!agentbus reset @coder !room:x", false),
            Some(Command::Reset {
                agent: "@coder".into(),
                room: Some("!room:x".into())
            })
        );
        assert_eq!(parse("!stop", true), Some(Command::Stop { room: None }));
        assert_eq!(
            parse("!frobnicate", true),
            Some(Command::Unknown("unknown command !frobnicate".into()))
        );
        assert_eq!(
            parse("!pairing approve", true),
            Some(Command::Unknown(
                "usage: !pairing list | approve CODE | revoke USER".into()
            ))
        );
    }
}
