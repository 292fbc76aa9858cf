//! agentbus: a Matrix application service in which every AI agent is a virtual Matrix user.
//!
//! # Layout
//!
//! A message travels through the modules in this order:
//!
//! - [`appservice`] — the inbound homeserver API. `PUT /transactions/{txnId}` checks the
//!   hs_token, waits while the inbox's backlog is full (back-pressure), journals the
//!   events durably — each event_id once, whatever carries it — and answers 200.
//! - [`store`] — durable state, one async trait per concern: the journal with its partition
//!   leases, dedupe and sent-message records (`JournalStore`), room history, sessions,
//!   pairing; the feed to the inbox ([`store::feed`]). [`store::open`] builds the backend
//!   `store.backend` names: fjall (default) or sled, embedded, through
//!   [`store::embedded`]; `lease.rs` the partitions, `fjall.rs` / `sled.rs` the engines,
//!   `log.rs` fjall's journal (an append-only segment log with the dedupe window),
//!   [`store::private`] the data directory's modes (0700 / 0600, umask 077).
//! - [`inbox`] — per-room ordered workers over the journal: replay first, then what the
//!   feed brings; each event decoded once into a typed value, then the stages in order:
//!   the bridges' relay hook, commands (`!reset`), the room's facts (members, aliases,
//!   replied-to sender: cached), routing, and the chosen agents' jobs; an event leaves
//!   the journal when its answers are delivered.
//! - [`router`] — pure routing: (message, room facts, recent lines) → `RouteDecision` with
//!   a reason; the [`router::explain`] seam answers "who would answer?".
//! - [`agents`] — the agent runtime: a lane per session (agent + room + thread), memory
//!   within a token budget, the tool loop, the answer streamed as a message plus edits
//!   with replay-safe transaction IDs, and everything an agent says; the built-in tools
//!   ([`agents::tools`]), one file per tool. A run takes a job (`agents::Job`: session,
//!   inputs, why it runs, where the answer goes) and returns an `agents::Outcome` (text,
//!   event IDs, usage, how it ended); its `agents::RunHandle` cancels it.
//! - [`llm`] — streaming model providers behind one trait and the hub above them; the API
//!   key redacted from every error ([`llm::redact`]).
//! - [`bridges`] — other platforms in the same rooms: each remote chat a portal room,
//!   each remote user a puppet; what arrives is recorded, then posted by its puppet (and
//!   flows through the appservice like any event); agents' final answers and Matrix
//!   people's messages in a portal go out through the inbox's relay seam. The generic
//!   signed webhook ([`bridges::webhook`]), Slack's Events API ([`bridges::slack`]) and
//!   Telegram bots ([`bridges::telegram`], by webhook or long polling) on a listener of
//!   their own; IRC networks ([`bridges::irc`]) over a connection each.
//! - [`matrix`] — the outbound client-server API as any of our users (an
//!   [`matrix::Intent`] each), with retries, and our protocol keys ([`matrix::keys`]).
//! - [`render`] — Markdown → Matrix HTML, and answers split to fit events; Markdown →
//!   Slack's mrkdwn ([`render::mrkdwn`]) and Telegram's HTML ([`render::telegram`]).
//! - [`net`] — HTTP plumbing: error chains, Matrix error bodies for every error answer,
//!   bearer tokens and their digests, throttled log lines; the listener
//!   ([`net::listener`]: hyper with header-read and idle timeouts, a connection cap, the
//!   open-file limit raised); the address guard that keeps model-steered requests on the
//!   public internet, and HTML as text.
//! - [`config`] — `agentbus.yaml`, its defaults, env overrides and validation.
//! - [`ops`] — startup checks, the admin API, `/health` `/ready` `/metrics`, management
//!   commands, the scheduler (tasks, heartbeats) and the health monitors that alert a room.
//! - [`server`] — the composition root: builds every service once, serves HTTP, runs the
//!   workers on one task tracker, drains on shutdown.
//! - [`cli`] — the command-line clients: `say` (a matrix-sdk human), `route`, `pairing`,
//!   `check`.
//!
//! `tests/module_edges.rs` holds the `use crate::` edges between these to the design's table.

pub mod agents;
pub mod appservice;
pub mod bridges;
pub mod cli;
pub mod collab;
pub mod config;
pub mod inbox;
pub mod llm;
pub mod matrix;
pub mod net;
pub mod ops;
pub mod render;
pub mod router;
pub mod server;
pub mod store;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
