//! Placeholder until the wire format lands.

use futures::future::BoxFuture;

use super::{CompletionRequest, DeltaStream, LlmError, Provider};
use crate::config::ProviderConfig;

pub struct AnthropicProvider;

impl AnthropicProvider {
    pub fn new(_config: &ProviderConfig, _api_key: Option<String>) -> Self {
        Self
    }
}

impl Provider for AnthropicProvider {
    fn stream(&self, _request: CompletionRequest) -> BoxFuture<'_, Result<DeltaStream, LlmError>> {
        Box::pin(async { Err(LlmError::BadResponse("not implemented yet".into())) })
    }
}
