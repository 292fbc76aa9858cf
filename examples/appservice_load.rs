//! HTTP load against a running `agentbus serve`, with this process playing the homeserver.
//!
//! Three modes, each over plain HTTP against the real binary (`scripts/load.sh` sets up a
//! throwaway Synapse and agentbus and runs them all):
//!
//! **`--mode transactions`** (default) PUTs `--events` Element-shaped `m.room.message` events
//! to `/_matrix/app/v1/transactions/{txnId}` in transactions of `--batch`, spread over
//! `--rooms` rooms that no agent is in, exactly one transaction in flight at a time (as
//! Synapse sends them). Event IDs and txnIds carry a per-run id, so reruns against the same
//! store are new work, not redeliveries. It reports
//! - **acknowledged events/s**: events / wall time from the first send to the last `200`;
//! - ack latency per transaction, p50/p90/p99/max (exact, from the sorted samples);
//! - every non-200 and every transport error, with status and body (counted; exit 1);
//! - **drained events/s**: events / time from the first send until `GET {url}/metrics`
//!   (Prometheus text) shows `agentbus_journal_pending` at 0, i.e. until every journaled
//!   event has been routed and finished. Without `/metrics` (404) it says the drain is not
//!   measurable and exits 1.
//!
//! ```sh
//! cargo run --release --example appservice_load -- --url http://127.0.0.1:9000 \
//!     --hs-token TOKEN --events 200000 --batch 100 --rooms 1000 --server-name localhost
//! ```
//!
//! **`--mode echo`** measures what a person feels: `--conversations` humans, registered
//! through Synapse's shared-secret admin API, each open a DM with `--agent` (an agent on the
//! `echo` provider), wait for it to join, then send `--messages` messages one after another.
//! Each message's latency is the time from the send request until the agent's reply (an
//! `m.room.message` from the agent whose `m.relates_to.m.in_reply_to.event_id` is the
//! message; edits ignored) shows up in that human's `/sync` long-poll. It reports
//! p50/p90/p99/max and messages/s over all conversations running at once.
//!
//! ```sh
//! cargo run --release --example appservice_load -- --mode echo --conversations 10 \
//!     --messages 20 --homeserver http://127.0.0.1:8008 --server-name localhost \
//!     --shared-secret-file /tmp/synapse/shared_secret
//! ```
//!
//! **`--mode team`** measures a team's task end to end: `--concurrency` humans (registered
//! the same way) each create a private group room and invite `--team` (a team's user) and
//! its `--team-agents`, wait until all of them have joined, then send tasks, one at a time
//! per room, `--tasks` in all: `@devteam task N: …`, a typed mention. The team answers in
//! the request's thread with one status notice (`🧭 <team> · …`, `m.relates_to` an
//! `m.thread` on the request) that it edits as the task moves on. A task's latency is the
//! time from the send request until the human's `/sync` shows the status edit (`m.replace`
//! of the status) whose `m.new_content.body` says `✅ done`; a final status with ❌, ⛔, 🛑
//! or ⏱ is a failed task (reported; exit 1). It reports tasks/s over all rooms at once,
//! p50/p90/p99/max latency, the time to the status message, and the messages and edits the
//! team and its agents posted per task. On the `echo` provider model time is ~0, so this
//! is agentbus + homeserver time per task.
//!
//! ```sh
//! cargo run --release --example appservice_load -- --mode team --tasks 100 \
//!     --concurrency 100 --team devteam --team-agents damon,coder,researcher,writer,tester \
//!     --homeserver http://127.0.0.1:8008 --server-name localhost \
//!     --shared-secret-file DIR/shared_secret
//! ```
//!
//! Only loopback URLs are accepted, every count is bounded, and `--timeout` bounds the run.
//! The timings include this driver's own work on the same machine: its bodies are built on
//! a thread of their own, ahead of the sends, which shares the cores with agentbus.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use url::Url;

#[derive(Parser)]
#[command(about = "HTTP load against a running agentbus, playing the homeserver")]
struct Args {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Transactions)]
    mode: Mode,
    /// agentbus' appservice listener (transactions mode).
    #[arg(long)]
    url: Option<String>,
    /// The hs_token of the registration (transactions mode).
    #[arg(long, env = "AGENTBUS_HS_TOKEN", hide_env_values = true)]
    hs_token: Option<String>,
    /// Events to deliver in total.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    events: u64,
    /// Events per transaction (Synapse sends at most 100).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    batch: u64,
    /// Rooms the events are spread over (round robin; no agent is in any of them).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    rooms: u64,
    /// The homeserver's server name (the part after ':' in user and room IDs).
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Where the metrics are (default: {url}/metrics).
    #[arg(long)]
    metrics_url: Option<String>,
    /// How long to wait for the journal to drain after the last acknowledgement.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Concurrent DM conversations (echo mode).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=200))]
    conversations: u64,
    /// Messages per conversation, sent one after another (echo mode).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    messages: u64,
    /// The homeserver's client-server API (echo mode).
    #[arg(long)]
    homeserver: Option<String>,
    /// File holding Synapse's `registration_shared_secret`, used to register the humans
    /// (echo mode; `scripts/dev-homeserver.sh` writes it to <dir>/shared_secret).
    #[arg(long)]
    shared_secret_file: Option<std::path::PathBuf>,
    /// Localpart of the agent the humans talk to (echo mode).
    #[arg(long, default_value = "damon")]
    agent: String,
    /// How long one reply may take before it counts as missing (echo mode).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    reply_timeout: Duration,
    /// Localpart of the team the tasks are for (team mode).
    #[arg(long, default_value = "devteam")]
    team: String,
    /// Localparts of the team's agents, comma-separated: invited with the team, and the
    /// room is ready once all of them have joined (team mode).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "damon,coder,researcher,writer,tester"
    )]
    team_agents: Vec<String>,
    /// Tasks to send in total (team mode).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    tasks: u64,
    /// Tasks in flight at once, one room (and one human) per slot (team mode).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=200))]
    concurrency: u64,
    /// How long one task may take, send to final status, before it counts as missing
    /// (team mode).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    task_timeout: Duration,
    /// `name=pid` of a local process whose CPU time (user + system, from /proc) over the
    /// timed part is reported, e.g. `synapse=1234`; repeatable (team mode).
    #[arg(long = "cpu-pid", value_parser = parse_cpu_pid)]
    cpu_pids: Vec<(String, u32)>,
    /// The whole run is abandoned (exit 1) after this long.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Homeserver → agentbus transactions: acknowledged and drained events/s.
    Transactions,
    /// Human → homeserver → agentbus → echo agent → homeserver → human latency.
    Echo,
    /// A task for a star team, from the human's message to the team's final status.
    Team,
}

