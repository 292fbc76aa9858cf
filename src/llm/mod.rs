//! Model providers behind one streaming [`Provider`] trait. Knows nothing about Matrix.
//!
//! Three wire formats — OpenAI Chat Completions (`openai`), Anthropic Messages
//! (`anthropic`) and Ollama's `/api/chat` (`ollama`) — plus the built-in `echo`. A
//! provider turns a [`CompletionRequest`] into a stream of [`Delta`]s; [`collect`] folds a
//! stream into one [`Completion`], merging tool-call fragments by index. Retries, fallbacks
//! and concurrency caps live in [`hub`], above the providers.

mod anthropic;
mod echo;
pub mod hub;
mod ollama;
mod openai;
mod sse;
mod transport;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ProviderApi};

pub use anthropic::AnthropicProvider;
pub use echo::EchoProvider;
pub use hub::{Attempt, Failure, LlmHub};
pub use ollama::OllamaProvider;
pub use openai::OpenAiProvider;
pub use transport::{HttpProvider, WireFormat};

/// Who said a line of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    /// The result of a tool call, answering [`ChatMessage::tool_call_id`].
    Tool,
}

/// An image sent to a vision model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// e.g. `image/png`.
    pub mime: String,
    /// The image bytes, base64-encoded (standard alphabet, padded).
    pub base64: String,
}

/// One tool call a model asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The provider's call ID, echoed back with the result (Ollama has none; we make one).
    pub id: String,
    pub name: String,
    /// The arguments as JSON text, exactly as the model wrote them.
    pub arguments: String,
}

/// A tool offered to the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments object.
    pub parameters: serde_json::Value,
}

/// One line of the conversation sent to a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    /// The text (for `Role::Tool`: the tool's result).
    pub content: String,
    /// Images attached to a user message.
    pub images: Vec<Image>,
    /// Tool calls an assistant message made.
    pub tool_calls: Vec<ToolCall>,
    /// For `Role::Tool`: the call this result answers.
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            images: Vec::new(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// A user message carrying images.
    pub fn with_images(mut self, images: Vec<Image>) -> Self {
        self.images = images;
        self
    }

    /// An assistant message that asked for tool calls.
    pub fn tool_request(content: impl Into<String>, calls: Vec<ToolCall>) -> Self {
        Self {
            tool_calls: calls,
            ..Self::new(Role::Assistant, content)
        }
    }

    /// The result of `call`.
    pub fn tool_result(call: &ToolCall, result: impl Into<String>) -> Self {
        Self {
            tool_call_id: Some(call.id.clone()),
            ..Self::new(Role::Tool, result)
        }
    }
}

/// A request for one answer.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    /// Tools the model may call; empty means none are offered.
    pub tools: Vec<ToolSpec>,
    /// Most tokens in the answer.
    pub max_tokens: u32,
    /// The answer must be one JSON value of this schema (structured output); `None` for
    /// free text.
    pub schema: Option<AnswerSchema>,
}

/// The form a structured answer takes: a JSON object matching a JSON Schema. Written for
/// the strictest provider (OpenAI's strict mode): every property required, no others.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerSchema {
    /// Names the schema for the provider (letters, digits, `_` and `-`).
    pub name: String,
    /// The JSON Schema of the answer.
    pub schema: serde_json::Value,
}

impl AnswerSchema {
    /// What a provider without a JSON mode is told instead, as a system instruction.
    pub fn instruction(&self) -> String {
        format!(
            "Answer with one JSON object and nothing else (no prose, no code fence), \
             matching this JSON Schema:\n{}",
            self.schema
        )
    }
}

/// Why a model stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It finished its answer.
    Stop,
    /// It hit `max_tokens`.
    Length,
    /// It wants tool results.
    ToolCalls,
    /// A content filter cut it off.
    ContentFilter,
    /// Something else the provider said.
    Other,
}

/// Token counts the provider reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// One piece of a streamed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// More answer text.
    Text(String),
    /// A fragment of tool call `index`: the first fragment of a call carries its `id` and
    /// `name`, later ones more `arguments` text to append.
    ToolCall {
        index: usize,
        id: Option<String>,
        name: Option<String>,
        arguments: String,
    },
    /// Token usage (may come more than once; the last one counts).
    Usage(Usage),
    /// The model is done.
    Finish(FinishReason),
}

/// Why a provider gave no (complete) answer. The text is for the log: it quotes what the
/// provider said (with the API key [`redact`]ed). Rooms get a short cause without the
/// provider's words (`agents::notices`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    #[error("the model did not answer within {}s", .0.as_secs())]
    Timeout(Duration),
    #[error("the model stopped sending for {}s in the middle of its answer", .0.as_secs())]
    Stalled(Duration),
    #[error("the model provider returned HTTP {status}: {message}")]
    Http {
        status: u16,
        message: String,
        /// `Retry-After`, when the provider sent one.
        retry_after: Option<Duration>,
    },
    #[error("the model provider could not be reached: {0}")]
    Network(String),
    #[error("the model provider sent an answer we could not read: {0}")]
    BadResponse(String),
    #[error("the model is still warming up")]
    WarmingUp,
}

