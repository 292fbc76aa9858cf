//! `POST {base_url}/chat/completions` with `stream: true`: OpenAI Chat Completions and the
//! many servers that copy it (DashScope, DeepSeek, vLLM, llama.cpp …).
//!
//! Request: <https://platform.openai.com/docs/api-reference/chat/create>. Streamed answer:
//! Server-Sent Events whose `data:` is a `chat.completion.chunk`
//! (<https://platform.openai.com/docs/api-reference/chat-streaming/streaming>), then
//! `data: [DONE]`. With `stream_options.include_usage` the last chunk before `[DONE]` has
//! `choices: []` and the `usage`.

use serde::Deserialize;
use serde_json::{Value, json};

use super::sse::SseParser;
use super::transport::{Decoder, HttpProvider, WireFormat};
use super::{ChatMessage, CompletionRequest, Delta, FinishReason, LlmError, Role, Usage};

/// A provider speaking the Chat Completions wire format; `api_key` is sent as a bearer
/// token when present.
pub type OpenAiProvider = HttpProvider<ChatCompletions>;

/// The Chat Completions wire format.
pub struct ChatCompletions;

impl WireFormat for ChatCompletions {
    const DEFAULT_BASE_URL: &'static str = "https://api.openai.com/v1";
    const PATH: &'static str = "/chat/completions";
    type Decoder = ChunkDecoder;

    fn request_body(request: &CompletionRequest) -> Value {
        request_body(request)
    }

    fn decoder(secret: Option<String>) -> ChunkDecoder {
        ChunkDecoder {
            secret,
            ..ChunkDecoder::default()
        }
    }
}

/// The JSON body of a streamed Chat Completions request.
fn request_body(request: &CompletionRequest) -> Value {
    let mut body = json!({
        "model": request.model,
        "messages": request.messages.iter().map(message).collect::<Vec<_>>(),
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": request.max_tokens,
    });
    if let Some(schema) = &request.schema {
        body["response_format"] = json!({
            "type": "json_schema",
            "json_schema": {"name": schema.name, "schema": schema.schema, "strict": true},
        });
    }
    if !request.tools.is_empty() {
        body["tools"] = request
            .tools
            .iter()
            .map(|tool| {
                json!({
                    "type": "function",
                    "function": {
                        "name": tool.name,
                        "description": tool.description,
                        "parameters": tool.parameters,
                    },
                })
            })
            .collect();
    }
    body
}

fn message(message: &ChatMessage) -> Value {
    match message.role {
        Role::System => json!({"role": "system", "content": message.content}),
        Role::User if message.images.is_empty() => {
            json!({"role": "user", "content": message.content})
        }
        Role::User => {
            let text = (!message.content.is_empty())
                .then(|| json!({"type": "text", "text": message.content}));
            let images = message.images.iter().map(|image| {
                json!({
                    "type": "image_url",
                    "image_url": {"url": format!("data:{};base64,{}", image.mime, image.base64)},
                })
            });
            json!({"role": "user", "content": text.into_iter().chain(images).collect::<Vec<_>>()})
        }
        Role::Assistant => {
            let mut value = json!({"role": "assistant", "content": message.content});
            if !message.tool_calls.is_empty() {
                // A turn that only calls tools has no text; `null` is what OpenAI sends itself.
                if message.content.is_empty() {
                    value["content"] = Value::Null;
                }
                value["tool_calls"] = message
                    .tool_calls
                    .iter()
                    .map(|call| {
                        json!({
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments},
                        })
                    })
                    .collect();
            }
            value
        }
        Role::Tool => json!({
            "role": "tool",
            "tool_call_id": message.tool_call_id.as_deref().unwrap_or_default(),
            "content": message.content,
        }),
    }
}

