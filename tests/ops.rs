//! Operations end to end: `/health`, `/ready` and `/metrics` of the real binary against a
//! real Synapse — what a container probe, a load balancer and Prometheus see.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{ADMIN_TOKEN, Agentbus, Human, LlmMode, LlmStub, exclusive};

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
    let bus = Agentbus::start(&llm.url).await;

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
