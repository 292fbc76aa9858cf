//! The built-in tools an agent's model may call: `current_time`, `fetch_url` and
//! `search_room_history`.
//!
//! [`Tools::specs`] lists the tools an agent's `tools:` config allows, to offer the model;
//! [`Tools::call`] runs one call and always returns text for the model — failures too, as
//! `error: …`, so the model can read what went wrong and answer anyway.
//!
//! `fetch_url` reaches only the public internet. Models follow links that people paste
//! into a room, so without a guard anyone in the room could make the bridge fetch
//! `http://169.254.169.254/` or an admin port on localhost and read the answer back.
//! Every address a host name resolves to is checked, in the resolver the HTTP client
//! connects with, so the address checked is the address connected (no DNS-rebinding
//! window); redirects are followed by hand and each hop is checked again.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use ruma::RoomId;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use url::{Host, Url};
use wildmatch::WildMatch;

use crate::config::{BUILTIN_TOOLS, ToolsConfig};
use crate::llm::{ToolCall, ToolSpec};
use crate::net::error_chain;
use crate::store::{HistoryEntry, HistoryStore};

/// How long one `fetch_url` may take, redirects included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Redirects `fetch_url` follows before giving up.
const MAX_REDIRECTS: usize = 5;
/// Bytes of a response body `fetch_url` reads (1 MiB); the rest is never downloaded.
const MAX_BODY_BYTES: usize = 1 << 20;
/// Characters of page text handed to the model (~2,000 tokens), so one fetch cannot
/// crowd the conversation out of the context window.
const MAX_TEXT_CHARS: usize = 8_000;
/// Lines of room history `search_room_history` scans, newest first.
const SEARCH_SCAN: usize = 1_000;
const SEARCH_DEFAULT_LIMIT: i64 = 10;
const SEARCH_MAX_LIMIT: i64 = 50;
/// Characters of one history line shown in search results.
const SEARCH_LINE_CHARS: usize = 500;
/// Largest UTC offset (±14 h, Kiribati) `current_time` accepts.
const MAX_OFFSET_MINUTES: u32 = 14 * 60;

