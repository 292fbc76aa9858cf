//! `POST {base_url}/v1/messages` with `stream: true`: Anthropic Messages.
//!
//! Request: <https://docs.anthropic.com/en/api/messages>. Streamed answer: named
//! Server-Sent Events `message_start`, then per content block `content_block_start`,
//! `content_block_delta`s (`text_delta`, `input_json_delta`) and `content_block_stop`, then
//! `message_delta` (stop reason, output tokens) and `message_stop`; `ping`s anywhere, an
//! `error` event when the stream fails after the 200, and new event types to be ignored
//! (<https://docs.anthropic.com/en/docs/build-with-claude/streaming#event-types>).

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{Value, json};

use super::sse::SseParser;
use super::transport::{Decoder, HttpProvider, WireFormat};
use super::{ChatMessage, CompletionRequest, Delta, FinishReason, LlmError, Role, Usage};

/// The API version this wire format is written against.
const API_VERSION: &str = "2023-06-01";

/// A provider speaking the Anthropic Messages wire format; `api_key` is sent as
/// `x-api-key` when present.
pub type AnthropicProvider = HttpProvider<Messages>;

/// The Anthropic Messages wire format.
pub struct Messages;

impl WireFormat for Messages {
    const DEFAULT_BASE_URL: &'static str = "https://api.anthropic.com";
    const PATH: &'static str = "/v1/messages";
    type Decoder = EventDecoder;

    fn headers(api_key: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(API_VERSION),
        );
        if let Some(key) = api_key
            && let Ok(mut value) = HeaderValue::from_str(key)
        {
            value.set_sensitive(true);
            headers.insert(HeaderName::from_static("x-api-key"), value);
        }
        headers
    }

    fn request_body(request: &CompletionRequest) -> Value {
        request_body(request)
    }

    fn decoder(secret: Option<String>) -> EventDecoder {
        EventDecoder {
            secret,
            ..EventDecoder::default()
        }
    }
}

/// The JSON body of a streamed Messages request.
fn request_body(request: &CompletionRequest) -> Value {
    let mut body = json!({
        "model": request.model,
        "max_tokens": request.max_tokens,
        "messages": messages(&request.messages),
        "stream": true,
    });
    // Anthropic has no system role inside the conversation, only this top-level field.
    let mut system: Vec<String> = request
        .messages
        .iter()
        .filter(|m| m.role == Role::System && !m.content.is_empty())
        .map(|m| m.content.clone())
        .collect();
    // The Messages API has no JSON mode: a structured answer is asked for in words.
    if let Some(schema) = &request.schema {
        system.push(schema.instruction());
    }
    if !system.is_empty() {
        body["system"] = json!(system.join("\n\n"));
    }
    if !request.tools.is_empty() {
        body["tools"] = request
            .tools
            .iter()
            .map(|tool| {
                json!({
                    "name": tool.name,
                    "description": tool.description,
                    "input_schema": tool.parameters,
                })
            })
            .collect();
    }
    body
}

