//! The built-in tools an agent's model may call: `current_time` (`time.rs`), `fetch_url`
//! (`fetch.rs`) and `search_room_history` (`history.rs`).
//!
//! [`Tools::specs`] lists the tools an agent's `tools:` config allows, to offer the model;
//! [`Tools::call`] runs one call and always returns text for the model — failures too, as
//! `error: …`, so the model can read what went wrong and answer anyway.

mod fetch;
mod history;
mod time;

use std::panic::AssertUnwindSafe;
use std::time::{Instant, SystemTime};

use futures::FutureExt;
use ruma::RoomId;
use serde::de::DeserializeOwned;
use wildmatch::WildMatch;

use super::audience::Audience;
use crate::config::{BUILTIN_TOOLS, ToolsConfig};
use crate::llm::{ToolCall, ToolSpec};
use crate::net::guard::AddressGuard;
use crate::store::HistoryStore;

/// What a tool may look at: the room's history, the room the agent is answering in, and
/// who will read the answer (a tool shows only what they all may read of the room).
pub struct ToolContext<'a> {
    pub history: &'a dyn HistoryStore,
    pub room_id: &'a RoomId,
    pub audience: &'a Audience,
}

/// The result of one call, as text for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutcome {
    pub ok: bool,
    /// What the model reads: the result, or `error: …` naming the problem.
    pub text: String,
}

impl ToolOutcome {
    fn ok(text: impl Into<String>) -> Self {
        Self {
            ok: true,
            text: text.into(),
        }
    }

    fn error(problem: impl std::fmt::Display) -> Self {
        Self {
            ok: false,
            text: format!("error: {problem}"),
        }
    }
}

/// The built-in tools, by the name models call them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Builtin {
    CurrentTime,
    FetchUrl,
    SearchRoomHistory,
}

impl Builtin {
    const ALL: [Builtin; 3] = [Self::CurrentTime, Self::FetchUrl, Self::SearchRoomHistory];

    fn name(self) -> &'static str {
        match self {
            Self::CurrentTime => "current_time",
            Self::FetchUrl => "fetch_url",
            Self::SearchRoomHistory => "search_room_history",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|tool| tool.name() == name)
    }

    fn spec(self) -> ToolSpec {
        let (description, parameters) = match self {
            Self::CurrentTime => time::spec(),
            Self::FetchUrl => fetch::spec(),
            Self::SearchRoomHistory => history::spec(),
        };
        ToolSpec {
            name: self.name().to_owned(),
            description: description.to_owned(),
            parameters,
        }
    }
}

/// Runs the built-in tools; holds the HTTP client `fetch_url` uses.
#[derive(Clone)]
pub struct Tools {
    fetcher: fetch::Fetcher,
}

impl Default for Tools {
    fn default() -> Self {
        Self::new()
    }
}

impl Tools {
    /// The production tools: `fetch_url` refuses every non-public address.
    pub fn new() -> Self {
        Self::with_guard(AddressGuard::PublicOnly)
    }

    /// Tools whose `fetch_url` also reaches loopback and private addresses: for tests (a
    /// stub server on 127.0.0.1), so it is not compiled into the binary.
    #[cfg(test)]
    pub fn allowing_private_addresses() -> Self {
        Self::with_guard(AddressGuard::Any)
    }

    fn with_guard(guard: AddressGuard) -> Self {
        Self {
            fetcher: fetch::Fetcher::new(guard),
        }
    }

    /// Whether an agent with `config` may call the built-in tool `name`: it matches an
    /// `allow` glob and no `deny` glob (deny wins). Unknown tools are never allowed.
    pub fn allowed(config: &ToolsConfig, name: &str) -> bool {
        let matches =
            |patterns: &[String]| patterns.iter().any(|p| WildMatch::new(p).matches(name));
        BUILTIN_TOOLS.contains(&name) && matches(&config.allow) && !matches(&config.deny)
    }

    /// The specs of the tools `config` allows, to offer the model.
    pub fn specs(&self, config: &ToolsConfig) -> Vec<ToolSpec> {
        Builtin::ALL
            .into_iter()
            .filter(|tool| Self::allowed(config, tool.name()))
            .map(Builtin::spec)
            .collect()
    }

