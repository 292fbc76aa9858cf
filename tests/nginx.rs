//! The shipped nginx config (`nginx/`) in front of a real Synapse and the real `agentbus`
//! binary, served by Debian's nginx: `nginx -t` accepts it, a person logs in and talks to
//! an agent through its TLS listener, and what must stay private stays private.
//!
//! The config is rendered for loopback ports — the listeners, the upstreams, the host name,
//! a certificate made here with `openssl` — and is otherwise the committed text: every
//! substitution must find what it replaces, so a changed config fails here rather than
//! being tested in a form nobody ships.
//!
//! Needs nginx (`scripts/test.sh` installs Debian's `nginx-light`); fails saying so
//! otherwise.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::{ADMIN_TOKEN, Agentbus, Human, agent_id, die_with_parent, exclusive, free_port};

const NO_NGINX: &str = "nginx is not installed: run scripts/test.sh (it installs Debian's \
                        nginx-light), or `apt-get install nginx-light`, or set NGINX to the binary";

/// The nginx binary: `$NGINX`, else `nginx` on the PATH, else Debian's /usr/sbin/nginx
/// (not on a normal user's PATH).
fn nginx_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NGINX") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{NO_NGINX}"))
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `text` with every `(from, to)` replaced; panics naming `file` if one is not there.
fn render(file: &str, text: String, substitutions: &[(&str, String)]) -> String {
    substitutions.iter().fold(text, |text, (from, to)| {
        assert!(
            text.contains(from),
            "{file} no longer contains {from:?}; update the rendering in tests/nginx.rs"
        );
        text.replace(from, to)
    })
}

fn run(command: &mut Command) -> std::process::Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A certificate authority and a certificate for localhost / 127.0.0.1 it signed, in
/// `dir`; returns the CA's PEM.
fn make_certificates(dir: &Path) -> Vec<u8> {
    let openssl = |args: &[&str]| run(Command::new("openssl").args(args).current_dir(dir));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=agentbus test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "key.pem",
        "-out",
        "cert.csr",
    ]);
    std::fs::write(
        dir.join("cert.ext"),
        "basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\n\
         subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "cert.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-set_serial",
        "1",
        "-days",
        "2",
        "-extfile",
        "cert.ext",
        "-out",
        "cert.pem",
    ]);
    std::fs::read(dir.join("ca.pem")).unwrap()
}

/// The shipped config, rendered into a private nginx prefix.
struct Rendered {
    dir: tempfile::TempDir,
    /// The TLS listener, as clients and the well-known file name it.
    public_url: String,
    /// The plain-HTTP listener (ACME and the redirect to https).
    http_url: String,
    ca: Vec<u8>,
}

impl Rendered {
    /// Renders `nginx/` for a homeserver and an agentbus on these loopback ports.
    fn new(homeserver_port: u16, agentbus_port: u16, bridges_port: u16) -> Rendered {
        let dir = tempfile::tempdir().unwrap();
        // Run as root, nginx's workers are `nobody`: they must reach the temp paths.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let root = dir.path();
        let ca = make_certificates(root);
        let (https_port, http_port) = (free_port(), free_port());
        let public_url = format!("https://localhost:{https_port}");
        let conf = root.join("conf");
        std::fs::create_dir_all(conf.join("agentbus")).unwrap();
        let at = |name: &str| root.join(name).display().to_string();

        let site = render(
            "nginx/agentbus.conf",
            repo_file("nginx/agentbus.conf"),
            &[
                (
                    "/etc/letsencrypt/live/matrix.example.org/fullchain.pem",
                    at("cert.pem"),
                ),
                (
                    "/etc/letsencrypt/live/matrix.example.org/privkey.pem",
                    at("key.pem"),
                ),
                ("https://matrix.example.org", public_url.clone()),
                ("matrix.example.org:443", format!("localhost:{https_port}")),
                (
                    "server_name matrix.example.org;",
                    "server_name localhost;".into(),
                ),
                ("listen 80;", format!("listen 127.0.0.1:{http_port};")),
                ("listen [::]:80;", String::new()),
                (
                    "listen 443 ssl http2;",
                    format!("listen 127.0.0.1:{https_port} ssl http2;"),
                ),
                ("listen [::]:443 ssl http2;", String::new()),
                // One webhook request a minute and a burst of 2: the limit shows within
                // a few requests however slow the machine.
                ("rate=10r/s", "rate=1r/m".into()),
            ],
        );
        let locations = render(
            "nginx/agentbus/locations.conf",
            repo_file("nginx/agentbus/locations.conf"),
            &[("burst=20", "burst=2".into())],
        );
        let upstreams = render(
            "nginx/agentbus/upstreams.conf",
            repo_file("nginx/agentbus/upstreams.conf"),
            &[
                (
                    "server 127.0.0.1:8008;",
                    format!("server 127.0.0.1:{homeserver_port};"),
                ),
                (
                    "server 127.0.0.1:9000;",
                    format!("server 127.0.0.1:{agentbus_port};"),
                ),
                (
                    "server 127.0.0.1:9010;",
                    format!("server 127.0.0.1:{bridges_port};"),
                ),
            ],
        );
        std::fs::write(conf.join("agentbus.conf"), site).unwrap();
        std::fs::write(conf.join("agentbus/locations.conf"), locations).unwrap();
        std::fs::write(conf.join("agentbus/upstreams.conf"), upstreams).unwrap();
        // What Debian's /etc/nginx/nginx.conf provides around conf.d/, with every path
        // in the prefix.
        std::fs::write(
            conf.join("nginx.conf"),
            format!(
                "worker_processes 1;\n\
                 pid {pid};\n\
                 error_log {log} info;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n\
                     access_log {access};\n\
                     client_body_temp_path {tmp}/body;\n\
                     proxy_temp_path {tmp}/proxy;\n\
                     fastcgi_temp_path {tmp}/fastcgi;\n\
                     uwsgi_temp_path {tmp}/uwsgi;\n\
                     scgi_temp_path {tmp}/scgi;\n\
                     include agentbus.conf;\n\
                 }}\n",
                pid = at("nginx.pid"),
                log = at("error.log"),
                access = at("access.log"),
                tmp = root.display(),
            ),
        )
        .unwrap();
        Rendered {
            dir,
            public_url,
            http_url: format!("http://127.0.0.1:{http_port}"),
            ca,
        }
    }