/// One `chat.completion.chunk`. Every field is optional: compatible servers leave out
/// different ones, and send `choices: null` next to a usage-only chunk.
#[derive(Deserialize)]
struct Chunk {
    choices: Option<Vec<Choice>>,
    usage: Option<ChunkUsage>,
    /// Some compatible servers report a failure inside the stream.
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    delta: Option<ChoiceDelta>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChoiceDelta {
    content: Option<String>,
    tool_calls: Option<Vec<ToolCallChunk>>,
}

#[derive(Deserialize)]
struct ToolCallChunk {
    index: Option<usize>,
    id: Option<String>,
    function: Option<FunctionChunk>,
}

#[derive(Deserialize)]
struct FunctionChunk {
    name: Option<String>,
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct ChunkUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

/// Reads the SSE body. The finish reason is held back until `[DONE]` so that `Finish` is
/// the last delta even though the usage chunk comes after it.
#[derive(Default)]
pub struct ChunkDecoder {
    sse: SseParser,
    finish: Option<FinishReason>,
    saw_tool_calls: bool,
    secret: Option<String>,
}

impl Decoder for ChunkDecoder {
    fn line(&mut self, line: &str, out: &mut Vec<Delta>) -> Result<bool, LlmError> {
        match self.sse.line(line) {
            Some(event) => self.decode_data(&event.data, out),
            None => Ok(false),
        }
    }

    fn end(&mut self, out: &mut Vec<Delta>) -> Result<bool, LlmError> {
        if let Some(event) = self.sse.finish()
            && self.decode_data(&event.data, out)?
        {
            return Ok(true);
        }
        // Some servers close the body after the finish chunk without `[DONE]`.
        Ok(match self.finish.take() {
            Some(reason) => {
                out.push(Delta::Finish(reason));
                true
            }
            None => false,
        })
    }
}

impl ChunkDecoder {
    fn decode_data(&mut self, data: &str, out: &mut Vec<Delta>) -> Result<bool, LlmError> {
        let data = data.trim();
        if data.is_empty() {
            return Ok(false);
        }
        if data == "[DONE]" {
            // `[DONE]` is the server saying the answer is whole, even without a reason.
            let reason = self.finish.take().unwrap_or(if self.saw_tool_calls {
                FinishReason::ToolCalls
            } else {
                FinishReason::Stop
            });
            out.push(Delta::Finish(reason));
            return Ok(true);
        }
        let chunk: Chunk = serde_json::from_str(data).map_err(|e| {
            LlmError::BadResponse(format!("a stream chunk is not the JSON we expect ({e})"))
        })?;
        if let Some(error) = chunk.error {
            return Err(stream_error(&error, self.secret.as_deref()));
        }
        if let Some(choice) = chunk.choices.and_then(|c| c.into_iter().next()) {
            if let Some(delta) = choice.delta {
                if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                    out.push(Delta::Text(text));
                }
                for (position, call) in delta.tool_calls.into_iter().flatten().enumerate() {
                    self.saw_tool_calls = true;
                    let function = call.function;
                    out.push(Delta::ToolCall {
                        // Servers that omit `index` send each call whole in one array.
                        index: call.index.unwrap_or(position),
                        id: call.id,
                        name: function.as_ref().and_then(|f| f.name.clone()),
                        arguments: function.and_then(|f| f.arguments).unwrap_or_default(),
                    });
                }
            }
            // Some servers send `""` where OpenAI sends `null`.
            if let Some(reason) = choice.finish_reason.filter(|r| !r.is_empty()) {
                self.finish = Some(finish_reason(&reason));
            }
        }
        if let Some(usage) = chunk.usage {
            out.push(Delta::Usage(Usage {
                input_tokens: usage.prompt_tokens.unwrap_or(0),
                output_tokens: usage.completion_tokens.unwrap_or(0),
            }));
        }
        Ok(false)
    }
}

fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "stop" => FinishReason::Stop,
        "length" => FinishReason::Length,
        "tool_calls" | "function_call" => FinishReason::ToolCalls,
        "content_filter" => FinishReason::ContentFilter,
        _ => FinishReason::Other,
    }
}

