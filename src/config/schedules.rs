//! `schedules:` — tasks that run on their own: at cron times in a time zone
//! (`cron: "0 8 * * mon-fri"`, `timezone: Europe/Berlin`), every so often (`every: 30m`) or
//! once (`at: 2026-12-24T09:00:00+01:00`); each posts into one room, by one action:
//! `send_message` (a template as an agent), `ask_agent` (the agent writes the text) or
//! `run_team` (a team's task). And `agents[].heartbeat`: an agent reads its `HEARTBEAT.md`
//! checklist every `interval` within `active_hours` and posts only what needs saying.
//!
//! Cron patterns are read by `croner` (five fields, or six with seconds first; names such
//! as `mon-fri` and `jan`), in the IANA time zone `timezone` names (`chrono-tz`, default
//! UTC): `0 8 * * *` in `Europe/Berlin` is 08:00 Berlin time in winter and in summer.

use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::ids::AgentId;

/// One entry of `schedules:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Names the task in the API, the CLI and its session (`cron:<name>`): letters,
    /// digits, `-`, `_` and `.`.
    pub name: String,
    /// A cron pattern (`minute hour day-of-month month day-of-week`, or with seconds
    /// first). Exactly one of `cron`, `every` and `at`.
    #[serde(default)]
    pub cron: Option<String>,
    /// The IANA time zone `cron` and the templates' `{{date}}`, `{{time}}` and
    /// `{{weekday}}` are read in (default `UTC`).
    #[serde(default)]
    pub timezone: Option<String>,
    /// Runs this often (`30m`, `2h`, at least `1s`), the first time one interval after
    /// agentbus starts.
    #[serde(default, with = "humantime_serde")]
    pub every: Option<Duration>,
    /// Runs once, at this RFC 3339 time (`2026-12-24T09:00:00+01:00`).
    #[serde(default)]
    pub at: Option<String>,
    /// The room the task posts in: an ID (`!abc:server`) or an alias (`#ops:server`).
    pub room: String,
    /// Post a template as an agent.
    #[serde(default)]
    pub send_message: Option<SendMessageAction>,
    /// Have an agent write the message (in its session `cron:<name>`).
    #[serde(default)]
    pub ask_agent: Option<AskAgentAction>,
    /// Give a team a task in the room.
    #[serde(default)]
    pub run_team: Option<RunTeamAction>,
    /// What happens to runs missed while agentbus was down: `one` (default: one run at
    /// start-up stands for all of them) or `none` (they are skipped).
    #[serde(default)]
    pub catch_up: CatchUp,
    /// After this many failed runs in a row the task posts one notice and pauses
    /// (default 3); triggering it by hand resumes it.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// `false` keeps the task listed but never run on its own (default `true`).
    #[serde(default = "default_enabled")]
    pub enabled: bool,
}

fn default_max_failures() -> u32 {
    3
}
fn default_enabled() -> bool {
    true
}

/// `schedules[].send_message`: `{{date}}`, `{{time}}` and `{{weekday}}` in `text` are the
/// run's scheduled time in the task's `timezone`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMessageAction {
    /// The agent that posts it.
    #[serde(rename = "as")]
    pub agent: AgentId,
    pub text: String,
}

/// `schedules[].ask_agent`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AskAgentAction {
    pub agent: AgentId,
    /// What the agent is asked; the same placeholders as `send_message.text`.
    pub prompt: String,
}

/// `schedules[].run_team`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunTeamAction {
    pub team: AgentId,
    /// The request the team works on; the same placeholders as `send_message.text`.
    pub prompt: String,
}

/// `schedules[].catch_up`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    #[default]
    One,
    None,
}

/// `agents[].heartbeat`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// How often the agent goes through its checklist (default `30m`, at least `1s`).
    #[serde(default = "default_heartbeat_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// `HH:MM-HH:MM` in `timezone`: beats outside it are skipped (default: all day). An
    /// end before the start spans midnight (`22:00-06:00`).
    #[serde(default)]
    pub active_hours: Option<String>,
    /// The IANA time zone of `active_hours` (default `UTC`).
    #[serde(default)]
    pub timezone: Option<String>,
    /// Where the agent posts what it has to say: a room ID or alias.
    pub room: String,
}

fn default_heartbeat_interval() -> Duration {
    Duration::from_secs(30 * 60)
}

/// When a task runs, compiled from its config.
#[derive(Debug, Clone)]
pub enum Timing {
    Cron {
        cron: Box<croner::Cron>,
        zone: chrono_tz::Tz,
    },
    Every(Duration),
    /// Unix milliseconds.
    At(u64),
}

/// Minutes since midnight, start and end of `active_hours`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveHours {
    pub start: u32,
    pub end: u32,
}

