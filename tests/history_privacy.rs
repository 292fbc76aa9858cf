//! History visibility end to end on a real Synapse: what an agent is given for a turn
//! (its session's memory, `search_room_history`'s results) holds only what everyone who
//! will read the answer may read of the room's history (`m.room.history_visibility` and
//! each member's join). A newcomer to a `joined` room is not told what was said before
//! they joined; in a `shared` room they are, and a line keeps the visibility it was sent
//! under when the room's setting changes later.
//!
//! Spec: <https://spec.matrix.org/v1.18/client-server-api/#history-visibility>

mod support;

use matrix_sdk::ruma::api::client::room::create_room::v3::{
    Request as CreateRoomRequest, RoomPreset,
};
use matrix_sdk::ruma::events::InitialStateEvent;
use matrix_sdk::ruma::events::room::history_visibility::{
    HistoryVisibility, RoomHistoryVisibilityEventContent,
};
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId};
use serde_json::Value;
use support::{Agentbus, Human, LlmMode, LlmStub, Seen, agent_id, content_text, exclusive};

/// A group room of `owner`'s with damon in it, created with `visibility` in its initial
/// state (so agentbus never sees that event: it has to ask the homeserver).
async fn room_with_damon(owner: &Human, visibility: HistoryVisibility) -> OwnedRoomId {
    let mut request = CreateRoomRequest::new();
    request.invite = vec![agent_id("damon")];
    request.preset = Some(RoomPreset::PrivateChat);
    request.name = Some("history privacy".to_owned());
    request.initial_state = vec![
        InitialStateEvent::with_empty_state_key(RoomHistoryVisibilityEventContent::new(visibility))
            .to_raw_any(),
    ];
    let room = owner
        .client
        .create_room(request)
        .await
        .unwrap()
        .room_id()
        .to_owned();
    owner.wait_joined(&room, &agent_id("damon")).await;
    room
}

/// `who` asks damon `text` in `room`; returns damon's finished answer and every model
/// request the turn made (one per model call).
async fn ask(llm: &LlmStub, who: &Human, room: &OwnedRoomId, text: &str) -> (Seen, Vec<Value>) {
    let before = llm.requests().len();
    let question: OwnedEventId = who.send(room, text).await;
    let first = who.wait_reply(room, "damon", &question).await;
    let answer = who.wait_final(&first).await;
    (answer, llm.requests()[before..].to_vec())
}

/// Every text a model request carries: the messages (tool results included) and the
/// arguments of the tool calls it asked for.
fn texts(requests: &[Value]) -> String {
    let mut all = String::new();
    for request in requests {
        for message in request["messages"].as_array().unwrap() {
            all.push_str(&content_text(message));
            all.push('\n');
        }
    }
    all
}

/// The tool results the model was given in `requests`.
fn tool_results(requests: &[Value]) -> Vec<String> {
    requests
        .iter()
        .flat_map(|r| r["messages"].as_array().unwrap().clone())
        .filter(|m| m["role"] == "tool")
        .map(|m| content_text(&m))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_to_a_joined_room_is_not_given_what_was_said_before_they_joined() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let _bus = Agentbus::start(&llm.url).await;
    let alice = Human::new("alice").await;
    let room = room_with_damon(&alice, HistoryVisibility::Joined).await;

    let (answer, asked) = ask(&llm, &alice, &room, "@damon the secret word is tangerine").await;
    assert!(answer.body().contains("tangerine"), "{}", answer.body());
    assert!(texts(&asked).contains("tangerine"));

    // Bob joins later: through Matrix he cannot read Alice's line.
    let bob = Human::new("bob").await;
    alice.bring_in(&room, &bob).await;
    let (answer, asked) = ask(&llm, &bob, &room, "@damon what is the secret word?").await;
    assert_eq!(asked.len(), 1);
    let given = texts(&asked);
    assert!(
        given.contains("what is the secret word?"),
        "the request is Bob's turn: {given}"
    );
    assert!(
        !given.contains("tangerine"),
        "Bob's turn was given what he may not read: {given}"
    );
    assert!(!answer.body().contains("tangerine"), "{}", answer.body());

    // Nor does the history tool find it for him, though it finds what he may read.
    llm.set_mode(LlmMode::Search("secret"));
    let (answer, asked) = ask(&llm, &bob, &room, "@damon look it up").await;
    assert_eq!(asked.len(), 2, "a tool offer and the round trip");
    let results = tool_results(&asked);
    assert_eq!(results.len(), 1, "{results:?}");
    assert!(
        results[0].contains("what is the secret word?"),
        "the search ran and found Bob's own line: {}",
        results[0]
    );
    assert!(!texts(&asked).contains("tangerine"), "{}", texts(&asked));
    assert!(!answer.body().contains("tangerine"), "{}", answer.body());

    // Bob reads every answer in the room, so Alice asking in front of him is not given
    // the line either.
    llm.set_mode(LlmMode::Answer);
    let (_, asked) = ask(&llm, &alice, &room, "@damon remind me of the word").await;
    assert!(!texts(&asked).contains("tangerine"), "{}", texts(&asked));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_shared_room_a_newcomer_is_given_the_history_sent_while_it_was_shared() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let _bus = Agentbus::start(&llm.url).await;
    let alice = Human::new("alice").await;
    let room = room_with_damon(&alice, HistoryVisibility::Shared).await;

    ask(&llm, &alice, &room, "@damon the secret word is tangerine").await;
    let bob = Human::new("bob").await;
    alice.bring_in(&room, &bob).await;

    // The control: in a shared room Bob may read it all, and the agent remembers it.
    let (_, asked) = ask(&llm, &bob, &room, "@damon what is the secret word?").await;
    assert!(texts(&asked).contains("tangerine"), "{}", texts(&asked));
    llm.set_mode(LlmMode::Search("secret"));
    let (_, asked) = ask(&llm, &bob, &room, "@damon look it up").await;
    let results = tool_results(&asked);
    assert!(
        results.iter().any(|r| r.contains("tangerine")),
        "{results:?}"
    );

    // Alice makes the room `joined` from here on (a state event agentbus sees arrive):
    // what is said now is hidden from later newcomers, what was said while it was shared
    // is not.
    alice
        .client
        .get_room(&room)
        .unwrap()
        .send_state_event(RoomHistoryVisibilityEventContent::new(
            HistoryVisibility::Joined,
        ))
        .await
        .unwrap();
    llm.set_mode(LlmMode::Answer);
    ask(&llm, &alice, &room, "@damon the password is persimmon").await;
    let carol = Human::new("carol").await;
    alice.bring_in(&room, &carol).await;
    let (_, asked) = ask(&llm, &carol, &room, "@damon what is the password?").await;
    let given = texts(&asked);
    assert!(given.contains("what is the password?"), "{given}");
    assert!(!given.contains("persimmon"), "{given}");
    assert!(given.contains("tangerine"), "{given}");
    llm.set_mode(LlmMode::Search("is"));
    let (_, asked) = ask(&llm, &carol, &room, "@damon look it up").await;
    let results = tool_results(&asked).join("\n");
    assert!(results.contains("tangerine"), "{results}");
    assert!(!results.contains("persimmon"), "{results}");
}