impl LlmError {
    /// A short label for the metrics: `timeout`, `stalled`, `http_429`, `network`, …
    pub fn kind(&self) -> String {
        match self {
            LlmError::Timeout(_) => "timeout".into(),
            LlmError::Stalled(_) => "stalled".into(),
            LlmError::Http { status, .. } => format!("http_{status}"),
            LlmError::Network(_) => "network".into(),
            LlmError::BadResponse(_) => "bad_response".into(),
            LlmError::WarmingUp => "warming_up".into(),
        }
    }

    /// Whether trying the same model again may help: 408, 409, 429, 5xx, network trouble,
    /// timeouts.
    pub fn is_retryable(&self) -> bool {
        match self {
            LlmError::Http { status, .. } => {
                matches!(status, 408 | 409 | 425 | 429) || *status >= 500
            }
            LlmError::Timeout(_) | LlmError::Stalled(_) | LlmError::Network(_) => true,
            LlmError::BadResponse(_) | LlmError::WarmingUp => false,
        }
    }

    /// How long the provider asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LlmError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A stream of answer pieces. It ends after `Finish`, or with an error.
pub type DeltaStream = BoxStream<'static, Result<Delta, LlmError>>;

/// A model endpoint.
pub trait Provider: Send + Sync {
    /// Starts an answer. The future resolves once the provider accepted the request (HTTP
    /// status and headers read), so refusals such as 429 come back here, before any delta.
    fn stream(&self, request: CompletionRequest) -> BoxFuture<'_, Result<DeltaStream, LlmError>>;
}

/// A whole answer, folded from a stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completion {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub usage: Option<Usage>,
    pub finish: Option<FinishReason>,
}

/// Folds deltas into a [`Completion`]: text appended, tool-call fragments merged by index
/// (a call without an ID gets `call_<index>`).
#[derive(Debug, Default)]
pub struct Collector {
    completion: Completion,
    calls: std::collections::BTreeMap<usize, ToolCall>,
}

impl Collector {
    pub fn push(&mut self, delta: Delta) {
        match delta {
            Delta::Text(text) => self.completion.text.push_str(&text),
            Delta::ToolCall {
                index,
                id,
                name,
                arguments,
            } => {
                let call = self.calls.entry(index).or_insert_with(|| ToolCall {
                    id: String::new(),
                    name: String::new(),
                    arguments: String::new(),
                });
                if let Some(id) = id.filter(|i| !i.is_empty()) {
                    call.id = id;
                }
                if let Some(name) = name.filter(|n| !n.is_empty()) {
                    call.name = name;
                }
                call.arguments.push_str(&arguments);
            }
            Delta::Usage(usage) => self.completion.usage = Some(usage),
            Delta::Finish(reason) => self.completion.finish = Some(reason),
        }
    }

    pub fn finish(mut self) -> Completion {
        self.completion.tool_calls = self
            .calls
            .into_iter()
            .map(|(index, mut call)| {
                if call.id.is_empty() {
                    call.id = format!("call_{index}");
                }
                call
            })
            .collect();
        self.completion
    }
}

/// Reads a whole stream into one [`Completion`].
pub async fn collect(mut stream: DeltaStream) -> Result<Completion, LlmError> {
    let mut collector = Collector::default();
    while let Some(delta) = stream.next().await {
        collector.push(delta?);
    }
    Ok(collector.finish())
}

/// Providers by config name.
pub type ProviderRegistry = HashMap<String, Arc<dyn Provider>>;

/// The API key of a provider config, read from its environment variable.
fn api_key(name: &str, env: Option<&str>) -> Option<String> {
    let var = env?;
    let key = std::env::var(var).ok().filter(|k| !k.is_empty());
    if key.is_none() {
        tracing::warn!(provider = %name, env = var, "API key variable is not set; sending requests without a key");
    }
    key
}

/// Builds every configured provider, reading API keys from their environment variables.
pub fn build_providers(config: &Config) -> ProviderRegistry {
    config
        .providers
        .iter()
        .map(|(name, provider)| {
            let key = || api_key(name, provider.api_key_env.as_deref());
            let built: Arc<dyn Provider> = match provider.api {
                ProviderApi::Echo => Arc::new(EchoProvider),
                ProviderApi::OpenaiCompletions => Arc::new(OpenAiProvider::new(provider, key())),
                ProviderApi::AnthropicMessages => Arc::new(AnthropicProvider::new(provider, key())),
                ProviderApi::Ollama => Arc::new(OllamaProvider::new(provider, key())),
            };
            (name.clone(), built)
        })
        .collect()
}