impl ActiveHours {
    /// `HH:MM-HH:MM`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} must be HH:MM-HH:MM, e.g. 08:00-22:00");
        let (start, end) = text.split_once('-').ok_or_else(bad)?;
        let minutes = |hm: &str| -> Option<u32> {
            let (h, m) = hm.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            // 24:00 ends a day.
            ((h < 24 && m < 60) || (h == 24 && m == 0)).then_some(h * 60 + m)
        };
        let (start, end) = (
            minutes(start).ok_or_else(bad)?,
            minutes(end).ok_or_else(bad)?,
        );
        if start == end {
            return Err(format!("{text:?} is empty: its start and end are the same"));
        }
        Ok(Self { start, end })
    }

    /// Whether `minute` (since midnight) is inside; an end before the start spans midnight.
    pub fn contains(&self, minute: u32) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

/// The time zone `name` (IANA), UTC when there is none.
pub fn time_zone(name: Option<&str>) -> Result<chrono_tz::Tz, String> {
    match name {
        None => Ok(chrono_tz::UTC),
        Some(name) => chrono_tz::Tz::from_str(name).map_err(|_| {
            format!("{name:?} is not an IANA time zone (e.g. Europe/Berlin, America/New_York, UTC)")
        }),
    }
}

/// The placeholders a template may use.
pub const TEMPLATE_FIELDS: [&str; 3] = ["date", "time", "weekday"];

/// Checks that `text` uses only [`TEMPLATE_FIELDS`].
fn check_template(text: &str) -> Result<(), String> {
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            return Err("has a `{{` without its `}}`".into());
        };
        let field = after[..close].trim();
        if !TEMPLATE_FIELDS.contains(&field) {
            return Err(format!(
                "unknown placeholder {{{{{field}}}}}; known: {}",
                TEMPLATE_FIELDS.map(|f| format!("{{{{{f}}}}}")).join(", ")
            ));
        }
        rest = &after[close + 2..];
    }
    Ok(())
}

impl ScheduleConfig {
    /// When the task runs; the error names the key.
    pub fn timing(&self) -> Result<Timing, (&'static str, String)> {
        match (&self.cron, self.every, &self.at) {
            (Some(pattern), None, None) => {
                let cron = croner::Cron::from_str(pattern)
                    .map_err(|e| ("cron", format!("{pattern:?} is not a cron pattern: {e}")))?;
                let zone = time_zone(self.timezone.as_deref()).map_err(|e| ("timezone", e))?;
                Ok(Timing::Cron {
                    cron: Box::new(cron),
                    zone,
                })
            }
            (None, Some(every), None) => {
                if every < Duration::from_secs(1) {
                    return Err(("every", "must be at least 1s".into()));
                }
                Ok(Timing::Every(every))
            }
            (None, None, Some(at)) => chrono::DateTime::parse_from_rfc3339(at)
                .map(|t| Timing::At(u64::try_from(t.timestamp_millis()).unwrap_or(0)))
                .map_err(|e| {
                    (
                        "at",
                        format!(
                            "{at:?} is not an RFC 3339 time with an offset, e.g. 2026-12-24T09:00:00+01:00 ({e})"
                        ),
                    )
                }),
            (None, None, None) => Err(("cron", "needs one of cron, every or at".into())),
            _ => Err((
                "cron",
                "give only one of cron, every and at".into(),
            )),
        }
    }

    /// The zone templates are filled in: `timezone`, else UTC.
    pub fn zone(&self) -> chrono_tz::Tz {
        time_zone(self.timezone.as_deref()).unwrap_or(chrono_tz::UTC)
    }
}

impl HeartbeatConfig {
    pub fn zone(&self) -> chrono_tz::Tz {
        time_zone(self.timezone.as_deref()).unwrap_or(chrono_tz::UTC)
    }

    /// `active_hours`, if set and valid (validation reports a bad one).
    pub fn active_hours(&self) -> Option<ActiveHours> {
        self.active_hours
            .as_deref()
            .and_then(|h| ActiveHours::parse(h).ok())
    }
}

/// Whether `name` is a usable task name.
pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether `room` is a room ID or alias.
pub(super) fn check_room(room: &str) -> Result<(), String> {
    let ok = if room.starts_with('#') {
        ruma::RoomAliasId::parse(room).is_ok()
    } else {
        room.starts_with('!') && ruma::RoomId::parse(room).is_ok()
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{room:?} is not a room ID (!abc:server) or alias (#name:server)"
        ))
    }
}

