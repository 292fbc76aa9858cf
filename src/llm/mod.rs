//! Model providers behind one [`Provider`] trait. Knows nothing about Matrix.
//!
//! For now: OpenAI-compatible Chat Completions (non-streaming) and a built-in `echo`
//! provider for diagnostics and demos without a model.

mod echo;
mod openai;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;

use crate::config::{Config, ProviderApi};

pub use echo::EchoProvider;
pub use openai::OpenAiProvider;

/// Who said a line of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One line of the conversation sent to a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// A request for one answer.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
}

/// Why a provider gave no answer. Messages are safe to show in a room: they never carry
/// an API key.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("the model did not answer within {}s", .0.as_secs())]
    Timeout(Duration),
    #[error("the model provider returned HTTP {status}: {message}")]
    Http { status: u16, message: String },
    #[error("the model provider could not be reached: {0}")]
    Network(String),
    #[error("the model provider sent an answer we could not read: {0}")]
    BadResponse(String),
}

/// A model endpoint.
pub trait Provider: Send + Sync {
    /// Asks for one complete answer.
    fn complete<'a>(
        &'a self,
        request: &'a CompletionRequest,
    ) -> BoxFuture<'a, Result<String, LlmError>>;
}

/// Providers by config name.
pub type ProviderRegistry = HashMap<String, Arc<dyn Provider>>;

/// Builds every configured provider, reading API keys from their environment variables.
pub fn build_providers(config: &Config) -> ProviderRegistry {
    config
        .providers
        .iter()
        .map(|(name, provider)| {
            let built: Arc<dyn Provider> = match provider.api {
                ProviderApi::Echo => Arc::new(EchoProvider),
                ProviderApi::OpenaiCompletions => {
                    let api_key = provider.api_key_env.as_deref().and_then(|var| {
                        let key = std::env::var(var).ok().filter(|k| !k.is_empty());
                        if key.is_none() {
                            tracing::warn!(provider = %name, env = var, "API key variable is not set; sending requests without a key");
                        }
                        key
                    });
                    Arc::new(OpenAiProvider::new(provider, api_key))
                }
            };
            (name.clone(), built)
        })
        .collect()
}
