//! The `agentbus` command line against a real Synapse: `check` with its exit codes, and
//! `say` talking to agents the way a newcomer without Element would.

mod support;

use std::process::Output;

use support::{Agentbus, Human, LlmMode, LlmStub, agent_id, exclusive, synapse};

fn agentbus(args: &[&str]) -> Output {
    support::cli(args)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_against_the_real_homeserver_and_names_each_failure() {
    let _one_at_a_time = exclusive().await;
    let dir = Agentbus::write_config("http://127.0.0.1:9/v1");
    let config_path = dir.path().join("agentbus.yaml");
    let config = config_path.to_str().unwrap();

    let ok = tokio::task::spawn_blocking({
        let config = config.to_owned();
        move || agentbus(&["--config", &config, "check"])
    })
    .await
    .unwrap();
    let stdout = text(&ok.stdout);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&ok.stderr)
    );
    let marks: Vec<&str> = stdout
        .lines()
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(marks, ["✓", "✓", "✓", "✓", "✓"], "{stdout}");
    assert!(stdout.contains("homeserver reached agentbus"), "{stdout}");
    assert!(stdout.contains("is private to agentbus's user"), "{stdout}");

    let original = std::fs::read_to_string(&config_path).unwrap();
    let run_with = |edited: String| {
        std::fs::write(&config_path, edited).unwrap();
        agentbus(&["--config", config, "check"])
    };

    let broken = run_with(original.replace(
        "provider: stub, model: coder-model",
        "provider: openai2, model: coder-model",
    ));
    assert_eq!(broken.status.code(), Some(2));
    assert!(
        text(&broken.stderr)
            .contains(r#"agents[1].provider: unknown provider "openai2"; known: stub"#),
        "{}",
        text(&broken.stderr)
    );

    let unreachable = run_with(original.replace(&synapse().url, "http://127.0.0.1:9"));
    assert_eq!(
        unreachable.status.code(),
        Some(3),
        "{}",
        text(&unreachable.stderr)
    );
    assert!(text(&unreachable.stderr).contains("✗ homeserver unreachable at http://127.0.0.1:9"));

    let wrong_token =
        run_with(original.replace("as_token: e2e-as-token", "as_token: wrong-as-token"));
    assert_eq!(
        wrong_token.status.code(),
        Some(4),
        "{}",
        text(&wrong_token.stderr)
    );
    assert!(text(&wrong_token.stderr).contains("✗ as_token rejected"));

    // Something else holds the appservice port and does not speak HTTP: the homeserver's
    // ping cannot get through.
    let squatter = tokio::net::TcpListener::bind(("127.0.0.1", synapse().appservice_port))
        .await
        .unwrap();
    let squatting = tokio::spawn(async move {
        while let Ok((stream, _)) = squatter.accept().await {
            drop(stream);
        }
    });
    let unreachable_us = run_with(original);
    squatting.abort();
    assert_eq!(
        unreachable_us.status.code(),
        Some(5),
        "{}",
        text(&unreachable_us.stderr)
    );
    assert!(text(&unreachable_us.stderr).contains("✗ the homeserver cannot reach agentbus"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn say_posts_as_a_human_and_prints_the_agents_replies() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let bus = Agentbus::start(&llm.url).await;
    let owner = Human::new("owner").await;
    let room = owner.create_room(&["coder", "damon"], false).await;
    owner.wait_joined(&room, &agent_id("coder")).await;
    owner.wait_joined(&room, &agent_id("damon")).await;
    let guest = Human::new("guest").await;
    owner
        .client
        .get_room(&room)
        .unwrap()
        .invite_user_by_id(&guest.user_id)
        .await
        .unwrap();

    let args: Vec<String> = [
        "--config",
        bus.config_path().to_str().unwrap(),
        "say",
        "--room",
        room.as_str(),
        "--as",
        &guest.localpart,
        "--password",
        &guest.password,
        "--replies",
        "2",
        "--timeout",
        "60s",
        "@coder and @damon: status?",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let output = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        agentbus(&args)
    })
    .await
    .unwrap();
    let stdout = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&output.stderr)
    );
    let mut lines: Vec<&str> = stdout.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            // Two people in the room: the model sees who is speaking, named by user ID.
            format!(
                "@coder:localhost: [coder-model] {} ({}): @coder and @damon: status?",
                guest.localpart, guest.user_id
            ),
            format!(
                "@damon:localhost: [damon-model] {} ({}): @coder and @damon: status?",
                guest.localpart, guest.user_id
            ),
        ]
    );
}
