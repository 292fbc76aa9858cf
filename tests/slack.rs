//! The Slack bridge end to end: the real binary, a real Synapse, a real person on Matrix,
//! and the test's own wire-level Slack Web API. A signed `app_mention` makes a portal with
//! the puppet's message, mentioning the account's agent; the agent's answer goes out by
//! `chat.postMessage` as mrkdwn with the bot token, once, after a 429 is waited out;
//! redeliveries and the `message` twin of the mention post nothing again; a wrong
//! signature is refused; `url_verification` answers its challenge; a channel the app has
//! left refuses the answer for good, and its portal gets a notice.

mod support;

use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use support::{Agentbus, Human, LlmMode, LlmStub, SERVER_NAME, WAIT, agent_id, exclusive};
use tokio::sync::Notify;

const SIGNING_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const BOT_TOKEN: &str = "xoxb-17653672481-19874698323-pdFZKVeTuE8sk7oOcBrzbqgy";
const BOT_USER: &str = "U0BOT0001";

/// "Verifying requests from Slack" (https://api.slack.com/authentication/verifying-requests-from-slack):
/// `v0=` + hex HMAC-SHA256 of `v0:<timestamp>:<body>` under the signing secret.
fn sign(timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SIGNING_SECRET.as_bytes()).unwrap();
    mac.update(format!("v0:{timestamp}:").as_bytes());
    mac.update(body);
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

fn now() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string()
}

/// One Web API call the fake took.
#[derive(Debug, Clone)]
struct Call {
    method: String,
    authorization: Option<String>,
    /// The JSON body of a POST, or the query of a GET as an object.
    args: Value,
    /// What the fake answered.
    status: u16,
}

/// A Slack Web API (https://api.slack.com/web) at `http://…/api/<method>`, following the
/// methods' pages: every call authenticates with `Authorization: Bearer <token>` and
/// answers HTTP 200 with `{"ok": false, "error": "invalid_auth"}` for a wrong one;
/// `auth.test` (https://api.slack.com/methods/auth.test) names the bot user;
/// `users.info` (https://api.slack.com/methods/users.info) and `conversations.info`
/// (https://api.slack.com/methods/conversations.info) name a user and a channel;
/// `chat.postMessage` (https://api.slack.com/methods/chat.postMessage) takes a JSON body
/// `{channel, text}` and answers `not_in_channel` for any channel but one. Its
/// first `chat.postMessage` is rate limited as "Rate limits" (https://api.slack.com/apis/rate-limits)
/// says: HTTP 429 with `Retry-After` in seconds.
#[derive(Clone, Default)]
struct FakeSlack {
    calls: Arc<Mutex<Vec<Call>>>,
    arrived: Arc<Notify>,
}