/// What a tool may look at: the room's history and the room the agent is answering in.
pub struct ToolContext<'a> {
    pub history: &'a dyn HistoryStore,
    pub room_id: &'a RoomId,
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
            Self::CurrentTime => (
                "The current date and time: UTC, and local time for a UTC offset if given.",
                json!({
                    "type": "object",
                    "properties": {
                        "timezone_offset_minutes": {
                            "type": "integer",
                            "description": "Offset of the wanted local time from UTC in minutes, e.g. 60 for UTC+1, -300 for UTC-5.",
                            "minimum": -(MAX_OFFSET_MINUTES as i64),
                            "maximum": MAX_OFFSET_MINUTES,
                        }
                    },
                    "required": [],
                }),
            ),
            Self::FetchUrl => (
                "Fetch a public http(s) web page and return its content type and readable text (HTML reduced to text, at most ~8,000 characters).",
                json!({
                    "type": "object",
                    "properties": {
                        "url": { "type": "string", "description": "The http:// or https:// URL to fetch." }
                    },
                    "required": ["url"],
                }),
            ),
            Self::SearchRoomHistory => (
                "Search this room's recent message history (the last 1,000 messages) for messages containing all the given words, case-insensitively; newest first.",
                json!({
                    "type": "object",
                    "properties": {
                        "query": { "type": "string", "description": "Words that must all appear in a message." },
                        "limit": {
                            "type": "integer",
                            "description": "Most matches to return (default 10).",
                            "minimum": 1,
                            "maximum": SEARCH_MAX_LIMIT,
                            "default": SEARCH_DEFAULT_LIMIT,
                        }
                    },
                    "required": ["query"],
                }),
            ),
        };
        ToolSpec {
            name: self.name().to_owned(),
            description: description.to_owned(),
            parameters,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct CurrentTimeArgs {
    timezone_offset_minutes: Option<i32>,
}

#[derive(Debug, Deserialize)]
struct FetchUrlArgs {
    url: String,
}

#[derive(Debug, Deserialize)]
struct SearchArgs {
    query: String,
    limit: Option<i64>,
}

/// Runs the built-in tools; holds the HTTP client `fetch_url` uses.
#[derive(Clone)]
pub struct Tools {
    /// The client, or why it could not be built (then `fetch_url` answers with that).
    client: Result<reqwest::Client, String>,
    guard: AddressGuard,
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
        let client = reqwest::Client::builder()
            // A proxy would resolve and connect on our behalf, past the guard.
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver(guard.clone())))
            // Followed by hand, so each hop is checked before it is requested.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(FETCH_TIMEOUT)
            .user_agent(concat!(
                "agentbus/",
                env!("CARGO_PKG_VERSION"),
                " (fetch_url tool)"
            ))
            .build()
            .map_err(|e| format!("could not set up the HTTP client: {e}"));
        if let Err(e) = &client {
            tracing::error!(error = %e, "fetch_url will be unavailable");
        }
        Self { client, guard }
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
            Builtin::CurrentTime => match parse_args::<CurrentTimeArgs>(tool, &call.arguments) {
                Ok(args) => match describe_time(SystemTime::now(), args.timezone_offset_minutes) {
                    Ok(text) => ToolOutcome::ok(text),
                    Err(problem) => ToolOutcome::error(problem),
                },
                Err(outcome) => outcome,
            },
            Builtin::FetchUrl => match parse_args::<FetchUrlArgs>(tool, &call.arguments) {
                Ok(args) => self.fetch_url(&args.url).await,
                Err(outcome) => outcome,
            },
            Builtin::SearchRoomHistory => match parse_args::<SearchArgs>(tool, &call.arguments) {
                Ok(args) => search_room_history(ctx, &args).await,
                Err(outcome) => outcome,
            },
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

    async fn fetch_url(&self, url: &str) -> ToolOutcome {
        match tokio::time::timeout(FETCH_TIMEOUT, self.fetch(url)).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(problem)) => ToolOutcome::error(problem),
            Err(_) => ToolOutcome::error(format!(
                "fetching {url} took longer than {} s; the site may be slow or down",
                FETCH_TIMEOUT.as_secs()
            )),
        }
    }

    async fn fetch(&self, url: &str) -> Result<ToolOutcome, String> {
        let client = self
            .client
            .as_ref()
            .map_err(|e| format!("fetch_url is unavailable: {e}"))?;
        let mut url =
            Url::parse(url.trim()).map_err(|e| format!("{url:?} is not a valid URL: {e}"))?;
        self.guard.check_url(&url)?;
        let mut redirects = 0;
        loop {
            let response = client
                .get(url.clone())
                .header(
                    reqwest::header::ACCEPT,
                    "text/html, text/plain;q=0.9, */*;q=0.5",
                )
                .send()
                .await
                .map_err(|e| describe_send_error(&url, &e))?;
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .filter(|_| response.status().is_redirection());
            let Some(location) = location else {
                return Ok(read_page(response, &url, redirects).await);
            };
            if redirects == MAX_REDIRECTS {
                return Err(format!(
                    "{url} redirected more than {MAX_REDIRECTS} times; giving up"
                ));
            }
            url = self.guard.redirect_target(&url, location)?;
            redirects += 1;
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

/// `now` in RFC 3339 UTC, and in local time at `offset_minutes` from UTC when given.
fn describe_time(now: SystemTime, offset_minutes: Option<i32>) -> Result<String, String> {
    let mut text = format!(
        "UTC: {} ({})",
        humantime::format_rfc3339_seconds(now),
        weekday(now)
    );
    if let Some(offset) = offset_minutes {
        let minutes = offset.unsigned_abs();
        if minutes > MAX_OFFSET_MINUTES {
            return Err(format!(
                "timezone_offset_minutes {offset} is out of range; UTC offsets are between -{MAX_OFFSET_MINUTES} and {MAX_OFFSET_MINUTES}"
            ));
        }
        let shift = Duration::from_secs(u64::from(minutes) * 60);
        let local = if offset < 0 {
            now.checked_sub(shift)
        } else {
            now.checked_add(shift)
        }
        .ok_or("the local time is out of range")?;
        let sign = if offset < 0 { '-' } else { '+' };
        let zone = format!("{sign}{:02}:{:02}", minutes / 60, minutes % 60);
        let stamp = humantime::format_rfc3339_seconds(local).to_string();
        let stamp = stamp.strip_suffix('Z').unwrap_or(&stamp);
        text.push_str(&format!(
            "\nLocal (UTC{zone}): {stamp}{zone} ({})",
            weekday(local)
        ));
    }
    Ok(text)
}

fn weekday(time: SystemTime) -> &'static str {
    let days = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    // 1970-01-01 was a Thursday.
    [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ][(days % 7) as usize]
}

async fn search_room_history(ctx: &ToolContext<'_>, args: &SearchArgs) -> ToolOutcome {
    let words: Vec<String> = args
        .query
        .split_whitespace()
        .map(str::to_lowercase)
        .collect();
    if words.is_empty() {
        return ToolOutcome::error("the query is empty; pass the words to look for");
    }
    let limit = args
        .limit
        .unwrap_or(SEARCH_DEFAULT_LIMIT)
        .clamp(1, SEARCH_MAX_LIMIT) as usize;
    let history = match ctx.history.recent_history(ctx.room_id, SEARCH_SCAN).await {
        Ok(history) => history,
        Err(e) => return ToolOutcome::error(format!("could not read this room's history: {e}")),
    };
    let matches: Vec<&HistoryEntry> = history
        .iter()
        .rev()
        .filter(|entry| {
            let body = entry.body.to_lowercase();
            words.iter().all(|word| body.contains(word.as_str()))
        })
        .collect();
    if matches.is_empty() {
        return ToolOutcome::ok(format!(
            "no matches for {:?} in the last {} messages of this room",
            args.query,
            history.len()
        ));
    }
    let mut text = if matches.len() > limit {
        format!("{} matches; the newest {limit}:", matches.len())
    } else {
        format!("{} matches, newest first:", matches.len())
    };
    for entry in matches.into_iter().take(limit) {
        let body = entry.body.split_whitespace().collect::<Vec<_>>().join(" ");
        let (body, cut) = cap_chars(&body, SEARCH_LINE_CHARS);
        text.push_str(&format!(
            "\n[{}] {}: {body}{}",
            rfc3339_from_ms(entry.ts),
            entry.sender,
            if cut { "…" } else { "" }
        ));
    }
    ToolOutcome::ok(text)
}

/// A timestamp in milliseconds since the epoch as RFC 3339 (UTC, seconds), or as the raw
/// number when it is past year 9999 (which humantime cannot format).
fn rfc3339_from_ms(ms: u64) -> String {
    const LAST_SECOND_OF_9999: u64 = 253_402_300_799;
    if ms / 1000 > LAST_SECOND_OF_9999 {
        return format!("{ms} ms since 1970");
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// The first `max` characters of `text`, and whether anything was cut.
fn cap_chars(text: &str, max: usize) -> (&str, bool) {
    match text.char_indices().nth(max) {
        Some((end, _)) => (&text[..end], true),
        None => (text, false),
    }
}

/// Reads a final (non-redirect) response into what the model sees.
async fn read_page(mut response: reqwest::Response, url: &Url, redirects: usize) -> ToolOutcome {
    let status = response.status();
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let mut head = format!("URL: {url}");
    if redirects > 0 {
        head.push_str(&format!(
            " (after {redirects} redirect{})",
            if redirects == 1 { "" } else { "s" }
        ));
    }
    head.push_str(&format!(
        "\nStatus: {status}\nContent-Type: {}\n",
        if content_type.is_empty() {
            "(none)"
        } else {
            &content_type
        }
    ));
    let finish = |body: String| {
        let text = format!("{head}\n{body}");
        if status.is_success() {
            ToolOutcome::ok(text)
        } else {
            ToolOutcome::error(format!("the server answered {status}\n{text}"))
        }
    };

    if !mime.is_empty() && !is_textual(&mime) {
        let size = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or("size unknown".to_owned(), |n| format!("{n} bytes"));
        return finish(format!(
            "The content is {mime} ({size}), not text, so it is not shown."
        ));
    }

    let mut body = Vec::new();
    let mut over_limit = false;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_BODY_BYTES - body.len();
                if chunk.len() > room {
                    body.extend_from_slice(&chunk[..room]);
                    over_limit = true;
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                return ToolOutcome::error(format!(
                    "reading {url} failed midway: {}",
                    error_chain(&e)
                ));
            }
        }
    }
    if mime.is_empty() && looks_binary(&body) {
        return finish(format!(
            "The content has no content type and is not text ({} bytes read), so it is not shown.",
            body.len()
        ));
    }
    let decoded = decode(&body, &content_type);
    let text = if mime == "text/html" || mime == "application/xhtml+xml" {
        html_to_text(&decoded)
    } else {
        decoded
    };
    let (shown, cut) = cap_chars(&text, MAX_TEXT_CHARS);
    let mut body = shown.to_owned();
    if cut {
        body.push_str(&format!(
            "\n\n[truncated: showing the first {MAX_TEXT_CHARS} of {} characters]",
            text.chars().count()
        ));
    }
    if over_limit {
        body.push_str(&format!(
            "\n\n[the response is larger than {} KiB; only its start was read]",
            MAX_BODY_BYTES / 1024
        ));
    }
    finish(body)
}

/// Whether a media type is text the model can read.
fn is_textual(mime: &str) -> bool {
    mime.starts_with("text/")
        || mime.ends_with("+json")
        || mime.ends_with("+xml")
        || matches!(
            mime,
            "application/json"
                | "application/xml"
                | "application/javascript"
                | "application/x-javascript"
                | "application/ecmascript"
                | "application/x-ndjson"
                | "application/yaml"
                | "application/x-yaml"
                | "application/toml"
        )
}

/// Whether bytes served without a content type are binary: NULs, or not UTF-8 (a
/// character cut by the size limit at the very end is fine).
fn looks_binary(body: &[u8]) -> bool {
    if body.contains(&0) {
        return true;
    }
    match std::str::from_utf8(body) {
        Ok(_) => false,
        Err(e) => e.error_len().is_some(),
    }
}

/// Bytes as text: Latin-1 family charsets byte by byte, everything else as UTF-8 (invalid
/// sequences become U+FFFD).
fn decode(body: &[u8], content_type: &str) -> String {
    let content_type = content_type.to_ascii_lowercase();
    let latin1 = ["iso-8859-1", "latin1", "windows-1252", "us-ascii"]
        .iter()
        .any(|c| content_type.contains(&format!("charset={c}")));
    if latin1 {
        body.iter().map(|&b| char::from(b)).collect()
    } else {
        String::from_utf8_lossy(body).into_owned()
    }
}

/// Elements whose content is not readable text.
const SKIPPED_ELEMENTS: &[&str] = &["script", "style", "noscript", "template", "svg", "head"];
/// Elements that start a new line.
const BLOCK_ELEMENTS: &[&str] = &[
    "address",
    "article",
    "aside",
    "blockquote",
    "br",
    "dd",
    "div",
    "dl",
    "dt",
    "figcaption",
    "figure",
    "footer",
    "form",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "header",
    "hr",
    "li",
    "main",
    "nav",
    "ol",
    "p",
    "pre",
    "section",
    "table",
    "tr",
    "ul",
];

/// The readable text of an HTML page: the title, then the text without tags, scripts,
/// styles or comments, one line per block, entities decoded, whitespace collapsed.
fn html_to_text(html: &str) -> String {
    // ASCII lower-casing keeps byte offsets, so positions found in `lower` index `html`.
    let lower = html.to_ascii_lowercase();
    let mut out = String::new();
    let mut title = None;
    let mut i = 0;
    while i < html.len() {
        let Some(lt) = html[i..].find('<') else {
            push_text(&mut out, &html[i..]);
            break;
        };
        push_text(&mut out, &html[i..i + lt]);
        i += lt;
        let rest = &lower[i..];
        if rest.starts_with("<!--") {
            i = rest.find("-->").map_or(html.len(), |end| i + end + 3);
            continue;
        }
        let closing = rest[1..].starts_with('/');
        let name_start = if closing { 2 } else { 1 };
        let name_len = rest[name_start..]
            .bytes()
            .take_while(u8::is_ascii_alphanumeric)
            .count();
        let name = &rest[name_start..name_start + name_len];
        if name.is_empty() && !rest.starts_with("<!") && !rest.starts_with("<?") {
            // A bare `<` in text.
            out.push('<');
            i += 1;
            continue;
        }
        let after_tag = tag_end(html.as_bytes(), i + 1);
        if !closing && SKIPPED_ELEMENTS.contains(&name) {
            let content_end = lower[after_tag..]
                .find(&format!("</{name}"))
                .map_or(html.len(), |end| after_tag + end);
            if name == "head" {
                title = title_of(&html[after_tag..content_end]);
            }
            i = tag_end(html.as_bytes(), content_end);
            continue;
        }
        if name == "li" && !closing {
            out.push_str("\n- ");
        } else if name == "td" || name == "th" {
            out.push(' ');
        } else if BLOCK_ELEMENTS.contains(&name) {
            out.push('\n');
        }
        i = after_tag;
    }
    match title {
        Some(title) => format!("Title: {title}\n\n{}", tidy_lines(&out)),
        None => tidy_lines(&out),
    }
}

/// The text of the `<title>` in a page's head.
fn title_of(head: &str) -> Option<String> {
    let lower = head.to_ascii_lowercase();
    let start = tag_end(head.as_bytes(), lower.find("<title")? + 1);
    let end = lower[start..]
        .find("</title")
        .map_or(head.len(), |e| start + e);
    let mut title = String::new();
    push_text(&mut title, &head[start..end]);
    let title = title.split_whitespace().collect::<Vec<_>>().join(" ");
    (!title.is_empty()).then_some(title)
}

/// Index just past the `>` ending the tag that starts before `from`; a `>` inside a
/// quoted attribute value does not end it.
fn tag_end(html: &[u8], from: usize) -> usize {
    let mut quote = None;
    let mut after_equals = false;
    for (k, &b) in html.iter().enumerate().skip(from) {
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'>' => return k + 1,
            None if (b == b'"' || b == b'\'') && after_equals => quote = Some(b),
            None => {}
        }
        if !b.is_ascii_whitespace() {
            after_equals = b == b'=';
        }
    }
    html.len()
}

