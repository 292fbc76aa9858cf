//! Outbound client-server API as any of our virtual users.
//!
//! Requests are ruma request types sent over one shared reqwest client, with the as_token
//! and `?user_id=` (the appservice way of acting as a user; matrix-sdk no longer supports
//! it). Failures are classified so callers know whether to retry: network errors, 5xx and
//! `M_LIMIT_EXCEEDED` are retried here with backoff; everything else is [`MatrixError::Permanent`].

mod error;
pub mod keys;
mod retry;

pub use error::{MatrixError, Undelivered, classify_error};
pub use retry::{RetryPolicy, UNREACHABLE_RETRY};

use std::borrow::Cow;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use ruma::api::auth_scheme::{AuthScheme, SendAccessToken};
use ruma::api::client::{
    account, alias, appservice, discovery, membership, message, profile, room, typing,
};
use ruma::api::path_builder::{PathBuilder, SinglePath, VersionHistory};
use ruma::api::{
    AppserviceUserIdentity, IncomingResponse, MatrixVersion, OutgoingRequest, SupportedVersions,
};
use ruma::events::MessageLikeEventType;
use ruma::serde::Raw;
use ruma::{
    EventId, OwnedEventId, OwnedMxcUri, OwnedRoomId, OwnedUserId, RoomAliasId, RoomId,
    TransactionId, UserId,
};
use serde::Deserialize;

use crate::net::error_chain;
use retry::until_delivered;

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

/// Supplies the path-builder input a request type needs, from what the homeserver supports.
pub trait PathInput: PathBuilder {
    /// The input for this builder.
    fn input(versions: &SupportedVersions) -> Self::Input<'_>;
}

impl PathInput for VersionHistory {
    fn input(versions: &SupportedVersions) -> Self::Input<'_> {
        Cow::Borrowed(versions)
    }
}

impl PathInput for SinglePath {
    fn input(_: &SupportedVersions) -> Self::Input<'_> {}
}

/// The homeserver as seen by the appservice: one HTTP client, acting as any of our users.
pub struct MatrixClient {
    http: reqwest::Client,
    base_url: String,
    as_token: String,
    versions: RwLock<SupportedVersions>,
    retry: RetryPolicy,
}

