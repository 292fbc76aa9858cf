//! The HTTP side every wire format shares: one provider type, [`HttpProvider`], generic
//! over a [`WireFormat`] (where it posts, its headers, its request body, its
//! [`Decoder`]); one POST whose status and headers are awaited under the provider's
//! `timeout`, and a streamed body turned into [`Delta`]s by the format's decoder, with the
//! same `timeout` bounding each silence between chunks.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, Stream, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::sse::LineSplitter;
use super::{CompletionRequest, Delta, DeltaStream, LlmError, Provider};
use crate::config::ProviderConfig;

/// One wire format: where its requests go, how they authenticate, what they carry, and
/// how its streamed answer reads.
pub trait WireFormat: Send + Sync + 'static {
    /// The base URL when the config names none.
    const DEFAULT_BASE_URL: &'static str;
    /// Appended to the base URL.
    const PATH: &'static str;
    /// Reads one answer.
    type Decoder: Decoder;

    /// The format's own headers (auth, version) for `api_key`; by default a bearer token.
    fn headers(api_key: Option<&str>) -> HeaderMap {
        bearer(api_key)
    }

    /// The JSON body of a streamed request.
    fn request_body(request: &CompletionRequest) -> serde_json::Value;

    /// A decoder for one answer; it redacts `secret` (the key) from its errors.
    fn decoder(secret: Option<String>) -> Self::Decoder;
}

/// A model provider over HTTP speaking the wire format `W`.
pub struct HttpProvider<W> {
    endpoint: Endpoint,
    format: PhantomData<fn() -> W>,
}

impl<W: WireFormat> HttpProvider<W> {
    /// A provider for `config`; `api_key` goes where the format sends it, and is redacted
    /// from every error.
    pub fn new(config: &ProviderConfig, api_key: Option<String>) -> Self {
        let base = base_url(config, W::DEFAULT_BASE_URL);
        let headers = W::headers(api_key.as_deref());
        Self {
            endpoint: Endpoint::new(format!("{base}{}", W::PATH), config, headers, api_key),
            format: PhantomData,
        }
    }
}

impl<W: WireFormat> Provider for HttpProvider<W> {
    fn stream(&self, request: CompletionRequest) -> BoxFuture<'_, Result<DeltaStream, LlmError>> {
        Box::pin(async move {
            let body = W::request_body(&request);
            self.endpoint.start(&body, W::decoder).await
        })
    }
}

/// Where and how one provider is called.
struct Endpoint {
    http: reqwest::Client,
    url: String,
    headers: HeaderMap,
    timeout: Duration,
    secret: Option<String>,
}

impl Endpoint {
    /// `url` with the format's own `headers` (auth, version), which the config's `headers`
    /// may override. `secret` is redacted from every error.
    fn new(
        url: String,
        config: &ProviderConfig,
        mut headers: HeaderMap,
        secret: Option<String>,
    ) -> Self {
        for (name, value) in &config.headers {
            match (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                (Ok(name), Ok(value)) => {
                    headers.insert(name, value);
                }
                // Not logged with its value: config headers often carry tokens.
                _ => {
                    tracing::warn!(header = %name, url = %url, "skipping a provider header that is not valid HTTP")
                }
            }
        }
        Self {
            http: reqwest::Client::builder()
                .connect_timeout(config.timeout.min(Duration::from_secs(10)))
                .build()
                .expect("a reqwest client with static settings builds"),
            url,
            headers,
            timeout: config.timeout,
            secret,
        }
    }

    /// The API key, for redaction.
    fn secret(&self) -> Option<&str> {
        self.secret.as_deref()
    }

