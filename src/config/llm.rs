//! The model side of the config: `providers:`, `llm:` and each agent's `memory:`, `tools:`
//! and queue settings.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

/// Wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderApi {
    /// OpenAI Chat Completions (`POST {base_url}/chat/completions`, SSE); DashScope,
    /// DeepSeek, SiliconFlow, Moonshot, Zhipu, vLLM, llama.cpp all speak it.
    OpenaiCompletions,
    /// Anthropic Messages (`POST {base_url}/v1/messages`, SSE named events).
    AnthropicMessages,
    /// Ollama's native chat (`POST {base_url}/api/chat`, NDJSON).
    Ollama,
    /// Built-in diagnostic provider that answers with what it was sent; no network.
    Echo,
}

impl ProviderApi {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderApi::OpenaiCompletions => "openai-completions",
            ProviderApi::AnthropicMessages => "anthropic-messages",
            ProviderApi::Ollama => "ollama",
            ProviderApi::Echo => "echo",
        }
    }
}

/// `providers.<name>:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Wire format: `openai-completions`, `anthropic-messages`, `ollama` or `echo`.
    pub api: ProviderApi,
    /// Base URL. OpenAI-compatible: up to and including the version segment
    /// (`https://api.openai.com/v1`); Anthropic: `https://api.anthropic.com`; Ollama:
    /// `http://127.0.0.1:11434`.
    #[serde(default)]
    pub base_url: Option<Url>,
    /// Name of the environment variable holding the API key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Extra HTTP headers sent with every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// How long to wait for the response to start, and for each next chunk of a stream
    /// (default `60s`).
    #[serde(default = "default_provider_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// At most this many requests to this provider at once (default: no cap beyond
    /// `llm.max_concurrency`).
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    /// A local model that may still be starting: until it answers once, a refused
    /// connection gets a "warming up" notice at once instead of retries.
    #[serde(default)]
    pub warmup: bool,
    /// The models this provider serves, with what they accept.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
}

impl ProviderConfig {
    /// The entry for `id`, or the defaults for a model not listed. The built-in `echo`
    /// takes anything, images included.
    pub fn model(&self, id: &str) -> ModelConfig {
        let mut model = self
            .models
            .iter()
            .find(|m| m.id == id)
            .cloned()
            .unwrap_or_else(|| ModelConfig::unlisted(id));
        if self.api == ProviderApi::Echo {
            model.input = vec![InputKind::Text, InputKind::Image];
        }
        model
    }
}

/// What a model accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    Text,
    Image,
}

/// `providers.<name>.models[]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The model name sent to the provider.
    pub id: String,
    /// `[text]` (default) or `[text, image]`.
    #[serde(default = "default_input")]
    pub input: Vec<InputKind>,
    /// Tokens the model can read and write in one call (default 8192).
    #[serde(default = "default_context_window")]
    pub context_window: u32,
    /// Most tokens one answer may have (default 1024); Anthropic requires it.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
}

impl ModelConfig {
    /// Defaults for a model the provider entry does not list.
    pub fn unlisted(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            input: default_input(),
            context_window: default_context_window(),
            max_tokens: default_max_tokens(),
        }
    }

    /// Whether images can be sent to it.
    pub fn accepts_images(&self) -> bool {
        self.input.contains(&InputKind::Image)
    }
}

/// `llm:`, limits shared by every provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// At most this many model requests at once, over all providers (default 64).
    #[serde(default = "default_global_concurrency")]
    pub max_concurrency: usize,
    /// Retries of one model on 429, 5xx or a network error, waiting 1 s, 2 s, 4 s … or
    /// what `Retry-After` says, capped at 60 s (default 3).
    #[serde(default = "default_retries")]
    pub retries: u32,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            max_concurrency: default_global_concurrency(),
            retries: default_retries(),
        }
    }
}

/// What happens to messages that reach a busy session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueMode {
    /// Each is answered in turn, in order (default).
    #[default]
    Queue,
    /// Everything that arrived during a run becomes one next turn.
    Collect,
}

