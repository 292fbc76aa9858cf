//! The runtime's answers to whoever submits a job, on a real Synapse: the outcome of an
//! answer (its text, the events it posted, token usage), a silent job that posts nothing,
//! and cancellation — of a run whose answer was streaming, of one that had posted nothing
//! yet, and of every run of a session.
//!
//! The runtime runs in the test process (nothing in the binary submits silent jobs or
//! cancels yet); the homeserver, the model stub and the person reading the room are the
//! same as in `tests/agents.rs`. No agentbus serves the appservice here, so nothing
//! answers the person's messages but the jobs the tests submit.

mod support;

use std::sync::Arc;

use agentbus::agents::{
    AgentRuntime, Assignment, Destination, Ended, Job, Outcome, Reason, RunHandle, Submitted, Turn,
};
use agentbus::config::{AgentId, Config};
use agentbus::llm::{LlmHub, Usage, build_providers};
use agentbus::matrix::{MatrixClient, RetryPolicy};
use agentbus::store::SessionKey;
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId};
use support::{Agentbus, Human, LlmMode, LlmStub, OPEN_DMS, STREAMING, WAIT, agent_id, exclusive};

/// One model request at a time: the hub holds the slot inside the answer's stream, so a
/// later request reaches the model only once the earlier stream was dropped.
const ONE_AT_A_TIME: &str = "max_concurrency: 1";
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The agent every job here is for.
fn damon() -> AgentId {
    AgentId::parse("damon").unwrap()
}

/// An agent runtime over the test homeserver and the model stub, with damon registered.
struct Rig {
    runtime: Arc<AgentRuntime>,
    matrix: Arc<MatrixClient>,
    llm: LlmStub,
    _dir: tempfile::TempDir,
}

impl Rig {
    async fn start(mode: LlmMode) -> Rig {
        Self::start_with(mode, "").await
    }

    /// A rig whose `stub` provider has the extra keys `provider_extra` (YAML).
    async fn start_with(mode: LlmMode, provider_extra: &str) -> Rig {
        let llm = LlmStub::start(mode).await;
        let dir = Agentbus::write_config_full(&llm.url, OPEN_DMS, provider_extra);
        let config = Arc::new(Config::load(&dir.path().join("agentbus.yaml")).unwrap());
        let store = agentbus::store::open(&config.store).unwrap();
        let matrix = MatrixClient::new(
            config.homeserver.url.as_str(),
            config.appservice.as_token.as_deref().unwrap(),
            RetryPolicy::default(),
        );
        matrix
            .intent(&config.user_id("damon"))
            .ensure_registered()
            .await
            .unwrap();
        let runtime = AgentRuntime::new(
            config.clone(),
            matrix.clone(),
            store,
            LlmHub::new(config.clone(), build_providers(&config)),
            TaskTracker::new(),
            CancellationToken::new(),
        );
        Rig {
            runtime,
            matrix,
            llm,
            _dir: dir,
        }
    }

    /// A room of `human`'s that damon has joined.
    async fn room_with_damon(&self, human: &Human) -> OwnedRoomId {
        let room = human.create_room(&["damon"], false).await;
        self.matrix
            .intent(&agent_id("damon"))
            .join_room(&room)
            .await
            .unwrap();
        human.wait_joined(&room, &agent_id("damon")).await;
        room
    }

    /// Submits `job`, which must be queued.
    fn submit(&self, job: Job) -> (oneshot::Receiver<Outcome>, RunHandle) {
        match self.runtime.submit(job) {
            Submitted::Queued { outcome, handle } => (outcome, handle),
            other => panic!("the job was not queued: {other:?}"),
        }
    }
}

/// The outcome of a run, which must end within the harness's wait.
async fn ended(outcome: oneshot::Receiver<Outcome>) -> Outcome {
    tokio::time::timeout(WAIT, outcome)
        .await
        .expect("the run ended in time")
        .expect("the run was not dropped")
}

/// `human`'s message `event_id` in `room`, as the inbox would hand it to damon.
fn turn(human: &Human, room: &OwnedRoomId, event_id: &OwnedEventId, body: &str) -> Turn {
    Turn {
        room_id: room.clone(),
        event_id: event_id.clone(),
        sender: human.user_id.clone(),
        sender_name: human.localpart.clone(),
        body: body.to_owned(),
        image: None,
        reply_to: None,
        thread_root: None,
        hops: 1,
        group: false,
        ts: agentbus::unix_ms(),
    }
}