/// The shortest run of a key's characters that [`redact`] hides: long enough that ordinary
/// words rarely match by chance, short enough that a prefix or a fragment of the key quoted
/// by a provider ("sk-proj-AbCd…") is hidden too.
pub const REDACT_MIN_RUN: usize = 8;

/// What [`redact`] puts where the key was.
pub const REDACTED: &str = "[redacted]";

/// `text` with every trace of `secret` replaced by `[redacted]`: any run of 8 or more
/// consecutive characters of the key ([`REDACT_MIN_RUN`]), compared case-insensitively,
/// so an error body that quotes the key upper-cased, cut short or in part shows none of
/// it. A key shorter than 8 characters is hidden only where it appears whole (any case);
/// one shorter than 4 is not a secret worth hiding and is left alone.
///
/// One pass over `text` per character of the key (O(text × key), keys are short), no
/// pattern built from the secret.
pub fn redact(text: &str, secret: Option<&str>) -> String {
    let Some(secret) = secret else {
        return text.to_owned();
    };
    let key: Vec<char> = secret.chars().map(fold_case).collect();
    if key.len() < 4 {
        return text.to_owned();
    }
    let min_run = key.len().min(REDACT_MIN_RUN);
    let chars: Vec<char> = text.chars().collect();
    // run[j]: how many characters of `text` from the current position on match the key
    // from its character j on. Walking `text` backwards, run[j] = run'[j + 1] + 1 on a match,
    // where run' is the row of the next position.
    let mut run = vec![0usize; key.len() + 1];
    let mut hidden_until = vec![0usize; chars.len()];
    for i in (0..chars.len()).rev() {
        let c = fold_case(chars[i]);
        let mut longest = 0;
        // Ascending j reads run[j + 1] before it is overwritten for this position.
        for j in 0..key.len() {
            run[j] = if key[j] == c { run[j + 1] + 1 } else { 0 };
            longest = longest.max(run[j]);
        }
        if longest >= min_run {
            hidden_until[i] = i + longest;
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if hidden_until[i] == 0 {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        // Overlapping runs become one marker.
        let mut end = hidden_until[i];
        let mut k = i;
        while k < end.min(chars.len()) {
            end = end.max(hidden_until[k]);
            k += 1;
        }
        out.push_str(REDACTED);
        i = end;
    }
    out
}

/// A character compared without case: its lower case when that is one character.
fn fold_case(c: char) -> char {
    if c.is_ascii() {
        return c.to_ascii_lowercase();
    }
    let mut lower = c.to_lowercase();
    match (lower.next(), lower.next()) {
        (Some(l), None) => l,
        _ => c,
    }
}

/// `error.message` (or `error` / `message`) of a JSON error body, else the start of the
/// body; at most 200 characters, with `secret` redacted.
pub fn error_message(body: &[u8], secret: Option<&str>) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let message = parsed.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("error"))
            .or_else(|| v.get("message"))
            .and_then(|m| m.as_str())
    });
    let text = match message {
        Some(m) => m.to_owned(),
        None => String::from_utf8_lossy(body).into_owned(),
    };
    let text = redact(text.trim(), secret);
    if text.chars().count() > 200 {
        format!("{}…", text.chars().take(200).collect::<String>())
    } else {
        text
    }
}

/// `Retry-After` as seconds or an HTTP date, capped at 60 s.
pub fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let wait = match value.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::from_secs_f64(secs),
        Ok(_) => return None,
        Err(_) => httpdate_delay(value)?,
    };
    Some(wait.min(hub::MAX_BACKOFF))
}