/// Appends text from between tags: entities decoded, source line breaks as spaces (only
/// tags break lines in HTML).
fn push_text(out: &mut String, text: &str) {
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        push_spaced(out, &rest[..amp]);
        rest = &rest[amp..];
        match decode_entity(rest) {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    push_spaced(out, rest);
}

fn push_spaced(out: &mut String, text: &str) {
    out.extend(
        text.chars()
            .map(|c| if c.is_whitespace() { ' ' } else { c }),
    );
}

/// The character an entity at the start of `text` stands for, and the entity's length.
fn decode_entity(text: &str) -> Option<(char, usize)> {
    // `;` is ASCII, so its index is a character boundary.
    let end = text.bytes().take(12).position(|b| b == b';')?;
    let entity = &text[1..end];
    let c = if let Some(number) = entity.strip_prefix('#') {
        let code = match number.strip_prefix(['x', 'X']) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => number.parse().ok()?,
        };
        char::from_u32(code).unwrap_or('\u{FFFD}')
    } else {
        match entity {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" | "#39" => '\'',
            "nbsp" => ' ',
            "ndash" => '–',
            "mdash" => '—',
            "hellip" => '…',
            "lsquo" => '‘',
            "rsquo" => '’',
            "ldquo" => '“',
            "rdquo" => '”',
            "laquo" => '«',
            "raquo" => '»',
            "bull" => '•',
            "middot" => '·',
            "copy" => '©',
            "reg" => '®',
            "trade" => '™',
            "deg" => '°',
            "times" => '×',
            "euro" => '€',
            "pound" => '£',
            _ => return None,
        }
    };
    Some((c, end + 1))
}

