//! Routing end to end on a real Synapse: keyword rules, `@all`, follow-ups that continue
//! with the last agent, DM pairing approved from the CLI, and `agentbus route` explaining a
//! decision both through the running agentbus and without one.

mod support;

use serde_json::Value;
use support::{ADMIN_TOKEN, Agentbus, Human, LlmMode, LlmStub, agent_id, cli_async, exclusive};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyword_routes_to_coder_and_route_explains_why() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let mut bus = Agentbus::start(&llm.url).await;
    let erin = Human::new("erin").await;
    let room = erin
        .create_room(&["damon", "coder", "researcher"], false)
        .await;
    for agent in ["damon", "coder", "researcher"] {
        erin.wait_joined(&room, &agent_id(agent)).await;
    }

    let question = erin.send(&room, "帮我看看这段代码为什么报错").await;
    let reply = erin.wait_reply(&room, "coder", &question).await;
    assert_eq!(reply.body(), "[coder-model] 帮我看看这段代码为什么报错");

    // Sentinel: once damon answers a mention, everything before it was processed, and only
    // the coder answered the keyword message.
    let sentinel = erin.send(&room, "@damon thanks").await;
    erin.wait_reply(&room, "damon", &sentinel).await;
    let answered_question: Vec<String> = erin
        .seen(|s| s.room_id == room && s.in_reply_to() == Some(question.as_str()))
        .iter()
        .map(|s| s.sender.to_string())
        .collect();
    assert_eq!(answered_question, [agent_id("coder").to_string()]);

    // The CLI asks the running agentbus (admin API) …
    let config = bus.config_path();
    let config = config.to_str().unwrap();
    let args = [
        "--config",
        config,
        "route",
        "--room",
        room.as_str(),
        "--sender",
        erin.user_id.as_str(),
        "帮我调研一下竞品",
    ];
    let (code, stdout, stderr) = cli_async(&args).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(
        stdout,
        "targets:  @researcher\nstrategy: keyword\nreason:   keyword \"调研\" → @researcher (routing.keyword.rules[1])\n"
    );
    // … and routes by itself, from the same store and homeserver, when none is running.
    bus.kill().await;
    let mut json_args = args.to_vec();
    json_args.insert(json_args.len() - 1, "--json");
    *json_args.last_mut().unwrap() = "@all 大家好";
    let (code, stdout, stderr) = cli_async(&json_args).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let decision: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(decision["strategy"], "broadcast");
    assert_eq!(
        decision["targets"],
        serde_json::json!(["damon", "coder", "researcher"])
    );
    // Explaining sent nothing to the model.
    assert_eq!(llm.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_all_gets_an_answer_from_every_agent_in_the_room() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let _bus = Agentbus::start(&llm.url).await;
    let fay = Human::new("fay").await;
    let room = fay
        .create_room(&["damon", "coder", "researcher"], false)
        .await;
    for agent in ["damon", "coder", "researcher"] {
        fay.wait_joined(&room, &agent_id(agent)).await;
    }
    let hello = fay.send(&room, "@all 早上好，今天的计划是什么？").await;
    for (agent, model) in [
        ("damon", "damon-model"),
        ("coder", "coder-model"),
        ("researcher", "researcher-model"),
    ] {
        let reply = fay.wait_reply(&room, agent, &hello).await;
        assert_eq!(
            reply.body(),
            format!("[{model}] @all 早上好，今天的计划是什么？")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_without_a_mention_continues_with_the_last_agent() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    // A room where agents may answer without being mentioned.
    let dir = Agentbus::write_config_with(
        &llm.url,
        r#"channels: { matrix: { dm_policy: open, groups: { "*": { require_mention: false } } } }"#,
    );
    let mut bus = Agentbus::configured(dir);
    bus.spawn().await;
    let gus = Human::new("gus").await;
    let room = gus.create_room(&["damon", "researcher"], false).await;
    gus.wait_joined(&room, &agent_id("damon")).await;
    gus.wait_joined(&room, &agent_id("researcher")).await;

    let first = gus.send(&room, "@researcher what is a CRDT?").await;
    gus.wait_reply(&room, "researcher", &first).await;
    let follow_up = gus.send(&room, "and how do they merge?").await;
    let reply = gus.wait_reply(&room, "researcher", &follow_up).await;
    assert_eq!(reply.body(), "[researcher-model] and how do they merge?");

    // A different person's unaddressed message is not Gus's conversation.
    let hal = Human::new("hal").await;
    gus.bring_in(&room, &hal).await;
    let aside = hal.send(&room, "lunch anyone?").await;
    let sentinel = gus.send(&room, "@damon ping").await;
    gus.wait_reply(&room, "damon", &sentinel).await;
    assert!(
        gus.seen(|s| s.in_reply_to() == Some(aside.as_str()))
            .is_empty(),
        "nobody answers {aside}"
    );
    assert!(bus.log().contains("strategy=Context"), "{}", bus.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_dm_sender_gets_a_pairing_code_and_answers_after_approval() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let dir = Agentbus::write_config_with(&llm.url, "channels: { matrix: { dm_policy: pairing } }");
    let mut bus = Agentbus::configured(dir);
    bus.spawn().await;
    let ivy = Human::new("ivy").await;
    let dm = ivy.dm_with("damon").await;

    let hello = ivy.send(&dm, "hello damon").await;
    let notice = ivy.wait_reply(&dm, "damon", &hello).await;
    assert_eq!(notice.content["msgtype"], "m.notice");
    let code = support::pairing_code(notice.body());
    assert!(
        llm.requests().is_empty(),
        "an unpaired sender reached the model"
    );

    // A wrong code is refused and approves nobody.
    let config = bus.config_path();
    let config = config.to_str().unwrap();
    let (status, _, stderr) =
        cli_async(&["--config", config, "pairing", "approve", "ZZZZ2222"]).await;
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("no pending pairing request"), "{stderr}");
    let (status, stdout, _) = cli_async(&["--config", config, "pairing", "list"]).await;
    assert_eq!(status, Some(0));
    assert!(
        stdout.contains(&format!("{code}  {}", ivy.user_id)),
        "{stdout}"
    );

    // The admin approves (lower case and a dash are fine), through the running agentbus.
    let typed = format!("{}-{}", &code[..4], &code[4..]).to_lowercase();
    let (status, stdout, stderr) =
        cli_async(&["--config", config, "pairing", "approve", &typed]).await;
    assert_eq!(status, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("approved {}", ivy.user_id)),
        "{stdout}"
    );

    let again = ivy.send(&dm, "hello again").await;
    let reply = ivy.wait_reply(&dm, "damon", &again).await;
    assert_eq!(reply.body(), "[damon-model] hello again");

    // The approval is durable: after a restart Ivy is still paired.
    bus.restart().await;
    let third = ivy.send(&dm, "still there?").await;
    let reply = ivy.wait_reply(&dm, "damon", &third).await;
    assert_eq!(reply.body(), "[damon-model] still there?");
    assert_eq!(llm.requests().len(), 2);

    // Revoking the approval puts Ivy back to pairing.
    let user = ivy.user_id.to_string();
    let (status, stdout, stderr) =
        cli_async(&["--config", config, "pairing", "revoke", &user]).await;
    assert_eq!(status, Some(0), "{stdout}{stderr}");
    let fourth = ivy.send(&dm, "hello?").await;
    let notice = ivy.wait_reply(&dm, "damon", &fourth).await;
    assert!(
        notice.body().contains("Your pairing code is "),
        "{}",
        notice.body()
    );
    assert_eq!(llm.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_requests_without_the_admin_token() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let bus = Agentbus::start(&llm.url).await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/router/test", bus.url());
    let query =
        serde_json::json!({"room": "!nowhere:localhost", "sender": "@x:localhost", "text": "hi"});
    let missing = http.post(&url).json(&query).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    let wrong = http
        .post(&url)
        .bearer_auth("not-the-token")
        .json(&query)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let ok = http
        .post(&url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&query)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let decision: Value = ok.json().await.unwrap();
    assert_eq!(decision["strategy"], "nobody");
    assert_eq!(decision["reason"], "no agent is joined to this room");
    let malformed = http
        .post(&url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"room": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let bad_room =
        serde_json::json!({"room": "not a room", "sender": "@x:localhost", "text": "hi"});
    let bad = http
        .post(&url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&bad_room)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid room ID \"not a room\""),
        "{body}"
    );
}