/// `agents[].memory:`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Messages kept per session (default 40).
    #[serde(default = "default_memory_messages")]
    pub max_messages: usize,
    /// Approximate tokens of history sent with each turn (default 4000; never more than
    /// the model's context window leaves after its answer).
    #[serde(default = "default_memory_tokens")]
    pub max_tokens: usize,
    /// Characters of one message sent to the model (default 16000; fewer when the
    /// model's context window holds fewer). A longer message keeps its beginning and its
    /// end, with a note of how much was cut between them.
    #[serde(default = "default_max_message_chars")]
    pub max_message_chars: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_messages: default_memory_messages(),
            max_tokens: default_memory_tokens(),
            max_message_chars: default_max_message_chars(),
        }
    }
}

/// `agents[].tools:`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolsConfig {
    /// Tools the agent may call; `*` globs allowed (default `["*"]`: every built-in tool).
    #[serde(default = "default_tools_allow")]
    pub allow: Vec<String>,
    /// Tools the agent may not call; wins over `allow`.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Model calls in one turn before the agent must answer (default 5).
    #[serde(default = "default_tool_iterations")]
    pub max_iterations: u32,
}

impl Default for ToolsConfig {
    fn default() -> Self {
        Self {
            allow: default_tools_allow(),
            deny: Vec::new(),
            max_iterations: default_tool_iterations(),
        }
    }
}

/// `provider/model`, as in `fallbacks` and `image_model`. The provider name is everything
/// before the first `/`, so model ids may contain `/` (`Qwen/Qwen2.5-7B-Instruct`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelRef {
    pub provider: String,
    pub model: String,
}

impl ModelRef {
    /// Parses `provider/model`.
    pub fn parse(text: &str) -> Option<Self> {
        let (provider, model) = text.split_once('/')?;
        (!provider.is_empty() && !model.is_empty()).then(|| Self {
            provider: provider.to_owned(),
            model: model.to_owned(),
        })
    }
}

impl std::fmt::Display for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.provider, self.model)
    }
}

/// Every built-in tool, by the name models call it.
pub const BUILTIN_TOOLS: &[&str] = &["current_time", "fetch_url", "search_room_history"];

fn default_provider_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_input() -> Vec<InputKind> {
    vec![InputKind::Text]
}
fn default_context_window() -> u32 {
    8192
}
fn default_max_tokens() -> u32 {
    1024
}
fn default_global_concurrency() -> usize {
    64
}
fn default_retries() -> u32 {
    3
}
fn default_memory_messages() -> usize {
    40
}
/// The fewest characters `memory.max_message_chars` may be: a cut message keeps its
/// beginning and end around a note of about 40 characters.
pub const MIN_MESSAGE_CHARS: usize = 200;
fn default_max_message_chars() -> usize {
    16_000
}
fn default_memory_tokens() -> usize {
    4000
}
fn default_tools_allow() -> Vec<String> {
    vec!["*".to_owned()]
}
fn default_tool_iterations() -> u32 {
    5
}

