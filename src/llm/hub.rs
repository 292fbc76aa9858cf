//! Reliability above the providers: retries with backoff, fallback models, concurrency
//! caps, warm-up.
//!
//! [`LlmHub::stream`] walks a chain of models (the agent's model, then its fallbacks). Each
//! model is retried on transient trouble (429, 5xx, network, timeouts) with exponential
//! backoff or the provider's `Retry-After`; anything else moves to the next model at once.
//! An answer counts as started once its first delta arrived — trouble after that reaches
//! the caller, since half an answer cannot be retried invisibly.
//!
//! Concurrency is capped globally (`llm.max_concurrency`) and per provider
//! (`providers.<name>.max_concurrency`); the permits live inside the returned stream, so a
//! request holds its slot until its answer is read or dropped, and never while it waits to
//! retry.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{self, Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{CompletionRequest, Delta, DeltaStream, LlmError, Provider, ProviderRegistry};
use crate::config::{Config, ModelConfig, ModelRef};

/// The longest wait between retries, whatever `Retry-After` says.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The first backoff wait; each further retry of the same model waits twice as long.
const BACKOFF_BASE: Duration = Duration::from_secs(1);

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
        if self.attempts.is_empty() {
            return f.write_str("no model of the chain has a configured provider");
        }
        for (i, attempt) in self.attempts.iter().enumerate() {
            if i > 0 {
                f.write_str("; then ")?;
            }
            write!(f, "{}: {}", attempt.model, attempt.error)?;
        }
        Ok(())
    }
}

/// Waits between retries. Swappable because tokio's `test-util` (paused time) is not a
/// dependency feature here, and tests must neither sleep for real nor guess timings.
type Sleep = Arc<dyn Fn(Duration) -> BoxFuture<'static, ()> + Send + Sync>;

/// What the hub keeps per configured provider.
struct ProviderState {
    /// `providers.<name>.max_concurrency`, when set.
    limit: Option<Arc<Semaphore>>,
    /// `warmup: true` and no answer has started yet.
    warming_up: AtomicBool,
    /// How its last model call ended; shared with the streams it is still reading.
    last: Arc<Mutex<Option<LastCall>>>,
}

/// How a provider's last model call ended (what readiness reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastCall {
    pub ok: bool,
    /// When it ended, in Unix milliseconds.
    pub at_ms: u64,
    /// The error, when it failed (provider words redacted of the key, as in the log).
    pub error: Option<String>,
}

impl LastCall {
    fn now(error: Option<&LlmError>) -> Self {
        Self {
            ok: error.is_none(),
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            error: error.map(ToString::to_string),
        }
    }
}

/// A model call's labels and clock, for the metrics and the provider's last call.
struct Meter {
    provider: String,
    model: String,
    started: Instant,
    last: Option<Arc<Mutex<Option<LastCall>>>>,
    usage: Option<super::Usage>,
    done: bool,
}

impl Meter {
    fn start(model: &ModelRef, last: Option<Arc<Mutex<Option<LastCall>>>>) -> Self {
        metrics::counter!("agentbus_llm_requests_total", "provider" => model.provider.clone(), "model" => model.model.clone())
            .increment(1);
        Self {
            provider: model.provider.clone(),
            model: model.model.clone(),
            started: Instant::now(),
            last,
            usage: None,
            done: false,
        }
    }

    /// The call ended: with its answer complete (`None`) or with `error`.
    fn end(&mut self, error: Option<&LlmError>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let (provider, model) = (self.provider.clone(), self.model.clone());
        metrics::histogram!("agentbus_llm_request_duration_seconds", "provider" => provider.clone(), "model" => model.clone())
            .record(self.started.elapsed().as_secs_f64());
        if let Some(error) = error {
            metrics::counter!("agentbus_llm_errors_total", "provider" => provider.clone(), "model" => model.clone(), "kind" => error.kind())
                .increment(1);
        }
        if let Some(usage) = self.usage.take() {
            metrics::counter!("agentbus_llm_tokens_total", "provider" => provider.clone(), "model" => model.clone(), "direction" => "input")
                .increment(usage.input_tokens);
            metrics::counter!("agentbus_llm_tokens_total", "provider" => provider, "model" => model, "direction" => "output")
                .increment(usage.output_tokens);
        }
        if let Some(last) = &self.last {
            *last.lock().expect("last call lock") = Some(LastCall::now(error));
        }
    }
}

