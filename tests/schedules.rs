//! Scheduled tasks and heartbeats against real Synapse and the real binary: what a person
//! in the room sees when a schedule fires, when an agent writes the message, when a task
//! keeps failing, and when heartbeats have (or have not) something to say; the admin API
//! and the CLI that list and trigger tasks.

mod support;

use std::time::Duration;

use matrix_sdk::ruma::OwnedRoomId;
use matrix_sdk::ruma::api::client::room::create_room::v3::{
    Request as CreateRoomRequest, RoomPreset,
};
use serde_json::Value;
use support::{
    ADMIN_TOKEN, Agentbus, Human, LlmMode, LlmStub, OPEN_DMS, Script, Scripted, Seen, agent_id,
    cli_async, content_text, exclusive, unique,
};

/// A public room with a fresh alias, made by `human` before agentbus runs; the tasks
/// name it by its alias, and their agents join it themselves.
async fn public_room(human: &Human) -> (OwnedRoomId, String) {
    let name = unique("sched");
    let mut request = CreateRoomRequest::new();
    request.room_alias_name = Some(name.clone());
    request.preset = Some(RoomPreset::PublicChat);
    let room = human.client.create_room(request).await.unwrap();
    (room.room_id().to_owned(), format!("#{name}:localhost"))
}

/// The config: three agents on the stub, no retries, and `extra` (YAML).
fn config(llm_url: &str, agents_extra: [&str; 2], extra: &str) -> tempfile::TempDir {
    let [damon, coder] = agents_extra;
    Agentbus::write_config_text(&format!(
        r#"
providers:
  stub: {{ api: openai-completions, base_url: "{llm_url}", timeout: 30s }}
llm: {{ retries: 0 }}
agents:
  - {{ id: damon, display_name: Damon, provider: stub, model: damon-model{damon} }}
  - {{ id: coder, display_name: Coder, provider: stub, model: coder-model{coder} }}
{extra}
{OPEN_DMS}
"#
    ))
}

async fn api(
    bus: &Agentbus,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, format!("{}{path}", bus.url()));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Waits until the task list satisfies `done` and returns it.
