//! End to end: a real Synapse, the real `agentbus` binary, real human users (matrix-sdk)
//! and a wire-level model stub. Each test asserts what a person would see in the room.

mod support;

use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use serde_json::json;
use support::{Agentbus, Human, LlmMode, LlmStub, agent_id, exclusive, hs_token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dm_gets_a_reply_that_points_at_the_message_with_context() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let _bus = Agentbus::start(&llm.url).await;
    let alice = Human::new("alice").await;
    let dm = alice.dm_with("damon").await;

    let first = alice.send(&dm, "hello damon").await;
    let reply = alice.wait_reply(&dm, "damon", &first).await;
    assert_eq!(reply.body(), "[damon-model] hello damon");
    assert_eq!(reply.content["msgtype"], "m.text");
    assert_eq!(
        reply.content["m.mentions"]["user_ids"],
        json!([alice.user_id])
    );

    // The earlier exchange is sent along as context, after the system prompt.
    let second = alice.send(&dm, "and again").await;
    alice.wait_reply(&dm, "damon", &second).await;
    let last = llm.requests().pop().unwrap();
    assert_eq!(
        last["messages"],
        json!([
            {"role": "system", "content": "You are Damon."},
            {"role": "user", "content": "hello damon"},
            {"role": "assistant", "content": "[damon-model] hello damon"},
            {"role": "user", "content": "and again"},
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_group_only_the_mentioned_agent_answers() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let _bus = Agentbus::start(&llm.url).await;
    let bob = Human::new("bob").await;
    let room = bob.create_room(&["damon", "coder"], false).await;
    bob.wait_joined(&room, &agent_id("damon")).await;
    bob.wait_joined(&room, &agent_id("coder")).await;

    let unaddressed = bob.send(&room, "morning all, nobody in particular").await;
    let question = bob.send(&room, "@coder can you look at the build?").await;
    let reply = bob.wait_reply(&room, "coder", &question).await;
    assert_eq!(
        reply.body(),
        "[coder-model] @coder can you look at the build?"
    );

    // A CJK alias typed without a space, and a sentinel: once damon has answered it, every
    // earlier event in this room has been processed (per-room order).
    let sentinel = bob.send(&room, "请@戴蒙看一下").await;
    bob.wait_reply(&room, "damon", &sentinel).await;
    let agent_messages = bob.seen(|s| {
        s.room_id == room
            && s.edits().is_none()
            && (s.sender == agent_id("damon") || s.sender == agent_id("coder"))
    });
    let summary: Vec<(String, Option<&str>)> = agent_messages
        .iter()
        .map(|s| (s.sender.to_string(), s.in_reply_to()))
        .collect();
    assert_eq!(
        summary,
        [
            (agent_id("coder").to_string(), Some(question.as_str())),
            (agent_id("damon").to_string(), Some(sentinel.as_str())),
        ],
        "nobody answers {unaddressed}, only coder answers the mention"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invited_agent_joins_and_answers_a_pill_mention() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let _bus = Agentbus::start(&llm.url).await;
    let carol = Human::new("carol").await;
    let room = carol.create_room(&[], false).await;
    carol
        .client
        .get_room(&room)
        .unwrap()
        .invite_user_by_id(&agent_id("researcher"))
        .await
        .unwrap();
    carol.wait_joined(&room, &agent_id("researcher")).await;

    let pill = RoomMessageEventContent::text_html(
        "Researcher: find papers",
        r#"<a href="https://matrix.to/#/@researcher:localhost">Researcher</a>: find papers"#,
    );
    let question = carol.send_content(&room, pill).await;
    let reply = carol.wait_reply(&room, "researcher", &question).await;
    assert_eq!(reply.body(), "[researcher-model] Researcher: find papers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_transaction_delivered_twice_is_answered_once() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let bus = Agentbus::start(&llm.url).await;
    let dave = Human::new("dave").await;
    let dm = dave.dm_with("damon").await;

    // An event as the homeserver would deliver it, PUT twice under one txnId.
    let (fake_id, body) = support::delivered_message(&dm, &dave.user_id, "delivered twice");
    let txn_id = support::unique("redelivery-");
    for _ in 0..2 {
        assert_eq!(bus.deliver(&txn_id, &body).await, (200, json!({})));
    }
    dave.wait_reply(&dm, "damon", &fake_id).await;
    let sentinel = dave.send(&dm, "sentinel").await;
    dave.wait_reply(&dm, "damon", &sentinel).await;
    let replies = dave.seen(|s| s.in_reply_to() == Some(fake_id.as_str()));
    assert_eq!(
        replies.len(),
        1,
        "exactly one reply to the redelivered event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_bodies_are_refused_and_journal_nothing() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let bus = Agentbus::start(&llm.url).await;
    let erin = Human::new("erin").await;
    let dm = erin.dm_with("damon").await;

    let (event_id, body) = support::delivered_message(&dm, &erin.user_id, "let me in");
    let url = format!(
        "{}/_matrix/app/v1/transactions/{}",
        bus.url,
        support::unique("t")
    );
    let http = reqwest::Client::new();
    let errcode = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        (
            status,
            response.json::<serde_json::Value>().await.unwrap()["errcode"]
                .as_str()
                .unwrap()
                .to_owned(),
        )
    };
    assert_eq!(
        errcode(http.put(&url).json(&body).send().await.unwrap()).await,
        (401, "M_MISSING_TOKEN".into())
    );
    assert_eq!(
        errcode(
            http.put(&url)
                .bearer_auth("wrong")
                .json(&body)
                .send()
                .await
                .unwrap()
        )
        .await,
        (403, "M_FORBIDDEN".into())
    );
    assert_eq!(
        errcode(
            http.put(format!("{url}?access_token=wrong"))
                .json(&body)
                .send()
                .await
                .unwrap()
        )
        .await,
        (403, "M_FORBIDDEN".into())
    );
    let malformed = http
        .put(&url)
        .bearer_auth(hs_token())
        .header("content-type", "application/json")
        .body("{\"events\": [");
    assert_eq!(
        errcode(malformed.send().await.unwrap()).await,
        (400, "M_NOT_JSON".into())
    );

    // None of that recorded the txnId: the same txnId with the right token is journaled
    // and answered, once.
    let ok = http
        .put(format!("{url}?access_token={}", hs_token()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let reply = erin.wait_reply(&dm, "damon", &event_id).await;
    assert_eq!(reply.body(), "[damon-model] let me in");
    assert_eq!(
        llm.requests().len(),
        1,
        "the refused requests reached no model"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agentbus_answers_every_journaled_message_exactly_once_after_restart() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Hang).await;
    let mut bus = Agentbus::start(&llm.url).await;
    let frank = Human::new("frank").await;
    let mut rooms = Vec::new();
    for agent in ["damon", "coder", "researcher"] {
        rooms.push((agent, frank.dm_with(agent).await));
    }
    let mut asked = Vec::new();
    for (agent, dm) in &rooms {
        asked.push((
            *agent,
            dm.clone(),
            frank.send(dm, &format!("question for {agent}")).await,
        ));
    }
    // A second message queued behind the first in damon's room.
    asked.push((
        "damon",
        rooms[0].1.clone(),
        frank.send(&rooms[0].1, "follow-up for damon").await,
    ));
    // Each room's worker is inside a model call: the events are journaled, none answered.
    llm.wait_for_requests(3).await;
    bus.kill().await;

    llm.set_mode(LlmMode::Answer);
    bus.restart().await;
    for (agent, dm, event) in &asked {
        frank.wait_reply(dm, agent, event).await;
    }
    // Sentinels: once answered, everything before them in each room has been processed.
    for (agent, dm) in &rooms {
        let sentinel = frank.send(dm, "sentinel").await;
        frank.wait_reply(dm, agent, &sentinel).await;
    }
    for (agent, _, event) in &asked {
        let replies = frank.seen(|s| s.in_reply_to() == Some(event.as_str()));
        assert_eq!(
            replies.len(),
            1,
            "{agent} answered {event} {} times",
            replies.len()
        );
    }
    assert!(
        bus.log().contains("replaying journaled events"),
        "the restart replayed the journal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_provider_leaves_a_clear_notice_in_the_room() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Fail).await;
    let _bus = Agentbus::start(&llm.url).await;
    let gina = Human::new("gina").await;
    let dm = gina.dm_with("coder").await;

    let question = gina.send(&dm, "are you there?").await;
    let notice = gina.wait_reply(&dm, "coder", &question).await;
    assert_eq!(notice.content["msgtype"], "m.notice");
    assert_eq!(
        notice.body(),
        "⚠️ Coder could not answer: stub/coder-model: the model provider answered 500 Internal Server Error (the provider failed)."
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_message_gets_a_notice_instead_of_silence() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let bus = Agentbus::start(&llm.url).await;
    let hana = Human::new("hana").await;
    let dm = hana.dm_with("researcher").await;

    // What Element sends in an encrypted room, delivered as the homeserver would.
    let (event_id, mut body) = support::delivered_message(&dm, &hana.user_id, "");
    body["events"][0]["type"] = json!("m.room.encrypted");
    body["events"][0]["content"] = json!({
        "algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AwgAEnACgAkLmt6qF84IK++J7UDH2Za1YVchHyprqTqsg",
        "sender_key": "IlRMeOPX2e0MurIyfWEucYBRVOEEUMrOHqn/8mLqMjA", "session_id": "X3lUlvLELLYxeTx4yOVu6UDpasGEVO0Jbu+QFnm0cKQ",
    });
    assert_eq!(
        bus.deliver(&support::unique("t"), &body).await,
        (200, json!({}))
    );

    let notice = hana.wait_reply(&dm, "researcher", &event_id).await;
    assert_eq!(notice.content["msgtype"], "m.notice");
    assert!(
        notice.body().contains("end-to-end encrypted"),
        "{}",
        notice.body()
    );
    assert!(
        llm.requests().is_empty(),
        "nothing unreadable was sent to the model"
    );
}
