//! OpenAI-compatible Chat Completions, non-streaming:
//! `POST {base_url}/chat/completions` ([API reference](https://platform.openai.com/docs/api-reference/chat/create)).

use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{CompletionRequest, Delta, DeltaStream, FinishReason, LlmError, Provider, Role};
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
            messages: Vec<serde_json::Value>,
            stream: bool,
        }
        let mut builder = self
            .http
            .post(&self.endpoint)
            .timeout(self.timeout)
            .json(&Body {
                model: &request.model,
                messages: request
                    .messages
                    .iter()
                    .map(|m| serde_json::json!({"role": match m.role { Role::System => "system", Role::User => "user", Role::Assistant => "assistant", Role::Tool => "tool" }, "content": m.content}))
                    .collect(),
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
                message: super::error_message(&body, self.api_key.as_deref()),
                retry_after: None,
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
    fn stream(&self, request: CompletionRequest) -> BoxFuture<'_, Result<DeltaStream, LlmError>> {
        Box::pin(async move {
            let text = self.complete_inner(&request).await?;
            Ok(Box::pin(futures::stream::iter([
                Ok(Delta::Text(text)),
                Ok(Delta::Finish(FinishReason::Stop)),
            ])) as DeltaStream)
        })
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