pub(super) fn validate(
    schedules: &[ScheduleConfig],
    is_agent: &dyn Fn(&AgentId) -> bool,
    is_team: &dyn Fn(&AgentId) -> bool,
    problem: &mut dyn FnMut(String, String),
) {
    let mut names = std::collections::HashSet::new();
    for (i, task) in schedules.iter().enumerate() {
        let at = format!("schedules[{i}]");
        if !valid_name(&task.name) {
            problem(
                format!("{at}.name"),
                format!(
                    "{:?} must be 1-64 letters, digits, `-`, `_` or `.`",
                    task.name
                ),
            );
        } else if !names.insert(task.name.as_str()) {
            problem(
                format!("{at}.name"),
                format!("duplicate task name {:?}", task.name),
            );
        }
        if let Err((key, e)) = task.timing() {
            problem(format!("{at}.{key}"), e);
        }
        if task.cron.is_none()
            && let Err(e) = time_zone(task.timezone.as_deref())
        {
            // With cron, `timing()` has reported it already.
            problem(format!("{at}.timezone"), e);
        }
        if let Err(e) = check_room(&task.room) {
            problem(format!("{at}.room"), e);
        }
        let actions = [
            task.send_message.is_some(),
            task.ask_agent.is_some(),
            task.run_team.is_some(),
        ];
        match actions.iter().filter(|a| **a).count() {
            0 => problem(
                format!("{at}.send_message"),
                "needs one action: send_message, ask_agent or run_team".into(),
            ),
            1 => {}
            _ => problem(
                format!("{at}.send_message"),
                "give only one of send_message, ask_agent and run_team".into(),
            ),
        }
        if let Some(action) = &task.send_message {
            if !is_agent(&action.agent) {
                problem(
                    format!("{at}.send_message.as"),
                    format!("unknown agent {:?}", action.agent),
                );
            }
            if let Err(e) = check_template(&action.text) {
                problem(format!("{at}.send_message.text"), e);
            }
        }
        if let Some(action) = &task.ask_agent {
            if !is_agent(&action.agent) {
                problem(
                    format!("{at}.ask_agent.agent"),
                    format!("unknown agent {:?}", action.agent),
                );
            }
            if let Err(e) = check_template(&action.prompt) {
                problem(format!("{at}.ask_agent.prompt"), e);
            }
        }
        if let Some(action) = &task.run_team {
            if !is_team(&action.team) {
                problem(
                    format!("{at}.run_team.team"),
                    format!("unknown team {:?}", action.team),
                );
            }
            if let Err(e) = check_template(&action.prompt) {
                problem(format!("{at}.run_team.prompt"), e);
            }
        }
        if task.max_failures == 0 {
            problem(format!("{at}.max_failures"), "must be at least 1".into());
        }
    }
}

/// Checks `agents[i].heartbeat` (`at` is `agents[i]`).
pub(super) fn validate_heartbeat(
    at: &str,
    heartbeat: &HeartbeatConfig,
    problem: &mut dyn FnMut(String, String),
) {
    if heartbeat.interval < Duration::from_secs(1) {
        problem(
            format!("{at}.heartbeat.interval"),
            "must be at least 1s".into(),
        );
    }
    if let Some(hours) = &heartbeat.active_hours
        && let Err(e) = ActiveHours::parse(hours)
    {
        problem(format!("{at}.heartbeat.active_hours"), e);
    }
    if let Err(e) = time_zone(heartbeat.timezone.as_deref()) {
        problem(format!("{at}.heartbeat.timezone"), e);
    }
    if let Err(e) = check_room(&heartbeat.room) {
        problem(format!("{at}.heartbeat.room"), e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The commented `schedules:` and `heartbeat:` examples of `agentbus.example.yaml`,
    /// uncommented, are a valid config.
    #[test]
    fn the_commented_examples_of_the_example_config_are_valid() {
        let example = include_str!("../../agentbus.example.yaml");
        let mut text = String::new();
        let mut in_block = false;
        for line in example.lines() {
            if line == "# schedules:" {
                in_block = true;
            } else if in_block && !line.starts_with("#   ") {
                in_block = false;
            }
            if in_block {
                text.push_str(&line[2..]);
                text.push('\n');
            } else if let Some(heartbeat) = line.trim_start().strip_prefix("# heartbeat:") {
                text.push_str(&format!("    heartbeat:{heartbeat}\n"));
            } else {
                text.push_str(line);
                text.push('\n');
            }
        }
        let config = crate::config::Config::parse(&text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.schedules.len(), 4);
        assert!(config.agents[0].heartbeat.is_some());
    }

    #[test]
    fn active_hours_parse_and_may_span_midnight() {
        let day = ActiveHours::parse("08:00-22:00").unwrap();
        assert!(day.contains(8 * 60) && day.contains(21 * 60 + 59));
        assert!(!day.contains(22 * 60) && !day.contains(7 * 60 + 59));
        let night = ActiveHours::parse("22:00-06:00").unwrap();
        assert!(night.contains(23 * 60) && night.contains(0) && !night.contains(12 * 60));
        assert!(ActiveHours::parse("8-22").is_err());
        assert!(ActiveHours::parse("25:00-02:00").is_err());
        assert!(ActiveHours::parse("08:00-08:00").is_err());
        assert_eq!(ActiveHours::parse("00:00-24:00").unwrap().end, 24 * 60);
    }

    #[test]
    fn templates_know_their_placeholders() {
        assert!(check_template("Good morning, {{weekday}} {{ date }} {{time}}").is_ok());
        assert_eq!(
            check_template("{{day}}").unwrap_err(),
            "unknown placeholder {{day}}; known: {{date}}, {{time}}, {{weekday}}"
        );
        assert!(check_template("{{date").is_err());
    }
}