/// A failure that ends the run, said in one line.
type Failure = String;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let timeout = args.timeout;
    let run = async {
        match args.mode {
            Mode::Transactions => run_transactions(&args).await,
            Mode::Echo => run_echo(&args).await,
            Mode::Team => run_team(&args).await,
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(failure)) => {
            eprintln!("appservice_load: {failure}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!(
                "appservice_load: gave up after --timeout {}",
                humantime::format_duration(timeout)
            );
            ExitCode::FAILURE
        }
    }
}

/// `raw` parsed, if it is an http URL on a loopback address: this driver is for local runs.
fn loopback_url(flag: &str, raw: &str) -> Result<Url, Failure> {
    let url = Url::parse(raw).map_err(|e| format!("{flag} {raw:?}: {e}"))?;
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name == "localhost",
        None => false,
    };
    if url.scheme() != "http" || !loopback {
        return Err(format!(
            "{flag} {raw:?}: only http:// on a loopback address (127.0.0.1, ::1, localhost)"
        ));
    }
    Ok(url)
}

/// `base` with `path` appended (base may end in `/` or not).
fn join(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    let joined = format!("{}{path}", base.path().trim_end_matches('/'));
    url.set_path(&joined);
    url
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(90))
        .build()
        .expect("an HTTP client with default TLS settings builds")
}

/// An id for this run that later runs will not repeat: seconds and process id.
fn run_id() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    format!("{secs:x}{:x}", std::process::id())
}

// ----------------------------------------------------------------- transactions --

