//! The listener against a client that holds connections open, end to end: a real Synapse,
//! the real binary under the open-file limit a service manager commonly gives (1,024), and
//! a flood of idle connections from this process.
//!
//! - `idle_connections_are_closed_and_the_homeserver_still_gets_through`: 1,500 connections
//!   that send nothing, each reopened soon after it is closed, used to take every
//!   descriptor; now at most `appservice.max_connections` are open at once (the one idle
//!   longest is closed for a newcomer, the others after `appservice.header_read_timeout`),
//!   and a person's DM is answered while the flood goes on. Connections that send half a
//!   request head, or stay idle after an answer, are closed by the timeout. (The test
//!   counts closed connections, not which ones: a burst of 1,500 connects overflows the
//!   kernel's listen queue, and a connection the kernel dropped half-open stays open on
//!   the client's side for ever, whatever agentbus does.)
//! - `the_soft_open_file_limit_is_raised_to_the_hard_limit_at_start`: the process runs with
//!   its soft limit at the hard one, and says so in the log.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::{Agentbus, Human, LlmMode, LlmStub, WAIT, exclusive, raise_own_open_files_limit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// More idle connections than a 1,024-descriptor process can hold.
const FLOOD: usize = 1500;
/// How soon a flooding connection the server closed is opened again.
const REOPEN_AFTER: Duration = Duration::from_secs(1);

/// What the flooding connections have seen so far.
#[derive(Default)]
struct Flood {
    /// Connections opened, reopened ones included.
    opened: AtomicUsize,
    /// Connections the server has closed.
    closed: AtomicUsize,
    changed: Notify,
}

impl Flood {
    /// Waits until `ready` holds, or panics naming `what` after `WAIT`.
    async fn wait_until(&self, what: &str, ready: impl Fn(&Flood) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let changed = self.changed.notified();
            if ready(self) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!(
                    "timed out waiting until {what}: {} connections opened, {} closed by the server",
                    self.opened.load(Ordering::SeqCst),
                    self.closed.load(Ordering::SeqCst)
                );
            }
        }
    }
}

/// Opens a connection to `addr` and sends nothing; when the server closes it, opens the
/// next one a moment later (the attacker's pace, not a synchronisation), for ever.
async fn hold_open(addr: SocketAddr, flood: Arc<Flood>) {
    loop {
        let Ok(mut stream) = TcpStream::connect(addr).await else {
            tokio::time::sleep(REOPEN_AFTER).await;
            continue;
        };
        flood.opened.fetch_add(1, Ordering::SeqCst);
        flood.changed.notify_waiters();
        let mut buf = [0u8; 256];
        while let Ok(n) = stream.read(&mut buf).await
            && n > 0
        {}
        drop(stream);
        flood.closed.fetch_add(1, Ordering::SeqCst);
        flood.changed.notify_waiters();
        tokio::time::sleep(REOPEN_AFTER).await;
    }
}

/// Sends `request` on a new connection and returns everything the server sent before it
/// closed the connection.
async fn read_until_closed(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf).await
            && n > 0
        {
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(
        closed.is_ok(),
        "the server kept a connection open after {:?}; it answered {answer:?}",
        String::from_utf8_lossy(request)
    );
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_the_homeserver_still_gets_through() {
    let _one_at_a_time = exclusive().await;
    let own_limit = raise_own_open_files_limit();
    assert!(
        own_limit > FLOOD as u64 + 256,
        "the test needs an open-file limit above {FLOOD} connections (hard limit {own_limit})"
    );
    let llm = LlmStub::start(LlmMode::Answer).await;
    let mut bus = Agentbus::configured(Agentbus::write_config_with_appservice(
        &llm.url,
        "header_read_timeout: 1s, idle_timeout: 1s",
    ));
    bus.set_open_files_limit(1024, 1024);
    bus.spawn().await;
    let addr: SocketAddr = bus.url().strip_prefix("http://").unwrap().parse().unwrap();
    bus.wait_log(&["open-file limit", "soft=1024", "hard=1024"])
        .await;

    // A kept-alive connection is closed once it has been idle after its answer, and one
    // that sends half a request head is closed when the head does not complete.
    let answer = read_until_closed(addr, b"GET /ready HTTP/1.1\r\nHost: agentbus\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the request itself is answered: {answer:?}"
    );
    read_until_closed(addr, b"GET /ready HTTP/1.1\r\nHost: agen").await;

    let olga = Human::new("olga").await;
    let flood = Arc::new(Flood::default());
    let mut holders = tokio::task::JoinSet::new();
    for _ in 0..FLOOD {
        holders.spawn(hold_open(addr, flood.clone()));
    }
    flood
        .wait_until("every flooding connection is open", |f| {
            f.opened.load(Ordering::SeqCst) >= FLOOD
        })
        .await;

    // While the flood goes on, the homeserver delivers the invite and the message, and
    // agentbus answers through it.
    let dm = olga.dm_with("damon").await;
    let question = olga.send(&dm, "are you still there?").await;
    let reply = olga.wait_reply(&dm, "damon", &question).await;
    assert_eq!(reply.body(), "[damon-model] are you still there?");
    // Meanwhile the server kept its connections within max_connections (512): its
    // descriptors are those, the store's files and a few more — not the whole limit.
    let descriptors = std::fs::read_dir(format!("/proc/{}/fd", bus.pid()))
        .unwrap()
        .count();
    assert!(
        descriptors < 700,
        "agentbus has {descriptors} descriptors open under the flood"
    );
    // The idle connections were closed: as many as the flood opened at first, and more.
    flood
        .wait_until(
            "the server has closed as many connections as the flood",
            |f| f.closed.load(Ordering::SeqCst) >= FLOOD,
        )
        .await;
    assert!(
        flood.opened.load(Ordering::SeqCst) > FLOOD,
        "the flood kept reopening connections the server closed"
    );
    holders.shutdown().await;
    bus.wait_log(&["every connection slot is taken", "max_connections=512"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_open_file_limit_is_raised_to_the_hard_limit_at_start() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let mut bus = Agentbus::configured(Agentbus::write_config(&llm.url));
    bus.set_open_files_limit(256, 4096);
    bus.spawn().await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", bus.pid())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("/proc/<pid>/limits has a line for open files")
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    assert_eq!(open_files, ["4096", "4096"], "{limits}");
    bus.wait_log(&[
        "open-file limit",
        "soft_before=256",
        "soft=4096",
        "hard=4096",
    ])
    .await;
}