/// The conversation as alternating user/assistant turns of content blocks. Tool results
/// are user turns; neighbours with the same role merge, since Anthropic refuses two user
/// (or two assistant) turns in a row.
fn messages(messages: &[ChatMessage]) -> Vec<Value> {
    let mut turns: Vec<(&str, Vec<Value>)> = Vec::new();
    for message in messages {
        let (role, blocks) = match message.role {
            Role::System => continue,
            Role::User => ("user", user_blocks(message)),
            Role::Assistant => ("assistant", assistant_blocks(message)),
            Role::Tool => (
                "user",
                vec![json!({
                    "type": "tool_result",
                    "tool_use_id": message.tool_call_id.as_deref().unwrap_or_default(),
                    "content": message.content,
                })],
            ),
        };
        // An empty turn is refused; it says nothing anyway.
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    turns
        .into_iter()
        .map(|(role, mut blocks)| {
            // Tool results must open their user turn, before any text merged into it.
            blocks.sort_by_key(|b| b["type"] != "tool_result");
            json!({"role": role, "content": blocks})
        })
        .collect()
}

fn user_blocks(message: &ChatMessage) -> Vec<Value> {
    // Images first: Anthropic's vision guide finds answers better with the image before
    // the question.
    let images = message.images.iter().map(|image| {
        json!({
            "type": "image",
            "source": {"type": "base64", "media_type": image.mime, "data": image.base64},
        })
    });
    images.chain(text_block(&message.content)).collect()
}

fn assistant_blocks(message: &ChatMessage) -> Vec<Value> {
    let calls = message.tool_calls.iter().map(|call| {
        json!({
            "type": "tool_use",
            "id": call.id,
            "name": call.name,
            "input": tool_input(&call.arguments),
        })
    });
    text_block(&message.content)
        .into_iter()
        .chain(calls)
        .collect()
}

/// A text block, unless the text is empty (Anthropic refuses empty text blocks).
fn text_block(text: &str) -> Option<Value> {
    (!text.trim().is_empty()).then(|| json!({"type": "text", "text": text}))
}

/// `input` must be a JSON object. Arguments that are not one are passed on as written, so
/// the model sees its own mistake next to the tool's complaint rather than a silent `{}`.
fn tool_input(arguments: &str) -> Value {
    if arguments.trim().is_empty() {
        return json!({});
    }
    match serde_json::from_str::<Value>(arguments) {
        Ok(value @ Value::Object(_)) => value,
        _ => json!({"raw_arguments": arguments}),
    }
}

/// One streamed event, by its `type` (which repeats the SSE event name).
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    MessageStart {
        message: StartedMessage,
    },
    ContentBlockStart {
        index: usize,
        content_block: Block,
    },
    ContentBlockDelta {
        index: usize,
        delta: BlockDelta,
    },
    ContentBlockStop {
        index: usize,
    },
    MessageDelta {
        delta: MessageChange,
        usage: Option<StreamUsage>,
    },
    MessageStop,
    Error {
        error: StreamError,
    },
    /// `ping` and event types added after this was written.
    #[serde(other)]
    Ignored,
}

#[derive(Deserialize)]
struct StartedMessage {
    usage: Option<StreamUsage>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    ToolUse {
        id: String,
        name: String,
    },
    /// Text (its text comes in deltas), thinking, server tools …
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    /// Thinking, signatures, citations.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct MessageChange {
    stop_reason: Option<String>,
}

/// Token counts; `message_delta` counts are cumulative.
#[derive(Deserialize)]
struct StreamUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct StreamError {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: String,
}

/// Reads the event stream. Usage and the stop reason from `message_delta` are held until
/// `message_stop` so that `Finish` comes last.
#[derive(Default)]
pub struct EventDecoder {
    sse: SseParser,
    usage: Usage,
    finish: Option<FinishReason>,
    /// Open `tool_use` blocks by index, and whether any input arrived for them yet.
    tool_blocks: BTreeMap<usize, bool>,
    secret: Option<String>,
}

/// Event names this decoder reads; any other named event is skipped unparsed.
const KNOWN_EVENTS: &[&str] = &[
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "error",
    // No `event:` line: the `type` inside the data decides.
    "message",
];

impl Decoder for EventDecoder {
    fn line(&mut self, line: &str, out: &mut Vec<Delta>) -> Result<bool, LlmError> {
        match self.sse.line(line) {
            Some(event) if KNOWN_EVENTS.contains(&event.name.as_str()) => {
                self.decode_event(&event.data, out)
            }
            _ => Ok(false),
        }
    }

    fn end(&mut self, out: &mut Vec<Delta>) -> Result<bool, LlmError> {
        if let Some(event) = self.sse.finish()
            && KNOWN_EVENTS.contains(&event.name.as_str())
            && self.decode_event(&event.data, out)?
        {
            return Ok(true);
        }
        // The stop reason came, only `message_stop` is missing: the answer is whole.
        Ok(match self.finish.take() {
            Some(reason) => {
                out.push(Delta::Finish(reason));
                true
            }
            None => false,
        })
    }
}

