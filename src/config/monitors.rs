//! `monitors:` — health checks of the services around agentbus (the homeserver, a
//! database, a model server) that post an alert into an operations room when one goes
//! down and a recovery message when it comes back:
//!
//! ```yaml
//! monitors:
//!   alerts: { room: "#ops:example.org", mention: ["@alice:example.org"], timezone: Europe/Berlin }
//!   commands:
//!     disk: { argv: [/usr/local/bin/check-disk, /var/lib/agentbus] }
//!   checks:
//!     - { name: conduit, service: Conduit, http: { url: "http://127.0.0.1:6167/_matrix/client/versions" } }
//!     - { name: postgres, service: PostgreSQL, tcp: { host: 127.0.0.1, port: 5432 } }
//!     - { name: disk, service: Disk space, interval: 5m, command: { run: disk } }
//! ```
//!
//! A command check runs only a command listed under `monitors.commands`, by its argv —
//! never through a shell — so the config names everything that can run.

use std::collections::BTreeMap;
use std::time::Duration;

use ruma::OwnedUserId;
use serde::Deserialize;
use url::Url;

use super::ids::AgentId;
use super::schedules::{check_room, time_zone, valid_name};

/// `monitors:`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorsConfig {
    /// Where and to whom alerts go; required when there are checks.
    #[serde(default)]
    pub alerts: Option<AlertsConfig>,
    /// The commands command checks may run, by name (none unless listed).
    #[serde(default)]
    pub commands: BTreeMap<String, MonitorCommand>,
    /// The checks, each run on its own every `interval`.
    #[serde(default)]
    pub checks: Vec<CheckConfig>,
}

/// `monitors.alerts:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// The room alerts are posted in: an ID (`!abc:server`) or an alias (`#ops:server`).
    pub room: String,
    /// The agent that posts them (default: the appservice's own bot, which joins the
    /// room itself — invite it to a private room, or name an agent that is in it).
    #[serde(default, rename = "as")]
    pub agent: Option<AgentId>,
    /// The people an alert mentions (user IDs); they are notified.
    #[serde(default)]
    pub mention: Vec<String>,
    /// The IANA time zone of the times in the messages (default `UTC`).
    #[serde(default)]
    pub timezone: Option<String>,
}

impl AlertsConfig {
    /// The mentioned users that parse (validation reports the others).
    pub fn mentioned(&self) -> Vec<OwnedUserId> {
        self.mention
            .iter()
            .filter_map(|m| OwnedUserId::try_from(m.as_str()).ok())
            .collect()
    }

    pub fn zone(&self) -> chrono_tz::Tz {
        time_zone(self.timezone.as_deref()).unwrap_or(chrono_tz::UTC)
    }
}

/// `monitors.commands.<name>:` one command a check may run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorCommand {
    /// The program and its arguments, run directly (no shell), with an environment of
    /// `PATH` only; exit status 0 means up.
    pub argv: Vec<String>,
    /// How many bytes of its output are kept for the alert's `Error:` line (default 512).
    #[serde(default = "default_max_output")]
    pub max_output: usize,
}

fn default_max_output() -> usize {
    512
}

/// One entry of `monitors.checks:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    /// Names the check in metrics, logs and the store: letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// The name people read in the alert's `Service:` line (default: `name`).
    #[serde(default)]
    pub service: Option<String>,
    /// How often the check runs (default `30s`, at least `1s`).
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// How long one check may take before it counts as failed (default `5s`).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Failed checks in a row before the alert is posted (default 1).
    #[serde(default = "default_failures_before_alert")]
    pub failures_before_alert: u32,
    /// An HTTP GET. Exactly one of `http`, `tcp` and `command`.
    #[serde(default)]
    pub http: Option<HttpCheck>,
    /// A TCP connection.
    #[serde(default)]
    pub tcp: Option<TcpCheck>,
    /// A command of `monitors.commands`.
    #[serde(default)]
    pub command: Option<CommandCheck>,
}

fn default_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_failures_before_alert() -> u32 {
    1
}