/// Reports problems in `providers.<name>`.
pub(super) fn validate_provider(
    name: &str,
    provider: &ProviderConfig,
    problem: &mut impl FnMut(String, String),
) {
    let at = format!("providers.{name}");
    if name.contains('/') {
        problem(
            at.clone(),
            "provider names may not contain '/' (it separates provider and model)".into(),
        );
    }
    match (&provider.base_url, provider.api) {
        (None, ProviderApi::OpenaiCompletions) => problem(
            format!("{at}.base_url"),
            "is required for api: openai-completions".into(),
        ),
        (Some(url), api)
            if api != ProviderApi::Echo && url.scheme() != "http" && url.scheme() != "https" =>
        {
            problem(
                format!("{at}.base_url"),
                "must be an http:// or https:// URL".into(),
            );
        }
        _ => {}
    }
    if provider.max_concurrency == Some(0) {
        problem(format!("{at}.max_concurrency"), "must be at least 1".into());
    }
    if provider.timeout.is_zero() {
        problem(format!("{at}.timeout"), "must be longer than 0s".into());
    }
    let mut seen = std::collections::HashSet::new();
    for (i, model) in provider.models.iter().enumerate() {
        let at = format!("{at}.models[{i}]");
        if model.id.trim().is_empty() {
            problem(format!("{at}.id"), "must not be empty".into());
        } else if !seen.insert(model.id.as_str()) {
            problem(
                format!("{at}.id"),
                format!("duplicate model id {:?}", model.id),
            );
        }
        if !model.input.contains(&InputKind::Text) {
            problem(format!("{at}.input"), "must include text".into());
        }
        if model.max_tokens == 0 {
            problem(format!("{at}.max_tokens"), "must be at least 1".into());
        }
        if model.context_window <= model.max_tokens {
            problem(
                format!("{at}.context_window"),
                format!(
                    "{} leaves no room for the prompt next to max_tokens {}",
                    model.context_window, model.max_tokens
                ),
            );
        }
    }
}

/// Reports problems in an agent's model, fallbacks, image model, queue, memory and tools.
pub(super) fn validate_agent(
    at: &str,
    agent: &super::AgentConfig,
    providers: &BTreeMap<String, ProviderConfig>,
    problem: &mut impl FnMut(String, String),
) {
    let mut check_ref = |key: String, text: &str| match ModelRef::parse(text) {
        None => problem(
            key,
            format!("{text:?} must be written provider/model, e.g. \"openai/gpt-4o-mini\""),
        ),
        Some(r) if !providers.contains_key(&r.provider) => problem(
            key,
            format!("unknown provider {:?} in {text:?}", r.provider),
        ),
        Some(_) => {}
    };
    for (j, fallback) in agent.fallbacks.iter().enumerate() {
        check_ref(format!("{at}.fallbacks[{j}]"), fallback);
    }
    if let Some(image_model) = &agent.image_model {
        check_ref(format!("{at}.image_model"), image_model);
        if let Some(r) = ModelRef::parse(image_model)
            && let Some(p) = providers.get(&r.provider)
            && !p.model(&r.model).accepts_images()
        {
            problem(
                format!("{at}.image_model"),
                format!(
                    "{image_model:?} does not read images; list it under providers.{}.models with input: [text, image]",
                    r.provider
                ),
            );
        }
    }
    if agent.queue_limit == 0 {
        problem(format!("{at}.queue_limit"), "must be at least 1".into());
    }
    if agent.memory.max_messages == 0 {
        problem(
            format!("{at}.memory.max_messages"),
            "must be at least 1".into(),
        );
    }
    if agent.memory.max_tokens == 0 {
        problem(
            format!("{at}.memory.max_tokens"),
            "must be at least 1".into(),
        );
    }
    if agent.memory.max_message_chars < MIN_MESSAGE_CHARS {
        problem(
            format!("{at}.memory.max_message_chars"),
            format!(
                "{} is too few to keep the start and end of a long message; use at least {MIN_MESSAGE_CHARS}",
                agent.memory.max_message_chars
            ),
        );
    }
    if agent.tools.max_iterations == 0 {
        problem(
            format!("{at}.tools.max_iterations"),
            "must be at least 1".into(),
        );
    }
    for (key, names) in [("allow", &agent.tools.allow), ("deny", &agent.tools.deny)] {
        for (j, name) in names.iter().enumerate() {
            let pattern = wildmatch::WildMatch::new(name);
            if !BUILTIN_TOOLS.iter().any(|t| pattern.matches(t)) {
                problem(
                    format!("{at}.tools.{key}[{j}]"),
                    format!(
                        "{name:?} matches no tool; the tools are {}",
                        BUILTIN_TOOLS.join(", ")
                    ),
                );
            }
        }
    }
}