impl Drop for Meter {
    /// A stream dropped before its end (a cancelled answer) still counts its time and
    /// tokens, but says nothing about the provider's health.
    fn drop(&mut self) {
        self.last = None;
        self.end(None);
    }
}

/// Every provider, with the limits of `llm:`.
pub struct LlmHub {
    config: Arc<Config>,
    providers: ProviderRegistry,
    state: HashMap<String, ProviderState>,
    global: Arc<Semaphore>,
    global_limit: usize,
    sleep: Sleep,
}

impl LlmHub {
    /// The hub over `providers`, with the caps and warm-up flags of `config`.
    pub fn new(config: Arc<Config>, providers: ProviderRegistry) -> Self {
        // Validation rejects 0; the clamps keep a hand-built config from hanging every
        // request (0) or panicking the semaphore (above its maximum).
        let permits = |n: usize| n.clamp(1, Semaphore::MAX_PERMITS);
        let state = config
            .providers
            .iter()
            .map(|(name, provider)| {
                let state = ProviderState {
                    limit: provider
                        .max_concurrency
                        .map(|n| Arc::new(Semaphore::new(permits(n)))),
                    warming_up: AtomicBool::new(provider.warmup),
                    last: Arc::default(),
                };
                (name.clone(), state)
            })
            .collect();
        let global_limit = permits(config.llm.max_concurrency);
        Self {
            config,
            providers,
            state,
            global: Arc::new(Semaphore::new(global_limit)),
            global_limit,
            sleep: Arc::new(|wait| Box::pin(tokio::time::sleep(wait))),
        }
    }

    /// Replaces how the hub waits between retries (default: `tokio::time::sleep`).
    pub fn with_sleep(
        mut self,
        sleep: impl Fn(Duration) -> BoxFuture<'static, ()> + Send + Sync + 'static,
    ) -> Self {
        self.sleep = Arc::new(sleep);
        self
    }

    /// The settings of `model` (defaults when its provider does not list it).
    pub fn model(&self, model: &ModelRef) -> ModelConfig {
        self.config
            .providers
            .get(&model.provider)
            .map(|p| p.model(&model.model))
            .unwrap_or_else(|| ModelConfig::unlisted(&model.model))
    }

    /// Model requests running now (each holds a slot of `llm.max_concurrency` until its
    /// stream ends or is dropped).
    pub fn in_flight(&self) -> usize {
        self.global_limit - self.global.available_permits()
    }

    /// Whether `provider` has `warmup: true` and has not started an answer yet.
    pub fn is_warming_up(&self, provider: &str) -> bool {
        self.state
            .get(provider)
            .is_some_and(|s| s.warming_up.load(Ordering::Relaxed))
    }