    /// POSTs `body` and waits for the status line: a non-2xx status becomes
    /// [`LlmError::Http`] with the provider's message and `Retry-After`.
    async fn post(&self, body: &serde_json::Value) -> Result<reqwest::Response, LlmError> {
        let request = self
            .http
            .post(&self.url)
            .headers(self.headers.clone())
            .json(body);
        let response = match tokio::time::timeout(self.timeout, request.send()).await {
            Err(_) => return Err(LlmError::Timeout(self.timeout)),
            Ok(Err(error)) => return Err(self.network_error(error)),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = super::retry_after(response.headers());
        // A refusal whose body never comes is still a refusal: its status says enough.
        let body = tokio::time::timeout(self.timeout, response.bytes())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let mut message = super::error_message(&body, self.secret());
        if message.is_empty() {
            status
                .canonical_reason()
                .unwrap_or("no message")
                .clone_into(&mut message);
        }
        Err(LlmError::Http {
            status: status.as_u16(),
            message,
            retry_after,
        })
    }

    /// POSTs `body` and, once accepted, reads the answer through the decoder `decoder`
    /// makes from the key (which it redacts from errors).
    async fn start<D: Decoder>(
        &self,
        body: &serde_json::Value,
        decoder: impl FnOnce(Option<String>) -> D,
    ) -> Result<DeltaStream, LlmError> {
        let response = self.post(body).await?;
        Ok(self.stream(response, decoder(self.secret.clone())))
    }

    /// The body of an accepted `response`, read line by line through `decoder`.
    fn stream(&self, response: reqwest::Response, decoder: impl Decoder) -> DeltaStream {
        decode_body(response.bytes_stream(), self.timeout, decoder)
    }

    fn network_error(&self, error: reqwest::Error) -> LlmError {
        network_error(error, self.timeout, self.secret())
    }
}

/// `config.base_url` without a trailing `/`, else the format's `default`.
fn base_url(config: &ProviderConfig, default: &str) -> String {
    config
        .base_url
        .as_ref()
        .map_or(default, |u| u.as_str())
        .trim_end_matches('/')
        .to_owned()
}

/// `Authorization: Bearer <key>`, marked sensitive, when there is a key.
pub(super) fn bearer(api_key: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(key) = api_key
        && let Ok(mut value) = HeaderValue::from_str(&format!("Bearer {key}"))
    {
        value.set_sensitive(true);
        headers.insert(http::header::AUTHORIZATION, value);
    }
    headers
}

fn network_error(error: reqwest::Error, timeout: Duration, secret: Option<&str>) -> LlmError {
    if error.is_timeout() {
        LlmError::Timeout(timeout)
    } else {
        // without_url: some providers take the key in the query string.
        LlmError::Network(super::redact(
            &crate::net::error_chain(&error.without_url()),
            secret,
        ))
    }
}

/// What one wire format makes of the lines of its body.
pub trait Decoder: Send + 'static {
    /// Reads one line (without its line break), pushing what it means to `out`. Returns
    /// `true` at the format's end marker (`[DONE]`, `message_stop`, `"done": true`).
    fn line(&mut self, line: &str, out: &mut Vec<Delta>) -> Result<bool, LlmError>;

    /// The body ended before the end marker. Pushes what the decoder still holds and
    /// returns whether the answer is complete anyway (a finish reason came).
    fn end(&mut self, out: &mut Vec<Delta>) -> Result<bool, LlmError>;
}

/// Turns `body` into deltas through `decoder`. The stream ends after the end marker, or
/// with one error: [`LlmError::Stalled`] after `timeout` without a byte, `BadResponse` for
/// an unreadable line or a body that stops early, `Network` when the connection breaks.
pub(super) fn decode_body<S>(body: S, timeout: Duration, decoder: impl Decoder) -> DeltaStream
where
    S: Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
{
    let reader = BodyReader {
        body: body.boxed(),
        lines: LineSplitter::default(),
        decoder,
        timeout,
        queue: VecDeque::new(),
        end: None,
        finished: false,
    };
    futures::stream::unfold(reader, |mut reader| async move {
        let item = reader.next().await?;
        Some((item, reader))
    })
    .boxed()
}

enum End {
    /// The answer is complete; nothing more will be read.
    Complete,
    Failed(LlmError),
    /// The stream has returned its last item.
    Over,
}

struct BodyReader<D> {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    lines: LineSplitter,
    decoder: D,
    timeout: Duration,
    /// Deltas decoded from the last chunk, not yet handed out.
    queue: VecDeque<Delta>,
    /// Set once reading stopped; reached after `queue` drains.
    end: Option<End>,
    /// A `Finish` was decoded.
    finished: bool,
}

impl<D: Decoder> BodyReader<D> {
    async fn next(&mut self) -> Option<Result<Delta, LlmError>> {
        loop {
            if let Some(delta) = self.queue.pop_front() {
                return Some(Ok(delta));
            }
            match self.end.replace(End::Over) {
                Some(End::Failed(error)) => return Some(Err(error)),
                Some(End::Complete | End::Over) => return None,
                None => self.end = self.read().await,
            }
        }
    }

    /// Reads one chunk and decodes the lines it completes.
    async fn read(&mut self) -> Option<End> {
        let mut out = Vec::new();
        let end = match tokio::time::timeout(self.timeout, self.body.next()).await {
            Err(_) => Some(End::Failed(LlmError::Stalled(self.timeout))),
            Ok(Some(Err(error))) => Some(End::Failed(network_error(error, self.timeout, None))),
            Ok(Some(Ok(chunk))) => self.decode_chunk(&chunk, &mut out),
            Ok(None) => Some(self.decode_end(&mut out)),
        };
        self.finished |= out.iter().any(|d| matches!(d, Delta::Finish(_)));
        self.queue.extend(out);
        end
    }