/// Collapses spaces within lines, trims them, and drops blank lines.
fn tidy_lines(text: &str) -> String {
    text.lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `error: …` text for a failed request: the refusal if the resolver refused the host,
/// else the error with its causes.
fn describe_send_error(url: &Url, error: &reqwest::Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(refused) = e.downcast_ref::<Refused>() {
            return format!("refused to fetch {url}: {refused}");
        }
        source = e.source();
    }
    if error.is_timeout() {
        return format!("fetching {url} timed out");
    }
    format!("could not fetch {url}: {}", error_chain(error))
}

/// Which addresses `fetch_url` may connect to.
#[derive(Debug, Clone)]
enum AddressGuard {
    /// Public internet addresses only (production).
    PublicOnly,
    /// Any address (tests with a local stub).
    #[cfg(test)]
    Any,
    /// Public addresses and these (tests: a stub on 127.0.0.1 that redirects elsewhere).
    #[cfg(test)]
    PublicAnd(Vec<IpAddr>),
}

/// A host or address `fetch_url` will not connect to.
#[derive(Debug, thiserror::Error)]
#[error(
    "{target} is not a public address ({class}); fetch_url only fetches from the public internet"
)]
struct Refused {
    /// `10.0.0.1`, or `intranet.example (10.0.0.1)` for a host name.
    target: String,
    class: &'static str,
}