    /// Every configured provider with how its last model call ended (`None`: no call yet).
    pub fn last_calls(&self) -> Vec<(String, Option<LastCall>)> {
        let mut calls: Vec<_> = self
            .state
            .iter()
            .map(|(name, state)| {
                let last = state.last.lock().expect("last call lock").clone();
                (name.clone(), last)
            })
            .collect();
        calls.sort_by(|a, b| a.0.cmp(&b.0));
        calls
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
                tracing::warn!(provider = %model.provider, model = %model.model, "no such provider; skipping this model");
                continue;
            };
            request.model = model.model.clone();
            request.max_tokens = self.model(model).max_tokens;
            match self.stream_model(provider.as_ref(), model, &request).await {
                Ok(stream) => return Ok((model.clone(), stream)),
                Err(error) => attempts.push(Attempt {
                    model: model.clone(),
                    error,
                }),
            }
        }
        Err(Failure { attempts })
    }

    /// Tries one model until it starts an answer, retrying transient errors; the error is
    /// the last one when it gives up.
    async fn stream_model(
        &self,
        provider: &dyn Provider,
        model: &ModelRef,
        request: &CompletionRequest,
    ) -> Result<DeltaStream, LlmError> {
        let retries = self.config.llm.retries;
        let mut attempt = 1u32;
        loop {
            let error = match self.start(provider, model, request.clone()).await {
                Ok(stream) => return Ok(stream),
                Err(error) => error,
            };
            let error = match error {
                LlmError::Network(_) if self.is_warming_up(&model.provider) => LlmError::WarmingUp,
                other => other,
            };
            let wait =
                (error.is_retryable() && attempt <= retries).then(|| backoff(attempt, &error));
            tracing::warn!(
                provider = %model.provider,
                model = %model.model,
                attempt,
                error = %error,
                wait = ?wait,
                retrying = wait.is_some(),
                "model attempt failed",
            );
            let Some(wait) = wait else {
                return Err(error);
            };
            (self.sleep)(wait).await;
            attempt += 1;
        }
    }

    /// One try: takes the concurrency slots, calls the provider and waits for the first
    /// delta. The slots are released on failure, before any backoff.
    async fn start(
        &self,
        provider: &dyn Provider,
        model: &ModelRef,
        request: CompletionRequest,
    ) -> Result<DeltaStream, LlmError> {
        let state = self.state.get(&model.provider);
        // Always provider first, then global: a request holding a global slot never waits
        // for anything, so the two cannot deadlock.
        let provider_permit = match state.and_then(|s| s.limit.clone()) {
            Some(limit) => Some(acquire(limit).await),
            None => None,
        };
        let global_permit = acquire(self.global.clone()).await;

        let mut meter = Meter::start(model, state.map(|s| s.last.clone()));
        let first = match provider.stream(request).await {
            Ok(mut stream) => match stream.next().await {
                Some(Ok(delta)) => Ok((stream, delta)),
                Some(Err(error)) => Err(error),
                None => Err(LlmError::BadResponse(
                    "the stream ended before the answer began".into(),
                )),
            },
            Err(error) => Err(error),
        };
        let (stream, first) = match first {
            Ok(started) => started,
            Err(error) => {
                meter.end(Some(&error));
                return Err(error);
            }
        };
        if let Delta::Usage(usage) = &first {
            meter.usage = Some(*usage);
        }
        if let Some(state) = state
            && state.warming_up.swap(false, Ordering::Relaxed)
        {
            tracing::info!(provider = %model.provider, "provider is ready after warm-up");
        }
        Ok(Box::pin(WithPermits {
            inner: stream::once(async { Ok::<Delta, LlmError>(first) })
                .chain(stream)
                .boxed(),
            permits: Some((provider_permit, global_permit)),
            meter,
        }))
    }
}

/// The wait before retry number `attempt` (1-based): `Retry-After` when the provider sent
/// one, else 1 s, 2 s, 4 s …; never more than [`MAX_BACKOFF`].
fn backoff(attempt: u32, error: &LlmError) -> Duration {
    match error.retry_after() {
        Some(wait) => wait.min(MAX_BACKOFF),
        None => BACKOFF_BASE
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
            .min(MAX_BACKOFF),
    }
}

async fn acquire(semaphore: Arc<Semaphore>) -> OwnedSemaphorePermit {
    semaphore
        .acquire_owned()
        .await
        .expect("the hub never closes its semaphores")
}

/// An answer stream holding its concurrency slots until it ends or is dropped.
struct WithPermits {
    inner: DeltaStream,
    permits: Option<(Option<OwnedSemaphorePermit>, OwnedSemaphorePermit)>,
    meter: Meter,
}

