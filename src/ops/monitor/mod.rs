//! Monitors: `monitors.checks` — HTTP, TCP and allow-listed command checks, each a
//! worker on the server's tracker that probes every `interval` and posts into the alert
//! room when its service goes down and when it comes back.
//!
//! **Once per state change.** Each check is a small state machine ([`observe`]): after
//! `failures_before_alert` failures in a row an up check turns down, which posts one
//! alert; further failures post nothing; the first success turns it up again, which posts
//! one recovery. A flapping check therefore alerts once per outage, never per failure.
//!
//! **Across restarts.** The state, with the number of each transition, is in the
//! [`MonitorStore`](crate::store::MonitorStore), written before the transition's message
//! is sent; the message's transaction ID derives from the check's name and that number.
//! A restart neither alerts again for an outage it already alerted (the check starts
//! down) nor forgets one it had not yet posted (it is sent at start-up, under the same
//! transaction ID, so the homeserver keeps one copy). A message that cannot be delivered
//! (the homeserver down, the poster not in the room) is tried again at the next interval.

pub mod probe;

use std::sync::Arc;
use std::time::Duration;

use ruma::{OwnedRoomId, OwnedTransactionId, OwnedUserId, RoomAliasId, RoomId};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{CheckConfig, Config};
use crate::matrix::MatrixClient;
use crate::matrix::keys::HOPS_KEY;
use crate::store::{MonitorState, Stores};

use self::probe::Probe;

/// One check, compiled from its config.
struct Check {
    name: String,
    service: String,
    interval: Duration,
    timeout: Duration,
    failures_before_alert: u32,
    probe: Probe,
}

impl Check {
    fn of(config: &Config, check: &CheckConfig) -> Option<Check> {
        Some(Check {
            name: check.name.clone(),
            service: check.service().to_owned(),
            interval: check.interval,
            timeout: check.timeout,
            failures_before_alert: check.failures_before_alert,
            probe: Probe::of(&config.monitors, check)?,
        })
    }
}

/// Runs the health checks and posts their alerts.
pub struct Monitor {
    config: Arc<Config>,
    store: Stores,
    matrix: Arc<MatrixClient>,
    checks: Vec<Arc<Check>>,
    http: reqwest::Client,
}

impl Monitor {
    pub fn new(config: Arc<Config>, store: Stores, matrix: Arc<MatrixClient>) -> Arc<Self> {
        let checks = config
            .monitors
            .checks
            .iter()
            .filter_map(|c| Check::of(&config, c))
            .map(Arc::new)
            .collect();
        Arc::new(Self {
            config,
            store,
            matrix,
            checks,
            http: probe::http_client(),
        })
    }