    /// Runs `call` if `config` allows it. Never panics; every failure is an outcome the
    /// model reads.
    pub async fn call(
        &self,
        config: &ToolsConfig,
        ctx: &ToolContext<'_>,
        call: &ToolCall,
    ) -> ToolOutcome {
        let started = Instant::now();
        // A bug in one tool must not end the agent's turn: it becomes an error the model reads.
        let outcome = AssertUnwindSafe(self.run(config, ctx, call))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                tracing::error!(tool = %call.name, room_id = %ctx.room_id, "tool panicked");
                ToolOutcome::error(format!("the tool {} failed unexpectedly", call.name))
            });
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if outcome.ok {
            tracing::info!(tool = %call.name, call_id = %call.id, room_id = %ctx.room_id, ok = true, bytes = outcome.text.len(), elapsed_ms, "tool call");
        } else {
            // The first line says what went wrong; what follows may be fetched text.
            let error = outcome.text.lines().next().unwrap_or_default();
            tracing::info!(tool = %call.name, call_id = %call.id, room_id = %ctx.room_id, ok = false, bytes = outcome.text.len(), elapsed_ms, error, "tool call");
        }
        outcome
    }

    async fn run(
        &self,
        config: &ToolsConfig,
        ctx: &ToolContext<'_>,
        call: &ToolCall,
    ) -> ToolOutcome {
        let Some(tool) = Builtin::from_name(&call.name) else {
            return ToolOutcome::error(format!(
                "there is no tool named {:?}; the tools offered are: {}",
                call.name,
                self.offered(config)
            ));
        };
        if !Self::allowed(config, tool.name()) {
            return ToolOutcome::error(format!(
                "the tool {} is not enabled for this agent; the tools offered are: {}",
                tool.name(),
                self.offered(config)
            ));
        }
        match tool {
            Builtin::CurrentTime => {
                match parse_args::<time::CurrentTimeArgs>(tool, &call.arguments) {
                    Ok(args) => {
                        match time::describe_time(SystemTime::now(), args.timezone_offset_minutes) {
                            Ok(text) => ToolOutcome::ok(text),
                            Err(problem) => ToolOutcome::error(problem),
                        }
                    }
                    Err(outcome) => outcome,
                }
            }
            Builtin::FetchUrl => match parse_args::<fetch::FetchUrlArgs>(tool, &call.arguments) {
                Ok(args) => self.fetcher.fetch_url(&args.url).await,
                Err(outcome) => outcome,
            },
            Builtin::SearchRoomHistory => {
                match parse_args::<history::SearchArgs>(tool, &call.arguments) {
                    Ok(args) => history::search_room_history(ctx, &args).await,
                    Err(outcome) => outcome,
                }
            }
        }
    }

    fn offered(&self, config: &ToolsConfig) -> String {
        let names: Vec<String> = self.specs(config).into_iter().map(|s| s.name).collect();
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    }
}

/// Parses a call's JSON arguments; models sometimes send nothing for "no arguments".
fn parse_args<T: DeserializeOwned>(tool: Builtin, arguments: &str) -> Result<T, ToolOutcome> {
    let arguments = if arguments.trim().is_empty() {
        "{}"
    } else {
        arguments
    };
    serde_json::from_str(arguments).map_err(|e| {
        ToolOutcome::error(format!(
            "the arguments for {} are not valid: {e}; expected a JSON object matching its parameters",
            tool.name()
        ))
    })
}