async fn run_transactions(args: &Args) -> Result<(), Failure> {
    let url = loopback_url(
        "--url",
        args.url
            .as_deref()
            .ok_or("--url is required in transactions mode")?,
    )?;
    let hs_token = args
        .hs_token
        .as_deref()
        .ok_or("--hs-token (or AGENTBUS_HS_TOKEN) is required in transactions mode")?;
    let metrics_url = match &args.metrics_url {
        Some(raw) => loopback_url("--metrics-url", raw)?,
        None => join(&url, "/metrics"),
    };
    let http = http_client();
    let run = run_id();
    let transactions = args.events.div_ceil(args.batch);
    println!(
        "transactions: run {run}: {} events in {transactions} transactions of ≤{} over {} rooms → {url}",
        args.events, args.batch, args.rooms
    );

    // Before: what the journal already holds (a rerun against a busy store drains that too).
    let before = scrape(&http, &metrics_url).await;
    match &before {
        Ok(m) => println!(
            "metrics before: pending {}, journaled {}, finished {}",
            show(m.pending),
            show(m.journaled),
            show(m.finished)
        ),
        Err(why) => println!("metrics before: {why}"),
    }

    // The drain watcher samples /metrics from the first send until pending is 0 after the
    // last acknowledgement; a sample only counts as drained if it was taken after that.
    let acks_done = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let watcher = tokio::spawn(watch_drain(
        http.clone(),
        metrics_url.clone(),
        acks_done.clone(),
        start,
        args.drain_timeout,
    ));

    let mut latencies = Vec::with_capacity(transactions as usize);
    let (mut acked_events, mut failures) = (0u64, 0u64);
    // Bodies are built on a thread of their own, a few ahead, the way a homeserver has its
    // next transaction ready: the sending loop below only sends and waits.
    let (bodies, mut ready) = tokio::sync::mpsc::channel::<(u64, Vec<u8>)>(16);
    let builder = std::thread::spawn({
        let (run, server, rooms, batch, events) = (
            run.clone(),
            args.server_name.clone(),
            args.rooms,
            args.batch,
            args.events,
        );
        move || {
            let mut busy = Duration::ZERO;
            let mut sent = 0u64;
            while sent < events {
                let count = batch.min(events - sent);
                let started = Instant::now();
                let body = transaction_body(&run, &server, rooms, sent, count);
                busy += started.elapsed();
                sent += count;
                if bodies.blocking_send((count, body)).is_err() {
                    break;
                }
            }
            busy
        }
    });
    for txn in 0..transactions {
        let Some((count, body)) = ready.recv().await else {
            break;
        };
        let target = join(
            &url,
            &format!("/_matrix/app/v1/transactions/load-{run}-{txn}"),
        );
        let t0 = Instant::now();
        let response = http
            .put(target)
            .bearer_auth(hs_token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        match response {
            Ok(response) if response.status() == reqwest::StatusCode::OK => {
                // The body is `{}`; reading it completes the exchange on this connection.
                let _ = response.bytes().await;
                latencies.push(t0.elapsed());
                acked_events += count;
            }
            Ok(response) => {
                failures += 1;
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                eprintln!("transaction {txn}: HTTP {status}: {body}");
            }
            Err(e) => {
                failures += 1;
                eprintln!("transaction {txn}: {}", error_chain(&e));
            }
        }
        if failures >= 20 && acked_events == 0 {
            return Err(format!(
                "the first {failures} transactions all failed; stopping"
            ));
        }
    }
    let ack_wall = start.elapsed();
    acks_done.store(true, Ordering::SeqCst);
    drop(ready);
    let build_time = builder.join().map_err(|_| "the body builder panicked")?;

    println!(
        "acknowledged: {acked_events} events in {} transactions",
        latencies.len()
    );
    println!(
        "acknowledged events/s: {:.0}  (wall time of all acks {:.2} s; building bodies, on a thread of their own, took {:.2} s)",
        acked_events as f64 / ack_wall.as_secs_f64(),
        ack_wall.as_secs_f64(),
        build_time.as_secs_f64()
    );
    println!(
        "ack latency per transaction: {}",
        Percentiles::of(&mut latencies)
    );
    println!("non-200 or failed transactions: {failures}");

    let drain = watcher.await.map_err(|e| format!("drain watcher: {e}"))?;
    let drained = match drain {
        Drain::Drained {
            at,
            max_pending,
            after,
        } => {
            println!(
                "drained events/s: {:.0}  (journal pending reached 0 {:.2} s after the first send; \
                 max pending seen {max_pending})",
                acked_events as f64 / at.as_secs_f64(),
                at.as_secs_f64()
            );
            if let (Ok(b), Some(a)) = (&before, after) {
                println!(
                    "metrics after: journaled +{}, finished +{}",
                    delta(b.journaled, a.journaled),
                    delta(b.finished, a.finished)
                );
            }
            Ok(())
        }
        Drain::NotMeasurable(why) => {
            println!("drain not measurable: {why}");
            Err(format!("drain not measurable: {why}"))
        }
        Drain::TimedOut { pending } => {
            println!(
                "drain: journal still had {pending} pending {} after the last ack",
                humantime::format_duration(args.drain_timeout)
            );
            Err("the journal did not drain within --drain-timeout".to_owned())
        }
    };
    if failures > 0 {
        return Err(format!(
            "{failures} transactions were not acknowledged with 200"
        ));
    }
    drained
}

/// One transaction body: `count` events numbered from `first` in this run.
fn transaction_body(run: &str, server: &str, rooms: u64, first: u64, count: u64) -> Vec<u8> {
    // Sentences a team writes, CJK among them; no mentions, so nobody is addressed.
    const BODIES: [&str; 6] = [
        "the nightly build failed again on the arm64 runner, looking into it now",
        "构建在 arm64 上又失败了，我先看一下日志",
        "can someone review the migration PR before lunch? it touches the billing tables",
        "deployed 1.4.2 to staging; smoke tests are green, canary goes out at 15:00",
        "明天的会议改到下午三点，议程在共享文档里",
        "heads up: the search index rebuild will slow queries for about twenty minutes",
    ];
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let events: Vec<Value> = (first..first + count)
        .map(|n| {
            // Room versions ≥ 4 use the unpadded url-safe base64 of a SHA-256 as event ID.
            let digest = Sha256::digest(format!("{run}/{n}").as_bytes());
            let event_id = format!(
                "${}",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest)
            );
            json!({
                "type": "m.room.message",
                "room_id": format!("!load-{run}-{}:{server}", n % rooms),
                "sender": format!("@load-user{}:{server}", n % 97),
                "event_id": event_id,
                "origin_server_ts": now_ms,
                "content": {
                    "msgtype": "m.text",
                    "body": BODIES[(n % BODIES.len() as u64) as usize],
                    "m.mentions": {},
                },
                "unsigned": { "age": 37, "membership": "join" },
            })
        })
        .collect();
    serde_json::to_vec(&json!({ "events": events })).expect("JSON values serialise")
}

/// How the journal drain ended.
enum Drain {
    Drained {
        /// From the first send.
        at: Duration,
        max_pending: u64,
        after: Option<Metrics>,
    },
    NotMeasurable(String),
    TimedOut {
        pending: u64,
    },
}