    fn decode_chunk(&mut self, chunk: &[u8], out: &mut Vec<Delta>) -> Option<End> {
        let lines = match self.lines.push(chunk) {
            Ok(lines) => lines,
            Err(error) => return Some(End::Failed(error)),
        };
        for line in lines {
            match self.decoder.line(&line, out) {
                Ok(false) => {}
                Ok(true) => return Some(End::Complete),
                Err(error) => return Some(End::Failed(error)),
            }
        }
        None
    }

    /// The last line if it had no line break, then what the decoder still holds.
    fn decode_rest(&mut self, out: &mut Vec<Delta>) -> Result<bool, LlmError> {
        if let Some(line) = self.lines.finish()?
            && self.decoder.line(&line, out)?
        {
            return Ok(true);
        }
        self.decoder.end(out)
    }

    fn decode_end(&mut self, out: &mut Vec<Delta>) -> End {
        match self.decode_rest(out) {
            Ok(true) => End::Complete,
            Ok(false) if self.finished || out.iter().any(|d| matches!(d, Delta::Finish(_))) => {
                End::Complete
            }
            Ok(false) => End::Failed(LlmError::BadResponse("the stream ended early".into())),
            Err(error) => End::Failed(error),
        }
    }
}

/// Test helpers shared by the three formats: a stub provider on `127.0.0.1:0` that records
/// the request and answers with scripted chunks.
#[cfg(test)]
pub(super) mod stub {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::body::Body;
    use axum::extract::Request;
    use bytes::Bytes;
    use futures::StreamExt;

    use crate::config::{ProviderApi, ProviderConfig};
    use crate::llm::{ChatMessage, CompletionRequest, Role, ToolSpec};

    /// What the stub answers.
    pub struct Script {
        pub status: u16,
        pub headers: Vec<(&'static str, &'static str)>,
        /// Each chunk is written after its delay, so chunks reach the client separately.
        pub chunks: Vec<(Duration, Vec<u8>)>,
    }

    impl Script {
        /// A 200 answer of `chunks`, 10 ms apart.
        pub fn ok(content_type: &'static str, chunks: &[&[u8]]) -> Self {
            Self {
                status: 200,
                headers: vec![("content-type", content_type)],
                chunks: chunks
                    .iter()
                    .map(|c| (Duration::from_millis(10), c.to_vec()))
                    .collect(),
            }
        }

        /// A refusal with `status` and `body`.
        pub fn refuse(status: u16, headers: Vec<(&'static str, &'static str)>, body: &str) -> Self {
            Self {
                status,
                headers,
                chunks: vec![(Duration::ZERO, body.as_bytes().to_vec())],
            }
        }
    }

    /// The request the stub received.
    #[derive(Debug, Clone)]
    pub struct Received {
        pub path: String,
        pub headers: http::HeaderMap,
        pub body: serde_json::Value,
    }

    /// A running stub; `received` holds the last request.
    pub struct Stub {
        pub base_url: url::Url,
        pub received: Arc<Mutex<Option<Received>>>,
    }

    impl Stub {
        pub fn request(&self) -> Received {
            self.received
                .lock()
                .unwrap()
                .clone()
                .expect("the stub got a request")
        }
    }