impl FakeSlack {
    async fn start() -> (FakeSlack, String) {
        let fake = FakeSlack::default();
        let state = fake.clone();
        let app = axum::Router::new().route(
            "/api/{method}",
            axum::routing::any(
                move |Path(method): Path<String>,
                      Query(query): Query<serde_json::Map<String, Value>>,
                      headers: HeaderMap,
                      body: axum::body::Bytes| {
                    let state = state.clone();
                    async move { state.answer(method, query, headers, body) }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/api", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (fake, url)
    }

    fn answer(
        &self,
        method: String,
        query: serde_json::Map<String, Value>,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> axum::response::Response {
        let authorization = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let args = if body.is_empty() {
            Value::Object(query)
        } else {
            serde_json::from_slice(&body).unwrap_or(Value::Null)
        };
        let first_post = !self
            .calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.method == "chat.postMessage");
        let authorized = authorization.as_deref() == Some(&format!("Bearer {BOT_TOKEN}"));
        let (status, answer) = if !authorized {
            (200, json!({"ok": false, "error": "invalid_auth"}))
        } else {
            match method.as_str() {
                "auth.test" => (
                    200,
                    json!({"ok": true, "url": "https://acme.slack.com/", "team": "Acme",
                        "user": "agentbus", "team_id": "T0ACME", "user_id": BOT_USER,
                        "bot_id": "B0BOT0001"}),
                ),
                "users.info" if args["user"] == "U42" => (
                    200,
                    json!({"ok": true, "user": {"id": "U42", "name": "ursula",
                        "real_name": "Ursula K. Le Guin",
                        "profile": {"display_name": "Ursula", "real_name": "Ursula K. Le Guin"}}}),
                ),
                "users.info" => (200, json!({"ok": false, "error": "user_not_found"})),
                "conversations.info" if args["channel"] == "C0GENERAL" => (
                    200,
                    json!({"ok": true, "channel": {"id": "C0GENERAL", "name": "general",
                        "is_channel": true}}),
                ),
                "conversations.info" => (200, json!({"ok": false, "error": "channel_not_found"})),
                "chat.postMessage" if first_post => {
                    (429, json!({"ok": false, "error": "ratelimited"}))
                }
                "chat.postMessage" if args["channel"] == "C0GENERAL" => (
                    200,
                    json!({"ok": true, "channel": "C0GENERAL", "ts": "1700000100.000200",
                        "message": {"type": "message", "text": args["text"], "bot_id": "B0BOT0001"}}),
                ),
                // The app was removed from every other channel.
                "chat.postMessage" => (200, json!({"ok": false, "error": "not_in_channel"})),
                _ => (200, json!({"ok": false, "error": "unknown_method"})),
            }
        };
        self.calls.lock().unwrap().push(Call {
            method,
            authorization,
            args,
            status,
        });
        self.arrived.notify_waiters();
        let mut response =
            (StatusCode::from_u16(status).unwrap(), axum::Json(answer)).into_response();
        if status == 429 {
            response
                .headers_mut()
                .insert("retry-after", "1".parse().unwrap());
        }
        response
    }

    fn calls(&self, method: &str) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.method == method)
            .cloned()
            .collect()
    }

    /// Waits for a call of `method` that was answered `status` and matches.
    async fn wait_for(&self, method: &str, status: u16, matches: impl Fn(&Call) -> bool) -> Call {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let arrived = self.arrived.notified();
            if let Some(found) = self
                .calls(method)
                .into_iter()
                .find(|c| c.status == status && matches(c))
            {
                return found;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !left.is_zero(),
                "never called: {method}; got {:?}",
                self.calls.lock().unwrap()
            );
            let _ = tokio::time::timeout(left, arrived).await;
        }
    }
}