    /// Starts one worker per check on `tracker`; they end on `shutdown`.
    pub fn start(self: &Arc<Self>, tracker: &TaskTracker, shutdown: &CancellationToken) {
        for check in &self.checks {
            tracker.spawn(self.clone().run_check(check.clone(), shutdown.clone()));
        }
        if !self.checks.is_empty() {
            tracing::info!(checks = self.checks.len(), "monitors started");
            tracker.spawn({
                let monitor = self.clone();
                let shutdown = shutdown.clone();
                async move {
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = monitor.join_alert_room() => {}
                    }
                }
            });
        }
    }

    /// Who posts the alerts: `monitors.alerts.as`, else the appservice's bot.
    fn poster(&self) -> OwnedUserId {
        match self
            .config
            .monitors
            .alerts
            .as_ref()
            .and_then(|a| a.agent.as_ref())
        {
            Some(agent) => self.config.user_id(agent),
            None => self.config.sender_user_id(),
        }
    }

    /// Joins the poster to the alert room at start-up, so an operator learns now, not
    /// at the first outage, that alerts cannot be posted — and what to change.
    async fn join_alert_room(&self) -> Result<OwnedRoomId, ()> {
        let Some(alerts) = &self.config.monitors.alerts else {
            return Err(());
        };
        let poster = self.poster();
        let room = self.resolve_room(&alerts.room).await.map_err(|e| {
            tracing::error!(room = %alerts.room, error = %e, "alerts cannot be posted: the alert room (monitors.alerts.room) cannot be found");
        })?;
        match self.matrix.intent(&poster).ensure_joined(&room).await {
            Ok(()) => {
                tracing::info!(room_id = %room, user = %poster, "alerts go to the alert room");
                Ok(room)
            }
            Err(e) => {
                tracing::error!(room_id = %room, user = %poster, error = %e,
                    "alerts cannot be posted: the poster cannot join the alert room; invite it, or set monitors.alerts.as to an agent that is in the room");
                Err(())
            }
        }
    }

    /// One check's worker: delivers a message left over from before a restart, then
    /// probes every interval (never two probes at once: a slow one delays the next).
    async fn run_check(self: Arc<Self>, check: Arc<Check>, shutdown: CancellationToken) {
        let mut state = match self.store.monitors.monitor_state(&check.name).await {
            Ok(state) => state.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(check = %check.name, error = %e, "could not read the check's state; starting it as up");
                MonitorState::default()
            }
        };
        let mut ticks = tokio::time::interval(check.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if state.seq > state.notified {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    () = self.deliver(&check, &mut state) => {}
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = check.probe.run(&self.http, check.timeout) => result,
            };
            metrics::gauge!("agentbus_monitor_up", "check" => check.name.clone())
                .set(if result.is_ok() { 1.0 } else { 0.0 });
            metrics::counter!("agentbus_monitor_checks_total", "check" => check.name.clone(), "result" => if result.is_ok() { "up" } else { "down" })
                .increment(1);
            if let Err(error) = &result {
                tracing::debug!(check = %check.name, %error, "health check failed");
            }
            let before = state.clone();
            observe(
                &mut state,
                &result,
                crate::unix_ms(),
                check.failures_before_alert,
            );
            if state.seq != before.seq {
                if state.down {
                    tracing::warn!(check = %check.name, service = %check.service, error = state.error.as_deref().unwrap_or(""), "health check is down");
                } else {
                    tracing::info!(check = %check.name, service = %check.service, "health check recovered");
                }
            }
            if state != before
                && let Err(e) = self
                    .store
                    .monitors
                    .save_monitor_state(&check.name, &state)
                    .await
            {
                // Unsaved, the transition's message is still sent: a restart may then
                // repeat it, which is better than an outage nobody hears of.
                tracing::warn!(check = %check.name, error = %e, "could not save the check's state");
            }
        }
    }

    /// Posts the message of `state`'s latest transition; on success records it as
    /// delivered. A failure is logged and left for the next interval.
    async fn deliver(&self, check: &Check, state: &mut MonitorState) {
        let Some(alerts) = &self.config.monitors.alerts else {
            return;
        };
        let Some(notice) = notice_of(state) else {
            return;
        };
        let Ok(room) = self.join_alert_room().await else {
            return;
        };
        let intent = self.matrix.intent(&self.poster());
        let message = render(&check.service, &notice, alerts.zone(), &alerts.mentioned());
        let content = message.content();
        let txn = transaction_id(&check.name, state.seq);
        match intent.send_message(&room, &txn, &content).await {
            Ok(event_id) => {
                if matches!(notice, Notice::Alert { .. }) {
                    metrics::counter!("agentbus_monitor_alerts_total", "check" => check.name.clone())
                        .increment(1);
                }
                tracing::info!(check = %check.name, room_id = %room, event_id = %event_id, txn_id = %txn, kind = notice.kind(), "posted the check's {}", notice.kind());
                state.notified = state.seq;
                if let Err(e) = self
                    .store
                    .monitors
                    .save_monitor_state(&check.name, state)
                    .await
                {
                    tracing::warn!(check = %check.name, error = %e, "could not save the check's state");
                }
            }
            Err(e) => {
                tracing::error!(check = %check.name, room_id = %room, error = %e, "could not post the check's {}; trying again at the next interval", notice.kind());
            }
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
}

/// Feeds one probe's result into a check's state: counts failures in a row, turns an up
/// check down after `failures_before_alert` of them and a down check up at the first
/// success, numbering each such transition (`seq`).
pub fn observe(
    state: &mut MonitorState,
    result: &Result<(), String>,
    now_ms: u64,
    failures_before_alert: u32,
) {
    match result {
        Ok(()) => {
            state.failures = 0;
            if state.down {
                state.down = false;
                state.seq += 1;
                state.changed_ms = Some(now_ms);
            } else {
                // Failures below the threshold are forgotten with the success.
                state.error = None;
                state.down_since_ms = None;
            }
        }
        Err(error) => {
            if state.down {
                // Down already: the alert said so, and keeps its error. Nothing changes,
                // so a long outage writes nothing to the store.
                return;
            }
            state.failures = state.failures.saturating_add(1);
            if state.failures == 1 {
                state.down_since_ms = Some(now_ms);
            }
            state.error = Some(error.clone());
            if state.failures >= failures_before_alert {
                state.down = true;
                state.seq += 1;
                state.changed_ms = Some(now_ms);
            }
        }
    }
}

/// What a transition posts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The service went down at `at_ms` because of `error`.
    Alert { error: String, at_ms: u64 },
    /// It came back at `at_ms` after `down_for_ms`.
    Recovery { at_ms: u64, down_for_ms: u64 },
}

