//! What agentbus keeps and says stays with the people it belongs to: the data directory is
//! private to agentbus's user whatever umask it was started with (and `agentbus check`
//! says when an older one is not), and a provider's error that quotes the API key, in any
//! case or in part, puts none of it in the room or the log.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::json;
use support::{ADMIN_TOKEN, Agentbus, Human, LlmMode, LlmStub, OPEN_DMS, exclusive};

/// Every entry under `dir`, `dir` included, with its permission bits (symlinks skipped).
fn walk(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        // The store may delete a file (a rotated journal segment) while we look.
        let Ok(metadata) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if metadata.file_type().is_symlink() {
            continue;
        }
        found.push((path.clone(), metadata.permissions().mode() & 0o7777));
        if metadata.is_dir()
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            pending.extend(entries.flatten().map(|e| e.path()));
        }
    }
    found
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conversation_store_is_private_under_a_permissive_umask() {
    let _one_at_a_time = exclusive().await;
    let llm = LlmStub::start(LlmMode::Answer).await;
    let dir = Agentbus::write_config(&llm.url);
    // Without admin.token the admin token is generated and saved in the data directory.
    let config_path = dir.path().join("agentbus.yaml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let without_admin = config.replace(&format!("admin: {{ token: {ADMIN_TOKEN} }}\n"), "");
    assert_ne!(without_admin, config, "the test config sets admin.token");
    std::fs::write(&config_path, without_admin).unwrap();
    let mut bus = Agentbus::configured(dir);
    // What a login shell or a service manager usually gives: group and others may read.
    bus.set_umask(0o022);
    bus.spawn().await;

    let ivy = Human::new("ivy").await;
    let dm = ivy.dm_with("damon").await;
    let first = ivy.send(&dm, "my salary is 4,200").await;
    let reply = ivy.wait_reply(&dm, "damon", &first).await;
    assert_eq!(reply.body(), "[damon-model] my salary is 4,200");
    // The second turn carries the first as context: the conversation is on disk.
    let second = ivy.send(&dm, "and my address?").await;
    ivy.wait_reply(&dm, "damon", &second).await;
    let last = llm.requests().pop().unwrap();
    assert_eq!(
        last["messages"][1],
        json!({"role": "user", "content": "my salary is 4,200"})
    );

    let data = bus.dir.path().join("data");
    let entries = walk(&data);
    let names: Vec<String> = entries
        .iter()
        .map(|(p, _)| p.strip_prefix(&data).unwrap().display().to_string())
        .collect();
    assert!(
        names.iter().any(|n| n == "appservice-tokens.json"),
        "the saved tokens are in the walk: {names:?}"
    );
    assert!(
        names.iter().any(|n| n.starts_with("fjall/")) && entries.len() > 5,
        "the store's files are in the walk: {names:?}"
    );
    let shared: Vec<String> = entries
        .iter()
        .filter(|(_, mode)| mode & 0o077 != 0)
        .map(|(path, mode)| format!("{} {mode:04o}", path.display()))
        .collect();
    assert!(
        shared.is_empty(),
        "group or others can reach:\n{}",
        shared.join("\n")
    );
    let (_, data_mode) = &entries[0];
    assert_eq!(*data_mode, 0o700);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_about_a_data_directory_others_can_read() {
    let _one_at_a_time = exclusive().await;
    let mut bus = Agentbus::configured(Agentbus::write_config("http://127.0.0.1:9/v1"));
    let config = bus.config_path();
    let config = config.to_str().unwrap();

    // A fresh store is private, and check says so.
    let (code, stdout, stderr) = support::cli_async(&["--config", config, "check"]).await;
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let data = bus.dir.path().join("data");
    assert!(
        stdout.contains(&format!(
            "✓ data directory {} is private to agentbus's user",
            data.display()
        )),
        "{stdout}"
    );

    // As an older version (or `cp -r` under umask 022) would have left it.
    set_mode(&data, 0o755);
    set_mode(&data.join("fjall"), 0o755);
    let (code, stdout, stderr) = support::cli_async(&["--config", config, "check"]).await;
    // A warning: the other checks still run and pass, and the exit status is 0.
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let warning = stdout
        .lines()
        .find(|l| l.starts_with("⚠ the data directory"))
        .unwrap_or_else(|| panic!("no warning:\n{stdout}"));
    let shown = data.display();
    assert!(
        warning.contains(&format!("{shown} is 0755, {shown}/fjall is 0755")),
        "{warning}"
    );
    assert!(
        warning.ends_with(&format!("make it private with: chmod -R go= {shown}")),
        "{warning}"
    );
    assert!(stdout.contains("✓ homeserver reached agentbus"), "{stdout}");

    // serve starts anyway and logs the same warning.
    bus.spawn().await;
    bus.wait_log(&["WARN", "the data directory", "chmod -R go="])
        .await;
    bus.kill().await;

    // The fix it names works.
    let fixed = std::process::Command::new("chmod")
        .args(["-R", "go="])
        .arg(&data)
        .status()
        .unwrap();
    assert!(fixed.success());
    let (code, stdout, _) = support::cli_async(&["--config", config, "check"]).await;
    assert_eq!(code, Some(0));
    assert!(!stdout.contains('⚠'), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_error_quoting_the_key_reaches_neither_the_room_nor_the_log() {
    let _one_at_a_time = exclusive().await;
    const KEY: &str = "sk-e2e-Qw3rTy9UiOp4AsDfGh7J";
    let upper = KEY.to_uppercase();
    let prefix = &KEY[..12];
    let body = json!({"error": {
        "message": format!("Incorrect API key provided: {upper}. A key starting {prefix} was revoked."),
        "type": "invalid_request_error",
        "code": "invalid_api_key",
    }})
    .to_string();
    let llm = LlmStub::start(LlmMode::Refuse {
        status: 401,
        body: body.clone(),
    })
    .await;
    let mut bus = Agentbus::configured(Agentbus::write_config_full(
        &llm.url,
        OPEN_DMS,
        "api_key_env: AGENTBUS_E2E_STUB_KEY",
    ));
    bus.set_env("AGENTBUS_E2E_STUB_KEY", KEY);
    bus.spawn().await;
    let kim = Human::new("kim").await;
    let dm = kim.dm_with("damon").await;

    let question = kim.send(&dm, "hello?").await;
    let notice = kim.wait_reply(&dm, "damon", &question).await;
    assert_eq!(notice.content["msgtype"], "m.notice");
    assert_eq!(
        notice.body(),
        "⚠️ Damon could not answer: stub/damon-model: the model provider answered 401 Unauthorized \
         (refused: the API key was not accepted)."
    );
    let room_text = notice.content.to_string();
    for secret in [KEY, upper.as_str(), prefix] {
        assert!(!room_text.contains(secret), "{secret} in {room_text}");
    }
    assert!(!room_text.contains("Incorrect API key"), "{room_text}");
    assert_eq!(llm.requests().len(), 1, "a 401 is not retried");

    // The log keeps the provider's words, without the key.
    bus.wait_log(&[
        "model attempt failed",
        "Incorrect API key provided: [redacted]",
    ])
    .await;
    bus.wait_log(&["no model answered"]).await;
    let log = bus.log();
    for secret in [KEY, upper.as_str(), prefix, &KEY[8..20]] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}
