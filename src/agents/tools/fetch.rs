//! `fetch_url`: a public web page as readable text.
//!
//! Models follow links that people paste into a room, so the fetch goes through the
//! address guard ([`crate::net::guard`]): only the public internet is reached, every
//! resolved address and every redirect hop is checked. The body is read up to a bound
//! and HTML is reduced to text, so one page cannot crowd the conversation out.

use std::time::Duration;

use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use serde::Deserialize;
use serde_json::json;
use url::Url;

use super::{ToolOutcome, cap_chars};
use crate::net::error_chain;
use crate::net::guard::{AddressGuard, Blocked, guard_client, refusal_in};
use crate::net::html::html_to_text;

/// How long one `fetch_url` may take, redirects included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Redirects `fetch_url` follows before giving up.
const MAX_REDIRECTS: usize = 5;
/// Bytes of a response body `fetch_url` reads (1 MiB); the rest is never downloaded.
pub(super) const MAX_BODY_BYTES: usize = 1 << 20;
/// Characters of page text handed to the model (~2,000 tokens), so one fetch cannot
/// crowd the conversation out of the context window.
const MAX_TEXT_CHARS: usize = 8_000;
/// What an address refusal tells the model, after naming the address.
const PUBLIC_ONLY: &str = "; fetch_url only fetches from the public internet";

/// The tool's description and JSON-schema parameters.
pub(super) fn spec() -> (&'static str, serde_json::Value) {
    (
        "Fetch a public http(s) web page and return its content type and readable text (HTML reduced to text, at most ~8,000 characters).",
        json!({
            "type": "object",
            "properties": {
                "url": { "type": "string", "description": "The http:// or https:// URL to fetch." }
            },
            "required": ["url"],
        }),
    )
}

#[derive(Debug, Deserialize)]
pub(super) struct FetchUrlArgs {
    pub(super) url: String,
}

/// The HTTP client `fetch_url` uses, behind its address guard.
#[derive(Clone)]
pub(super) struct Fetcher {
    /// The client, or why it could not be built (then `fetch_url` answers with that).
    client: Result<reqwest::Client, String>,
    guard: AddressGuard,
}

impl Fetcher {
    pub(super) fn new(guard: AddressGuard) -> Self {
        let client = guard_client(&guard)
            .timeout(FETCH_TIMEOUT)
            .user_agent(concat!(
                "agentbus/",
                env!("CARGO_PKG_VERSION"),
                " (fetch_url tool)"
            ))
            .build()
            .map_err(|e| format!("could not set up the HTTP client: {e}"));
        if let Err(e) = &client {
            tracing::error!(error = %e, "fetch_url will be unavailable");
        }
        Self { client, guard }
    }

    pub(super) async fn fetch_url(&self, url: &str) -> ToolOutcome {
        match tokio::time::timeout(FETCH_TIMEOUT, self.fetch(url)).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(problem)) => ToolOutcome::error(problem),
            Err(_) => ToolOutcome::error(format!(
                "fetching {url} took longer than {} s; the site may be slow or down",
                FETCH_TIMEOUT.as_secs()
            )),
        }
    }

    async fn fetch(&self, url: &str) -> Result<ToolOutcome, String> {
        let client = self
            .client
            .as_ref()
            .map_err(|e| format!("fetch_url is unavailable: {e}"))?;
        let mut url =
            Url::parse(url.trim()).map_err(|e| format!("{url:?} is not a valid URL: {e}"))?;
        self.guard.check_url(&url).map_err(describe_blocked)?;
        let mut redirects = 0;
        loop {
            let response = client
                .get(url.clone())
                .header(
                    reqwest::header::ACCEPT,
                    "text/html, text/plain;q=0.9, */*;q=0.5",
                )
                .send()
                .await
                .map_err(|e| describe_send_error(&url, &e))?;
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .filter(|_| response.status().is_redirection());
            let Some(location) = location else {
                return Ok(read_page(response, &url, redirects).await);
            };
            if redirects == MAX_REDIRECTS {
                return Err(format!(
                    "{url} redirected more than {MAX_REDIRECTS} times; giving up"
                ));
            }
            url = self
                .guard
                .redirect_target(&url, location)
                .map_err(describe_blocked)?;
            redirects += 1;
        }
    }
}

