//! The built-in `echo` provider: answers with the last user message. No network, no model;
//! for diagnostics and for the demo when no model endpoint is configured.

use futures::future::BoxFuture;

use super::{CompletionRequest, LlmError, Provider, Role};

/// Replies `echo: <what you said>`.
pub struct EchoProvider;

impl Provider for EchoProvider {
    fn complete<'a>(
        &'a self,
        request: &'a CompletionRequest,
    ) -> BoxFuture<'a, Result<String, LlmError>> {
        let last = request
            .messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.as_str())
            .unwrap_or("");
        let answer = format!("echo: {last}");
        Box::pin(async move { Ok(answer) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::ChatMessage;

    #[tokio::test]
    async fn echoes_the_last_user_message() {
        let request = CompletionRequest {
            model: String::new(),
            messages: vec![
                ChatMessage::new(Role::System, "be nice"),
                ChatMessage::new(Role::User, "first"),
                ChatMessage::new(Role::Assistant, "echo: first"),
                ChatMessage::new(Role::User, "second"),
            ],
        };
        assert_eq!(
            EchoProvider.complete(&request).await.unwrap(),
            "echo: second"
        );
    }
}