impl Notice {
    fn kind(&self) -> &'static str {
        match self {
            Notice::Alert { .. } => "alert",
            Notice::Recovery { .. } => "recovery",
        }
    }
}

/// The message of `state`'s latest transition, if it had one.
pub fn notice_of(state: &MonitorState) -> Option<Notice> {
    if state.seq == 0 {
        return None;
    }
    let at_ms = state.changed_ms.unwrap_or(0);
    Some(if state.down {
        Notice::Alert {
            error: state.error.clone().unwrap_or_default(),
            at_ms,
        }
    } else {
        Notice::Recovery {
            at_ms,
            down_for_ms: at_ms.saturating_sub(state.down_since_ms.unwrap_or(at_ms)),
        }
    })
}

/// The transaction ID of transition `seq` of check `name`.
fn transaction_id(name: &str, seq: u64) -> OwnedTransactionId {
    let digest = Sha256::digest(format!("monitor\0{name}").as_bytes());
    OwnedTransactionId::from(format!(
        "agentbus-monitor-{}-{seq}",
        &hex::encode(digest)[..24]
    ))
}

/// A message ready to send: its text, its HTML, and who it mentions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub body: String,
    pub html: String,
    pub mentions: Vec<OwnedUserId>,
}

impl Message {
    /// The `m.room.message` content: an `m.text` (an `m.notice` would not notify the
    /// people it mentions, by the default push rules), with `m.mentions`.
    fn content(&self) -> serde_json::Value {
        json!({
            "msgtype": "m.text",
            "body": self.body,
            "format": "org.matrix.custom.html",
            "formatted_body": self.html,
            "m.mentions": { "user_ids": self.mentions },
            HOPS_KEY: 1,
        })
    }
}

