//! "Who would answer?": a routing question asked without sending anything, from the CLI
//! (`agentbus route`) or the admin API. The router only defines the question and the seam;
//! the inbox answers it, because it knows the room's facts.

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::RouteDecision;

/// A routing question from the CLI or the admin API: who would answer if `sender` said
/// `text` in `room`? Nothing is sent or recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteQuery {
    /// Room ID or alias.
    pub room: String,
    /// The sender's user ID.
    pub sender: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formatted_body: Option<String>,
    /// User IDs for `m.mentions.user_ids` (as a client that inserts pills would send).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mentions: Option<Vec<String>>,
    /// `m.mentions.room` (an `@room` pill).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub room_mention: bool,
    /// The event replied to (`$…`), or directly the user whose message it was (`@…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Thread root event ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<String>,
}

/// Why a [`RouteQuery`] could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The query itself is wrong (a malformed ID, an alias that does not exist).
    #[error("{0}")]
    BadQuery(String),
}

/// Something that can answer a [`RouteQuery`] (the inbox, with live room facts).
pub trait Explain: Send + Sync {
    /// Routes `query` as a real message would be routed now, without side effects.
    fn explain<'a>(
        &'a self,
        query: &'a RouteQuery,
    ) -> BoxFuture<'a, Result<RouteDecision, ExplainError>>;
}
