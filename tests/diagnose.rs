//! `scripts/diagnose.sh` end to end: run as an operator would against a real Synapse and
//! the real agentbus binary — first a healthy stack, where every line is OK, then three
//! broken ones (a registration with the wrong hs_token, the homeserver down, agentbus not
//! running), where it exits non-zero and names the problem.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use support::{
    Agentbus, LlmMode, LlmStub, cli_async, exclusive, hs_token, register_user, synapse, unique,
};

/// The key the model provider is configured with; must never appear in the output.
const KEY_ENV: &str = "DIAGNOSE_TEST_MODEL_KEY";
const KEY: &str = "sk-diagnose-test-9f8e7d6c5b4a";

/// A config with an echo agent (damon) for the round trip and an OpenAI-compatible
/// provider (the model stub, with a key from the environment) for coder.
fn config(llm_url: &str) -> tempfile::TempDir {
    Agentbus::write_config_text(&format!(
        r#"
providers:
  echo: {{ api: echo }}
  stub: {{ api: openai-completions, base_url: "{llm_url}", api_key_env: {KEY_ENV} }}
agents:
  - {{ id: damon, display_name: Damon, provider: echo }}
  - {{ id: coder, display_name: Coder, provider: stub, model: coder-model }}
channels: {{ matrix: {{ dm_policy: allowlist, allow_from: ["@*:localhost"] }} }}
"#
    ))
}

