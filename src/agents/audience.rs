//! Who reads an answer, and which of a room's past lines they may all read.
//!
//! An answer is an event in the room: whoever can read it can learn from it what the agent
//! was given. So a turn is given only the lines — of its session's memory, of
//! `search_room_history` — that every reader of its answer may read under the room's
//! history visibility
//! ([spec](https://spec.matrix.org/v1.18/client-server-api/#history-visibility)):
//!
//! - **The readers** follow from the room's setting now: `shared` or `world_readable` —
//!   anyone, also whoever joins later (they will read the answer too); `invited` — the
//!   members joined or invited now; `joined` — the members joined now. Our agents are not
//!   readers. The person asking is always one.
//! - **A line** sent under `shared` or `world_readable` may be read by anyone; under
//!   `invited`, by a reader invited (or joined) at or before it; under `joined`, by a reader
//!   joined at or before it. A value the spec does not define counts as `joined` (the spec
//!   says `shared`; hiding errs on the safe side).
//! - **The setting that counts for a line is the one in force when it was sent**, as the
//!   spec says. It is known from the room's current `m.room.history_visibility` event and
//!   its `origin_server_ts` (asked of the homeserver the first time an agent answers in the
//!   room) and from every change that arrives after. What the setting was before the
//!   current event is not known: a line from then counts as `joined`. A room without the
//!   event is `shared` since always. A homeserver that returns the setting without its
//!   event (no `format=event`) leaves no date: the current setting is taken for every
//!   earlier line — the one simplification here that can show more than the spec allows
//!   (a line from before a change from `joined` to `shared`), logged when it happens.
//! - **A member's time** is when their current stretch in the room began: the invite, then
//!   the join, as their membership events arrive; leaving ends it. For members who were
//!   there before agentbus saw them, it is the `origin_server_ts` of their current member
//!   event (`GET /rooms/{roomId}/members`): a later profile change makes it later, never
//!   earlier, so lines are hidden rather than shown. When the members cannot be read, a
//!   reader who joined just now is assumed; when the setting cannot be read, `joined`.
//!
//! This knowledge lives in memory, per room. After a restart it is asked again, and what
//! that gives is never less strict than what was known: the invite times of joined members
//! and the settings before the current one are forgotten, and count as the join time and
//! `joined`. When one of our agents joins a room, what is known of it is asked again, since
//! events from while no agent was in it never arrived. An audience is taken when a turn's
//! prompt is built: someone who joins while the model answers reads an answer built for
//! the readers before them.

use std::collections::HashMap;
use std::sync::Mutex;

use ruma::events::room::history_visibility::HistoryVisibility;
use ruma::events::room::member::MembershipState;
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};

use crate::matrix::Intent;

/// Rooms remembered before the cache starts over (each is asked again when next needed).
const ROOMS_LIMIT: usize = 10_000;

/// When a member's current stretch in the room began (unix ms, `origin_server_ts`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Since {
    /// Invited at, when the stretch began with an invite that is known.
    pub invited: Option<u64>,
    /// Joined at; `None` while only invited.
    pub joined: Option<u64>,
}

impl Since {
    /// Whether a reader with this stretch may read a line sent at `ts` under `visibility`.
    fn may_read(&self, ts: u64, visibility: &HistoryVisibility) -> bool {
        match visibility {
            HistoryVisibility::Shared | HistoryVisibility::WorldReadable => true,
            HistoryVisibility::Invited => self.invited.or(self.joined).is_some_and(|s| s <= ts),
            _ => self.joined.is_some_and(|s| s <= ts),
        }
    }
}

/// The readers of one answer and the room's visibility over time: which lines the answer
/// may be built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audience {
    /// `(from, setting)`, oldest first: each setting holds from its time until the next.
    /// Before the first, the setting is not known (it counts as `joined`).
    rules: Vec<(u64, HistoryVisibility)>,
    /// `None`: anyone may read the answer, whoever joins later too.
    readers: Option<Vec<Since>>,
}

impl Audience {
    /// An audience that may read everything: a room that has always been `shared`.
    pub fn unrestricted() -> Self {
        Self {
            rules: vec![(0, HistoryVisibility::Shared)],
            readers: None,
        }
    }

    /// The audience of an answer in a room with these settings over time (`(from,
    /// setting)`, any order) and these members (joined or invited now).
    pub fn new(mut rules: Vec<(u64, HistoryVisibility)>, members: Vec<Since>) -> Self {
        rules.sort_by_key(|(from, _)| *from);
        let current = rules
            .last()
            .map_or(HistoryVisibility::Joined, |(_, v)| v.clone());
        let readers = match current {
            HistoryVisibility::Shared | HistoryVisibility::WorldReadable => None,
            HistoryVisibility::Invited => Some(members),
            _ => Some(members.into_iter().filter(|m| m.joined.is_some()).collect()),
        };
        Self { rules, readers }
    }