impl CheckConfig {
    pub fn service(&self) -> &str {
        self.service.as_deref().unwrap_or(&self.name)
    }
}

/// `checks[].http:` up when a GET of `url` answers `expected_status` (redirects are not
/// followed) and, if set, its body contains `body_contains`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    pub url: Url,
    /// Default 200.
    #[serde(default = "default_expected_status")]
    pub expected_status: u16,
    /// Text the body must contain (the first 64 KiB of it are read).
    #[serde(default)]
    pub body_contains: Option<String>,
}

fn default_expected_status() -> u16 {
    200
}

/// `checks[].tcp:` up when a connection to `host:port` opens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpCheck {
    pub host: String,
    pub port: u16,
}

/// `checks[].command:` up when the command `run` (a key of `monitors.commands`) exits 0.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandCheck {
    pub run: String,
}

/// The bounds of a check's `timeout`.
const TIMEOUTS: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(600);

pub(super) fn validate(
    monitors: &MonitorsConfig,
    is_agent: &dyn Fn(&AgentId) -> bool,
    problem: &mut dyn FnMut(String, String),
) {
    match &monitors.alerts {
        None if !monitors.checks.is_empty() => problem(
            "monitors.alerts".into(),
            "is required with checks: give at least `room` (where alerts are posted)".into(),
        ),
        None => {}
        Some(alerts) => {
            if let Err(e) = check_room(&alerts.room) {
                problem("monitors.alerts.room".into(), e);
            }
            if let Some(agent) = &alerts.agent
                && !is_agent(agent)
            {
                problem(
                    "monitors.alerts.as".into(),
                    format!(
                        "unknown agent {agent:?} (leave `as` out to post as the appservice's bot)"
                    ),
                );
            }
            for (i, user) in alerts.mention.iter().enumerate() {
                if OwnedUserId::try_from(user.as_str()).is_err() {
                    problem(
                        format!("monitors.alerts.mention[{i}]"),
                        format!("{user:?} is not a user ID like \"@alice:example.org\""),
                    );
                }
            }
            if let Err(e) = time_zone(alerts.timezone.as_deref()) {
                problem("monitors.alerts.timezone".into(), e);
            }
        }
    }
    for (name, command) in &monitors.commands {
        let at = format!("monitors.commands.{name}");
        if !valid_name(name) {
            problem(
                at.clone(),
                format!("{name:?} must be 1-64 letters, digits, `-`, `_` or `.`"),
            );
        }
        match command.argv.first() {
            None => problem(
                format!("{at}.argv"),
                "needs the program at least, e.g. [/usr/bin/true]".into(),
            ),
            Some(program) if program.is_empty() => {
                problem(format!("{at}.argv[0]"), "must name a program".into())
            }
            Some(_) => {}
        }
        if command.max_output == 0 || command.max_output > 64 * 1024 {
            problem(
                format!("{at}.max_output"),
                "must be between 1 and 65536 bytes".into(),
            );
        }
    }
    let mut names = std::collections::HashSet::new();
    for (i, check) in monitors.checks.iter().enumerate() {
        let at = format!("monitors.checks[{i}]");
        if !valid_name(&check.name) {
            problem(
                format!("{at}.name"),
                format!(
                    "{:?} must be 1-64 letters, digits, `-`, `_` or `.`",
                    check.name
                ),
            );
        } else if !names.insert(check.name.as_str()) {
            problem(
                format!("{at}.name"),
                format!("duplicate check name {:?}", check.name),
            );
        }
        if check
            .service
            .as_deref()
            .is_some_and(|s| s.trim().is_empty())
        {
            problem(format!("{at}.service"), "must not be empty".into());
        }
        if check.interval < Duration::from_secs(1) {
            problem(format!("{at}.interval"), "must be at least 1s".into());
        }
        if !TIMEOUTS.contains(&check.timeout) {
            problem(
                format!("{at}.timeout"),
                format!(
                    "{} must be between 100ms and 10m",
                    humantime::format_duration(check.timeout)
                ),
            );
        }
        if check.failures_before_alert == 0 {
            problem(
                format!("{at}.failures_before_alert"),
                "must be at least 1".into(),
            );
        }
        let kinds = [
            check.http.is_some(),
            check.tcp.is_some(),
            check.command.is_some(),
        ];
        match kinds.iter().filter(|k| **k).count() {
            0 => problem(
                format!("{at}.http"),
                "needs one of http, tcp and command".into(),
            ),
            1 => {}
            _ => problem(
                format!("{at}.http"),
                "give only one of http, tcp and command".into(),
            ),
        }
        if let Some(http) = &check.http {
            if !matches!(http.url.scheme(), "http" | "https") {
                problem(
                    format!("{at}.http.url"),
                    format!("{} must be an http:// or https:// URL", http.url),
                );
            }
            if !(100..=599).contains(&http.expected_status) {
                problem(
                    format!("{at}.http.expected_status"),
                    format!("{} is not an HTTP status (100-599)", http.expected_status),
                );
            }
            if http.body_contains.as_deref() == Some("") {
                problem(
                    format!("{at}.http.body_contains"),
                    "must not be empty (leave it out to check the status only)".into(),
                );
            }
        }
        if let Some(tcp) = &check.tcp {
            if tcp.host.trim().is_empty() {
                problem(format!("{at}.tcp.host"), "must not be empty".into());
            }
            if tcp.port == 0 {
                problem(format!("{at}.tcp.port"), "must be 1-65535".into());
            }
        }
        if let Some(command) = &check.command
            && !monitors.commands.contains_key(&command.run)
        {
            let known: Vec<&str> = monitors.commands.keys().map(String::as_str).collect();
            problem(
                format!("{at}.command.run"),
                format!(
                    "{:?} is not listed in monitors.commands; a check runs only the commands listed there (listed: {})",
                    command.run,
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str = r#"
homeserver: { url: "http://127.0.0.1:8008", server_name: localhost }
appservice: { id: agentbus, bind: "127.0.0.1:9000" }
providers:
  echo: { api: echo }
agents:
  - { id: damon, provider: echo }
"#;

    fn error_of(text: &str) -> String {
        match Config::parse(text).and_then(|c| c.validate().map(|()| c)) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn checks_parse_with_their_defaults() {
        let text = format!(
            r##"{BASE}monitors:
  alerts: {{ room: "#ops:localhost", mention: ["@ops:localhost"] }}
  commands:
    disk: {{ argv: [/usr/bin/true] }}
  checks:
    - {{ name: conduit, service: Conduit, http: {{ url: "http://127.0.0.1:6167/_matrix/client/versions" }} }}
    - {{ name: pg, interval: 1m, timeout: 2s, failures_before_alert: 3, tcp: {{ host: 127.0.0.1, port: 5432 }} }}
    - {{ name: disk, command: {{ run: disk }} }}
"##
        );
        let config = Config::parse(&text).unwrap();
        config.validate().unwrap();
        let monitors = &config.monitors;
        let alerts = monitors.alerts.as_ref().unwrap();
        assert_eq!(alerts.agent, None);
        assert_eq!(alerts.mentioned()[0].as_str(), "@ops:localhost");
        assert_eq!(alerts.zone(), chrono_tz::UTC);
        let [conduit, pg, disk] = &monitors.checks[..] else {
            panic!("three checks")
        };
        assert_eq!(conduit.service(), "Conduit");
        assert_eq!(conduit.interval, std::time::Duration::from_secs(30));
        assert_eq!(conduit.timeout, std::time::Duration::from_secs(5));
        assert_eq!(conduit.failures_before_alert, 1);
        assert_eq!(conduit.http.as_ref().unwrap().expected_status, 200);
        assert_eq!(pg.service(), "pg");
        assert_eq!(pg.failures_before_alert, 3);
        assert_eq!(disk.command.as_ref().unwrap().run, "disk");
        assert_eq!(monitors.commands["disk"].max_output, 512);
    }

    /// The commented `monitors:` example of `agentbus.example.yaml`, uncommented, is a
    /// valid config.
    #[test]
    fn the_commented_example_of_the_example_config_is_valid() {
        let example = include_str!("../../agentbus.example.yaml");
        let mut text = String::new();
        let mut in_block = false;
        for line in example.lines() {
            if line == "# monitors:" {
                in_block = true;
            } else if in_block && !line.starts_with("#   ") {
                in_block = false;
            }
            text.push_str(if in_block { &line[2..] } else { line });
            text.push('\n');
        }
        let config = Config::parse(&text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.monitors.checks.len(), 3);
        assert_eq!(config.monitors.checks[0].failures_before_alert, 2);
    }

    #[test]
    fn no_monitors_is_fine() {
        let config = Config::parse(BASE).unwrap();
        config.validate().unwrap();
        assert!(config.monitors.checks.is_empty());
    }

    #[test]
    fn a_broken_monitor_is_named_key_by_key() {
        let text = format!(
            r#"{BASE}monitors:
  alerts: {{ room: ops, as: ghost, mention: [ops], timezone: Mars/Olympus }}
  commands:
    "bad name": {{ argv: [] }}
    big: {{ argv: [""], max_output: 0 }}
  checks:
    - {{ name: a, interval: 10ms, timeout: 1h, failures_before_alert: 0, http: {{ url: "ftp://x/", expected_status: 42, body_contains: "" }} }}
    - {{ name: a, service: " ", tcp: {{ host: "", port: 0 }}, command: {{ run: rm }} }}
    - {{ name: "no way" }}
"#
        );
        let err = error_of(&text);
        for expected in [
            r#"monitors.alerts.room: "ops" is not a room ID (!abc:server) or alias (#name:server)"#,
            r#"monitors.alerts.as: unknown agent "ghost""#,
            r#"monitors.alerts.mention[0]: "ops" is not a user ID"#,
            r#"monitors.alerts.timezone: "Mars/Olympus" is not an IANA time zone"#,
            r#"monitors.commands.bad name: "bad name" must be 1-64 letters"#,
            "monitors.commands.bad name.argv: needs the program at least",
            "monitors.commands.big.argv[0]: must name a program",
            "monitors.commands.big.max_output: must be between 1 and 65536 bytes",
            "monitors.checks[0].interval: must be at least 1s",
            "monitors.checks[0].timeout: 1h must be between 100ms and 10m",
            "monitors.checks[0].failures_before_alert: must be at least 1",
            "monitors.checks[0].http.url: ftp://x/ must be an http:// or https:// URL",
            "monitors.checks[0].http.expected_status: 42 is not an HTTP status (100-599)",
            "monitors.checks[0].http.body_contains: must not be empty",
            r#"monitors.checks[1].name: duplicate check name "a""#,
            "monitors.checks[1].service: must not be empty",
            "monitors.checks[1].http: give only one of http, tcp and command",
            "monitors.checks[1].tcp.host: must not be empty",
            "monitors.checks[1].tcp.port: must be 1-65535",
            r#"monitors.checks[1].command.run: "rm" is not listed in monitors.commands; a check runs only the commands listed there (listed: bad name, big)"#,
            r#"monitors.checks[2].name: "no way" must be 1-64 letters"#,
            "monitors.checks[2].http: needs one of http, tcp and command",
        ] {
            assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
        }
    }

    #[test]
    fn checks_need_an_alert_room_and_unknown_keys_are_named() {
        let err = error_of(&format!(
            "{BASE}monitors: {{ checks: [{{ name: a, tcp: {{ host: h, port: 1 }} }}] }}\n"
        ));
        assert!(
            err.starts_with("monitors.alerts: is required with checks"),
            "{err}"
        );
        let err = error_of(&format!(
            "{BASE}monitors: {{ checks: [{{ name: a, tcp: {{ host: h, port: 1 }}, shell: \"rm -rf /\" }}] }}\n"
        ));
        assert!(
            err.starts_with("monitors.checks[0]: unknown field `shell`"),
            "{err}"
        );
    }
}
