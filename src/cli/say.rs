//! The human side: a matrix-sdk client that logs in as a person, posts a message and prints
//! the agents' replies as they arrive (`agentbus say`). Lets a newcomer without Element —
//! and scripts — talk to agents.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use matrix_sdk::config::SyncSettings;
use matrix_sdk::event_handler::RawEvent;
use matrix_sdk::ruma::events::room::message::{
    OriginalSyncRoomMessageEvent, RoomMessageEventContent,
};
use matrix_sdk::ruma::{OwnedRoomOrAliasId, RoomId, RoomOrAliasId};
use matrix_sdk::{Client, Room};
use tokio::sync::mpsc;

use crate::matrix::keys::STREAMING_KEY;

/// What to say, where, and as whom.
#[derive(Debug, Clone)]
pub struct SayRequest {
    pub homeserver: String,
    pub user: String,
    pub password: String,
    pub room: OwnedRoomOrAliasId,
    pub text: String,
    /// Stop after this many replies.
    pub replies: usize,
    /// Give up waiting after this long.
    pub timeout: Duration,
}

/// A reply printed by `say`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub sender: String,
    pub body: String,
}

/// Why `say` failed.
#[derive(Debug, thiserror::Error)]
pub enum SayError {
    #[error("cannot reach the homeserver at {0}: {1}")]
    Homeserver(String, String),
    #[error("login as {0} failed: {1}")]
    Login(String, String),
    #[error("room {0}: {1}")]
    Room(String, String),
    #[error("sending failed: {0}")]
    Send(String),
}

/// Logs in, sends `text`, and calls `on_reply` for each reply from another user until
/// `replies` have arrived or the timeout passes. Returns the replies seen.
pub async fn say(
    request: &SayRequest,
    mut on_reply: impl FnMut(&Reply),
) -> Result<Vec<Reply>, SayError> {
    let client = Client::builder()
        .homeserver_url(&request.homeserver)
        .build()
        .await
        .map_err(|e| SayError::Homeserver(request.homeserver.clone(), e.to_string()))?;
    client
        .matrix_auth()
        .login_username(&request.user, &request.password)
        .initial_device_display_name("agentbus say")
        .send()
        .await
        .map_err(|e| SayError::Login(request.user.clone(), e.to_string()))?;
    let room = open_room(&client, &request.room).await?;
    // Catch up first so only replies to this message are printed.
    let response = client
        .sync_once(SyncSettings::default())
        .await
        .map_err(|e| SayError::Homeserver(request.homeserver.clone(), e.to_string()))?;

    let sent = room
        .send(RoomMessageEventContent::text_plain(&request.text))
        .await
        .map_err(|e| SayError::Send(e.to_string()))?
        .response
        .event_id;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let me = client.user_id().map(ToOwned::to_owned);
    let room_id = room.room_id().to_owned();
    // A streamed answer is posted marked as streaming and finished by an edit without the
    // mark: print each answer once, whole.
    let streaming: Arc<Mutex<HashSet<String>>> = Arc::default();
    client.add_event_handler(
        move |event: OriginalSyncRoomMessageEvent, room: Room, raw: RawEvent| {
            let (tx, me, room_id) = (tx.clone(), me.clone(), room_id.clone());
            let streaming = streaming.clone();
            async move {
                if room.room_id() != room_id || Some(&event.sender) == me.as_ref() {
                    return;
                }
                let raw: serde_json::Value = serde_json::from_str(raw.0.get()).unwrap_or_default();
                let content = &raw["content"];
                let is_streaming = |c: &serde_json::Value| c[STREAMING_KEY] == true;
                let relation = &content["m.relates_to"];
                let body = if relation["rel_type"] == "m.replace" {
                    let edited = relation["event_id"].as_str().unwrap_or_default();
                    let new = &content["m.new_content"];
                    if is_streaming(new) || !streaming.lock().unwrap().remove(edited) {
                        return;
                    }
                    new["body"].as_str().unwrap_or_default().to_owned()
                } else if is_streaming(content) {
                    streaming.lock().unwrap().insert(event.event_id.to_string());
                    return;
                } else {
                    event.content.body().to_owned()
                };
                let _ = tx.send(Reply {
                    sender: event.sender.to_string(),
                    body,
                });
            }
        },
    );
    let sync_client = client.clone();
    let settings = SyncSettings::default()
        .token(response.next_batch)
        .timeout(Duration::from_secs(5));
    let sync = tokio::spawn(async move { sync_client.sync(settings).await });
    tracing::debug!(event_id = %sent, "message sent; waiting for replies");

    let mut replies = Vec::new();
    let deadline = tokio::time::Instant::now() + request.timeout;
    while replies.len() < request.replies {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(reply)) => {
                on_reply(&reply);
                replies.push(reply);
            }
            Ok(None) | Err(_) => break,
        }
    }
    sync.abort();
    Ok(replies)
}

/// Resolves an alias if needed and joins the room unless already in it.
async fn open_room(client: &Client, room: &OwnedRoomOrAliasId) -> Result<Room, SayError> {
    let room_or_alias: &RoomOrAliasId = room;
    let room_id = match <&RoomId>::try_from(room_or_alias) {
        Ok(id) => id.to_owned(),
        Err(alias) => {
            client
                .resolve_room_alias(alias)
                .await
                .map_err(|e| {
                    SayError::Room(room.to_string(), format!("cannot resolve alias: {e}"))
                })?
                .room_id
        }
    };
    client
        .join_room_by_id(&room_id)
        .await
        .map_err(|e| SayError::Room(room.to_string(), format!("cannot join: {e}")))
}