/// A question `human` asks in `room`, and its turn.
async fn ask(human: &Human, room: &OwnedRoomId, body: &str) -> (OwnedEventId, Turn) {
    let event_id = human.send(room, body).await;
    let turn = turn(human, room, &event_id, body);
    (event_id, turn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_outcome_carries_its_text_its_events_and_the_token_usage() {
    let _one_at_a_time = exclusive().await;
    let rig = Rig::start(LlmMode::Answer).await;
    let ann = Human::new("ann").await;
    let room = rig.room_with_damon(&ann).await;

    let (question, turn) = ask(&ann, &room, "what is an outcome?").await;
    let (outcome, _handle) = rig.submit(Job::reply(&damon(), turn));
    let outcome = ended(outcome).await;

    let reply = ann.wait_reply(&room, "damon", &question).await;
    assert_eq!(outcome.ended, Ended::Finished);
    assert_eq!(outcome.text, "[damon-model] what is an outcome?");
    assert_eq!(reply.body(), outcome.text);
    assert_eq!(outcome.events, vec![reply.event_id.clone()]);
    // The stub reports 10 prompt and 5 completion tokens per answer.
    assert_eq!(
        outcome.usage,
        Some(Usage {
            input_tokens: 10,
            output_tokens: 5
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_job_posts_nothing_and_returns_the_text() {
    let _one_at_a_time = exclusive().await;
    let rig = Rig::start(LlmMode::Answer).await;
    let bea = Human::new("bea").await;
    let room = rig.room_with_damon(&bea).await;

    let (_, turn) = ask(&bea, &room, "draft the summary").await;
    let (outcome, _handle) = rig.submit(Job::Answer(Assignment {
        session: SessionKey::new(&damon(), &room, None),
        inputs: vec![turn],
        reason: Reason::Collaboration {
            step: "draft".into(),
        },
        destination: Destination::Silent,
        schema: None,
    }));
    let outcome = ended(outcome).await;
    assert_eq!(outcome.ended, Ended::Finished);
    assert_eq!(outcome.text, "[damon-model] draft the summary");
    assert!(outcome.events.is_empty(), "{:?}", outcome.events);

    // A sentinel: once damon's reply to it is in, anything the silent run posted would be.
    let (sentinel, turn) = ask(&bea, &room, "and now out loud").await;
    let (done, _handle) = rig.submit(Job::reply(&damon(), turn));
    assert_eq!(ended(done).await.ended, Ended::Finished);
    let reply = bea.wait_reply(&room, "damon", &sentinel).await;
    let from_damon = bea.seen(|s| s.room_id == room && s.sender == agent_id("damon"));
    assert_eq!(
        from_damon.iter().map(|s| &s.event_id).collect::<Vec<_>>(),
        [&reply.event_id],
        "only the sentinel's reply"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_streaming_answer_finalises_its_message_as_stopped() {
    let _one_at_a_time = exclusive().await;
    let rig = Rig::start_with(LlmMode::Slow, ONE_AT_A_TIME).await;
    let cai = Human::new("cai").await;
    let room = rig.room_with_damon(&cai).await;

    // A word every 400 ms: the whole answer would take about eight seconds.
    let body = "tell me a long story about streams that flow and stop before the end of the valley";
    let (question, turn) = ask(&cai, &room, body).await;
    let (outcome, handle) = rig.submit(Job::reply(&damon(), turn));
    let first = cai.wait_first_reply(&room, "damon", &question).await;
    assert_eq!(first.content[STREAMING], true, "{}", first.content);
    handle.cancel();
    let outcome = ended(outcome).await;

    assert_eq!(outcome.ended, Ended::Cancelled);
    let whole = format!("[damon-model] {body}");
    assert!(
        !outcome.text.is_empty()
            && whole.starts_with(&outcome.text)
            && outcome.text.len() < whole.len(),
        "the text so far: {:?}",
        outcome.text
    );
    assert_eq!(outcome.events, vec![first.event_id.clone()]);
    let last = cai.wait_final(&first).await;
    assert_eq!(
        last.body(),
        format!(
            "{}\n\n⏹️ Damon was stopped before finishing this answer.",
            outcome.text
        )
    );
    assert!(last.content.get(STREAMING).is_none(), "{}", last.content);

    // A sentinel: its answer needs the model slot, so the cancelled stream was dropped;
    // once its reply is in, no later edit changed the stopped message.
    rig.llm.set_mode(LlmMode::Answer);
    let (sentinel, turn) = ask(&cai, &room, "still there?").await;
    let (done, _handle) = rig.submit(Job::reply(&damon(), turn));
    ended(done).await;
    cai.wait_reply(&room, "damon", &sentinel).await;
    assert_eq!(cai.latest_content(&first)["body"], last.body());
    assert_eq!(cai.answers_to(&room, "damon", &question).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_before_anything_was_posted_says_so_in_one_notice() {
    let _one_at_a_time = exclusive().await;
    let rig = Rig::start_with(LlmMode::Hang, ONE_AT_A_TIME).await;
    let dan = Human::new("dan").await;
    let room = rig.room_with_damon(&dan).await;

    let (question, turn) = ask(&dan, &room, "are you thinking?").await;
    let (outcome, handle) = rig.submit(Job::reply(&damon(), turn));
    rig.llm.wait_for_requests(1).await;
    handle.cancel();
    let outcome = ended(outcome).await;

    assert_eq!(outcome.ended, Ended::Cancelled);
    assert_eq!(outcome.text, "");
    let notice = dan.wait_reply(&room, "damon", &question).await;
    assert_eq!(notice.content["msgtype"], "m.notice");
    assert_eq!(notice.body(), "⏹️ Damon was stopped before answering this.");
    assert_eq!(outcome.events, vec![notice.event_id.clone()]);

    // The hanging request was abandoned: the next one gets the only model slot.
    let (_, turn) = ask(&dan, &room, "and this one?").await;
    let (next, handle) = rig.submit(Job::reply(&damon(), turn));
    rig.llm.wait_for_requests(2).await;
    handle.cancel();
    assert_eq!(ended(next).await.ended, Ended::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_session_stops_the_running_run_and_the_queued_ones_only() {
    let _one_at_a_time = exclusive().await;
    let rig = Rig::start(LlmMode::Hang).await;
    let eve = Human::new("eve").await;
    let room = rig.room_with_damon(&eve).await;

    let (first, turn) = ask(&eve, &room, "first").await;
    let (first_outcome, _) = rig.submit(Job::reply(&damon(), turn));
    rig.llm.wait_for_requests(1).await;
    let (second, turn) = ask(&eve, &room, "second").await;
    let (second_outcome, _) = rig.submit(Job::reply(&damon(), turn));
    // Another session of the same agent and room: a thread.
    let (_, mut threaded) = ask(&eve, &room, "in a thread").await;
    threaded.thread_root = Some(first.clone());
    let (other_outcome, other) = rig.submit(Job::reply(&damon(), threaded));
    rig.llm.wait_for_requests(2).await;

    let session = SessionKey::new(&damon(), &room, None);
    assert_eq!(rig.runtime.cancel_session(&session), 2);
    let (a, b) = (ended(first_outcome).await, ended(second_outcome).await);
    assert_eq!((&a.ended, &b.ended), (&Ended::Cancelled, &Ended::Cancelled));
    for (question, outcome) in [(&first, &a), (&second, &b)] {
        let notice = eve.wait_reply(&room, "damon", question).await;
        assert_eq!(notice.body(), "⏹️ Damon was stopped before answering this.");
        assert_eq!(outcome.events, vec![notice.event_id.clone()]);
    }
    let asked: Vec<String> = rig
        .llm
        .requests()
        .iter()
        .map(|r| support::content_text(r["messages"].as_array().unwrap().last().unwrap()))
        .collect();
    assert!(
        !asked.iter().any(|q| q == "second"),
        "the queued run never reached the model: {asked:?}"
    );
    assert!(
        !other.is_cancelled(),
        "the thread's session was not touched"
    );
    assert_eq!(
        rig.runtime.cancel_session(&session),
        0,
        "nothing is left to cancel"
    );

    other.cancel();
    assert_eq!(ended(other_outcome).await.ended, Ended::Cancelled);
}
