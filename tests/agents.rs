//! The agent runtime end to end on a real Synapse: streamed answers (a message plus edits),
//! a tool round trip, an image to a vision model and to a text-only one, a busy session
//! that queues, one clear notice for an outage, memory that survives a restart, `!reset`.

mod support;

use matrix_sdk::ruma::events::room::message::{
    ImageMessageEventContent, MessageType, RoomMessageEventContent,
};
use serde_json::{Value, json};
use support::{Agentbus, Human, LlmMode, LlmStub, OPEN_DMS, STREAMING, content_text, exclusive};

/// The messages of model request `n`, as (role, text).
fn conversation(request: &Value) -> Vec<(String, String)> {
    request["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap().to_owned(), content_text(m)))
        .collect()
}

fn said(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(r, t)| (r.to_string(), t.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_is_one_message_finished_by_edits() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Slow).await;
    let _bus = Agentbus::start(&llm.url).await;
    let ivy = Human::new("ivy").await;
    let dm = ivy.dm_with("damon").await;

    let question = ivy
        .send(&dm, "please explain **streaming** in a few short words")
        .await;
    let first = ivy.wait_first_reply(&dm, "damon", &question).await;
    assert_eq!(first.content[STREAMING], true, "{}", first.content);
    let expected = "[damon-model] please explain **streaming** in a few short words";
    assert!(
        expected.starts_with(first.body()) && first.body().len() < expected.len(),
        "the first post carries the first words only: {:?}",
        first.body()
    );
    let last = ivy.wait_final(&first).await;
    assert_eq!(last.body(), expected);
    assert_eq!(
        last.content["formatted_body"],
        "[damon-model] please explain <strong>streaming</strong> in a few short words"
    );
    assert_eq!(last.content["m.mentions"]["user_ids"], json!([ivy.user_id]));

    let edits = ivy.edits_of(&first.event_id);
    assert!(!edits.is_empty());
    for edit in &edits {
        assert_eq!(edit.sender, first.sender);
        assert!(
            edit.body().starts_with("* "),
            "edit fallback: {}",
            edit.body()
        );
        assert_eq!(edit.content["m.mentions"], json!({}), "edits ping nobody");
    }
    // Exactly one message: everything else was an edit of it.
    let from_damon = ivy.seen(|s| s.room_id == dm && s.sender == first.sender);
    assert_eq!(from_damon.len(), 1 + edits.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_round_trip_answers_with_the_tool_result() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let _bus = Agentbus::start(&llm.url).await;
    let jack = Human::new("jack").await;
    let dm = jack.dm_with("coder").await;
    let earlier = jack
        .send(&dm, "the deploy password rotates on fridays")
        .await;
    jack.wait_reply(&dm, "coder", &earlier).await;

    llm.set_mode(LlmMode::Tools);
    let question = jack.send(&dm, "fridays").await;
    let reply = jack.wait_reply(&dm, "coder", &question).await;
    assert!(
        reply.body().starts_with("[coder-model] tool said: ")
            && reply
                .body()
                .contains("the deploy password rotates on fridays"),
        "{}",
        reply.body()
    );

    let requests = llm.requests();
    let (offer, round_trip) = (&requests[1], &requests[2]);
    let tools: Vec<&str> = offer["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert!(tools.contains(&"search_room_history"), "{tools:?}");
    let messages = round_trip["messages"].as_array().unwrap();
    let asked = &messages[messages.len() - 2];
    assert_eq!(asked["role"], "assistant");
    assert_eq!(asked["tool_calls"][0]["id"], "call_stub");
    assert_eq!(
        asked["tool_calls"][0]["function"]["arguments"],
        json!({"query": "fridays"}).to_string(),
        "fragments merged"
    );
    let result = &messages[messages.len() - 1];
    assert_eq!(result["role"], "tool");
    assert_eq!(result["tool_call_id"], "call_stub");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_reaches_a_vision_model_and_a_text_model_says_it_cannot_see() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let _bus = Agentbus::start(&llm.url).await;
    let kim = Human::new("kim").await;
    let png: Vec<u8> = b"\x89PNG\r\n\x1a\n fake but faithful bytes".to_vec();
    let upload = kim
        .client
        .media()
        .upload(&"image/png".parse().unwrap(), png.clone(), None)
        .await
        .unwrap();
    let image = || {
        let mut content =
            ImageMessageEventContent::plain("cat.png".into(), upload.content_uri.clone());
        content.info = Some(Box::new(matrix_sdk::ruma::events::room::ImageInfo::new()));
        if let Some(info) = content.info.as_mut() {
            info.mimetype = Some("image/png".into());
        }
        RoomMessageEventContent::new(MessageType::Image(content))
    };

    // damon-model is listed with input: [text, image].
    let dm = kim.dm_with("damon").await;
    let sent = kim.send_content(&dm, image()).await;
    let reply = kim.wait_reply(&dm, "damon", &sent).await;
    assert_eq!(reply.body(), "[damon-model] [image: cat.png]");
    let request = llm.requests().pop().unwrap();
    let parts = request["messages"].as_array().unwrap().last().unwrap()["content"].clone();
    use base64::Engine as _;
    let data_url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png)
    );
    assert!(
        parts
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["type"] == "image_url" && p["image_url"]["url"] == data_url.as_str()),
        "{parts}"
    );

    // coder-model is not listed, so it reads text only.
    let requests_before = llm.requests().len();
    let dm = kim.dm_with("coder").await;
    let sent = kim.send_content(&dm, image()).await;
    let notice = kim.wait_reply(&dm, "coder", &sent).await;
    assert_eq!(notice.content["msgtype"], "m.notice");
    assert!(
        notice.body().contains("reads text only"),
        "{}",
        notice.body()
    );
    assert_eq!(llm.requests().len(), requests_before, "no model was asked");

    // researcher-model reads text only, but researcher has image_model: stub/damon-model.
    let dm = kim.dm_with("researcher").await;
    let sent = kim.send_content(&dm, image()).await;
    let reply = kim.wait_reply(&dm, "researcher", &sent).await;
    assert_eq!(reply.body(), "[damon-model] [image: cat.png]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_session_queues_the_second_message_and_answers_both_in_order() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Hang).await;
    let bus = Agentbus::start(&llm.url).await;
    let lena = Human::new("lena").await;
    let dm = lena.dm_with("researcher").await;

    let first = lena.send(&dm, "first question").await;
    llm.wait_for_requests(1).await;
    let second = lena.send(&dm, "second question").await;
    // The second waits for the first run: no second request while the model hangs.
    bus.wait_log(&["queued for the agent", second.as_str()])
        .await;
    assert_eq!(llm.requests().len(), 1, "one run at a time per session");

    // researcher has queue_limit: 2, so a fourth message finds the queue full.
    let third = lena.send(&dm, "third question").await;
    let fourth = lena.send(&dm, "fourth question").await;
    let busy = lena.wait_reply(&dm, "researcher", &fourth).await;
    assert_eq!(busy.content["msgtype"], "m.notice");
    assert!(busy.body().contains("is busy"), "{}", busy.body());

    llm.set_mode(LlmMode::Answer);
    let a1 = lena.wait_reply(&dm, "researcher", &first).await;
    let a2 = lena.wait_reply(&dm, "researcher", &second).await;
    assert_eq!(a1.body(), "[researcher-model] first question");
    assert_eq!(a2.body(), "[researcher-model] second question");
    let a3 = lena.wait_reply(&dm, "researcher", &third).await;
    let order: Vec<String> = lena
        .seen(|s| s.room_id == dm && s.edits().is_none() && s.sender == a1.sender)
        .iter()
        .filter(|s| s.event_id != busy.event_id)
        .map(|s| s.event_id.to_string())
        .collect();
    assert_eq!(
        order,
        [
            a1.event_id.to_string(),
            a2.event_id.to_string(),
            a3.event_id.to_string()
        ]
    );
    // The second turn remembers the first.
    let requests = llm.requests();
    assert_eq!(requests.len(), 3, "the refused fourth reached no model");
    assert_eq!(
        conversation(&requests[1]),
        said(&[
            ("user", "first question"),
            ("assistant", "[researcher-model] first question"),
            ("user", "second question"),
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_ends_in_one_clear_notice() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Fail).await;
    let bus = Agentbus::start(&llm.url).await;
    let max = Human::new("max").await;
    let dm = max.dm_with("damon").await;

    let question = max.send(&dm, "are you up?").await;
    let notice = max.wait_reply(&dm, "damon", &question).await;
    assert_eq!(notice.content["msgtype"], "m.notice");
    assert_eq!(
        notice.body(),
        "⚠️ Damon could not answer: stub/damon-model: the model provider answered 500 Internal Server Error (the provider failed)."
    );
    // `llm.retries: 1` in the test config: two tries, then the notice.
    assert_eq!(llm.requests().len(), 2);
    let sentinel_llm = llm.clone();
    sentinel_llm.set_mode(LlmMode::Answer);
    let sentinel = max.send(&dm, "now?").await;
    max.wait_reply(&dm, "damon", &sentinel).await;
    let answers = max.seen(|s| s.in_reply_to() == Some(question.as_str()));
    assert_eq!(answers.len(), 1, "one notice, nothing else");
    assert!(
        bus.log().contains("model attempt failed"),
        "each try is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_survives_a_restart_and_reset_clears_it() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let mut bus = Agentbus::start(&llm.url).await;
    let nora = Human::new("nora").await;
    let dm = nora.dm_with("coder").await;

    let first = nora.send(&dm, "my project is called bluebird").await;
    nora.wait_reply(&dm, "coder", &first).await;
    bus.restart().await;
    let second = nora.send(&dm, "what is my project called?").await;
    nora.wait_reply(&dm, "coder", &second).await;
    assert_eq!(
        conversation(&llm.requests().pop().unwrap()),
        said(&[
            ("user", "my project is called bluebird"),
            ("assistant", "[coder-model] my project is called bluebird"),
            ("user", "what is my project called?"),
        ])
    );

    let reset = nora.send(&dm, "!reset").await;
    let notice = nora.wait_reply(&dm, "coder", &reset).await;
    assert_eq!(notice.content["msgtype"], "m.notice");
    assert!(notice.body().contains("forgotten"), "{}", notice.body());
    let third = nora.send(&dm, "hello again").await;
    nora.wait_reply(&dm, "coder", &third).await;
    assert_eq!(
        conversation(&llm.requests().pop().unwrap()),
        said(&[("user", "hello again")])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_model_still_starting_gets_a_warming_up_notice_then_answers() {
    let _one_at_a_time = exclusive().await;
    // A port nothing listens on yet: the local model server is still starting.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let mut bus = Agentbus::configured(Agentbus::write_config_full(&url, OPEN_DMS, "warmup: true"));
    bus.spawn().await;
    let olga = Human::new("olga").await;
    let dm = olga.dm_with("damon").await;

    let early = olga.send(&dm, "are you there yet?").await;
    let notice = olga.wait_reply(&dm, "damon", &early).await;
    assert_eq!(notice.content["msgtype"], "m.notice");
    assert_eq!(
        notice.body(),
        "⏳ Damon's model is still warming up (the local model server is starting). Please try again in a minute."
    );

    let llm = LlmStub::start_on(port, LlmMode::Answer).await;
    let later = olga.send(&dm, "and now?").await;
    let reply = olga.wait_reply(&dm, "damon", &later).await;
    assert_eq!(reply.body(), "[damon-model] and now?");
    assert_eq!(llm.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_queue_collect_messages_that_wait_become_one_turn() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Hang).await;
    let bus = Agentbus::start(&llm.url).await;
    let pia = Human::new("pia").await;
    // coder has queue: collect in the test config.
    let dm = pia.dm_with("coder").await;

    let first = pia.send(&dm, "look at main.rs").await;
    llm.wait_for_requests(1).await;
    let second = pia.send(&dm, "and lib.rs").await;
    let third = pia.send(&dm, "and the tests").await;
    // Both wait in the session's queue before the model answers the first.
    bus.wait_log(&["queued for the agent", third.as_str()])
        .await;
    llm.set_mode(LlmMode::Answer);

    pia.wait_reply(&dm, "coder", &first).await;
    let together = pia.wait_reply(&dm, "coder", &third).await;
    // The stub answers the last message it was sent.
    assert_eq!(together.body(), "[coder-model] and the tests");
    let requests = llm.requests();
    assert_eq!(requests.len(), 2, "two turns for three messages");
    // One model call for both, each message a chat message of its own.
    let asked = conversation(&requests[1]);
    assert_eq!(
        asked[asked.len() - 2..],
        [
            ("user".to_owned(), "and lib.rs".to_owned()),
            ("user".to_owned(), "and the tests".to_owned())
        ]
    );
    // A sentinel: once answered, nothing else is on its way to the second message.
    let sentinel = pia.send(&dm, "thanks").await;
    pia.wait_reply(&dm, "coder", &sentinel).await;
    assert!(
        pia.seen(|s| s.in_reply_to() == Some(second.as_str()))
            .is_empty()
    );
}