    /// The setting a line sent at `ts` was sent under (`joined` when not known).
    fn visibility_at(&self, ts: u64) -> &HistoryVisibility {
        self.rules
            .iter()
            .rev()
            .find(|(from, _)| *from <= ts)
            .map_or(&HistoryVisibility::Joined, |(_, v)| v)
    }

    /// Whether every reader of the answer may read a line sent at `ts`.
    pub fn may_read(&self, ts: u64) -> bool {
        let visibility = self.visibility_at(ts);
        match &self.readers {
            None => matches!(
                visibility,
                HistoryVisibility::Shared | HistoryVisibility::WorldReadable
            ),
            Some(readers) => readers.iter().all(|r| r.may_read(ts, visibility)),
        }
    }
}

/// What is known of one room.
#[derive(Debug, Default)]
struct Room {
    /// `(from, setting)`, oldest first.
    rules: Vec<(u64, HistoryVisibility)>,
    /// Whether the current setting was asked of the homeserver.
    rules_asked: bool,
    /// Members joined or invited, with when their stretch began.
    members: HashMap<OwnedUserId, Since>,
    /// Whether the members were asked of the homeserver.
    members_asked: bool,
}

impl Room {
    fn add_rule(&mut self, from: u64, visibility: HistoryVisibility) {
        match self.rules.binary_search_by_key(&from, |(f, _)| *f) {
            Ok(i) => self.rules[i].1 = visibility,
            Err(i) => self.rules.insert(i, (from, visibility)),
        }
    }
}

/// Per room: its history visibility over time and its members' times, learnt from the
/// events that arrive and asked of the homeserver when missing.
#[derive(Debug, Default)]
pub struct Audiences {
    rooms: Mutex<HashMap<OwnedRoomId, Room>>,
}

impl Audiences {
    pub fn new() -> Self {
        Self::default()
    }

    fn with_room<T>(&self, room_id: &RoomId, f: impl FnOnce(&mut Room) -> T) -> T {
        let mut rooms = self.rooms.lock().expect("audiences lock");
        if rooms.len() >= ROOMS_LIMIT && !rooms.contains_key(room_id) {
            rooms.clear();
        }
        f(rooms.entry(room_id.to_owned()).or_default())
    }

    /// An `m.room.history_visibility` event arrived: `visibility` holds from `ts` on.
    pub fn record_visibility(&self, room_id: &RoomId, visibility: HistoryVisibility, ts: u64) {
        self.with_room(room_id, |room| room.add_rule(ts, visibility));
    }

    /// An `m.room.member` event arrived: `user`'s membership is `membership` from `ts`.
    pub fn record_member(
        &self,
        room_id: &RoomId,
        user: &UserId,
        membership: &MembershipState,
        ts: u64,
    ) {
        self.with_room(room_id, |room| match membership {
            MembershipState::Invite => {
                room.members.insert(
                    user.to_owned(),
                    Since {
                        invited: Some(ts),
                        joined: None,
                    },
                );
            }
            // A join after a join is a profile change: the stretch goes on.
            MembershipState::Join => {
                let since = room.members.entry(user.to_owned()).or_default();
                since.joined.get_or_insert(ts);
            }
            // Knocking is asking to be let in: no reader yet, and no stretch ended.
            MembershipState::Knock => {}
            _ => {
                room.members.remove(user);
            }
        });
    }

    /// Forgets what is known of `room_id`; it is asked again when next needed (one of our
    /// agents joined: events from while none was in the room never arrived).
    pub fn forget(&self, room_id: &RoomId) {
        self.rooms.lock().expect("audiences lock").remove(room_id);
    }