impl AddressGuard {
    fn check(&self, ip: IpAddr) -> Result<(), &'static str> {
        match self {
            #[cfg(test)]
            Self::Any => Ok(()),
            #[cfg(test)]
            Self::PublicAnd(allowed) if allowed.contains(&ip) => Ok(()),
            _ => non_public(ip).map_or(Ok(()), Err),
        }
    }

    /// Checks what can be checked before connecting: the scheme, and the address when the
    /// host is an IP literal (the client connects to those without resolving them).
    /// Host names are checked by [`GuardedResolver`] as they are resolved.
    fn check_url(&self, url: &Url) -> Result<(), String> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "refused to fetch {url}: only http:// and https:// URLs can be fetched"
            ));
        }
        let ip = match url.host() {
            None => return Err(format!("{url} has no host to fetch from")),
            Some(Host::Domain(_)) => return Ok(()),
            Some(Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(Host::Ipv6(ip)) => IpAddr::V6(ip),
        };
        self.check(ip).map_err(|class| {
            let refused = Refused {
                target: ip.to_string(),
                class,
            };
            format!("refused to fetch {url}: {refused}")
        })
    }

    /// Where a redirect from `from` to `location` leads, if that may be fetched.
    fn redirect_target(&self, from: &Url, location: &str) -> Result<Url, String> {
        let next = from.join(location).map_err(|e| {
            format!("{from} redirected to {location:?}, which is not a valid URL: {e}")
        })?;
        self.check_url(&next)
            .map_err(|problem| format!("{from} redirected to {next}: {problem}"))?;
        Ok(next)
    }

    /// Checks every address `host` resolved to: one non-public address refuses the host,
    /// since the client may connect to any of them.
    fn check_resolved(&self, host: &str, addrs: &[SocketAddr]) -> Result<(), Refused> {
        for addr in addrs {
            self.check(addr.ip()).map_err(|class| Refused {
                target: format!("{host} ({})", addr.ip()),
                class,
            })?;
        }
        Ok(())
    }
}

