//! Teams at work in a real room: star, pipeline, broadcast and hybrid tasks against real
//! Synapse and the real binary, with a wire-level model stub scripted per agent (by the
//! model name each agent's requests carry), watched by a matrix-sdk human.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId};
use serde_json::Value;
use support::{
    Agentbus, Human, LlmStub, OPEN_DMS, Script, Scripted, Seen, content_text, exclusive,
};

/// The teams of these tests, after the standard providers and agents.
fn config(llm_url: &str, limits: &str) -> tempfile::TempDir {
    let rest = format!(
        r#"
providers:
  stub: {{ api: openai-completions, base_url: "{llm_url}", timeout: 30s }}
llm: {{ retries: 0 }}
agents:
  - {{ id: damon, display_name: Damon, provider: stub, model: damon-model }}
  - {{ id: coder, display_name: Coder, provider: stub, model: coder-model }}
  - {{ id: researcher, display_name: Researcher, provider: stub, model: researcher-model }}
teams:
  - id: devteam
    display_name: Dev Team
    mode: star
    coordinator: damon
    workers: [coder, researcher]
    limits: {{ {limits} }}
  - id: pipeteam
    display_name: Pipe Team
    mode: pipeline
    stages:
      - {{ name: draft, agent: coder, prompt: "Draft: {{{{input}}}}" }}
      - {{ name: review, agent: researcher, prompt: "Review: {{{{input}}}}", timeout: 20s }}
      - {{ name: polish, agent: damon, prompt: "Polish the draft ({{{{stages.draft}}}}) after review: {{{{input}}}}" }}
  - id: panel
    display_name: Panel
    mode: broadcast
    workers: [coder, researcher]
    # Long enough for the coder's instant answer to make it on a slow machine; the
    # researcher is held back until the summary is out.
    broadcast: {{ timeout: 12s, merger: concat }}
  - id: triage
    display_name: Triage
    mode: hybrid
    coordinator: damon
    workers: [coder, researcher]
    rules:
      - {{ when: "contains_keyword(['project']) AND length > 40", mode: star }}
      - {{ when: "contains_keyword(['compare'])", mode: broadcast }}
    classifier: true
    default_mode: direct
{OPEN_DMS}
"#
    );
    Agentbus::write_config_text(&rest)
}

async fn start(llm: &LlmStub, limits: &str) -> Agentbus {
    let mut bus = Agentbus::configured(config(&llm.url, limits));
    bus.spawn().await;
    bus
}

/// The text of a request's last message.
fn last(messages: &[Value]) -> String {
    messages.last().map(content_text).unwrap_or_default()
}

/// The `Your part: …` line of a worker's prompt.
fn part(prompt: &str) -> String {
    prompt
        .lines()
        .find_map(|l| l.strip_prefix("Your part: "))
        .unwrap_or("?")
        .to_owned()
}

/// The usual team: damon plans a part for each worker and integrates; workers say what
/// they did.
fn answer(model: &str, prompt: &str) -> Scripted {
    if prompt.starts_with("Pick how a team of agents should handle") {
        // Structured output, as the request's schema asks; or, for "hi", a model that
        // ignored it and names no mode.
        let pick = if prompt.contains("which one") {
            r#"{"mode": "broadcast", "reason": "Each worker's view helps the comparison."}"#
        } else {
            "no idea"
        };
        return Scripted::Say(pick.into());
    }
    if prompt.contains("You coordinate it") {
        return Scripted::Say(
            "Splitting it.\n@coder: write the parser\n@researcher: find prior art".into(),
        );
    }
    if prompt.contains("Your team's answers") {
        return Scripted::Say(format!(
            "[{model}] integrated {} answers",
            prompt.matches(" answered:").count()
        ));
    }
    if prompt.contains("Your part: ") {
        return Scripted::Say(format!("[{model}] did: {}", part(prompt)));
    }
    Scripted::Say(format!(
        "[{model}] {}",
        prompt.lines().next().unwrap_or_default()
    ))
}