    /// The audience of an answer in `room_id` to `askers` (each with when they asked):
    /// asks the homeserver, as `intent`, for what is not known yet. `is_agent` tells our
    /// agents, who are no readers.
    pub async fn audience(
        &self,
        intent: &Intent,
        room_id: &RoomId,
        askers: &[(&UserId, u64)],
        is_agent: impl Fn(&UserId) -> bool,
    ) -> Audience {
        let (rules_asked, members_asked) =
            self.with_room(room_id, |r| (r.rules_asked, r.members_asked));
        if !rules_asked {
            match intent.history_visibility(room_id).await {
                Ok(setting) => {
                    let (from, visibility) = match setting {
                        None => (0, HistoryVisibility::Shared),
                        Some(setting) => {
                            if setting.since.is_none() {
                                tracing::info!(room_id = %room_id, "the homeserver did not say since when the history visibility holds; taking it for all earlier lines");
                            }
                            (setting.since.unwrap_or(0), setting.value)
                        }
                    };
                    self.with_room(room_id, |room| {
                        room.add_rule(from, visibility);
                        room.rules_asked = true;
                    });
                }
                Err(e) => {
                    tracing::warn!(room_id = %room_id, error = %e, "could not read the room's history visibility; answering as if it were `joined`");
                }
            }
        }
        let mut unknown_reader = None;
        if !members_asked {
            match intent.present_members(room_id).await {
                Ok(members) => self.with_room(room_id, |room| {
                    for (user, state) in members {
                        let at = state.since.unwrap_or_else(crate::unix_ms);
                        let since = match state.value {
                            MembershipState::Invite => Since {
                                invited: Some(at),
                                joined: None,
                            },
                            _ => Since {
                                invited: None,
                                joined: Some(at),
                            },
                        };
                        // What arrived as it happened is exact; this may be later.
                        room.members.entry(user).or_insert(since);
                    }
                    room.members_asked = true;
                }),
                Err(e) => {
                    tracing::warn!(room_id = %room_id, error = %e, "could not read the room's members; answering as if someone had just joined");
                    let now = crate::unix_ms();
                    unknown_reader = Some(Since {
                        invited: Some(now),
                        joined: Some(now),
                    });
                }
            }
        }
        let (rules, mut readers) = self.with_room(room_id, |room| {
            // Whoever asked was joined when they asked, at the latest. A later join that is
            // known stands: they may have left and come back since.
            for (asker, at) in askers {
                if is_agent(asker) {
                    continue;
                }
                room.members
                    .entry((*asker).to_owned())
                    .or_default()
                    .joined
                    .get_or_insert(*at);
            }
            let readers: Vec<Since> = room
                .members
                .iter()
                .filter(|(user, _)| !is_agent(user))
                .map(|(_, since)| *since)
                .collect();
            (room.rules.clone(), readers)
        });
        readers.extend(unknown_reader);
        Audience::new(rules, readers)
    }
}

#[cfg(test)]
mod tests {
    use ruma::{owned_room_id, user_id};

    use super::*;

    const T: u64 = 1_700_000_000_000;

    fn joined(at: u64) -> Since {
        Since {
            invited: None,
            joined: Some(at),
        }
    }

    fn invited(at: u64) -> Since {
        Since {
            invited: Some(at),
            joined: None,
        }
    }

    #[test]
    fn shared_and_world_readable_rooms_show_everything_to_anyone() {
        for setting in [HistoryVisibility::Shared, HistoryVisibility::WorldReadable] {
            let audience = Audience::new(vec![(0, setting.clone())], vec![joined(T + 1000)]);
            assert!(audience.may_read(T), "{setting:?}");
            assert!(audience.may_read(0), "{setting:?}");
            assert_eq!(audience.readers, None, "anyone reads the answer");
        }
        assert!(Audience::unrestricted().may_read(0));
    }

    #[test]
    fn a_joined_room_shows_what_was_said_after_every_reader_joined() {
        let audience = Audience::new(
            vec![(T, HistoryVisibility::Joined)],
            vec![joined(T), joined(T + 100)],
        );
        assert!(
            !audience.may_read(T + 50),
            "before the second reader joined"
        );
        assert!(audience.may_read(T + 100), "at the join");
        assert!(audience.may_read(T + 500));
        // An invited member does not read the answer in a joined room.
        let with_invitee = Audience::new(
            vec![(T, HistoryVisibility::Joined)],
            vec![joined(T), invited(T + 100)],
        );
        assert!(with_invitee.may_read(T + 50));
    }

    #[test]
    fn an_invited_room_shows_what_was_said_after_every_reader_was_invited() {
        let bob = Since {
            invited: Some(T + 100),
            joined: Some(T + 200),
        };
        let audience = Audience::new(
            vec![(T, HistoryVisibility::Invited)],
            vec![joined(T), bob, invited(T + 300)],
        );
        // The invitee reads the answer once they join: their invite counts.
        assert!(!audience.may_read(T + 250));
        assert!(audience.may_read(T + 300));
        // Without the one still invited, Bob's invite (not his join) is the limit.
        let audience = Audience::new(vec![(T, HistoryVisibility::Invited)], vec![joined(T), bob]);
        assert!(!audience.may_read(T + 99));
        assert!(audience.may_read(T + 100));
        // A member whose invite is not known counts from their join.
        let audience = Audience::new(vec![(T, HistoryVisibility::Invited)], vec![joined(T + 200)]);
        assert!(!audience.may_read(T + 100));
        assert!(audience.may_read(T + 200));
    }

