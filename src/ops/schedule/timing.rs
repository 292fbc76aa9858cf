//! When scheduled tasks are due: the next run of a timing, what a start-up does with runs
//! missed while agentbus was down, and the templates' date and time. Pure: every function
//! takes "now" (unix ms) instead of reading the clock.

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

use crate::config::{CatchUp, Timing};
use crate::store::ScheduleState;

fn to_zoned(ms: u64, zone: Tz) -> DateTime<Tz> {
    let utc = Utc
        .timestamp_millis_opt(i64::try_from(ms).unwrap_or(i64::MAX))
        .single()
        .unwrap_or_default();
    utc.with_timezone(&zone)
}

fn to_ms<T: TimeZone>(t: &DateTime<T>) -> u64 {
    u64::try_from(t.timestamp_millis()).unwrap_or(0)
}

/// The first run of a task planned at `now`: the next cron time, one interval from now,
/// or the `at` time (even a past one, which start-up then treats as missed).
pub fn first_run(timing: &Timing, now: u64) -> Option<u64> {
    match timing {
        Timing::Cron { cron, zone } => cron
            .find_next_occurrence(&to_zoned(now, *zone), false)
            .ok()
            .map(|t| to_ms(&t)),
        Timing::Every(every) => Some(now.saturating_add(every.as_millis() as u64)),
        Timing::At(at) => Some(*at),
    }
}

/// A run was due at `due` (≤ `now`): the latest time it was due at up to `now` (all the
/// times in between coalesce into that one) and the first due time after `now`.
pub fn coalesce(timing: &Timing, due: u64, now: u64) -> (u64, Option<u64>) {
    match timing {
        Timing::Cron { cron, zone } => {
            let at_now = to_zoned(now, *zone);
            let latest = cron
                .find_previous_occurrence(&at_now, true)
                .ok()
                .map(|t| to_ms(&t))
                .filter(|t| *t >= due)
                .unwrap_or(due);
            let next = cron
                .find_next_occurrence(&at_now, false)
                .ok()
                .map(|t| to_ms(&t));
            (latest, next)
        }
        Timing::Every(every) => {
            let step = (every.as_millis() as u64).max(1);
            let latest = due + (now.saturating_sub(due) / step) * step;
            (latest, Some(latest + step))
        }
        Timing::At(at) => (*at, None),
    }
}

/// What a start-up does with a task: the run to do now, if any (by its scheduled time),
/// and when the task is next due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartPlan {
    pub run_now: Option<u64>,
    pub next: Option<u64>,
}

/// Plans a task at start-up from its stored `state` (`timing_key` is its timing as
/// written now: a changed one is planned afresh).
///
/// - A run that was in flight when the process died is done again under its own
///   scheduled time, so its sends carry the transaction IDs the first attempt used and
///   the homeserver drops what it already has; it stands for any runs missed since.
/// - Runs missed while down coalesce into one run now (`catch_up: one`) or none.
pub fn plan_start(
    timing: &Timing,
    timing_key: &str,
    state: &ScheduleState,
    catch_up: CatchUp,
    now: u64,
) -> StartPlan {
    let planned = if state.timing == timing_key {
        state.next_run_ms
    } else {
        first_run(timing, now)
    };
    let Some(due) = planned else {
        return StartPlan {
            run_now: state.in_flight_ms,
            next: None,
        };
    };
    if due > now {
        return StartPlan {
            run_now: state.in_flight_ms,
            next: Some(due),
        };
    }
    let (latest, next) = coalesce(timing, due, now);
    let run_now = state.in_flight_ms.or(match catch_up {
        CatchUp::One => Some(latest),
        CatchUp::None => None,
    });
    StartPlan { run_now, next }
}

/// The value of a template placeholder (see [`crate::config::TEMPLATE_FIELDS`]) at `ms`
/// in `zone`.
fn field(name: &str, at: &DateTime<Tz>) -> Option<String> {
    Some(match name {
        "date" => at.format("%Y-%m-%d").to_string(),
        "time" => at.format("%H:%M").to_string(),
        "weekday" => at.format("%A").to_string(),
        _ => return None,
    })
}

