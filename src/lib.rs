//! agentbus: a Matrix application service in which every AI agent is a virtual Matrix user.
//!
//! # Layout
//!
//! A message travels through the modules in this order:
//!
//! - [`appservice`] — the inbound homeserver API. `PUT /transactions/{txnId}` checks the
//!   hs_token, dedupes the txnId and journals the events durably, then answers 200 at once.
//! - [`inbox`] — per-room ordered workers that drain the journal: each event at most once,
//!   invites joined, our own users' events skipped, the rest routed and queued in the chosen
//!   agents' sessions; an event leaves the journal when its answers are done. (This glue
//!   between the journal and the agents is its own module so that neither `appservice` nor
//!   `agents` has to wait on the other.)
//! - [`router`] — pure routing: (message, room facts, agents) → `RouteDecision` with a reason.
//! - [`agents`] — the agent runtime: a lane per session (agent + room + thread), memory
//!   within a token budget, the tool loop, the answer streamed as a message plus edits.
//! - [`llm`] — streaming model providers behind one trait (OpenAI Chat Completions,
//!   Anthropic Messages, Ollama, built-in echo) and the hub above them: retries, fallbacks,
//!   concurrency caps, warm-up.
//! - [`matrix`] — the outbound client-server API as any of our users, with retries.
//! - [`store`] — durable state behind a narrow trait; sled is the embedded backend.
//! - [`config`] — `agentbus.yaml`, its defaults, env overrides and validation.
//! - [`ops`] — startup checks and, later, scheduler, monitors, metrics and the admin API.
//! - [`server`] — wires the services together and runs them until shutdown.
//! - [`client`] — the human side: a matrix-sdk client behind `agentbus say`.

pub mod agents;
pub mod appservice;
pub mod cli;
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
