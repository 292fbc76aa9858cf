//! IRC: one connection per `bridges.irc.accounts.<id>`, through the `irc` crate (the
//! protocol, pings, flood control and nick fallbacks), over TLS when asked, with SASL
//! PLAIN when configured. Each joined channel is a portal, and so is each person who
//! writes to the nick privately. The connection comes back after any loss, with backoff.
//!
//! IRC has no message IDs and never redelivers, so an inbound message's ID is the
//! server's `msgid` tag when it sends one (IRCv3 message-tags) and else the connection's
//! start time and the message's number on it: unique, so each line is posted once.
//! Outbound, Markdown becomes plain text in lines short enough for one `PRIVMSG` each;
//! an agent's answer starts with its name, a relayed Matrix person's message already does.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use futures::StreamExt;
use irc::client::Client;
use irc::client::prelude::{Capability, Command, Response};
use irc::proto::CapSubCommand;
use irc::proto::colors::FormattedStringExt;
use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};
use tokio_util::sync::CancellationToken;

use super::{
    Addressing, BridgeState, Capabilities, Channel, Inbound, InboundMessage, OutboundMessage,
    RemoteChat, RemoteUser, SendError, TextFormat,
};
use crate::config::{ChannelId, Config, IrcAccountConfig};

/// The platform name: `bridges.irc`, and what channel bindings match on.
pub fn platform() -> ChannelId {
    ChannelId::new("irc")
}

/// The most text one `PRIVMSG` carries: 512 bytes a line, less the command, the target and
/// the `:nick!user@host` prefix the server puts in front for everyone else.
const MAX_LINE: usize = 400;
/// The longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A connection that lasted this long starts the backoff over when it drops.
const STABLE: Duration = Duration::from_secs(60);
/// How long a refused login waits before trying again (the credentials may be fixed).
const BAD_CREDENTIALS_WAIT: Duration = Duration::from_secs(300);

pub use crate::config::{is_irc_channel as is_channel, is_irc_nick as is_nick};