/// The alert or recovery of `service`, its times in `zone`; an alert mentions `mention`.
pub fn render(
    service: &str,
    notice: &Notice,
    zone: chrono_tz::Tz,
    mention: &[OwnedUserId],
) -> Message {
    let mut lines: Vec<(String, String)> = Vec::new();
    let mut line = |text: String, html: String| lines.push((text, html));
    let mentions = match notice {
        Notice::Alert { error, at_ms } => {
            line(
                "🚨 Critical alert".into(),
                "<b>🚨 Critical alert</b>".into(),
            );
            line(
                format!("Service: {service}"),
                format!("Service: {}", escape(service)),
            );
            line(
                "Status: ❌ unavailable".into(),
                "Status: ❌ unavailable".into(),
            );
            let time = local_time(*at_ms, zone);
            line(format!("Time: {time}"), format!("Time: {time}"));
            line(
                format!("Error: {error}"),
                format!("Error: {}", escape(error)),
            );
            if mention.is_empty() {
                line("Please act now!".into(), "Please act now!".into());
            } else {
                let names: Vec<String> = mention
                    .iter()
                    .map(|u| format!("@{}", u.localpart()))
                    .collect();
                let pills: Vec<String> = mention
                    .iter()
                    .map(|u| {
                        format!(
                            "<a href=\"https://matrix.to/#/{}\">@{}</a>",
                            escape(u.as_str()),
                            escape(u.localpart())
                        )
                    })
                    .collect();
                line(
                    format!("{} please act now!", names.join(" ")),
                    format!("{} please act now!", pills.join(" ")),
                );
            }
            mention.to_vec()
        }
        Notice::Recovery { at_ms, down_for_ms } => {
            line("✅ Recovered".into(), "<b>✅ Recovered</b>".into());
            line(
                format!("Service: {service}"),
                format!("Service: {}", escape(service)),
            );
            line("Status: ✅ available".into(), "Status: ✅ available".into());
            let time = local_time(*at_ms, zone);
            line(format!("Time: {time}"), format!("Time: {time}"));
            let down_for = duration_words(*down_for_ms);
            line(
                format!("Down for: {down_for}"),
                format!("Down for: {down_for}"),
            );
            Vec::new()
        }
    };
    let (text, html): (Vec<String>, Vec<String>) = lines.into_iter().unzip();
    Message {
        body: text.join("\n"),
        html: html.join("<br>\n"),
        mentions,
    }
}

