//! The commands stage: bang commands people type to agents in a room.
//!
//! A command is addressed like any message (a mention, a reply, the DM's agent), so it
//! still goes through routing; this stage only says which command a message is, and the
//! agents stage turns it into the job the routed agents run instead of answering.
//!
//! Where new commands go: `!stop` (cancel the answer running in this session) becomes a
//! variant here and a job the session lane acts on before its queue; commands of the
//! management room (`!agents`, `!pairing approve …`) are parsed here too, but answered
//! by `ops` rather than routed to an agent.

/// A command a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Command {
    /// `!reset`: the routed agents forget this session's conversation.
    Reset,
}

/// The command `body` starts with, if any: the command word alone on its line or followed
/// by a space (mentions of the agents it is for may follow). Case-sensitive, like the
/// clients' own slash commands.
pub(super) fn parse(body: &str) -> Option<Command> {
    let body = body.trim();
    let word = body.split_once(' ').map_or(body, |(word, _)| word);
    match word {
        "!reset" => Some(Command::Reset),
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
    fn other_text_is_no_command() {
        for body in [
            "",
            "reset",
            "!resetting",
            "!reset\tnow",
            "please !reset",
            "!RESET",
            "!stop",
            "> <@damon:example.org> !reset\n\nthanks",
        ] {
            assert_eq!(parse(body), None, "{body:?}");
        }
    }
}