/// Reads a final (non-redirect) response into what the model sees.
async fn read_page(mut response: reqwest::Response, url: &Url, redirects: usize) -> ToolOutcome {
    let status = response.status();
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let mut head = format!("URL: {url}");
    if redirects > 0 {
        head.push_str(&format!(
            " (after {redirects} redirect{})",
            if redirects == 1 { "" } else { "s" }
        ));
    }
    head.push_str(&format!(
        "\nStatus: {status}\nContent-Type: {}\n",
        if content_type.is_empty() {
            "(none)"
        } else {
            &content_type
        }
    ));
    let finish = |body: String| {
        let text = format!("{head}\n{body}");
        if status.is_success() {
            ToolOutcome::ok(text)
        } else {
            ToolOutcome::error(format!("the server answered {status}\n{text}"))
        }
    };

    if !mime.is_empty() && !is_textual(&mime) {
        let size = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or("size unknown".to_owned(), |n| format!("{n} bytes"));
        return finish(format!(
            "The content is {mime} ({size}), not text, so it is not shown."
        ));
    }

    let mut body = Vec::new();
    let mut over_limit = false;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_BODY_BYTES - body.len();
                if chunk.len() > room {
                    body.extend_from_slice(&chunk[..room]);
                    over_limit = true;
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                return ToolOutcome::error(format!(
                    "reading {url} failed midway: {}",
                    error_chain(&e)
                ));
            }
        }
    }
    if mime.is_empty() && looks_binary(&body) {
        return finish(format!(
            "The content has no content type and is not text ({} bytes read), so it is not shown.",
            body.len()
        ));
    }
    let decoded = decode(&body, &content_type);
    let text = if mime == "text/html" || mime == "application/xhtml+xml" {
        html_to_text(&decoded)
    } else {
        decoded
    };
    let (shown, cut) = cap_chars(&text, MAX_TEXT_CHARS);
    let mut body = shown.to_owned();
    if cut {
        body.push_str(&format!(
            "\n\n[truncated: showing the first {MAX_TEXT_CHARS} of {} characters]",
            text.chars().count()
        ));
    }
    if over_limit {
        body.push_str(&format!(
            "\n\n[the response is larger than {} KiB; only its start was read]",
            MAX_BODY_BYTES / 1024
        ));
    }
    finish(body)
}

/// Whether a media type is text the model can read.
fn is_textual(mime: &str) -> bool {
    mime.starts_with("text/")
        || mime.ends_with("+json")
        || mime.ends_with("+xml")
        || matches!(
            mime,
            "application/json"
                | "application/xml"
                | "application/javascript"
                | "application/x-javascript"
                | "application/ecmascript"
                | "application/x-ndjson"
                | "application/yaml"
                | "application/x-yaml"
                | "application/toml"
        )
}

/// Whether bytes served without a content type are binary: NULs, or not UTF-8 (a
/// character cut by the size limit at the very end is fine).
fn looks_binary(body: &[u8]) -> bool {
    if body.contains(&0) {
        return true;
    }
    match std::str::from_utf8(body) {
        Ok(_) => false,
        Err(e) => e.error_len().is_some(),
    }
}

/// Bytes as text: Latin-1 family charsets byte by byte, everything else as UTF-8 (invalid
/// sequences become U+FFFD).
fn decode(body: &[u8], content_type: &str) -> String {
    let content_type = content_type.to_ascii_lowercase();
    let latin1 = ["iso-8859-1", "latin1", "windows-1252", "us-ascii"]
        .iter()
        .any(|c| content_type.contains(&format!("charset={c}")));
    if latin1 {
        body.iter().map(|&b| char::from(b)).collect()
    } else {
        String::from_utf8_lossy(body).into_owned()
    }
}

/// `error: …` text for a URL the guard blocked; an address refusal says the policy too.
fn describe_blocked(blocked: Blocked) -> String {
    match blocked.refused() {
        Some(_) => format!("{blocked}{PUBLIC_ONLY}"),
        None => blocked.to_string(),
    }
}