impl Stream for WithPermits {
    type Item = Result<Delta, LlmError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = self.inner.poll_next_unpin(cx);
        // A stream ends with `None` or an error; either way the provider is done with us.
        match &item {
            Poll::Ready(Some(Ok(Delta::Usage(usage)))) => self.meter.usage = Some(*usage),
            Poll::Ready(None) => {
                self.permits = None;
                self.meter.end(None);
            }
            Poll::Ready(Some(Err(error))) => {
                self.permits = None;
                let error = error.clone();
                self.meter.end(Some(&error));
            }
            _ => {}
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;
    use crate::llm::{Usage, collect, error_message};

    /// What the scripted provider does with one request.
    enum Outcome {
        /// Refuses before any delta (as an HTTP status would).
        Refuse(LlmError),
        /// Accepts, then fails before the first delta.
        FailFirst(LlmError),
        /// Accepts and streams these items.
        Stream(Vec<Result<Delta, LlmError>>),
        /// Accepts, sends one delta, then never finishes (a long answer).
        Hang,
    }

    /// A provider that plays a script and records what it was asked; once the script is
    /// used up it answers `"ok from <model>"`.
    #[derive(Default)]
    struct Scripted {
        script: Mutex<VecDeque<Outcome>>,
        calls: Mutex<Vec<(String, u32)>>,
    }

    impl Scripted {
        fn new(script: impl IntoIterator<Item = Outcome>) -> Arc<Self> {
            Arc::new(Self {
                script: Mutex::new(script.into_iter().collect()),
                calls: Mutex::default(),
            })
        }

        /// `(model, max_tokens)` of every request, in order.
        fn calls(&self) -> Vec<(String, u32)> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Provider for Scripted {
        fn stream(
            &self,
            request: CompletionRequest,
        ) -> BoxFuture<'_, Result<DeltaStream, LlmError>> {
            self.calls
                .lock()
                .unwrap()
                .push((request.model.clone(), request.max_tokens));
            let outcome = self.script.lock().unwrap().pop_front();
            Box::pin(async move {
                match outcome {
                    Some(Outcome::Refuse(error)) => Err(error),
                    Some(Outcome::FailFirst(error)) => Ok(stream::iter([Err(error)]).boxed()),
                    Some(Outcome::Stream(items)) => Ok(stream::iter(items).boxed()),
                    Some(Outcome::Hang) => Ok(stream::iter([Ok(Delta::Text("…".into()))])
                        .chain(stream::pending())
                        .boxed()),
                    None => Ok(stream::iter(answer(&format!("ok from {}", request.model))).boxed()),
                }
            })
        }
    }

    fn answer(text: &str) -> Vec<Result<Delta, LlmError>> {
        vec![
            Ok(Delta::Text(text.into())),
            Ok(Delta::Usage(Usage::default())),
            Ok(Delta::Finish(crate::llm::FinishReason::Stop)),
        ]
    }

    fn http(status: u16, retry_after: Option<Duration>) -> LlmError {
        LlmError::Http {
            status,
            message: format!("status {status}"),
            retry_after,
        }
    }

    fn refused() -> LlmError {
        LlmError::Network("connection refused".into())
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn model(text: &str) -> ModelRef {
        ModelRef::parse(text).unwrap()
    }

    fn request() -> CompletionRequest {
        CompletionRequest {
            model: String::new(),
            messages: vec![crate::llm::ChatMessage::new(crate::llm::Role::User, "hi")],
            tools: Vec::new(),
            max_tokens: 0,
            schema: None,
        }
    }

    const CONFIG: &str = r#"
homeserver: { url: "http://127.0.0.1:8008", server_name: localhost }
appservice: { id: agentbus, bind: "127.0.0.1:9000" }
providers:
  main: { api: echo, models: [{ id: big, max_tokens: 500 }] }
  backup: { api: echo }
  local: { api: echo, warmup: true }
  capped: { api: echo, max_concurrency: 2 }
agents: []
"#;

    /// The hub over `providers`, with the waits it would have slept recorded instead.
    fn hub_with(
        config: &str,
        providers: &[(&str, &Arc<Scripted>)],
    ) -> (LlmHub, Arc<Mutex<Vec<Duration>>>) {
        let config = Arc::new(Config::parse(config).unwrap());
        let registry = providers
            .iter()
            .map(|(name, p)| (name.to_string(), Arc::clone(p) as Arc<dyn Provider>))
            .collect();
        let waits = Arc::new(Mutex::new(Vec::new()));
        let recorded = waits.clone();
        let hub = LlmHub::new(config, registry).with_sleep(move |wait| {
            recorded.lock().unwrap().push(wait);
            Box::pin(async {})
        });
        (hub, waits)
    }

    fn hub(providers: &[(&str, &Arc<Scripted>)]) -> (LlmHub, Arc<Mutex<Vec<Duration>>>) {
        hub_with(CONFIG, providers)
    }

    async fn failure_of(hub: &LlmHub, chain: &[ModelRef]) -> Failure {
        match hub.stream(chain, request()).await {
            Ok((used, _)) => panic!("{used} answered"),
            Err(failure) => failure,
        }
    }

    async fn text_of(stream: DeltaStream) -> String {
        collect(stream).await.unwrap().text
    }

    fn waits(recorded: &Mutex<Vec<Duration>>) -> Vec<Duration> {
        recorded.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn each_provider_remembers_how_its_last_call_ended() {
        let main = Scripted::new([
            Outcome::Refuse(http(401, None)),
            Outcome::Stream(vec![
                Ok(Delta::Text("par".into())),
                Err(LlmError::Stalled(secs(30))),
            ]),
        ]);
        let (hub, _) = hub(&[("main", &main)]);
        let state = |hub: &LlmHub, name: &str| {
            hub.last_calls()
                .into_iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, last)| last)
        };
        assert_eq!(state(&hub, "main"), None, "no call yet");
        failure_of(&hub, &[model("main/big")]).await;
        let last = state(&hub, "main").expect("a refused call is remembered");
        assert!(!last.ok);
        assert!(last.error.unwrap().contains("HTTP 401"));

        // Failing in the middle of the answer counts as a failed call too.
        let (_, stream) = hub.stream(&[model("main/big")], request()).await.unwrap();
        assert!(collect(stream).await.is_err());
        assert!(
            state(&hub, "main")
                .unwrap()
                .error
                .unwrap()
                .contains("stopped sending")
        );

        // A complete answer makes it healthy again; one dropped half-way says nothing.
        let (_, stream) = hub.stream(&[model("main/big")], request()).await.unwrap();
        assert_eq!(text_of(stream).await, "ok from big");
        assert!(state(&hub, "main").unwrap().ok);
        assert_eq!(
            hub.last_calls().len(),
            4,
            "every configured provider is listed"
        );
    }

    #[tokio::test]
    async fn retry_after_is_honoured_and_capped() {
        let main = Scripted::new([
            Outcome::Refuse(http(429, Some(secs(7)))),
            Outcome::Refuse(http(429, Some(secs(3600)))),
        ]);
        let (hub, waited) = hub(&[("main", &main)]);
        let (used, stream) = hub.stream(&[model("main/big")], request()).await.unwrap();
        assert_eq!(used, model("main/big"));
        assert_eq!(text_of(stream).await, "ok from big");
        assert_eq!(waits(&waited), [secs(7), MAX_BACKOFF]);
        assert_eq!(main.calls(), vec![("big".to_string(), 500); 3]);
    }

    #[tokio::test]
    async fn a_server_error_is_retried_once_then_answers() {
        let main = Scripted::new([Outcome::Refuse(http(500, None))]);
        let (hub, waited) = hub(&[("main", &main)]);
        let (_, stream) = hub.stream(&[model("main/big")], request()).await.unwrap();
        assert_eq!(text_of(stream).await, "ok from big");
        assert_eq!(main.calls().len(), 2);
        assert_eq!(waits(&waited), [secs(1)]);
    }

    #[tokio::test]
    async fn backoff_doubles_then_gives_up_after_the_configured_retries() {
        let main = Scripted::new((0..4).map(|_| Outcome::Refuse(http(503, None))));
        let (hub, waited) = hub(&[("main", &main)]);
        let failure = failure_of(&hub, &[model("main/big")]).await;
        assert_eq!(main.calls().len(), 4, "one try and 3 retries");
        assert_eq!(waits(&waited), [secs(1), secs(2), secs(4)]);
        assert_eq!(
            failure.to_string(),
            "main/big: the model provider returned HTTP 503: status 503"
        );
    }

    #[test]
    fn backoff_never_exceeds_the_cap() {
        let waits: Vec<_> = (1..=9)
            .map(|n| backoff(n, &http(503, None)).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX, &http(503, None)), MAX_BACKOFF);
    }

