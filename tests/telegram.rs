//! The Telegram bridge end to end: the real binary, a real Synapse, a real person on
//! Matrix, and a wire-level fake of the Telegram Bot API. Two bots: `support` gets its
//! updates by webhook, `ops` by long polling. A private chat's message makes a portal
//! where the bot's agent answers, and the answer goes out by `sendMessage` as Telegram
//! HTML, again after a 429; a redelivered update is posted once; a forged one not at
//! all; in a group, only a message addressing the bot is answered; a bot whose token
//! `getMe` refuses says so in the log and does not poll.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use support::{Agentbus, Human, Script, Scripted, WAIT, agent_id, content_text, exclusive};
use tokio::sync::Notify;

const SUPPORT_TOKEN: &str = "111111:support-token";
const OPS_TOKEN: &str = "222222:ops-token";
const SECRET_TOKEN: &str = "webhook-secret_token-1";
/// A token the fake does not know, as one revoked with @BotFather.
const REVOKED_TOKEN: &str = "333333:revoked";

/// One Bot API call the fake took: the token from the path, the method, the JSON body.
#[derive(Debug, Clone)]
struct Call {
    token: String,
    method: String,
    body: Value,
}

/// A fake of the Telegram Bot API (<https://core.telegram.org/bots/api>), wire-level:
///
/// - "Making requests": `POST https://api.telegram.org/bot<token>/<method>` with a JSON
///   body; every answer is a JSON object with `ok`, then `result`, or `description`,
///   `error_code` and, for a flood limit, `parameters` — a "ResponseParameters" with
///   `retry_after` (seconds). An unknown token is answered 401 `Unauthorized`.
/// - "getMe": the bot as a "User" (`id`, `is_bot`, `first_name`, `username`).
/// - "sendMessage": `chat_id`, `text`, `parse_mode`; the sent "Message" as the result.
///   The support bot's first call is answered 429 "Too Many Requests: retry after 1".
/// - "getUpdates": `offset` (updates below it are confirmed and dropped), `timeout` (long
///   polling: seconds to wait for an update), `allowed_updates`; an array of "Update"s.
///
/// The updates it serves and the ones the test POSTs are "Update"s holding a "Message"
/// with "MessageEntity"s, as Telegram would send them. ("setWebhook", which registers
/// the webhook URL and its `secret_token`, is the operator's call, so the test POSTs
/// straight to the webhook with the `X-Telegram-Bot-Api-Secret-Token` it would carry.)
#[derive(Clone, Default)]
struct FakeTelegram {
    calls: Arc<Mutex<Vec<Call>>>,
    called: Arc<Notify>,
    /// Updates waiting for `getUpdates`, by token.
    updates: Arc<Mutex<Vec<(String, Value)>>>,
    sends: Arc<AtomicUsize>,
    /// Whether the support bot's first `sendMessage` was answered 429 yet.
    refused: Arc<AtomicBool>,
}

/// The bots the fake knows: token, id, username.
const BOTS: [(&str, i64, &str); 2] = [
    (SUPPORT_TOKEN, 111111, "support_bot"),
    (OPS_TOKEN, 222222, "ops_bot"),
];

