//! 1,000 concurrent sessions streaming through the agent runtime.
//!
//! Each session is one agent in its own room answering one message: the runtime's lane,
//! memory from a real sled store, the LLM hub, the OpenAI-compatible SSE client against a
//! local stub that streams `DELTAS` chunks `PAUSE` apart, and the streamed reply (a
//! message plus edits, typing) sent to a local sink that answers like a homeserver's
//! `PUT /rooms/{id}/send` (no Synapse: this measures agentbus, not the homeserver), and
//! the room state an agent reads once per room before its first answer.
//! Prints peak memory, memory per session, deltas per second and the time to finish.
//!
//! `cargo bench --bench sessions` (optionally `-- 2000` for another session count)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentbus::agents::{AgentRuntime, Job, Submitted, Turn};
use agentbus::config::{AgentId, Config};
use agentbus::llm::{LlmHub, build_providers};
use agentbus::matrix::{MatrixClient, RetryPolicy};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};
use serde_json::{Value, json};

/// Chunks per answer and the pause between them: a 1 s answer, as a fast cloud model.
const DELTAS: usize = 40;
const PAUSE: Duration = Duration::from_millis(25);

/// Resident and peak resident memory of this process, in KiB (`/proc/self/status`).
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[derive(Default)]
struct Sink {
    sends: AtomicU64,
    edits: AtomicU64,
    typing: AtomicU64,
}

/// A homeserver sink: every send gets a fresh event ID.
async fn homeserver(sink: Arc<Sink>) -> String {
    let sends = sink.clone();
    let typing = sink.clone();
    let app = Router::new()
        .route(
            "/_matrix/client/v3/rooms/{room}/send/{kind}/{txn}",
            put(move |Json(content): Json<Value>| {
                let sink = sends.clone();
                async move {
                    let n = if content["m.relates_to"]["rel_type"] == "m.replace" {
                        sink.edits.fetch_add(1, Ordering::Relaxed)
                    } else {
                        sink.sends.fetch_add(1, Ordering::Relaxed)
                    };
                    Json(json!({ "event_id": format!("$sink{n}") }))
                }
            }),
        )
        .route(
            "/_matrix/client/v3/rooms/{room}/typing/{user}",
            put(move || {
                let sink = typing.clone();
                async move {
                    sink.typing.fetch_add(1, Ordering::Relaxed);
                    Json(json!({}))
                }
            }),
        )
        // What an agent asks once per room before its first answer (who reads it): the
        // room has no history visibility set (`shared`) and nobody else in it.
        .route(
            "/_matrix/client/v3/rooms/{room}/state/m.room.history_visibility/",
            get(|| async {
                (
                    axum::http::StatusCode::NOT_FOUND,
                    Json(json!({ "errcode": "M_NOT_FOUND", "error": "no such state" })),
                )
            }),
        )
        .route(
            "/_matrix/client/v3/rooms/{room}/members",
            get(|| async { Json(json!({ "chunk": [] })) }),
        );
    serve(app).await
}