/// The resolver the `fetch_url` client connects through: the system resolver, then the
/// guard on every address, so only checked addresses ever reach the connector.
struct GuardedResolver(AddressGuard);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            guard.check_resolved(&host, &addrs)?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Why `ip` is not a public internet address, or None when it is.
fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) => non_public_v4(ip),
        IpAddr::V6(ip) => non_public_v6(ip),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, ..) => "unspecified, 0.0.0.0/8",
        (127, ..) => "loopback",
        (10, ..) | (172, 16..=31, _) | (192, 168, _) => "private",
        (169, 254, _) => "link-local",
        (100, 64..=127, _) => "shared carrier-grade NAT, 100.64.0.0/10",
        (192, 0, 0) => "IETF protocol assignments, 192.0.0.0/24",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "benchmarking",
        (224..=239, ..) => "multicast",
        (255, 255, 255) if ip.is_broadcast() => "broadcast",
        (240..=255, ..) => "reserved",
        _ => return None,
    })
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    // Addresses that carry an IPv4 address reach that address: judge it instead.
    let embedded = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        non_public_v4(Ipv4Addr::new(a, b, c, d))
    };
    Some(match s {
        [0, 0, 0, 0, 0, 0, 0, 0] => "unspecified",
        [0, 0, 0, 0, 0, 0, 0, 1] => "loopback",
        // IPv4-mapped, ::ffff:0:0/96.
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => return embedded(hi, lo),
        // NAT64 well-known prefix, 64:ff9b::/96.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => return embedded(hi, lo),
        [0x64, 0xff9b, 1, ..] => "NAT64 local use",
        // 6to4, 2002::/16.
        [0x2002, hi, lo, ..] => return embedded(hi, lo),
        [0x2001, 0xdb8, ..] => "documentation",
        [0x2001, 0, ..] => "Teredo",
        [0x2001, 0..=0x1ff, ..] => "IETF protocol assignments, 2001::/23",
        [0x3fff, 0..=0x0fff, ..] => "documentation",
        [x, ..] if x & 0xfe00 == 0xfc00 => "unique-local",
        [x, ..] if x & 0xffc0 == 0xfe80 => "link-local",
        [x, ..] if x & 0xff00 == 0xff00 => "multicast",
        // Global unicast is 2000::/3; everything else is reserved or special-purpose
        // (IPv4-compatible ::/96, discard-only 100::/64, site-local fec0::/10, …).
        [x, ..] if x & 0xe000 != 0x2000 => "reserved",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use ruma::{EventId, OwnedRoomId, UserId, owned_room_id};

    use super::*;
    use crate::store::Stores;

    fn config(allow: &[&str], deny: &[&str]) -> ToolsConfig {
        ToolsConfig {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
            max_iterations: 5,
        }
    }

    fn tool_call(name: &str, arguments: &str) -> ToolCall {
        ToolCall {
            id: "call-1".into(),
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    struct Room {
        _dir: tempfile::TempDir,
        store: Stores,
        room_id: OwnedRoomId,
    }

    impl Room {
        fn new() -> Self {
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
            }
        }

        async fn say(&self, n: u64, sender: &str, body: &str) {
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

        fn ctx(&self) -> ToolContext<'_> {
            ToolContext {
                history: self.store.history.as_ref(),
                room_id: &self.room_id,
            }
        }
    }

    async fn call(tools: &Tools, name: &str, arguments: &str) -> ToolOutcome {
        let room = Room::new();
        tools
            .call(
                &ToolsConfig::default(),
                &room.ctx(),
                &tool_call(name, arguments),
            )
            .await
    }

    async fn fetch(tools: &Tools, url: &str) -> ToolOutcome {
        call(tools, "fetch_url", &json!({ "url": url }).to_string()).await
    }

    /// A stub web server on 127.0.0.1 counting its requests.
    async fn stub() -> (SocketAddr, Arc<AtomicUsize>) {
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
                .route("/big", get(|| async { "x".repeat(3 * MAX_BODY_BYTES) }))
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

    #[tokio::test]
    async fn current_time_is_rfc3339() {
        let outcome = call(&Tools::new(), "current_time", "").await;
        assert!(outcome.ok, "{}", outcome.text);
        let utc = outcome
            .text
            .strip_prefix("UTC: ")
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        let parsed = humantime::parse_rfc3339(utc).unwrap();
        let skew = SystemTime::now().duration_since(parsed).unwrap();
        assert!(skew < Duration::from_secs(5));

        let bad = call(
            &Tools::new(),
            "current_time",
            r#"{"timezone_offset_minutes": 9999}"#,
        )
        .await;
        assert!(!bad.ok);
        assert!(bad.text.contains("out of range"), "{}", bad.text);
    }

    #[test]
    fn local_time_applies_the_offset() {
        let now = humantime::parse_rfc3339("2024-03-01T00:30:00Z").unwrap();
        assert_eq!(
            describe_time(now, None).unwrap(),
            "UTC: 2024-03-01T00:30:00Z (Friday)"
        );
        assert_eq!(
            describe_time(now, Some(-90)).unwrap(),
            "UTC: 2024-03-01T00:30:00Z (Friday)\nLocal (UTC-01:30): 2024-02-29T23:00:00-01:30 (Thursday)"
        );
        assert_eq!(
            describe_time(now, Some(345))
                .unwrap()
                .lines()
                .nth(1)
                .unwrap(),
            "Local (UTC+05:45): 2024-03-01T06:15:00+05:45 (Friday)"
        );
    }

    #[tokio::test]
    async fn every_non_public_address_is_refused_without_connecting() {
        let (addr, hits) = stub().await;
        let port = addr.port();
        let tools = Tools::new();
        let refused = [
            format!("http://localhost:{port}/page"),
            "http://localhost/".to_owned(),
            "http://127.0.0.1:1/".to_owned(),
            format!("http://127.0.0.1:{port}/page"),
            "http://[::1]/".to_owned(),
            "http://169.254.169.254/latest/meta-data".to_owned(),
            "http://10.0.0.1/".to_owned(),
            "http://172.16.5.4/".to_owned(),
            "http://192.168.1.1/".to_owned(),
            "http://100.64.0.1/".to_owned(),
            "http://0.0.0.0/".to_owned(),
            "http://255.255.255.255/".to_owned(),
            "http://224.0.0.1/".to_owned(),
            "http://192.0.2.1/".to_owned(),
            "http://[::ffff:127.0.0.1]/".to_owned(),
            "http://[::ffff:10.0.0.1]/".to_owned(),
            "http://[fe80::1]/".to_owned(),
            "http://[fd00::1]/".to_owned(),
            "http://[ff02::1]/".to_owned(),
            "http://[2001:db8::1]/".to_owned(),
            "http://[64:ff9b::a00:1]/".to_owned(),
            "http://[2002:7f00:1::]/".to_owned(),
            "http://[::]/".to_owned(),
            "http://2130706433/".to_owned(),
            "http://0x7f.1/".to_owned(),
        ];
        for url in &refused {
            let outcome = fetch(&tools, url).await;
            assert!(!outcome.ok, "{url}: {}", outcome.text);
            assert!(
                outcome.text.starts_with("error: refused to fetch"),
                "{url}: {}",
                outcome.text
            );
            assert!(
                outcome.text.contains("not a public address"),
                "{url}: {}",
                outcome.text
            );
        }
        for url in [
            "file:///etc/passwd",
            "ftp://example.org/file",
            "gopher://example.org/",
        ] {
            let outcome = fetch(&tools, url).await;
            assert!(!outcome.ok);
            assert!(
                outcome.text.contains("only http:// and https://"),
                "{url}: {}",
                outcome.text
            );
        }
        assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing reached the stub");
    }

    #[test]
    fn a_host_is_refused_if_any_of_its_addresses_is_not_public() {
        let guard = AddressGuard::PublicOnly;
        let public: SocketAddr = "93.184.215.14:0".parse().unwrap();
        let private: SocketAddr = "10.1.2.3:0".parse().unwrap();
        assert!(guard.check_resolved("example.org", &[public]).is_ok());
        let refused = guard
            .check_resolved("rebind.example", &[public, private])
            .unwrap_err();
        assert_eq!(refused.target, "rebind.example (10.1.2.3)");
        assert_eq!(refused.class, "private");
    }

    #[test]
    fn public_addresses_pass() {
        for ip in [
            "93.184.215.14",
            "1.1.1.1",
            "8.8.8.8",
            "2606:4700:4700::1111",
            "2a00:1450:4001::1",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(non_public(ip.parse().unwrap()), None, "{ip}");
        }
    }

    #[test]
    fn each_redirect_hop_is_checked() {
        let guard = AddressGuard::PublicOnly;
        let from = Url::parse("https://example.org/a/b").unwrap();
        assert_eq!(
            guard.redirect_target(&from, "../c?d=1").unwrap().as_str(),
            "https://example.org/c?d=1"
        );
        assert_eq!(
            guard
                .redirect_target(&from, "//other.example/")
                .unwrap()
                .as_str(),
            "https://other.example/"
        );
        for location in [
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]:8080/",
            "file:///etc/passwd",
            "http://10.0.0.1/",
        ] {
            let problem = guard.redirect_target(&from, location).unwrap_err();
            assert!(
                problem.contains("refused to fetch"),
                "{location}: {problem}"
            );
        }
    }

    #[tokio::test]
    async fn a_redirect_from_an_allowed_server_to_a_private_address_is_refused() {
        let (addr, hits) = stub().await;
        let tools = Tools::with_guard(AddressGuard::PublicAnd(vec![addr.ip()]));
        let outcome = fetch(&tools, &format!("http://{addr}/to-metadata")).await;
        assert!(!outcome.ok);
        assert!(
            outcome
                .text
                .contains("redirected to http://169.254.169.254/latest/meta-data"),
            "{}",
            outcome.text
        );
        assert!(outcome.text.contains("link-local"), "{}", outcome.text);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn html_is_fetched_as_readable_text() {
        let (addr, _) = stub().await;
        let tools = Tools::allowing_private_addresses();
        let outcome = fetch(&tools, &format!("http://{addr}/to-page")).await;
        assert!(outcome.ok, "{}", outcome.text);
        let expected = format!(
            "URL: http://{addr}/page (after 1 redirect)\nStatus: 200 OK\nContent-Type: text/html; charset=utf-8\n\n\
             Title: Stub & Co\n\nHello\nFirst para with bold text.\n- one\n- two\n5 < 6"
        );
        assert_eq!(outcome.text, expected);
    }

    #[tokio::test]
    async fn fetched_text_is_capped() {
        let (addr, _) = stub().await;
        let tools = Tools::allowing_private_addresses();
        let long = fetch(&tools, &format!("http://{addr}/long")).await;
        assert!(long.ok);
        assert!(long.text.contains(&"é".repeat(MAX_TEXT_CHARS)));
        assert!(!long.text.contains(&"é".repeat(MAX_TEXT_CHARS + 1)));
        assert!(
            long.text
                .ends_with("[truncated: showing the first 8000 of 20000 characters]"),
            "{}",
            &long.text[long.text.len() - 200..]
        );

        let big = fetch(&tools, &format!("http://{addr}/big")).await;
        assert!(big.ok);
        assert!(
            big.text
                .contains(&format!("of {MAX_BODY_BYTES} characters]")),
            "only 1 MiB was read"
        );
        assert!(
            big.text
                .ends_with("[the response is larger than 1024 KiB; only its start was read]")
        );
    }

    #[tokio::test]
    async fn binary_content_errors_and_redirect_loops_are_described() {
        let (addr, _) = stub().await;
        let tools = Tools::allowing_private_addresses();
        let image = fetch(&tools, &format!("http://{addr}/image")).await;
        assert!(image.ok);
        assert!(
            image
                .text
                .ends_with("The content is image/png (7 bytes), not text, so it is not shown."),
            "{}",
            image.text
        );

        let missing = fetch(&tools, &format!("http://{addr}/missing")).await;
        assert!(!missing.ok);
        assert!(
            missing
                .text
                .starts_with("error: the server answered 404 Not Found"),
            "{}",
            missing.text
        );
        assert!(missing.text.ends_with("no such page"));

        let looping = fetch(&tools, &format!("http://{addr}/loop")).await;
        assert!(!looping.ok);
        assert!(
            looping.text.contains("redirected more than 5 times"),
            "{}",
            looping.text
        );

        let invalid = fetch(&tools, "not a url").await;
        assert!(
            invalid.text.contains("is not a valid URL"),
            "{}",
            invalid.text
        );
    }

    #[tokio::test]
    async fn history_search_finds_all_words_newest_first() {
        let room = Room::new();
        room.say(1, "@alice:hs", "The deploy failed on Monday")
            .await;
        room.say(2, "@bob:hs", "lunch?").await;
        room.say(3, "@alice:hs", "Deploy fixed,\nit was the DNS")
            .await;
        room.say(4, "@bob:hs", "another deploy, another failure")
            .await;
        let other = owned_room_id!("!other:hs");
        let elsewhere = HistoryEntry {
            event_id: EventId::parse("$x").unwrap(),
            sender: UserId::parse("@eve:hs").unwrap(),
            body: "deploy secrets".into(),
            ts: 0,
            thread_root: None,
            routed_to: Vec::new(),
        };
        room.store
            .history
            .append_history(&other, &elsewhere)
            .await
            .unwrap();
        let tools = Tools::new();
        let search = |args: serde_json::Value| {
            let call = tool_call("search_room_history", &args.to_string());
            let ctx = room.ctx();
            let tools = tools.clone();
            async move { tools.call(&ToolsConfig::default(), &ctx, &call).await }
        };

        let found = search(json!({ "query": "DEPLOY" })).await;
        assert!(found.ok);
        assert_eq!(
            found.text,
            "3 matches, newest first:\n\
             [2023-11-14T22:17:20Z] @bob:hs: another deploy, another failure\n\
             [2023-11-14T22:16:20Z] @alice:hs: Deploy fixed, it was the DNS\n\
             [2023-11-14T22:14:20Z] @alice:hs: The deploy failed on Monday"
        );

        let both = search(json!({ "query": "deploy fail" })).await;
        assert_eq!(both.text.lines().count(), 3, "{}", both.text);
        assert!(both.text.starts_with("2 matches"));

        let limited = search(json!({ "query": "deploy", "limit": 1 })).await;
        assert_eq!(
            limited.text,
            "3 matches; the newest 1:\n[2023-11-14T22:17:20Z] @bob:hs: another deploy, another failure"
        );

        let none = search(json!({ "query": "kubernetes" })).await;
        assert!(none.ok);
        assert_eq!(
            none.text,
            "no matches for \"kubernetes\" in the last 4 messages of this room"
        );

        let empty = search(json!({ "query": "  " })).await;
        assert!(!empty.ok);
    }

    #[test]
    fn out_of_range_timestamps_do_not_panic() {
        assert_eq!(rfc3339_from_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339_from_ms(u64::MAX),
            format!("{} ms since 1970", u64::MAX)
        );
    }

    #[test]
    fn html_to_text_handles_entities_quotes_and_bare_brackets() {
        assert_eq!(
            html_to_text("&漢字漢字漢字; &#1114112; &#xZZ;"),
            "&漢字漢字漢字; \u{FFFD} &#xZZ;"
        );
        assert_eq!(
            html_to_text(r#"<p title="a > b">x &#x41;&#66; &unknown; a < b</p><pre>one</pre>"#),
            "x AB &unknown; a < b\none"
        );
    }
}