    #[test]
    fn a_line_keeps_the_setting_it_was_sent_under() {
        // Shared until T+1000, then joined; the newcomer joined at T+2000.
        let rules = vec![
            (T + 1000, HistoryVisibility::Joined),
            (T, HistoryVisibility::Shared),
        ];
        let audience = Audience::new(rules.clone(), vec![joined(T), joined(T + 2000)]);
        assert!(audience.may_read(T + 500), "sent while shared");
        assert!(
            !audience.may_read(T + 1500),
            "sent while joined, before the join"
        );
        assert!(audience.may_read(T + 2500));
        // Before the first known setting: counts as joined.
        assert!(!audience.may_read(T - 1));
        // Joined until T+1000, then shared: anyone reads the answer now, so only what was
        // said while it was shared may go into it.
        let rules = vec![
            (T, HistoryVisibility::Joined),
            (T + 1000, HistoryVisibility::Shared),
        ];
        let audience = Audience::new(rules, vec![joined(T)]);
        assert!(
            !audience.may_read(T + 500),
            "a later newcomer may not read it"
        );
        assert!(audience.may_read(T + 1500));
    }

    #[test]
    fn an_unknown_setting_counts_as_joined() {
        let audience = Audience::new(
            vec![(T, HistoryVisibility::from("org.example.secret"))],
            vec![joined(T + 100)],
        );
        assert!(!audience.may_read(T + 50));
        assert!(audience.may_read(T + 100));
        let nothing_known = Audience::new(Vec::new(), vec![joined(T)]);
        assert!(!nothing_known.may_read(T - 1));
        assert!(nothing_known.may_read(T));
    }

    #[test]
    fn membership_events_start_and_end_a_stretch() {
        let audiences = Audiences::new();
        let room = owned_room_id!("!r:hs");
        let bob = user_id!("@bob:hs");
        let since =
            |audiences: &Audiences| audiences.with_room(&room, |r| r.members.get(bob).copied());
        audiences.record_member(&room, bob, &MembershipState::Invite, T);
        assert_eq!(since(&audiences), Some(invited(T)));
        audiences.record_member(&room, bob, &MembershipState::Join, T + 10);
        let stretch = Since {
            invited: Some(T),
            joined: Some(T + 10),
        };
        assert_eq!(since(&audiences), Some(stretch));
        // A display name change is a join after a join.
        audiences.record_member(&room, bob, &MembershipState::Join, T + 20);
        assert_eq!(since(&audiences), Some(stretch));
        audiences.record_member(&room, bob, &MembershipState::Leave, T + 30);
        assert_eq!(since(&audiences), None);
        // Back without an invite: from the new join only.
        audiences.record_member(&room, bob, &MembershipState::Join, T + 40);
        assert_eq!(since(&audiences), Some(joined(T + 40)));
        audiences.record_member(&room, bob, &MembershipState::Ban, T + 50);
        assert_eq!(since(&audiences), None);
    }