fn answer(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

async fn bot_api(
    State(fake): State<FakeTelegram>,
    Path((bot, method)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let token = bot.strip_prefix("bot").unwrap_or_default().to_owned();
    let body: Value = serde_json::from_slice(&body).unwrap_or(json!({}));
    fake.calls.lock().unwrap().push(Call {
        token: token.clone(),
        method: method.clone(),
        body: body.clone(),
    });
    fake.called.notify_waiters();
    let Some(&(_, id, username)) = BOTS.iter().find(|(t, _, _)| *t == token) else {
        return answer(
            StatusCode::UNAUTHORIZED,
            json!({"ok": false, "error_code": 401, "description": "Unauthorized"}),
        );
    };
    match method.as_str() {
        "getMe" => answer(
            StatusCode::OK,
            json!({"ok": true, "result": {
                "id": id, "is_bot": true, "first_name": "Bot", "username": username,
            }}),
        ),
        "sendMessage" => {
            let n = fake.sends.fetch_add(1, Ordering::SeqCst);
            if token == SUPPORT_TOKEN && !fake.refused.swap(true, Ordering::SeqCst) {
                return answer(
                    StatusCode::TOO_MANY_REQUESTS,
                    json!({"ok": false, "error_code": 429,
                           "description": "Too Many Requests: retry after 1",
                           "parameters": {"retry_after": 1}}),
                );
            }
            answer(
                StatusCode::OK,
                json!({"ok": true, "result": {
                    "message_id": 1000 + n, "date": 1_700_000_000,
                    "chat": {"id": body["chat_id"], "type": "private"},
                    "text": body["text"],
                }}),
            )
        }
        "getUpdates" => {
            let offset = body["offset"].as_i64().unwrap_or(0);
            let timeout = Duration::from_secs(body["timeout"].as_u64().unwrap_or(0).min(30));
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let called = fake.called.notified();
                let ready: Vec<Value> = {
                    let mut updates = fake.updates.lock().unwrap();
                    updates
                        .retain(|(t, u)| *t != token || u["update_id"].as_i64().unwrap() >= offset);
                    updates
                        .iter()
                        .filter(|(t, _)| *t == token)
                        .map(|(_, u)| u.clone())
                        .collect()
                };
                if !ready.is_empty() || tokio::time::timeout_at(deadline, called).await.is_err() {
                    return answer(StatusCode::OK, json!({"ok": true, "result": ready}));
                }
            }
        }
        _ => answer(
            StatusCode::NOT_FOUND,
            json!({"ok": false, "error_code": 404, "description": "Not Found"}),
        ),
    }
}

impl FakeTelegram {
    async fn start() -> (FakeTelegram, String) {
        let fake = FakeTelegram::default();
        let app = axum::Router::new()
            .route("/{bot}/{method}", axum::routing::post(bot_api))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (fake, url)
    }

    /// Queues `update` for the `getUpdates` of the bot of `token`.
    fn serve(&self, token: &str, update: Value) {
        self.updates
            .lock()
            .unwrap()
            .push((token.to_owned(), update));
        self.called.notify_waiters();
    }

    fn calls(&self, token: &str, method: &str) -> Vec<Value> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.token == token && c.method == method)
            .map(|c| c.body.clone())
            .collect()
    }

    /// Waits until `count` calls of `method` by the bot of `token` match.
    async fn wait_for(
        &self,
        what: &str,
        token: &str,
        method: &str,
        count: usize,
        matches: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let called = self.called.notified();
            let found: Vec<Value> = self
                .calls(token, method)
                .into_iter()
                .filter(|b| matches(b))
                .collect();
            if found.len() >= count {
                return found;
            }
            if tokio::time::timeout_at(deadline, called).await.is_err() {
                panic!(
                    "never called: {what}; calls: {:?}",
                    self.calls.lock().unwrap()
                );
            }
        }
    }
}

/// An "Update" holding a text "Message" from Ursula (user 42).
fn update(update_id: i64, chat: Value, text: &str, entities: Value) -> Value {
    json!({
        "update_id": update_id,
        "message": {
            "message_id": update_id * 10,
            "date": 1_700_000_000,
            "from": {"id": 42, "is_bot": false, "first_name": "Ursula", "last_name": "K",
                     "username": "ursula"},
            "chat": chat,
            "text": text,
            "entities": entities,
        }
    })
}

fn private_chat() -> Value {
    json!({"id": 42, "type": "private", "first_name": "Ursula", "last_name": "K"})
}

fn group_chat() -> Value {
    json!({"id": -1001234, "type": "supergroup", "title": "Orders Team"})
}