/// `{"error": {...}}` inside the stream: its `code` when that is an HTTP status, else 500
/// (the request was accepted, so the failure is the server's).
fn stream_error(error: &Value, secret: Option<&str>) -> LlmError {
    let status = error
        .get("code")
        .and_then(|c| c.as_u64().or_else(|| c.as_str()?.parse().ok()))
        .and_then(|c| u16::try_from(c).ok())
        .filter(|c| (400..600).contains(c))
        .unwrap_or(500);
    let body = json!({"error": error}).to_string();
    LlmError::Http {
        status,
        message: super::error_message(body.as_bytes(), secret),
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::ProviderApi;
    use crate::llm::transport::stub::{self, Script, Stub};
    use crate::llm::{Completion, Image, Provider, ToolCall, collect};

    const KEY: &str = "sk-test-0123456789";
    const SSE: &str = "text/event-stream";

    fn provider(stub: &Stub, timeout: Duration) -> OpenAiProvider {
        let mut config = stub::config(ProviderApi::OpenaiCompletions, stub, timeout);
        config.base_url = Some(stub.base_url.join("/v1").unwrap());
        OpenAiProvider::new(&config, Some(KEY.into()))
    }

    async fn complete(chunks: &[&[u8]]) -> Result<Completion, LlmError> {
        let stub = stub::serve(Script::ok(SSE, chunks)).await;
        let stream = provider(&stub, Duration::from_secs(5))
            .stream(stub::ask("hi"))
            .await?;
        collect(stream).await
    }

    fn text_chunk(text: &str) -> String {
        format!(
            "data: {}\n\n",
            json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
        )
    }

    #[tokio::test]
    async fn a_text_stream_split_anywhere_gives_the_whole_answer_usage_and_finish() {
        let answer = text_chunk("你好, world");
        let halves = stub::split_mid_char(&answer);
        let completion = complete(&[
            b": keep-alive\n\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n",
            b"\n",
            &halves[0],
            &halves[1],
            b"data:\n\n",
            b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            b"data: {\"choices\":null,\"usage\":null}\n\n",
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5,\"total_tokens\":17}}\n\n",
            b"data: [DONE]\n\n",
        ])
        .await
        .unwrap();
        assert_eq!(
            completion,
            Completion {
                text: "你好, world".into(),
                tool_calls: Vec::new(),
                usage: Some(Usage {
                    input_tokens: 12,
                    output_tokens: 5
                }),
                finish: Some(FinishReason::Stop),
            }
        );
    }

    #[tokio::test]
    async fn every_chunk_boundary_gives_the_same_answer() {
        let body = format!(
            ": keep-alive\r\n\r\n{}{}data: {{\"choices\":[{{\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\r\n\r\ndata: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":4}}}}\n\ndata: [DONE]\n\n",
            text_chunk("日本語 "),
            text_chunk("ok"),
        );
        let completion = stub::collect_split_everywhere(body.as_bytes(), ChunkDecoder::default)
            .await
            .unwrap();
        assert_eq!(completion.text, "日本語 ok");
        assert_eq!(completion.finish, Some(FinishReason::Stop));
        assert_eq!(completion.usage.map(|u| u.output_tokens), Some(4));
    }

    #[tokio::test]
    async fn finish_is_the_last_delta_even_though_usage_follows_it() {
        let stub = stub::serve(Script::ok(
            SSE,
            &[
                text_chunk("ok").as_bytes(),
                b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}\n\n",
                b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
            ],
        ))
        .await;
        let stream = provider(&stub, Duration::from_secs(5))
            .stream(stub::ask("hi"))
            .await
            .unwrap();
        let deltas: Vec<Delta> = futures::StreamExt::collect::<Vec<_>>(stream)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            deltas,
            vec![
                Delta::Text("ok".into()),
                Delta::Usage(Usage {
                    input_tokens: 1,
                    output_tokens: 2
                }),
                Delta::Finish(FinishReason::Length),
            ]
        );
    }

    #[tokio::test]
    async fn interleaved_tool_call_fragments_merge_by_index() {
        let call = |index: u32, id: Option<&str>, name: Option<&str>, args: &str| {
            let mut function = json!({"arguments": args});
            if let Some(name) = name {
                function["name"] = json!(name);
            }
            let mut call = json!({"index": index, "function": function});
            if let Some(id) = id {
                call["id"] = json!(id);
                call["type"] = json!("function");
            }
            format!(
                "data: {}\n\n",
                json!({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
            )
        };
        let chunks = [
            call(0, Some("call_a"), Some("fetch_url"), ""),
            call(1, Some("call_b"), Some("current_time"), ""),
            call(0, None, None, "{\"url\":"),
            call(1, None, None, "{\"tz\":\"UTC\"}"),
            call(0, None, None, "\"https://example.org\"}"),
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\ndata: [DONE]\n\n".to_owned(),
        ];
        let chunks: Vec<&[u8]> = chunks.iter().map(|c| c.as_bytes()).collect();
        let completion = complete(&chunks).await.unwrap();
        assert_eq!(
            completion.tool_calls,
            vec![
                ToolCall {
                    id: "call_a".into(),
                    name: "fetch_url".into(),
                    arguments: "{\"url\":\"https://example.org\"}".into(),
                },
                ToolCall {
                    id: "call_b".into(),
                    name: "current_time".into(),
                    arguments: "{\"tz\":\"UTC\"}".into(),
                },
            ]
        );
        assert_eq!(completion.finish, Some(FinishReason::ToolCalls));
    }

    #[tokio::test]
    async fn the_request_carries_auth_headers_model_tools_images_and_tool_results() {
        let stub = stub::serve(Script::ok(SSE, &[b"data: [DONE]\n\n"])).await;
        let call = ToolCall {
            id: "call_1".into(),
            name: "current_time".into(),
            arguments: "{}".into(),
        };
        let request = CompletionRequest {
            model: "gpt-4o-mini".into(),
            messages: vec![
                ChatMessage::new(Role::System, "be brief"),
                ChatMessage::new(Role::User, "what is this?").with_images(vec![Image {
                    mime: "image/png".into(),
                    base64: "iVBORw0=".into(),
                }]),
                ChatMessage::tool_request("", vec![call.clone()]),
                ChatMessage::tool_result(&call, "12:00"),
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
        assert_eq!(received.path, "/v1/chat/completions");
        assert_eq!(received.headers["authorization"], format!("Bearer {KEY}"));
        assert_eq!(received.headers["x-team"], "blue");
        assert_eq!(
            received.body,
            json!({
                "model": "gpt-4o-mini",
                "stream": true,
                "stream_options": {"include_usage": true},
                "max_tokens": 300,
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0="}},
                    ]},
                    {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "current_time", "arguments": "{}"}},
                    ]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
                ],
                "tools": [{"type": "function", "function": {
                    "name": "current_time",
                    "description": "The time now",
                    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
                }}],
            })
        );
    }

    #[test]
    fn a_structured_request_carries_a_strict_json_schema_response_format() {
        let body = request_body(&stub::ask_structured("ok?"));
        assert_eq!(
            body["response_format"],
            json!({
                "type": "json_schema",
                "json_schema": {"name": "verdict", "schema": stub::verdict_schema(), "strict": true},
            })
        );
        assert_eq!(
            body["messages"][0],
            json!({"role": "system", "content": "be brief"})
        );
        assert!(
            request_body(&stub::ask("hi"))
                .get("response_format")
                .is_none()
        );
    }

    #[tokio::test]
    async fn no_tools_means_no_tools_field() {
        let stub = stub::serve(Script::ok(SSE, &[b"data: [DONE]\n\n"])).await;
        let stream = provider(&stub, Duration::from_secs(5))
            .stream(stub::ask("hi"))
            .await
            .unwrap();
        collect(stream).await.unwrap();
        assert!(stub.request().body.get("tools").is_none());
    }

    #[tokio::test]
    async fn a_429_carries_retry_after() {
        let stub = stub::serve(Script::refuse(
            429,
            vec![("retry-after", "7")],
            r#"{"error":{"message":"Rate limit reached","type":"requests"}}"#,
        ))
        .await;
        let error = provider(&stub, Duration::from_secs(5))
            .stream(stub::ask("hi"))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&error, LlmError::Http { status: 429, message, retry_after: Some(wait) }
                if message == "Rate limit reached" && *wait == Duration::from_secs(7)),
            "{error:?}"
        );
        assert!(error.is_retryable());
    }

    #[tokio::test]
    async fn a_500_carries_the_message_with_the_key_redacted() {
        let body = format!(r#"{{"error":{{"message":"upstream rejected key {KEY}"}}}}"#);
        let stub = stub::serve(Script::refuse(500, Vec::new(), &body)).await;
        let error = provider(&stub, Duration::from_secs(5))
            .stream(stub::ask("hi"))
            .await
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            "the model provider returned HTTP 500: upstream rejected key [redacted]"
        );
    }

    #[tokio::test]
    async fn a_stream_that_goes_silent_stalls_after_the_first_text() {
        let mut script = Script::ok(SSE, &[text_chunk("Hel").as_bytes()]);
        script
            .chunks
            .push((Duration::from_secs(5), text_chunk("lo").into_bytes()));
        let stub = stub::serve(script).await;
        let timeout = Duration::from_millis(500);
        let mut stream = provider(&stub, timeout)
            .stream(stub::ask("hi"))
            .await
            .unwrap();
        use futures::StreamExt;
        assert_eq!(
            stream.next().await.unwrap().unwrap(),
            Delta::Text("Hel".into())
        );
        assert!(matches!(stream.next().await, Some(Err(LlmError::Stalled(t))) if t == timeout));
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn no_status_line_within_the_timeout_is_a_timeout() {
        // Nothing listens behind an accepted connection: a listener that never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let stub = Stub {
            base_url: base_url.parse().unwrap(),
            received: Default::default(),
        };
        let timeout = Duration::from_millis(300);
        let error = provider(&stub, timeout)
            .stream(stub::ask("hi"))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(error, LlmError::Timeout(t) if t == timeout),
            "{error:?}"
        );
        drop(listener);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_network_error_without_the_key() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let stub = Stub {
            base_url: base_url.parse().unwrap(),
            received: Default::default(),
        };
        let error = provider(&stub, Duration::from_secs(5))
            .stream(stub::ask("hi"))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&error, LlmError::Network(m) if !m.contains(KEY)),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn malformed_json_is_a_bad_response() {
        let error = complete(&[text_chunk("a").as_bytes(), b"data: {\"choices\": [\n\n"])
            .await
            .unwrap_err();
        assert!(
            matches!(&error, LlmError::BadResponse(m) if m.starts_with("a stream chunk is not the JSON")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_stream_without_finish_or_done_ended_early() {
        let error = complete(&[text_chunk("half an ans").as_bytes()])
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "the model provider sent an answer we could not read: the stream ended early"
        );
    }

    #[tokio::test]
    async fn a_finish_without_done_is_still_a_complete_answer() {
        let completion = complete(&[
            text_chunk("all").as_bytes(),
            b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"content_filter\"}]}\n\n",
        ])
        .await
        .unwrap();
        assert_eq!(completion.text, "all");
        assert_eq!(completion.finish, Some(FinishReason::ContentFilter));
    }

    #[tokio::test]
    async fn an_error_inside_the_stream_is_an_http_error_without_the_key() {
        let error = complete(&[
            text_chunk("a").as_bytes(),
            format!("data: {{\"error\":{{\"message\":\"bad key {KEY}\",\"code\":429}}}}\n\n")
                .as_bytes(),
        ])
        .await
        .unwrap_err();
        assert!(
            matches!(&error, LlmError::Http { status: 429, message, .. } if message == "bad key [redacted]"),
            "{error:?}"
        );
    }
}
