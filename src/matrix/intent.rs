//! One of our virtual users, acting: the client-server API as `@agent:server` (what
//! mautrix calls an intent). Every request carries `?user_id=` for this user.
//!
//! Which rooms the user has joined is remembered on the client, so [`Intent::ensure_joined`]
//! before a send costs nothing the second time. A homeserver's `M_FORBIDDEN` for a request
//! in a room (typically "not in room": kicked, banned, left) forgets it again.

use std::sync::Arc;
use std::time::Duration;

use ruma::api::client::{account, membership, message, profile, room, typing};
use ruma::events::room::history_visibility::HistoryVisibility;
use ruma::events::room::member::MembershipState;
use ruma::events::{MessageLikeEventType, StateEventType};
use ruma::serde::Raw;
use ruma::{
    EventId, MxcUri, OwnedEventId, OwnedMxcUri, OwnedUserId, RoomId, TransactionId, UserId,
};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::client::MatrixClient;
use super::error::{MatrixError, Undelivered};
use super::retry::until_delivered;

/// A piece of room state, and since when it holds (`origin_server_ts` of the event that
/// set it; `None` when the homeserver did not say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSince<T> {
    pub value: T,
    pub since: Option<u64>,
}

/// What [`Intent::event_gist`] reads of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventGist {
    pub sender: OwnedUserId,
    /// `content.body`, when it is a string (a message's text, reply fallback included).
    pub body: Option<String>,
    /// `origin_server_ts`, when the event has one.
    pub ts: Option<u64>,
}

/// [`MatrixClient`] acting as one of our users; made by [`MatrixClient::intent`].
#[derive(Clone)]
pub struct Intent {
    client: Arc<MatrixClient>,
    user: OwnedUserId,
}

/// The `PUT /rooms/{roomId}/send/m.room.message/{txnId}` request for `content`.
fn message_request(
    room_id: &RoomId,
    txn_id: &TransactionId,
    content: &serde_json::Value,
) -> message::send_message_event::v3::Request {
    let body =
        Raw::from_json(serde_json::value::to_raw_value(content).expect("a JSON value serialises"));
    message::send_message_event::v3::Request::new_raw(
        room_id.to_owned(),
        txn_id.to_owned(),
        MessageLikeEventType::RoomMessage,
        body,
    )
}

/// Whether `error` says the user may not act in the room, most often because they are not
/// (or no longer) in it.
fn is_forbidden(error: &MatrixError) -> bool {
    error.errcode() == Some("M_FORBIDDEN")
}

impl Intent {
    pub(super) fn new(client: Arc<MatrixClient>, user: OwnedUserId) -> Self {
        Self { client, user }
    }

    /// The user this intent acts as.
    pub fn user(&self) -> &UserId {
        &self.user
    }

    /// Forgets a remembered join when the homeserver refused a request in `room_id`.
    fn noting<T>(
        &self,
        room_id: &RoomId,
        result: Result<T, MatrixError>,
    ) -> Result<T, MatrixError> {
        if let Err(error) = &result
            && is_forbidden(error)
        {
            self.forget_joined(room_id);
        }
        result
    }