impl EventDecoder {
    fn decode_event(&mut self, data: &str, out: &mut Vec<Delta>) -> Result<bool, LlmError> {
        let event: Event = serde_json::from_str(data).map_err(|e| {
            LlmError::BadResponse(format!("a stream event is not the JSON we expect ({e})"))
        })?;
        match event {
            Event::MessageStart { message } => {
                if let Some(usage) = message.usage {
                    self.count(&usage);
                }
            }
            Event::ContentBlockStart {
                index,
                content_block: Block::ToolUse { id, name },
            } => {
                self.tool_blocks.insert(index, false);
                out.push(Delta::ToolCall {
                    index,
                    id: Some(id),
                    name: Some(name),
                    arguments: String::new(),
                });
            }
            Event::ContentBlockStart { .. } => {}
            Event::ContentBlockDelta { index, delta } => match delta {
                BlockDelta::TextDelta { text } if !text.is_empty() => out.push(Delta::Text(text)),
                BlockDelta::InputJsonDelta { partial_json } if !partial_json.is_empty() => {
                    self.tool_blocks.insert(index, true);
                    out.push(Delta::ToolCall {
                        index,
                        id: None,
                        name: None,
                        arguments: partial_json,
                    });
                }
                _ => {}
            },
            Event::ContentBlockStop { index } => {
                // A tool without parameters streams no input at all; its arguments are `{}`.
                if self.tool_blocks.remove(&index) == Some(false) {
                    out.push(Delta::ToolCall {
                        index,
                        id: None,
                        name: None,
                        arguments: "{}".into(),
                    });
                }
            }
            Event::MessageDelta { delta, usage } => {
                if let Some(usage) = usage {
                    self.count(&usage);
                    out.push(Delta::Usage(self.usage));
                }
                if let Some(reason) = delta.stop_reason {
                    self.finish = Some(stop_reason(&reason));
                }
            }
            Event::MessageStop => {
                out.push(Delta::Finish(
                    self.finish.take().unwrap_or(FinishReason::Other),
                ));
                return Ok(true);
            }
            Event::Error { error } => return Err(self.stream_error(error)),
            Event::Ignored => {}
        }
        Ok(false)
    }

    /// Input tokens include the cached ones: they were all read by the model.
    fn count(&mut self, usage: &StreamUsage) {
        let input = [
            usage.input_tokens,
            usage.cache_creation_input_tokens,
            usage.cache_read_input_tokens,
        ];
        if input.iter().any(Option::is_some) {
            self.usage.input_tokens = input.iter().flatten().sum();
        }
        if let Some(output) = usage.output_tokens {
            self.usage.output_tokens = output;
        }
    }

    /// An `error` event, as the HTTP error it would have been before the 200: overloaded
    /// is 529 and rate limits 429, so both are retried; anything else counts as a 500.
    fn stream_error(&self, error: StreamError) -> LlmError {
        let status = match error.kind.as_str() {
            "overloaded_error" => 529,
            "rate_limit_error" => 429,
            _ => 500,
        };
        let message = if error.message.is_empty() {
            error.kind
        } else {
            format!("{} ({})", error.message, error.kind)
        };
        LlmError::Http {
            status,
            message: super::redact(&message, self.secret.as_deref()),
            retry_after: None,
        }
    }
}

