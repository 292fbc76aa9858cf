//! Reliability above the providers: retries with backoff, fallback models, concurrency
//! caps, warm-up. Placeholder until it lands.

use std::time::Duration;

use super::{CompletionRequest, DeltaStream, LlmError, ProviderRegistry};
use crate::config::{Config, ModelConfig, ModelRef};

/// The longest wait between retries, whatever `Retry-After` says.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// One failed try of one model.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub model: ModelRef,
    pub error: LlmError,
}

/// Every model of the chain failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The last error of each model tried, in order.
    pub attempts: Vec<Attempt>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, attempt) in self.attempts.iter().enumerate() {
            if i > 0 {
                f.write_str("; then ")?;
            }
            write!(f, "{}: {}", attempt.model, attempt.error)?;
        }
        Ok(())
    }
}

/// Every provider, with the limits of `llm:`.
pub struct LlmHub {
    config: std::sync::Arc<Config>,
    providers: ProviderRegistry,
}

impl LlmHub {
    pub fn new(config: std::sync::Arc<Config>, providers: ProviderRegistry) -> Self {
        Self { config, providers }
    }

    /// The settings of `model` (defaults when its provider does not list it).
    pub fn model(&self, model: &ModelRef) -> ModelConfig {
        self.config
            .providers
            .get(&model.provider)
            .map(|p| p.model(&model.model))
            .unwrap_or_else(|| ModelConfig::unlisted(&model.model))
    }

    /// Starts an answer from the first model of `chain` that gives one.
    pub async fn stream(
        &self,
        chain: &[ModelRef],
        mut request: CompletionRequest,
    ) -> Result<(ModelRef, DeltaStream), Failure> {
        let mut attempts = Vec::new();
        for model in chain {
            let Some(provider) = self.providers.get(&model.provider) else {
                continue;
            };
            request.model = model.model.clone();
            request.max_tokens = self.model(model).max_tokens;
            match provider.stream(request.clone()).await {
                Ok(stream) => return Ok((model.clone(), stream)),
                Err(error) => attempts.push(Attempt {
                    model: model.clone(),
                    error,
                }),
            }
        }
        Err(Failure { attempts })
    }
}