    #[tokio::test]
    async fn retries_follow_llm_retries() {
        let config = format!("{CONFIG}llm: {{ retries: 1 }}\n");
        let main = Scripted::new((0..4).map(|_| Outcome::Refuse(http(502, None))));
        let (hub, waited) = hub_with(&config, &[("main", &main)]);
        failure_of(&hub, &[model("main/big")]).await;
        assert_eq!(main.calls().len(), 2);
        assert_eq!(waits(&waited), [secs(1)]);
    }

    #[tokio::test]
    async fn unauthorized_is_not_retried_and_the_fallback_answers() {
        let main = Scripted::new([Outcome::Refuse(http(401, None))]);
        let backup = Scripted::new([]);
        let (hub, waited) = hub(&[("main", &main), ("backup", &backup)]);
        let chain = [model("main/big"), model("backup/small")];
        let (used, stream) = hub.stream(&chain, request()).await.unwrap();
        assert_eq!(used, model("backup/small"));
        assert_eq!(text_of(stream).await, "ok from small");
        assert_eq!(main.calls().len(), 1);
        assert_eq!(
            backup.calls(),
            [("small".to_string(), 1024)],
            "its own model and limit"
        );
        assert!(waits(&waited).is_empty());
    }

    #[tokio::test]
    async fn when_every_model_fails_each_last_error_is_reported() {
        let main = Scripted::new([Outcome::Refuse(http(404, None))]);
        let backup = Scripted::new([
            Outcome::Refuse(http(503, None)),
            Outcome::Refuse(refused()),
            Outcome::FailFirst(LlmError::Timeout(secs(60))),
            Outcome::Refuse(http(429, Some(secs(2)))),
        ]);
        let (hub, _) = hub(&[("main", &main), ("backup", &backup)]);
        let chain = [model("main/big"), model("ghost/x"), model("backup/small")];
        let failure = failure_of(&hub, &chain).await;
        let tried: Vec<_> = failure
            .attempts
            .iter()
            .map(|a| a.model.to_string())
            .collect();
        assert_eq!(
            tried,
            ["main/big", "backup/small"],
            "the unknown provider is skipped"
        );
        assert_eq!(
            failure.to_string(),
            "main/big: the model provider returned HTTP 404: status 404; \
             then backup/small: the model provider returned HTTP 429: status 429"
        );
    }