/// `error: …` text for a failed request: the refusal if the resolver refused the host,
/// else the error with its causes.
fn describe_send_error(url: &Url, error: &reqwest::Error) -> String {
    if let Some(refused) = refusal_in(error) {
        return format!("refused to fetch {url}: {refused}{PUBLIC_ONLY}");
    }
    if error.is_timeout() {
        return format!("fetching {url} timed out");
    }
    format!("could not fetch {url}: {}", error_chain(error))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::agents::tools::Tools;
    use crate::agents::tools::tests::{fetch, stub};

    #[tokio::test]
    async fn every_non_public_address_is_refused_without_connecting() {
        let (addr, hits) = stub().await;
        let port = addr.port();
        let tools = Tools::new();
        let refused = [
            format!("http://localhost:{port}/page"),
            "http://localhost/".to_owned(),
            "http://127.0.0.1:1/".to_owned(),
            format!("http://127.0.0.1:{port}/page"),
            "http://[::1]/".to_owned(),
            "http://169.254.169.254/latest/meta-data".to_owned(),
            "http://10.0.0.1/".to_owned(),
            "http://172.16.5.4/".to_owned(),
            "http://192.168.1.1/".to_owned(),
            "http://100.64.0.1/".to_owned(),
            "http://0.0.0.0/".to_owned(),
            "http://255.255.255.255/".to_owned(),
            "http://224.0.0.1/".to_owned(),
            "http://192.0.2.1/".to_owned(),
            "http://[::ffff:127.0.0.1]/".to_owned(),
            "http://[::ffff:10.0.0.1]/".to_owned(),
            "http://[fe80::1]/".to_owned(),
            "http://[fd00::1]/".to_owned(),
            "http://[ff02::1]/".to_owned(),
            "http://[2001:db8::1]/".to_owned(),
            "http://[64:ff9b::a00:1]/".to_owned(),
            "http://[2002:7f00:1::]/".to_owned(),
            "http://[::]/".to_owned(),
            "http://2130706433/".to_owned(),
            "http://0x7f.1/".to_owned(),
        ];
        for url in &refused {
            let outcome = fetch(&tools, url).await;
            assert!(!outcome.ok, "{url}: {}", outcome.text);
            assert!(
                outcome.text.starts_with("error: refused to fetch"),
                "{url}: {}",
                outcome.text
            );
            assert!(
                outcome.text.contains("not a public address"),
                "{url}: {}",
                outcome.text
            );
            assert!(
                outcome
                    .text
                    .ends_with("; fetch_url only fetches from the public internet"),
                "{url}: {}",
                outcome.text
            );
        }
        for url in [
            "file:///etc/passwd",
            "ftp://example.org/file",
            "gopher://example.org/",
        ] {
            let outcome = fetch(&tools, url).await;
            assert!(!outcome.ok);
            assert!(
                outcome.text.contains("only http:// and https://"),
                "{url}: {}",
                outcome.text
            );
        }
        assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing reached the stub");
    }

    #[tokio::test]
    async fn a_redirect_from_an_allowed_server_to_a_private_address_is_refused() {
        let (addr, hits) = stub().await;
        let tools = Tools::with_guard(AddressGuard::PublicAnd(vec![addr.ip()]));
        let outcome = fetch(&tools, &format!("http://{addr}/to-metadata")).await;
        assert!(!outcome.ok);
        assert!(
            outcome
                .text
                .contains("redirected to http://169.254.169.254/latest/meta-data"),
            "{}",
            outcome.text
        );
        assert!(outcome.text.contains("link-local"), "{}", outcome.text);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn html_is_fetched_as_readable_text() {
        let (addr, _) = stub().await;
        let tools = Tools::allowing_private_addresses();
        let outcome = fetch(&tools, &format!("http://{addr}/to-page")).await;
        assert!(outcome.ok, "{}", outcome.text);
        let expected = format!(
            "URL: http://{addr}/page (after 1 redirect)\nStatus: 200 OK\nContent-Type: text/html; charset=utf-8\n\n\
             Title: Stub & Co\n\nHello\nFirst para with bold text.\n- one\n- two\n5 < 6"
        );
        assert_eq!(outcome.text, expected);
    }

    #[tokio::test]
    async fn fetched_text_is_capped() {
        let (addr, _) = stub().await;
        let tools = Tools::allowing_private_addresses();
        let long = fetch(&tools, &format!("http://{addr}/long")).await;
        assert!(long.ok);
        assert!(long.text.contains(&"é".repeat(MAX_TEXT_CHARS)));
        assert!(!long.text.contains(&"é".repeat(MAX_TEXT_CHARS + 1)));
        assert!(
            long.text
                .ends_with("[truncated: showing the first 8000 of 20000 characters]"),
            "{}",
            &long.text[long.text.len() - 200..]
        );

        let big = fetch(&tools, &format!("http://{addr}/big")).await;
        assert!(big.ok);
        assert!(
            big.text
                .contains(&format!("of {MAX_BODY_BYTES} characters]")),
            "only 1 MiB was read"
        );
        assert!(
            big.text
                .ends_with("[the response is larger than 1024 KiB; only its start was read]")
        );
    }

    #[tokio::test]
    async fn binary_content_errors_and_redirect_loops_are_described() {
        let (addr, _) = stub().await;
        let tools = Tools::allowing_private_addresses();
        let image = fetch(&tools, &format!("http://{addr}/image")).await;
        assert!(image.ok);
        assert!(
            image
                .text
                .ends_with("The content is image/png (7 bytes), not text, so it is not shown."),
            "{}",
            image.text
        );

        let missing = fetch(&tools, &format!("http://{addr}/missing")).await;
        assert!(!missing.ok);
        assert!(
            missing
                .text
                .starts_with("error: the server answered 404 Not Found"),
            "{}",
            missing.text
        );
        assert!(missing.text.ends_with("no such page"));

        let looping = fetch(&tools, &format!("http://{addr}/loop")).await;
        assert!(!looping.ok);
        assert!(
            looping.text.contains("redirected more than 5 times"),
            "{}",
            looping.text
        );

        let invalid = fetch(&tools, "not a url").await;
        assert!(
            invalid.text.contains("is not a valid URL"),
            "{}",
            invalid.text
        );
    }
}
