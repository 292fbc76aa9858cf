//! The probes of the health checks: an HTTP GET, a TCP connection, an allow-listed
//! command. Each ends within its timeout with `Ok` (up) or the reason it is down, worded
//! for the alert's `Error:` line.
//!
//! The targets are the operator's own services (often on loopback or a private network),
//! named in the config, so the outbound address guard of `net` does not apply to them.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::config::{CheckConfig, MonitorsConfig};

/// How much of an HTTP body is read for `body_contains`.
const BODY_LIMIT: usize = 64 * 1024;

/// What a check probes, resolved from the config.
#[derive(Debug, Clone)]
pub enum Probe {
    Http {
        url: url::Url,
        expected_status: u16,
        body_contains: Option<String>,
    },
    Tcp {
        host: String,
        port: u16,
    },
    Command {
        /// The key in `monitors.commands`.
        name: String,
        argv: Vec<String>,
        max_output: usize,
    },
}

/// The client HTTP checks share: no redirects followed (the status checked is the
/// URL's own), no proxy from the environment.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("agentbus-monitor/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a client without custom TLS builds")
}

impl Probe {
    /// The probe of `check`; `None` when the config is invalid (validation says why).
    pub fn of(monitors: &MonitorsConfig, check: &CheckConfig) -> Option<Probe> {
        if let Some(http) = &check.http {
            return Some(Probe::Http {
                url: http.url.clone(),
                expected_status: http.expected_status,
                body_contains: http.body_contains.clone(),
            });
        }
        if let Some(tcp) = &check.tcp {
            return Some(Probe::Tcp {
                host: tcp.host.clone(),
                port: tcp.port,
            });
        }
        let run = &check.command.as_ref()?.run;
        let command = monitors.commands.get(run)?;
        Some(Probe::Command {
            name: run.clone(),
            argv: command.argv.clone(),
            max_output: command.max_output,
        })
    }

    /// Probes once, for at most `timeout`.
    pub async fn run(&self, http: &reqwest::Client, timeout: Duration) -> Result<(), String> {
        let within = humantime::format_duration(timeout);
        match self {
            Probe::Http {
                url,
                expected_status,
                body_contains,
            } => tokio::time::timeout(
                timeout,
                get(http, url, *expected_status, body_contains.as_deref()),
            )
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {within}"))),
            Probe::Tcp { host, port } => {
                match tokio::time::timeout(
                    timeout,
                    tokio::net::TcpStream::connect((host.as_str(), *port)),
                )
                .await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("TCP {host}:{port}: {e}")),
                    Err(_) => Err(format!("TCP {host}:{port}: no connection within {within}")),
                }
            }
            Probe::Command {
                name,
                argv,
                max_output,
            } => {
                // Dropping the future on timeout kills the child (`kill_on_drop`).
                tokio::time::timeout(timeout, command(name, argv, *max_output))
                    .await
                    .unwrap_or_else(|_| Err(format!("`{name}` did not finish within {within}")))
            }
        }
    }
}

async fn get(
    http: &reqwest::Client,
    url: &url::Url,
    expected_status: u16,
    body_contains: Option<&str>,
) -> Result<(), String> {
    let mut response = http.get(url.clone()).send().await.map_err(|e| {
        format!(
            "cannot reach {}: {}",
            without_credentials(url),
            crate::net::error_chain(&e.without_url())
        )
    })?;
    let status = response.status();
    if status.as_u16() != expected_status {
        return Err(if expected_status == 200 {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status} (expected {expected_status})")
        });
    }
    let Some(needle) = body_contains else {
        return Ok(());
    };
    let mut body = Vec::new();
    while body.len() < BODY_LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(e) => {
                return Err(format!(
                    "HTTP {status}, but the body broke off: {}",
                    crate::net::error_chain(&e.without_url())
                ));
            }
        }
    }
    body.truncate(BODY_LIMIT);
    if String::from_utf8_lossy(&body).contains(needle) {
        Ok(())
    } else {
        Err(format!(
            "HTTP {status}, but the body does not contain {needle:?}"
        ))
    }
}

/// `url` without a user or password, for messages.
fn without_credentials(url: &url::Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.to_string()
}

/// Runs `argv` directly (no shell), its environment only `PATH` — agentbus's secrets
/// may be in its own — and reads at most `max_output` bytes of stdout and stderr each
/// (the rest is drained, so a chatty command cannot block on a full pipe).
async fn command(name: &str, argv: &[String], max_output: usize) -> Result<(), String> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| format!("`{name}` has no argv"))?;
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("`{name}` could not start ({program}): {e}"))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (status, out, err) = tokio::join!(
        child.wait(),
        // One byte more than is kept tells that there was more.
        read_capped(stdout, max_output + 1),
        read_capped(stderr, max_output + 1)
    );
    let status = status.map_err(|e| format!("`{name}` could not be waited for: {e}"))?;
    if status.success() {
        return Ok(());
    }
    let output = [out, err]
        .iter()
        .flat_map(|o| o.lines())
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ");
    let how = match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => "was killed by a signal".to_owned(),
    };
    Err(if output.is_empty() {
        format!("`{name}` {how}")
    } else {
        format!("`{name}` {how}: {}", cut(&output, max_output))
    })
}

