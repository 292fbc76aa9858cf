//! `POST {base_url}/api/chat` with `stream: true`: Ollama's native chat.
//!
//! Request and streamed answer:
//! <https://github.com/ollama/ollama/blob/main/docs/api.md#generate-a-chat-completion>. The
//! answer is newline-delimited JSON: objects with `message.content` pieces, tool calls as
//! whole objects (arguments already parsed, no call ID), then one with `"done": true`,
//! `done_reason` and the token counts. A failure after the 200 is a `{"error": "…"}` line.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{Value, json};

use super::transport::{Decoder, HttpProvider, WireFormat};
use super::{ChatMessage, CompletionRequest, Delta, FinishReason, LlmError, Role, Usage};

/// A provider speaking Ollama's `/api/chat`. Ollama itself wants no key; one is sent as
/// a bearer token for the proxies and hosted Ollamas that do.
pub type OllamaProvider = HttpProvider<OllamaChat>;

/// Ollama's native chat wire format.
pub struct OllamaChat;

impl WireFormat for OllamaChat {
    const DEFAULT_BASE_URL: &'static str = "http://127.0.0.1:11434";
    const PATH: &'static str = "/api/chat";
    type Decoder = LineDecoder;

    fn request_body(request: &CompletionRequest) -> Value {
        request_body(request)
    }

    fn decoder(secret: Option<String>) -> LineDecoder {
        LineDecoder {
            secret,
            ..LineDecoder::default()
        }
    }
}

