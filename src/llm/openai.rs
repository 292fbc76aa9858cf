//! OpenAI-compatible Chat Completions, non-streaming:
//! `POST {base_url}/chat/completions` ([API reference](https://platform.openai.com/docs/api-reference/chat/create)).

use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{ChatMessage, CompletionRequest, LlmError, Provider};
use crate::config::ProviderConfig;

/// A provider speaking the Chat Completions wire format.
pub struct OpenAiProvider {
    http: reqwest::Client,
    endpoint: String,
    api_key: Option<String>,
    headers: Vec<(String, String)>,
    timeout: Duration,
}

impl OpenAiProvider {
    /// A provider for `config`; `api_key` is sent as a bearer token when present.
    pub fn new(config: &ProviderConfig, api_key: Option<String>) -> Self {
        let base = config
            .base_url
            .as_ref()
            .map(|u| u.as_str().trim_end_matches('/').to_owned())
            .unwrap_or_default();
        Self {
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()
                .expect("a reqwest client with static settings builds"),
            endpoint: format!("{base}/chat/completions"),
            api_key,
            headers: config
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            timeout: config.timeout,
        }
    }

    async fn complete_inner(&self, request: &CompletionRequest) -> Result<String, LlmError> {
        #[derive(Serialize)]
        struct Body<'a> {
            model: &'a str,
            messages: &'a [ChatMessage],
            stream: bool,
        }
        let mut builder = self
            .http
            .post(&self.endpoint)
            .timeout(self.timeout)
            .json(&Body {
                model: &request.model,
                messages: &request.messages,
                stream: false,
            });
        if let Some(key) = &self.api_key {
            builder = builder.bearer_auth(key);
        }
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        let response = builder.send().await.map_err(|e| self.classify(e))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| self.classify(e))?;
        if !status.is_success() {
            return Err(LlmError::Http {
                status: status.as_u16(),
                message: error_message(&body),
            });
        }
        parse_answer(&body)
    }

    fn classify(&self, error: reqwest::Error) -> LlmError {
        if error.is_timeout() {
            LlmError::Timeout(self.timeout)
        } else {
            // without_url: the URL may carry a key in some providers' query strings.
            LlmError::Network(crate::matrix::error_chain(&error.without_url()))
        }
    }
}

impl Provider for OpenAiProvider {
    fn complete<'a>(
        &'a self,
        request: &'a CompletionRequest,
    ) -> BoxFuture<'a, Result<String, LlmError>> {
        Box::pin(self.complete_inner(request))
    }
}

/// The text of `choices[0].message.content`.
fn parse_answer(body: &[u8]) -> Result<String, LlmError> {
    #[derive(Deserialize)]
    struct Completion {
        choices: Option<Vec<Choice>>,
    }
    #[derive(Deserialize)]
    struct Choice {
        message: Message,
    }
    #[derive(Deserialize)]
    struct Message {
        content: Option<String>,
    }
    let completion: Completion =
        serde_json::from_slice(body).map_err(|e| LlmError::BadResponse(e.to_string()))?;
    let content = completion
        .choices
        .and_then(|c| c.into_iter().next())
        .and_then(|c| c.message.content)
        .map(|c| c.trim().to_owned())
        .unwrap_or_default();
    if content.is_empty() {
        return Err(LlmError::BadResponse("the answer was empty".into()));
    }
    Ok(content)
}

/// `error.message` of an OpenAI-style error body, else the start of the body.
fn error_message(body: &[u8]) -> String {
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
    let text = text.trim();
    if text.chars().count() > 200 {
        format!("{}…", text.chars().take(200).collect::<String>())
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::Json;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;

    use super::*;
    use crate::llm::Role;

    /// A wire-level Chat Completions stub answering with `status` and `body`, recording
    /// requests.
    async fn stub(
        status: u16,
        body: &'static str,
        delay: Duration,
    ) -> (String, Arc<Mutex<Vec<(HeaderMap, serde_json::Value)>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            post(
                move |headers: HeaderMap, Json(request): Json<serde_json::Value>| async move {
                    record.lock().unwrap().push((headers, request));
                    tokio::time::sleep(delay).await;
                    (StatusCode::from_u16(status).unwrap(), body)
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, seen)
    }

    fn provider(url: &str, timeout: Duration) -> OpenAiProvider {
        let config: ProviderConfig = serde_yaml::from_str(&format!(
            "{{ api: openai-completions, base_url: \"{url}\", timeout: {}ms, headers: {{ X-Team: bus }} }}",
            timeout.as_millis()
        ))
        .unwrap();
        OpenAiProvider::new(&config, Some("sk-secret-key".into()))
    }

    fn request() -> CompletionRequest {
        CompletionRequest {
            model: "smol".into(),
            messages: vec![
                ChatMessage::new(Role::System, "be brief"),
                ChatMessage::new(Role::User, "hi"),
            ],
        }
    }

    #[tokio::test]
    async fn answers_with_the_first_choice_and_sends_model_messages_key_and_headers() {
        let (url, seen) = stub(
            200,
            r#"{"choices":[{"index":0,"message":{"role":"assistant","content":" Hello! "}}]}"#,
            Duration::ZERO,
        )
        .await;
        let answer = provider(&url, Duration::from_secs(5))
            .complete(&request())
            .await
            .unwrap();
        assert_eq!(answer, "Hello!");
        let seen = seen.lock().unwrap();
        let (headers, body) = &seen[0];
        assert_eq!(headers["authorization"], "Bearer sk-secret-key");
        assert_eq!(headers["x-team"], "bus");
        assert_eq!(body["model"], "smol");
        assert_eq!(body["stream"], false);
        assert_eq!(
            body["messages"][0],
            serde_json::json!({"role": "system", "content": "be brief"})
        );
        assert_eq!(
            body["messages"][1],
            serde_json::json!({"role": "user", "content": "hi"})
        );
    }

    #[tokio::test]
    async fn a_server_error_is_reported_with_its_message_and_never_the_key() {
        let (url, _) = stub(
            500,
            r#"{"error":{"message":"model overloaded","type":"server_error"}}"#,
            Duration::ZERO,
        )
        .await;
        let error = provider(&url, Duration::from_secs(5))
            .complete(&request())
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "the model provider returned HTTP 500: model overloaded"
        );
        assert!(!error.to_string().contains("sk-secret"));
    }

    #[tokio::test]
    async fn a_slow_model_times_out() {
        let (url, _) = stub(200, r#"{"choices":[]}"#, Duration::from_secs(5)).await;
        let error = provider(&url, Duration::from_millis(200))
            .complete(&request())
            .await
            .unwrap_err();
        assert!(matches!(error, LlmError::Timeout(_)), "{error}");
    }

    #[tokio::test]
    async fn malformed_or_empty_answers_are_errors() {
        let (url, _) = stub(200, "data: not json", Duration::ZERO).await;
        let error = provider(&url, Duration::from_secs(5))
            .complete(&request())
            .await
            .unwrap_err();
        assert!(matches!(error, LlmError::BadResponse(_)), "{error}");
        let (url, _) = stub(200, r#"{"choices":null}"#, Duration::ZERO).await;
        let error = provider(&url, Duration::from_secs(5))
            .complete(&request())
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "the model provider sent an answer we could not read: the answer was empty"
        );
    }

    #[tokio::test]
    async fn an_unreachable_provider_is_a_network_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        drop(listener);
        let error = provider(&url, Duration::from_secs(5))
            .complete(&request())
            .await
            .unwrap_err();
        assert!(matches!(error, LlmError::Network(_)), "{error}");
    }
}