/// `template` with `{{date}}`, `{{time}}` and `{{weekday}}` filled in for `ms` in `zone`;
/// anything else is left as written.
pub fn fill(template: &str, ms: u64, zone: Tz) -> String {
    let at = to_zoned(ms, zone);
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        match after
            .find("}}")
            .and_then(|close| Some((close, field(after[..close].trim(), &at)?)))
        {
            Some((close, value)) => {
                out.push_str(&value);
                rest = &after[close + 2..];
            }
            None => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Minutes since midnight at `ms` in `zone` (for `active_hours`).
pub fn minute_of_day(ms: u64, zone: Tz) -> u32 {
    let at = to_zoned(ms, zone);
    at.hour() * 60 + at.minute()
}

/// `ms` as an RFC 3339 time in UTC, for people reading the API.
pub fn rfc3339(ms: u64) -> String {
    to_zoned(ms, chrono_tz::UTC)
        .with_timezone(&Utc)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The weekday of `ms` in `zone`, Monday = 0 (for tests and logs).
pub fn weekday(ms: u64, zone: Tz) -> u32 {
    to_zoned(ms, zone).weekday().num_days_from_monday()
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::time::Duration;

    use super::*;

    /// Unix ms of an RFC 3339 time.
    fn ms(rfc3339: &str) -> u64 {
        to_ms(&DateTime::parse_from_rfc3339(rfc3339).unwrap())
    }

    fn cron(pattern: &str, zone: &str) -> Timing {
        Timing::Cron {
            cron: Box::new(croner::Cron::from_str(pattern).unwrap()),
            zone: Tz::from_str(zone).unwrap(),
        }
    }

    #[test]
    fn cron_in_a_time_zone_keeps_local_time_across_daylight_saving() {
        let morning = cron("0 8 * * mon-fri", "Europe/Berlin");
        // Friday 27 March 2026, 09:00 Berlin (CET, +01:00): next is Monday 30 March, 08:00
        // Berlin — CEST (+02:00) since the clocks went forward on Sunday 29 March.
        assert_eq!(
            first_run(&morning, ms("2026-03-27T09:00:00+01:00")),
            Some(ms("2026-03-30T08:00:00+02:00"))
        );
        assert_eq!(
            rfc3339(ms("2026-03-30T08:00:00+02:00")),
            "2026-03-30T06:00:00Z"
        );
        // And back to CET: Friday 23 October, 09:00 CEST → Monday 26 October, 08:00 CET.
        assert_eq!(
            first_run(&morning, ms("2026-10-23T09:00:00+02:00")),
            Some(ms("2026-10-26T08:00:00+01:00"))
        );
        // 02:30 does not exist in Berlin on 29 March 2026: that day's run is right after
        // the gap, at 03:00 CEST; the next day's at 02:30 again.
        let night = cron("30 2 * * *", "Europe/Berlin");
        assert_eq!(
            first_run(&night, ms("2026-03-29T00:00:00+01:00")),
            Some(ms("2026-03-29T03:00:00+02:00"))
        );
        assert_eq!(
            first_run(&night, ms("2026-03-29T03:00:00+02:00")),
            Some(ms("2026-03-30T02:30:00+02:00"))
        );
        // The same pattern in UTC ignores Berlin's clocks.
        let utc = cron("0 8 * * *", "UTC");
        assert_eq!(
            first_run(&utc, ms("2026-03-29T09:00:00Z")),
            Some(ms("2026-03-30T08:00:00Z"))
        );
    }

    #[test]
    fn every_runs_one_interval_from_now_and_at_runs_at_its_time() {
        let now = ms("2026-05-01T10:00:00Z");
        assert_eq!(
            first_run(&Timing::Every(Duration::from_secs(1800)), now),
            Some(ms("2026-05-01T10:30:00Z"))
        );
        let at = ms("2026-12-24T09:00:00+01:00");
        assert_eq!(first_run(&Timing::At(at), now), Some(at));
        assert_eq!(coalesce(&Timing::At(at), at, at + 5), (at, None));
    }

    fn state(next: u64, key: &str) -> ScheduleState {
        ScheduleState {
            next_run_ms: Some(next),
            timing: key.into(),
            ..Default::default()
        }
    }

    #[test]
    fn runs_missed_while_down_coalesce_into_one_or_none() {
        let every = Timing::Every(Duration::from_secs(1800));
        let due = ms("2026-05-01T10:30:00Z");
        // Down from 10:20 to 12:10: 10:30, 11:00, 11:30 and 12:00 were missed.
        let now = ms("2026-05-01T12:10:00Z");
        let one = plan_start(
            &every,
            "every 30m",
            &state(due, "every 30m"),
            CatchUp::One,
            now,
        );
        assert_eq!(
            one,
            StartPlan {
                run_now: Some(ms("2026-05-01T12:00:00Z")),
                next: Some(ms("2026-05-01T12:30:00Z")),
            }
        );
        let none = plan_start(
            &every,
            "every 30m",
            &state(due, "every 30m"),
            CatchUp::None,
            now,
        );
        assert_eq!(
            none,
            StartPlan {
                run_now: None,
                next: Some(ms("2026-05-01T12:30:00Z")),
            }
        );
        // Cron: the last missed time is the one run; the next is the next cron time.
        let morning = cron("0 8 * * *", "Europe/Berlin");
        let due = ms("2026-05-01T08:00:00+02:00");
        let now = ms("2026-05-03T09:00:00+02:00");
        assert_eq!(
            plan_start(&morning, "m", &state(due, "m"), CatchUp::One, now),
            StartPlan {
                run_now: Some(ms("2026-05-03T08:00:00+02:00")),
                next: Some(ms("2026-05-04T08:00:00+02:00")),
            }
        );
        // Nothing missed: nothing now.
        assert_eq!(
            plan_start(&morning, "m", &state(now + 1, "m"), CatchUp::One, now),
            StartPlan {
                run_now: None,
                next: Some(now + 1),
            }
        );
    }

    #[test]
    fn a_run_in_flight_at_a_crash_is_redone_under_its_own_time_and_stands_for_missed_ones() {
        let every = Timing::Every(Duration::from_secs(60));
        let crashed_run = ms("2026-05-01T10:00:00Z");
        let mut stored = state(ms("2026-05-01T10:01:00Z"), "k");
        stored.in_flight_ms = Some(crashed_run);
        let now = ms("2026-05-01T10:05:30Z");
        for catch_up in [CatchUp::One, CatchUp::None] {
            assert_eq!(
                plan_start(&every, "k", &stored, catch_up, now),
                StartPlan {
                    run_now: Some(crashed_run),
                    next: Some(ms("2026-05-01T10:06:00Z")),
                }
            );
        }
    }

    #[test]
    fn a_changed_timing_is_planned_afresh_and_a_spent_at_stays_spent() {
        let now = ms("2026-05-01T10:00:00Z");
        let every = Timing::Every(Duration::from_secs(3600));
        let old = state(ms("2026-05-01T09:00:00Z"), "every 30m");
        assert_eq!(
            plan_start(&every, "every 1h", &old, CatchUp::One, now),
            StartPlan {
                run_now: None,
                next: Some(ms("2026-05-01T11:00:00Z")),
            }
        );
        let at = ms("2026-04-01T10:00:00Z");
        let spent = ScheduleState {
            last_run_ms: Some(at),
            timing: "at".into(),
            ..Default::default()
        };
        assert_eq!(
            plan_start(&Timing::At(at), "at", &spent, CatchUp::One, now),
            StartPlan {
                run_now: None,
                next: None
            }
        );
        // A new `at` already past counts as missed.
        let fresh = ScheduleState::default();
        assert_eq!(
            plan_start(&Timing::At(at), "at", &fresh, CatchUp::One, now).run_now,
            Some(at)
        );
        assert_eq!(
            plan_start(&Timing::At(at), "at", &fresh, CatchUp::None, now).run_now,
            None
        );
    }

    #[test]
    fn templates_are_filled_in_the_tasks_zone() {
        let at = ms("2026-03-30T06:00:00Z");
        let berlin = Tz::from_str("Europe/Berlin").unwrap();
        assert_eq!(
            fill(
                "Good morning, today is {{weekday}} {{date}} {{ time }} {{other}}",
                at,
                berlin
            ),
            "Good morning, today is Monday 2026-03-30 08:00 {{other}}"
        );
        let la = Tz::from_str("America/Los_Angeles").unwrap();
        assert_eq!(fill("{{weekday}} {{time}}", at, la), "Sunday 23:00");
        assert_eq!(weekday(at, la), 6);
        assert_eq!(minute_of_day(at, berlin), 8 * 60);
        assert_eq!(fill("{{date", at, berlin), "{{date");
    }
}
