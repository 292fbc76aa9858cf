//! `current_time`: the date and time in UTC, and in a local time the model names by its
//! UTC offset (models are bad at clock arithmetic and have no clock).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::json;

/// Largest UTC offset (±14 h, Kiribati) `current_time` accepts.
const MAX_OFFSET_MINUTES: u32 = 14 * 60;

/// The tool's description and JSON-schema parameters.
pub(super) fn spec() -> (&'static str, serde_json::Value) {
    (
        "The current date and time: UTC, and local time for a UTC offset if given.",
        json!({
            "type": "object",
            "properties": {
                "timezone_offset_minutes": {
                    "type": "integer",
                    "description": "Offset of the wanted local time from UTC in minutes, e.g. 60 for UTC+1, -300 for UTC-5.",
                    "minimum": -(MAX_OFFSET_MINUTES as i64),
                    "maximum": MAX_OFFSET_MINUTES,
                }
            },
            "required": [],
        }),
    )
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct CurrentTimeArgs {
    pub(super) timezone_offset_minutes: Option<i32>,
}

/// `now` in RFC 3339 UTC, and in local time at `offset_minutes` from UTC when given.
pub(super) fn describe_time(
    now: SystemTime,
    offset_minutes: Option<i32>,
) -> Result<String, String> {
    let mut text = format!(
        "UTC: {} ({})",
        humantime::format_rfc3339_seconds(now),
        weekday(now)
    );
    if let Some(offset) = offset_minutes {
        let minutes = offset.unsigned_abs();
        if minutes > MAX_OFFSET_MINUTES {
            return Err(format!(
                "timezone_offset_minutes {offset} is out of range; UTC offsets are between -{MAX_OFFSET_MINUTES} and {MAX_OFFSET_MINUTES}"
            ));
        }
        let shift = Duration::from_secs(u64::from(minutes) * 60);
        let local = if offset < 0 {
            now.checked_sub(shift)
        } else {
            now.checked_add(shift)
        }
        .ok_or("the local time is out of range")?;
        let sign = if offset < 0 { '-' } else { '+' };
        let zone = format!("{sign}{:02}:{:02}", minutes / 60, minutes % 60);
        let stamp = humantime::format_rfc3339_seconds(local).to_string();
        let stamp = stamp.strip_suffix('Z').unwrap_or(&stamp);
        text.push_str(&format!(
            "\nLocal (UTC{zone}): {stamp}{zone} ({})",
            weekday(local)
        ));
    }
    Ok(text)
}

fn weekday(time: SystemTime) -> &'static str {
    let days = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    // 1970-01-01 was a Thursday.
    [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ][(days % 7) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::tools::Tools;
    use crate::agents::tools::tests::call;

    #[tokio::test]
    async fn current_time_is_rfc3339() {
        let outcome = call(&Tools::new(), "current_time", "").await;
        assert!(outcome.ok, "{}", outcome.text);
        let utc = outcome
            .text
            .strip_prefix("UTC: ")
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        let parsed = humantime::parse_rfc3339(utc).unwrap();
        let skew = SystemTime::now().duration_since(parsed).unwrap();
        assert!(skew < Duration::from_secs(5));

        let bad = call(
            &Tools::new(),
            "current_time",
            r#"{"timezone_offset_minutes": 9999}"#,
        )
        .await;
        assert!(!bad.ok);
        assert!(bad.text.contains("out of range"), "{}", bad.text);
    }

    #[test]
    fn local_time_applies_the_offset() {
        let now = humantime::parse_rfc3339("2024-03-01T00:30:00Z").unwrap();
        assert_eq!(
            describe_time(now, None).unwrap(),
            "UTC: 2024-03-01T00:30:00Z (Friday)"
        );
        assert_eq!(
            describe_time(now, Some(-90)).unwrap(),
            "UTC: 2024-03-01T00:30:00Z (Friday)\nLocal (UTC-01:30): 2024-02-29T23:00:00-01:30 (Thursday)"
        );
        assert_eq!(
            describe_time(now, Some(345))
                .unwrap()
                .lines()
                .nth(1)
                .unwrap(),
            "Local (UTC+05:45): 2024-03-01T06:15:00+05:45 (Friday)"
        );
    }
}
