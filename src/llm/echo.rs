//! The built-in `echo` provider: answers with the last user message, streamed a word at a
//! time. No network, no model; for diagnostics and for demos without a model.

use futures::future::BoxFuture;

use super::{CompletionRequest, Delta, DeltaStream, FinishReason, LlmError, Provider, Role};

/// Replies `echo: <what you said>`.
pub struct EchoProvider;

impl Provider for EchoProvider {
    fn stream(&self, request: CompletionRequest) -> BoxFuture<'_, Result<DeltaStream, LlmError>> {
        let last = request
            .messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.as_str())
            .unwrap_or("");
        let answer = format!("echo: {last}");
        let mut deltas: Vec<Result<Delta, LlmError>> = answer
            .split_inclusive(' ')
            .map(|word| Ok(Delta::Text(word.to_owned())))
            .collect();
        deltas.push(Ok(Delta::Finish(FinishReason::Stop)));
        Box::pin(async move { Ok(Box::pin(futures::stream::iter(deltas)) as DeltaStream) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{ChatMessage, collect};

    #[tokio::test]
    async fn echoes_the_last_user_message() {
        let request = CompletionRequest {
            model: String::new(),
            messages: vec![
                ChatMessage::new(Role::System, "be nice"),
                ChatMessage::new(Role::User, "first"),
                ChatMessage::new(Role::Assistant, "echo: first"),
                ChatMessage::new(Role::User, "second one"),
            ],
            tools: Vec::new(),
            max_tokens: 100,
            schema: None,
        };
        let stream = EchoProvider.stream(request).await.unwrap();
        let completion = collect(stream).await.unwrap();
        assert_eq!(completion.text, "echo: second one");
        assert_eq!(completion.finish, Some(FinishReason::Stop));
    }
}
