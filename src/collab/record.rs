//! A task's record in the store: its mode, its status message and every finished step,
//! so a restarted process resumes it instead of starting over.

use std::collections::BTreeMap;

use ruma::OwnedEventId;
use serde::{Deserialize, Serialize};

use crate::config::TaskMode;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TaskRecord {
    /// When the task started (unix ms): its wall-clock limit counts from here, across
    /// restarts.
    pub started_ms: u64,
    /// The mode, once picked (a hybrid team's classifier is not asked twice).
    #[serde(default)]
    pub mode: Option<TaskMode>,
    /// How the mode was chosen, as the status says it.
    #[serde(default)]
    pub why: Option<String>,
    /// The status message, once posted.
    #[serde(default)]
    pub status: Option<OwnedEventId>,
    /// Finished steps, by name.
    #[serde(default)]
    pub steps: BTreeMap<String, StepRecord>,
    #[serde(default)]
    pub turns: u32,
    #[serde(default)]
    pub tokens: u64,
    /// Hand-offs between two agents (`"a b"`, the names sorted), for the ping-pong limit.
    #[serde(default)]
    pub pairs: BTreeMap<String, u32>,
    /// The task is over: a replayed request is not run again.
    #[serde(default)]
    pub ended: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StepRecord {
    pub text: String,
    #[serde(default)]
    pub events: Vec<OwnedEventId>,
    #[serde(default)]
    pub failure: Option<String>,
}

impl TaskRecord {
    pub fn new(started_ms: u64) -> Self {
        Self {
            started_ms,
            mode: None,
            why: None,
            status: None,
            steps: BTreeMap::new(),
            turns: 0,
            tokens: 0,
            pairs: BTreeMap::new(),
            ended: false,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a task record serializes")
    }

    /// The record in `bytes`; `None` (logged) when it cannot be read, and the task starts
    /// afresh.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes)
            .map_err(
                |e| tracing::warn!(error = %e, "a task record cannot be read; starting afresh"),
            )
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_what_it_wrote() {
        let mut record = TaskRecord::new(5);
        record.mode = Some(TaskMode::Pipeline);
        record.steps.insert(
            "stage:draft".into(),
            StepRecord {
                text: "v1".into(),
                events: vec![ruma::owned_event_id!("$e")],
                failure: None,
            },
        );
        record.turns = 1;
        let back = TaskRecord::decode(&record.encode()).unwrap();
        assert_eq!(back.mode, Some(TaskMode::Pipeline));
        assert_eq!(back.steps["stage:draft"].text, "v1");
        assert_eq!(back.turns, 1);
        assert!(TaskRecord::decode(b"{not json").is_none());
    }
}
