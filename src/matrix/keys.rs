//! Our own content keys (`io.agentbus.*`), set on what agents send and read back from
//! what arrives. A leaf: every module that speaks them names them from here.

/// The agent-to-agent hop counter an answer carries: one more than what it answers.
pub const HOPS_KEY: &str = "io.agentbus.hops";

/// Marks a message whose text is still streaming; the final edit drops it, so bridges and
/// bots can wait for the whole answer.
pub const STREAMING_KEY: &str = "io.agentbus.streaming";

/// Marks what a team posts for a task (hand-offs, status, summaries) with the task's ID:
/// such a message is the task's own, and never routed as a new request, even where
/// agents may talk to each other.
pub const TASK_KEY: &str = "io.agentbus.task";
