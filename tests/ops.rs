//! Operations end to end: `/health`, `/ready` and `/metrics` of the real binary against a
//! real Synapse — what a container probe, a load balancer and Prometheus see.

mod support;

use std::time::Duration;

use matrix_sdk::ruma::OwnedRoomId;
use serde_json::Value;
use support::{
    ADMIN_TOKEN, AS_TOKEN, Agentbus, HS_TOKEN, Human, LlmMode, LlmStub, OPEN_DMS, agent_id,
    exclusive,
};

/// The model provider's API key in the probes test.
const MODEL_KEY: &str = "sk-e2e-model-key-3141592653";

async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn ready(bus: &Agentbus) -> (u16, Value) {
    let (status, body) = get(&format!("{}/ready", bus.url)).await;
    (status, serde_json::from_str(&body).unwrap())
}

/// `/ready` until `check` holds (the homeserver checks are cached for a few seconds).
async fn ready_until(bus: &Agentbus, what: &str, check: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = ready(bus).await;
        if check(status, &body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/ready never showed {what}; last: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The value of the sample `name{labels}` (labels as Prometheus renders them, sorted by
/// the exporter in the order they were given), or `None`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().unwrap())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_metrics_show_an_answer_from_intake_to_model() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let mut bus = Agentbus::configured(Agentbus::write_config_full(
        &llm.url,
        OPEN_DMS,
        "api_key_env: E2E_STUB_KEY",
    ));
    bus.set_env("E2E_STUB_KEY", MODEL_KEY);
    bus.spawn().await;

    let (status, body) = get(&format!("{}/health", bus.url)).await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));

    let body = ready_until(&bus, "ready", |status, _| status == 200).await;
    assert_eq!(body["status"], "ready", "{body}");
    for check in ["store", "homeserver", "appservice_ping"] {
        assert_eq!(body["checks"][check]["ok"], true, "{check}: {body}");
    }
    assert!(
        body["checks"]["homeserver"]["detail"]
            .as_str()
            .unwrap()
            .starts_with("reachable (spec v1."),
        "{body}"
    );
    assert_eq!(
        body["checks"]["providers"]["providers"]["stub"]["state"], "unused",
        "no model call yet: {body}"
    );

    let alice = Human::new("alice").await;
    let dm = alice.dm_with("damon").await;
    let question = alice.send(&dm, "count me").await;
    let reply = alice.wait_reply(&dm, "damon", &question).await;
    alice.wait_final(&reply).await;

    let body = ready(&bus).await.1;
    assert_eq!(
        body["checks"]["providers"]["providers"]["stub"]["state"], "ok",
        "{body}"
    );

    let metrics = reqwest::get(format!("{}/metrics", bus.url)).await.unwrap();
    assert_eq!(
        metrics.headers()["content-type"],
        "text/plain; version=0.0.4"
    );
    let metrics = metrics.text().await.unwrap();
    let at_least_one = |series: &str| {
        let value =
            sample(&metrics, series).unwrap_or_else(|| panic!("no {series} in:\n{metrics}"));
        assert!(value >= 1.0, "{series} = {value}");
    };
    at_least_one(r#"agentbus_transactions_total{outcome="accepted"}"#);
    at_least_one("agentbus_events_received_total");
    at_least_one(r#"agentbus_routing_decisions_total{strategy="direct_message"}"#);
    at_least_one(r#"agentbus_llm_requests_total{provider="stub",model="damon-model"}"#);
    at_least_one(
        r#"agentbus_llm_request_duration_seconds_count{provider="stub",model="damon-model"}"#,
    );
    at_least_one(
        r#"agentbus_llm_tokens_total{provider="stub",model="damon-model",direction="output"}"#,
    );
    at_least_one(r#"agentbus_answer_overhead_seconds_count{agent="damon"}"#);
    at_least_one(r#"agentbus_answer_duration_seconds_count{agent="damon"}"#);
    at_least_one(r#"agentbus_matrix_requests_total{kind="send_message_event"}"#);
    at_least_one("agentbus_events_finished_total");
    assert!(
        sample(&metrics, "agentbus_journal_pending").is_some()
            && sample(&metrics, "agentbus_journal_oldest_pending_age_seconds").is_some()
            && sample(&metrics, "agentbus_active_sessions").is_some(),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE agentbus_answer_overhead_seconds histogram"),
        "{metrics}"
    );

    // The probes are open; the admin API is not.
    let admin = format!("{}/api/v1/pairing", bus.url);
    assert_eq!(reqwest::get(&admin).await.unwrap().status(), 401);
    let authorised = reqwest::Client::new()
        .get(&admin)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(authorised.status(), 200);

    // The key reached the model; no secret reached the log, whatever its level.
    let bearer = format!("Bearer {MODEL_KEY}");
    assert!(
        !llm.authorizations().is_empty()
            && llm
                .authorizations()
                .iter()
                .all(|a| a.as_deref() == Some(bearer.as_str())),
        "every model request carried the key: {:?}",
        llm.authorizations()
    );
    let log = bus.log();
    assert!(
        log.contains("transaction journaled"),
        "debug lines are in the log"
    );
    // Lines about a message carry its room and event; lines about a run, its agent too.
    let run = format!("run{{agent=damon room_id={dm} event_id={question}}}");
    assert!(
        log.lines()
            .any(|l| l.contains(&run) && l.contains("run finished")),
        "no line carries {run}:\n{log}"
    );
    let event = format!("event{{room_id={dm} event_id={question}}}");
    assert!(log.contains(&event), "no line carries {event}");
    for (name, secret) in [
        ("as_token", AS_TOKEN),
        ("hs_token", HS_TOKEN),
        ("admin token", ADMIN_TOKEN),
        ("model key", MODEL_KEY),
    ] {
        assert!(!log.contains(secret), "the {name} is in agentbus's log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_provider_is_reported_without_taking_agentbus_out_of_rotation() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Fail).await;
    let bus = Agentbus::start(&llm.url).await;
    let bob = Human::new("bob").await;
    let dm = bob.dm_with("coder").await;
    let question = bob.send(&dm, "will this work").await;
    bob.wait_reply(&dm, "coder", &question).await;

    let body = ready_until(&bus, "the provider failing", |_, body| {
        body["checks"]["providers"]["providers"]["stub"]["state"] == "failing"
    })
    .await;
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["checks"]["providers"]["ok"], false, "{body}");
    assert!(
        body["checks"]["providers"]["providers"]["stub"]["error"]
            .as_str()
            .unwrap()
            .contains("HTTP 500"),
        "{body}"
    );
    let metrics = get(&format!("{}/metrics", bus.url)).await.1;
    let errors = sample(
        &metrics,
        r#"agentbus_llm_errors_total{provider="stub",model="coder-model",kind="http_500"}"#,
    );
    assert!(errors.is_some_and(|n| n >= 1.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_on_a_listener_of_their_own_are_not_on_the_appservice_port() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = Agentbus::write_config(&llm.url);
    let path = dir.path().join("agentbus.yaml");
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{config}\nmetrics: {{ listen: \"127.0.0.1:{port}\" }}\n"),
    )
    .unwrap();
    let mut bus = Agentbus::configured(dir);
    bus.spawn().await;
    bus.wait_log(&["metrics listening"]).await;

    let (status, _) = get(&format!("{}/metrics", bus.url)).await;
    assert_eq!(status, 404, "metrics left the appservice listener");
    let (status, metrics) = get(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("agentbus_journal_pending "), "{metrics}");
    let (status, _) = get(&format!("{}/health", bus.url)).await;
    assert_eq!(status, 200, "the probes stay where the load balancer looks");
}

/// The bot's notice answering `command` (sent by `human` in the management room).
async fn bot_answer(human: &Human, room: &OwnedRoomId, command: &str) -> String {
    answer_as(human, room, command, "agentbus").await
}

/// The notice `answerer` posts answering `command` (sent by `human` in `room`).
async fn answer_as(human: &Human, room: &OwnedRoomId, command: &str, answerer: &str) -> String {
    let event = human.send(room, command).await;
    let bot = agent_id(answerer);
    human
        .wait_for(&format!("the bot's answer to {command}"), |seen| {
            seen.room_id == *room
                && seen.sender == bot
                && seen.in_reply_to() == Some(event.as_str())
        })
        .await
        .body()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_manage_agentbus_from_matrix_and_nobody_else_does() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let dir = Agentbus::write_config(&llm.url);
    let path = dir.path().join("agentbus.yaml");
    let config = std::fs::read_to_string(&path).unwrap();
    let admin_key = format!("admin: {{ token: {ADMIN_TOKEN} }}");
    assert!(config.contains(&admin_key), "{config}");
    let config = config.replace(
        &admin_key,
        &format!("admin: {{ token: {ADMIN_TOKEN}, users: [\"@opsadmin*:localhost\"] }}"),
    );
    let schedule = "schedules:\n  - { name: standup, cron: \"0 9 * * mon-fri\", timezone: Europe/Berlin, room: \"#nowhere:localhost\", send_message: { as: damon, text: hi } }\n";
    std::fs::write(&path, format!("{config}\n{schedule}")).unwrap();
    let mut bus = Agentbus::configured(dir);
    bus.spawn().await;
    let bot = agent_id("agentbus");

    // Someone else's invite is declined; an admin's makes a management room.
    let mallory = Human::new("mallory").await;
    let lure = mallory.create_room(&["agentbus"], true).await;
    let declined = mallory.wait_membership(&lure, &bot, "leave").await;
    assert!(
        declined["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("admin.users"),
        "{declined}"
    );
    let admin = Human::new("opsadmin").await;
    let manage = admin.create_room(&["agentbus"], true).await;
    admin.wait_joined(&manage, &bot).await;

    let agents = bot_answer(&admin, &manage, "!agents").await;
    assert!(
        agents.contains("Damon (@damon:localhost) — stub/damon-model — idle"),
        "{agents}"
    );
    assert!(agents.contains("Coder (@coder:localhost)"), "{agents}");
    let status = bot_answer(&admin, &manage, "!status").await;
    assert!(status.starts_with("✅ ready"), "{status}");
    assert!(status.contains("✓ homeserver: reachable"), "{status}");
    let unknown = bot_answer(&admin, &manage, "!frobnicate").await;
    assert!(
        unknown.starts_with("unknown command !frobnicate"),
        "{unknown}"
    );
    assert!(unknown.contains("!agents —"), "help follows: {unknown}");
    let pairing = bot_answer(&admin, &manage, "!pairing list").await;
    assert!(pairing.starts_with("0 pending:"), "{pairing}");
    let tasks = bot_answer(&admin, &manage, "!tasks").await;
    assert!(
        tasks.starts_with("1 scheduled task(s):\n• standup — send_message cron 0 9 * * mon-fri Europe/Berlin in #nowhere:localhost — scheduled — never ran — next 20"),
        "{tasks}"
    );
    let run = bot_answer(&admin, &manage, "!task run nosuch").await;
    assert_eq!(run, "❌ no scheduled task is named \"nosuch\"");

    // In a project room, with the prefix (answered by an agent there, since the bot is
    // not): a dry run of the router, and a reset from the management room.
    let project = admin.create_room(&["damon", "coder"], false).await;
    admin.wait_joined(&project, &agent_id("damon")).await;
    admin.wait_joined(&project, &agent_id("coder")).await;
    let asked = llm.requests().len();
    let route = answer_as(
        &admin,
        &project,
        "!agentbus route please debug this",
        "coder",
    )
    .await;
    assert!(
        route.starts_with("@coder would answer (keyword)"),
        "{route}"
    );
    assert_eq!(llm.requests().len(), asked, "a command reaches no model");

    let question = admin.send(&project, "@damon remember the number 7").await;
    let reply = admin.wait_reply(&project, "damon", &question).await;
    admin.wait_final(&reply).await;
    let reset = bot_answer(&admin, &manage, &format!("!reset @damon {project}")).await;
    assert!(
        reset.starts_with("🧹 Damon forgot 2 line(s) of its conversation in"),
        "{reset}"
    );

    // A non-admin gets a refusal, not an answer — and nothing is done.
    admin.bring_in(&project, &mallory).await;
    let refused = answer_as(&mallory, &project, "!agentbus stop", "coder").await;
    assert_eq!(
        refused,
        "⛔ only the admins in admin.users may run agentbus commands"
    );
    let refused = answer_as(
        &mallory,
        &project,
        "!agentbus pairing approve ABCDEFGH",
        "coder",
    )
    .await;
    assert!(refused.starts_with("⛔"), "{refused}");
    assert_eq!(
        llm.requests().len(),
        asked + 1,
        "only damon's one answer asked a model"
    );
}