    fn command(&self) -> Command {
        let root = self.dir.path();
        let mut command = Command::new(nginx_binary());
        command
            .arg("-p")
            .arg(root)
            .arg("-c")
            .arg(root.join("conf/nginx.conf"))
            .arg("-e")
            .arg(root.join("error.log"));
        command
    }

    /// `nginx -t`: returns what it said, panicking unless it passed.
    fn test(&self) -> String {
        let output = self
            .command()
            .arg("-t")
            .output()
            .unwrap_or_else(|e| panic!("{NO_NGINX} ({e})"));
        let said = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "nginx -t failed:\n{said}");
        said
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

/// nginx in the foreground with the rendered config, stopped on drop.
struct Nginx {
    config: Rendered,
    child: Child,
    /// Trusts the test CA; never follows redirects.
    http: reqwest::Client,
}

impl Nginx {
    async fn start(config: Rendered) -> Nginx {
        config.test();
        let mut command = config.command();
        command
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{NO_NGINX} ({e})"));
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&config.ca).unwrap())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let mut nginx = Nginx {
            config,
            child,
            http,
        };
        let probe = format!("{}/.well-known/matrix/server", nginx.config.public_url);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = nginx.child.try_wait().unwrap() {
                panic!("nginx exited with {status}:\n{}", nginx.config.log());
            }
            if nginx.http.get(&probe).send().await.is_ok() {
                return nginx;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nginx did not answer {probe} within 30 s:\n{}",
                nginx.config.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.config.public_url)
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: a fast shutdown of the master and its workers.
        // SAFETY: kill with a PID we own and a valid signal touches no memory.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- nginx error log ----\n{}", self.config.log());
        }
    }
}

const ECHO_AGENT: &str = r#"
providers: { echo: { api: echo } }
agents: [ { id: damon, display_name: Damon, provider: echo } ]
channels: { matrix: { dm_policy: allowlist, allow_from: ["@*:localhost"] } }
"#;

/// agentbus on the test Synapse, and nginx in front of both.
async fn stack() -> (Agentbus, Nginx) {
    let synapse = support::synapse();
    let bridges_port = support::free_port();
    let mut bus = Agentbus::configured(Agentbus::write_config_text(&format!(
        "{ECHO_AGENT}bridges:\n  listen: \"127.0.0.1:{bridges_port}\"\n  webhook: {{ accounts: {{ \
         default: {{ secret_env: AGENTBUS_NGINX_WEBHOOK_SECRET, outbound_url: \"http://127.0.0.1:9/\" }} }} }}\n"
    )));
    bus.set_env("AGENTBUS_NGINX_WEBHOOK_SECRET", "nginx-test-secret");
    bus.spawn().await;
    bus.wait_log(&["bridges listening"]).await;
    let homeserver_port = synapse
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the test Synapse's URL ends in its port");
    let nginx = Nginx::start(Rendered::new(
        homeserver_port,
        synapse.appservice_port,
        bridges_port,
    ))
    .await;
    (bus, nginx)
}

