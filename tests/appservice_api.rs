//! The appservice HTTP API driven through its axum router (no socket), with a real sled
//! store on disk: status codes, errcodes, what ends up in the journal, and what is logged.

use agentbus::config::Config;
use agentbus::config::StoreConfig;
use agentbus::server::Services;
use agentbus::store::{Partition, Stores};
use axum::body::Body;
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const HS_TOKEN: &str = "hs-secret";

struct Harness {
    app: axum::Router,
    store: Stores,
    /// Built, not started: nothing drains the journal, so what a test delivers stays in it.
    _services: Services,
    _dir: tempfile::TempDir,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse(
        r#"
homeserver: { url: "http://127.0.0.1:1", server_name: hs }
appservice: { as_token: as-secret, hs_token: hs-secret }
admin: { token: admin-secret }
providers: { echo: { api: echo } }
agents: [ { id: damon, provider: echo } ]
"#,
    )
    .unwrap();
    let store = agentbus::store::open(&StoreConfig {
        path: dir.path().to_owned(),
        ..Default::default()
    })
    .unwrap();
    let services = Services::with_store(config, store.clone());
    Harness {
        app: services.app(),
        store,
        _services: services,
        _dir: dir,
    }
}

async fn call(
    app: &axum::Router,
    method: Method,
    uri: &str,
    auth: Option<&str>,
    body: &str,
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    if let Some(token) = auth {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn transaction(event_ids: &[&str]) -> String {
    let events: Vec<Value> = event_ids
        .iter()
        .map(|id| json!({"type": "m.room.message", "room_id": "!room:hs", "sender": "@alice:hs", "event_id": id,
                         "origin_server_ts": 1, "content": {"msgtype": "m.text", "body": "hi"}}))
        .collect();
    json!({ "events": events }).to_string()
}

async fn journaled(store: &Stores) -> Vec<String> {
    let lease = store
        .journal
        .claim(
            "test",
            &Partition::all(),
            std::time::Duration::from_secs(60),
            0,
        )
        .await
        .unwrap();
    store
        .journal
        .pending_events(&lease, None, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_id.to_string())
        .collect()
}

#[tokio::test]
async fn a_transaction_is_journaled_once_however_often_it_is_delivered() {
    let h = harness();
    let body = transaction(&["$a", "$b"]);
    for _ in 0..3 {
        let (status, answer) = call(
            &h.app,
            Method::PUT,
            "/_matrix/app/v1/transactions/t1",
            Some(HS_TOKEN),
            &body,
        )
        .await;
        assert_eq!((status, answer), (StatusCode::OK, json!({})));
    }
    assert_eq!(journaled(&h.store).await, ["$a", "$b"]);
    // The legacy unprefixed path and the query-string token work too.
    let (status, _) = call(
        &h.app,
        Method::PUT,
        &format!("/transactions/t2?access_token={HS_TOKEN}"),
        None,
        &transaction(&["$c"]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(journaled(&h.store).await, ["$a", "$b", "$c"]);

    // A retry is re-serialised by the homeserver (`unsigned.age` changes); same events, same
    // transaction.
    let retried = body.replace(
        r#""origin_server_ts":1"#,
        r#""origin_server_ts":1,"unsigned":{"age":99}"#,
    );
    assert_ne!(retried, body);
    let (status, _) = call(
        &h.app,
        Method::PUT,
        "/_matrix/app/v1/transactions/t1",
        Some(HS_TOKEN),
        &retried,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(journaled(&h.store).await, ["$a", "$b", "$c"]);
    // A homeserver whose database was reset counts txnIds from the start again: a reused
    // txnId with other events is a new transaction, not a retry.
    let (status, _) = call(
        &h.app,
        Method::PUT,
        "/_matrix/app/v1/transactions/t1",
        Some(HS_TOKEN),
        &transaction(&["$d"]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(journaled(&h.store).await, ["$a", "$b", "$c", "$d"]);
}

#[tokio::test]
async fn bad_tokens_are_refused_with_the_spec_errcodes_and_journal_nothing() {
    let h = harness();
    let body = transaction(&["$a"]);
    let uri = "/_matrix/app/v1/transactions/t1";
    let cases: &[(&str, Option<&str>, StatusCode, &str)] = &[
        (uri, None, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"),
        (uri, Some("wrong"), StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        (uri, Some(""), StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        (
            "/_matrix/app/v1/transactions/t1?access_token=wrong",
            None,
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        ),
        // Both present and disagreeing, even if one is right.
        (
            "/_matrix/app/v1/transactions/t1?access_token=wrong",
            Some(HS_TOKEN),
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        ),
    ];
    for (uri, auth, status, errcode) in cases {
        let (got, answer) = call(&h.app, Method::PUT, uri, *auth, &body).await;
        assert_eq!(
            (got, answer["errcode"].as_str()),
            (*status, Some(*errcode)),
            "{uri} with {auth:?}"
        );
    }
    assert!(journaled(&h.store).await.is_empty());
    // The refusals did not record the txnId: the real delivery is journaled.
    let (status, _) = call(&h.app, Method::PUT, uri, Some(HS_TOKEN), &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(journaled(&h.store).await, ["$a"]);
}

#[tokio::test]
async fn malformed_bodies_are_refused_and_journal_nothing() {
    let h = harness();
    let cases = [
        ("{\"events\": [", "M_NOT_JSON"),
        ("", "M_NOT_JSON"),
        ("{\"events\": 5}", "M_BAD_JSON"),
        ("[1, 2]", "M_BAD_JSON"),
    ];
    for (body, errcode) in cases {
        let (status, answer) = call(
            &h.app,
            Method::PUT,
            "/_matrix/app/v1/transactions/t1",
            Some(HS_TOKEN),
            body,
        )
        .await;
        assert_eq!(
            (status, answer["errcode"].as_str()),
            (StatusCode::BAD_REQUEST, Some(errcode)),
            "body {body:?}"
        );
    }
    assert!(journaled(&h.store).await.is_empty());
    let (status, _) = call(
        &h.app,
        Method::PUT,
        "/_matrix/app/v1/transactions/t1",
        Some(HS_TOKEN),
        &transaction(&["$ok"]),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the txnId of a refused body is still free"
    );
}

/// (method, uri, token, body, expected status, expected errcode)
type Case<'a> = (
    Method,
    &'a str,
    Option<&'a str>,
    &'a str,
    StatusCode,
    Option<&'a str>,
);

#[tokio::test]
async fn queries_ping_and_unknown_routes() {
    let h = harness();
    let ping = r#"{"transaction_id":"p1"}"#;
    let cases: &[Case] = &[
        (
            Method::GET,
            "/_matrix/app/v1/users/@stranger:hs",
            Some(HS_TOKEN),
            "",
            StatusCode::NOT_FOUND,
            Some("M_NOT_FOUND"),
        ),
        (
            Method::GET,
            "/_matrix/app/v1/users/@damon:elsewhere",
            Some(HS_TOKEN),
            "",
            StatusCode::NOT_FOUND,
            Some("M_NOT_FOUND"),
        ),
        (
            Method::GET,
            "/_matrix/app/v1/rooms/%23project:hs",
            Some(HS_TOKEN),
            "",
            StatusCode::NOT_FOUND,
            Some("M_NOT_FOUND"),
        ),
        (
            Method::POST,
            "/_matrix/app/v1/ping",
            Some(HS_TOKEN),
            ping,
            StatusCode::OK,
            None,
        ),
        (
            Method::POST,
            "/_matrix/app/v1/ping",
            None,
            "{}",
            StatusCode::UNAUTHORIZED,
            Some("M_MISSING_TOKEN"),
        ),
        (
            Method::GET,
            "/_matrix/app/v1/thirdparty/protocol/irc",
            Some(HS_TOKEN),
            "",
            StatusCode::NOT_FOUND,
            Some("M_UNRECOGNIZED"),
        ),
        (
            Method::GET,
            "/nothing/here",
            Some(HS_TOKEN),
            "",
            StatusCode::NOT_FOUND,
            Some("M_UNRECOGNIZED"),
        ),
    ];
    for (method, uri, token, body, status, errcode) in cases {
        let (got, answer) = call(&h.app, method.clone(), uri, *token, body).await;
        assert_eq!(
            (got, answer["errcode"].as_str()),
            (*status, *errcode),
            "{method} {uri}"
        );
        if *status == StatusCode::OK {
            assert_eq!(answer, json!({}), "{method} {uri}");
        }
    }
}

/// Sends `request` and returns the status, the headers and the JSON answer (`Null` when
/// the body is not JSON).
async fn send(app: &axum::Router, request: Request<Body>) -> (StatusCode, HeaderMap, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn request(
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(body.into()).unwrap()
}

#[tokio::test]
async fn every_error_answer_carries_a_matrix_errcode() {
    let h = harness();
    let auth = format!("Bearer {HS_TOKEN}");
    let json = ("content-type", "application/json");
    let with_token: &[(&str, &str)] = &[("authorization", &auth), json];
    let too_large = vec![b' '; 16 * 1024 * 1024 + 1];
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            request(
                Method::PUT,
                "/_matrix/app/v1/transactions/big",
                with_token,
                too_large,
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "M_TOO_LARGE",
        ),
        (
            request(
                Method::GET,
                "/_matrix/app/v1/transactions/t1",
                with_token,
                "",
            ),
            StatusCode::METHOD_NOT_ALLOWED,
            "M_UNRECOGNIZED",
        ),
        (
            request(Method::DELETE, "/_matrix/app/v1/ping", with_token, ""),
            StatusCode::METHOD_NOT_ALLOWED,
            "M_UNRECOGNIZED",
        ),
        (
            request(Method::GET, "/nothing/here", &[], ""),
            StatusCode::NOT_FOUND,
            "M_UNRECOGNIZED",
        ),
        (
            request(
                Method::POST,
                "/_matrix/app/v1/ping",
                with_token,
                "{not json",
            ),
            StatusCode::BAD_REQUEST,
            "M_NOT_JSON",
        ),
        (
            request(
                Method::POST,
                "/_matrix/app/v1/ping",
                with_token,
                r#"{"transaction_id": 5}"#,
            ),
            StatusCode::BAD_REQUEST,
            "M_BAD_JSON",
        ),
        (
            request(
                Method::POST,
                "/_matrix/app/v1/ping",
                &[("authorization", &auth), ("content-type", "text/plain")],
                "{}",
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "M_NOT_JSON",
        ),
        (
            request(
                Method::PUT,
                "/_matrix/app/v1/transactions/%FF",
                with_token,
                transaction(&["$a"]),
            ),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            request(Method::GET, "/_matrix/app/v1/users/%FF%FE", with_token, ""),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            request(
                Method::POST,
                "/api/v1/router/test",
                &[("authorization", "Bearer admin-secret"), json],
                "{not json",
            ),
            StatusCode::BAD_REQUEST,
            "M_NOT_JSON",
        ),
    ];
    for (request, status, errcode) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let (got, headers, answer) = send(&h.app, request).await;
        assert_eq!(
            (got, answer["errcode"].as_str()),
            (status, Some(errcode)),
            "{what}: {answer}"
        );
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {answer}"
        );
        assert_eq!(headers["content-type"], "application/json", "{what}");
        if status == StatusCode::METHOD_NOT_ALLOWED {
            assert!(headers.contains_key("allow"), "{what} says what is allowed");
        }
    }
    assert!(journaled(&h.store).await.is_empty());
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_and_a_bare_token_is_refused() {
    let h = harness();
    let json = ("content-type", "application/json");
    let ping = "/_matrix/app/v1/ping";
    let cases: &[(&str, &str, StatusCode, Option<&str>)] = &[
        (ping, "Bearer hs-secret", StatusCode::OK, None),
        (ping, "bearer hs-secret", StatusCode::OK, None),
        (ping, "BEARER hs-secret", StatusCode::OK, None),
        (ping, "Bearer  hs-secret", StatusCode::OK, None),
        (
            ping,
            "hs-secret",
            StatusCode::UNAUTHORIZED,
            Some("M_MISSING_TOKEN"),
        ),
        (
            ping,
            "Basic aHM6c2VjcmV0",
            StatusCode::UNAUTHORIZED,
            Some("M_MISSING_TOKEN"),
        ),
        // A malformed header is not overlooked for a right token in the query.
        (
            "/_matrix/app/v1/ping?access_token=hs-secret",
            "hs-secret",
            StatusCode::UNAUTHORIZED,
            Some("M_MISSING_TOKEN"),
        ),
        (
            ping,
            "bearer wrong",
            StatusCode::FORBIDDEN,
            Some("M_FORBIDDEN"),
        ),
    ];
    for (uri, authorization, status, errcode) in cases {
        let (got, _, answer) = send(
            &h.app,
            request(
                Method::POST,
                uri,
                &[("authorization", authorization), json],
                r#"{"transaction_id": "p1"}"#,
            ),
        )
        .await;
        assert_eq!(
            (got, answer["errcode"].as_str()),
            (*status, *errcode),
            "{uri} with {authorization:?}: {answer}"
        );
    }
    // The query-string token on its own still works (Conduit sends it).
    let (got, _, _) = send(
        &h.app,
        request(
            Method::POST,
            "/_matrix/app/v1/ping?access_token=hs-secret",
            &[json],
            "{}",
        ),
    )
    .await;
    assert_eq!(got, StatusCode::OK);
    // The admin API reads its token the same way.
    for (authorization, status) in [
        ("bearer admin-secret", StatusCode::OK),
        ("BEARER admin-secret", StatusCode::OK),
        ("admin-secret", StatusCode::UNAUTHORIZED),
    ] {
        let (got, _, answer) = send(
            &h.app,
            request(
                Method::GET,
                "/api/v1/pairing",
                &[("authorization", authorization)],
                "",
            ),
        )
        .await;
        assert_eq!(got, status, "admin API with {authorization:?}: {answer}");
    }
}

/// Log output captured from the current thread (a `#[tokio::test]` runs on one).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// Captures every event at debug level and above until the guard is dropped.
    fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(logs.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

#[tokio::test]
async fn a_flood_of_wrong_tokens_logs_a_warning_or_two_and_never_the_token() {
    let h = harness();
    let (logs, _capturing) = Logs::capture();
    let body = transaction(&["$a"]);
    for i in 0..1000 {
        let (status, answer) = call(
            &h.app,
            Method::PUT,
            &format!("/_matrix/app/v1/transactions/flood{i}"),
            Some("guessed-token-31337"),
            &body,
        )
        .await;
        assert_eq!(
            (status, answer["errcode"].as_str()),
            (StatusCode::FORBIDDEN, Some("M_FORBIDDEN"))
        );
    }
    let log = logs.text();
    let warnings = log.lines().filter(|l| l.contains("wrong hs_token")).count();
    // One at once, then one a minute: a second only if the loop ran across a minute.
    assert!((1..=2).contains(&warnings), "{warnings} warnings:\n{log}");
    assert!(
        log.contains(r#"path="/_matrix/app/v1/transactions/flood0""#),
        "the first warning names the path:\n{log}"
    );
    assert!(!log.contains("guessed-token-31337"), "{log}");
    assert!(journaled(&h.store).await.is_empty());
}

#[tokio::test]
async fn values_from_requests_are_logged_escaped() {
    let h = harness();
    let (logs, _capturing) = Logs::capture();
    let forged = "%0A2030-01-01T00:00:00Z%20ERROR%20agentbus:%20forged";
    let (status, _) = call(
        &h.app,
        Method::PUT,
        &format!("/_matrix/app/v1/transactions/t{forged}"),
        Some(HS_TOKEN),
        &transaction(&["$a"]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(
        &h.app,
        Method::GET,
        &format!("/_matrix/app/v1/rooms/%23room{forged}:hs"),
        Some(HS_TOKEN),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let log = logs.text();
    assert!(
        !log.lines().any(|l| l.starts_with("2030-01-01")),
        "a request forged a log line:\n{log}"
    );
    for escaped in [
        r#"txn_id="t\n2030-01-01T00:00:00Z ERROR agentbus: forged""#,
        r##"alias="#room\n2030-01-01T00:00:00Z ERROR agentbus: forged:hs""##,
    ] {
        assert!(log.contains(escaped), "missing {escaped} in:\n{log}");
    }
}