async fn read_capped(stream: Option<impl tokio::io::AsyncRead + Unpin>, cap: usize) -> String {
    let Some(mut stream) = stream else {
        return String::new();
    };
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// `text` cut to at most `max` bytes, on a character boundary, marked when cut.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command_probe(argv: &[&str]) -> Probe {
        Probe::Command {
            name: "t".into(),
            argv: argv.iter().map(|a| a.to_string()).collect(),
            max_output: 16,
        }
    }

    #[tokio::test]
    async fn a_command_is_up_when_it_exits_zero_and_says_why_otherwise() {
        let http = http_client();
        let second = Duration::from_secs(5);
        assert_eq!(command_probe(&["true"]).run(&http, second).await, Ok(()));
        assert_eq!(
            command_probe(&["false"]).run(&http, second).await,
            Err("`t` exited with status 1".into())
        );
        // Not a shell: the `;` is an argument of echo's, nothing runs after it.
        let err = command_probe(&["sh", "-c", "echo 0123456789abcdefghij; exit 3", "; true"])
            .run(&http, second)
            .await
            .unwrap_err();
        assert_eq!(err, "`t` exited with status 3: 0123456789abcdef…");
        let err = command_probe(&["/nonexistent/agentbus-check"])
            .run(&http, second)
            .await
            .unwrap_err();
        assert!(
            err.starts_with("`t` could not start (/nonexistent/agentbus-check): "),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_command_gets_only_path_from_the_environment() {
        let probe = Probe::Command {
            name: "t".into(),
            argv: [
                "sh",
                "-c",
                "env | cut -d= -f1 | sort | tr '\\n' ' '; exit 1",
            ]
            .map(String::from)
            .to_vec(),
            max_output: 4096,
        };
        let err = probe
            .run(&http_client(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.contains(" PATH "), "{err}");
        // The shell adds PWD (and sometimes SHLVL, _) itself; nothing else comes in.
        let names: Vec<&str> = err
            .rsplit(": ")
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        assert!(
            names
                .iter()
                .all(|n| ["PATH", "PWD", "SHLVL", "_", "OLDPWD"].contains(n)),
            "{names:?}"
        );
    }

    #[tokio::test]
    async fn a_slow_command_is_killed_at_its_timeout() {
        let err = command_probe(&["sleep", "30"])
            .run(&http_client(), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(err, "`t` did not finish within 200ms");
    }

    #[tokio::test]
    async fn http_checks_the_status_the_body_and_keep_credentials_out_of_the_error() {
        let app = axum::Router::new()
            .route("/ok", axum::routing::get(|| async { "hello" }))
            .route(
                "/moved",
                axum::routing::get(|| async { axum::response::Redirect::temporary("/ok") }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let http = http_client();
        let probe = |path: &str, expected_status: u16, body: Option<&str>| Probe::Http {
            url: url::Url::parse(&format!("{base}{path}")).unwrap(),
            expected_status,
            body_contains: body.map(str::to_owned),
        };
        let timeout = Duration::from_secs(5);
        assert_eq!(
            probe("/ok", 200, Some("ell")).run(&http, timeout).await,
            Ok(())
        );
        assert_eq!(
            probe("/ok", 200, Some("bye")).run(&http, timeout).await,
            Err("HTTP 200 OK, but the body does not contain \"bye\"".into())
        );
        assert_eq!(
            probe("/nope", 200, None).run(&http, timeout).await,
            Err("HTTP 404 Not Found".into())
        );
        // Redirects are not followed: the URL's own answer counts.
        assert_eq!(
            probe("/moved", 200, None).run(&http, timeout).await,
            Err("HTTP 307 Temporary Redirect".into())
        );
        assert_eq!(probe("/moved", 307, None).run(&http, timeout).await, Ok(()));
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let err = Probe::Http {
            url: url::Url::parse(&format!("http://probe:s3cret@127.0.0.1:{port}/")).unwrap(),
            expected_status: 200,
            body_contains: None,
        }
        .run(&http, timeout)
        .await
        .unwrap_err();
        assert!(
            err.starts_with(&format!("cannot reach http://127.0.0.1:{port}/: ")),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[tokio::test]
    async fn a_closed_port_is_down() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let probe = Probe::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        assert_eq!(
            probe.run(&http_client(), Duration::from_secs(5)).await,
            Ok(())
        );
        drop(listener);
        let err = probe
            .run(&http_client(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.starts_with(&format!("TCP 127.0.0.1:{port}: ")), "{err}");
    }
}