async fn watch_drain(
    http: reqwest::Client,
    url: Url,
    acks_done: Arc<AtomicBool>,
    start: Instant,
    drain_timeout: Duration,
) -> Drain {
    let mut max_pending = 0;
    let mut deadline: Option<Instant> = None;
    loop {
        let done = acks_done.load(Ordering::SeqCst);
        let sample = scrape(&http, &url).await;
        let sampled = start.elapsed();
        let metrics = match sample {
            Ok(metrics) => metrics,
            Err(why) => return Drain::NotMeasurable(why),
        };
        let Some(pending) = metrics.pending else {
            return Drain::NotMeasurable(format!("{url} has no agentbus_journal_pending"));
        };
        max_pending = max_pending.max(pending);
        if done {
            if pending == 0 {
                return Drain::Drained {
                    at: sampled,
                    max_pending,
                    after: Some(metrics),
                };
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + drain_timeout);
            if Instant::now() >= deadline {
                return Drain::TimedOut { pending };
            }
        }
        // Often enough for a drain of seconds; rare enough not to load the server.
        tokio::time::sleep(Duration::from_millis(if done { 50 } else { 250 })).await;
    }
}

/// The agentbus metrics this driver reads; `None` when the exposition lacks one.
#[derive(Clone, Copy)]
struct Metrics {
    pending: Option<u64>,
    journaled: Option<u64>,
    finished: Option<u64>,
}

async fn scrape(http: &reqwest::Client, url: &Url) -> Result<Metrics, String> {
    let response = http
        .get(url.clone())
        .send()
        .await
        .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
    match response.status() {
        reqwest::StatusCode::OK => {}
        reqwest::StatusCode::NOT_FOUND => return Err("/metrics missing".to_owned()),
        status => {
            let body = response.text().await.unwrap_or_default();
            return Err(format!("GET {url}: HTTP {status}: {body}"));
        }
    }
    let text = response
        .text()
        .await
        .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
    Ok(Metrics {
        pending: metric(&text, "agentbus_journal_pending"),
        journaled: metric(&text, "agentbus_events_journaled_total"),
        finished: metric(&text, "agentbus_events_finished_total"),
    })
}

/// The value of `name` in Prometheus text exposition, summed over its label sets.
fn metric(text: &str, name: &str) -> Option<u64> {
    let mut total = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // `name 12`, `name{a="b"} 12`, optionally followed by a timestamp.
        let value = if let Some(labelled) = rest.strip_prefix('{') {
            labelled.rsplit_once('}').map(|(_, v)| v)
        } else if rest.starts_with([' ', '\t']) {
            Some(rest)
        } else {
            None // a longer name with this prefix
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next())
            && let Ok(v) = v.parse::<f64>()
        {
            *total.get_or_insert(0) += v as u64;
        }
    }
    total
}

fn show(value: Option<u64>) -> String {
    value.map_or_else(|| "absent".to_owned(), |v| v.to_string())
}

fn delta(before: Option<u64>, after: Option<u64>) -> String {
    match (before, after) {
        (Some(b), Some(a)) => a.saturating_sub(b).to_string(),
        _ => "absent".to_owned(),
    }
}

// ------------------------------------------------------------------------- echo --