/// POSTs `update` to the webhook of `account` with `secret` as the secret token.
async fn post(port: u16, account: &str, update: &Value, secret: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{port}/bridges/telegram/{account}"
        ))
        .json(update);
    if let Some(secret) = secret {
        request = request.header("x-telegram-bot-api-secret-token", secret);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_bots_bridge_by_webhook_and_polling_and_answer_when_addressed() {
    let _one_at_a_time = exclusive().await;
    // Markdown answers, so the HTML they go out as is checked exactly.
    let llm = support::LlmStub::start(Script::mode(|model, _| {
        Scripted::Say(match model {
            "coder-model" => "Polled **fine**".to_owned(),
            _ => "Noted **that** & <filed> it".to_owned(),
        })
    }))
    .await;
    let (fake, api_url) = FakeTelegram::start().await;
    // The polling bot's update waits for its first getUpdates.
    fake.serve(
        OPS_TOKEN,
        json!({
            "update_id": 5001,
            "message": {
                "message_id": 1, "date": 1_700_000_000,
                "from": {"id": 77, "is_bot": false, "first_name": "Olga"},
                "chat": {"id": 77, "type": "private", "first_name": "Olga"},
                "text": "status please",
            }
        }),
    );
    let alice = Human::new("alice").await;
    let port = support::free_port();
    let dir = Agentbus::write_config(&llm.url);
    let path = dir.path().join("agentbus.yaml");
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!(
            "{config}\nbridges:\n  listen: \"127.0.0.1:{port}\"\n  telegram:\n    accounts:\n      \
             support: {{ token_env: AGENTBUS_E2E_TG_SUPPORT, secret_token_env: \
             AGENTBUS_E2E_TG_SECRET, api_url: \"{api_url}\", agent: damon, invite: [\"{}\"] }}\n      \
             ops: {{ token_env: AGENTBUS_E2E_TG_OPS, mode: polling, api_url: \"{api_url}\", \
             agent: coder }}\n      \
             broken: {{ token_env: AGENTBUS_E2E_TG_BROKEN, mode: polling, api_url: \"{api_url}\" }}\n",
            alice.user_id
        ),
    )
    .unwrap();
    let mut bus = Agentbus::configured(dir);
    bus.set_env("AGENTBUS_E2E_TG_SUPPORT", SUPPORT_TOKEN);
    bus.set_env("AGENTBUS_E2E_TG_OPS", OPS_TOKEN);
    bus.set_env("AGENTBUS_E2E_TG_SECRET", SECRET_TOKEN);
    bus.set_env("AGENTBUS_E2E_TG_BROKEN", REVOKED_TOKEN);
    bus.spawn().await;
    bus.wait_log(&["bridges listening"]).await;
    bus.wait_log(&["telegram bot connected", "support_bot"])
        .await;
    bus.wait_log(&["telegram bot has bad credentials", "broken"])
        .await;
    assert_eq!(fake.calls(REVOKED_TOKEN, "getMe").len(), 1);
    assert_eq!(
        fake.calls(SUPPORT_TOKEN, "getMe").len(),
        1,
        "the bot learns its username at start"
    );

    // Bad input first: none of it may reach Matrix.
    let forged = update(900, private_chat(), "forged update", json!([]));
    let (status, answer) = post(port, "support", &forged, Some("not-the-secret")).await;
    assert_eq!(status, 401, "{answer}");
    assert_eq!(answer["error"], "wrong X-Telegram-Bot-Api-Secret-Token");
    let (status, _) = post(port, "support", &forged, None).await;
    assert_eq!(status, 401);
    let (status, _) = post(port, "nobody", &forged, Some(SECRET_TOKEN)).await;
    assert_eq!(status, 404);
    let (status, _) = post(port, "ops", &forged, Some(SECRET_TOKEN)).await;
    assert_eq!(status, 404, "a polling bot has no webhook");

    // (1, 2) A private chat's update, delivered twice.
    let hello = update(1001, private_chat(), "hello from telegram", json!([]));
    let (status, answer) = post(port, "support", &hello, Some(SECRET_TOKEN)).await;
    assert_eq!((status, &answer["status"]), (200, &json!("accepted")));
    let (status, answer) = post(port, "support", &hello, Some(SECRET_TOKEN)).await;
    assert_eq!((status, &answer["status"]), (200, &json!("duplicate")));

    let dm = alice.join_next_invite(&[]).await;
    let puppet = format!("@_bridge_telegram_42:{}", support::SERVER_NAME);
    alice
        .wait_for("the puppet's message", |s| {
            s.room_id == dm && s.sender.as_str() == puppet && s.body() == "hello from telegram"
        })
        .await;
    let name: Value = reqwest::Client::new()
        .get(format!(
            "{}/_matrix/client/v3/rooms/{dm}/state/m.room.name/",
            support::synapse().url
        ))
        .bearer_auth(&alice.access_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        name["name"], "Ursula K",
        "a private chat's portal is named after the person"
    );
    alice
        .wait_for("damon's answer in the private chat's portal", |s| {
            s.room_id == dm && s.sender == agent_id("damon") && s.edits().is_none()
        })
        .await;

    // (3) The answer goes out as Telegram HTML, after the 429 was waited out.
    let html = "Noted <b>that</b> &amp; &lt;filed&gt; it";
    let sent = fake
        .wait_for(
            "damon's answer, retried",
            SUPPORT_TOKEN,
            "sendMessage",
            2,
            |b| b["chat_id"] == 42,
        )
        .await;
    assert_eq!(sent.len(), 2, "a 429, then the accepted retry: {sent:?}");
    assert_eq!(sent[0], sent[1], "the retry is the same message");
    assert_eq!(sent[1]["text"], html);
    assert_eq!(sent[1]["parse_mode"], "HTML");

    // (6) In a group: a message that does not address the bot is posted, not answered;
    // one that mentions it is answered, the mention taken out.
    let chatting = update(
        1002,
        group_chat(),
        "just chatting among ourselves",
        json!([]),
    );
    let (status, _) = post(port, "support", &chatting, Some(SECRET_TOKEN)).await;
    assert_eq!(status, 200);
    let asking = update(
        1003,
        group_chat(),
        "@support_bot can you check the order?",
        json!([{"type": "mention", "offset": 0, "length": 12}]),
    );
    let (status, _) = post(port, "support", &asking, Some(SECRET_TOKEN)).await;
    assert_eq!(status, 200);
    let group = alice.join_next_invite(std::slice::from_ref(&dm)).await;
    alice
        .wait_for("the unaddressed group message", |s| {
            s.room_id == group && s.body() == "just chatting among ourselves"
        })
        .await;
    let addressed = alice
        .wait_for("the addressed group message", |s| {
            s.room_id == group && s.body() == "can you check the order?"
        })
        .await;
    assert_eq!(
        addressed.content["m.mentions"]["user_ids"],
        json!([agent_id("damon").as_str()]),
        "an addressed message mentions the bot's agent"
    );
    let sent = fake
        .wait_for(
            "damon's answer in the group",
            SUPPORT_TOKEN,
            "sendMessage",
            1,
            |b| b["chat_id"] == -1001234,
        )
        .await;
    assert_eq!(sent[0]["text"], html);
    alice
        .wait_for("damon's answer in the group's portal", |s| {
            s.room_id == group && s.sender == agent_id("damon") && s.edits().is_none()
        })
        .await;
    // One room's messages are taken in order, so the unaddressed one was decided first.
    let answers =
        alice.seen(|s| s.room_id == group && s.sender == agent_id("damon") && s.edits().is_none());
    assert_eq!(answers.len(), 1, "only the addressed message is answered");
    let asked: Vec<String> = llm
        .requests()
        .iter()
        .filter_map(|r| r["messages"].as_array()?.last().map(content_text))
        .collect();
    assert!(
        !asked.iter().any(|t| t.contains("just chatting")),
        "the unaddressed message never reached the model as a question: {asked:?}"
    );

    // (5) The polling bot: its update reached a portal and coder's answer went out.
    let sent = fake
        .wait_for(
            "coder's answer to the polled update",
            OPS_TOKEN,
            "sendMessage",
            1,
            |b| b["chat_id"] == 77,
        )
        .await;
    assert_eq!(sent[0]["text"], "Polled <b>fine</b>");
    let offsets: HashSet<i64> = fake
        .calls(OPS_TOKEN, "getUpdates")
        .iter()
        .filter_map(|b| b["offset"].as_i64())
        .collect();
    assert!(
        offsets.contains(&5002),
        "the next getUpdates confirms the update handed over: {offsets:?}"
    );

    assert!(
        fake.calls(REVOKED_TOKEN, "getUpdates").is_empty(),
        "a bot with bad credentials does not poll"
    );

    // Nothing refused was posted, and the redelivered update was posted once.
    let seen = alice.seen(|s| s.room_id == dm);
    let bodies: Vec<&str> = seen.iter().map(|s| s.body()).collect();
    assert_eq!(
        bodies
            .iter()
            .filter(|b| **b == "hello from telegram")
            .count(),
        1,
        "{bodies:?}"
    );
    assert!(!bodies.iter().any(|b| b.contains("forged")), "{bodies:?}");
    // No puppet's message went back out to Telegram.
    let texts: Vec<Value> = fake
        .calls(SUPPORT_TOKEN, "sendMessage")
        .iter()
        .map(|b| b["text"].clone())
        .collect();
    assert!(
        !texts.iter().any(|t| t
            .as_str()
            .is_some_and(|t| t.contains("telegram") || t.contains("chatting"))),
        "{texts:?}"
    );
}