/// `2026-03-04 10:26:15` in `zone`.
fn local_time(at_ms: u64, zone: chrono_tz::Tz) -> String {
    let utc = chrono::DateTime::from_timestamp_millis(i64::try_from(at_ms).unwrap_or(0))
        .unwrap_or_default();
    utc.with_timezone(&zone)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// `3m 20s`, `2h 5m`, `1d 3h`, `0s`: whole seconds, the units that are not zero.
pub fn duration_words(ms: u64) -> String {
    let secs = ms / 1000;
    let parts: Vec<String> = [
        (secs / 86_400, "d"),
        (secs / 3600 % 24, "h"),
        (secs / 60 % 60, "m"),
        (secs % 60, "s"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, unit)| format!("{n}{unit}"))
    .collect();
    if parts.is_empty() {
        "0s".to_owned()
    } else {
        parts.join(" ")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use ruma::owned_user_id;

    use super::*;

    /// 2026-03-04 10:26:15 UTC.
    const T0: u64 = 1_772_619_975_000;

    /// Runs a check through `results` (one per interval of 10 s from T0), delivering each
    /// transition's message as the worker does; the bodies posted.
    fn posted(results: &[Result<(), &str>], failures_before_alert: u32) -> Vec<String> {
        let mut state = MonitorState::default();
        let mut out = Vec::new();
        for (i, result) in results.iter().enumerate() {
            let result = result.map_err(str::to_owned);
            observe(
                &mut state,
                &result,
                T0 + i as u64 * 10_000,
                failures_before_alert,
            );
            if state.seq > state.notified {
                let notice = notice_of(&state).unwrap();
                out.push(
                    render(
                        "Conduit",
                        &notice,
                        chrono_tz::UTC,
                        &[owned_user_id!("@ops:hs")],
                    )
                    .body,
                );
                state.notified = state.seq;
            }
        }
        out
    }

    const ALERT: &str = "🚨 Critical alert\nService: Conduit\nStatus: ❌ unavailable\nTime: 2026-03-04 10:26:15\nError: HTTP 503 Service Unavailable\n@ops please act now!";

    #[test]
    fn an_outage_alerts_once_and_recovers_once() {
        let down = Err("HTTP 503 Service Unavailable");
        let bodies = posted(&[down, down, down, Ok(()), Ok(())], 1);
        assert_eq!(
            bodies,
            [
                ALERT.to_owned(),
                "✅ Recovered\nService: Conduit\nStatus: ✅ available\nTime: 2026-03-04 10:26:45\nDown for: 30s".to_owned(),
            ]
        );
    }

    #[test]
    fn a_flapping_check_alerts_at_each_state_change_only() {
        let down = Err("HTTP 503 Service Unavailable");
        let bodies = posted(&[Ok(()), down, Ok(()), down, down, Ok(())], 1);
        let kinds: Vec<&str> = bodies.iter().map(|b| b.lines().next().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "🚨 Critical alert",
                "✅ Recovered",
                "🚨 Critical alert",
                "✅ Recovered"
            ]
        );
    }

    #[test]
    fn failures_below_the_threshold_post_nothing() {
        let down = Err("timeout");
        assert!(posted(&[down, down, Ok(()), down, down, Ok(())], 3).is_empty());
        let bodies = posted(&[down, down, down, down, Ok(())], 3);
        assert_eq!(bodies.len(), 2);
        // The alert comes at the third failure; the outage counts from the first.
        assert!(
            bodies[0].contains("Time: 2026-03-04 10:26:35"),
            "{}",
            bodies[0]
        );
        assert!(bodies[1].ends_with("Down for: 40s"), "{}", bodies[1]);
    }

    #[test]
    fn a_state_restored_after_a_restart_does_not_alert_again() {
        let mut state = MonitorState::default();
        observe(&mut state, &Err("refused".into()), T0, 1);
        state.notified = state.seq;
        // Saved and loaded again: still down, still alerted.
        let mut restored: MonitorState =
            serde_json::from_value(serde_json::to_value(&state).unwrap()).unwrap();
        observe(&mut restored, &Err("refused".into()), T0 + 1000, 1);
        assert_eq!(restored.seq, restored.notified, "nothing new to post");
        observe(&mut restored, &Ok(()), T0 + 200_000, 1);
        assert_eq!(
            notice_of(&restored),
            Some(Notice::Recovery {
                at_ms: T0 + 200_000,
                down_for_ms: 200_000
            })
        );
        assert_eq!(duration_words(200_000), "3m 20s");
    }

    #[test]
    fn messages_have_pills_mentions_and_the_time_zone() {
        let notice = Notice::Alert {
            error: "<b>oops</b>".into(),
            at_ms: T0,
        };
        let people = [owned_user_id!("@ops:hs"), owned_user_id!("@ann:hs")];
        let message = render("Conduit & co", &notice, chrono_tz::Europe::Berlin, &people);
        assert!(
            message.body.contains("Time: 2026-03-04 11:26:15"),
            "{}",
            message.body
        );
        assert!(message.body.ends_with("\n@ops @ann please act now!"));
        assert!(message.html.contains("Service: Conduit &amp; co"));
        assert!(message.html.contains("Error: &lt;b&gt;oops&lt;/b&gt;"));
        assert!(message.html.contains(
            "<a href=\"https://matrix.to/#/@ops:hs\">@ops</a> <a href=\"https://matrix.to/#/@ann:hs\">@ann</a> please act now!"
        ));
        let content = message.content();
        assert_eq!(
            content["m.mentions"]["user_ids"],
            json!(["@ops:hs", "@ann:hs"])
        );
        assert_eq!(content["msgtype"], "m.text");
        let recovery = render(
            "Conduit",
            &Notice::Recovery {
                at_ms: T0,
                down_for_ms: 0,
            },
            chrono_tz::UTC,
            &people,
        );
        assert!(recovery.mentions.is_empty());
        assert_eq!(recovery.content()["m.mentions"], json!({ "user_ids": [] }));
    }

    #[test]
    fn durations_read_as_words() {
        assert_eq!(duration_words(0), "0s");
        assert_eq!(duration_words(999), "0s");
        assert_eq!(duration_words(45_000), "45s");
        assert_eq!(duration_words(3_600_000), "1h");
        assert_eq!(duration_words(90_061_000), "1d 1h 1m 1s");
    }

    #[test]
    fn transaction_ids_name_the_check_and_the_transition() {
        assert_eq!(transaction_id("conduit", 1), transaction_id("conduit", 1));
        assert_ne!(transaction_id("conduit", 1), transaction_id("conduit", 2));
        assert_ne!(transaction_id("conduit", 1), transaction_id("pg", 1));
    }
}