    /// Registers the user (its localpart, as the appservice); an existing user is fine.
    pub async fn ensure_registered(&self) -> Result<(), MatrixError> {
        let mut request = account::register::v3::Request::new();
        request.username = Some(self.user.localpart().to_owned());
        request.inhibit_login = true;
        request.login_type = Some(account::register::LoginType::ApplicationService);
        match self.client.send(request, None).await {
            Ok(_) => Ok(()),
            Err(e) if e.errcode() == Some("M_USER_IN_USE") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sets the user's display name.
    #[allow(deprecated)] // set_profile_field needs Matrix 1.16; this endpoint works everywhere.
    pub async fn set_display_name(&self, name: &str) -> Result<(), MatrixError> {
        let request =
            profile::set_display_name::v3::Request::new(self.user.clone(), Some(name.to_owned()));
        self.client
            .send(request, Some(&self.user))
            .await
            .map(|_| ())
    }

    /// Sets the user's avatar.
    #[allow(deprecated)] // as above
    pub async fn set_avatar_url(&self, url: OwnedMxcUri) -> Result<(), MatrixError> {
        let request = profile::set_avatar_url::v3::Request::new(self.user.clone(), Some(url));
        self.client
            .send(request, Some(&self.user))
            .await
            .map(|_| ())
    }

    /// Joins `room_id`, even when a join is remembered: an invite means the user is not in
    /// it (any more), whatever was remembered.
    pub async fn join_room(&self, room_id: &RoomId) -> Result<(), MatrixError> {
        let request = membership::join_room_by_id::v3::Request::new(room_id.to_owned());
        let joined = self.client.send(request, Some(&self.user)).await;
        self.noting(room_id, joined)?;
        self.client.remember_joined(&self.user, room_id);
        Ok(())
    }

    /// Declines an invite to (or leaves) `room_id`, saying why: the reason is shown to the
    /// inviter as the membership change's `reason`.
    pub async fn leave_room(&self, room_id: &RoomId, reason: &str) -> Result<(), MatrixError> {
        let mut request = membership::leave_room::v3::Request::new(room_id.to_owned());
        request.reason = Some(reason.to_owned());
        self.client.send(request, Some(&self.user)).await?;
        self.client.forget_joined(&self.user, room_id);
        Ok(())
    }

    /// Invites `user` to `room_id`.
    pub async fn invite(&self, room_id: &RoomId, user: &UserId) -> Result<(), MatrixError> {
        use membership::invite_user::v3::{InvitationRecipient, InviteUserId, Request};
        let recipient = InvitationRecipient::from(InviteUserId::new(user.to_owned()));
        let request = Request::new(room_id.to_owned(), recipient);
        let invited = self.client.send(request, Some(&self.user)).await;
        self.noting(room_id, invited)?;
        Ok(())
    }

    /// Joins `room_id` unless the user is remembered as joined to it.
    pub async fn ensure_joined(&self, room_id: &RoomId) -> Result<(), MatrixError> {
        if self.client.is_joined(&self.user, room_id) {
            return Ok(());
        }
        self.join_room(room_id).await
    }

    /// Forgets that the user joined `room_id` (they left, were kicked or banned): the next
    /// [`Intent::ensure_joined`] joins again.
    pub fn forget_joined(&self, room_id: &RoomId) {
        self.client.forget_joined(&self.user, room_id);
    }

    /// The users joined to `room_id` with their display names (the user must be in it).
    pub async fn joined_members(
        &self,
        room_id: &RoomId,
    ) -> Result<Vec<(OwnedUserId, Option<String>)>, MatrixError> {
        let request = membership::joined_members::v3::Request::new(room_id.to_owned());
        let response = self.client.send(request, Some(&self.user)).await;
        Ok(self
            .noting(room_id, response)?
            .joined
            .into_iter()
            .map(|(id, member)| (id, member.display_name))
            .collect())
    }

    /// The rooms the user is joined to (`GET /joined_rooms`).
    pub async fn joined_rooms(&self) -> Result<Vec<ruma::OwnedRoomId>, MatrixError> {
        let request = membership::joined_rooms::v3::Request::new();
        let response = self.client.send(request, Some(&self.user)).await?;
        Ok(response.joined_rooms)
    }

    /// The room's `m.room.history_visibility` state (`GET /rooms/{roomId}/state/
    /// m.room.history_visibility/?format=event`): the setting and, when the homeserver
    /// returns the whole event, when it was set (`origin_server_ts`). `None` when the room
    /// has none (`M_NOT_FOUND`), which the spec reads as `shared`.
    pub async fn history_visibility(
        &self,
        room_id: &RoomId,
    ) -> Result<Option<StateSince<HistoryVisibility>>, MatrixError> {
        use ruma::api::client::state::get_state_event_for_key::v3::{Request, StateEventFormat};
        #[derive(Deserialize)]
        struct Content {
            history_visibility: HistoryVisibility,
        }
        /// The whole event, or (from a homeserver that ignores `format`) its content.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum EventOrContent {
            Event {
                origin_server_ts: u64,
                content: Content,
            },
            Content(Content),
        }
        let mut request = Request::new(
            room_id.to_owned(),
            StateEventType::RoomHistoryVisibility,
            String::new(),
        );
        request.format = StateEventFormat::Event;
        let response = match self.client.send(request, Some(&self.user)).await {
            Err(e) if e.errcode() == Some("M_NOT_FOUND") => return Ok(None),
            other => self.noting(room_id, other)?,
        };
        let (since, content) = match serde_json::from_str(response.event_or_content.get()) {
            Ok(EventOrContent::Event {
                origin_server_ts,
                content,
            }) => (Some(origin_server_ts), content),
            Ok(EventOrContent::Content(content)) => (None, content),
            Err(e) => {
                return Err(MatrixError::Permanent {
                    status: 200,
                    errcode: "M_BAD_JSON".to_owned(),
                    message: format!("unreadable m.room.history_visibility in {room_id}: {e}"),
                });
            }
        };
        Ok(Some(StateSince {
            value: content.history_visibility,
            since,
        }))
    }

    /// Everyone invited to or joined in `room_id`, each with the `origin_server_ts` of
    /// their current membership event (`GET /rooms/{roomId}/members`; the user must be
    /// in the room). A joined member's event may be a later profile change, so `since`
    /// is never earlier than their join.
    pub async fn present_members(
        &self,
        room_id: &RoomId,
    ) -> Result<Vec<(OwnedUserId, StateSince<MembershipState>)>, MatrixError> {
        #[derive(Deserialize)]
        struct Member {
            state_key: OwnedUserId,
            origin_server_ts: u64,
            content: MemberContent,
        }
        #[derive(Deserialize)]
        struct MemberContent {
            membership: MembershipState,
        }
        let request = membership::get_member_events::v3::Request::new(room_id.to_owned());
        let response = self.client.send(request, Some(&self.user)).await;
        let chunk = self.noting(room_id, response)?.chunk;
        Ok(chunk
            .iter()
            .filter_map(|raw| raw.deserialize_as_unchecked::<Member>().ok())
            .filter(|m| {
                matches!(
                    m.content.membership,
                    MembershipState::Join | MembershipState::Invite
                )
            })
            .map(|m| {
                (
                    m.state_key,
                    StateSince {
                        value: m.content.membership,
                        since: Some(m.origin_server_ts),
                    },
                )
            })
            .collect())
    }

    /// Downloads `mxc` over authenticated media (`GET /_matrix/client/v1/media/download`):
    /// the bytes and their content type.
    pub async fn download_media(
        &self,
        mxc: &MxcUri,
    ) -> Result<(Vec<u8>, Option<String>), MatrixError> {
        let (server, media_id) = mxc.parts().map_err(|e| MatrixError::Permanent {
            status: 0,
            errcode: "M_INVALID_PARAM".into(),
            message: format!("{mxc} is not a valid mxc:// URI: {e}"),
        })?;
        let request = ruma::api::client::authenticated_media::get_content::v1::Request::new(
            media_id.to_owned(),
            server.to_owned(),
        );
        let response = self.client.send(request, Some(&self.user)).await?;
        Ok((response.file, response.content_type))
    }

    /// Who sent event `event_id` in `room_id` and, for a message, its plain-text body
    /// (the user must be able to see it).
    pub async fn event_gist(
        &self,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<EventGist, MatrixError> {
        #[derive(Deserialize)]
        struct Event {
            sender: OwnedUserId,
            #[serde(default)]
            content: Content,
            #[serde(default)]
            origin_server_ts: Option<u64>,
        }
        #[derive(Deserialize, Default)]
        struct Content {
            #[serde(default)]
            body: Option<serde_json::Value>,
        }
        let request =
            room::get_room_event::v3::Request::new(room_id.to_owned(), event_id.to_owned());
        let response = self.client.send(request, Some(&self.user)).await;
        let event = self.noting(room_id, response)?.event;
        event
            .deserialize_as_unchecked::<Event>()
            .map(|e| EventGist {
                sender: e.sender,
                body: e.content.body.and_then(|b| b.as_str().map(str::to_owned)),
                ts: e.origin_server_ts,
            })
            .map_err(|e| MatrixError::Permanent {
                status: 200,
                errcode: "M_BAD_JSON".to_owned(),
                message: format!("event {event_id} has no readable sender: {e}"),
            })
    }

    /// Sends a message event. `txn_id` makes retries idempotent: derive it from what
    /// triggered the send, never from the clock.
    pub async fn send_message(
        &self,
        room_id: &RoomId,
        txn_id: &TransactionId,
        content: &serde_json::Value,
    ) -> Result<OwnedEventId, MatrixError> {
        let request = message_request(room_id, txn_id, content);
        let response = self.client.send(request, Some(&self.user)).await;
        Ok(self.noting(room_id, response)?.event_id)
    }

    /// One attempt at sending a message event, for sends a later one supersedes (the
    /// intermediate edits of a streaming answer).
    pub async fn send_message_once(
        &self,
        room_id: &RoomId,
        txn_id: &TransactionId,
        content: &serde_json::Value,
    ) -> Result<OwnedEventId, MatrixError> {
        let request = message_request(room_id, txn_id, content);
        let response = self.client.send_once(request, Some(&self.user)).await;
        Ok(self.noting(room_id, response)?.event_id)
    }

    /// Sends a message event until the homeserver takes it: network failures and
    /// transient errors are retried, with waits of up to
    /// [`UNREACHABLE_RETRY`](super::UNREACHABLE_RETRY), for as long as the homeserver is
    /// down — an answer is kept, not dropped, through an outage. Gives up on a permanent
    /// error, or when `stop` is cancelled (shutdown: the event stays journaled and is
    /// answered after the restart).
    pub async fn send_message_until_delivered(
        &self,
        room_id: &RoomId,
        txn_id: &TransactionId,
        content: &serde_json::Value,
        stop: &CancellationToken,
    ) -> Result<OwnedEventId, Undelivered> {
        until_delivered(stop, &self.user, room_id, || {
            self.send_message(room_id, txn_id, content)
        })
        .await
    }

    /// Creates a private room named `name` with `initial_state` (each `{type, state_key,
    /// content}`) and `invite`d users; returns its ID. Not idempotent: the caller records
    /// the room before creating another for the same purpose.
    pub async fn create_room(
        &self,
        name: &str,
        initial_state: &[serde_json::Value],
        invite: &[OwnedUserId],
    ) -> Result<ruma::OwnedRoomId, MatrixError> {
        use room::create_room::v3::{Request, RoomPreset};
        let mut request = Request::new();
        request.name = Some(name.to_owned());
        request.preset = Some(RoomPreset::PrivateChat);
        request.invite = invite.to_vec();
        request.initial_state = initial_state
            .iter()
            .map(|event| {
                Raw::from_json(
                    serde_json::value::to_raw_value(event).expect("a JSON value serialises"),
                )
            })
            .collect();
        let response = self.client.send(request, Some(&self.user)).await?;
        self.client.remember_joined(&self.user, &response.room_id);
        Ok(response.room_id)
    }

    /// Sets the name of `room_id`.
    pub async fn set_room_name(&self, room_id: &RoomId, name: &str) -> Result<(), MatrixError> {
        use ruma::events::room::name::RoomNameEventContent;
        let request = ruma::api::client::state::send_state_event::v3::Request::new(
            room_id.to_owned(),
            &ruma::events::EmptyStateKey,
            &RoomNameEventContent::new(name.to_owned()),
        )
        .map_err(|e| MatrixError::Permanent {
            status: 0,
            errcode: "M_BAD_JSON".to_owned(),
            message: format!("a room name does not serialise: {e}"),
        })?;
        let response = self.client.send(request, Some(&self.user)).await;
        self.noting(room_id, response).map(|_| ())
    }

    /// Shows or hides the user's typing notice in `room_id`.
    pub async fn set_typing(
        &self,
        room_id: &RoomId,
        typing: Option<Duration>,
    ) -> Result<(), MatrixError> {
        use typing::create_typing_event::v3::{Request, Typing, TypingInfo};
        let state = match typing {
            Some(timeout) => Typing::Yes(TypingInfo::new(timeout)),
            None => Typing::No,
        };
        // Typing is cosmetic: one attempt, no retries.
        let request = Request::new(self.user.clone(), room_id.to_owned(), state);
        let response = self.client.send_once(request, Some(&self.user)).await;
        self.noting(room_id, response).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use ruma::{room_id, user_id};

    use super::*;
    use crate::matrix::RetryPolicy;

    type Seen = Arc<Mutex<Vec<String>>>;
    type Script = Arc<Mutex<std::vec::IntoIter<(u16, &'static str)>>>;

    /// A homeserver stub that answers every request with `responses` in turn (then 500)
    /// and records each one as `METHOD /path?query`.
    async fn homeserver(responses: Vec<(u16, &'static str)>) -> (String, Seen) {
        use axum::extract::{OriginalUri, State};
        let seen = Seen::default();
        let responses = Arc::new(Mutex::new(responses.into_iter()));
        let app = axum::Router::new()
            .fallback(
                |State((seen, responses)): State<(Seen, Script)>,
                 method: axum::http::Method,
                 OriginalUri(uri): OriginalUri| async move {
                    seen.lock().unwrap().push(format!("{method} {uri}"));
                    let (status, body) = responses.lock().unwrap().next().unwrap_or((500, "{}"));
                    (axum::http::StatusCode::from_u16(status).unwrap(), body)
                },
            )
            .with_state((seen.clone(), responses));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, seen)
    }

    fn fast_retries() -> RetryPolicy {
        RetryPolicy {
            attempts: 4,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        }
    }

    const JOIN: &str = "POST /_matrix/client/v3/rooms/!room:hs/join?user_id=%40damon%3Ahs";
    const JOINED: (u16, &str) = (200, r#"{"room_id":"!room:hs"}"#);
    const FORBIDDEN: (u16, &str) = (403, r#"{"errcode":"M_FORBIDDEN","error":"not in room"}"#);

    #[tokio::test]
    async fn a_rate_limited_send_is_retried_with_the_same_transaction_id_as_the_agent() {
        let (url, seen) = homeserver(vec![
            (
                429,
                r#"{"errcode":"M_LIMIT_EXCEEDED","error":"slow down","retry_after_ms":20}"#,
            ),
            (502, "bad gateway"),
            (200, r#"{"event_id":"$sent"}"#),
        ])
        .await;
        let client = MatrixClient::new(&url, "as-token", fast_retries());
        let txn = <&TransactionId>::from("agentbus-abc");
        let event_id = client
            .intent(user_id!("@damon:hs"))
            .send_message(
                room_id!("!room:hs"),
                txn,
                &serde_json::json!({"msgtype": "m.text", "body": "hi"}),
            )
            .await
            .unwrap();
        assert_eq!(event_id.as_str(), "$sent");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        for request in seen.iter() {
            assert_eq!(
                request,
                "PUT /_matrix/client/v3/rooms/!room:hs/send/m.room.message/agentbus-abc?user_id=%40damon%3Ahs"
            );
        }
    }

    #[tokio::test]
    async fn a_permanent_error_is_not_retried() {
        let (url, seen) = homeserver(vec![FORBIDDEN]).await;
        let client = MatrixClient::new(&url, "as-token", fast_retries());
        let error = client
            .intent(user_id!("@damon:hs"))
            .send_message(room_id!("!room:hs"), "t1".into(), &serde_json::json!({}))
            .await
            .unwrap_err();
        assert_eq!(error.errcode(), Some("M_FORBIDDEN"));
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_unreachable_homeserver_gives_up_after_the_attempts_as_a_network_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let client = MatrixClient::new(&url, "as-token", fast_retries());
        let error = client
            .intent(user_id!("@damon:hs"))
            .ensure_registered()
            .await
            .unwrap_err();
        assert!(matches!(error, MatrixError::Network(_)), "{error}");
    }

    #[tokio::test]
    async fn the_history_visibility_is_read_with_its_time_or_without_or_as_unset() {
        let (url, seen) = homeserver(vec![
            (
                200,
                r#"{"type":"m.room.history_visibility","state_key":"","sender":"@a:hs","event_id":"$v",
                    "origin_server_ts":1718000000000,"content":{"history_visibility":"joined"}}"#,
            ),
            (200, r#"{"history_visibility":"invited"}"#),
            (404, r#"{"errcode":"M_NOT_FOUND","error":"no such state"}"#),
        ])
        .await;
        let client = MatrixClient::new(&url, "as-token", fast_retries());
        let damon = client.intent(user_id!("@damon:hs"));
        let room = room_id!("!room:hs");
        let event = damon.history_visibility(room).await.unwrap();
        assert_eq!(
            event,
            Some(StateSince {
                value: HistoryVisibility::Joined,
                since: Some(1_718_000_000_000)
            })
        );
        let content_only = damon.history_visibility(room).await.unwrap();
        assert_eq!(
            content_only,
            Some(StateSince {
                value: HistoryVisibility::Invited,
                since: None
            })
        );
        assert_eq!(damon.history_visibility(room).await.unwrap(), None);
        assert_eq!(
            seen.lock().unwrap()[0],
            "GET /_matrix/client/v3/rooms/!room:hs/state/m.room.history_visibility/?format=event&user_id=%40damon%3Ahs"
        );
    }

    #[tokio::test]
    async fn present_members_are_the_joined_and_invited_with_their_event_times() {
        let (url, seen) = homeserver(vec![(
            200,
            r#"{"chunk":[
                {"type":"m.room.member","state_key":"@alice:hs","sender":"@alice:hs","event_id":"$a","origin_server_ts":10,"content":{"membership":"join"}},
                {"type":"m.room.member","state_key":"@bob:hs","sender":"@alice:hs","event_id":"$b","origin_server_ts":20,"content":{"membership":"invite"}},
                {"type":"m.room.member","state_key":"@eve:hs","sender":"@eve:hs","event_id":"$e","origin_server_ts":30,"content":{"membership":"leave"}},
                {"type":"m.room.member","state_key":"@mallory:hs","sender":"@alice:hs","event_id":"$m","origin_server_ts":40,"content":{"membership":"ban"}}
            ]}"#,
        )])
        .await;
        let client = MatrixClient::new(&url, "as-token", fast_retries());
        let members = client
            .intent(user_id!("@damon:hs"))
            .present_members(room_id!("!room:hs"))
            .await
            .unwrap();
        let since = |value, at| StateSince {
            value,
            since: Some(at),
        };
        assert_eq!(
            members,
            [
                (
                    user_id!("@alice:hs").to_owned(),
                    since(MembershipState::Join, 10)
                ),
                (
                    user_id!("@bob:hs").to_owned(),
                    since(MembershipState::Invite, 20)
                ),
            ]
        );
        assert_eq!(
            *seen.lock().unwrap(),
            ["GET /_matrix/client/v3/rooms/!room:hs/members?user_id=%40damon%3Ahs"]
        );
    }

    #[tokio::test]
    async fn registering_a_user_that_exists_is_fine_and_asks_as_the_appservice() {
        let (url, seen) = homeserver(vec![(
            400,
            r#"{"errcode":"M_USER_IN_USE","error":"taken"}"#,
        )])
        .await;
        let client = MatrixClient::new(&url, "as-token", fast_retries());
        client
            .intent(user_id!("@damon:hs"))
            .ensure_registered()
            .await
            .unwrap();
        assert_eq!(*seen.lock().unwrap(), ["POST /_matrix/client/v3/register"]);
    }

    #[tokio::test]
    async fn ensure_joined_joins_once_and_then_costs_nothing() {
        let (url, seen) = homeserver(vec![JOINED]).await;
        let client = MatrixClient::new(&url, "as-token", fast_retries());
        let room = room_id!("!room:hs");
        client
            .intent(user_id!("@damon:hs"))
            .ensure_joined(room)
            .await
            .unwrap();
        // A fresh intent for the same user shares the client's memory of the join.
        client
            .intent(user_id!("@damon:hs"))
            .ensure_joined(room)
            .await
            .unwrap();
        assert_eq!(*seen.lock().unwrap(), [JOIN]);
    }

    #[tokio::test]
    async fn a_join_is_remembered_per_user() {
        let (url, seen) = homeserver(vec![JOINED, JOINED]).await;
        let client = MatrixClient::new(&url, "as-token", fast_retries());
        let room = room_id!("!room:hs");
        client
            .intent(user_id!("@damon:hs"))
            .ensure_joined(room)
            .await
            .unwrap();
        client
            .intent(user_id!("@coder:hs"))
            .ensure_joined(room)
            .await
            .unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [
                JOIN,
                "POST /_matrix/client/v3/rooms/!room:hs/join?user_id=%40coder%3Ahs"
            ]
        );
    }

    #[tokio::test]
    async fn a_refused_send_forgets_the_join_so_the_next_ensure_joined_joins_again() {
        let (url, seen) = homeserver(vec![JOINED, FORBIDDEN, JOINED]).await;
        let client = MatrixClient::new(&url, "as-token", fast_retries());
        let (intent, room) = (client.intent(user_id!("@damon:hs")), room_id!("!room:hs"));
        intent.ensure_joined(room).await.unwrap();
        // Kicked meanwhile: the homeserver refuses the message.
        let refused = intent
            .send_message_until_delivered(
                room,
                "t1".into(),
                &serde_json::json!({}),
                &CancellationToken::new(),
            )
            .await;
        assert!(
            matches!(refused, Err(Undelivered::Permanent(e)) if e.errcode() == Some("M_FORBIDDEN"))
        );
        intent.ensure_joined(room).await.unwrap();
        intent.ensure_joined(room).await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [
                JOIN,
                "PUT /_matrix/client/v3/rooms/!room:hs/send/m.room.message/t1?user_id=%40damon%3Ahs",
                JOIN
            ]
        );
    }

    #[tokio::test]
    async fn join_room_always_asks_and_a_forgotten_or_refused_join_is_asked_again() {
        let (url, seen) = homeserver(vec![JOINED, JOINED, JOINED, FORBIDDEN, JOINED]).await;
        let client = MatrixClient::new(&url, "as-token", fast_retries());
        let (intent, room) = (client.intent(user_id!("@damon:hs")), room_id!("!room:hs"));
        intent.ensure_joined(room).await.unwrap();
        intent.forget_joined(room); // a leave came in
        intent.ensure_joined(room).await.unwrap();
        // An invite means we are out, whatever is remembered: join_room always asks.
        intent.join_room(room).await.unwrap();
        intent.forget_joined(room);
        let refused = intent.ensure_joined(room).await.unwrap_err();
        assert_eq!(refused.errcode(), Some("M_FORBIDDEN"));
        intent.ensure_joined(room).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), [JOIN; 5]);
    }
}
