//! Health monitors against real Synapse and the real binary: a service the test controls
//! goes down and comes back, and the operator in the alert room sees exactly one alert
//! (mentioning them, and notifying them) and exactly one recovery — also across a
//! SIGKILL of agentbus mid-outage; a closed TCP port and a failing allow-listed command
//! alert; a command that is not allow-listed is refused as a config error.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use matrix_sdk::ruma::api::client::room::create_room::v3::{
    Request as CreateRoomRequest, RoomPreset,
};
use matrix_sdk::ruma::{OwnedRoomId, OwnedUserId};
use serde_json::Value;
use support::{Agentbus, Human, OPEN_DMS, Seen, agent_id, cli_async, exclusive, free_port, unique};

/// A service whose status the test sets; it counts the probes it answers.
struct Service {
    url: String,
    status: Arc<AtomicU16>,
    probes: Arc<AtomicUsize>,
}

impl Service {
    async fn start() -> Service {
        let status = Arc::new(AtomicU16::new(200));
        let probes = Arc::new(AtomicUsize::new(0));
        let app = axum::Router::new().route(
            "/health",
            axum::routing::get({
                let (status, probes) = (status.clone(), probes.clone());
                move || async move {
                    probes.fetch_add(1, Ordering::SeqCst);
                    let code = status.load(Ordering::SeqCst);
                    (
                        axum::http::StatusCode::from_u16(code).unwrap(),
                        if code == 200 { "all good" } else { "on fire" },
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/health", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Service {
            url,
            status,
            probes,
        }
    }

    fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Waits until `n` more probes than now have been answered.
    async fn wait_probes(&self, n: usize) {
        let target = self.probes.load(Ordering::SeqCst) + n;
        let deadline = tokio::time::Instant::now() + support::WAIT;
        while self.probes.load(Ordering::SeqCst) < target {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the service was not probed {n} more times"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A public room with a fresh alias, made by `human`; the bot joins it by itself.
async fn public_room(human: &Human) -> (OwnedRoomId, String) {
    let name = unique("ops");
    let mut request = CreateRoomRequest::new();
    request.room_alias_name = Some(name.clone());
    request.preset = Some(RoomPreset::PublicChat);
    let room = human.client.create_room(request).await.unwrap();
    (room.room_id().to_owned(), format!("#{name}:localhost"))
}

fn config(monitors: &str) -> tempfile::TempDir {
    Agentbus::write_config_text(&format!(
        r#"
providers:
  echo: {{ api: echo }}
agents:
  - {{ id: damon, provider: echo }}
{monitors}
{OPEN_DMS}
"#
    ))
}

/// What the bot posted in `room` about `service`.
fn posts_about(human: &Human, room: &OwnedRoomId, service: &str) -> Vec<Seen> {
    let bot = agent_id("agentbus");
    let line = format!("\nService: {service}\n");
    human.seen(|s| s.room_id == *room && s.sender == bot && s.body().contains(&line))
}

async fn wait_post(human: &Human, room: &OwnedRoomId, first_line: &str, service: &str) -> Seen {
    let bot = agent_id("agentbus");
    let head = format!("{first_line}\nService: {service}\n");
    human
        .wait_for(&format!("{first_line} of {service}"), |s| {
            s.room_id == *room && s.sender == bot && s.body().starts_with(&head)
        })
        .await
}

/// The `Time:` line reads as a date and time of today (UTC).
fn assert_time_line(line: &str) {
    let time = line
        .strip_prefix("Time: ")
        .unwrap_or_else(|| panic!("{line:?}"));
    let time = chrono::NaiveDateTime::parse_from_str(time, "%Y-%m-%d %H:%M:%S")
        .unwrap_or_else(|e| panic!("{line:?}: {e}"));
    let today = chrono::Utc::now().date_naive();
    assert!(
        time.date() == today || time.date().succ_opt() == Some(today),
        "{line:?} is not today"
    );
}

/// Whether the homeserver notified `human` of `event` as a highlight (a mention).
async fn highlighted(human: &Human, event: &str) -> bool {
    let response: Value = reqwest::Client::new()
        .get(format!(
            "{}/_matrix/client/v3/notifications",
            support::synapse().url
        ))
        .bearer_auth(&human.access_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    response["notifications"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["event"]["event_id"] == event)
        .any(|n| {
            n["actions"].as_array().is_some_and(|actions| {
                actions
                    .iter()
                    .any(|a| a["set_tweak"] == "highlight" && a["value"] != false)
            })
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_alerts_the_room_once_mentioning_the_operator_and_its_recovery_follows() {
    let _one_at_a_time = exclusive().await;
    let ops = Human::new("ops").await;
    let (room, alias) = public_room(&ops).await;
    let service = Service::start().await;
    let closed = free_port();
    let dir = config(&format!(
        r#"
monitors:
  alerts: {{ room: "{alias}", mention: ["{ops}"] }}
  commands:
    fails: {{ argv: ["false"] }}
    passes: {{ argv: ["true"] }}
  checks:
    - {{ name: web, service: Web, interval: 1s, http: {{ url: "{url}", body_contains: "good" }} }}
    - {{ name: closed, service: Closed port, interval: 1s, tcp: {{ host: 127.0.0.1, port: {closed} }} }}
    - {{ name: fails, service: Failing command, interval: 1s, command: {{ run: fails }} }}
    - {{ name: passes, service: Passing command, interval: 1s, command: {{ run: passes }} }}
"#,
        ops = ops.user_id,
        url = service.url,
    ));
    let mut bus = Agentbus::configured(dir);
    bus.spawn().await;

    // Up: probed, and nothing said about it.
    service.wait_probes(2).await;

    // Down: one alert, in the shape operators know, mentioning the operator.
    service.set(503);
    let alert = wait_post(&ops, &room, "🚨 Critical alert", "Web").await;
    let lines: Vec<&str> = alert.body().lines().collect();
    assert_eq!(lines.len(), 6, "{:?}", alert.body());
    assert_eq!(
        lines[..3],
        [
            "🚨 Critical alert",
            "Service: Web",
            "Status: ❌ unavailable"
        ]
    );
    assert_time_line(lines[3]);
    assert_eq!(lines[4], "Error: HTTP 503 Service Unavailable");
    assert_eq!(
        lines[5],
        format!("@{} please act now!", ops.user_id.localpart())
    );
    let mentioned: Vec<OwnedUserId> =
        serde_json::from_value(alert.content["m.mentions"]["user_ids"].clone()).unwrap();
    assert_eq!(mentioned, std::slice::from_ref(&ops.user_id));
    let formatted = alert.content["formatted_body"].as_str().unwrap_or_default();
    assert!(
        formatted.contains(&format!(
            "<a href=\"https://matrix.to/#/{}\">@{}</a> please act now!",
            ops.user_id,
            ops.user_id.localpart()
        )),
        "{formatted}"
    );
    let deadline = tokio::time::Instant::now() + support::WAIT;
    while !highlighted(&ops, alert.event_id.as_str()).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the operator was never notified of the alert as a mention"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Still down: more failures say nothing more, also after agentbus is killed and
    // started again mid-outage.
    service.wait_probes(3).await;
    bus.restart().await;
    service.wait_probes(3).await;

    // Back: one recovery.
    service.set(200);
    let recovery = wait_post(&ops, &room, "✅ Recovered", "Web").await;
    let lines: Vec<&str> = recovery.body().lines().collect();
    assert_eq!(lines.len(), 5, "{:?}", recovery.body());
    assert_eq!(
        lines[..3],
        ["✅ Recovered", "Service: Web", "Status: ✅ available"]
    );
    assert_time_line(lines[3]);
    let down_for = lines[4].strip_prefix("Down for: ").unwrap();
    assert!(
        down_for.ends_with('s') && down_for.chars().next().unwrap().is_ascii_digit(),
        "{down_for:?}"
    );
    assert_eq!(
        recovery.content["m.mentions"]["user_ids"],
        serde_json::json!([])
    );
    service.wait_probes(2).await;

    // The closed port and the failing command alert too, each once; the passing one never.
    let tcp = wait_post(&ops, &room, "🚨 Critical alert", "Closed port").await;
    assert!(
        tcp.body()
            .contains(&format!("\nError: TCP 127.0.0.1:{closed}: ")),
        "{:?}",
        tcp.body()
    );
    let command = wait_post(&ops, &room, "🚨 Critical alert", "Failing command").await;
    assert!(
        command
            .body()
            .contains("\nError: `fails` exited with status 1\n"),
        "{:?}",
        command.body()
    );
    let metrics = wait_metrics(&bus, "agentbus_monitor_up{check=\"passes\"} 1").await;
    assert!(
        metrics.contains("agentbus_monitor_up{check=\"fails\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("agentbus_monitor_up{check=\"web\"} 1"),
        "{metrics}"
    );

    // Whatever was posted before this marker has been seen by now.
    let marker = ops.send(&room, &unique("marker-")).await;
    ops.wait_for("the marker", |s| s.event_id == marker).await;
    let web = posts_about(&ops, &room, "Web");
    assert_eq!(
        web.iter()
            .map(|s| s.body().lines().next().unwrap())
            .collect::<Vec<_>>(),
        ["🚨 Critical alert", "✅ Recovered"],
        "one alert, one recovery"
    );
    assert_eq!(posts_about(&ops, &room, "Closed port").len(), 1);
    assert_eq!(posts_about(&ops, &room, "Failing command").len(), 1);
    assert!(posts_about(&ops, &room, "Passing command").is_empty());
    // Not merely deduplicated by the homeserver: the restarted process knew the alert
    // was posted, and did not send it again.
    let sent = bus
        .log()
        .lines()
        .filter(|l| l.contains("posted the check's alert") && l.contains("check=web"))
        .count();
    assert_eq!(sent, 1, "{}", bus.log());
}

/// Polls `/metrics` until it has the line `series` and returns the exposition.
async fn wait_metrics(bus: &Agentbus, series: &str) -> String {
    let deadline = tokio::time::Instant::now() + support::WAIT;
    loop {
        let text = reqwest::get(format!("{}/metrics", bus.url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.lines().any(|l| l == series) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/metrics never showed {series}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_is_not_allow_listed_is_a_config_error() {
    let dir = config(
        r##"
monitors:
  alerts: { room: "#ops:localhost" }
  commands:
    disk: { argv: ["df", "-h"] }
  checks:
    - { name: wipe, command: { run: rm } }
"##,
    );
    let path = dir.path().join("agentbus.yaml");
    let (code, _, stderr) = cli_async(&["--config", path.to_str().unwrap(), "check"]).await;
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(
            r#"monitors.checks[0].command.run: "rm" is not listed in monitors.commands; a check runs only the commands listed there (listed: disk)"#
        ),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_private_room_the_bot_says_at_start_up_it_cannot_post_and_a_named_agent_posts_instead()
{
    let _one_at_a_time = exclusive().await;
    let ops = Human::new("ops").await;
    // Private: damon is invited, the appservice's bot is not.
    let room = ops.create_room(&["damon"], false).await;
    let closed = free_port();
    let monitors = |poster: &str| {
        format!(
            r#"
monitors:
  alerts: {{ room: "{room}", mention: ["{ops}"]{poster} }}
  checks:
    - {{ name: closed, service: Closed port, interval: 1s, tcp: {{ host: 127.0.0.1, port: {closed} }} }}
"#,
            ops = ops.user_id,
        )
    };

    let mut bus = Agentbus::configured(config(&monitors("")));
    bus.spawn().await;
    bus.wait_log(&[
        "alerts cannot be posted: the poster cannot join the alert room",
        "set monitors.alerts.as to an agent that is in the room",
        "user=@agentbus:localhost",
    ])
    .await;
    bus.stop().await;

    let mut bus = Agentbus::configured(config(&monitors(", as: damon")));
    bus.spawn().await;
    let alert = ops
        .wait_for("damon's alert", |s| {
            s.room_id == room
                && s.sender == agent_id("damon")
                && s.body()
                    .starts_with("🚨 Critical alert\nService: Closed port\n")
        })
        .await;
    assert!(
        alert
            .body()
            .ends_with(&format!("\n@{} please act now!", ops.user_id.localpart())),
        "{:?}",
        alert.body()
    );
    assert!(
        ops.seen(|s| s.room_id == room && s.sender == agent_id("agentbus"))
            .is_empty(),
        "the bot was never in the room"
    );
}