    /// A homeserver answering the two lookups with `state` and `members` (status, body),
    /// counting the requests.
    async fn homeserver(
        state: (u16, &'static str),
        members: (u16, &'static str),
    ) -> (
        std::sync::Arc<crate::matrix::MatrixClient>,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};

        use axum::http::StatusCode;
        let asked = Arc::new(AtomicUsize::new(0));
        let answer = |(status, body): (u16, &'static str), asked: Arc<AtomicUsize>| {
            axum::routing::get(move || async move {
                asked.fetch_add(1, Ordering::SeqCst);
                (StatusCode::from_u16(status).unwrap(), body)
            })
        };
        let app = axum::Router::new()
            .route(
                "/_matrix/client/v3/rooms/{room}/state/m.room.history_visibility/",
                answer(state, asked.clone()),
            )
            .route(
                "/_matrix/client/v3/rooms/{room}/members",
                answer(members, asked.clone()),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let retry = crate::matrix::RetryPolicy {
            attempts: 1,
            initial_backoff: std::time::Duration::from_millis(1),
            max_backoff: std::time::Duration::from_millis(1),
        };
        (
            crate::matrix::MatrixClient::new(&url, "as-token", retry),
            asked,
        )
    }

    fn is_damon(user: &UserId) -> bool {
        user == "@damon:hs"
    }

    #[tokio::test]
    async fn what_is_missing_is_asked_once_and_what_arrives_keeps_it_current() {
        use std::sync::atomic::Ordering;
        let (client, asked) = homeserver(
            (
                200,
                r#"{"type":"m.room.history_visibility","state_key":"","sender":"@alice:hs","event_id":"$v",
                    "origin_server_ts":1700000000000,"content":{"history_visibility":"joined"}}"#,
            ),
            (
                200,
                r#"{"chunk":[
                    {"type":"m.room.member","state_key":"@alice:hs","sender":"@alice:hs","event_id":"$a","origin_server_ts":1700000000000,"content":{"membership":"join"}},
                    {"type":"m.room.member","state_key":"@damon:hs","sender":"@damon:hs","event_id":"$d","origin_server_ts":1700000000900,"content":{"membership":"join"}},
                    {"type":"m.room.member","state_key":"@bob:hs","sender":"@alice:hs","event_id":"$b","origin_server_ts":1700000000050,"content":{"membership":"invite"}}
                ]}"#,
            ),
        )
        .await;
        let damon = client.intent(user_id!("@damon:hs"));
        let audiences = Audiences::new();
        let room = owned_room_id!("!r:hs");
        // Carol asks; the homeserver's member list does not have her yet.
        let carol = user_id!("@carol:hs");
        let audience = audiences
            .audience(&damon, &room, &[(carol, T + 500)], is_damon)
            .await;
        // Readers: Alice and Carol (Bob is only invited to a joined room; damon is ours).
        assert!(!audience.may_read(T + 499));
        assert!(audience.may_read(T + 500));
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        // Dave joins: lines before him are hidden from the next answer, asked of nobody.
        audiences.record_member(&room, user_id!("@dave:hs"), &MembershipState::Join, T + 600);
        let audience = audiences
            .audience(&damon, &room, &[(carol, T + 700)], is_damon)
            .await;
        assert!(!audience.may_read(T + 550));
        assert!(audience.may_read(T + 600));
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        // The room turns shared: anyone may read the answer, so only what is said from now.
        audiences.record_visibility(&room, HistoryVisibility::Shared, T + 800);
        let audience = audiences
            .audience(&damon, &room, &[(carol, T + 900)], is_damon)
            .await;
        assert!(!audience.may_read(T + 700));
        assert!(audience.may_read(T + 800));
        // One of our agents joins again: the room is asked again.
        audiences.forget(&room);
        audiences
            .audience(&damon, &room, &[(carol, T + 900)], is_damon)
            .await;
        assert_eq!(asked.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn what_cannot_be_read_is_taken_at_its_strictest() {
        let (client, _) = homeserver(
            (500, r#"{"errcode":"M_UNKNOWN","error":"down"}"#),
            (500, r#"{"errcode":"M_UNKNOWN","error":"down"}"#),
        )
        .await;
        let damon = client.intent(user_id!("@damon:hs"));
        let audiences = Audiences::new();
        let room = owned_room_id!("!r:hs");
        let before = crate::unix_ms();
        let audience = audiences
            .audience(&damon, &room, &[(user_id!("@alice:hs"), T)], is_damon)
            .await;
        // As if someone joined just now into a joined room: nothing from before.
        assert!(!audience.may_read(before - 1));
        assert!(audience.may_read(crate::unix_ms() + 1000));
        // A room with no setting at all is shared since always.
        let (client, _) = homeserver(
            (404, r#"{"errcode":"M_NOT_FOUND","error":"no such state"}"#),
            (200, r#"{"chunk":[]}"#),
        )
        .await;
        let audience = audiences
            .audience(
                &client.intent(user_id!("@damon:hs")),
                &owned_room_id!("!other:hs"),
                &[(user_id!("@alice:hs"), T)],
                is_damon,
            )
            .await;
        assert_eq!(audience, Audience::unrestricted());
    }

    #[test]
    fn settings_arrive_in_any_order_and_the_same_event_twice_is_one() {
        let audiences = Audiences::new();
        let room = owned_room_id!("!r:hs");
        audiences.record_visibility(&room, HistoryVisibility::Joined, T + 10);
        audiences.record_visibility(&room, HistoryVisibility::Shared, T);
        audiences.record_visibility(&room, HistoryVisibility::Joined, T + 10);
        let rules = audiences.with_room(&room, |r| r.rules.clone());
        assert_eq!(
            rules,
            [
                (T, HistoryVisibility::Shared),
                (T + 10, HistoryVisibility::Joined)
            ]
        );
    }
}