/// An OpenAI-compatible SSE stub: `DELTAS` chunks of a few words, `PAUSE` apart.
async fn model() -> String {
    let app = Router::new().route(
        "/v1/chat/completions",
        post(|| async {
            let mut lines: Vec<String> = (0..DELTAS)
                .map(|i| {
                    let chunk = json!({"choices": [{"index": 0, "delta": {"content": format!("word{i} and more ")}, "finish_reason": null}]});
                    format!("data: {chunk}\n\n")
                })
                .collect();
            lines.push(format!(
                "data: {}\n\ndata: [DONE]\n\n",
                json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            ));
            let stream = futures::StreamExt::then(futures::stream::iter(lines), |line| async move {
                tokio::time::sleep(PAUSE).await;
                Ok::<_, std::convert::Infallible>(line)
            });
            axum::response::Response::builder()
                .header("content-type", "text/event-stream")
                .body(axum::body::Body::from_stream(stream))
                .unwrap()
        }),
    );
    format!("{}/v1", serve(app).await)
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test` does not, and gets a quick smoke run. A
    // bare number sets the session count.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let benching = args.iter().any(|a| a == "--bench");
    let sessions: usize = args
        .iter()
        .find_map(|a| a.parse().ok())
        .unwrap_or(if benching { 1000 } else { 50 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(sessions));
}

async fn run(sessions: usize) {
    let sink = Arc::new(Sink::default());
    let hs = homeserver(sink.clone()).await;
    let llm = model().await;
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse(&format!(
        r#"
homeserver: {{ url: "{hs}", server_name: bench }}
appservice: {{ id: bench, as_token: bench-as, hs_token: bench-hs }}
store: {{ path: "{}" }}
providers:
  stub: {{ api: openai-completions, base_url: "{llm}", timeout: 30s, max_concurrency: {sessions} }}
llm: {{ max_concurrency: {sessions} }}
agents:
  - {{ id: damon, provider: stub, model: stub-model, system_prompt: "You are Damon." }}
"#,
        dir.path().display()
    ))
    .unwrap();
    config.validate().unwrap();
    let config = Arc::new(config);
    let store = agentbus::store::open(&agentbus::config::StoreConfig {
        path: dir.path().to_owned(),
        ..Default::default()
    })
    .unwrap();
    let matrix = MatrixClient::new(&hs, "bench-as", RetryPolicy::default());
    let hub = LlmHub::new(config.clone(), build_providers(&config));
    let agents = AgentRuntime::new(
        config.clone(),
        matrix,
        store,
        hub,
        Default::default(),
        Default::default(),
    );
    let sender: OwnedUserId = "@alice:bench".try_into().unwrap();

    // Warm up: connection pools, the store, lazy statics.
    let turn = |i: usize| Turn {
        room_id: OwnedRoomId::try_from(format!("!room{i}")).unwrap(),
        event_id: OwnedEventId::try_from(format!("$question{i}")).unwrap(),
        sender: sender.clone(),
        sender_name: "alice".into(),
        body: format!("question number {i}: how do sessions scale?"),
        image: None,
        reply_to: None,
        thread_root: None,
        hops: 1,
        group: false,
        ts: agentbus::unix_ms(),
    };
    let damon = AgentId::parse("damon").unwrap();
    let ask = |turns: Vec<Turn>| {
        let receivers: Vec<_> = turns
            .into_iter()
            .map(|t| match agents.submit(Job::reply(&damon, t)) {
                Submitted::Queued { outcome, .. } => outcome,
                other => panic!("a fresh session is never busy: {other:?}"),
            })
            .collect();
        futures::future::join_all(receivers)
    };
    ask((0..10).map(|i| turn(1_000_000 + i)).collect()).await;
    let sends_before = sink.sends.load(Ordering::Relaxed);
    let edits_before = sink.edits.load(Ordering::Relaxed);

    let (rss_before, _) = memory();
    let started = Instant::now();
    let all = ask((0..sessions).map(turn).collect());
    // Sample while it runs: how many lanes are live at once.
    let mut peak_lanes = 0;
    let mut all = std::pin::pin!(all);
    loop {
        tokio::select! {
            _ = &mut all => break,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                peak_lanes = peak_lanes.max(agents.active_sessions());
            }
        }
    }
    let elapsed = started.elapsed();
    let (rss_after, peak) = memory();
    let sends = sink.sends.load(Ordering::Relaxed) - sends_before;
    let edits = sink.edits.load(Ordering::Relaxed) - edits_before;
    let deltas = (sessions * DELTAS) as f64;
    println!("sessions                 {sessions}");
    println!("live lanes at peak       {peak_lanes} (10 of them from the warm-up)");
    println!(
        "answer length            {DELTAS} deltas, {PAUSE:?} apart (≥ {:?} per answer)",
        PAUSE * DELTAS as u32
    );
    println!("wall time                {:.2} s", elapsed.as_secs_f64());
    println!(
        "deltas/s                 {:.0}",
        deltas / elapsed.as_secs_f64()
    );
    println!("messages sent / edits    {sends} / {edits}");
    println!(
        "RSS before               {:.1} MiB",
        rss_before as f64 / 1024.0
    );
    println!("peak RSS (VmHWM)         {:.1} MiB", peak as f64 / 1024.0);
    println!(
        "RSS after                {:.1} MiB",
        rss_after as f64 / 1024.0
    );
    println!(
        "per-session overhead     {:.1} KiB (peak − before, / sessions)",
        peak.saturating_sub(rss_before) as f64 / sessions as f64
    );
    assert_eq!(sends as usize, sessions, "every session posted one answer");
    assert!(
        edits as usize >= sessions,
        "every streamed answer was finished by an edit"
    );
}