async fn run_echo(args: &Args) -> Result<(), Failure> {
    let homeserver = loopback_url(
        "--homeserver",
        args.homeserver
            .as_deref()
            .ok_or("--homeserver is required in echo mode")?,
    )?;
    let secret_file = args
        .shared_secret_file
        .as_ref()
        .ok_or("--shared-secret-file is required in echo mode")?;
    let secret = std::fs::read_to_string(secret_file)
        .map_err(|e| format!("--shared-secret-file {}: {e}", secret_file.display()))?
        .trim()
        .to_owned();
    let agent = format!("@{}:{}", args.agent, args.server_name);
    let http = http_client();
    let run = run_id();
    println!(
        "echo: run {run}: {} conversations × {} messages with {agent} via {homeserver}",
        args.conversations, args.messages
    );

    // Setup (register, DM, agent joins) for every conversation first, concurrently; the
    // timed part starts once all are ready.
    let setup_started = Instant::now();
    let mut setups = tokio::task::JoinSet::new();
    for i in 0..args.conversations {
        let conversation = Conversation {
            http: http.clone(),
            homeserver: homeserver.clone(),
            agent: agent.clone(),
            members: vec![agent.clone()],
            direct: true,
            localpart: format!("load{run}h{i}"),
            access_token: String::new(),
            room_id: String::new(),
            since: String::new(),
        };
        let secret = secret.clone();
        setups.spawn(async move { conversation.set_up(&secret).await });
    }
    let mut conversations = Vec::new();
    while let Some(joined) = setups.join_next().await {
        conversations.push(joined.map_err(|e| format!("setup task: {e}"))??);
    }
    println!(
        "set up {} DMs in {:.2} s",
        conversations.len(),
        setup_started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let mut runs = tokio::task::JoinSet::new();
    for (i, conversation) in conversations.into_iter().enumerate() {
        let (messages, reply_timeout, run) = (args.messages, args.reply_timeout, run.clone());
        runs.spawn(async move {
            conversation
                .converse(&format!("{run}-{i}"), messages, reply_timeout)
                .await
        });
    }
    let (mut latencies, mut missing) = (Vec::new(), 0u64);
    while let Some(finished) = runs.join_next().await {
        let outcome = finished.map_err(|e| format!("conversation task: {e}"))??;
        latencies.extend(outcome.latencies);
        missing += outcome.missing;
    }
    let wall = started.elapsed();
    println!(
        "replies: {} of {} ({missing} missing after --reply-timeout)",
        latencies.len(),
        args.conversations * args.messages
    );
    println!(
        "messages/s: {:.2}  ({} conversations at once, {:.2} s wall)",
        latencies.len() as f64 / wall.as_secs_f64(),
        args.conversations,
        wall.as_secs_f64()
    );
    println!("send → reply latency: {}", Percentiles::of(&mut latencies));
    if missing > 0 {
        return Err(format!("{missing} messages got no reply"));
    }
    Ok(())
}

/// One human and their room: a DM with the agent (echo mode), or a group room with a
/// team and its agents (team mode).
struct Conversation {
    http: reqwest::Client,
    homeserver: Url,
    /// Whose replies count (echo mode); the team user (team mode).
    agent: String,
    /// Who is invited when the room is created, and must have joined before it is ready.
    members: Vec<String>,
    /// A DM (`is_direct`, trusted private chat) rather than a private group room.
    direct: bool,
    localpart: String,
    access_token: String,
    room_id: String,
    /// The `/sync` token to continue from.
    since: String,
}

/// What one conversation measured.
struct Outcome {
    latencies: Vec<Duration>,
    missing: u64,
}

impl Conversation {
    /// Registers the human, opens the room, waits for every member to join, syncs once.
    async fn set_up(mut self, secret: &str) -> Result<Conversation, Failure> {
        self.access_token = self.register(secret).await?;
        let room = if self.direct {
            json!({ "is_direct": true, "preset": "trusted_private_chat", "invite": self.members })
        } else {
            json!({ "preset": "private_chat", "name": format!("team load {}", self.localpart),
                    "invite": self.members })
        };
        let created = self
            .call(
                reqwest::Method::POST,
                "/_matrix/client/v3/createRoom",
                Some(room),
            )
            .await?;
        self.room_id = created["room_id"]
            .as_str()
            .ok_or_else(|| format!("createRoom answered without room_id: {created}"))?
            .to_owned();
        let members = format!(
            "/_matrix/client/v3/rooms/{}/joined_members",
            encode(&self.room_id)
        );
        // A DM has one member to wait for; a team's room has several, and many rooms set
        // up at once on one homeserver queue their joins, so those poll less often (the
        // polls would compete with the joins) and wait longer.
        let (poll, wait) = if self.direct {
            (Duration::from_millis(100), Duration::from_secs(60))
        } else {
            (Duration::from_millis(1000), Duration::from_secs(600))
        };
        let deadline = Instant::now() + wait;
        loop {
            let joined = self.call(reqwest::Method::GET, &members, None).await?;
            let missing: Vec<&String> = self
                .members
                .iter()
                .filter(|m| joined["joined"].get(m.as_str()).is_none())
                .collect();
            if missing.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{missing:?} did not join {} within {}: {joined}",
                    self.room_id,
                    humantime::format_duration(wait)
                ));
            }
            tokio::time::sleep(poll).await;
        }
        // The starting point of this human's sync: everything after it is new.
        let first = self.sync(Duration::ZERO).await?;
        self.since = first["next_batch"]
            .as_str()
            .ok_or_else(|| format!("/sync answered without next_batch: {first}"))?
            .to_owned();
        Ok(self)
    }

    /// Synapse's shared-secret registration (`/_synapse/admin/v1/register`); returns the
    /// new user's access token.
    async fn register(&self, secret: &str) -> Result<String, Failure> {
        use hmac::{Hmac, Mac};
        let url = join(&self.homeserver, "/_synapse/admin/v1/register");
        let nonce: Value = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?
            .json()
            .await
            .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
        let nonce = nonce["nonce"]
            .as_str()
            .ok_or_else(|| format!("GET {url}: no nonce in {nonce}"))?;
        let password = format!("pw-{}", self.localpart);
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes())
            .map_err(|e| format!("shared secret: {e}"))?;
        mac.update(format!("{nonce}\0{}\0{password}\0notadmin", self.localpart).as_bytes());
        let body = json!({
            "nonce": nonce, "username": self.localpart, "password": password, "admin": false,
            "mac": hex::encode(mac.finalize().into_bytes()),
        });
        let response = self
            .http
            .post(url.clone())
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("POST {url}: {}", error_chain(&e)))?;
        let status = response.status();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(format!(
                "registering @{}: HTTP {status}: {answer}",
                self.localpart
            ));
        }
        answer["access_token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| {
                format!(
                    "registering @{}: no access_token in {answer}",
                    self.localpart
                )
            })
    }

    /// Sends `messages` messages one after another, each after the previous one's reply.
    async fn converse(
        mut self,
        tag: &str,
        messages: u64,
        reply_timeout: Duration,
    ) -> Result<Outcome, Failure> {
        let mut outcome = Outcome {
            latencies: Vec::new(),
            missing: 0,
        };
        for k in 0..messages {
            let path = format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/load-{tag}-{k}",
                encode(&self.room_id)
            );
            let content = json!({
                "msgtype": "m.text",
                "body": format!("load test message {k}: how is the release going?"),
                "m.mentions": {},
            });
            let t0 = Instant::now();
            let sent = self
                .call(reqwest::Method::PUT, &path, Some(content))
                .await?;
            let event_id = sent["event_id"]
                .as_str()
                .ok_or_else(|| format!("send answered without event_id: {sent}"))?
                .to_owned();
            if self.wait_reply(&event_id, t0 + reply_timeout).await? {
                outcome.latencies.push(t0.elapsed());
            } else {
                eprintln!(
                    "no reply from {} to {event_id} in {} within {}",
                    self.agent,
                    self.room_id,
                    humantime::format_duration(reply_timeout)
                );
                outcome.missing += 1;
            }
        }
        Ok(outcome)
    }

    /// Long-polls `/sync` until the agent's reply to `event_id` arrives (true) or the
    /// deadline passes (false).
    async fn wait_reply(&mut self, event_id: &str, deadline: Instant) -> Result<bool, Failure> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            // An overloaded homeserver may sit on a long-poll well past its timeout; the
            // request gives up 20 s later, and past the deadline that is a missing reply.
            let batch = match self.sync(left.min(Duration::from_secs(30))).await {
                Ok(batch) => batch,
                Err(_) if Instant::now() >= deadline => return Ok(false),
                Err(e) => return Err(e),
            };
            if let Some(next) = batch["next_batch"].as_str() {
                self.since = next.to_owned();
            }
            let timeline = &batch["rooms"]["join"][&self.room_id]["timeline"]["events"];
            let replied = timeline.as_array().into_iter().flatten().any(|event| {
                let relates = &event["content"]["m.relates_to"];
                event["type"] == "m.room.message"
                    && event["sender"] == self.agent.as_str()
                    && relates["rel_type"] != "m.replace"
                    && relates["m.in_reply_to"]["event_id"] == event_id
            });
            if replied {
                return Ok(true);
            }
        }
    }

    /// One `/sync` of this human's DM timeline, waiting up to `wait` for something new.
    async fn sync(&self, wait: Duration) -> Result<Value, Failure> {
        let filter = json!({
            "presence": { "types": [] },
            "account_data": { "types": [] },
            "room": {
                "rooms": [self.room_id],
                "timeline": { "limit": 100, "types": ["m.room.message"] },
                "state": { "types": [] },
                "ephemeral": { "types": [] },
                "account_data": { "types": [] },
            },
        });
        let mut url = join(&self.homeserver, "/_matrix/client/v3/sync");
        url.query_pairs_mut()
            .append_pair("filter", &filter.to_string())
            .append_pair("timeout", &wait.as_millis().to_string());
        if !self.since.is_empty() {
            url.query_pairs_mut().append_pair("since", &self.since);
        }
        self.send_within(
            reqwest::Method::GET,
            url,
            None,
            wait + Duration::from_secs(20),
        )
        .await
    }

    /// A client-server API call as this human at `path`.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let url = join(&self.homeserver, path);
        self.send_within(method, url, body, Duration::from_secs(90))
            .await
    }

    async fn send_within(
        &self,
        method: reqwest::Method,
        url: Url,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, Failure> {
        let what = format!("{method} {}", url.path());
        let mut request = self
            .http
            .request(method, url)
            .timeout(timeout)
            .bearer_auth(&self.access_token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("{what}: {}", error_chain(&e)))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| format!("{what}: {}", error_chain(&e)))?;
        if !status.is_success() {
            return Err(format!("{what}: HTTP {status}: {text}"));
        }
        serde_json::from_str(&text).map_err(|e| format!("{what}: not JSON ({e}): {text}"))
    }
}