fn stop_reason(reason: &str) -> FinishReason {
    match reason {
        "end_turn" | "stop_sequence" => FinishReason::Stop,
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        "refusal" => FinishReason::ContentFilter,
        _ => FinishReason::Other,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;

    use super::*;
    use crate::config::ProviderApi;
    use crate::llm::transport::stub::{self, Script, Stub};
    use crate::llm::{Completion, Image, Provider, ToolCall, collect};

    const KEY: &str = "sk-ant-test-0123456789";
    const SSE: &str = "text/event-stream";

    fn provider(stub: &Stub, timeout: Duration) -> AnthropicProvider {
        let config = stub::config(ProviderApi::AnthropicMessages, stub, timeout);
        AnthropicProvider::new(&config, Some(KEY.into()))
    }

    /// One SSE event named after its `type`.
    fn event(data: Value) -> String {
        format!(
            "event: {}\ndata: {data}\n\n",
            data["type"].as_str().unwrap()
        )
    }

    fn start(input_tokens: u64) -> String {
        event(json!({"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "content": [],
            "model": "claude-x", "stop_reason": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        }}))
    }

    fn text(index: usize, text: &str) -> String {
        event(
            json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}),
        )
    }

    fn finish(reason: &str, output_tokens: u64) -> String {
        event(
            json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": null}, "usage": {"output_tokens": output_tokens}}),
        )
    }

    fn stop() -> String {
        event(json!({"type": "message_stop"}))
    }

    async fn complete(chunks: &[String]) -> Result<Completion, LlmError> {
        let chunks: Vec<&[u8]> = chunks.iter().map(|c| c.as_bytes()).collect();
        let stub = stub::serve(Script::ok(SSE, &chunks)).await;
        let stream = provider(&stub, Duration::from_secs(5))
            .stream(stub::ask("hi"))
            .await?;
        collect(stream).await
    }

    fn text_answer() -> Vec<String> {
        vec![
            start(25),
            event(
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            "event: ping\ndata: {\"type\": \"ping\"}\n\n".into(),
            text(0, "こんにちは"),
            "event: brand_new_event\ndata: not even json\n\n".into(),
            text(0, ", world"),
            event(json!({"type": "content_block_stop", "index": 0})),
            finish("end_turn", 9),
            stop(),
        ]
    }

    #[test]
    fn a_structured_request_asks_for_the_json_in_the_system_prompt() {
        let request = stub::ask_structured("ok?");
        let body = request_body(&request);
        let instruction = request.schema.as_ref().unwrap().instruction();
        assert!(instruction.contains(&stub::verdict_schema().to_string()));
        assert_eq!(body["system"], json!(format!("be brief\n\n{instruction}")));
        // No field the Messages API would refuse.
        for key in ["response_format", "format", "output_format"] {
            assert!(body.get(key).is_none(), "{key}");
        }
        let plain = request_body(&stub::ask("hi"));
        assert!(plain.get("system").is_none());
    }

    #[tokio::test]
    async fn a_text_stream_with_pings_and_unknown_events_gives_text_usage_and_finish() {
        // The chunk with the CJK text goes out in two pieces, cut inside a character.
        let mut raw: Vec<Vec<u8>> = Vec::new();
        for (i, chunk) in text_answer().into_iter().enumerate() {
            if i == 3 {
                raw.extend(stub::split_mid_char(&chunk));
            } else {
                raw.push(chunk.into_bytes());
            }
        }
        let raw: Vec<&[u8]> = raw.iter().map(Vec::as_slice).collect();
        let stub = stub::serve(Script::ok(SSE, &raw)).await;
        let stream = provider(&stub, Duration::from_secs(5))
            .stream(stub::ask("hi"))
            .await
            .unwrap();
        assert_eq!(
            collect(stream).await.unwrap(),
            Completion {
                text: "こんにちは, world".into(),
                tool_calls: Vec::new(),
                usage: Some(Usage {
                    input_tokens: 25,
                    output_tokens: 9
                }),
                finish: Some(FinishReason::Stop),
            }
        );
    }

    #[tokio::test]
    async fn every_chunk_boundary_gives_the_same_answer() {
        let body = text_answer().concat();
        let completion = stub::collect_split_everywhere(body.as_bytes(), EventDecoder::default)
            .await
            .unwrap();
        assert_eq!(completion.text, "こんにちは, world");
        assert_eq!(completion.finish, Some(FinishReason::Stop));
    }

    #[tokio::test]
    async fn tool_input_pieces_merge_into_one_call_per_block() {
        let json_piece = |index: usize, piece: &str| {
            event(
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": piece}}),
            )
        };
        let completion = complete(&[
            start(40),
            event(
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            text(0, "Let me look."),
            event(json!({"type": "content_block_stop", "index": 0})),
            event(
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_a", "name": "fetch_url", "input": {}}}),
            ),
            json_piece(1, ""),
            json_piece(1, "{\"url\": \"https://exa"),
            json_piece(1, "mple.org\"}"),
            event(json!({"type": "content_block_stop", "index": 1})),
            event(
                json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_b", "name": "current_time", "input": {}}}),
            ),
            event(json!({"type": "content_block_stop", "index": 2})),
            finish("tool_use", 30),
            stop(),
        ])
        .await
        .unwrap();
        assert_eq!(completion.text, "Let me look.");
        assert_eq!(
            completion.tool_calls,
            vec![
                ToolCall {
                    id: "toolu_a".into(),
                    name: "fetch_url".into(),
                    arguments: "{\"url\": \"https://example.org\"}".into(),
                },
                ToolCall {
                    id: "toolu_b".into(),
                    name: "current_time".into(),
                    arguments: "{}".into(),
                },
            ]
        );
        assert_eq!(completion.finish, Some(FinishReason::ToolCalls));
    }

    #[tokio::test]
    async fn the_request_carries_key_version_system_tools_images_and_merged_tool_results() {
        let stub = stub::serve(Script::ok(SSE, &[stop().as_bytes()])).await;
        let first = ToolCall {
            id: "toolu_1".into(),
            name: "current_time".into(),
            arguments: "{\"tz\":\"UTC\"}".into(),
        };
        let second = ToolCall {
            id: "toolu_2".into(),
            name: "current_time".into(),
            arguments: String::new(),
        };
        let request = CompletionRequest {
            model: "claude-x".into(),
            messages: vec![
                ChatMessage::new(Role::System, "be brief"),
                ChatMessage::new(Role::User, "what is this?").with_images(vec![Image {
                    mime: "image/jpeg".into(),
                    base64: "/9j/4AAQ".into(),
                }]),
                ChatMessage::new(Role::User, "and the time?"),
                ChatMessage::tool_request("Checking.", vec![first.clone(), second.clone()]),
                ChatMessage::tool_result(&first, "12:00"),
                ChatMessage::tool_result(&second, "13:00"),
                ChatMessage::new(Role::Assistant, "It is noon."),
            ],
            tools: vec![stub::clock_tool()],
            max_tokens: 300,
            schema: None,
        };
        let stream = provider(&stub, Duration::from_secs(5))
            .stream(request)
            .await
            .unwrap();
        collect(stream).await.unwrap();
        let received = stub.request();
        assert_eq!(received.path, "/v1/messages");
        assert_eq!(received.headers["x-api-key"], KEY);
        assert_eq!(received.headers["anthropic-version"], "2023-06-01");
        assert_eq!(received.headers["content-type"], "application/json");
        assert_eq!(received.headers["x-team"], "blue");
        assert!(received.headers.get("authorization").is_none());
        assert_eq!(
            received.body,
            json!({
                "model": "claude-x",
                "max_tokens": 300,
                "stream": true,
                "system": "be brief",
                "messages": [
                    {"role": "user", "content": [
                        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
                        {"type": "text", "text": "what is this?"},
                        {"type": "text", "text": "and the time?"},
                    ]},
                    {"role": "assistant", "content": [
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "toolu_1", "name": "current_time", "input": {"tz": "UTC"}},
                        {"type": "tool_use", "id": "toolu_2", "name": "current_time", "input": {}},
                    ]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "12:00"},
                        {"type": "tool_result", "tool_use_id": "toolu_2", "content": "13:00"},
                    ]},
                    {"role": "assistant", "content": [{"type": "text", "text": "It is noon."}]},
                ],
                "tools": [{
                    "name": "current_time",
                    "description": "The time now",
                    "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}},
                }],
            })
        );
    }

    #[test]
    fn tool_results_open_a_user_turn_that_also_carries_text() {
        let call = ToolCall {
            id: "toolu_1".into(),
            name: "current_time".into(),
            arguments: "not json".into(),
        };
        let turns = messages(&[
            ChatMessage::new(Role::User, "time?"),
            ChatMessage::tool_request("", vec![call.clone()]),
            ChatMessage::new(Role::User, "hurry"),
            ChatMessage::tool_result(&call, "noon"),
        ]);
        assert_eq!(
            turns,
            vec![
                json!({"role": "user", "content": [{"type": "text", "text": "time?"}]}),
                json!({"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "current_time", "input": {"raw_arguments": "not json"}},
                ]}),
                json!({"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "noon"},
                    {"type": "text", "text": "hurry"},
                ]}),
            ]
        );
    }

    #[tokio::test]
    async fn a_429_carries_retry_after() {
        let stub = stub::serve(Script::refuse(
            429,
            vec![("retry-after", "7")],
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of requests has exceeded your rate limit"}}"#,
        ))
        .await;
        let error = provider(&stub, Duration::from_secs(5))
            .stream(stub::ask("hi"))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&error, LlmError::Http { status: 429, message, retry_after: Some(wait) }
                if message == "Number of requests has exceeded your rate limit" && *wait == Duration::from_secs(7)),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_500_carries_the_message_with_the_key_redacted() {
        let body = format!(
            r#"{{"type":"error","error":{{"type":"api_error","message":"key {KEY} broke us"}}}}"#
        );
        let stub = stub::serve(Script::refuse(500, Vec::new(), &body)).await;
        let error = provider(&stub, Duration::from_secs(5))
            .stream(stub::ask("hi"))
            .await
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            "the model provider returned HTTP 500: key [redacted] broke us"
        );
    }

    #[tokio::test]
    async fn an_overloaded_error_event_is_a_retryable_529() {
        let error = complete(&[
            start(3),
            text(0, "Hal"),
            event(
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            ),
        ])
        .await
        .unwrap_err();
        assert!(
            matches!(&error, LlmError::Http { status: 529, message, retry_after: None } if message == "Overloaded (overloaded_error)"),
            "{error:?}"
        );
        assert!(error.is_retryable());
    }

    #[tokio::test]
    async fn other_error_events_are_500s_without_the_key() {
        let error = complete(&[event(
            json!({"type": "error", "error": {"type": "api_error", "message": format!("boom {KEY}")}}),
        )])
        .await
        .unwrap_err();
        assert!(
            matches!(&error, LlmError::Http { status: 500, message, .. } if message == "boom [redacted] (api_error)"),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_stream_that_goes_silent_stalls_after_the_first_text() {
        let mut script = Script::ok(SSE, &[start(1).as_bytes(), text(0, "Hel").as_bytes()]);
        script
            .chunks
            .push((Duration::from_secs(5), text(0, "lo").into_bytes()));
        let stub = stub::serve(script).await;
        let timeout = Duration::from_millis(500);
        let mut stream = provider(&stub, timeout)
            .stream(stub::ask("hi"))
            .await
            .unwrap();
        assert_eq!(
            stream.next().await.unwrap().unwrap(),
            Delta::Text("Hel".into())
        );
        assert!(matches!(stream.next().await, Some(Err(LlmError::Stalled(t))) if t == timeout));
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn malformed_event_json_is_a_bad_response() {
        let error = complete(&[
            start(1),
            "event: content_block_delta\ndata: {\"type\": \"content_block_delta\", \"index\": \n\n"
                .into(),
        ])
        .await
        .unwrap_err();
        assert!(
            matches!(&error, LlmError::BadResponse(m) if m.starts_with("a stream event is not the JSON")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_stream_without_stop_reason_or_message_stop_ended_early() {
        let error = complete(&[start(1), text(0, "half")]).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "the model provider sent an answer we could not read: the stream ended early"
        );
    }

    #[tokio::test]
    async fn a_stop_reason_without_message_stop_is_still_complete() {
        let completion = complete(&[start(1), text(0, "long"), finish("max_tokens", 4)])
            .await
            .unwrap();
        assert_eq!(completion.text, "long");
        assert_eq!(completion.finish, Some(FinishReason::Length));
        assert_eq!(
            completion.usage,
            Some(Usage {
                input_tokens: 1,
                output_tokens: 4
            })
        );
    }
}
