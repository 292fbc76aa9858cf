//! The commands stage: bang commands people type to agents in a room.
//!
//! A command is addressed like any message (a mention, a reply, the DM's agent), so it
//! still goes through routing; this stage only says which command a message is, and the
//! agents stage turns it into the job the routed agents run instead of answering.
//!
//! `!stop` is the exception: it needs no address. Anyone in the room (not our own users)
//! stops everything running there — teams' tasks and agents' answers — since whoever
//! watches the work may stop it. Commands of the management room (`!agents`,
//! `!pairing approve …`) are parsed here too, but answered by `ops`.

/// A command a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Command {
    /// `!reset`: the routed agents forget this session's conversation.
    Reset,
    /// `!stop`: stop every task and answer running in the room.
    Stop,
}

/// Whether a reaction's key asks to stop what it reacts to: 🛑 or ❌ (with or without
/// the emoji variation selector).
pub(super) fn is_stop_reaction(key: &str) -> bool {
    matches!(key.trim_end_matches('\u{fe0f}'), "🛑" | "❌")
}

/// The command `body` starts with, if any: the command word alone on its line or followed
/// by a space (mentions of the agents it is for may follow). Case-sensitive, like the
/// clients' own slash commands.
pub(super) fn parse(body: &str) -> Option<Command> {
    let body = body.trim();
    let word = body.split_once(' ').map_or(body, |(word, _)| word);
    match word {
        "!reset" => Some(Command::Reset),
        "!stop" => Some(Command::Stop),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_is_recognised_alone_or_followed_by_mentions() {
        for body in [
            "!reset",
            "  !reset  ",
            "!reset @damon",
            "!reset @damon:example.org please",
        ] {
            assert_eq!(parse(body), Some(Command::Reset), "{body:?}");
        }
    }

    #[test]
    fn stop_is_a_command_and_its_reactions_are_recognised() {
        assert_eq!(parse("!stop"), Some(Command::Stop));
        assert_eq!(parse("!stop @devteam"), Some(Command::Stop));
        assert!(is_stop_reaction("🛑"));
        assert!(is_stop_reaction("❌\u{fe0f}"));
        assert!(!is_stop_reaction("👍"));
        assert!(!is_stop_reaction("🛑🛑"));
    }

    #[test]
    fn other_text_is_no_command() {
        for body in [
            "",
            "reset",
            "!resetting",
            "!reset\tnow",
            "please !reset",
            "!RESET",
            "!stopping",
            "> <@damon:example.org> !reset\n\nthanks",
        ] {
            assert_eq!(parse(body), None, "{body:?}");
        }
    }
}
