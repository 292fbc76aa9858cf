//! Admission: who may bring an agent into a room and who may be answered there. It is one
//! policy, asked twice — when an agent is invited (join or decline) and when a person
//! speaks (answer, pair or refuse) — so that no room shape gets around it: a room an
//! unknown sender made, with two agents or a second account of their own, is still theirs.
//!
//! # The rules
//!
//! A sender's *standing* on a channel:
//! - **admitted** — matches `allow_from` (or, in group rooms, `group_allow_from`), or the
//!   channel's `dm_policy` is `open` (the operator lets everyone in);
//! - **paired** — approved with `agentbus pairing approve`; counts under `dm_policy:
//!   pairing` (under `allowlist` only the list admits);
//! - **unknown** — neither.
//!
//! A group room is *vouched for* when it has its own entry under `groups:`, or an admitted
//! or paired person is joined to it: such a person brought the agents there or can see
//! who talks to them. At an invite the agent is not in the room yet and cannot see its
//! members, so only the `groups:` entry vouches then.
//!
//! | room | sender | invite | message |
//! |---|---|---|---|
//! | DM | admitted | join | answer |
//! | DM | paired | join | answer |
//! | DM | unknown | join under `pairing` (the code is sent there), else decline | pairing code under `pairing`, else refused |
//! | group, vouched | admitted / paired | join | answer |
//! | group, vouched | unknown | join (only a `groups:` entry vouches at an invite) | answer |
//! | group, not vouched | admitted / paired | join | answer |
//! | group, not vouched | unknown | decline | pairing code under `pairing`, else refused |
//!
//! Before any of these, `dm_policy: disabled` refuses DMs, and `group_policy: disabled`,
//! `group_policy: allowlist` (for a room without its own entry) and `group_allow_from`
//! (for a sender it does not match) refuse group rooms, invites and messages alike.

use super::ChannelRules;
use crate::config::{ChannelId, DmPolicy, GroupPolicy};

/// Where a sender stands with the operator on one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Admitted,
    Paired,
    Unknown,
}

/// The room, as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// One of our agents and one person (for an invite: `is_direct`).
    Dm,
    /// Any other room. `listed`: it has its own entry under `groups:`; `vouched`: listed,
    /// or an admitted or paired person is joined.
    Group { listed: bool, vouched: bool },
}

/// What the sender does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Invites one of our agents into the room.
    Invite,
    /// Speaks in a room one of our agents is in.
    Message,
}

/// The outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Join the room / route the message.
    Admit,
    /// Answer only with a pairing code (for an invite: join, so the code can be sent).
    Pair { reason: String },
    /// Decline the invite / answer nothing; the reason names the rule.
    Refuse { reason: String },
}

impl Admission {
    fn refuse(reason: String) -> Self {
        Self::Refuse { reason }
    }
}

impl ChannelRules {
    /// The sender's standing in `place` (`paired`: approved by pairing on this channel).
    pub(super) fn standing(&self, sender: &str, paired: bool, place: Place) -> Standing {
        let listed = match place {
            Place::Dm => self.allow_from.matches(sender),
            Place::Group { .. } => {
                self.allow_from.matches(sender) || self.group_allow_from.matches(sender)
            }
        };
        if listed || self.policy.dm_policy == DmPolicy::Open {
            Standing::Admitted
        } else if paired && self.policy.dm_policy == DmPolicy::Pairing {
            Standing::Paired
        } else {
            Standing::Unknown
        }
    }

    /// The one admission decision (see the module's table).
    pub(super) fn admit(
        &self,
        channel: &ChannelId,
        sender: &str,
        standing: Standing,
        place: Place,
        act: Act,
    ) -> Admission {
        let policy = &self.policy;
        let unknown = standing == Standing::Unknown;
        match place {
            Place::Dm => match policy.dm_policy {
                DmPolicy::Disabled => Admission::refuse(format!(
                    "direct messages are off (channels.{channel}.dm_policy: disabled)"
                )),
                DmPolicy::Allowlist if unknown => Admission::refuse(format!(
                    "{sender} is not in channels.{channel}.allow_from (dm_policy: allowlist)"
                )),
                DmPolicy::Pairing if unknown => Admission::Pair {
                    reason: format!(
                        "{sender} is not paired yet (channels.{channel}.dm_policy: pairing); a pairing code is sent instead"
                    ),
                },
                _ => Admission::Admit,
            },
            Place::Group { listed, vouched } => {
                if policy.group_policy == GroupPolicy::Disabled {
                    return Admission::refuse(format!(
                        "group rooms are off (channels.{channel}.group_policy: disabled)"
                    ));
                }
                if policy.group_policy == GroupPolicy::Allowlist && !listed {
                    return Admission::refuse(format!(
                        "room is not listed under channels.{channel}.groups (group_policy: allowlist)"
                    ));
                }
                if !self.group_allow_from.0.is_empty() && !self.group_allow_from.matches(sender) {
                    return Admission::refuse(format!(
                        "{sender} is not in channels.{channel}.group_allow_from"
                    ));
                }
                if !unknown || vouched {
                    return Admission::Admit;
                }
                match act {
                    Act::Invite => Admission::refuse(format!(
                        "{sender} may not invite agents into group rooms: not in channels.{channel}.allow_from and not paired"
                    )),
                    Act::Message if policy.dm_policy == DmPolicy::Pairing => Admission::Pair {
                        reason: format!(
                            "{sender} is not paired yet and nobody admitted is in this room (channels.{channel}.dm_policy: pairing); a pairing code is sent instead"
                        ),
                    },
                    Act::Message => Admission::refuse(format!(
                        "{sender} is not in channels.{channel}.allow_from and nobody admitted is in this room"
                    )),
                }
            }
        }
    }
}
