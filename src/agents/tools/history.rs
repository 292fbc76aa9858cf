//! `search_room_history`: the room's recent lines that contain all the given words — of
//! those every reader of the answer may read in the room (see
//! [`audience`](crate::agents::audience)): a newcomer to a room whose history visibility
//! is `joined` does not learn through the agent what was said before they joined.

use std::time::{Duration, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::json;

use super::{ToolContext, ToolOutcome, cap_chars};
use crate::store::HistoryEntry;

/// Lines of room history `search_room_history` scans, newest first.
const SEARCH_SCAN: usize = 1_000;
const SEARCH_DEFAULT_LIMIT: i64 = 10;
const SEARCH_MAX_LIMIT: i64 = 50;
/// Characters of one history line shown in search results.
const SEARCH_LINE_CHARS: usize = 500;

/// The tool's description and JSON-schema parameters.
pub(super) fn spec() -> (&'static str, serde_json::Value) {
    (
        "Search this room's recent message history (the last 1,000 messages) for messages containing all the given words, case-insensitively; newest first.",
        json!({
            "type": "object",
            "properties": {
                "query": { "type": "string", "description": "Words that must all appear in a message." },
                "limit": {
                    "type": "integer",
                    "description": "Most matches to return (default 10).",
                    "minimum": 1,
                    "maximum": SEARCH_MAX_LIMIT,
                    "default": SEARCH_DEFAULT_LIMIT,
                }
            },
            "required": ["query"],
        }),
    )
}

#[derive(Debug, Deserialize)]
pub(super) struct SearchArgs {
    query: String,
    limit: Option<i64>,
}

pub(super) async fn search_room_history(ctx: &ToolContext<'_>, args: &SearchArgs) -> ToolOutcome {
    let words: Vec<String> = args
        .query
        .split_whitespace()
        .map(str::to_lowercase)
        .collect();
    if words.is_empty() {
        return ToolOutcome::error("the query is empty; pass the words to look for");
    }
    let limit = args
        .limit
        .unwrap_or(SEARCH_DEFAULT_LIMIT)
        .clamp(1, SEARCH_MAX_LIMIT) as usize;
    let history = match ctx.history.recent_history(ctx.room_id, SEARCH_SCAN).await {
        Ok(history) => history,
        Err(e) => return ToolOutcome::error(format!("could not read this room's history: {e}")),
    };
    let readable: Vec<&HistoryEntry> = history
        .iter()
        .filter(|entry| ctx.audience.may_read(entry.ts))
        .collect();
    let hidden = readable.len() < history.len();
    let matches: Vec<&HistoryEntry> = readable
        .iter()
        .rev()
        .copied()
        .filter(|entry| {
            let body = entry.body.to_lowercase();
            words.iter().all(|word| body.contains(word.as_str()))
        })
        .collect();
    // Says that lines were left out, never how many or which.
    let note = if hidden {
        "\n(Messages that not everyone here may read — sent before someone joined, under the room's history visibility — were not searched.)"
    } else {
        ""
    };
    if matches.is_empty() {
        return ToolOutcome::ok(format!(
            "no matches for {:?} in the last {} messages of this room{note}",
            args.query,
            readable.len()
        ));
    }
    let mut text = if matches.len() > limit {
        format!("{} matches; the newest {limit}:", matches.len())
    } else {
        format!("{} matches, newest first:", matches.len())
    };
    for entry in matches.into_iter().take(limit) {
        let body = entry.body.split_whitespace().collect::<Vec<_>>().join(" ");
        let (body, cut) = cap_chars(&body, SEARCH_LINE_CHARS);
        text.push_str(&format!(
            "\n[{}] {}: {body}{}",
            rfc3339_from_ms(entry.ts),
            entry.sender,
            if cut { "…" } else { "" }
        ));
    }
    text.push_str(note);
    ToolOutcome::ok(text)
}

/// A timestamp in milliseconds since the epoch as RFC 3339 (UTC, seconds), or as the raw
/// number when it is past year 9999 (which humantime cannot format).
fn rfc3339_from_ms(ms: u64) -> String {
    const LAST_SECOND_OF_9999: u64 = 253_402_300_799;
    if ms / 1000 > LAST_SECOND_OF_9999 {
        return format!("{ms} ms since 1970");
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use ruma::{EventId, UserId, owned_room_id};
    use serde_json::json;

    use super::*;
    use crate::agents::tools::Tools;
    use crate::agents::tools::tests::{Room, tool_call};
    use crate::config::ToolsConfig;

    #[tokio::test]
    async fn history_search_finds_all_words_newest_first() {
        let room = Room::new();
        room.say(1, "@alice:hs", "The deploy failed on Monday")
            .await;
        room.say(2, "@bob:hs", "lunch?").await;
        room.say(3, "@alice:hs", "Deploy fixed,\nit was the DNS")
            .await;
        room.say(4, "@bob:hs", "another deploy, another failure")
            .await;
        let other = owned_room_id!("!other:hs");
        let elsewhere = HistoryEntry {
            event_id: EventId::parse("$x").unwrap(),
            sender: UserId::parse("@eve:hs").unwrap(),
            body: "deploy secrets".into(),
            ts: 0,
            thread_root: None,
            routed_to: Vec::new(),
        };
        room.store
            .history
            .append_history(&other, &elsewhere)
            .await
            .unwrap();
        let tools = Tools::new();
        let search = |args: serde_json::Value| {
            let call = tool_call("search_room_history", &args.to_string());
            let ctx = room.ctx();
            let tools = tools.clone();
            async move { tools.call(&ToolsConfig::default(), &ctx, &call).await }
        };

        let found = search(json!({ "query": "DEPLOY" })).await;
        assert!(found.ok);
        assert_eq!(
            found.text,
            "3 matches, newest first:\n\
             [2023-11-14T22:17:20Z] @bob:hs: another deploy, another failure\n\
             [2023-11-14T22:16:20Z] @alice:hs: Deploy fixed, it was the DNS\n\
             [2023-11-14T22:14:20Z] @alice:hs: The deploy failed on Monday"
        );

        let both = search(json!({ "query": "deploy fail" })).await;
        assert_eq!(both.text.lines().count(), 3, "{}", both.text);
        assert!(both.text.starts_with("2 matches"));

        let limited = search(json!({ "query": "deploy", "limit": 1 })).await;
        assert_eq!(
            limited.text,
            "3 matches; the newest 1:\n[2023-11-14T22:17:20Z] @bob:hs: another deploy, another failure"
        );

        let none = search(json!({ "query": "kubernetes" })).await;
        assert!(none.ok);
        assert_eq!(
            none.text,
            "no matches for \"kubernetes\" in the last 4 messages of this room"
        );

        let empty = search(json!({ "query": "  " })).await;
        assert!(!empty.ok);
    }

    #[tokio::test]
    async fn history_search_leaves_out_what_a_reader_of_the_answer_may_not_read() {
        use ruma::events::room::history_visibility::HistoryVisibility;

        use crate::agents::audience::{Audience, Since};

        let mut room = Room::new();
        room.say(1, "@alice:hs", "the secret word is tangerine")
            .await;
        room.say(3, "@bob:hs", "what is the secret word?").await;
        // Bob joined between the two lines, in a room whose history is `joined`.
        let bob_joined = 1_700_000_000_000 + 2 * 60_000;
        room.audience = Audience::new(
            vec![(0, HistoryVisibility::Joined)],
            vec![
                Since {
                    invited: None,
                    joined: Some(0),
                },
                Since {
                    invited: None,
                    joined: Some(bob_joined),
                },
            ],
        );
        let tools = Tools::new();
        let search = |query: &str| {
            let call = tool_call(
                "search_room_history",
                &json!({ "query": query }).to_string(),
            );
            let ctx = room.ctx();
            let tools = tools.clone();
            async move { tools.call(&ToolsConfig::default(), &ctx, &call).await }
        };
        let found = search("secret").await;
        assert_eq!(
            found.text,
            "1 matches, newest first:\n\
             [2023-11-14T22:16:20Z] @bob:hs: what is the secret word?\n\
             (Messages that not everyone here may read — sent before someone joined, under the room's history visibility — were not searched.)"
        );
        let none = search("tangerine").await;
        assert!(none.ok);
        assert!(
            none.text
                .starts_with("no matches for \"tangerine\" in the last 1 messages"),
            "{}",
            none.text
        );
        assert!(!none.text.contains("secret word is"), "{}", none.text);
    }

    #[test]
    fn out_of_range_timestamps_do_not_panic() {
        assert_eq!(rfc3339_from_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339_from_ms(u64::MAX),
            format!("{} ms since 1970", u64::MAX)
        );
    }
}
