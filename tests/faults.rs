//! Faults end to end, on a real Synapse with the real binary: each test breaks something
//! a production deployment will see break, and checks what the people in the room see
//! afterwards (and what the model was asked).
//!
//! - `sigkill_mid_stream_leaves_one_whole_answer`: agentbus killed (SIGKILL) while an answer
//!   streams, then restarted: the answer is still one message, and its latest edit is whole
//!   and no longer marked as streaming — the replay's edits are not swallowed as repeats of
//!   the killed run's.
//! - `a_restart_with_a_backlog_answers_each_message_once`: messages sent while agentbus is
//!   down reach the model once each after it starts, although Synapse redelivers them while
//!   the journal is being replayed.
//! - `the_same_event_delivered_twice_is_answered_once`: one event twice in a transaction and
//!   again in another reaches the model once and is answered once.
//! - `a_homeserver_outage_loses_no_answer`: answers streaming when the homeserver goes down
//!   for longer than a client's retries last are finished, whole, once it is back.
//! - `a_full_disk_refuses_transactions_and_recovers_when_space_returns`: with the store's
//!   disk full a transaction is refused with a Matrix error (so the homeserver retries it),
//!   and once space returns the retried transaction is accepted and answered.
//!
//! Each room's events are processed in order, so a test that wants to know "nothing more
//! is coming" sends one more message and waits for its answer: anything a fault made the
//! room do twice happened before it.

mod support;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId};
use serde_json::{Value, json};
use support::{
    AGENTS, Agentbus, Human, LlmMode, LlmStub, STREAMING, content_text, exclusive, message_event,
    synapse, unique,
};

/// How long the homeserver stays down after the model has said everything: longer than
/// the Matrix client's retries of a send last (about 15 s).
const OUTAGE: Duration = Duration::from_secs(30);
/// How long an answer may take once a fault is over (retry backoffs included).
const AFTER_FAULT: Duration = Duration::from_secs(180);

/// The last user message of each model request, in arrival order.
fn asked(llm: &LlmStub) -> Vec<String> {
    llm.requests()
        .iter()
        .map(|request| {
            request["messages"]
                .as_array()
                .and_then(|messages| messages.last())
                .map(content_text)
                .unwrap_or_default()
        })
        .collect()
}

