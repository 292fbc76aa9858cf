//! Shutdown, in process: the real services (store on disk, inbox, agent runtime, echo
//! model) behind the real HTTP app, with a recording homeserver stub whose message sends
//! the test holds and releases. Shutdown lets an answer in flight finish and then returns
//! at once (idle session lanes do not hold it up); an answer still unfinished when the
//! grace period ends is stopped, and its event stays journaled for the next start.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentbus::config::Config;
use agentbus::config::StoreConfig;
use agentbus::server::Services;
use agentbus::store::{Partition, Stores};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{Request, StatusCode};
use axum::routing::{get, put};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// A homeserver that says every room is a DM of alice and damon, and records the messages
/// sent — each send answered only once the test releases it.
#[derive(Clone)]
struct Homeserver {
    sent: Arc<Mutex<Vec<Value>>>,
    arrived: mpsc::UnboundedSender<()>,
    release: Arc<Notify>,
}

async fn homeserver() -> (String, Homeserver, mpsc::UnboundedReceiver<()>) {
    let (arrived, arrivals) = mpsc::unbounded_channel();
    let hs = Homeserver {
        sent: Arc::default(),
        arrived,
        release: Arc::new(Notify::new()),
    };
    let app = axum::Router::new()
        .route(
            "/_matrix/client/v3/rooms/{room}/joined_members",
            get(|| async {
                axum::Json(json!({"joined": {
                    "@alice:hs": {"display_name": "Alice"},
                    "@damon:hs": {"display_name": "Damon"},
                }}))
            }),
        )
        .route(
            "/_matrix/client/v3/rooms/{room}/send/{kind}/{txn}",
            put(
                |State(hs): State<Homeserver>,
                 Path((_, _, txn)): Path<(String, String, String)>,
                 axum::Json(content): axum::Json<Value>| async move {
                    let released = hs.release.notified();
                    let _ = hs.arrived.send(());
                    released.await;
                    let mut sent = hs.sent.lock().unwrap();
                    sent.push(json!({"txn": txn, "content": content}));
                    axum::Json(json!({"event_id": format!("$answer{}", sent.len())}))
                },
            ),
        )
        .fallback(|| async { (StatusCode::OK, axum::Json(json!({}))) })
        .with_state(hs.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, hs, arrivals)
}

fn services(homeserver: &str, dir: &std::path::Path) -> (Services, Stores) {
    let config = Config::parse(&format!(
        r#"
homeserver: {{ url: "{homeserver}", server_name: hs }}
appservice: {{ as_token: as-secret, hs_token: hs-secret }}
admin: {{ token: admin-secret }}
channels: {{ matrix: {{ dm_policy: open }} }}
providers: {{ echo: {{ api: echo }} }}
agents: [ {{ id: damon, provider: echo }} ]
"#
    ))
    .unwrap();
    let store = agentbus::store::open(&StoreConfig {
        path: dir.to_owned(),
        ..Default::default()
    })
    .unwrap();
    (Services::with_store(config, store.clone()), store)
}

/// Delivers one DM message from alice as the homeserver would.
async fn deliver(app: &axum::Router, event_id: &str) {
    let body = json!({"events": [{
        "type": "m.room.message", "room_id": "!dm:hs", "sender": "@alice:hs",
        "event_id": event_id, "origin_server_ts": 1,
        "content": {"msgtype": "m.text", "body": "hello there"},
    }]});
    let request = Request::put(format!("/_matrix/app/v1/transactions/{event_id}"))
        .header("authorization", "Bearer hs-secret")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

/// Running services with one DM message delivered, once its answer has reached the
/// homeserver (which holds the send until released), and shutdown begun.
async fn answer_in_flight(event_id: &str) -> (Services, Stores, Homeserver, tempfile::TempDir) {
    let (url, hs, mut arrivals) = homeserver().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut services, store) = services(&url, dir.path());
    let shutdown = CancellationToken::new();
    services.start_workers(None, &shutdown);
    deliver(&services.app(), event_id).await;
    arrivals
        .recv()
        .await
        .expect("the answer reaches the homeserver");
    shutdown.cancel();
    (services, store, hs, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_answer_in_flight_finish_then_returns() {
    let (services, store, hs, _dir) = answer_in_flight("$q1").await;
    // An hour of grace: only a task that never ends could use it up.
    let drain = tokio::spawn(services.drain(Duration::from_secs(3600)));
    hs.release.notify_waiters();
    let finished = tokio::time::timeout(Duration::from_secs(60), drain)
        .await
        .expect("shutdown returns once the answer is delivered; nothing idle holds it up")
        .unwrap();
    assert!(finished, "everything finished within the grace period");

    let sent = hs.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1, "one answer: {sent:?}");
    assert_eq!(
        sent[0]["content"]["m.relates_to"]["m.in_reply_to"]["event_id"],
        "$q1"
    );
    assert_eq!(
        store.journal.pending_count().await.unwrap(),
        0,
        "the answered event left the journal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_unfinished_when_the_grace_period_ends_stays_journaled() {
    let (services, store, hs, _dir) = answer_in_flight("$q2").await;
    // The homeserver never answers the send: the grace period runs out.
    let finished = tokio::time::timeout(
        Duration::from_secs(60),
        services.drain(Duration::from_millis(200)),
    )
    .await
    .expect("shutdown stops what is left after the grace period");
    assert!(!finished);
    assert!(hs.sent.lock().unwrap().is_empty());
    // Long after the drained inbox's lease ran out, as a restarted process would.
    let lease = store
        .journal
        .claim(
            "restarted",
            &Partition::all(),
            Duration::from_secs(60),
            u64::MAX / 2,
        )
        .await
        .unwrap();
    let pending = store
        .journal
        .pending_events(&lease, None, 10)
        .await
        .unwrap();
    assert_eq!(pending.len(), 1, "the unanswered event stays journaled");
    assert_eq!(pending[0].event_id, "$q2");
}