    pub async fn serve(script: Script) -> Stub {
        let received = Arc::new(Mutex::new(None));
        let script = Arc::new(script);
        let recorded = received.clone();
        let app = axum::Router::new().fallback(move |request: Request| {
            let recorded = recorded.clone();
            let script = script.clone();
            async move {
                let (parts, body) = request.into_parts();
                let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
                *recorded.lock().unwrap() = Some(Received {
                    path: parts.uri.path().to_owned(),
                    headers: parts.headers,
                    body: serde_json::from_slice(&bytes).unwrap_or_default(),
                });
                let chunks = script.chunks.clone();
                let body = futures::stream::iter(chunks).then(|(delay, chunk)| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, std::convert::Infallible>(Bytes::from(chunk))
                });
                let mut response = http::Response::builder().status(script.status);
                for (name, value) in &script.headers {
                    response = response.header(*name, *value);
                }
                response.body(Body::from_stream(body)).unwrap()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Stub {
            base_url: format!("http://{address}").parse().unwrap(),
            received,
        }
    }

    /// A provider config pointing at `stub`.
    pub fn config(api: ProviderApi, stub: &Stub, timeout: Duration) -> ProviderConfig {
        ProviderConfig {
            api,
            base_url: Some(stub.base_url.clone()),
            api_key_env: None,
            headers: [("x-team".to_owned(), "blue".to_owned())].into(),
            timeout,
            max_concurrency: None,
            warmup: false,
            models: Vec::new(),
        }
    }

    /// A one-line question.
    pub fn ask(text: &str) -> CompletionRequest {
        CompletionRequest {
            model: "m1".into(),
            messages: vec![ChatMessage::new(Role::User, text)],
            tools: Vec::new(),
            max_tokens: 256,
            schema: None,
        }
    }

    /// A question whose answer must be JSON of a small schema, with a system prompt.
    pub fn ask_structured(text: &str) -> CompletionRequest {
        let mut request = ask(text);
        request
            .messages
            .insert(0, ChatMessage::new(Role::System, "be brief"));
        request.schema = Some(crate::llm::AnswerSchema {
            name: "verdict".into(),
            schema: verdict_schema(),
        });
        request
    }

    /// The schema of [`ask_structured`].
    pub fn verdict_schema() -> serde_json::Value {
        serde_json::json!({
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
            "additionalProperties": false,
        })
    }

    /// The `current_time` tool.
    pub fn clock_tool() -> ToolSpec {
        ToolSpec {
            name: "current_time".into(),
            description: "The time now".into(),
            parameters: serde_json::json!({"type": "object", "properties": {"tz": {"type": "string"}}}),
        }
    }

    /// Decodes `body` cut into two chunks at every byte position, checks that every cut
    /// gives the same answer, and returns it.
    pub async fn collect_split_everywhere<D: super::Decoder>(
        body: &[u8],
        decoder: impl Fn() -> D,
    ) -> Result<crate::llm::Completion, crate::llm::LlmError> {
        let decode = |chunks: Vec<Vec<u8>>| {
            let chunks = futures::stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from(c))));
            crate::llm::collect(super::decode_body(
                chunks,
                Duration::from_secs(5),
                decoder(),
            ))
        };
        let whole = decode(vec![body.to_vec()]).await;
        for at in 0..=body.len() {
            let split = decode(vec![body[..at].to_vec(), body[at..].to_vec()]).await;
            assert_eq!(
                format!("{split:?}"),
                format!("{whole:?}"),
                "cut at byte {at}"
            );
        }
        whole
    }

    /// `text` cut so that a chunk boundary falls inside the first multi-byte character.
    pub fn split_mid_char(text: &str) -> Vec<Vec<u8>> {
        let bytes = text.as_bytes();
        let at = text
            .char_indices()
            .find(|(_, c)| c.len_utf8() > 1)
            .map(|(i, _)| i + 1)
            .expect("a multi-byte character");
        vec![bytes[..at].to_vec(), bytes[at..].to_vec()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{Completion, FinishReason, collect};

    /// Passes lines through: `text` → Text, `stop` → Finish, `end` → end marker.
    struct Echo;

    impl Decoder for Echo {
        fn line(&mut self, line: &str, out: &mut Vec<Delta>) -> Result<bool, LlmError> {
            match line {
                "end" => return Ok(true),
                "stop" => out.push(Delta::Finish(FinishReason::Stop)),
                "bad" => return Err(LlmError::BadResponse("bad line".into())),
                "" => {}
                text => out.push(Delta::Text(text.to_owned())),
            }
            Ok(false)
        }

        fn end(&mut self, _out: &mut Vec<Delta>) -> Result<bool, LlmError> {
            Ok(false)
        }
    }

    async fn run(chunks: &[&str]) -> Result<Completion, LlmError> {
        let body = futures::stream::iter(
            chunks
                .iter()
                .map(|c| Ok(Bytes::from(c.to_string())))
                .collect::<Vec<_>>(),
        );
        collect(decode_body(body, Duration::from_secs(5), Echo)).await
    }

    #[tokio::test]
    async fn the_end_marker_stops_reading() {
        let completion = run(&["a\nb", "\nstop\nend\nignored\n"]).await.unwrap();
        assert_eq!(completion.text, "ab");
        assert_eq!(completion.finish, Some(FinishReason::Stop));
    }

    #[tokio::test]
    async fn a_finish_without_end_marker_is_complete_but_nothing_is_not() {
        assert!(run(&["a\nstop"]).await.is_ok());
        let error = run(&["a\n"]).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "the model provider sent an answer we could not read: the stream ended early"
        );
    }

    #[tokio::test]
    async fn deltas_before_a_bad_line_come_out_before_the_error() {
        let body = futures::stream::iter(vec![Ok(Bytes::from("one\nbad\ntwo\n"))]);
        let items: Vec<_> = decode_body(body, Duration::from_secs(5), Echo)
            .collect()
            .await;
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].as_ref().unwrap(), &Delta::Text("one".into()));
        assert!(matches!(items[1], Err(LlmError::BadResponse(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn silence_longer_than_the_timeout_is_a_stall() {
        let body = futures::stream::iter(vec![Ok(Bytes::from("first\n"))])
            .chain(futures::stream::pending());
        let mut stream = decode_body(body, Duration::from_secs(30), Echo);
        assert_eq!(
            stream.next().await.unwrap().unwrap(),
            Delta::Text("first".into())
        );
        assert!(matches!(
            stream.next().await,
            Some(Err(LlmError::Stalled(d))) if d == Duration::from_secs(30)
        ));
        assert!(stream.next().await.is_none());
    }
}