#[test]
fn nginx_t_accepts_the_shipped_config() {
    let said = Rendered::new(8008, 9000, 9010).test();
    assert!(
        said.contains("test is successful"),
        "nginx -t said:\n{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_logged_in_through_nginx_talks_to_an_agent() {
    let _one_at_a_time = exclusive().await;
    let (_bus, nginx) = stack().await;
    let alice = Human::new_with(
        "alice",
        matrix_sdk::Client::builder()
            .homeserver_url(&nginx.config.public_url)
            .add_root_certificates(vec![
                reqwest::Certificate::from_pem(&nginx.config.ca).unwrap(),
            ]),
    )
    .await;
    assert_eq!(
        alice.client.homeserver().as_str().trim_end_matches('/'),
        nginx.config.public_url,
        "the client talks to nginx, not to Synapse"
    );

    let dm = alice.dm_with("damon").await;
    let question = alice.send(&dm, "hello through the proxy").await;
    let reply = alice.wait_reply(&dm, "damon", &question).await;
    let reply = alice.wait_final(&reply).await;
    assert_eq!(reply.sender, agent_id("damon"));
    assert_eq!(reply.body(), "echo: hello through the proxy");

    // Every request of that conversation went through nginx's TLS listener.
    let access = std::fs::read_to_string(nginx.config.dir.path().join("access.log")).unwrap();
    for path in [
        "/_matrix/client/v3/login",
        "/_matrix/client/v3/sync",
        "/createRoom",
    ] {
        assert!(
            access.contains(path),
            "nginx's access log has no {path}:\n{access}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_serves_discovery_passes_webhooks_and_keeps_the_admin_api_private() {
    let _one_at_a_time = exclusive().await;
    let (bus, nginx) = stack().await;

    // Discovery: the public URL, and Element told to start rooms unencrypted.
    let response = nginx
        .http
        .get(nginx.url("/.well-known/matrix/client"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let client: Value = response.json().await.unwrap();
    assert_eq!(client["m.homeserver"]["base_url"], nginx.config.public_url);
    assert_eq!(client["io.element.e2ee"]["default"], false);
    let (status, server) = nginx.get("/.well-known/matrix/server").await;
    assert_eq!(status, 200);
    let server: Value = serde_json::from_str(&server).unwrap();
    assert_eq!(
        server["m.server"],
        nginx.config.public_url.trim_start_matches("https://")
    );

    // The homeserver's API is behind it.
    let (status, versions) = nginx.get("/_matrix/client/versions").await;
    assert_eq!(status, 200, "{versions}");
    assert!(versions.contains("\"versions\""), "{versions}");

    // The admin API answers directly with its token, and not at all through nginx.
    let direct = nginx
        .http
        .get(format!("{}/api/v1/pairing", bus.url()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 200, "the admin API answers directly");
    let proxied = nginx
        .http
        .get(nginx.url("/api/v1/pairing"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(proxied.status(), 403, "the admin API is not public");
    for private in [
        "/metrics",
        "/ready",
        "/health",
        "/_synapse/admin/v1/server_version",
    ] {
        assert_eq!(nginx.get(private).await.0, 403, "{private} is not public");
    }

    // The plain listener sends people to https.
    let redirect = nginx
        .http
        .get(format!("{}/_matrix/client/versions", nginx.config.http_url))
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status(), 301);
    assert!(
        redirect.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("https://"),
        "{:?}",
        redirect.headers()["location"]
    );

    // Webhooks reach agentbus's bridges listener (its own JSON 404: no Telegram bridge is
    // configured), a body over the limit is refused by nginx, and a burst past the rate
    // limit gets 429.
    let (status, body) = nginx.get("/bridges/telegram/default").await;
    assert_eq!(status, 404);
    assert!(
        body.contains("M_UNRECOGNIZED"),
        "answered by agentbus, not nginx: {body}"
    );
    let oversized = nginx
        .http
        .post(nginx.url("/bridges/webhook/default"))
        .body(vec![b'x'; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(oversized.status(), 413);
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let status = nginx.get("/bridges/telegram/default").await.0;
        statuses.push(status);
        if status == 429 {
            break;
        }
    }
    assert_eq!(
        statuses.last(),
        Some(&429),
        "no 429 from the webhook rate limit: {statuses:?}"
    );
    assert!(
        statuses[..statuses.len() - 1].iter().all(|s| *s == 404),
        "{statuses:?}"
    );
}
