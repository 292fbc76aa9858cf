//! Transaction intake: 100-event transactions through the real axum handler with durable
//! journaling (atomic sled batch + flush) on a temp directory, AND the inbox draining them
//! (routing every event, writing its history line, finishing it in the journal) — the
//! backlog bound makes acks wait for the drain, so the numbers are acked-and-drained. The
//! homeserver is a stub that answers every room lookup `M_FORBIDDEN` (rooms no agent is in).
//!
//! `cargo bench --bench intake` prints criterion's time per transaction (and events/s via
//! its throughput line), then a latency distribution over 3,000 sequential transactions
//! (Synapse keeps one transaction in flight per appservice, so sequential is the real load).

use std::time::{Duration, Instant};

use agentbus::config::Config;
use agentbus::server::Services;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const EVENTS_PER_TRANSACTION: usize = 100;

/// The binary's allocator, so the bench measures what runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A homeserver that knows no room: every request is answered 403 `M_FORBIDDEN`.
async fn forbidding_homeserver() -> String {
    let app = axum::Router::new().fallback(|| async {
        (
            StatusCode::FORBIDDEN,
            axum::Json(serde_json::json!({"errcode": "M_FORBIDDEN", "error": "not in room"})),
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// The real HTTP app with the inbox draining behind it.
async fn app(dir: &std::path::Path, shutdown: &CancellationToken) -> (axum::Router, Services) {
    let homeserver = forbidding_homeserver().await;
    let config = Config::parse(&format!(
        r#"
homeserver: {{ url: "{homeserver}", server_name: example.org }}
appservice: {{ as_token: as-secret, hs_token: hs-secret }}
admin: {{ token: admin-secret }}
providers: {{ echo: {{ api: echo }} }}
agents: [ {{ id: damon, provider: echo }}, {{ id: coder, provider: echo }} ]
"#
    ))
    .unwrap();
    let store = agentbus::store::open(&agentbus::config::StoreConfig {
        path: dir.to_owned(),
        ..Default::default()
    })
    .unwrap();
    let mut services = Services::with_store(config, store);
    services.start_workers(None, shutdown);
    (services.app(), services)
}

/// A realistic transaction: 100 `m.room.message` events (Element-shaped, ~600 bytes each)
/// spread over 10 rooms.
fn transaction_body(txn: u64) -> String {
    let events: Vec<serde_json::Value> = (0..EVENTS_PER_TRANSACTION)
        .map(|i| {
            serde_json::json!({
                "type": "m.room.message",
                "room_id": format!("!room{}:example.org", i % 10),
                "sender": format!("@user{}:example.org", i % 7),
                "event_id": format!("$txn{txn}-ev{i}-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"),
                "origin_server_ts": 1_700_000_000_000u64 + i as u64,
                "unsigned": {"age": 42, "transaction_id": "m1700000000000.7"},
                "content": {
                    "msgtype": "m.text",
                    "body": "@coder could you look at why the nightly build fails on the arm64 runner? 构建在 arm64 上失败了",
                    "m.mentions": {"user_ids": ["@coder:example.org"]},
                    "format": "org.matrix.custom.html",
                    "formatted_body": "<a href=\"https://matrix.to/#/@coder:example.org\">Coder</a> could you look at why the nightly build fails?",
                },
            })
        })
        .collect();
    serde_json::json!({ "events": events }).to_string()
}

async fn put(app: &axum::Router, txn: u64, body: String) {
    let request = Request::put(format!("/_matrix/app/v1/transactions/bench-{txn}"))
        .header("authorization", "Bearer hs-secret")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

fn bench_intake(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let (app, services) = runtime.block_on(app(dir.path(), &shutdown));

    let mut group = c.benchmark_group("intake");
    group.throughput(Throughput::Elements(EVENTS_PER_TRANSACTION as u64));
    group.measurement_time(Duration::from_secs(10));
    let mut txn = 0u64;
    group.bench_function(
        "100-event transaction, journaled, flushed and drained",
        |b| {
            b.iter_batched(
                || {
                    txn += 1;
                    (txn, transaction_body(txn))
                },
                |(txn, body)| runtime.block_on(put(&app, txn, body)),
                criterion::BatchSize::SmallInput,
            )
        },
    );
    group.finish();

    // Latency distribution (criterion reports means, not tails); only under `cargo bench`,
    // not when `cargo test --all-targets` smoke-runs this bench.
    if !std::env::args().any(|a| a == "--bench") {
        shutdown.cancel();
        runtime.block_on(services.drain(Duration::from_secs(5)));
        return;
    }
    let mut samples = Vec::with_capacity(3000);
    for _ in 0..3000 {
        txn += 1;
        let body = transaction_body(txn);
        let start = Instant::now();
        runtime.block_on(put(&app, txn, body));
        samples.push(start.elapsed());
    }
    // Wait for the drain of the last transactions, so the figure covers it.
    let drain = Instant::now();
    runtime.block_on(async {
        while services.backlog.pending() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let drain_tail = drain.elapsed();
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    let total: Duration = samples.iter().sum();
    println!(
        "intake latency over {} transactions: p50 {:?}, p99 {:?}, max {:?}; {:.0} events/s acked and drained (drain tail {:?})",
        samples.len(),
        pct(0.50),
        pct(0.99),
        samples.last().unwrap(),
        (samples.len() * EVENTS_PER_TRANSACTION) as f64 / (total + drain_tail).as_secs_f64(),
        drain_tail,
    );
    shutdown.cancel();
    runtime.block_on(services.drain(Duration::from_secs(5)));
}

criterion_group!(benches, bench_intake);
criterion_main!(benches);