/// The JSON body of a streamed `/api/chat` request.
fn request_body(request: &CompletionRequest) -> Value {
    // Ollama has no call IDs: a tool result names its tool instead, found by the call ID.
    let tool_names: HashMap<&str, &str> = request
        .messages
        .iter()
        .flat_map(|m| &m.tool_calls)
        .map(|call| (call.id.as_str(), call.name.as_str()))
        .collect();
    let mut body = json!({
        "model": request.model,
        "messages": request.messages.iter().map(|m| message(m, &tool_names)).collect::<Vec<_>>(),
        "stream": true,
        "options": {"num_predict": request.max_tokens},
    });
    if let Some(schema) = &request.schema {
        // Ollama's structured outputs: the schema itself as `format`.
        body["format"] = schema.schema.clone();
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

fn message(message: &ChatMessage, tool_names: &HashMap<&str, &str>) -> Value {
    let role = match message.role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    };
    let mut value = json!({"role": role, "content": message.content});
    if !message.images.is_empty() {
        value["images"] = message.images.iter().map(|i| json!(i.base64)).collect();
    }
    if !message.tool_calls.is_empty() {
        value["tool_calls"] = message
            .tool_calls
            .iter()
            .map(|call| {
                json!({"function": {"name": call.name, "arguments": tool_arguments(&call.arguments)}})
            })
            .collect();
    }
    if let Some(name) = message
        .tool_call_id
        .as_deref()
        .and_then(|id| tool_names.get(id))
    {
        value["tool_name"] = json!(name);
    }
    value
}

/// Ollama takes arguments as a JSON object. Text that is not one is passed on as written,
/// so the model sees its own mistake next to the tool's complaint.
fn tool_arguments(arguments: &str) -> Value {
    if arguments.trim().is_empty() {
        return json!({});
    }
    match serde_json::from_str::<Value>(arguments) {
        Ok(value @ Value::Object(_)) => value,
        _ => json!({"raw_arguments": arguments}),
    }
}

/// One line of the answer.
#[derive(Deserialize)]
struct Line {
    message: Option<LineMessage>,
    #[serde(default)]
    done: bool,
    done_reason: Option<String>,
    prompt_eval_count: Option<u64>,
    eval_count: Option<u64>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct LineMessage {
    content: Option<String>,
    tool_calls: Option<Vec<LineToolCall>>,
}

#[derive(Deserialize)]
struct LineToolCall {
    /// Recent Ollama versions name their calls; older ones do not.
    id: Option<String>,
    function: LineFunction,
}

#[derive(Deserialize)]
struct LineFunction {
    name: String,
    #[serde(default)]
    arguments: Value,
}

/// Reads the NDJSON body; each tool call gets the next index.
#[derive(Default)]
pub struct LineDecoder {
    calls: usize,
    secret: Option<String>,
}

impl Decoder for LineDecoder {
    fn line(&mut self, line: &str, out: &mut Vec<Delta>) -> Result<bool, LlmError> {
        if line.trim().is_empty() {
            return Ok(false);
        }
        let parsed: Line = serde_json::from_str(line).map_err(|e| {
            LlmError::BadResponse(format!("a stream line is not the JSON we expect ({e})"))
        })?;
        if parsed.error.is_some() {
            // The request was accepted, so the failure is the server's (a runner that
            // crashed, memory that ran out): a 500, worth another try.
            return Err(LlmError::Http {
                status: 500,
                message: super::error_message(line.as_bytes(), self.secret.as_deref()),
                retry_after: None,
            });
        }
        if let Some(message) = parsed.message {
            if let Some(text) = message.content.filter(|t| !t.is_empty()) {
                out.push(Delta::Text(text));
            }
            for call in message.tool_calls.into_iter().flatten() {
                out.push(Delta::ToolCall {
                    index: self.calls,
                    id: Some(call.id.filter(|id| !id.is_empty()).unwrap_or_else(call_id)),
                    name: Some(call.function.name),
                    arguments: match call.function.arguments {
                        Value::Null => "{}".to_owned(),
                        Value::String(text) => text,
                        value => value.to_string(),
                    },
                });
                self.calls += 1;
            }
        }
        if !parsed.done {
            return Ok(false);
        }
        out.push(Delta::Usage(Usage {
            input_tokens: parsed.prompt_eval_count.unwrap_or(0),
            output_tokens: parsed.eval_count.unwrap_or(0),
        }));
        let reason = match parsed.done_reason.as_deref() {
            Some("length") => FinishReason::Length,
            _ if self.calls > 0 => FinishReason::ToolCalls,
            _ => FinishReason::Stop,
        };
        out.push(Delta::Finish(reason));
        Ok(true)
    }

    fn end(&mut self, _out: &mut Vec<Delta>) -> Result<bool, LlmError> {
        Ok(false)
    }
}

/// A call ID for a call Ollama did not name: unique, because the conversation may later go
/// to a provider that matches results to calls by ID.
fn call_id() -> String {
    format!("call_{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;

    use super::*;
    use crate::config::ProviderApi;
    use crate::llm::transport::stub::{self, Script, Stub};
    use crate::llm::{Completion, Image, Provider, ToolCall, collect};

    const KEY: &str = "ollama-test-0123456789";
    const NDJSON: &str = "application/x-ndjson";

    fn provider(stub: &Stub, timeout: Duration) -> OllamaProvider {
        let config = stub::config(ProviderApi::Ollama, stub, timeout);
        OllamaProvider::new(&config, Some(KEY.into()))
    }

    fn text(text: &str) -> String {
        format!(
            "{}\n",
            json!({"model": "m1", "created_at": "2025-01-01T00:00:00Z", "message": {"role": "assistant", "content": text}, "done": false})
        )
    }

    fn done(reason: &str) -> String {
        format!(
            "{}\n",
            json!({"model": "m1", "message": {"role": "assistant", "content": ""}, "done": true, "done_reason": reason, "prompt_eval_count": 26, "eval_count": 8})
        )
    }

    async fn complete(chunks: &[String]) -> Result<Completion, LlmError> {
        let chunks: Vec<&[u8]> = chunks.iter().map(|c| c.as_bytes()).collect();
        let stub = stub::serve(Script::ok(NDJSON, &chunks)).await;
        let stream = provider(&stub, Duration::from_secs(5))
            .stream(stub::ask("hi"))
            .await?;
        collect(stream).await
    }

    #[test]
    fn a_structured_request_carries_its_schema_as_format() {
        let body = request_body(&stub::ask_structured("ok?"));
        assert_eq!(body["format"], stub::verdict_schema());
        assert_eq!(body["messages"][0]["content"], "be brief");
        assert!(request_body(&stub::ask("hi")).get("format").is_none());
    }

    #[tokio::test]
    async fn a_text_stream_split_mid_character_gives_text_usage_and_finish() {
        let mut chunks = stub::split_mid_char(&text("你好"));
        // A blank line between objects is tolerated.
        chunks.push(b"\n".to_vec());
        chunks.push(text(", world").into_bytes());
        chunks.push(done("stop").into_bytes());
        let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let stub = stub::serve(Script::ok(NDJSON, &chunks)).await;
        let stream = provider(&stub, Duration::from_secs(5))
            .stream(stub::ask("hi"))
            .await
            .unwrap();
        assert_eq!(
            collect(stream).await.unwrap(),
            Completion {
                text: "你好, world".into(),
                tool_calls: Vec::new(),
                usage: Some(Usage {
                    input_tokens: 26,
                    output_tokens: 8
                }),
                finish: Some(FinishReason::Stop),
            }
        );
    }

    #[tokio::test]
    async fn every_chunk_boundary_gives_the_same_answer() {
        let body = [text("ünï"), text("cödé"), done("length")].concat();
        let completion = stub::collect_split_everywhere(body.as_bytes(), LineDecoder::default)
            .await
            .unwrap();
        assert_eq!(completion.text, "ünïcödé");
        assert_eq!(completion.finish, Some(FinishReason::Length));
    }

    #[tokio::test]
    async fn whole_tool_calls_get_an_index_and_a_fresh_id_each() {
        let calls = format!(
            "{}\n",
            json!({"message": {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "fetch_url", "arguments": {"url": "https://example.org"}}},
                {"function": {"name": "current_time", "arguments": {}}},
            ]}, "done": false})
        );
        let completion = complete(&[text("Looking."), calls, done("stop")])
            .await
            .unwrap();
        assert_eq!(completion.text, "Looking.");
        assert_eq!(completion.finish, Some(FinishReason::ToolCalls));
        let [fetch, clock] = completion.tool_calls.as_slice() else {
            panic!("two calls: {:?}", completion.tool_calls)
        };
        assert_eq!(
            (fetch.name.as_str(), clock.name.as_str()),
            ("fetch_url", "current_time")
        );
        assert_eq!(
            serde_json::from_str::<Value>(&fetch.arguments).unwrap(),
            json!({"url": "https://example.org"})
        );
        assert_eq!(clock.arguments, "{}");
        assert!(fetch.id.starts_with("call_") && clock.id.starts_with("call_"));
        assert_ne!(fetch.id, clock.id);
    }

    #[tokio::test]
    async fn the_request_carries_model_options_images_tool_calls_and_tool_names() {
        let stub = stub::serve(Script::ok(NDJSON, &[done("stop").as_bytes()])).await;
        let call = ToolCall {
            id: "call_1".into(),
            name: "current_time".into(),
            arguments: "{\"tz\":\"UTC\"}".into(),
        };
        let request = CompletionRequest {
            model: "llava".into(),
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
        assert_eq!(received.path, "/api/chat");
        assert_eq!(received.headers["authorization"], format!("Bearer {KEY}"));
        assert_eq!(received.headers["x-team"], "blue");
        assert_eq!(
            received.body,
            json!({
                "model": "llava",
                "stream": true,
                "options": {"num_predict": 300},
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "what is this?", "images": ["iVBORw0="]},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"function": {"name": "current_time", "arguments": {"tz": "UTC"}}},
                    ]},
                    {"role": "tool", "content": "12:00", "tool_name": "current_time"},
                ],
                "tools": [{"type": "function", "function": {
                    "name": "current_time",
                    "description": "The time now",
                    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
                }}],
            })
        );
    }

    #[tokio::test]
    async fn a_429_carries_retry_after() {
        let stub = stub::serve(Script::refuse(
            429,
            vec![("retry-after", "7")],
            r#"{"error":"too many requests"}"#,
        ))
        .await;
        let error = provider(&stub, Duration::from_secs(5))
            .stream(stub::ask("hi"))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&error, LlmError::Http { status: 429, message, retry_after: Some(wait) }
                if message == "too many requests" && *wait == Duration::from_secs(7)),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_500_carries_the_message_with_the_key_redacted() {
        let body = format!(r#"{{"error":"proxy refused {KEY}"}}"#);
        let stub = stub::serve(Script::refuse(500, Vec::new(), &body)).await;
        let error = provider(&stub, Duration::from_secs(5))
            .stream(stub::ask("hi"))
            .await
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            "the model provider returned HTTP 500: proxy refused [redacted]"
        );
    }

    #[tokio::test]
    async fn an_unknown_model_is_the_404_ollama_sends() {
        let stub = stub::serve(Script::refuse(
            404,
            Vec::new(),
            r#"{"error":"model \"m1\" not found, try pulling it first"}"#,
        ))
        .await;
        let error = provider(&stub, Duration::from_secs(5))
            .stream(stub::ask("hi"))
            .await
            .err()
            .unwrap();
        assert!(!error.is_retryable());
        assert_eq!(
            error.to_string(),
            "the model provider returned HTTP 404: model \"m1\" not found, try pulling it first"
        );
    }

    #[tokio::test]
    async fn an_error_line_is_a_500_without_the_key() {
        let error = complete(&[
            text("Hal"),
            format!("{}\n", json!({"error": format!("runner died near {KEY}")})),
        ])
        .await
        .unwrap_err();
        assert!(
            matches!(&error, LlmError::Http { status: 500, message, .. } if message == "runner died near [redacted]"),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_stream_that_goes_silent_stalls_after_the_first_text() {
        let mut script = Script::ok(NDJSON, &[text("Hel").as_bytes()]);
        script
            .chunks
            .push((Duration::from_secs(5), text("lo").into_bytes()));
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
    async fn malformed_ndjson_is_a_bad_response() {
        let error = complete(&[text("a"), "{\"message\": {\"content\": \n".into()])
            .await
            .unwrap_err();
        assert!(
            matches!(&error, LlmError::BadResponse(m) if m.starts_with("a stream line is not the JSON")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_stream_without_done_ended_early() {
        let error = complete(&[text("half")]).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "the model provider sent an answer we could not read: the stream ended early"
        );
    }

    #[tokio::test]
    async fn a_last_line_without_newline_still_counts() {
        let last = done("stop");
        let completion = complete(&[text("ok"), last.trim_end().to_owned()])
            .await
            .unwrap();
        assert_eq!(completion.text, "ok");
        assert_eq!(completion.finish, Some(FinishReason::Stop));
    }
}
