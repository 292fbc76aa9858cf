//! Bridges end to end: the signed webhook of the real binary, a real Synapse, a real
//! person on Matrix, and the test's own HTTP server as the other side of the webhook.
//! A signed message makes a portal room with its `m.bridge` state and the puppet's
//! message; the account's agent answers it unaddressed; the answer and a Matrix person's
//! message go out signed, once each; bad input is refused with the status it deserves.

mod support;

use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use support::{Agentbus, Human, LlmMode, LlmStub, SERVER_NAME, WAIT, agent_id, exclusive};
use tokio::sync::Notify;

const SECRET: &str = "webhook-shared-secret";

fn sign(timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn now() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string()
}

/// One POST the receiver took: its headers and body.
type Post = (HeaderMap, Vec<u8>);

/// The other side of the webhook: records every POST (headers, JSON body) and answers the
/// first with 429 `Retry-After: 1`, the rest with 200.
#[derive(Clone, Default)]
struct Receiver {
    posts: Arc<Mutex<Vec<Post>>>,
    arrived: Arc<Notify>,
}

impl Receiver {
    async fn start() -> (Receiver, String) {
        let receiver = Receiver::default();
        let state = receiver.clone();
        let app = axum::Router::new().route(
            "/out",
            axum::routing::post(
                move |headers: HeaderMap, body: axum::body::Bytes| async move {
                    let first = {
                        let mut posts = state.posts.lock().unwrap();
                        posts.push((headers, body.to_vec()));
                        posts.len() == 1
                    };
                    state.arrived.notify_waiters();
                    if first {
                        (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response()
                    } else {
                        StatusCode::OK.into_response()
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/out", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, url)
    }

    /// Every POST so far, as JSON, with whether its signature is valid.
    fn bodies(&self) -> Vec<(Value, bool)> {
        self.posts
            .lock()
            .unwrap()
            .iter()
            .map(|(headers, body)| {
                let ts = headers["x-agentbus-timestamp"].to_str().unwrap();
                let signature = headers["x-agentbus-signature"].to_str().unwrap();
                (
                    serde_json::from_slice(body).unwrap(),
                    sign(ts, body) == signature,
                )
            })
            .collect()
    }

    /// Waits for a POST whose body matches.
    async fn wait_for(&self, what: &str, matches: impl Fn(&Value) -> bool) -> (Value, bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let arrived = self.arrived.notified();
            if let Some(found) = self.bodies().into_iter().find(|(b, _)| matches(b)) {
                return found;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !left.is_zero(),
                "never POSTed: {what}; got {:?}",
                self.bodies()
            );
            let _ = tokio::time::timeout(left, arrived).await;
        }
    }
}

/// POSTs `body` to the webhook of `account`, signed with `signature` (the right one when
/// `None`); returns the status and the JSON answer.
async fn post(port: u16, account: &str, body: &[u8], signature: Option<&str>) -> (u16, Value) {
    let ts = now();
    let signature = signature.map_or_else(|| sign(&ts, body), str::to_owned);
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/bridges/webhook/{account}"))
        .header("content-type", "application/json")
        .header("x-agentbus-timestamp", ts)
        .header("x-agentbus-signature", signature)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Announces a 2 MiB body and sends none of it: the answer's status line, which comes
/// without the body being read.
async fn oversized(port: u16) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head = format!(
        "POST /bridges/webhook/shop HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        2 * 1024 * 1024
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).await.unwrap();
    line.trim_end().to_owned()
}

fn message(id: &str, text: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id,
        "chat": { "id": "c-1", "name": "Orders" },
        "sender": { "id": "U42", "name": "Ursula" },
        "text": text,
    }))
    .unwrap()
}

/// agentbus with the webhook account `shop` (bound to damon, inviting `follower`) on a
/// listener of its own; returns it running, and that listener's port.
async fn shop_bridge(llm_url: &str, outbound_url: &str, follower: &Human) -> (Agentbus, u16) {
    let port = support::free_port();
    let dir = Agentbus::write_config(llm_url);
    let path = dir.path().join("agentbus.yaml");
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!(
            "{config}\nbridges:\n  listen: \"127.0.0.1:{port}\"\n  webhook:\n    accounts:\n      \
             shop: {{ secret_env: AGENTBUS_E2E_WEBHOOK_SECRET, outbound_url: \"{outbound_url}\", \
             agent: damon, invite: [\"{}\"] }}\n",
            follower.user_id
        ),
    )
    .unwrap();
    let mut bus = Agentbus::configured(dir);
    bus.set_env("AGENTBUS_E2E_WEBHOOK_SECRET", SECRET);
    bus.spawn().await;
    bus.wait_log(&["bridges listening"]).await;
    (bus, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_chat_is_a_portal_where_the_bound_agent_answers_and_both_sides_go_out_once() {
    let _one_at_a_time = exclusive().await;
    // Slow: the answer streams as a message and its edits; only the final text goes out.
    let llm = LlmStub::start(LlmMode::Slow).await;
    let (receiver, outbound_url) = Receiver::start().await;
    let alice = Human::new("alice").await;
    let (_bus, port) = shop_bridge(&llm.url, &outbound_url, &alice).await;

    // Bad input first: none of it may reach Matrix.
    let (status, answer) = post(port, "nobody", &message("x-1", "lost"), None).await;
    assert_eq!(status, 404, "{answer}");
    let forged = message("x-2", "forged message");
    let (status, answer) = post(port, "shop", &forged, Some(&sign(&now(), b"{}"))).await;
    assert_eq!(status, 401, "{answer}");
    assert_eq!(answer["error"], "wrong X-Agentbus-Signature");
    let (status, answer) = post(port, "shop", br#"{"id":"x-3","text":"no chat"}"#, None).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("chat"),
        "the reason names what is missing: {answer}"
    );
    assert_eq!(oversized(port).await, "HTTP/1.1 413 Payload Too Large");

    // A signed message, delivered twice.
    let first = message("m-1", "hello from the shop");
    let (status, answer) = post(port, "shop", &first, None).await;
    assert_eq!((status, &answer["status"]), (200, &json!("accepted")));
    let (status, answer) = post(port, "shop", &first, None).await;
    assert_eq!((status, &answer["status"]), (200, &json!("duplicate")));

    // The portal invites the account's follower; it carries the m.bridge state.
    let portal = alice.join_next_invite(&[]).await;
    let state_key = "io.agentbus://webhook/shop/c-1";
    let url = format!(
        "{}/_matrix/client/v3/rooms/{portal}/state/m.bridge/{}",
        support::synapse().url,
        state_key.replace(':', "%3A").replace('/', "%2F")
    );
    let bridge: Value = reqwest::Client::new()
        .get(url)
        .bearer_auth(&alice.access_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(bridge["bridgebot"], format!("@agentbus:{SERVER_NAME}"));
    assert_eq!(bridge["protocol"]["id"], "webhook");
    assert_eq!(bridge["network"]["id"], "shop");
    assert_eq!(bridge["channel"]["id"], "c-1");
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
    assert_eq!(name["name"], "Orders", "the portal is named after the chat");

    // The puppet posted it; damon, the account's agent, answers without a mention.
    let puppet = format!("@_bridge_webhook__u42:{SERVER_NAME}");
    let said = alice
        .wait_for("the puppet's message", |s| {
            s.room_id == portal && s.sender.as_str() == puppet && s.body() == "hello from the shop"
        })
        .await;
    let members = alice
        .client
        .get_room(&portal)
        .unwrap()
        .get_member(&said.sender)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(members.display_name(), Some("Ursula"));
    let answer = alice
        .wait_for("damon's answer in the portal", |s| {
            s.room_id == portal && s.sender == agent_id("damon") && s.edits().is_none()
        })
        .await;
    assert_eq!(
        answer.content["io.agentbus.streaming"], true,
        "the answer streams, so the relay must wait for its final edit"
    );
    let answer = alice.wait_final(&answer).await;
    assert!(
        answer.body().contains("hello from the shop"),
        "{}",
        answer.body()
    );

    // The answer goes out signed, after the receiver's 429 was waited out.
    let (out, signed) = receiver
        .wait_for("damon's answer", |b| b["sender"]["id"] == "damon")
        .await;
    assert!(
        signed,
        "the outbound POST is signed with the account's secret"
    );
    assert_eq!(out["text"], answer.body());
    assert_eq!(out["id"], answer.event_id.as_str());
    assert_eq!(out["chat"]["id"], "c-1");
    assert_eq!(out["sender"]["name"], "Damon");

    // A Matrix person in the portal is relayed with their name.
    alice.send(&portal, "I'll take this one").await;
    let (relayed, signed) = receiver
        .wait_for("alice's relayed message", |b| {
            b["text"]
                .as_str()
                .is_some_and(|t| t.ends_with(": I'll take this one"))
        })
        .await;
    assert!(signed);
    assert_eq!(
        relayed["text"],
        format!("{}: I'll take this one", alice.localpart)
    );
    assert_eq!(relayed["sender"]["id"], alice.user_id.as_str());
    // One account's messages go out in order, so damon's answer is done by now: sent
    // once, after one refused attempt, and not again for its final edit.
    let posts = receiver.bodies();
    let answers: Vec<_> = posts
        .iter()
        .filter(|(b, _)| b["id"] == answer.event_id.as_str())
        .collect();
    assert_eq!(
        answers.len(),
        2,
        "a 429, then the accepted retry: {posts:?}"
    );
    assert_eq!(answers[0].0, answers[1].0, "the retry is the same message");

    // A later message from the shop, as a sentinel: everything before it has arrived.
    let (status, _) = post(port, "shop", &message("m-2", "second from the shop"), None).await;
    assert_eq!(status, 200);
    alice
        .wait_for("the second message", |s| {
            s.room_id == portal && s.body() == "second from the shop"
        })
        .await;
    let seen = alice.seen(|s| s.room_id == portal);
    let bodies: Vec<&str> = seen.iter().map(|s| s.body()).collect();
    assert_eq!(
        bodies
            .iter()
            .filter(|b| **b == "hello from the shop")
            .count(),
        1,
        "the redelivered message was posted once: {bodies:?}"
    );
    assert!(
        !bodies
            .iter()
            .any(|b| b.contains("forged") || b.contains("lost") || b.contains("no chat")),
        "nothing refused was posted: {bodies:?}"
    );
    // No puppet's message went back out to the platform it came from.
    let posts = receiver.bodies();
    assert!(
        !posts.iter().any(|(b, _)| b["sender"]["id"] != "damon"
            && b["text"]
                .as_str()
                .is_some_and(|t| t.contains("from the shop"))),
        "{posts:?}"
    );
}

/// A message the platform was told is accepted, and then agentbus dies (SIGKILL) before
/// it reached Matrix — the homeserver is down, so it cannot have: after the restart it is
/// posted, once, and answered; the platform's redelivery of it posts nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_acknowledged_before_a_crash_is_posted_once_after_the_restart() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let (receiver, outbound_url) = Receiver::start().await;
    let alice = Human::new("alice").await;
    let (mut bus, port) = shop_bridge(&llm.url, &outbound_url, &alice).await;

    let down = support::synapse().take_down().await;
    let said = message("crash-1", "said just before the crash");
    let (status, answer) = post(port, "shop", &said, None).await;
    assert_eq!((status, &answer["status"]), (200, &json!("accepted")));
    bus.kill().await;
    down.bring_up().await;
    bus.spawn().await;
    bus.wait_log(&["bridges listening"]).await;

    let (status, answer) = post(port, "shop", &said, None).await;
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("duplicate")),
        "the record survived the crash"
    );
    let portal = alice.join_next_invite(&[]).await;
    alice
        .wait_for("the message from before the crash", |s| {
            s.room_id == portal && s.body() == "said just before the crash"
        })
        .await;
    let (out, _) = receiver
        .wait_for("damon's answer to it", |b| {
            b["sender"]["id"] == "damon"
                && b["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("said just before the crash"))
        })
        .await;
    assert_eq!(out["chat"]["id"], "c-1");

    // A later message as a sentinel: the first is in the portal once.
    let (status, _) = post(port, "shop", &message("crash-2", "after the restart"), None).await;
    assert_eq!(status, 200);
    alice
        .wait_for("the sentinel", |s| {
            s.room_id == portal && s.body() == "after the restart"
        })
        .await;
    let bodies: Vec<String> = alice
        .seen(|s| s.room_id == portal)
        .iter()
        .map(|s| s.body().to_owned())
        .collect();
    assert_eq!(
        bodies
            .iter()
            .filter(|b| *b == "said just before the crash")
            .count(),
        1,
        "{bodies:?}"
    );
}
