//! The transport: one reqwest client to the homeserver, authenticated with the as_token,
//! asserting which of our users it acts as with `?user_id=` (the appservice identity
//! assertion). Per-user operations live on [`Intent`]; what is left here acts as the
//! appservice itself.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use ruma::api::auth_scheme::{AuthScheme, SendAccessToken};
use ruma::api::client::{account, alias, appservice, discovery};
use ruma::api::path_builder::{PathBuilder, SinglePath, VersionHistory};
use ruma::api::{
    AppserviceUserIdentity, IncomingResponse, MatrixVersion, OutgoingRequest, SupportedVersions,
};
use ruma::{OwnedRoomId, OwnedUserId, RoomAliasId, RoomId, TransactionId, UserId};

use super::error::{MatrixError, classify_error};
use super::intent::Intent;
use super::retry::RetryPolicy;
use crate::net::error_chain;

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

/// Rooms remembered before the joined-rooms cache starts over. Forgetting is cheap (one
/// more join, which the homeserver answers idempotently), so a bound this rough will do.
const JOINED_ROOMS_LIMIT: usize = 10_000;

/// The homeserver as seen by the appservice: one HTTP client, acting as any of our users.
pub struct MatrixClient {
    http: reqwest::Client,
    base_url: String,
    as_token: String,
    versions: RwLock<SupportedVersions>,
    retry: RetryPolicy,
    /// Which of our users are known to be in which room, so that `ensure_joined` asks once.
    joined: Mutex<HashMap<OwnedRoomId, HashSet<OwnedUserId>>>,
    /// The `Arc` that [`MatrixClient::new`] returned, so that callers holding only a
    /// `&MatrixClient` can still hand out [`Intent`]s.
    this: Weak<MatrixClient>,
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
        Arc::new_cyclic(|this| Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            as_token: as_token.to_owned(),
            versions: RwLock::new(assumed),
            retry,
            joined: Mutex::default(),
            this: this.clone(),
        })
    }

    /// This client acting as `user` (one of our virtual users). Cheap: a clone of two handles.
    pub fn intent(&self, user: &UserId) -> Intent {
        let client = self
            .this
            .upgrade()
            .expect("a MatrixClient only exists inside the Arc that new() made");
        Intent::new(client, user.to_owned())
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

    /// One attempt at `request` as `user`, for sends that are not worth retrying.
    pub(super) async fn send_once<R>(
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

    /// One attempt, authenticated with `token`, counted in the request metrics by kind
    /// (the endpoint's name, e.g. `send_message_event`).
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
        let kind = request_kind(std::any::type_name::<R>());
        metrics::counter!("agentbus_matrix_requests_total", "kind" => kind).increment(1);
        let result = self.attempt(request, user, token).await;
        if let Err(e) = &result {
            let error = match e {
                MatrixError::Network(_) => "network".to_owned(),
                MatrixError::Transient { status, .. } | MatrixError::Permanent { status, .. } => e
                    .errcode()
                    .map_or_else(|| status.to_string(), str::to_owned),
            };
            metrics::counter!("agentbus_matrix_request_errors_total", "kind" => kind, "error" => error)
                .increment(1);
        }
        result
    }

    async fn attempt<R>(
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

    /// The room an alias points to.
    pub async fn resolve_alias(&self, alias: &RoomAliasId) -> Result<OwnedRoomId, MatrixError> {
        let request = alias::get_alias::v3::Request::new(alias.to_owned());
        Ok(self.send(request, None).await?.room_id)
    }

    /// Whether `user` is remembered as joined to `room_id`.
    pub(super) fn is_joined(&self, user: &UserId, room_id: &RoomId) -> bool {
        self.joined
            .lock()
            .expect("joined-rooms lock is never poisoned")
            .get(room_id)
            .is_some_and(|users| users.contains(user))
    }

    /// Remembers that `user` has joined `room_id`.
    pub(super) fn remember_joined(&self, user: &UserId, room_id: &RoomId) {
        let mut joined = self
            .joined
            .lock()
            .expect("joined-rooms lock is never poisoned");
        if joined.len() >= JOINED_ROOMS_LIMIT && !joined.contains_key(room_id) {
            joined.clear();
        }
        joined
            .entry(room_id.to_owned())
            .or_default()
            .insert(user.to_owned());
    }

    /// Forgets that `user` joined `room_id`: the next `ensure_joined` asks again.
    pub(super) fn forget_joined(&self, user: &UserId, room_id: &RoomId) {
        let mut joined = self
            .joined
            .lock()
            .expect("joined-rooms lock is never poisoned");
        if let Some(users) = joined.get_mut(room_id) {
            users.remove(user);
            if users.is_empty() {
                joined.remove(room_id);
            }
        }
    }
}

/// The endpoint a ruma request type is for: `…::send_message_event::v3::Request` →
/// `send_message_event`.
fn request_kind(type_name: &'static str) -> &'static str {
    let path = type_name.strip_suffix("::Request").unwrap_or(type_name);
    path.rsplit("::")
        .find(|segment| {
            !(segment.len() >= 2
                && segment.starts_with('v')
                && segment[1..].bytes().all(|b| b.is_ascii_digit()))
        })
        .unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::request_kind;

    #[test]
    fn a_request_type_is_named_by_its_endpoint() {
        assert_eq!(
            request_kind(std::any::type_name::<
                ruma::api::client::message::send_message_event::v3::Request,
            >()),
            "send_message_event"
        );
        assert_eq!(
            request_kind(std::any::type_name::<
                ruma::api::appservice::ping::send_ping::v1::Request,
            >()),
            "send_ping"
        );
        assert_eq!(request_kind("plain"), "plain");
    }
}
