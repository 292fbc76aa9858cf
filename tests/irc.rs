//! The IRC bridge end to end: Debian's ngircd (a real IRC server, started here on a
//! loopback port), the real binary, a real Synapse, a person on Matrix and people on IRC
//! speaking the protocol over their own TCP connections. A line in the channel appears in
//! the portal from its puppet, the bound agent answers, and the answer appears in the
//! channel from the bot — whose nick was taken, so it uses its fallback; a Matrix person is
//! relayed with their name; after the IRC server goes down and comes back, the bridge is
//! back by itself.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use support::{
    ADMIN_TOKEN, Agentbus, Human, LlmMode, LlmStub, SERVER_NAME, WAIT, agent_id, exclusive,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Notify;

const CHANNEL: &str = "#agentbus";

fn ngircd_binary() -> PathBuf {
    ["/usr/sbin/ngircd", "/usr/bin/ngircd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("ngircd is not installed: scripts/test.sh installs it (apt-get install ngircd)")
}

/// ngircd in the foreground on `port`, with a config of its own.
struct Ngircd {
    child: Child,
    _dir: tempfile::TempDir,
    port: u16,
}

impl Ngircd {
    async fn start(port: u16) -> Ngircd {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("ngircd.conf");
        std::fs::write(
            &conf,
            format!(
                "[Global]\n\tName = irc.agentbus.test\n\tInfo = agentbus tests\n\t\
                 Listen = 127.0.0.1\n\tPorts = {port}\n\tMotdPhrase = \"agentbus tests\"\n\
                 [Limits]\n\tMaxNickLength = 30\n\
                 [Options]\n\tDNS = no\n\tIdent = no\n\tPAM = no\n"
            ),
        )
        .unwrap();
        // ngircd opens the config again as `nobody` after dropping root.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let mut command = Command::new(ngircd_binary());
        command
            .args(["--nodaemon", "--config"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        support::die_with_parent(&mut command);
        let child = command.spawn().expect("ngircd starts");
        let server = Ngircd {
            child,
            _dir: dir,
            port,
        };
        // Ready when it accepts a connection.
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "ngircd never listened on {port}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    fn kill(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for Ngircd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `PRIVMSG` someone on IRC received: from which nick, to which target, what.
#[derive(Debug, Clone)]
struct Line {
    from: String,
    target: String,
    text: String,
}

/// A person on IRC: registers, answers pings, records every `PRIVMSG` and `JOIN`. Every
/// line it writes goes through one writer task, pongs included.
struct IrcPerson {
    nick: String,
    writer: tokio::sync::mpsc::UnboundedSender<String>,
    said: Arc<Mutex<Vec<Line>>>,
    joins: Arc<Mutex<Vec<(String, String)>>>,
    arrived: Arc<Notify>,
}

impl IrcPerson {
    /// Connects as `nick` and waits for the welcome.
    async fn connect(port: u16, nick: &str) -> IrcPerson {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (reader, mut write_half) = stream.into_split();
        let (writer, mut outgoing) = tokio::sync::mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(line) = outgoing.recv().await {
                if write_half.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        let said = Arc::new(Mutex::new(Vec::new()));
        let joins = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Notify::new());
        let (welcome_tx, welcome_rx) = tokio::sync::oneshot::channel();
        {
            let (said, joins, arrived) = (said.clone(), joins.clone(), arrived.clone());
            let pongs = writer.clone();
            tokio::spawn(async move {
                let mut welcome = Some(welcome_tx);
                let mut lines = BufReader::new(reader).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let (prefix, rest) = match line.strip_prefix(':') {
                        Some(rest) => rest.split_once(' ').unwrap_or((rest, "")),
                        None => ("", line.as_str()),
                    };
                    let from = prefix.split('!').next().unwrap_or("").to_owned();
                    let (command, args) = rest.split_once(' ').unwrap_or((rest, ""));
                    match command {
                        "PING" => {
                            let _ = pongs.send(format!("PONG {args}\r\n"));
                        }
                        "001" => {
                            if let Some(tx) = welcome.take() {
                                let _ = tx.send(());
                            }
                        }
                        "PRIVMSG" => {
                            let (target, text) = args.split_once(" :").unwrap_or((args, ""));
                            said.lock().unwrap().push(Line {
                                from,
                                target: target.to_owned(),
                                text: text.to_owned(),
                            });
                            arrived.notify_waiters();
                        }
                        "JOIN" => {
                            let channel = args.trim_start_matches(':').to_owned();
                            joins.lock().unwrap().push((from, channel));
                            arrived.notify_waiters();
                        }
                        _ => {}
                    }
                }
            });
        }
        writer
            .send(format!("NICK {nick}\r\nUSER {nick} 0 * :{nick}\r\n"))
            .unwrap();
        tokio::time::timeout(WAIT, welcome_rx)
            .await
            .expect("the IRC server welcomes")
            .expect("the connection stays up");
        IrcPerson {
            nick: nick.to_owned(),
            writer,
            said,
            joins,
            arrived,
        }
    }

    fn raw(&self, line: &str) {
        self.writer.send(line.to_owned()).unwrap();
    }

    async fn join(&self, channel: &str) {
        self.raw(&format!("JOIN {channel}\r\n"));
        let nick = self.nick.clone();
        self.wait_join(&nick, channel).await;
    }

    fn say(&self, target: &str, text: &str) {
        self.raw(&format!("PRIVMSG {target} :{text}\r\n"));
    }

    /// Waits until `nick` has joined `channel` (as this person saw it).
    async fn wait_join(&self, nick: &str, channel: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let arrived = self.arrived.notified();
            if self
                .joins
                .lock()
                .unwrap()
                .iter()
                .any(|(who, to)| who.eq_ignore_ascii_case(nick) && to.eq_ignore_ascii_case(channel))
            {
                return;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !left.is_zero(),
                "{nick} never joined {channel}; joins seen: {:?}",
                self.joins.lock().unwrap()
            );
            let _ = tokio::time::timeout(left, arrived).await;
        }
    }

    /// Waits for a `PRIVMSG` this person received that matches.
    async fn wait_said(&self, what: &str, matches: impl Fn(&Line) -> bool) -> Line {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let arrived = self.arrived.notified();
            if let Some(line) = self.said.lock().unwrap().iter().find(|l| matches(l)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !left.is_zero(),
                "{} never received {what}; received {:?}",
                self.nick,
                self.said.lock().unwrap()
            );
            let _ = tokio::time::timeout(left, arrived).await;
        }
    }

    fn said(&self) -> Vec<Line> {
        self.said.lock().unwrap().clone()
    }
}

/// agentbus's `/ready`, as JSON.
async fn readiness(bus: &Agentbus) -> Value {
    reqwest::get(format!("{}/ready", bus.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_irc_channel_is_a_portal_both_ways_and_the_bridge_comes_back_after_the_server_does() {
    let _one_at_a_time = exclusive().await;
    let irc = Ngircd::start(support::free_port()).await;
    // Someone holds the bot's nick: the bridge must take its fallback.
    let squatter = IrcPerson::connect(irc.port, "agentbus").await;
    let carol = IrcPerson::connect(irc.port, "carol").await;
    carol.join(CHANNEL).await;

    let llm = LlmStub::start(LlmMode::Answer).await;
    let alice = Human::new("alice").await;
    let dir = Agentbus::write_config(&llm.url);
    let path = dir.path().join("agentbus.yaml");
    let config = std::fs::read_to_string(&path).unwrap().replace(
        &format!("admin: {{ token: {ADMIN_TOKEN} }}"),
        &format!(
            "admin: {{ token: {ADMIN_TOKEN}, users: [\"{}\"] }}",
            alice.user_id
        ),
    );
    assert!(config.contains("users: ["), "the admin key is where it was");
    std::fs::write(
        &path,
        format!(
            "{config}\nbridges:\n  irc:\n    accounts:\n      local:\n        server: 127.0.0.1\n        \
             port: {}\n        nick: agentbus\n        channels: [\"{CHANNEL}\"]\n        \
             agent: damon\n        invite: [\"{}\"]\n",
            irc.port, alice.user_id
        ),
    )
    .unwrap();
    let mut bus = Agentbus::configured(dir);
    bus.spawn().await;
    bus.wait_log(&["bridge state", "connected", "as agentbus_"])
        .await;
    carol.wait_join("agentbus_", CHANNEL).await;
    let ready = readiness(&bus).await;
    assert_eq!(
        ready["checks"]["bridges"]["accounts"]["irc/local"]["state"], "connected",
        "{ready}"
    );
    assert_eq!(ready["checks"]["bridges"]["ok"], true, "{ready}");
    // alice is an admin: the room she invites the bot to is a management room, where
    // bridge state changes are posted.
    let bot = agent_id("agentbus");
    let manage = alice.create_room(&["agentbus"], true).await;
    alice.wait_joined(&manage, &bot).await;
    alice.send(&manage, "!status").await;
    let status = alice
        .wait_for("the bot's !status", |s| {
            s.room_id == manage && s.sender == bot && s.body().starts_with("✅ ready")
        })
        .await;
    assert!(
        status
            .body()
            .contains("✓ bridge irc/local: connected — as agentbus_"),
        "{}",
        status.body()
    );

    // A line in the channel: a portal (alice, the account's follower, is invited) where
    // carol's puppet says it, and damon, the account's agent, answers it.
    carol.say(CHANNEL, "hello from irc");
    let portal = alice.join_next_invite(&[]).await;
    let puppet = format!("@_bridge_irc_carol:{SERVER_NAME}");
    let said = alice
        .wait_for("carol's line from her puppet", |s| {
            s.room_id == portal && s.sender.as_str() == puppet && s.body() == "hello from irc"
        })
        .await;
    let member = alice
        .client
        .get_room(&portal)
        .unwrap()
        .get_member(&said.sender)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(member.display_name(), Some("carol"));
    let answer = alice
        .wait_for("damon's answer in the portal", |s| {
            s.room_id == portal && s.sender == agent_id("damon") && s.edits().is_none()
        })
        .await;
    let answer = alice.wait_final(&answer).await;
    assert!(
        answer.body().contains("hello from irc"),
        "{}",
        answer.body()
    );

    // The answer appears in the channel from the bot's nick, with damon's name.
    let line = carol
        .wait_said("damon's answer", |l| l.from == "agentbus_")
        .await;
    assert_eq!(line.target, CHANNEL);
    assert_eq!(line.text, format!("Damon: {}", answer.body()));

    // A Matrix person in the portal is relayed with their name.
    alice.send(&portal, "I'll take this one").await;
    let relayed = carol
        .wait_said("alice's relayed line", |l| {
            l.from == "agentbus_" && l.text.ends_with(": I'll take this one")
        })
        .await;
    assert_eq!(
        relayed.text,
        format!("{}: I'll take this one", alice.localpart)
    );

    // The IRC server goes away and comes back on the same port: the bridge reconnects by
    // itself (the nick is free now) and bridges again.
    drop(squatter);
    drop(carol);
    let port = irc.kill();
    bus.wait_log(&["bridge state", "transient_disconnect"])
        .await;
    let lost = alice
        .wait_for("the disconnect notice in the management room", |s| {
            s.room_id == manage && s.sender == bot && s.body().contains("transient_disconnect")
        })
        .await;
    assert!(
        lost.body()
            .starts_with("⚠️ Bridge irc (local): transient_disconnect"),
        "{}",
        lost.body()
    );
    let ready = readiness(&bus).await;
    assert_eq!(
        ready["status"], "ready",
        "one platform down is not critical: {ready}"
    );
    assert_eq!(ready["checks"]["bridges"]["ok"], false, "{ready}");
    assert_eq!(
        ready["checks"]["bridges"]["accounts"]["irc/local"]["state"], "transient_disconnect",
        "{ready}"
    );
    let _irc = Ngircd::start(port).await;
    let dave = IrcPerson::connect(port, "dave").await;
    dave.join(CHANNEL).await;
    dave.wait_join("agentbus", CHANNEL).await;
    dave.say(CHANNEL, "back again");
    alice
        .wait_for("dave's line after the reconnect", |s| {
            s.room_id == portal
                && s.sender.as_str() == format!("@_bridge_irc_dave:{SERVER_NAME}")
                && s.body() == "back again"
        })
        .await;
    let again = dave
        .wait_said("damon's answer after the reconnect", |l| {
            l.from == "agentbus" && l.text.contains("back again")
        })
        .await;
    assert!(again.text.starts_with("Damon: "), "{}", again.text);
    alice
        .wait_for("the reconnected notice", |s| {
            s.room_id == manage
                && s.sender == bot
                && s.body().starts_with("✅ Bridge irc (local): connected")
        })
        .await;
    assert!(
        alice
            .seen(|s| s.room_id == portal && s.body().contains("Bridge irc"))
            .is_empty(),
        "state notices stay out of the portals"
    );

    // Each line was bridged once: the portal holds carol's line once, and nobody's
    // message went back out to IRC but damon's answers and alice's line.
    let bodies: Vec<String> = alice
        .seen(|s| s.room_id == portal)
        .iter()
        .map(|s| s.body().to_owned())
        .collect();
    assert_eq!(
        bodies.iter().filter(|b| *b == "hello from irc").count(),
        1,
        "{bodies:?}"
    );
    assert!(
        dave.said().iter().all(|l| l.from == "agentbus"),
        "{:?}",
        dave.said()
    );
}