    #[tokio::test]
    async fn an_empty_chain_fails_with_a_readable_reason() {
        let (hub, _) = hub(&[]);
        let failure = failure_of(&hub, &[model("ghost/x")]).await;
        assert_eq!(
            failure.to_string(),
            "no model of the chain has a configured provider"
        );
    }

    #[tokio::test]
    async fn the_failure_text_never_carries_the_key() {
        let key = "sk-live-0123456789";
        let body = format!(r#"{{"error":{{"message":"Incorrect API key provided: {key}"}}}}"#);
        let main = Scripted::new([Outcome::Refuse(LlmError::Http {
            status: 401,
            message: error_message(body.as_bytes(), Some(key)),
            retry_after: None,
        })]);
        let (hub, _) = hub(&[("main", &main)]);
        let failure = failure_of(&hub, &[model("main/big")]).await;
        let text = failure.to_string();
        assert!(!text.contains(key), "{text}");
        assert!(
            text.contains("Incorrect API key provided: [redacted]"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn an_error_before_the_first_delta_counts_as_an_attempt() {
        let main = Scripted::new([
            Outcome::FailFirst(LlmError::Stalled(secs(60))),
            Outcome::Stream(Vec::new()),
        ]);
        let backup = Scripted::new([]);
        let (hub, waited) = hub(&[("main", &main), ("backup", &backup)]);
        let chain = [model("main/big"), model("backup/small")];
        let (used, stream) = hub.stream(&chain, request()).await.unwrap();
        // The stall is retried; the empty stream that follows is a bad answer, so the
        // fallback takes over.
        assert_eq!(main.calls().len(), 2);
        assert_eq!(waits(&waited), [secs(1)]);
        assert_eq!(used, model("backup/small"));
        assert_eq!(text_of(stream).await, "ok from small");
    }

    #[tokio::test]
    async fn an_error_after_the_first_delta_reaches_the_caller() {
        let main = Scripted::new([Outcome::Stream(vec![
            Ok(Delta::Text("Half an ans".into())),
            Err(LlmError::Stalled(secs(60))),
        ])]);
        let (hub, waited) = hub(&[("main", &main)]);
        let (_, mut stream) = hub.stream(&[model("main/big")], request()).await.unwrap();
        assert_eq!(
            stream.next().await.unwrap().unwrap(),
            Delta::Text("Half an ans".into())
        );
        assert!(matches!(
            stream.next().await,
            Some(Err(LlmError::Stalled(_)))
        ));
        assert_eq!(main.calls().len(), 1, "no retry mid-answer");
        assert!(waits(&waited).is_empty());
        assert_eq!(hub.in_flight(), 0, "the error ended the request");
    }

    #[tokio::test]
    async fn a_provider_cap_lets_only_that_many_answers_run() {
        let capped = Scripted::new((0..5).map(|_| Outcome::Hang));
        let (hub, _) = hub(&[("capped", &capped)]);
        let hub = Arc::new(hub);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..5 {
            let (hub, tx) = (hub.clone(), tx.clone());
            tokio::spawn(async move {
                let (_, stream) = hub.stream(&[model("capped/m")], request()).await.unwrap();
                let _ = tx.send(stream);
            });
        }
        let first = rx.recv().await.unwrap();
        let second = rx.recv().await.unwrap();
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(rx.try_recv().is_err(), "a third answer started");
        assert_eq!(capped.calls().len(), 2);
        assert_eq!(hub.in_flight(), 2);

        drop(first);
        let third = rx.recv().await.unwrap();
        assert_eq!(capped.calls().len(), 3);
        assert_eq!(hub.in_flight(), 2);

        drop((second, third));
        let (fourth, fifth) = (rx.recv().await.unwrap(), rx.recv().await.unwrap());
        drop((fourth, fifth));
        assert_eq!(hub.in_flight(), 0);
        assert_eq!(capped.calls().len(), 5);
    }

    #[tokio::test]
    async fn the_global_cap_spans_providers_and_frees_when_a_stream_ends() {
        let config = format!("{CONFIG}llm: {{ max_concurrency: 1 }}\n");
        let main = Scripted::new([]);
        let backup = Scripted::new([]);
        let (hub, _) = hub_with(&config, &[("main", &main), ("backup", &backup)]);
        let (_, mut held) = hub.stream(&[model("main/big")], request()).await.unwrap();
        let backup_chain = [model("backup/small")];
        let waiting = hub.stream(&backup_chain, request());
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        assert!(backup.calls().is_empty());
        assert_eq!(hub.in_flight(), 1);

        // Reading the answer to its end frees the slot even before the stream is dropped.
        while held.next().await.is_some() {}
        let (_, stream) = waiting.await.unwrap();
        assert_eq!(text_of(stream).await, "ok from small");
        assert_eq!(hub.in_flight(), 0);
        drop(held);
    }

    #[tokio::test]
    async fn no_slot_is_held_while_waiting_to_retry() {
        let main = Scripted::new([Outcome::Refuse(http(503, None))]);
        let config = Arc::new(Config::parse(CONFIG).unwrap());
        let registry: ProviderRegistry =
            [("main".to_string(), main.clone() as Arc<dyn Provider>)].into();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let hub = LlmHub::new(config, registry).with_sleep(move |wait| {
            let (done, wake) = tokio::sync::oneshot::channel::<()>();
            let _ = tx.send((wait, done));
            Box::pin(async move {
                let _ = wake.await;
            })
        });
        let hub = Arc::new(hub);
        let task = tokio::spawn({
            let hub = hub.clone();
            async move {
                hub.stream(&[model("main/big")], request())
                    .await
                    .map(|(m, _)| m)
            }
        });
        let (wait, done) = rx.recv().await.unwrap();
        assert_eq!(wait, secs(1));
        assert_eq!(hub.in_flight(), 0);
        done.send(()).unwrap();
        assert_eq!(task.await.unwrap().unwrap(), model("main/big"));
    }

    #[tokio::test]
    async fn a_warming_model_says_so_at_once_then_retries_normally_once_ready() {
        let local = Scripted::new([
            Outcome::Refuse(refused()),
            Outcome::FailFirst(refused()),
            Outcome::Stream(answer("up")),
            Outcome::Refuse(refused()),
        ]);
        let backup = Scripted::new([]);
        let (hub, waited) = hub(&[("local", &local), ("backup", &backup)]);
        let only_local = [model("local/llama")];
        assert!(hub.is_warming_up("local"));
        assert!(!hub.is_warming_up("backup"));

        let failure = failure_of(&hub, &only_local).await;
        assert!(matches!(
            failure.attempts[..],
            [Attempt {
                error: LlmError::WarmingUp,
                ..
            }]
        ));
        assert_eq!(
            failure.to_string(),
            "local/llama: the model is still warming up"
        );

        let chain = [model("local/llama"), model("backup/small")];
        let (used, _) = hub.stream(&chain, request()).await.unwrap();
        assert_eq!(
            used,
            model("backup/small"),
            "the chain goes on while warming up"
        );
        assert_eq!(local.calls().len(), 2, "no retries while warming up");
        assert!(waits(&waited).is_empty());

        let (_, stream) = hub.stream(&only_local, request()).await.unwrap();
        assert_eq!(text_of(stream).await, "up");
        assert!(!hub.is_warming_up("local"));

        let (_, stream) = hub.stream(&only_local, request()).await.unwrap();
        assert_eq!(text_of(stream).await, "ok from llama");
        assert_eq!(
            local.calls().len(),
            5,
            "the refusal after warm-up was retried"
        );
        assert_eq!(waits(&waited), [secs(1)]);
    }

    #[tokio::test]
    async fn warm_up_only_excuses_refused_connections() {
        let local = Scripted::new([Outcome::Refuse(http(503, None))]);
        let (hub, waited) = hub(&[("local", &local)]);
        let (_, stream) = hub
            .stream(&[model("local/llama")], request())
            .await
            .unwrap();
        assert_eq!(text_of(stream).await, "ok from llama");
        assert_eq!(waits(&waited), [secs(1)]);
        assert!(!hub.is_warming_up("local"));
    }
}