async fn wait_list(bus: &Agentbus, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + support::WAIT;
    loop {
        let (status, list) = api(
            bus,
            reqwest::Method::GET,
            "/api/v1/tasks",
            Some(ADMIN_TOKEN),
        )
        .await;
        assert_eq!(status, 200, "{list}");
        if done(&list) {
            return list;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never true: {what}; last {list}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn task<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|tasks| tasks.iter().find(|t| t["name"] == name))
        .unwrap_or_else(|| panic!("no task {name} in {list}"))
}

/// Messages `agent` posted in `room` (not edits).
fn said_by(human: &Human, room: &OwnedRoomId, agent: &str) -> Vec<Seen> {
    let agent = agent_id(agent);
    human.seen(|s| s.room_id == *room && s.sender == agent && s.edits().is_none())
}

/// Sends a marker and waits until it comes back: whatever was posted in the room before
/// it has been seen by then.
async fn barrier(human: &Human, room: &OwnedRoomId) {
    let marker = unique("marker-");
    let sent = human.send(room, &marker).await;
    human
        .wait_for("the marker message", |s| s.event_id == sent)
        .await;
}

fn requests_of(llm: &LlmStub, model: &str) -> Vec<Value> {
    llm.requests()
        .into_iter()
        .filter(|r| r["model"] == model)
        .collect()
}

fn last_prompt(request: &Value) -> String {
    request["messages"]
        .as_array()
        .and_then(|m| m.last())
        .map(content_text)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_posts_its_template_as_the_agent_and_a_triggered_ask_agent_posts_the_models_text()
 {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let ann = Human::new("ann").await;
    let (room, alias) = public_room(&ann).await;
    let dir = config(
        &llm.url,
        ["", ""],
        &format!(
            r#"
schedules:
  - name: greet
    every: 2s
    room: "{alias}"
    send_message: {{ as: damon, text: "Good morning, today is {{{{weekday}}}} {{{{date}}}} {{{{time}}}}" }}
  - name: brief
    every: 1h
    room: "{alias}"
    ask_agent: {{ agent: coder, prompt: "Write the morning briefing" }}
"#
        ),
    );
    let mut bus = Agentbus::configured(dir);
    bus.spawn().await;

    // The every-2s schedule: damon posts the template, filled in (UTC).
    let greeting = ann
        .wait_for("damon's scheduled greeting", |s| {
            s.room_id == room
                && s.sender == agent_id("damon")
                && s.body().starts_with("Good morning, today is ")
        })
        .await;
    let filled: Vec<&str> = greeting.body()["Good morning, today is ".len()..]
        .split(' ')
        .collect();
    let [weekday, date, time] = filled[..] else {
        panic!("not filled in: {:?}", greeting.body());
    };
    let date = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").unwrap();
    assert_eq!(
        weekday,
        date.format("%A").to_string(),
        "{:?}",
        greeting.body()
    );
    let today = chrono::Utc::now().date_naive();
    assert!(
        date == today || date.succ_opt() == Some(today),
        "{date} is not today"
    );
    assert!(
        chrono::NaiveTime::parse_from_str(time, "%H:%M").is_ok(),
        "{time:?}"
    );
    assert!(greeting.content.get("io.agentbus.streaming").is_none());

    // Without the admin token: refused, and nothing runs.
    let (status, _) = api(
        &bus,
        reqwest::Method::POST,
        "/api/v1/tasks/brief/trigger",
        None,
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = api(&bus, reqwest::Method::GET, "/api/v1/tasks", Some("wrong")).await;
    assert_eq!(status, 401);
    let (status, body) = api(
        &bus,
        reqwest::Method::POST,
        "/api/v1/tasks/nosuch/trigger",
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(requests_of(&llm, "coder-model").is_empty());

    // Triggered: the coder writes the briefing and posts it as itself.
    let (status, view) = api(
        &bus,
        reqwest::Method::POST,
        "/api/v1/tasks/brief/trigger",
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["last_outcome"]["result"], "ok", "{view}");
    assert!(view["last_run"].is_string(), "{view}");
    let asked = requests_of(&llm, "coder-model");
    assert_eq!(asked.len(), 1);
    assert_eq!(last_prompt(&asked[0]), "Write the morning briefing");
    let briefing = ann
        .wait_for("the coder's briefing", |s| {
            s.room_id == room && s.sender == agent_id("coder")
        })
        .await;
    assert_eq!(briefing.body(), "[coder-model] Write the morning briefing");

    // The list: last run and outcome of the triggered one, next run of both.
    let list = wait_list(&bus, "greet has run", |list| {
        task(list, "greet")["last_run"].is_string()
    })
    .await;
    let brief = task(&list, "brief");
    assert_eq!(brief["kind"], "ask_agent");
    assert_eq!(brief["last_run"], view["last_run"]);
    assert_eq!(brief["paused"], false);
    assert_eq!(brief["failures"], 0);
    assert!(brief["next_run"].is_string(), "{list}");
    assert_eq!(task(&list, "greet")["schedule"], "every 2s");

    // The CLI asks the running agentbus.
    let config = bus.config_path();
    let config = config.to_str().unwrap();
    let (code, out, err) = cli_async(&["--config", config, "tasks", "list"]).await;
    assert_eq!(code, Some(0), "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("brief "))
        .unwrap_or_else(|| panic!("no brief line in {out}"));
    assert!(line.contains("[ask_agent] every 1h"), "{line}");
    assert!(!line.contains("last: never"), "{line}");
    let (code, out, err) = cli_async(&["--config", config, "tasks", "run", "brief"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(requests_of(&llm, "coder-model").len(), 2);
    let (code, _, err) = cli_async(&["--config", config, "tasks", "run", "nosuch"]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no scheduled task is named \"nosuch\""),
        "{err}"
    );

    // With no agentbus running, the list comes from the store; a run needs the server.
    bus.kill().await;
    let (code, out, err) = cli_async(&["--config", config, "tasks", "list", "--json"]).await;
    assert_eq!(code, Some(0), "{err}");
    let stored: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        task(&stored, "brief")["last_outcome"]["result"],
        "ok",
        "{stored}"
    );
    let (code, _, err) = cli_async(&["--config", config, "tasks", "run", "brief"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("no agentbus is running"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_keeps_failing_posts_one_notice_and_pauses_until_a_run_succeeds() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Fail).await;
    let ann = Human::new("ann").await;
    let (room, alias) = public_room(&ann).await;
    let dir = config(
        &llm.url,
        ["", ""],
        &format!(
            r#"
schedules:
  - {{ name: flaky, every: 2s, max_failures: 2, room: "{alias}", ask_agent: {{ agent: coder, prompt: "Status?" }} }}
"#
        ),
    );
    let mut bus = Agentbus::configured(dir);
    bus.spawn().await;

    let notice = ann
        .wait_for("the failure notice", |s| {
            s.room_id == room && s.sender == agent_id("coder")
        })
        .await;
    assert_eq!(notice.content["msgtype"], "m.notice");
    assert!(
        notice
            .body()
            .starts_with("⚠️ Scheduled task \"flaky\" failed 2 times in a row and is paused."),
        "{}",
        notice.body()
    );
    let list = wait_list(&bus, "flaky is paused", |list| {
        task(list, "flaky")["paused"] == true
    })
    .await;
    let flaky = task(&list, "flaky");
    assert_eq!(flaky["failures"], 2, "{list}");
    assert_eq!(flaky["last_outcome"]["result"], "failed", "{list}");
    assert_eq!(requests_of(&llm, "coder-model").len(), 2);

    // Run by hand while it still fails: a third failure, and no second notice.
    let (status, view) = api(
        &bus,
        reqwest::Method::POST,
        "/api/v1/tasks/flaky/trigger",
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(
        (view["failures"].as_u64(), view["paused"].as_bool()),
        (Some(3), Some(true))
    );
    barrier(&ann, &room).await;
    let coder = said_by(&ann, &room, "coder");
    assert_eq!(
        coder.len(),
        1,
        "one notice, nothing for each failure: {coder:?}"
    );

    // The model is back: a run by hand succeeds and the task resumes.
    llm.set_mode(LlmMode::Answer);
    let (_, view) = api(
        &bus,
        reqwest::Method::POST,
        "/api/v1/tasks/flaky/trigger",
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(view["paused"], false, "{view}");
    assert_eq!(view["failures"], 0, "{view}");
    ann.wait_for("the coder's status", |s| {
        s.room_id == room && s.sender == agent_id("coder") && s.body() == "[coder-model] Status?"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_posts_only_when_its_agent_has_something_to_say() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(Script::mode(|model, _messages| {
        Scripted::Say(if model == "damon-model" {
            "HEARTBEAT_OK".into()
        } else {
            "The backup did not run last night.".into()
        })
    }))
    .await;
    let ann = Human::new("ann").await;
    let (room, alias) = public_room(&ann).await;
    let beat = format!(r#", heartbeat: {{ interval: 2s, room: "{alias}" }}"#);
    let dir = config(&llm.url, [&beat, &beat], "");
    for agent in ["damon", "coder"] {
        let workspace = dir.path().join("data/agents").join(agent);
        std::fs::create_dir_all(&workspace).unwrap();
        std::fs::write(
            workspace.join("HEARTBEAT.md"),
            format!("- [ ] check {agent}'s backups\n"),
        )
        .unwrap();
    }
    let mut bus = Agentbus::configured(dir);
    bus.spawn().await;

    let said = ann
        .wait_for("the coder's heartbeat", |s| {
            s.room_id == room && s.sender == agent_id("coder")
        })
        .await;
    assert_eq!(said.body(), "The backup did not run last night.");
    // Damon's heartbeat ran (twice, with its checklist) and answered HEARTBEAT_OK.
    let deadline = tokio::time::Instant::now() + support::WAIT;
    while requests_of(&llm, "damon-model").len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "damon's heartbeat never ran twice"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let asked = last_prompt(&requests_of(&llm, "damon-model")[0]);
    assert!(asked.contains("- [ ] check damon's backups"), "{asked}");
    assert!(asked.contains("HEARTBEAT_OK"), "{asked}");
    barrier(&ann, &room).await;
    assert!(
        said_by(&ann, &room, "damon").is_empty(),
        "HEARTBEAT_OK posts nothing: {:?}",
        said_by(&ann, &room, "damon")
    );
    let list = wait_list(&bus, "damon's heartbeat has run", |list| {
        task(list, "heartbeat:damon")["last_outcome"].is_object()
    })
    .await;
    let damon = task(&list, "heartbeat:damon");
    assert_eq!(damon["kind"], "heartbeat");
    assert_eq!(
        damon["last_outcome"],
        serde_json::json!({"result": "ok", "posted": false}),
        "{list}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_run_is_made_up_once_and_a_run_cut_off_by_a_crash_is_done_again_not_twice() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Hang).await;
    let ann = Human::new("ann").await;
    let (room, alias) = public_room(&ann).await;
    // Both were due a minute before agentbus first started: missed while it was down.
    let past = (chrono::Utc::now() - chrono::Duration::minutes(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let dir = config(
        &llm.url,
        ["", ""],
        &format!(
            r#"
schedules:
  - {{ name: missed, at: "{past}", room: "{alias}", send_message: {{ as: damon, text: "made up for" }} }}
  - {{ name: skipped, at: "{past}", catch_up: none, room: "{alias}", send_message: {{ as: damon, text: "never said" }} }}
  - {{ name: cut-off, at: "{past}", room: "{alias}", ask_agent: {{ agent: coder, prompt: "Summarise the night" }} }}
"#
        ),
    );
    let mut bus = Agentbus::configured(dir);
    bus.spawn().await;
    ann.wait_for("the made-up run", |s| {
        s.room_id == room && s.sender == agent_id("damon") && s.body() == "made up for"
    })
    .await;
    // The coder's run is in flight (its model hangs) when the process is killed.
    llm.wait_for_requests(1).await;
    let list = wait_list(&bus, "missed has run", |list| {
        task(list, "missed")["last_run"].is_string()
    })
    .await;
    assert_eq!(task(&list, "cut-off")["running"], true, "{list}");
    bus.kill().await;

    llm.set_mode(LlmMode::Answer);
    bus.spawn().await;
    ann.wait_for("the cut-off run, done again", |s| {
        s.room_id == room && s.sender == agent_id("coder")
    })
    .await;
    let list = wait_list(&bus, "cut-off has ended", |list| {
        task(list, "cut-off")["running"] == false
    })
    .await;
    let cut_off = task(&list, "cut-off");
    assert_eq!(cut_off["last_outcome"]["result"], "ok", "{list}");
    assert_eq!(
        cut_off["last_run"].as_str(),
        Some(past.as_str()),
        "done under the time it was scheduled for: {list}"
    );
    assert_eq!(task(&list, "skipped")["last_run"], Value::Null, "{list}");
    assert_eq!(task(&list, "missed")["next_run"], Value::Null, "{list}");
    barrier(&ann, &room).await;
    let damon: Vec<String> = said_by(&ann, &room, "damon")
        .iter()
        .map(|s| s.body().to_owned())
        .collect();
    assert_eq!(
        damon,
        ["made up for"],
        "once, across the restart; none skipped"
    );
    assert_eq!(said_by(&ann, &room, "coder").len(), 1);
    assert_eq!(requests_of(&llm, "coder-model").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_team_gives_the_team_its_prompt_as_a_task_in_the_room() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let ann = Human::new("ann").await;
    let (room, alias) = public_room(&ann).await;
    let dir = config(
        &llm.url,
        ["", ""],
        &format!(
            r#"
teams:
  - {{ id: pipeteam, display_name: Pipe Team, mode: pipeline, stages: [{{ name: draft, agent: coder, prompt: "Draft: {{{{input}}}}" }}] }}
schedules:
  - {{ name: notes, every: 1h, room: "{alias}", run_team: {{ team: pipeteam, prompt: "Write the release notes for {{{{date}}}}" }} }}
"#
        ),
    );
    let mut bus = Agentbus::configured(dir);
    bus.spawn().await;

    let (status, view) = api(
        &bus,
        reqwest::Method::POST,
        "/api/v1/tasks/notes/trigger",
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["last_outcome"]["result"], "ok", "{view}");
    let request = ann
        .wait_for("the team's request", |s| {
            s.room_id == room
                && s.sender == agent_id("pipeteam")
                && s.body().starts_with("Write the release notes for 20")
        })
        .await;
    let draft = ann
        .wait_for("the coder's stage in the request's thread", |s| {
            s.room_id == room
                && s.sender == agent_id("coder")
                && s.content["m.relates_to"]["event_id"] == request.event_id.as_str()
        })
        .await;
    let draft = ann.wait_final(&draft).await;
    assert_eq!(
        draft.body(),
        format!("[coder-model] Draft: {}", request.body())
    );
}
