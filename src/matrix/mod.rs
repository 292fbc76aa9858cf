//! Outbound client-server API as any of our virtual users.
//!
//! Requests are ruma request types sent over one shared reqwest client, with the as_token
//! and `?user_id=` (the appservice way of acting as a user; matrix-sdk no longer supports
//! it). Failures are classified so callers know whether to retry: network errors, 5xx and
//! `M_LIMIT_EXCEEDED` are retried here with backoff; everything else is [`MatrixError::Permanent`].
//!
//! - `client.rs` — [`MatrixClient`], the transport and what the appservice asks as itself
//!   (versions, whoami, ping, aliases).
//! - `intent.rs` — [`Intent`], the client acting as one user: register, join, profile,
//!   send, typing, members, history visibility, media. `client.intent(&user)` makes one.
//! - `retry.rs` — [`RetryPolicy`], and the until-delivered loop that waits out an outage.
//! - `error.rs` — [`MatrixError`] and [`Undelivered`]: how a request failed.
//! - [`keys`] — our protocol content keys (`io.agentbus.*`).

mod client;
mod error;
mod intent;
pub mod keys;
mod retry;

pub use client::{MatrixClient, PathInput};
pub use error::{MatrixError, Undelivered, classify_error};
pub use intent::{EventGist, Intent, StateSince};
pub use retry::{RetryPolicy, UNREACHABLE_RETRY};