async fn team_room(human: &Human, team: &str) -> OwnedRoomId {
    let room = human
        .create_room(&[team, "damon", "coder", "researcher"], false)
        .await;
    for user in [team, "damon", "coder", "researcher"] {
        human.wait_joined(&room, &support::agent_id(user)).await;
    }
    room
}

/// Messages in the thread of `root` from `agent` (not edits), in the order seen.
fn in_thread(human: &Human, root: &OwnedEventId, agent: &str) -> Vec<Seen> {
    let agent = support::agent_id(agent);
    human.seen(|s| {
        s.sender == agent
            && s.edits().is_none()
            && s.content["m.relates_to"]["rel_type"] == "m.thread"
            && s.content["m.relates_to"]["event_id"] == root.as_str()
    })
}

/// Waits until the team's status (any version of it) says `text`.
async fn wait_status(human: &Human, team: &str, text: &str) -> Seen {
    let team = support::agent_id(team);
    human
        .wait_for(&format!("{team}'s status saying {text:?}"), |s| {
            s.sender == team
                && (s.content["m.new_content"]["body"]
                    .as_str()
                    .unwrap_or(s.body()))
                .contains(text)
        })
        .await
}

fn requests_of(llm: &LlmStub, model: &str) -> Vec<String> {
    llm.requests()
        .iter()
        .filter(|r| r["model"] == model)
        .map(|r| last(r["messages"].as_array().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn star_hands_off_in_the_open_and_integrates_with_a_failed_worker_reported() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(Script::mode(|model, messages| {
        let prompt = last(messages);
        if model == "researcher-model" {
            return Scripted::Fail;
        }
        answer(model, &prompt)
    }))
    .await;
    let _bus = start(&llm, "").await;
    let ann = Human::new("ann").await;
    let room = team_room(&ann, "devteam").await;

    let request = ann
        .send(&room, "@devteam build a parser for our config")
        .await;
    wait_status(&ann, "devteam", "✅ done").await;

    // Hand-offs: damon, in the thread, mentioning each worker.
    let damon = in_thread(&ann, &request, "damon");
    let handoffs: Vec<&Seen> = damon
        .iter()
        .filter(|s| s.body().contains("could you"))
        .collect();
    assert_eq!(handoffs.len(), 2, "{damon:?}");
    assert_eq!(handoffs[0].body(), "@Coder could you write the parser");
    assert_eq!(
        handoffs[0].content["m.mentions"]["user_ids"][0],
        support::agent_id("coder").as_str()
    );
    assert_eq!(handoffs[1].body(), "@Researcher could you find prior art");
    // The coder answered as itself in the thread; the researcher's failure was reported.
    let coder = in_thread(&ann, &request, "coder");
    assert_eq!(coder.len(), 1);
    let coder = ann.wait_final(&coder[0]).await;
    assert_eq!(coder.body(), "[coder-model] did: write the parser");
    let synthesis_asked = requests_of(&llm, "damon-model")
        .into_iter()
        .find(|p| p.contains("Your team's answers"))
        .expect("damon was asked to integrate");
    assert!(
        synthesis_asked.contains("@coder answered:\n[coder-model] did: write the parser"),
        "{synthesis_asked}"
    );
    assert!(
        synthesis_asked.contains("@researcher did not answer"),
        "{synthesis_asked}"
    );
    // One synthesis, after the hand-offs and the coder's answer.
    let synthesis: Vec<&Seen> = damon
        .iter()
        .filter(|s| !s.body().contains("could you"))
        .collect();
    let synthesis = ann.wait_final(synthesis.last().expect("a synthesis")).await;
    assert_eq!(synthesis.body(), "[damon-model] integrated 1 answers");
    let order: Vec<String> = ann
        .seen(|s| s.edits().is_none() && s.room_id == room)
        .iter()
        .map(|s| s.event_id.to_string())
        .collect();
    let at = |e: &OwnedEventId| order.iter().position(|o| o == e.as_str()).unwrap();
    assert!(at(&handoffs[1].event_id) < at(&coder.event_id));
    assert!(at(&coder.event_id) < at(&synthesis.event_id));
    assert_eq!(
        in_thread(&ann, &request, "damon")
            .iter()
            .filter(|s| !s.body().contains("could you"))
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_killed_in_stage_two_resumes_there_and_never_repeats_stage_one() {
    let _one_at_a_time = exclusive().await;
    let released = Arc::new(AtomicBool::new(false));
    let gate = released.clone();
    let llm = LlmStub::start(Script::mode(move |model, messages| {
        let prompt = last(messages);
        if model == "researcher-model" && !gate.load(Ordering::SeqCst) {
            return Scripted::Hang;
        }
        Scripted::Say(format!("[{model}] {}", prompt.replace('\n', " ")))
    }))
    .await;
    let mut bus = start(&llm, "").await;
    let bo = Human::new("bo").await;
    let room = team_room(&bo, "pipeteam").await;

    let request = bo.send(&room, "@pipeteam a haiku about queues").await;
    wait_status(&bo, "pipeteam", "stage 2/3 review").await;
    llm.wait_for_requests(2).await;
    bus.kill().await;

    released.store(true, Ordering::SeqCst);
    bus.spawn().await;
    wait_status(&bo, "pipeteam", "✅ done").await;

    let draft = requests_of(&llm, "coder-model");
    assert_eq!(
        draft,
        ["Draft: @pipeteam a haiku about queues"],
        "stage 1 ran once"
    );
    let review = requests_of(&llm, "researcher-model");
    assert_eq!(
        review.len(),
        2,
        "stage 2 ran again after the restart: {review:?}"
    );
    assert_eq!(
        review[1],
        "Review: [coder-model] Draft: @pipeteam a haiku about queues"
    );
    let polish = requests_of(&llm, "damon-model");
    assert_eq!(
        polish,
        [
            "Polish the draft ([coder-model] Draft: @pipeteam a haiku about queues) after review: \
          [researcher-model] Review: [coder-model] Draft: @pipeteam a haiku about queues"
        ]
    );
    let finals = in_thread(&bo, &request, "damon");
    assert_eq!(finals.len(), 1);
    assert!(
        bo.wait_final(&finals[0])
            .await
            .body()
            .starts_with("[damon-model] Polish the draft")
    );
    // The status says the task resumed.
    wait_status(&bo, "pipeteam", "resumed after a restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_times_out_stops_the_pipeline_naming_it() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(Script::mode(|model, messages| {
        if model == "researcher-model" {
            return Scripted::Hang;
        }
        Scripted::Say(format!("[{model}] {}", last(messages)))
    }))
    .await;
    // The review stage allows 20 s.
    let _bus = start(&llm, "").await;
    let cy = Human::new("cy").await;
    let room = team_room(&cy, "pipeteam").await;
    let request = cy.send(&room, "@pipeteam summarise the incident").await;
    let ended = cy
        .wait_for("the pipeline's end", |s| {
            s.sender == support::agent_id("pipeteam") && s.body().contains("❌ failed")
        })
        .await;
    assert!(
        ended.body().contains("stage review (2/3)"),
        "{}",
        ended.body()
    );
    assert!(
        ended.body().contains("took longer than 20s"),
        "{}",
        ended.body()
    );
    llm.wait_for_ended(2).await;
    assert!(
        requests_of(&llm, "damon-model").is_empty(),
        "stage 3 never ran"
    );
    assert!(in_thread(&cy, &request, "damon").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_marks_the_slow_answer_late_and_adds_it_when_it_comes() {
    let _one_at_a_time = exclusive().await;
    let released = Arc::new(AtomicBool::new(false));
    let gate = released.clone();
    let script = Script::mode(move |model, messages| {
        if model == "researcher-model" && !gate.load(Ordering::SeqCst) {
            return Scripted::Hang;
        }
        Scripted::Say(format!("[{model}] {}", last(messages)))
    });
    let llm = LlmStub::start(script.clone()).await;
    let _bus = start(&llm, "").await;
    let di = Human::new("di").await;
    let room = team_room(&di, "panel").await;
    let request = di.send(&room, "@panel which queue should we use?").await;

    let summary = di
        .wait_for("the summary", |s| {
            s.sender == support::agent_id("panel") && s.body().starts_with("Answers (")
        })
        .await;
    assert!(
        summary
            .body()
            .starts_with("Answers (1 of 2):\n1. Coder: [coder-model] @panel which queue"),
        "{}",
        summary.body()
    );
    assert!(
        summary.body().contains("https://matrix.to/#/"),
        "links the answer: {}",
        summary.body()
    );
    assert!(
        summary
            .body()
            .contains("⏳ Researcher: no answer yet (late)"),
        "{}",
        summary.body()
    );

    released.store(true, Ordering::SeqCst);
    llm.set_mode(script);
    let late = di.wait_reply(&room, "researcher", &request).await;
    assert_eq!(
        late.body(),
        "[researcher-model] @panel which queue should we use?"
    );
    let edited = di
        .wait_for("the summary with the late answer", |s| {
            s.edits() == Some(summary.event_id.as_str())
                && s.content["m.new_content"]["body"]
                    .as_str()
                    .is_some_and(|b| b.contains("Researcher (late)"))
        })
        .await;
    let body = edited.content["m.new_content"]["body"].as_str().unwrap();
    assert!(!body.contains("no answer yet"), "{body}");
    wait_status(&di, "panel", "✅ done").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_rules_pick_each_mode_and_say_which() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(Script::mode(|model, messages| {
        answer(model, &last(messages))
    }))
    .await;
    let _bus = start(&llm, "").await;
    let ed = Human::new("ed").await;
    let room = team_room(&ed, "triage").await;

    ed.send(
        &room,
        "@triage plan the project for the new billing system please",
    )
    .await;
    wait_status(
        &ed,
        "triage",
        "hybrid → star (rules[0]: contains_keyword(['project']) AND length > 40)",
    )
    .await;
    wait_status(&ed, "triage", "✅ done").await;
    ed.send(&room, "@triage compare sled and fjall").await;
    wait_status(
        &ed,
        "triage",
        "hybrid → broadcast (rules[1]: contains_keyword(['compare']))",
    )
    .await;
    // No rule: the coordinator's model is asked for structured output, and its pick and
    // reason are said.
    ed.send(&room, "@triage which one is faster?").await;
    wait_status(
        &ed,
        "triage",
        "hybrid → broadcast (the coordinator's model chose it: Each worker's view helps the comparison.)",
    )
    .await;
    let asked: Vec<Value> = llm
        .requests()
        .into_iter()
        .filter(|r| last(r["messages"].as_array().unwrap()).contains("which one is faster"))
        .filter(|r| r["model"] == "damon-model")
        .collect();
    assert_eq!(asked.len(), 1, "the classifier was asked once: {asked:?}");
    let format = &asked[0]["response_format"];
    assert_eq!(format["type"], "json_schema", "{format}");
    assert_eq!(format["json_schema"]["strict"], true, "{format}");
    assert_eq!(
        format["json_schema"]["schema"]["properties"]["mode"]["enum"],
        serde_json::json!(["star", "broadcast", "direct"]),
        "only the modes the team can run: {format}"
    );
    assert_eq!(
        format["json_schema"]["schema"]["required"],
        serde_json::json!(["mode", "reason"])
    );
    assert!(asked[0].get("tools").is_none(), "no tools beside a schema");
    // The broadcast's own requests are free text.
    assert!(
        llm.requests()
            .iter()
            .filter(|r| r["model"] != "damon-model")
            .all(|r| r.get("response_format").is_none())
    );
    // A classifier that names no mode leaves it to default_mode.
    let hi = ed.send(&room, "@triage hi").await;
    wait_status(
        &ed,
        "triage",
        "hybrid → direct (no rule matched: default_mode)",
    )
    .await;
    let direct = ed.wait_reply(&room, "damon", &hi).await;
    assert_eq!(direct.body(), "[damon-model] @triage hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_a_stop_reaction_cancel_a_running_star_task_and_close_its_streams() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(Script::mode(|model, messages| {
        let prompt = last(messages);
        if prompt.contains("Your part: ") {
            return Scripted::Hang;
        }
        answer(model, &prompt)
    }))
    .await;
    let _bus = start(&llm, "").await;
    let fay = Human::new("fay").await;
    let room = team_room(&fay, "devteam").await;

    let first = fay.send(&room, "@devteam refactor the store").await;
    wait_status(&fay, "devteam", "star — running: @coder, @researcher").await;
    llm.wait_for_requests(3).await;
    fay.send(&room, "!stop").await;
    let cancelled = wait_status(&fay, "devteam", "🛑 cancelled by").await;
    assert!(
        cancelled.content.to_string().contains(fay.user_id.as_str()),
        "says who stopped it: {}",
        cancelled.content
    );
    // Both workers' model streams were closed.
    llm.wait_for_ended(3).await;
    assert!(
        requests_of(&llm, "damon-model")
            .iter()
            .all(|p| !p.contains("Your team's answers"))
    );
    let _ = first;

    let second = fay.send(&room, "@devteam now the router").await;
    let status = fay
        .wait_for("the second task's status", |s| {
            s.sender == support::agent_id("devteam")
                && s.edits().is_none()
                && s.content["m.relates_to"]["event_id"] == second.as_str()
        })
        .await;
    llm.wait_for_requests(6).await;
    fay.react(&room, &status.event_id, "🛑").await;
    fay.wait_for("the second task cancelled", |s| {
        s.edits() == Some(status.event_id.as_str())
            && s.content["m.new_content"]["body"]
                .as_str()
                .is_some_and(|b| b.contains("🛑 cancelled by"))
    })
    .await;
    llm.wait_for_ended(6).await;
}

/// A model that always hands work on: damon to coder, coder to researcher and back.
fn runaway(model: &str) -> Scripted {
    match model {
        "damon-model" => Scripted::Say("@coder: dig deeper".into()),
        "coder-model" => Scripted::Say("@researcher: dig deeper".into()),
        _ => Scripted::Say("@coder: dig deeper".into()),
    }
}

async fn runaway_ends_with(limits: &str, expected: &str) {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(Script::mode(|model, _| runaway(model))).await;
    let _bus = start(&llm, limits).await;
    let gil = Human::new("gil").await;
    let room = team_room(&gil, "devteam").await;
    gil.send(&room, "@devteam find the bug").await;
    let ended = gil
        .wait_for("the runaway task's end", |s| {
            s.sender == support::agent_id("devteam")
                && s.edits().is_none()
                && s.body().contains("⛔ stopped")
        })
        .await;
    assert!(ended.body().contains(expected), "{}", ended.body());
    let asked = llm.requests().len();
    // Nothing more runs after the end.
    let sentinel = gil.send(&room, "@damon are you there?").await;
    gil.wait_reply(&room, "damon", &sentinel).await;
    assert_eq!(llm.requests().len(), asked + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_agent_turns_ends_a_runaway_task() {
    runaway_ends_with(
        "max_agent_turns: 5, max_depth: 50, ping_pong: 100",
        "5 agent turns reached (limits.max_agent_turns)",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_budget_ends_a_runaway_task() {
    // The stub reports 15 tokens a call: the fourth call passes 50.
    runaway_ends_with(
        "token_budget: 50, max_depth: 50, ping_pong: 100",
        "the token budget of 50 was used up",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_handing_work_to_each_other_stop_at_the_ping_pong_limit() {
    runaway_ends_with(
        "ping_pong: 2, max_depth: 50",
        "@coder and @researcher handed work to each other 2 times (limits.ping_pong)",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_invited_alone_brings_its_members_in() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(Script::mode(|model, messages| {
        answer(model, &last(messages))
    }))
    .await;
    let _bus = start(&llm, "").await;
    let hal = Human::new("hal").await;
    let room = hal.create_room(&["devteam"], false).await;
    hal.wait_joined(&room, &support::agent_id("devteam")).await;

    let request = hal.send(&room, "@devteam write the release notes").await;
    wait_status(&hal, "devteam", "✅ done").await;
    for agent in ["damon", "coder", "researcher"] {
        hal.wait_joined(&room, &support::agent_id(agent)).await;
    }
    let coder = in_thread(&hal, &request, "coder");
    assert_eq!(coder.len(), 1);
    assert_eq!(
        hal.wait_final(&coder[0]).await.body(),
        "[coder-model] did: write the parser"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wall_clock_limit_ends_a_task_whose_workers_hang() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(Script::mode(|model, messages| {
        let prompt = last(messages);
        if prompt.contains("Your part: ") {
            return Scripted::Hang;
        }
        answer(model, &prompt)
    }))
    .await;
    // Long enough for the plan and both hand-offs on a slow machine.
    let _bus = start(&llm, "timeout: 10s").await;
    let ida = Human::new("ida").await;
    let room = team_room(&ida, "devteam").await;
    ida.send(&room, "@devteam port it to wasm").await;
    let ended = ida
        .wait_for("the task's end", |s| {
            s.sender == support::agent_id("devteam")
                && s.edits().is_none()
                && s.body().contains("⏱ timed out")
        })
        .await;
    assert!(
        ended.body().contains("its limit of 10s (limits.timeout)"),
        "{}",
        ended.body()
    );
    // Both hanging workers were stopped (their streams closed), not left to time out.
    llm.wait_for_ended(3).await;
    for (agent, name) in [("coder", "Coder"), ("researcher", "Researcher")] {
        let said = ida
            .wait_for(&format!("{agent} stopped"), |s| {
                s.sender == support::agent_id(agent)
            })
            .await;
        assert_eq!(
            said.body(),
            format!("⏹️ {name} was stopped before answering this.")
        );
    }
    assert!(
        requests_of(&llm, "damon-model")
            .iter()
            .all(|p| !p.contains("Your team's answers"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_star_task_killed_mid_work_reruns_only_the_interrupted_step() {
    let _one_at_a_time = exclusive().await;
    let released = Arc::new(AtomicBool::new(false));
    let gate = released.clone();
    let llm = LlmStub::start(Script::mode(move |model, messages| {
        let prompt = last(messages);
        if model == "coder-model" && !gate.load(Ordering::SeqCst) {
            return Scripted::Hang;
        }
        answer(model, &prompt)
    }))
    .await;
    let mut bus = start(&llm, "").await;
    let jo = Human::new("jo").await;
    let room = team_room(&jo, "devteam").await;
    let request = jo.send(&room, "@devteam audit the journal").await;
    // The researcher answered; the coder hangs.
    jo.wait_for("the researcher's answer", |s| {
        s.sender == support::agent_id("researcher")
    })
    .await;
    bus.kill().await;

    released.store(true, Ordering::SeqCst);
    bus.spawn().await;
    wait_status(&jo, "devteam", "✅ done").await;
    let plans = requests_of(&llm, "damon-model")
        .into_iter()
        .filter(|p| p.contains("You coordinate it"))
        .count();
    assert_eq!(plans, 1, "the plan is not asked for again");
    assert_eq!(
        requests_of(&llm, "researcher-model").len(),
        1,
        "the finished step is not rerun"
    );
    assert_eq!(
        requests_of(&llm, "coder-model").len(),
        2,
        "the interrupted step runs again"
    );
    let synthesis: Vec<Seen> = in_thread(&jo, &request, "damon")
        .into_iter()
        .filter(|s| !s.body().contains("could you"))
        .collect();
    assert_eq!(synthesis.len(), 1, "one synthesis: {synthesis:?}");
    assert_eq!(
        jo.wait_final(&synthesis[0]).await.body(),
        "[damon-model] integrated 2 answers"
    );
    // Each hand-off was posted once, the restart's re-post deduplicated by its transaction ID.
    let handoffs = in_thread(&jo, &request, "damon")
        .into_iter()
        .filter(|s| s.body().contains("could you"))
        .count();
    assert_eq!(handoffs, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_star_task_stopped_gracefully_says_interrupted_then_resumed() {
    let _one_at_a_time = exclusive().await;
    let released = Arc::new(AtomicBool::new(false));
    let gate = released.clone();
    let llm = LlmStub::start(Script::mode(move |model, messages| {
        let prompt = last(messages);
        if model == "coder-model" && !gate.load(Ordering::SeqCst) {
            return Scripted::Hang;
        }
        answer(model, &prompt)
    }))
    .await;
    let mut bus = start(&llm, "").await;
    let kay = Human::new("kay").await;
    let room = team_room(&kay, "devteam").await;
    let request = kay.send(&room, "@devteam tidy the config module").await;
    kay.wait_for("the researcher's answer", |s| {
        s.sender == support::agent_id("researcher")
    })
    .await;
    // SIGTERM while the coder's model hangs: the grace period runs out, the task stays
    // journaled, and its status says so before the process is gone.
    bus.stop().await;
    let interrupted = wait_status(&kay, "devteam", "⏸ interrupted by a restart; it resumes").await;
    assert!(
        in_thread(&kay, &request, "damon")
            .iter()
            .all(|s| s.body().contains("could you")),
        "no synthesis before the restart"
    );

    released.store(true, Ordering::SeqCst);
    bus.spawn().await;
    let resumed = wait_status(&kay, "devteam", "resumed after a restart").await;
    wait_status(&kay, "devteam", "✅ done").await;
    let order: Vec<String> = kay
        .seen(|s| s.room_id == room)
        .iter()
        .map(|s| s.event_id.to_string())
        .collect();
    let at = |e: &OwnedEventId| order.iter().position(|o| o == e.as_str()).unwrap();
    assert!(
        at(&interrupted.event_id) < at(&resumed.event_id),
        "interrupted, then resumed"
    );
    assert_eq!(requests_of(&llm, "researcher-model").len(), 1);
    assert_eq!(requests_of(&llm, "coder-model").len(), 2);
    let synthesis: Vec<Seen> = in_thread(&kay, &request, "damon")
        .into_iter()
        .filter(|s| !s.body().contains("could you"))
        .collect();
    assert_eq!(synthesis.len(), 1, "one synthesis: {synthesis:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_killed_with_one_answer_in_reruns_only_the_missing_one_and_keeps_one_summary() {
    let _one_at_a_time = exclusive().await;
    let released = Arc::new(AtomicBool::new(false));
    let gate = released.clone();
    let llm = LlmStub::start(Script::mode(move |model, messages| {
        if model == "researcher-model" && !gate.load(Ordering::SeqCst) {
            return Scripted::Hang;
        }
        Scripted::Say(format!("[{model}] {}", last(messages)))
    }))
    .await;
    let mut bus = start(&llm, "").await;
    let lu = Human::new("lu").await;
    let room = team_room(&lu, "panel").await;
    let request = lu.send(&room, "@panel which index should we add?").await;
    // The coder answered, the summary is out, the researcher's model still hangs.
    let summary = lu
        .wait_for("the summary", |s| {
            s.sender == support::agent_id("panel") && s.body().starts_with("Answers (")
        })
        .await;
    assert!(
        summary
            .body()
            .contains("⏳ Researcher: no answer yet (late)"),
        "{}",
        summary.body()
    );
    llm.wait_for_requests(2).await;
    bus.kill().await;

    released.store(true, Ordering::SeqCst);
    bus.spawn().await;
    wait_status(&lu, "panel", "✅ done").await;
    assert_eq!(
        requests_of(&llm, "coder-model").len(),
        1,
        "the finished answer is not asked for again"
    );
    assert_eq!(
        requests_of(&llm, "researcher-model").len(),
        2,
        "the interrupted answer is asked for again"
    );
    let late = lu.wait_reply(&room, "researcher", &request).await;
    assert_eq!(
        late.body(),
        "[researcher-model] @panel which index should we add?"
    );
    assert_eq!(
        in_thread(&lu, &request, "coder").len(),
        1,
        "one coder answer"
    );
    let summaries = lu.seen(|s| {
        s.sender == support::agent_id("panel")
            && s.edits().is_none()
            && s.body().starts_with("Answers (")
    });
    assert_eq!(summaries.len(), 1, "one summary: {summaries:?}");
    // The one summary came to hold the late answer.
    let edited = lu
        .wait_for("the summary with the late answer", |s| {
            s.edits() == Some(summary.event_id.as_str())
                && s.content["m.new_content"]["body"]
                    .as_str()
                    .is_some_and(|b| b.contains("Researcher (late)"))
        })
        .await;
    let body = edited.content["m.new_content"]["body"].as_str().unwrap();
    assert!(!body.contains("no answer yet"), "{body}");
    assert_eq!(body.matches("Coder:").count(), 1, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_killed_before_its_summary_reruns_only_the_missing_answer() {
    let _one_at_a_time = exclusive().await;
    let released = Arc::new(AtomicBool::new(false));
    let gate = released.clone();
    let llm = LlmStub::start(Script::mode(move |model, messages| {
        if model == "researcher-model" && !gate.load(Ordering::SeqCst) {
            return Scripted::Hang;
        }
        Scripted::Say(format!("[{model}] {}", last(messages)))
    }))
    .await;
    let mut bus = start(&llm, "").await;
    let mo = Human::new("mo").await;
    let room = team_room(&mo, "panel").await;
    let request = mo.send(&room, "@panel which cache should we keep?").await;
    // The coder's answer is in the task's record; the researcher's model hangs; the
    // summary's timeout (12 s) has not passed.
    bus.wait_log(&["step kept in the task's record", "answer:coder"])
        .await;
    llm.wait_for_requests(2).await;
    bus.kill().await;
    assert!(
        mo.seen(|s| s.sender == support::agent_id("panel") && s.body().starts_with("Answers ("))
            .is_empty(),
        "killed before the summary"
    );

    released.store(true, Ordering::SeqCst);
    bus.spawn().await;
    wait_status(&mo, "panel", "✅ done").await;
    assert_eq!(requests_of(&llm, "coder-model").len(), 1);
    assert_eq!(requests_of(&llm, "researcher-model").len(), 2);
    mo.wait_reply(&room, "researcher", &request).await;
    let summaries = mo.seen(|s| {
        s.sender == support::agent_id("panel")
            && s.edits().is_none()
            && s.body().starts_with("Answers (")
    });
    assert_eq!(summaries.len(), 1, "one summary: {summaries:?}");
    // In time or late (the timeout counts from the task's start, so a slow restart may
    // pass it), the summary ends up with both answers, each once.
    let summary = summaries[0].event_id.clone();
    let holds_both = |b: &str| b.contains("Researcher") && !b.contains("no answer yet");
    let version = mo
        .wait_for("the summary holding both answers", |s| {
            let body = if s.event_id == summary {
                s.body()
            } else if s.edits() == Some(summary.as_str()) {
                s.content["m.new_content"]["body"]
                    .as_str()
                    .unwrap_or_default()
            } else {
                return false;
            };
            holds_both(body)
        })
        .await;
    let body = match version.edits() {
        Some(_) => version.content["m.new_content"]["body"]
            .as_str()
            .unwrap()
            .to_owned(),
        None => version.body().to_owned(),
    };
    assert_eq!(body.matches("Coder").count(), 1, "{body}");
    assert_eq!(body.matches("Researcher").count(), 1, "{body}");
}