/// `agentbus registration` for the bus's config, written beside it; returns its path.
async fn write_registration(bus: &Agentbus) -> PathBuf {
    let path = bus.dir.path().join("registration.yaml");
    let config = bus.config_path();
    let (code, _, stderr) = cli_async(&[
        "--config",
        config.to_str().unwrap(),
        "registration",
        "--output",
        path.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, Some(0), "agentbus registration: {stderr}");
    path
}

/// How a run of the script went.
struct Run {
    code: Option<i32>,
    output: String,
}

impl Run {
    /// The result lines (`OK` / `WARN` / `FAIL` …).
    fn results(&self) -> Vec<&str> {
        self.output
            .lines()
            .filter(|l| ["OK ", "WARN ", "FAIL "].iter().any(|p| l.starts_with(p)))
            .collect()
    }

    /// The result line starting with `prefix` (level and check, e.g. `"FAIL ping:"`,
    /// levels padded to four columns as the script prints them).
    fn line(&self, level: &str, check: &str) -> &str {
        let prefix = format!("{level:<4} {check}");
        self.results()
            .into_iter()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{}", self.output))
    }
}

/// Runs `scripts/diagnose.sh --config CONFIG [--registration FILE]` with the test's agentbus
/// binary, the provider key, and as `user` (with its password) for the round trip.
async fn diagnose(config: &Path, registration: Option<&Path>, user: Option<(&str, &str)>) -> Run {
    diagnose_with_env(config, registration, user, &[]).await
}

/// [`diagnose`] with more environment variables for the script (and the agentbus it runs).
async fn diagnose_with_env(
    config: &Path,
    registration: Option<&Path>,
    user: Option<(&str, &str)>,
    env: &[(&str, &str)],
) -> Run {
    let mut command = std::process::Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/diagnose.sh"),
    );
    command
        .arg("--config")
        .arg(config)
        .env("AGENTBUS_BIN", env!("CARGO_BIN_EXE_agentbus"))
        .env(KEY_ENV, KEY)
        .env_remove("AGENTBUS_PASSWORD")
        .env_remove("AGENTBUS_DIAGNOSE_USER")
        .env_remove("AGENTBUS_REGISTRATION");
    command.envs(env.iter().copied());
    if let Some(registration) = registration {
        command.arg("--registration").arg(registration);
    }
    if let Some((user, password)) = user {
        command
            .args(["--user", user])
            .env("AGENTBUS_PASSWORD", password);
    }
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let run = Run {
        code: output.status.code(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    };
    for secret in [KEY, hs_token()] {
        assert!(
            !run.output.contains(secret),
            "a secret was printed:\n{}",
            run.output
        );
    }
    run
}

/// A running agentbus on [`config`], ready (its `/ready` answers 200).
async fn running_bus(llm: &LlmStub) -> Agentbus {
    let mut bus = Agentbus::configured(config(&llm.url));
    bus.set_env(KEY_ENV, KEY);
    bus.spawn().await;
    wait_ready(&bus, "ready", |status, _| status == 200).await;
    bus
}

/// `/ready` until `done` holds (its homeserver checks are cached for a few seconds).
async fn wait_ready(bus: &Agentbus, what: &str, done: impl Fn(u16, &Value) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = match reqwest::get(format!("{}/ready", bus.url)).await {
            Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or_default()),
            Err(_) => (0, Value::Null),
        };
        if done(status, &body) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/ready never showed {what}; last: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_stack_is_all_ok_with_a_round_trip_through_the_echo_agent() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let bus = running_bus(&llm).await;
    let registration = write_registration(&bus).await;
    let user = unique("diag");
    let password = register_user(&user).await;

    let run = diagnose(
        &bus.config_path(),
        Some(&registration),
        Some((&user, &password)),
    )
    .await;

    assert_eq!(run.code, Some(0), "{}", run.output);
    for line in run.results() {
        // The free space depends on the machine, not on the stack.
        assert!(
            line.starts_with("OK ") || line.starts_with("WARN disk:"),
            "not OK: {line}\n{}",
            run.output
        );
    }
    let hs = &synapse().url;
    let url = &bus.url;
    run.line("OK", "config ");
    assert!(
        run.line("OK", "homeserver ")
            .contains(&format!("{hs} answers"))
    );
    assert!(
        run.line("OK", "registration ")
            .contains("matches the config")
    );
    run.line("OK", &format!("health: {url}/health answers 200"));
    run.line("OK", &format!("ready: {url}/ready is ready"));
    run.line(
        "OK",
        &format!("ping: the homeserver reached agentbus at {url}"),
    );
    run.line("OK", "agentbus check passed (config");
    run.line("OK", "round trip: @damon answered in !");
    run.line("OK", "provider echo:");
    assert!(
        run.line("OK", "provider stub:")
            .contains("/chat/completions (model coder-model, 1 token) answered 200"),
        "{}",
        run.output
    );
    assert!(
        llm.requests()
            .iter()
            .any(|r| r["model"] == "coder-model" && r["max_tokens"] == 1),
        "the stub never saw the one-token request: {:?}",
        llm.requests()
    );
    assert!(run.output.contains("disk: "), "{}", run.output);
    // Nothing is https here, so there is no certificate to check.
    assert!(!run.output.contains("tls "), "{}", run.output);
    assert!(run.output.contains("\n0 failed, "), "{}", run.output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_with_another_hs_token_fails_naming_hs_token() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let bus = running_bus(&llm).await;
    let registration = write_registration(&bus).await;
    let text = std::fs::read_to_string(&registration).unwrap();
    assert!(text.contains(hs_token()), "{text}");
    std::fs::write(
        &registration,
        text.replace(hs_token(), "another-hs-token-0000"),
    )
    .unwrap();

    let run = diagnose(&bus.config_path(), Some(&registration), None).await;

    assert_eq!(run.code, Some(1), "{}", run.output);
    let line = run.line("FAIL", "registration hs_token:");
    assert!(line.contains("registration --output"), "the fix: {line}");
    assert!(
        run.results()
            .iter()
            .all(|l| !l.starts_with("FAIL") || l.starts_with("FAIL registration hs_token:")),
        "only the hs_token is wrong:\n{}",
        run.output
    );
    assert!(
        !run.output.contains("registration as_token"),
        "{}",
        run.output
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_homeserver_that_is_down_fails_the_homeserver_lines() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let bus = running_bus(&llm).await;
    let registration = write_registration(&bus).await;
    let down = synapse().take_down().await;
    wait_ready(&bus, "the homeserver failing", |_, body| {
        body["checks"]["homeserver"]["ok"] == false
    })
    .await;

    let run = diagnose(&bus.config_path(), Some(&registration), None).await;
    down.bring_up().await;

    assert_eq!(run.code, Some(1), "{}", run.output);
    let hs = &synapse().url;
    run.line("FAIL", &format!("homeserver {hs}/_matrix/client/versions"));
    assert!(
        run.line("FAIL", "ready: homeserver failing:")
            .contains("fix: start the homeserver"),
        "{}",
        run.output
    );
    run.line("FAIL", "ping: the homeserver is down");
    run.line("FAIL", "agentbus check: homeserver unreachable");
    // agentbus itself is fine.
    run.line("OK", &format!("health: {}/health answers 200", bus.url));
    run.line("OK", "registration ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appservice_that_is_not_running_fails_health_ready_and_ping_naming_its_url() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    // Configured, never started.
    let bus = Agentbus::configured(config(&llm.url));
    let registration = write_registration(&bus).await;
    let user = unique("diag");
    let password = register_user(&user).await;

    let run = diagnose(
        &bus.config_path(),
        Some(&registration),
        Some((&user, &password)),
    )
    .await;

    assert_eq!(run.code, Some(1), "{}", run.output);
    let url = &bus.url;
    run.line("FAIL", "round trip: skipped, the appservice is down");
    run.line("FAIL", &format!("health: {url}/health answers nothing"));
    run.line("FAIL", &format!("ready: nothing answers at {url}/ready"));
    run.line(
        "FAIL",
        &format!("ping: the homeserver cannot reach agentbus at {url}"),
    );
    // The homeserver is up: the problem is agentbus.
    run.line("OK", "homeserver ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_refuses_the_key_fails_naming_the_provider_and_its_variable() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Refuse {
        status: 401,
        body: r#"{"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}"#
            .into(),
    })
    .await;
    let bus = running_bus(&llm).await;
    let registration = write_registration(&bus).await;

    let run = diagnose(&bus.config_path(), Some(&registration), None).await;

    assert_eq!(run.code, Some(1), "{}", run.output);
    let line = run.line("FAIL", "provider stub:");
    assert!(
        line.contains("refused the key (401: Incorrect API key provided)"),
        "{line}"
    );
    assert!(line.contains(&format!("${KEY_ENV}")), "{line}");
    run.line("OK", "provider echo:");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hs_token_the_homeserver_does_not_know_fails_naming_hs_token() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let bus = Agentbus::configured(config(&llm.url));
    // The file the homeserver really loads, against a config whose hs_token was changed
    // (through its environment override) without regenerating it.
    let registration = synapse().dir.join("registration.yaml");
    let env = [("AGENTBUS_HS_TOKEN", "a-new-hs-token-1111")];

    let run = diagnose_with_env(&bus.config_path(), Some(&registration), None, &env).await;

    assert_eq!(run.code, Some(1), "{}", run.output);
    run.line("FAIL", "registration hs_token:");
    assert!(
        run.line("FAIL", "agentbus check: homeserver cannot reach agentbus")
            .contains("different hs_token"),
        "{}",
        run.output
    );
    assert!(
        !run.output.contains("a-new-hs-token-1111"),
        "{}",
        run.output
    );
}
