//! Who may make agents speak, end to end: a real Synapse, the real binary, people as
//! matrix-sdk clients. The admission policy (router/admission.rs) is asked on invites
//! and on messages, so no room shape gets an unknown sender answers.

mod support;

use matrix_sdk::ruma::events::Mentions;
use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use support::{
    Agentbus, Human, LlmMode, LlmStub, agent_id, cli_async, content_text, exclusive, pairing_code,
};

/// The models were asked exactly these messages, in order (each request's last line ends
/// with the message; in a group room it names the speaker first).
fn assert_asked(llm: &LlmStub, expected: &[&str]) {
    let asked: Vec<String> = llm
        .requests()
        .iter()
        .map(|r| content_text(r["messages"].as_array().unwrap().last().unwrap()))
        .collect();
    assert_eq!(asked.len(), expected.len(), "{asked:?}");
    for (asked, expected) in asked.iter().zip(expected) {
        assert!(asked.ends_with(expected), "{asked:?} is not {expected:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_sender_gets_pairing_not_answers_in_rooms_of_their_own() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let bus = Agentbus::start_with(&llm.url, "channels: { matrix: { dm_policy: pairing } }").await;
    let eve = Human::new("eve").await;

    // A "direct" room with two agents: both accept the DM invites (an unknown sender may
    // DM an agent to get a code), but it is no DM, and nobody admitted is in it.
    let room = eve.create_room(&["damon", "coder"], true).await;
    eve.wait_joined(&room, &agent_id("damon")).await;
    eve.wait_joined(&room, &agent_id("coder")).await;
    let ask = eve.send(&room, "@damon tell me everything").await;
    let notice = eve.wait_reply(&room, "damon", &ask).await;
    assert_eq!(notice.content["msgtype"], "m.notice", "{}", notice.body());
    let code = pairing_code(notice.body());

    // A DM made a group by a second account of Eve's own.
    let dm = eve.dm_with("researcher").await;
    let eve2 = Human::new("eve2").await;
    eve.bring_in(&dm, &eve2).await;
    let ask = eve.send(&dm, "@researcher dig this up").await;
    let notice = eve.wait_reply(&dm, "researcher", &ask).await;
    assert_eq!(pairing_code(notice.body()), code, "one code per sender");

    // A group invite from Eve is declined, and the reason says why.
    let group = eve.create_room(&["coder"], false).await;
    let left = eve
        .wait_membership(&group, &agent_id("coder"), "leave")
        .await;
    let reason = left["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("may not invite agents into group rooms"),
        "{left}"
    );
    assert!(
        llm.requests().is_empty(),
        "an unknown sender reached the model: {:?}",
        llm.requests()
    );

    // Once an admin approves the code, Eve is answered in her rooms.
    let config = bus.config_path();
    let (status, stdout, stderr) = cli_async(&[
        "--config",
        config.to_str().unwrap(),
        "pairing",
        "approve",
        &code,
    ])
    .await;
    assert_eq!(status, Some(0), "{stdout}{stderr}");
    let ask = eve.send(&room, "@damon now?").await;
    let reply = eve.wait_reply(&room, "damon", &ask).await;
    assert_eq!(reply.body(), "[damon-model] @damon now?");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_can_bring_agents_into_only_so_many_rooms() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let _bus = Agentbus::start_with(
        &llm.url,
        "channels: { matrix: { dm_policy: open, max_rooms_per_sender: 2 } }",
    )
    .await;
    let mallory = Human::new("mallory").await;

    for _ in 0..2 {
        let room = mallory.create_room(&["damon"], false).await;
        mallory.wait_joined(&room, &agent_id("damon")).await;
    }
    let third = mallory.create_room(&["damon"], false).await;
    let left = mallory
        .wait_membership(&third, &agent_id("damon"), "leave")
        .await;
    let reason = left["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("already brought agents into 2 rooms")
            && reason.contains("max_rooms_per_sender"),
        "{left}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_make_every_agent_answer_at_once() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    // Everyone may talk to agents, but nobody is in allow_from: nobody may broadcast.
    let _bus = Agentbus::start_with(&llm.url, "channels: { matrix: { dm_policy: open } }").await;
    let bob = Human::new("bob").await;
    let room = bob
        .create_room(&["damon", "coder", "researcher"], false)
        .await;
    for agent in ["damon", "coder", "researcher"] {
        bob.wait_joined(&room, &agent_id(agent)).await;
    }
    bob.send(&room, "@all what do you all think?").await;
    let mut everyone = RoomMessageEventContent::text_plain("everyone, thoughts?");
    everyone.mentions = Some(Mentions::with_room_mention());
    bob.send_content(&room, everyone).await;
    // Per-room order: once coder answers this, both broadcasts were decided.
    let sentinel = bob.send(&room, "@coder just you").await;
    bob.wait_reply(&room, "coder", &sentinel).await;
    assert_asked(&llm, &["@coder just you"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_rate_limited_per_sender_and_per_room_with_one_notice() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let dir = Agentbus::write_config_with(&llm.url, "channels: { matrix: { dm_policy: open } }");
    let path = dir.path().join("agentbus.yaml");
    let config = std::fs::read_to_string(&path).unwrap().replace(
        "\nrouting:\n",
        "\nrouting:\n  limits: { per_sender: { answers: 2, per: 1h }, per_room: { answers: 3, per: 1h } }\n",
    );
    assert!(
        config.contains("limits:"),
        "the standard config has a routing section"
    );
    std::fs::write(&path, config).unwrap();
    let mut bus = Agentbus::configured(dir);
    bus.spawn().await;
    let alice = Human::new("alice").await;
    let bob = Human::new("bob").await;
    let room = alice.create_room(&["damon"], false).await;
    alice.wait_joined(&room, &agent_id("damon")).await;
    alice.bring_in(&room, &bob).await;

    let mut asked = Vec::new();
    for n in 1..=4 {
        asked.push(alice.send(&room, &format!("@damon question {n}")).await);
    }
    alice.wait_reply(&room, "damon", &asked[1]).await;
    let notice = alice.wait_reply(&room, "damon", &asked[2]).await;
    assert_eq!(notice.content["msgtype"], "m.notice");
    assert!(
        notice.body().contains("routing.limits.per_sender"),
        "{}",
        notice.body()
    );

    // Bob has answers left, the room one: his first is answered, his second is not.
    let first = bob.send(&room, "@damon from bob").await;
    bob.wait_reply(&room, "damon", &first).await;
    let second = bob.send(&room, "@damon again from bob").await;
    let notice = bob.wait_reply(&room, "damon", &second).await;
    assert!(
        notice.body().contains("routing.limits.per_room"),
        "{}",
        notice.body()
    );

    // Alice's fourth message got nothing: one notice per episode.
    assert!(alice.answers_to(&room, "damon", &asked[3]).is_empty());
    assert_asked(
        &llm,
        &["@damon question 1", "@damon question 2", "@damon from bob"],
    );
}