/// A path segment, percent-encoded (room IDs hold `!` and `:`).
fn encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}

// ------------------------------------------------------------------------- team --

async fn run_team(args: &Args) -> Result<(), Failure> {
    let homeserver = loopback_url(
        "--homeserver",
        args.homeserver
            .as_deref()
            .ok_or("--homeserver is required in team mode")?,
    )?;
    let secret_file = args
        .shared_secret_file
        .as_ref()
        .ok_or("--shared-secret-file is required in team mode")?;
    let secret = std::fs::read_to_string(secret_file)
        .map_err(|e| format!("--shared-secret-file {}: {e}", secret_file.display()))?
        .trim()
        .to_owned();
    if args.team_agents.is_empty() || args.team_agents.len() > 50 {
        return Err("--team-agents names 1 to 50 agents".to_owned());
    }
    let team = format!("@{}:{}", args.team, args.server_name);
    let mut members = vec![team.clone()];
    members.extend(
        args.team_agents
            .iter()
            .map(|a| format!("@{}:{}", a.trim(), args.server_name)),
    );
    let slots = args.concurrency.min(args.tasks);
    let http = http_client();
    let run = run_id();
    println!(
        "team: run {run}: {} tasks for {team} (agents {}), {slots} at once in {slots} room(s) via {homeserver}",
        args.tasks,
        args.team_agents.join(", ")
    );

    // Setup (register, group room, team and agents join) for every slot first, a few at
    // once (the homeserver creates rooms one after another anyway, and a hundred waiting
    // requests would run into the client's timeout); the timed part starts once all rooms
    // are ready.
    let setup_started = Instant::now();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(10));
    let mut setups = tokio::task::JoinSet::new();
    for i in 0..slots {
        let conversation = Conversation {
            http: http.clone(),
            homeserver: homeserver.clone(),
            agent: team.clone(),
            members: members.clone(),
            direct: false,
            localpart: format!("load{run}t{i}"),
            access_token: String::new(),
            room_id: String::new(),
            since: String::new(),
        };
        let (secret, in_flight) = (secret.clone(), in_flight.clone());
        setups.spawn(async move {
            let _turn = in_flight
                .acquire_owned()
                .await
                .map_err(|e| format!("setup: {e}"))?;
            conversation.set_up(&secret).await
        });
    }
    let mut conversations = Vec::new();
    while let Some(joined) = setups.join_next().await {
        conversations.push(joined.map_err(|e| format!("setup task: {e}"))??);
    }
    println!(
        "set up {} room(s) ({} members joined in each) in {:.2} s",
        conversations.len(),
        members.len(),
        setup_started.elapsed().as_secs_f64()
    );

    let cpu_before = cpu_times(&args.cpu_pids);
    let started = Instant::now();
    let mut runs = tokio::task::JoinSet::new();
    for (i, conversation) in conversations.into_iter().enumerate() {
        // Slot i sends tasks i, i + slots, …, each once the one before it ended.
        let numbers: Vec<u64> = (i as u64..args.tasks).step_by(slots as usize).collect();
        let (mention, timeout, tag) = (
            format!("@{}", args.team),
            args.task_timeout,
            format!("{run}-{i}"),
        );
        runs.spawn(async move {
            conversation
                .run_tasks(&tag, &mention, &numbers, timeout)
                .await
        });
    }
    let mut all = Tasks::default();
    while let Some(finished) = runs.join_next().await {
        all.add(finished.map_err(|e| format!("team slot: {e}"))??);
    }
    let wall = started.elapsed();
    let cpu_after = cpu_times(&args.cpu_pids);
    let done = all.latencies.len();
    println!(
        "tasks: {done} of {} done, {} failed, {} missing after --task-timeout",
        args.tasks,
        all.failed.len(),
        all.missing
    );
    println!(
        "tasks/s: {:.2}  ({slots} at once, {:.2} s wall)",
        done as f64 / wall.as_secs_f64(),
        wall.as_secs_f64()
    );
    println!(
        "send → ✅ done latency: {}  (agentbus + homeserver time per task: the echo provider answers at once, model time is ~0)",
        Percentiles::of(&mut all.latencies)
    );
    println!(
        "send → status posted: {}",
        Percentiles::of(&mut all.to_status)
    );
    if done > 0 {
        let (messages, edits): (u64, u64) = all
            .events
            .iter()
            .fold((0, 0), |(m, e), &(dm, de)| (m + dm, e + de));
        let per_task = |(m, e): (u64, u64)| m + e;
        let fewest = all.events.iter().copied().map(per_task).min().unwrap_or(0);
        let most = all.events.iter().copied().map(per_task).max().unwrap_or(0);
        println!(
            "events per task: {:.1}  ({:.1} messages + {:.1} edits, by the team and its agents; fewest {fewest}, most {most})",
            (messages + edits) as f64 / done as f64,
            messages as f64 / done as f64,
            edits as f64 / done as f64,
        );
    }
    if all.limited > 0 {
        println!(
            "event counts incomplete: {} /sync batches were limited (gaps in the timeline)",
            all.limited
        );
    }
    if !args.cpu_pids.is_empty() {
        let split: Vec<String> = cpu_before
            .iter()
            .zip(&cpu_after)
            .map(|((name, before), (_, after))| match (before, after) {
                (Some(b), Some(a)) => format!("{name} {:.2} s", a - b),
                _ => format!("{name} unknown (no such process)"),
            })
            .collect();
        println!(
            "CPU time over the timed part ({:.2} s wall): {}",
            wall.as_secs_f64(),
            split.join(", ")
        );
    }
    if let Some(text) = &all.last_status {
        println!("a final status: {text}");
    }
    for (event, text) in &all.failed {
        println!("failed task {event}: {text}");
    }
    if !all.failed.is_empty() || all.missing > 0 {
        return Err(format!(
            "{} tasks failed and {} did not end within --task-timeout",
            all.failed.len(),
            all.missing
        ));
    }
    Ok(())
}