/// Asserts `human` saw exactly one answer by `agent` to `question`, and that it now shows
/// `expected`, finished (no streaming mark).
fn assert_one_whole_answer(
    human: &Human,
    room: &OwnedRoomId,
    agent: &str,
    question: &OwnedEventId,
    expected: &str,
) {
    let answers = human.answers_to(room, agent, question);
    let bodies: Vec<&str> = answers.iter().map(|a| a.body()).collect();
    assert_eq!(
        answers.len(),
        1,
        "{agent} answered {question} with {} messages: {bodies:?}",
        answers.len()
    );
    let latest = human.latest_content(&answers[0]);
    let edits = human.edits_of(&answers[0].event_id);
    assert_eq!(
        latest["body"],
        expected,
        "{agent}'s answer to {question} shows {latest} after {} edits",
        edits.len()
    );
    assert!(
        latest.get(STREAMING).is_none(),
        "{agent}'s answer to {question} is still marked {STREAMING} after {} edits: {latest}",
        edits.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_leaves_one_whole_answer() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Slow).await;
    let mut bus = Agentbus::start(&llm.url).await;
    let olga = Human::new("olga").await;
    let dm = olga.dm_with("damon").await;

    let text = "count slowly for me: one two three four five six seven eight nine ten eleven \
                twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty";
    let expected = format!("[damon-model] {text}");
    let question = olga.send(&dm, text).await;
    let first = olga.wait_first_reply(&dm, "damon", &question).await;
    assert_eq!(first.content[STREAMING], true, "{}", first.content);
    olga.wait_for("a first edit of the streaming answer", |s| {
        s.edits() == Some(first.event_id.as_str())
    })
    .await;
    bus.kill().await;
    assert!(
        olga.edits_of(&first.event_id)
            .iter()
            .all(|edit| edit.content["m.new_content"][STREAMING] == true),
        "the answer was finished before the kill; the test needs a longer one"
    );

    // The replay streams at once, so its final edit is its first: the killed run's first
    // edit was a partial one, and the two must not be taken for the same send.
    llm.set_mode(LlmMode::Answer);
    bus.spawn().await;
    let sentinel = olga.send(&dm, "sentinel").await;
    olga.wait_reply(&dm, "damon", &sentinel).await;

    assert_one_whole_answer(&olga, &dm, "damon", &question, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_a_backlog_answers_each_message_once() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let mut bus = Agentbus::start(&llm.url).await;
    let pia = Human::new("pia").await;
    let dm = pia.dm_with("damon").await;

    bus.kill().await;
    let mut questions = Vec::new();
    for n in 1..=3 {
        let text = format!("backlog question {n}");
        questions.push((pia.send(&dm, &text).await, text));
    }
    // Down long enough for Synapse to notice: it queues the transactions and redelivers
    // them as soon as agentbus's startup ping succeeds, while agentbus is still starting.
    synapse().wait_appservice_in_recovery().await;
    bus.spawn().await;
    for (question, _) in &questions {
        pia.wait_reply(&dm, "damon", question).await;
    }
    let text = "asked after the backlog".to_owned();
    let fourth = pia.send(&dm, &text).await;
    pia.wait_reply(&dm, "damon", &fourth).await;
    questions.push((fourth, text));

    let texts: Vec<&str> = questions.iter().map(|(_, text)| text.as_str()).collect();
    assert_eq!(asked(&llm), texts, "each message reached the model once");
    for (question, text) in &questions {
        assert_one_whole_answer(
            &pia,
            &dm,
            "damon",
            question,
            &format!("[damon-model] {text}"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_delivered_twice_is_answered_once() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Slow).await;
    let bus = Agentbus::start(&llm.url).await;
    let quinn = Human::new("quinn").await;
    let dm = quinn.dm_with("damon").await;

    let event_id: OwnedEventId = format!("$dup-{}", unique("ev")).try_into().unwrap();
    let text = "one question delivered three times";
    let event = message_event(&dm, &quinn.user_id, &event_id, text);
    // Twice in one transaction, then again in another straight away: the copies arrive
    // while the first answer is still streaming.
    let twice = json!({"events": [event.clone(), event.clone()]});
    assert_eq!(
        bus.deliver(&unique("dup-a-"), &twice).await,
        (200, json!({}))
    );
    let again = json!({"events": [event]});
    assert_eq!(
        bus.deliver(&unique("dup-b-"), &again).await,
        (200, json!({}))
    );
    quinn.wait_reply(&dm, "damon", &event_id).await;
    let sentinel = quinn.send(&dm, "sentinel").await;
    quinn.wait_reply(&dm, "damon", &sentinel).await;

    assert_eq!(
        asked(&llm),
        [text, "sentinel"],
        "the crafted event reached the model once"
    );
    assert_one_whole_answer(
        &quinn,
        &dm,
        "damon",
        &event_id,
        &format!("[damon-model] {text}"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_homeserver_outage_loses_no_answer() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Slow).await;
    let mut bus = Agentbus::start(&llm.url).await;
    let rosa = Human::new("rosa").await;
    let mut rooms = Vec::new();
    for agent in AGENTS {
        rooms.push((agent, rosa.dm_with(agent).await));
    }

    // About 30 words at 400 ms each: still streaming when the homeserver goes down.
    let text = |agent: &str| {
        format!(
            "{agent}, please take your time and tell me slowly about the long history of the \
             lighthouse on the northern cape, its keepers, its storms and the ships it saved"
        )
    };
    let mut questions = Vec::new();
    for (agent, dm) in &rooms {
        questions.push((*agent, dm.clone(), rosa.send(dm, &text(agent)).await));
    }
    let mut firsts = Vec::new();
    for (agent, dm, question) in &questions {
        let first = rosa.wait_first_reply(dm, agent, question).await;
        assert_eq!(first.content[STREAMING], true, "{}", first.content);
        firsts.push(first);
    }

    let outage = synapse().take_down().await;
    for first in &firsts {
        assert!(
            rosa.edits_of(&first.event_id)
                .iter()
                .all(|edit| edit.content["m.new_content"][STREAMING] == true),
            "{} finished before the outage; the test needs longer answers",
            first.sender
        );
    }
    llm.wait_for_ended(3).await;
    // Readiness says so while it lasts (its homeserver check is cached for a few seconds).
    let (status, body) = ready_until(&bus, |status| status == 503).await;
    assert_eq!(body["checks"]["homeserver"]["ok"], false, "{status} {body}");
    assert_eq!(body["checks"]["store"]["ok"], true, "{body}");
    // The fault itself, not a wait for something: the homeserver stays down this long.
    tokio::time::sleep(OUTAGE).await;
    outage.bring_up().await;
    assert!(bus.is_running(), "agentbus exited during the outage");
    ready_until(&bus, |status| status == 200).await;

    for (agent, dm) in &rooms {
        let sentinel = rosa.send(dm, "sentinel").await;
        rosa.wait_reply_within(AFTER_FAULT, dm, agent, &sentinel)
            .await;
    }
    for (agent, dm, question) in &questions {
        let expected = format!("[{agent}-model] {}", text(agent));
        assert_one_whole_answer(&rosa, dm, agent, question, &expected);
    }
}

/// A tmpfs mounted for one test, unmounted (and its mount point removed) on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`) on a fresh directory. Panics when it
    /// cannot: the full-disk test needs root (or CAP_SYS_ADMIN) and must not pass without.
    fn mount(size: &str) -> Tmpfs {
        let dir = std::env::temp_dir().join(unique("agentbus-e2e-full-disk-"));
        std::fs::create_dir_all(&dir).unwrap();
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .expect("mount(8) runs");
        if !output.status.success() {
            let _ = std::fs::remove_dir(&dir);
            panic!(
                "the full-disk test mounts a {size} tmpfs and needs root (or CAP_SYS_ADMIN) \
                 for it: `mount -t tmpfs` on {} failed: {}",
                dir.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Tmpfs { dir }
    }

    /// Writes zeros to `name` until the filesystem is full; returns the file's path.
    fn fill(&self, name: &str) -> PathBuf {
        let path = self.dir.join(name);
        let mut file = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 1 << 20];
        loop {
            match file.write_all(&block).and_then(|()| file.sync_all()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        // Whatever part of a block still fitted: now not one byte more does.
        let byte = [0u8];
        while file.write_all(&byte).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = |lazy: bool| {
            let mut umount = std::process::Command::new("umount");
            if lazy {
                umount.arg("-l");
            }
            umount
                .arg(&self.dir)
                .status()
                .is_ok_and(|status| status.success())
        };
        if !unmounted(false) && !unmounted(true) {
            eprintln!("could not unmount {}", self.dir.display());
            return;
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn assert_matrix_error(body: &Value) {
    assert!(
        body["errcode"]
            .as_str()
            .is_some_and(|c| c.starts_with("M_"))
            && body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "a Matrix error body (errcode, error): {body}"
    );
}

/// Delivers transactions of `events` events with `bytes`-long bodies in `room` (where no
/// agent answers) until one is refused; returns its status and body. A store may still
/// write into space it took before the disk filled (sled writes into segments it has
/// already allocated), so "full" is when agentbus says so — within `max` transactions.
async fn deliver_until_refused(
    bus: &Agentbus,
    room: &OwnedRoomId,
    sender: &matrix_sdk::ruma::OwnedUserId,
    (events, bytes, max): (usize, usize, usize),
) -> (u16, Value) {
    let body = "p".repeat(bytes);
    for _ in 0..max {
        let events: Vec<Value> = (0..events)
            .map(|_| {
                let id = format!("$padding-{}", unique("ev")).try_into().unwrap();
                message_event(room, sender, &id, &body)
            })
            .collect();
        let (status, answer) = bus
            .deliver(&unique("padding-"), &json!({ "events": events }))
            .await;
        if status != 200 {
            return (status, answer);
        }
    }
    panic!(
        "with its disk full agentbus accepted {max} transactions of {events} events of {bytes} \
         bytes: it cannot have stored them all"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_transactions_and_recovers_when_space_returns() {
    let _one_at_a_time = exclusive().await;
    // Declared before the agentbus, so it is unmounted after the process is gone.
    let disk = Tmpfs::mount("64m");
    let llm = LlmStub::start(LlmMode::Answer).await;
    let store = disk.dir.join("store");
    let mut bus = Agentbus::configured(Agentbus::write_config_on_store(&llm.url, &store));
    bus.spawn().await;
    let sam = Human::new("sam").await;
    let dm = sam.dm_with("damon").await;
    let before = sam.send(&dm, "while there is room").await;
    sam.wait_reply(&dm, "damon", &before).await;
    let quiet = sam.create_room(&[], false).await;

    let filler = disk.fill("filler");
    // Large transactions use up what the store had taken, small ones the last crumbs: a
    // question no smaller than those finds no room either.
    for size in [(4, 16 * 1024, 200), (1, 1, 5000)] {
        let (status, error) = deliver_until_refused(&bus, &quiet, &sam.user_id, size).await;
        assert!(
            (500..600).contains(&status),
            "a full disk refuses a transaction with a 5xx, so the homeserver retries it; got \
             {status} {error}"
        );
        assert_matrix_error(&error);
    }
    let event_id: OwnedEventId = format!("$disk-full-{}", unique("ev")).try_into().unwrap();
    let text = "written when the disk was full";
    let txn_id = unique("disk-full-");
    let body = json!({"events": [message_event(&dm, &sam.user_id, &event_id, text)]});
    // The engine reopens after a refused write and may free a little of its own space on
    // the way (fjall drops journal files it no longer needs), so this one may fit: then it
    // must be answered like any other. Refused, it must be a 5xx the homeserver retries.
    let (status, error) = bus.deliver(&txn_id, &body).await;
    let refused = status != 200;
    if refused {
        assert!(
            (500..600).contains(&status),
            "the disk is still full: expected a 5xx, got {status} {error}"
        );
        assert_matrix_error(&error);
    }

    std::fs::remove_file(&filler).unwrap();
    // The homeserver retries the refused transaction, backing off; so do we, boundedly.
    let mut tries = Vec::new();
    for attempt in 1..=20u32 {
        let outcome = bus.try_deliver(&txn_id, &body).await;
        let accepted = matches!(outcome, Ok((200, _)));
        tries.push(outcome.map_err(|e| e.to_string()));
        if accepted {
            break;
        }
        assert!(bus.is_running(), "agentbus exited; tries: {tries:?}");
        tokio::time::sleep(Duration::from_millis(250) * attempt.min(4)).await;
    }
    assert!(
        matches!(tries.last(), Some(Ok((200, _)))),
        "space returned, but the retried transaction was never accepted: {tries:?}"
    );

    sam.wait_reply(&dm, "damon", &event_id).await;
    let after = sam.send(&dm, "and after the disk was freed").await;
    sam.wait_reply_within(AFTER_FAULT, &dm, "damon", &after)
        .await;
    assert_one_whole_answer(
        &sam,
        &dm,
        "damon",
        &event_id,
        &format!("[damon-model] {text}"),
    );
    assert_eq!(
        asked(&llm),
        ["while there is room", text, "and after the disk was freed"]
    );
}

/// `GET /ready` until its status satisfies `wanted`, within a minute.
async fn ready_until(bus: &Agentbus, wanted: impl Fn(u16) -> bool) -> (u16, serde_json::Value) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let response = reqwest::get(format!("{}/ready", bus.url)).await.unwrap();
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap();
        if wanted(status) {
            return (status, body);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/ready stayed {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