/// POSTs `body` to the Events API route of `account`, signed (with `signature` instead
/// when given), with `X-Slack-Retry-Num` when `retry` is; the status and the JSON answer.
async fn post(
    port: u16,
    account: &str,
    body: &[u8],
    signature: Option<&str>,
    retry: Option<u32>,
) -> (u16, Value) {
    let ts = now();
    let signature = signature.map_or_else(|| sign(&ts, body), str::to_owned);
    let mut request = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/bridges/slack/{account}"))
        .header("content-type", "application/json")
        .header("x-slack-request-timestamp", ts)
        .header("x-slack-signature", signature)
        .body(body.to_vec());
    if let Some(retry) = retry {
        // "Responding to events" (https://api.slack.com/apis/events-api#retries): a
        // redelivery carries its attempt number and why.
        request = request
            .header("x-slack-retry-num", retry.to_string())
            .header("x-slack-retry-reason", "http_timeout");
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// An `event_callback` as the Events API sends it
/// (https://api.slack.com/apis/events-api#callback-field).
fn callback(event_id: &str, event: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "token": "Jhj5dZrVaK7ZwHHjRyZWjbDl",
        "team_id": "T0ACME",
        "api_app_id": "A0APP0001",
        "event": event,
        "type": "event_callback",
        "event_id": event_id,
        "event_time": 1700000000,
        "authorizations": [{"team_id": "T0ACME", "user_id": BOT_USER, "is_bot": true}],
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_mention_reaches_the_bound_agent_whose_answer_is_posted_once_as_mrkdwn() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let (slack, api_url) = FakeSlack::start().await;
    let alice = Human::new("alice").await;
    let port = support::free_port();
    let dir = Agentbus::write_config(&llm.url);
    let path = dir.path().join("agentbus.yaml");
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!(
            "{config}\nbridges:\n  listen: \"127.0.0.1:{port}\"\n  slack:\n    accounts:\n      \
             acme: {{ bot_token_env: AGENTBUS_E2E_SLACK_TOKEN, signing_secret_env: \
             AGENTBUS_E2E_SLACK_SECRET, api_url: \"{api_url}\", agent: damon, invite: [\"{}\"] }}\n",
            alice.user_id
        ),
    )
    .unwrap();
    let mut bus = Agentbus::configured(dir);
    bus.set_env("AGENTBUS_E2E_SLACK_TOKEN", BOT_TOKEN);
    bus.set_env("AGENTBUS_E2E_SLACK_SECRET", SIGNING_SECRET);
    bus.spawn().await;
    bus.wait_log(&["slack account connected", "acme"]).await;
    bus.wait_log(&["bridges listening"]).await;
    let check = slack.calls("auth.test");
    assert_eq!(check.len(), 1, "{check:?}");
    assert_eq!(
        check[0].authorization.as_deref(),
        Some(format!("Bearer {BOT_TOKEN}").as_str())
    );

    // "url_verification event" (https://api.slack.com/events/url_verification): the
    // request URL answers the challenge.
    let verification = br#"{"token":"Jhj5dZrVaK7ZwHHjRyZWjbDl","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#;
    let (status, answer) = post(port, "acme", verification, None, None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["challenge"],
        "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    );

    // Bad input: none of it may reach Matrix.
    let forged = callback(
        "Ev0FORGED",
        json!({"type": "app_mention", "user": "U42", "text": format!("<@{BOT_USER}> forged"),
            "ts": "1699999999.000100", "channel": "C0GENERAL", "event_ts": "1699999999.000100"}),
    );
    let (status, answer) = post(port, "acme", &forged, Some(&sign(&now(), b"{}")), None).await;
    assert_eq!(status, 401, "{answer}");
    assert_eq!(answer["error"], "wrong X-Slack-Signature");
    let (status, _) = post(port, "nobody", &forged, None, None).await;
    assert_eq!(status, 404);
    let (status, answer) = post(port, "acme", br#"{"type":"event_callback"}"#, None, None).await;
    assert_eq!(status, 400, "{answer}");

    // A mention of the app: Slack sends it as an app_mention and, to a channel the app is
    // in, as a message too; then it redelivers the mention.
    let text = format!("<@{BOT_USER}> make it **bold** &amp; quick");
    let mention = callback(
        "Ev0MENTION",
        json!({"type": "app_mention", "user": "U42", "text": text,
            "ts": "1700000000.000100", "channel": "C0GENERAL", "event_ts": "1700000000.000100"}),
    );
    let (status, answer) = post(port, "acme", &mention, None, None).await;
    assert_eq!((status, &answer["status"]), (200, &json!("accepted")));
    let twin = callback(
        "Ev0MESSAGE",
        json!({"type": "message", "user": "U42", "text": text, "ts": "1700000000.000100",
            "channel": "C0GENERAL", "channel_type": "channel", "event_ts": "1700000000.000100"}),
    );
    let (status, answer) = post(port, "acme", &twin, None, None).await;
    assert_eq!((status, &answer["status"]), (200, &json!("duplicate")));
    let (status, answer) = post(port, "acme", &mention, None, Some(1)).await;
    assert_eq!((status, &answer["status"]), (200, &json!("duplicate")));

    // The portal, named after the channel, invites the account's follower.
    let portal = alice.join_next_invite(&[]).await;
    let name: Value = reqwest::Client::new()
        .get(format!(
            "{}/_matrix/client/v3/rooms/{portal}/state/m.room.name/",
            support::synapse().url
        ))
        .bearer_auth(&alice.access_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(name["name"], "#general");

    // The puppet posted it without the app's mention, mentioning damon instead.
    let puppet = format!("@_bridge_slack__u42:{SERVER_NAME}");
    let said = alice
        .wait_for("the puppet's message", |s| {
            s.room_id == portal && s.sender.as_str() == puppet
        })
        .await;
    assert_eq!(said.body(), "make it **bold** & quick");
    assert_eq!(
        said.content["m.mentions"]["user_ids"],
        json!([agent_id("damon").as_str()])
    );
    let member = alice
        .client
        .get_room(&portal)
        .unwrap()
        .get_member(&said.sender)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(member.display_name(), Some("Ursula"), "named by users.info");
    let looked_up = slack.calls("users.info");
    assert_eq!(looked_up.len(), 1, "cached: {looked_up:?}");
    assert_eq!(looked_up[0].args["user"], "U42");

    // damon answers; its final text goes out as mrkdwn, after the 429 was waited out.
    let answer = alice
        .wait_for("damon's answer in the portal", |s| {
            s.room_id == portal && s.sender == agent_id("damon") && s.edits().is_none()
        })
        .await;
    let answer = alice.wait_final(&answer).await;
    assert!(
        answer.body().contains("make it **bold** & quick"),
        "{}",
        answer.body()
    );
    let posted = slack
        .wait_for("chat.postMessage", 200, |c| {
            c.args["text"].as_str().is_some_and(|t| t.contains("quick"))
        })
        .await;
    assert_eq!(
        posted.authorization.as_deref(),
        Some(format!("Bearer {BOT_TOKEN}").as_str())
    );
    assert_eq!(posted.args["channel"], "C0GENERAL");
    assert_eq!(
        posted.args["text"],
        answer.body().replace("**", "*").replace('&', "&amp;"),
        "mrkdwn: *bold*, & escaped"
    );
    let limited = slack.calls("chat.postMessage");
    assert_eq!(limited[0].status, 429, "{limited:?}");
    assert_eq!(
        limited[0].args, posted.args,
        "the retry is the same message"
    );

    // A later message, as a sentinel: everything before it has arrived.
    let later = callback(
        "Ev0LATER",
        json!({"type": "message", "user": "U42", "text": "second from slack",
            "ts": "1700000050.000100", "channel": "C0GENERAL", "channel_type": "channel"}),
    );
    let (status, _) = post(port, "acme", &later, None, None).await;
    assert_eq!(status, 200);
    let second = alice
        .wait_for("the second message", |s| {
            s.room_id == portal && s.body() == "second from slack"
        })
        .await;
    assert!(
        second.content["m.mentions"]["user_ids"].is_null(),
        "an unaddressed message mentions nobody: {}",
        second.content
    );
    // damon answers that one too (the account is bound to it): a second post, which
    // also tells the first is not sent again.
    slack
        .wait_for("chat.postMessage", 200, |c| {
            c.args["text"]
                .as_str()
                .is_some_and(|t| t.contains("second from slack"))
        })
        .await;
    let seen = alice.seen(|s| s.room_id == portal && s.sender.as_str() == puppet);
    let bodies: Vec<&str> = seen.iter().map(|s| s.body()).collect();
    assert_eq!(
        bodies,
        ["make it **bold** & quick", "second from slack"],
        "the mention, its twin and its redelivery are one message; nothing forged"
    );
    let delivered: Vec<_> = slack
        .calls("chat.postMessage")
        .into_iter()
        .filter(|c| c.status == 200 && c.args["text"].as_str().is_some_and(|t| t.contains("quick")))
        .collect();
    assert_eq!(delivered.len(), 1, "{delivered:?}");

    // Another channel, which conversations.info does not name and the app has left since:
    // its portal is named by the channel's ID, and damon's answer is refused for good,
    // which the portal is told.
    let elsewhere = callback(
        "Ev0ELSEWHERE",
        json!({"type": "message", "user": "U42", "text": "anyone here?",
            "ts": "1700000060.000100", "channel": "C0LEFT", "channel_type": "channel"}),
    );
    let (status, answer) = post(port, "acme", &elsewhere, None, None).await;
    assert_eq!((status, &answer["status"]), (200, &json!("accepted")));
    let left = alice.join_next_invite(std::slice::from_ref(&portal)).await;
    let notice = alice
        .wait_for("the undelivered notice", |s| {
            s.room_id == left && s.content["msgtype"] == "m.notice"
        })
        .await;
    assert_eq!(
        notice.body(),
        "⚠️ Not delivered to slack (acme): chat.postMessage: not_in_channel"
    );
    let refused = slack
        .wait_for("chat.postMessage", 200, |c| c.args["channel"] == "C0LEFT")
        .await;
    assert!(
        refused.args["text"]
            .as_str()
            .is_some_and(|t| t.contains("anyone here?")),
        "{refused:?}"
    );
    assert_eq!(
        slack
            .calls("chat.postMessage")
            .iter()
            .filter(|c| c.args["channel"] == "C0LEFT")
            .count(),
        1,
        "a refusal is not retried"
    );
    let name: Value = reqwest::Client::new()
        .get(format!(
            "{}/_matrix/client/v3/rooms/{left}/state/m.room.name/",
            support::synapse().url
        ))
        .bearer_auth(&alice.access_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(name["name"], "C0LEFT", "unnamed by conversations.info");
}