fn httpdate_delay(value: &str) -> Option<Duration> {
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_call_fragments_merge_by_index() {
        let mut collector = Collector::default();
        for delta in [
            Delta::Text("Let me ".into()),
            Delta::ToolCall {
                index: 1,
                id: Some("b".into()),
                name: Some("fetch_url".into()),
                arguments: "{\"url\":".into(),
            },
            Delta::ToolCall {
                index: 0,
                id: None,
                name: Some("current_time".into()),
                arguments: "{}".into(),
            },
            Delta::Text("check.".into()),
            Delta::ToolCall {
                index: 1,
                id: None,
                name: None,
                arguments: "\"https://example.org\"}".into(),
            },
            Delta::Usage(Usage {
                input_tokens: 3,
                output_tokens: 4,
            }),
            Delta::Finish(FinishReason::ToolCalls),
        ] {
            collector.push(delta);
        }
        let completion = collector.finish();
        assert_eq!(completion.text, "Let me check.");
        assert_eq!(
            completion.tool_calls,
            vec![
                ToolCall {
                    id: "call_0".into(),
                    name: "current_time".into(),
                    arguments: "{}".into()
                },
                ToolCall {
                    id: "b".into(),
                    name: "fetch_url".into(),
                    arguments: "{\"url\":\"https://example.org\"}".into()
                },
            ]
        );
        assert_eq!(completion.finish, Some(FinishReason::ToolCalls));
        assert_eq!(completion.usage.unwrap().output_tokens, 4);
    }

    #[test]
    fn error_messages_are_short_and_never_carry_the_key() {
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-secret-123"}}"#;
        assert_eq!(
            error_message(body, Some("sk-secret-123")),
            "Incorrect API key provided: [redacted]"
        );
        let long = "x".repeat(500);
        assert_eq!(error_message(long.as_bytes(), None).chars().count(), 201);
        // Redacted before it is cut to 200 characters, so no cut leaves a piece of the key.
        let body = format!("{}SK-SECRET-123", "y".repeat(195));
        let message = error_message(body.as_bytes(), Some("sk-secret-123"));
        assert_eq!(message, format!("{}[reda…", "y".repeat(195)));
    }

    const KEY: &str = "sk-proj-Ab12Cd34Ef56Gh78";

    #[test]
    fn the_exact_key_is_redacted() {
        assert_eq!(
            redact(&format!("bad key {KEY}."), Some(KEY)),
            "bad key [redacted]."
        );
        assert_eq!(redact("no key here", None), "no key here");
    }

    #[test]
    fn the_key_upper_cased_is_redacted() {
        let text = format!("Invalid key {}", KEY.to_uppercase());
        assert_eq!(redact(&text, Some(KEY)), "Invalid key [redacted]");
    }

    #[test]
    fn a_twelve_character_prefix_is_redacted() {
        let text = format!("key starting {}… is revoked", &KEY[..12]);
        assert_eq!(
            redact(&text, Some(KEY)),
            "key starting [redacted]… is revoked"
        );
    }

    #[test]
    fn an_eight_character_run_from_the_middle_is_redacted_in_any_case() {
        // "2cd34ef5" is KEY[10..18], lower-cased.
        let text = "fragment x2cd34ef5y of it";
        assert_eq!(redact(text, Some(KEY)), "fragment x[redacted]y of it");
    }

    #[test]
    fn a_seven_character_run_is_left_alone() {
        let text = format!("only {} of it", &KEY[10..17]);
        assert_eq!(redact(&text, Some(KEY)), text);
    }

    #[test]
    fn unicode_around_the_key_survives() {
        let text = format!("密钥无效：{}（已撤销）🔑", &KEY[3..]);
        assert_eq!(redact(&text, Some(KEY)), "密钥无效：[redacted]（已撤销）🔑");
        let text = format!("Schlüssel «{}» ungültig", KEY.to_uppercase());
        assert_eq!(redact(&text, Some(KEY)), "Schlüssel «[redacted]» ungültig");
    }

    #[test]
    fn overlapping_and_repeated_traces_all_go() {
        // "sk-proj-" and "-proj-Ab12" overlap in the text on its second "-"; then the
        // whole key twice in a row.
        let text = format!("sk-proj-proj-Ab12 and {KEY}{KEY}");
        let redacted = redact(&text, Some(KEY));
        assert_eq!(redacted, "[redacted] and [redacted][redacted]");
    }

    #[test]
    fn a_short_key_is_redacted_only_whole() {
        assert_eq!(
            redact("Key OLLAMA1 or ollama?", Some("ollama1")),
            "Key [redacted] or ollama?"
        );
        // Too short to be a secret worth hiding.
        assert_eq!(redact("abc", Some("abc")), "abc");
    }

    #[test]
    fn a_long_text_is_scanned_once_per_key_character() {
        let mut text = "lorem ipsum ".repeat(20_000);
        text.push_str(&KEY.to_uppercase());
        let started = std::time::Instant::now();
        let redacted = redact(&text, Some(KEY));
        assert!(redacted.ends_with("ipsum [redacted]"));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn retry_after_reads_seconds_and_is_capped() {
        let mut headers = http::HeaderMap::new();
        headers.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert("retry-after", "3600".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(60)));
        headers.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn retryable_errors_are_the_transient_ones() {
        let http = |status| LlmError::Http {
            status,
            message: String::new(),
            retry_after: None,
        };
        assert!(http(429).is_retryable());
        assert!(http(503).is_retryable());
        assert!(!http(400).is_retryable());
        assert!(!http(401).is_retryable());
        assert!(LlmError::Network("refused".into()).is_retryable());
        assert!(!LlmError::BadResponse("?".into()).is_retryable());
    }
}