impl MatrixClient {
    /// A client for the homeserver at `base_url`, authenticating with `as_token`.
    pub fn new(base_url: &str, as_token: &str, retry: RetryPolicy) -> Arc<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("agentbus/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a reqwest client with static settings builds");
        // Until /versions answers, assume a homeserver that speaks v1.1+ paths (every
        // homeserver released since 2021).
        let assumed = SupportedVersions {
            versions: [MatrixVersion::V1_1].into(),
            features: Default::default(),
        };
        Arc::new(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            as_token: as_token.to_owned(),
            versions: RwLock::new(assumed),
            retry,
        })
    }

    /// Sends `request` as `user` (or as the appservice bot when `None`), retrying transient
    /// failures according to the retry policy.
    pub async fn send<R>(
        &self,
        request: R,
        user: Option<&UserId>,
    ) -> Result<R::IncomingResponse, MatrixError>
    where
        R: OutgoingRequest,
        R::PathBuilder: PathInput,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        self.retry
            .run(std::any::type_name::<R>(), || {
                self.send_once(request.clone(), user)
            })
            .await
    }

    async fn send_once<R>(
        &self,
        request: R,
        user: Option<&UserId>,
    ) -> Result<R::IncomingResponse, MatrixError>
    where
        R: OutgoingRequest,
        R::PathBuilder: PathInput,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        self.send_once_with(request, user, SendAccessToken::Appservice(&self.as_token))
            .await
    }

    /// One attempt, authenticated with `token`.
    async fn send_once_with<R>(
        &self,
        request: R,
        user: Option<&UserId>,
        token: SendAccessToken<'_>,
    ) -> Result<R::IncomingResponse, MatrixError>
    where
        R: OutgoingRequest,
        R::PathBuilder: PathInput,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        let http_request = {
            let versions = self
                .versions
                .read()
                .expect("versions lock is never poisoned");
            let mut http_request = request
                .try_into_http_request::<Vec<u8>>(
                    &self.base_url,
                    token,
                    <R::PathBuilder as PathInput>::input(&versions),
                )
                .map_err(|e| MatrixError::Permanent {
                    status: 0,
                    errcode: "M_INVALID_REQUEST".into(),
                    message: e.to_string(),
                })?;
            if let Some(user) = user {
                AppserviceUserIdentity::new(user)
                    .maybe_add_to_uri(http_request.uri_mut())
                    .map_err(|e| MatrixError::Permanent {
                        status: 0,
                        errcode: "M_INVALID_REQUEST".into(),
                        message: e.to_string(),
                    })?;
            }
            http_request
        };
        let request = reqwest::Request::try_from(http_request)
            .map_err(|e| MatrixError::Network(e.to_string()))?;
        let response = self
            .http
            .execute(request)
            .await
            .map_err(|e| MatrixError::Network(error_chain(&e)))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| MatrixError::Network(error_chain(&e)))?;
        if !status.is_success() {
            return Err(classify_error(status.as_u16(), &body));
        }
        let mut http_response = http::Response::builder().status(status);
        if let Some(h) = http_response.headers_mut() {
            *h = headers;
        }
        let http_response = http_response
            .body(body)
            .expect("status and headers come from a valid response");
        R::IncomingResponse::try_from_http_response(http_response).map_err(|e| {
            MatrixError::Permanent {
                status: status.as_u16(),
                errcode: "M_BAD_JSON".into(),
                message: format!("unexpected response body: {e}"),
            }
        })
    }

    /// `GET /_matrix/client/versions`; remembers the answer for path selection.
    pub async fn get_versions(&self) -> Result<Vec<String>, MatrixError> {
        let response = self
            // Anonymous: reachability must not depend on the token being right.
            .send_once_with(
                discovery::get_supported_versions::Request::new(),
                None,
                SendAccessToken::None,
            )
            .await?;
        *self
            .versions
            .write()
            .expect("versions lock is never poisoned") =
            SupportedVersions::from_parts(&response.versions, &response.unstable_features);
        Ok(response.versions)
    }

    /// `GET /_matrix/client/v3/account/whoami` as the appservice bot.
    pub async fn whoami(&self) -> Result<OwnedUserId, MatrixError> {
        Ok(self
            .send_once(account::whoami::v3::Request::new(), None)
            .await?
            .user_id)
    }

    /// `POST /_matrix/client/v1/appservice/{id}/ping`: asks the homeserver to call us.
    pub async fn ping_appservice(&self, appservice_id: &str) -> Result<Duration, MatrixError> {
        let mut request = appservice::request_ping::v1::Request::new(appservice_id.to_owned());
        request.transaction_id = Some(TransactionId::new());
        Ok(self.send_once(request, None).await?.duration)
    }

    /// Registers `localpart` as one of our users; an existing user is fine.
    pub async fn ensure_registered(&self, localpart: &str) -> Result<(), MatrixError> {
        let mut request = account::register::v3::Request::new();
        request.username = Some(localpart.to_owned());
        request.inhibit_login = true;
        request.login_type = Some(account::register::LoginType::ApplicationService);
        match self.send(request, None).await {
            Ok(_) => Ok(()),
            Err(e) if e.errcode() == Some("M_USER_IN_USE") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sets `user`'s display name.
    #[allow(deprecated)] // set_profile_field needs Matrix 1.16; this endpoint works everywhere.
    pub async fn set_display_name(&self, user: &UserId, name: &str) -> Result<(), MatrixError> {
        let request =
            profile::set_display_name::v3::Request::new(user.to_owned(), Some(name.to_owned()));
        self.send(request, Some(user)).await.map(|_| ())
    }

    /// Sets `user`'s avatar.
    #[allow(deprecated)] // as above
    pub async fn set_avatar_url(&self, user: &UserId, url: OwnedMxcUri) -> Result<(), MatrixError> {
        let request = profile::set_avatar_url::v3::Request::new(user.to_owned(), Some(url));
        self.send(request, Some(user)).await.map(|_| ())
    }

    /// Joins `room_id` as `user`.
    pub async fn join_room(&self, user: &UserId, room_id: &RoomId) -> Result<(), MatrixError> {
        let request = membership::join_room_by_id::v3::Request::new(room_id.to_owned());
        self.send(request, Some(user)).await.map(|_| ())
    }

    /// The users joined to `room_id` with their display names, asked as `user` (who must
    /// be in the room).
    pub async fn joined_members(
        &self,
        user: &UserId,
        room_id: &RoomId,
    ) -> Result<Vec<(OwnedUserId, Option<String>)>, MatrixError> {
        let request = membership::joined_members::v3::Request::new(room_id.to_owned());
        Ok(self
            .send(request, Some(user))
            .await?
            .joined
            .into_iter()
            .map(|(id, member)| (id, member.display_name))
            .collect())
    }

    /// Downloads `mxc` over authenticated media (`GET /_matrix/client/v1/media/download`)
    /// as `user`: the bytes and their content type.
    pub async fn download_media(
        &self,
        user: &UserId,
        mxc: &ruma::MxcUri,
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
        let response = self.send(request, Some(user)).await?;
        Ok((response.file, response.content_type))
    }

    /// The sender of event `event_id` in `room_id`, read as `user` (who must be able to
    /// see it).
    pub async fn event_sender(
        &self,
        user: &UserId,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<OwnedUserId, MatrixError> {
        #[derive(Deserialize)]
        struct Sender {
            sender: OwnedUserId,
        }
        let request =
            room::get_room_event::v3::Request::new(room_id.to_owned(), event_id.to_owned());
        let event = self.send(request, Some(user)).await?.event;
        event
            .deserialize_as_unchecked::<Sender>()
            .map(|s| s.sender)
            .map_err(|e| MatrixError::Permanent {
                status: 200,
                errcode: "M_BAD_JSON".to_owned(),
                message: format!("event {event_id} has no readable sender: {e}"),
            })
    }

    /// The room an alias points to.
    pub async fn resolve_alias(&self, alias: &RoomAliasId) -> Result<OwnedRoomId, MatrixError> {
        let request = alias::get_alias::v3::Request::new(alias.to_owned());
        Ok(self.send(request, None).await?.room_id)
    }

    /// Sends a message event as `user`. `txn_id` makes retries idempotent: derive it from
    /// what triggered the send, never from the clock.
    pub async fn send_message(
        &self,
        user: &UserId,
        room_id: &RoomId,
        txn_id: &TransactionId,
        content: &serde_json::Value,
    ) -> Result<OwnedEventId, MatrixError> {
        let request = message_request(room_id, txn_id, content);
        Ok(self.send(request, Some(user)).await?.event_id)
    }

    /// One attempt at sending a message event, for sends a later one supersedes (the
    /// intermediate edits of a streaming answer).
    pub async fn send_message_once(
        &self,
        user: &UserId,
        room_id: &RoomId,
        txn_id: &TransactionId,
        content: &serde_json::Value,
    ) -> Result<OwnedEventId, MatrixError> {
        let request = message_request(room_id, txn_id, content);
        Ok(self.send_once(request, Some(user)).await?.event_id)
    }

    /// Sends a message event until the homeserver takes it: network failures and
    /// transient errors are retried, with waits of up to [`UNREACHABLE_RETRY`], for as
    /// long as the homeserver is down — an answer is kept, not dropped, through an outage.
    /// Gives up on a permanent error, or when `stop` is cancelled (shutdown: the event
    /// stays journaled and is answered after the restart).
    pub async fn send_message_until_delivered(
        &self,
        user: &UserId,
        room_id: &RoomId,
        txn_id: &TransactionId,
        content: &serde_json::Value,
        stop: &CancellationToken,
    ) -> Result<OwnedEventId, Undelivered> {
        until_delivered(stop, user, room_id, || {
            self.send_message(user, room_id, txn_id, content)
        })
        .await
    }

    /// Shows or hides `user`'s typing notice in `room_id`.
    pub async fn set_typing(
        &self,
        user: &UserId,
        room_id: &RoomId,
        typing: Option<Duration>,
    ) -> Result<(), MatrixError> {
        use typing::create_typing_event::v3::{Request, Typing};
        let state = match typing {
            Some(timeout) => Typing::Yes(
                ruma::api::client::typing::create_typing_event::v3::TypingInfo::new(timeout),
            ),
            None => Typing::No,
        };
        // Typing is cosmetic: one attempt, no retries.
        self.send_once(
            Request::new(user.to_owned(), room_id.to_owned(), state),
            Some(user),
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Seen = std::sync::Arc<std::sync::Mutex<Vec<String>>>;
    type Script = std::sync::Arc<std::sync::Mutex<std::vec::IntoIter<(u16, &'static str)>>>;

    /// A homeserver stub for the send endpoint that answers with `responses` in turn and
    /// records each request's URI.
    async fn send_stub(responses: Vec<(u16, &'static str)>) -> (String, Seen) {
        use axum::extract::{OriginalUri, State};
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let responses = std::sync::Arc::new(std::sync::Mutex::new(responses.into_iter()));
        let app = axum::Router::new()
            .route(
                "/_matrix/client/v3/rooms/{room}/send/{event_type}/{txn}",
                axum::routing::put(
                    |State((seen, responses)): State<(Seen, Script)>,
                     OriginalUri(uri): OriginalUri| async move {
                        seen.lock().unwrap().push(uri.to_string());
                        let (status, body) =
                            responses.lock().unwrap().next().unwrap_or((500, "{}"));
                        (axum::http::StatusCode::from_u16(status).unwrap(), body)
                    },
                ),
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

    #[tokio::test]
    async fn a_rate_limited_send_is_retried_with_the_same_transaction_id_as_the_agent() {
        let (url, seen) = send_stub(vec![
            (
                429,
                r#"{"errcode":"M_LIMIT_EXCEEDED","error":"slow down","retry_after_ms":20}"#,
            ),
            (502, "bad gateway"),
            (200, r#"{"event_id":"$sent"}"#),
        ])
        .await;
        let client = MatrixClient::new(&url, "as-token", fast_retries());
        let user = ruma::user_id!("@damon:hs");
        let room = ruma::room_id!("!room:hs");
        let txn = <&TransactionId>::from("agentbus-abc");
        let event_id = client
            .send_message(
                user,
                room,
                txn,
                &serde_json::json!({"msgtype": "m.text", "body": "hi"}),
            )
            .await
            .unwrap();
        assert_eq!(event_id.as_str(), "$sent");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        for uri in seen.iter() {
            assert_eq!(
                uri,
                "/_matrix/client/v3/rooms/!room:hs/send/m.room.message/agentbus-abc?user_id=%40damon%3Ahs"
            );
        }
    }

    #[tokio::test]
    async fn a_permanent_error_is_not_retried() {
        let (url, seen) = send_stub(vec![(
            403,
            r#"{"errcode":"M_FORBIDDEN","error":"not in room"}"#,
        )])
        .await;
        let client = MatrixClient::new(&url, "as-token", fast_retries());
        let error = client
            .send_message(
                ruma::user_id!("@damon:hs"),
                ruma::room_id!("!room:hs"),
                "t1".into(),
                &serde_json::json!({}),
            )
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
        let error = client.ensure_registered("damon").await.unwrap_err();
        assert!(matches!(error, MatrixError::Network(_)), "{error}");
    }
}