/// The portal key of a channel or a nick: IRC compares them case-insensitively.
fn fold(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// Markdown as IRC shows it: plain text, one paragraph, item or code line per line,
/// links with their URL, no empty lines (IRC cannot send one).
pub fn plain_text(markdown: &str) -> String {
    let mut out = String::new();
    let mut lists: Vec<Option<u64>> = Vec::new();
    let mut link: Option<(String, usize)> = None;
    let newline = |out: &mut String| {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
    };
    for event in Parser::new_ext(
        markdown,
        Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TABLES,
    ) {
        match event {
            Event::Text(text) | Event::Code(text) => out.push_str(&text),
            Event::SoftBreak => out.push(' '),
            Event::HardBreak | Event::Rule => newline(&mut out),
            Event::Start(Tag::Item) => {
                newline(&mut out);
                let depth = lists.len().saturating_sub(1);
                out.push_str(&"  ".repeat(depth));
                match lists.last_mut() {
                    Some(Some(n)) => {
                        out.push_str(&format!("{n}. "));
                        *n += 1;
                    }
                    _ => out.push_str("- "),
                }
            }
            Event::Start(Tag::List(first)) => {
                newline(&mut out);
                lists.push(first);
            }
            Event::End(TagEnd::List(_)) => {
                lists.pop();
                newline(&mut out);
            }
            Event::Start(Tag::Link { dest_url, .. }) => link = Some((dest_url.into(), out.len())),
            Event::End(TagEnd::Link) => {
                if let Some((url, at)) = link.take()
                    && out[at..] != *url
                {
                    out.push_str(&format!(" ({url})"));
                }
            }
            Event::End(
                TagEnd::Paragraph
                | TagEnd::Heading(_)
                | TagEnd::CodeBlock
                | TagEnd::BlockQuote(_)
                | TagEnd::TableRow
                | TagEnd::TableHead,
            ) => newline(&mut out),
            Event::End(TagEnd::TableCell) => out.push_str(" | "),
            Event::Html(html) | Event::InlineHtml(html) => out.push_str(&html),
            _ => {}
        }
    }
    out
}

/// `text` as the lines of `PRIVMSG`s: each line of it, cut (at a space where there is
/// one) to at most `max` bytes; empty lines dropped.
pub fn split_lines(text: &str, max: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for line in text.lines() {
        let mut rest = line.trim_end();
        while !rest.is_empty() {
            if rest.len() <= max {
                lines.push(rest.to_owned());
                break;
            }
            let mut cut = max;
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            if let Some(space) = rest[..cut].rfind(' ').filter(|&s| s > max / 2) {
                cut = space;
            }
            lines.push(rest[..cut].trim_end().to_owned());
            rest = rest[cut..].trim_start();
        }
    }
    lines
}

/// The SASL PLAIN response (RFC 4616): `authzid NUL authcid NUL password`, base64.
fn sasl_plain(username: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{username}\0{username}\0{password}"))
}

/// How a connection ended, when it was not asked to.
#[derive(Debug)]
enum Lost {
    /// The network, the server or the nick: try again soon.
    Transient(String),
    /// The server refused the login: try again much later.
    BadCredentials(String),
}

/// One IRC connection.
pub struct IrcChannel {
    account: String,
    config: IrcAccountConfig,
    password: Option<String>,
    sasl_password: Option<String>,
    /// Set while connected and registered.
    sender: Mutex<Option<irc::client::Sender>>,
    shutdown: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    this: Weak<IrcChannel>,
}

/// The value of the environment variable `name`, when set and not empty.
fn env_secret(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Every configured IRC account; one whose password variables are not set is logged and
/// left out.
pub fn channels(config: &Config) -> Vec<Arc<IrcChannel>> {
    let mut channels = Vec::new();
    for (id, account) in &config.bridges.irc.accounts {
        let password = match &account.password_env {
            Some(name) => match env_secret(name) {
                Some(password) => Some(password),
                None => {
                    tracing::error!(
                        account = id,
                        variable = name,
                        "bridges.irc: password_env names a variable that is not set; this account is not started"
                    );
                    continue;
                }
            },
            None => None,
        };
        let sasl_password = match &account.sasl {
            Some(sasl) => match env_secret(&sasl.password_env) {
                Some(password) => Some(password),
                None => {
                    tracing::error!(
                        account = id,
                        variable = sasl.password_env,
                        "bridges.irc: sasl.password_env names a variable that is not set; this account is not started"
                    );
                    continue;
                }
            },
            None => None,
        };
        channels.push(Arc::new_cyclic(|this| IrcChannel {
            account: id.clone(),
            config: account.clone(),
            password,
            sasl_password,
            sender: Mutex::new(None),
            shutdown: CancellationToken::new(),
            task: Mutex::new(None),
            this: this.clone(),
        }));
    }
    channels
}

impl IrcChannel {
    fn client_config(&self) -> irc::client::data::Config {
        let nick = &self.config.nick;
        irc::client::data::Config {
            nickname: Some(nick.clone()),
            alt_nicks: (1..=3)
                .map(|n| format!("{nick}{}", "_".repeat(n)))
                .chain((1..=9).map(|n| format!("{nick}{n}")))
                .collect(),
            username: Some(nick.clone()),
            realname: Some("agentbus".into()),
            server: Some(self.config.server.clone()),
            port: Some(self.config.port()),
            use_tls: Some(self.config.tls),
            password: self.password.clone(),
            channels: self.config.channels.clone(),
            version: Some(format!("agentbus {}", env!("CARGO_PKG_VERSION"))),
            ping_time: Some(60),
            ping_timeout: Some(30),
            // Four lines at once, then one every second or so: what servers' flood limits
            // (ngircd's penalty, Libera's) let through without throttling or a kill.
            burst_window_length: Some(4),
            max_messages_in_burst: Some(4),
            ..Default::default()
        }
    }

    /// Connects again and again until stopped.
    async fn run(self: Arc<Self>, inbound: Inbound) {
        let mut backoff = Duration::from_secs(1);
        let mut first = true;
        loop {
            // Reconnecting stays "transient_disconnect" until it is connected again.
            if std::mem::take(&mut first) {
                inbound.report(BridgeState::Connecting, None);
            }
            let began = Instant::now();
            let lost = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                lost = self.session(&inbound) => lost,
            };
            *self.sender.lock().expect("sender lock") = None;
            let wait = match lost {
                Ok(()) => return,
                Err(Lost::BadCredentials(reason)) => {
                    inbound.report(BridgeState::BadCredentials, Some(reason));
                    BAD_CREDENTIALS_WAIT
                }
                Err(Lost::Transient(reason)) => {
                    if began.elapsed() >= STABLE {
                        backoff = Duration::from_secs(1);
                    }
                    inbound.report(BridgeState::TransientDisconnect, Some(reason));
                    let wait = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    wait
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One connection, from connecting to its end: `Ok` when stopped.
    async fn session(&self, inbound: &Inbound) -> Result<(), Lost> {
        let transient = |e: irc::error::Error| Lost::Transient(e.to_string());
        let mut client = Client::from_config(self.client_config())
            .await
            .map_err(transient)?;
        let sasl = self.config.sasl.as_ref().zip(self.sasl_password.as_deref());
        if sasl.is_some() {
            // IRCv3 SASL: CAP REQ, then NICK/USER; CAP END once authenticated.
            client
                .send_cap_req(&[Capability::Sasl])
                .map_err(transient)?;
            if let Some(password) = &self.password {
                client
                    .send(Command::PASS(password.clone()))
                    .map_err(transient)?;
            }
            client
                .send(Command::NICK(self.config.nick.clone()))
                .map_err(transient)?;
            client
                .send(Command::USER(
                    self.config.nick.clone(),
                    "0".into(),
                    "agentbus".into(),
                ))
                .map_err(transient)?;
        } else {
            client.identify().map_err(transient)?;
        }
        let mut stream = client.stream().map_err(transient)?;
        let connection = crate::unix_ms();
        let mut seq: u64 = 0;
        loop {
            let message = tokio::select! {
                _ = self.shutdown.cancelled() => {
                    let _ = client.send_quit("agentbus is stopping");
                    return Ok(());
                }
                next = stream.next() => next,
            };
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(e)) => return Err(transient(e)),
                None => return Err(Lost::Transient("the server closed the connection".into())),
            };
            match &message.command {
                Command::Response(Response::RPL_WELCOME, _) => {
                    *self.sender.lock().expect("sender lock") = Some(client.sender());
                    let detail = format!("as {}", client.current_nickname());
                    inbound.report(BridgeState::Connected, Some(detail));
                }
                Command::CAP(_, CapSubCommand::ACK, _, _) if sasl.is_some() => {
                    client.send_sasl_plain().map_err(transient)?;
                }
                Command::CAP(_, CapSubCommand::NAK, _, _) if sasl.is_some() => {
                    return Err(Lost::BadCredentials(
                        "the server does not offer SASL".into(),
                    ));
                }
                Command::AUTHENTICATE(challenge) if challenge == "+" => {
                    if let Some((sasl, password)) = sasl {
                        client
                            .send_sasl(sasl_plain(&sasl.username, password))
                            .map_err(transient)?;
                    }
                }
                Command::Response(Response::RPL_SASLSUCCESS, _) => {
                    client
                        .send(Command::CAP(None, CapSubCommand::END, None, None))
                        .map_err(transient)?;
                }
                Command::Response(
                    Response::ERR_SASLFAIL | Response::ERR_SASLTOOLONG | Response::ERR_NICKLOCKED,
                    args,
                ) => {
                    return Err(Lost::BadCredentials(format!(
                        "SASL refused: {}",
                        args.last().map(String::as_str).unwrap_or("")
                    )));
                }
                Command::Response(Response::ERR_PASSWDMISMATCH, _) => {
                    return Err(Lost::BadCredentials("the server password is wrong".into()));
                }
                Command::ERROR(reason) => return Err(Lost::Transient(reason.clone())),
                Command::PRIVMSG(target, text) => {
                    let Some(from) = message.source_nickname() else {
                        continue;
                    };
                    if from.eq_ignore_ascii_case(client.current_nickname()) {
                        continue;
                    }
                    let Some(text) = inbound_text(text) else {
                        continue;
                    };
                    seq += 1;
                    let remote_id = message
                        .tags
                        .iter()
                        .flatten()
                        .find(|tag| tag.0 == "msgid")
                        .and_then(|tag| tag.1.clone())
                        .unwrap_or_else(|| format!("{connection}-{seq}"));
                    // A line to our nick is a private conversation: its portal is the sender's.
                    let chat = if is_channel(target) {
                        RemoteChat {
                            id: fold(target),
                            name: Some(target.clone()),
                        }
                    } else {
                        RemoteChat {
                            id: fold(from),
                            name: Some(from.to_owned()),
                        }
                    };
                    let private = !is_channel(target);
                    let (addressed, text) = addressing(client.current_nickname(), &text);
                    let received = inbound
                        .receive(InboundMessage {
                            account: self.account.clone(),
                            chat,
                            sender: RemoteUser {
                                id: fold(from),
                                name: Some(from.to_owned()),
                            },
                            text,
                            remote_id,
                            addressed: addressed || private,
                        })
                        .await;
                    if let Err(e) = received {
                        tracing::error!(platform = "irc", account = self.account, error = %e, "an IRC message could not be recorded and is not bridged");
                    }
                }
                _ => {}
            }
        }
    }
}

/// Whether a channel line addresses the bot, IRC style (`agentbus: hi`, `agentbus, hi`),
/// and the line without that prefix.
fn addressing(nick: &str, text: &str) -> (bool, String) {
    let prefix = text.get(..nick.len());
    if prefix.is_some_and(|p| p.eq_ignore_ascii_case(nick)) {
        let rest = &text[nick.len()..];
        if let Some(rest) = rest.strip_prefix([':', ',']) {
            return (true, rest.trim_start().to_owned());
        }
    }
    (false, text.to_owned())
}

/// What a `PRIVMSG` says, without IRC formatting: a `/me` (CTCP ACTION) as `* text`;
/// other CTCP requests (answered by the client) and empty lines are not messages.
fn inbound_text(text: &str) -> Option<String> {
    let text = match text.strip_prefix('\x01') {
        Some(ctcp) => {
            let action = ctcp.trim_end_matches('\x01').strip_prefix("ACTION ")?;
            format!("* {action}")
        }
        None => text.to_owned(),
    };
    let text = text.strip_formatting().trim().to_owned();
    (!text.is_empty()).then_some(text)
}

#[async_trait]
impl Channel for IrcChannel {
    fn platform(&self) -> ChannelId {
        platform()
    }

    fn account(&self) -> &str {
        &self.account
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            text: TextFormat::Plain,
            max_text_len: None,
            // A channel bound to an agent is that agent's conversation.
            addressing: Addressing::Every,
        }
    }

    async fn start(&self, inbound: Inbound) -> Result<(), String> {
        let this = self.this.upgrade().ok_or("the IRC account is gone")?;
        let handle = tokio::spawn(this.run(inbound));
        *self.task.lock().expect("task lock") = Some(handle);
        Ok(())
    }

    async fn stop(&self) {
        self.shutdown.cancel();
        let handle = self.task.lock().expect("task lock").take();
        if let Some(handle) = handle {
            // The QUIT goes out with the client's last flush; the task ends right after.
            let _ = tokio::time::timeout(Duration::from_secs(5), handle).await;
        }
    }

    async fn send(&self, message: &OutboundMessage) -> Result<(), SendError> {
        let sender = self.sender.lock().expect("sender lock").clone();
        let Some(sender) = sender else {
            return Err(SendError::Transient {
                reason: format!("not connected to {}", self.config.server),
                retry_after: None,
            });
        };
        let mut text = plain_text(&message.text);
        if !message.relayed {
            let name = message.sender.name.as_deref().unwrap_or(&message.sender.id);
            text = format!("{name}: {text}");
        }
        let target = &message.chat.id;
        let max = MAX_LINE.saturating_sub(target.len()).max(64);
        for line in split_lines(&text, max) {
            sender
                .send_privmsg(target, line)
                .map_err(|e| SendError::Transient {
                    reason: e.to_string(),
                    retry_after: None,
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nicks_and_channels_are_checked_as_rfc_2812_has_them() {
        for nick in ["agentbus", "a", "[bot]", "d4mon-2", "x_y^z"] {
            assert!(is_nick(nick), "{nick}");
        }
        for nick in ["", "1bot", "-x", "a b", "bot!", &"n".repeat(31)] {
            assert!(!is_nick(nick), "{nick:?}");
        }
        for channel in ["#agentbus", "&local", "#a.b-c"] {
            assert!(is_channel(channel), "{channel}");
        }
        for channel in ["#", "agentbus", "#a b", "#a,b", "#a:b"] {
            assert!(!is_channel(channel), "{channel:?}");
        }
    }

    #[test]
    fn markdown_becomes_plain_lines() {
        let text = plain_text(
            "# Plan\n\nFirst **bold** and `code`, see [the docs](https://x.org/d).\n\n\
             - one\n- two\n\n1. a\n2. b\n\n```\nfn main() {}\nlet x = 1;\n```\n",
        );
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "Plan",
                "First bold and code, see the docs (https://x.org/d).",
                "- one",
                "- two",
                "1. a",
                "2. b",
                "fn main() {}",
                "let x = 1;",
            ]
        );
        assert_eq!(
            plain_text("<https://x.org>").trim(),
            "https://x.org",
            "an autolink is not repeated"
        );
    }

    #[test]
    fn long_lines_are_cut_at_spaces_within_the_limit() {
        let long = "word ".repeat(30);
        let lines = split_lines(&format!("{long}\n\n\nshort"), 40);
        assert!(lines.iter().all(|l| l.len() <= 40 && !l.is_empty()));
        assert!(
            lines
                .iter()
                .all(|l| !l.starts_with(' ') && !l.ends_with(' '))
        );
        assert_eq!(lines.last().unwrap(), "short");
        assert_eq!(
            lines[..lines.len() - 1].join(" "),
            long.trim_end(),
            "nothing is lost"
        );
        // No space to cut at, and multi-byte characters: cut on a character boundary.
        let lines = split_lines(&"é".repeat(30), 15);
        assert!(lines.iter().all(|l| l.len() <= 15));
        assert_eq!(lines.concat(), "é".repeat(30));
    }

    #[test]
    fn ctcp_actions_are_messages_and_formatting_is_dropped() {
        assert_eq!(
            inbound_text("\x01ACTION waves\x01").as_deref(),
            Some("* waves")
        );
        assert_eq!(inbound_text("\x01VERSION\x01"), None);
        assert_eq!(
            inbound_text("\x02bold\x02 and \x0304red\x03").as_deref(),
            Some("bold and red")
        );
        assert_eq!(inbound_text("  \x02\x02 "), None);
    }

    #[test]
    fn a_line_starting_with_the_nick_addresses_the_bot() {
        assert_eq!(
            addressing("agentbus_", "AgentBus_: help me"),
            (true, "help me".to_owned())
        );
        assert_eq!(
            addressing("agentbus", "agentbus, hi"),
            (true, "hi".to_owned())
        );
        assert_eq!(
            addressing("agentbus", "agentbusy: hi"),
            (false, "agentbusy: hi".to_owned())
        );
        assert_eq!(
            addressing("agentbus", "hi all"),
            (false, "hi all".to_owned())
        );
    }

    #[test]
    fn sasl_plain_is_rfc_4616() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(sasl_plain("bot", "s3cret"))
            .unwrap();
        assert_eq!(decoded, b"bot\0bot\0s3cret");
    }
}