/// `name=pid`, for `--cpu-pid`.
fn parse_cpu_pid(raw: &str) -> Result<(String, u32), String> {
    let (name, pid) = raw
        .split_once('=')
        .ok_or_else(|| format!("{raw:?}: expected name=pid"))?;
    let pid = pid.parse().map_err(|e| format!("{raw:?}: {e}"))?;
    Ok((name.to_owned(), pid))
}

/// Each process' CPU seconds so far (user + system), `None` if it cannot be read.
fn cpu_times(pids: &[(String, u32)]) -> Vec<(String, Option<f64>)> {
    pids.iter()
        .map(|(name, pid)| (name.clone(), cpu_seconds(*pid)))
        .collect()
}

/// utime + stime of /proc/<pid>/stat, in seconds (the kernel reports them in USER_HZ,
/// 100 per second on Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: the fields start after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// What the tasks of one slot (or of all of them) measured.
#[derive(Default)]
struct Tasks {
    /// Send → final `✅ done` status edit, per done task.
    latencies: Vec<Duration>,
    /// Send → the team's status message, per task that got one.
    to_status: Vec<Duration>,
    /// Per done task: messages and edits the team and its agents sent in the room.
    events: Vec<(u64, u64)>,
    /// Tasks that ended otherwise: the request's event ID and the final status.
    failed: Vec<(String, String)>,
    missing: u64,
    /// `/sync` batches with `limited: true` (events skipped, so counts are low).
    limited: u64,
    last_status: Option<String>,
}