/// The first `max` characters of `text`, and whether anything was cut.
fn cap_chars(text: &str, max: usize) -> (&str, bool) {
    match text.char_indices().nth(max) {
        Some((end, _)) => (&text[..end], true),
        None => (text, false),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use ruma::{EventId, OwnedRoomId, UserId, owned_room_id};
    use serde_json::json;

    use super::*;
    use crate::store::{HistoryEntry, Stores};

    pub(super) fn config(allow: &[&str], deny: &[&str]) -> ToolsConfig {
        ToolsConfig {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
            max_iterations: 5,
        }
    }

    pub(super) fn tool_call(name: &str, arguments: &str) -> ToolCall {
        ToolCall {
            id: "call-1".into(),
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    pub(super) struct Room {
        _dir: tempfile::TempDir,
        pub(super) store: Stores,
        pub(super) room_id: OwnedRoomId,
        pub(super) audience: Audience,
    }

    impl Room {
        pub(super) fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = crate::store::open(&crate::config::StoreConfig {
                path: dir.path().to_owned(),
                ..Default::default()
            })
            .unwrap();
            Self {
                _dir: dir,
                store,
                room_id: owned_room_id!("!room:hs"),
                audience: Audience::unrestricted(),
            }
        }

        pub(super) async fn say(&self, n: u64, sender: &str, body: &str) {
            let entry = HistoryEntry {
                event_id: EventId::parse(format!("$e{n}")).unwrap(),
                sender: UserId::parse(sender).unwrap(),
                body: body.into(),
                ts: 1_700_000_000_000 + n * 60_000,
                thread_root: None,
                routed_to: Vec::new(),
            };
            self.store
                .history
                .append_history(&self.room_id, &entry)
                .await
                .unwrap();
        }

        pub(super) fn ctx(&self) -> ToolContext<'_> {
            ToolContext {
                history: self.store.history.as_ref(),
                room_id: &self.room_id,
                audience: &self.audience,
            }
        }
    }

    pub(super) async fn call(tools: &Tools, name: &str, arguments: &str) -> ToolOutcome {
        let room = Room::new();
        tools
            .call(
                &ToolsConfig::default(),
                &room.ctx(),
                &tool_call(name, arguments),
            )
            .await
    }

    pub(super) async fn fetch(tools: &Tools, url: &str) -> ToolOutcome {
        call(tools, "fetch_url", &json!({ "url": url }).to_string()).await
    }

    /// A stub web server on 127.0.0.1 counting its requests.
    pub(super) async fn stub() -> (SocketAddr, Arc<AtomicUsize>) {
        let hits = Arc::new(AtomicUsize::new(0));
        let page = "<!doctype html><html><head><title>Stub &amp; Co</title><style>body{color:red}</style>\
            <script>alert('x')</script></head><body><h1>Hello</h1><p>First&nbsp;para with <b>bold</b>\n text.</p>\
            <!-- hidden --><ul><li>one</li><li>two</li></ul><p>5 &lt; 6</p></body></html>";
        let app =
            Router::new()
                .route(
                    "/page",
                    get(move || async move {
                        ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page)
                    }),
                )
                .route(
                    "/big",
                    get(|| async { "x".repeat(3 * fetch::MAX_BODY_BYTES) }),
                )
                .route("/long", get(|| async { "é".repeat(20_000) }))
                .route(
                    "/image",
                    get(|| async {
                        (
                            [(header::CONTENT_TYPE, "image/png")],
                            vec![0x89u8, b'P', b'N', b'G', 0, 1, 2],
                        )
                    }),
                )
                .route(
                    "/missing",
                    get(|| async { (StatusCode::NOT_FOUND, "no such page") }),
                )
                .route(
                    "/to-page",
                    get(|| async {
                        (StatusCode::FOUND, [(header::LOCATION, "/page")]).into_response()
                    }),
                )
                .route(
                    "/to-metadata",
                    get(|| async {
                        (
                            StatusCode::FOUND,
                            [(header::LOCATION, "http://169.254.169.254/latest/meta-data")],
                        )
                            .into_response()
                    }),
                )
                .route(
                    "/loop",
                    get(|| async {
                        (StatusCode::FOUND, [(header::LOCATION, "/loop")]).into_response()
                    }),
                )
                .layer(axum::middleware::from_fn({
                    let hits = hits.clone();
                    move |request, next: axum::middleware::Next| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        next.run(request)
                    }
                }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (addr, hits)
    }

    #[test]
    fn builtins_match_the_configured_tool_names() {
        let names: Vec<&str> = Builtin::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(names, BUILTIN_TOOLS);
    }

    #[test]
    fn allow_and_deny_globs_with_deny_winning() {
        let cases: &[(&[&str], &[&str], &str, bool)] = &[
            (&["*"], &[], "fetch_url", true),
            (&["*"], &[], "rm_rf", false),
            (&[], &[], "current_time", false),
            (&["current_time"], &[], "current_time", true),
            (&["current_time"], &[], "fetch_url", false),
            (&["*_time", "search_*"], &[], "search_room_history", true),
            (&["*_time", "search_*"], &[], "fetch_url", false),
            (&["*"], &["fetch_url"], "fetch_url", false),
            (&["*"], &["fetch_url"], "current_time", true),
            (&["fetch_url"], &["fetch_*"], "fetch_url", false),
            (&["*"], &["*"], "current_time", false),
            (&["fetch_ur?"], &[], "fetch_url", true),
        ];
        for (allow, deny, name, expected) in cases {
            assert_eq!(
                Tools::allowed(&config(allow, deny), name),
                *expected,
                "allow {allow:?} deny {deny:?} tool {name}"
            );
        }
    }

    #[test]
    fn specs_are_the_allowed_tools_with_object_schemas() {
        let tools = Tools::new();
        let all = tools.specs(&ToolsConfig::default());
        assert_eq!(
            all.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            BUILTIN_TOOLS
        );
        for spec in &all {
            assert_eq!(spec.parameters["type"], "object", "{}", spec.name);
            assert!(!spec.description.is_empty());
        }
        let some = tools.specs(&config(&["*"], &["fetch_url"]));
        assert_eq!(
            some.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["current_time", "search_room_history"]
        );
    }

    #[tokio::test]
    async fn unknown_denied_and_malformed_calls_are_errors_for_the_model() {
        let (addr, hits) = stub().await;
        let tools = Tools::allowing_private_addresses();
        let room = Room::new();

        let unknown = tools
            .call(
                &ToolsConfig::default(),
                &room.ctx(),
                &tool_call("rm_rf", "{}"),
            )
            .await;
        assert!(!unknown.ok);
        assert!(
            unknown
                .text
                .starts_with("error: there is no tool named \"rm_rf\""),
            "{}",
            unknown.text
        );

        // The model calls a tool it was not offered: it does not run.
        let denied = tools
            .call(
                &config(&["*"], &["fetch_url"]),
                &room.ctx(),
                &tool_call(
                    "fetch_url",
                    &json!({ "url": format!("http://{addr}/page") }).to_string(),
                ),
            )
            .await;
        assert!(!denied.ok);
        assert!(
            denied.text.contains("fetch_url is not enabled"),
            "{}",
            denied.text
        );
        assert_eq!(hits.load(Ordering::SeqCst), 0);

        for arguments in ["{\"url\": ", "[1]", "{}", "{\"url\": 5}"] {
            let bad = tools
                .call(
                    &ToolsConfig::default(),
                    &room.ctx(),
                    &tool_call("fetch_url", arguments),
                )
                .await;
            assert!(!bad.ok);
            assert!(
                bad.text
                    .starts_with("error: the arguments for fetch_url are not valid"),
                "{}",
                bad.text
            );
        }
    }
}