impl Tasks {
    fn add(&mut self, other: Tasks) {
        self.latencies.extend(other.latencies);
        self.to_status.extend(other.to_status);
        self.events.extend(other.events);
        self.failed.extend(other.failed);
        self.missing += other.missing;
        self.limited += other.limited;
        if other.last_status.is_some() {
            self.last_status = other.last_status;
        }
    }
}

/// How one task ended, as the human saw it.
enum TaskEnd {
    Done,
    /// ❌ ⛔ 🛑 ⏱: the final status text.
    Failed(String),
    Missing,
}

impl Conversation {
    /// Sends the tasks `numbers` one after another, each once the one before it ended.
    async fn run_tasks(
        mut self,
        tag: &str,
        mention: &str,
        numbers: &[u64],
        timeout: Duration,
    ) -> Result<Tasks, Failure> {
        let mut tasks = Tasks::default();
        for &n in numbers {
            let path = format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/load-{tag}-{n}",
                encode(&self.room_id)
            );
            // A typed mention, as a person writes it; no pill, no m.mentions.
            let content = json!({
                "msgtype": "m.text",
                "body": format!("{mention} task {n}: plan the next release, with tests and release notes"),
                "m.mentions": {},
            });
            let t0 = Instant::now();
            let sent = self
                .call(reqwest::Method::PUT, &path, Some(content))
                .await?;
            let event_id = sent["event_id"]
                .as_str()
                .ok_or_else(|| format!("send answered without event_id: {sent}"))?
                .to_owned();
            match self.wait_task(&event_id, t0, timeout, &mut tasks).await? {
                TaskEnd::Done => tasks.latencies.push(t0.elapsed()),
                TaskEnd::Failed(text) => tasks.failed.push((event_id, text)),
                TaskEnd::Missing => {
                    eprintln!(
                        "task {event_id} in {} did not end within {}",
                        self.room_id,
                        humantime::format_duration(timeout)
                    );
                    tasks.missing += 1;
                }
            }
        }
        Ok(tasks)
    }

    /// Long-polls `/sync` until the team's status for the task `event_id` (its thread
    /// root) is edited to a final state, or the timeout passes; counts what the team and
    /// its agents posted meanwhile.
    async fn wait_task(
        &mut self,
        event_id: &str,
        t0: Instant,
        timeout: Duration,
        tasks: &mut Tasks,
    ) -> Result<TaskEnd, Failure> {
        let deadline = t0 + timeout;
        let me = format!(
            "@{}:{}",
            self.localpart,
            self.agent.split_once(':').map_or("", |(_, server)| server)
        );
        let (mut status, mut messages, mut edits) = (None::<String>, 0u64, 0u64);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(TaskEnd::Missing);
            }
            let batch = match self.sync(left.min(Duration::from_secs(30))).await {
                Ok(batch) => batch,
                Err(_) if Instant::now() >= deadline => return Ok(TaskEnd::Missing),
                Err(e) => return Err(e),
            };
            if let Some(next) = batch["next_batch"].as_str() {
                self.since = next.to_owned();
            }
            let timeline = &batch["rooms"]["join"][&self.room_id]["timeline"];
            if timeline["limited"] == true {
                tasks.limited += 1;
            }
            for event in timeline["events"].as_array().into_iter().flatten() {
                if event["type"] != "m.room.message" || event["sender"] == me.as_str() {
                    continue;
                }
                let relates = &event["content"]["m.relates_to"];
                let edit = relates["rel_type"] == "m.replace";
                if edit {
                    edits += 1;
                } else {
                    messages += 1;
                }
                if status.is_none()
                    && !edit
                    && event["sender"] == self.agent.as_str()
                    && relates["rel_type"] == "m.thread"
                    && relates["event_id"] == event_id
                {
                    status = event["event_id"].as_str().map(str::to_owned);
                    tasks.to_status.push(t0.elapsed());
                }
                let Some(status) = &status else {
                    continue;
                };
                if !(edit && relates["event_id"] == status.as_str()) {
                    continue;
                }
                let text = event["content"]["m.new_content"]["body"]
                    .as_str()
                    .unwrap_or_default();
                if text.contains("✅ done") {
                    tasks.events.push((messages, edits));
                    tasks.last_status = Some(text.to_owned());
                    return Ok(TaskEnd::Done);
                }
                if ["❌", "⛔", "🛑", "⏱"].iter().any(|end| text.contains(end)) {
                    return Ok(TaskEnd::Failed(text.to_owned()));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------- common --

/// Exact percentiles of a set of durations (nearest rank).
struct Percentiles {
    count: usize,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

impl Percentiles {
    fn of(samples: &mut [Duration]) -> Percentiles {
        samples.sort_unstable();
        let rank = |p: f64| -> Duration {
            if samples.is_empty() {
                return Duration::ZERO;
            }
            let index = ((p / 100.0) * samples.len() as f64).ceil() as usize;
            samples[index.clamp(1, samples.len()) - 1]
        };
        Percentiles {
            count: samples.len(),
            p50: rank(50.0),
            p90: rank(90.0),
            p99: rank(99.0),
            max: samples.last().copied().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        write!(
            f,
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n = {})",
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.max),
            self.count
        )
    }
}

/// An error and its sources, `: `-separated (reqwest's own message hides the cause).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
