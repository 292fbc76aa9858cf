//! A task's record in the store: its mode, its status message and every finished step,
//! so a restarted process resumes it instead of starting over.

use std::collections::BTreeMap;

use ruma::OwnedEventId;
use serde::{Deserialize, Serialize};

use crate::config::{AgentId, TaskMode};
use crate::store::TaskStore;

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
    /// How many processes have run the task (1 for the first, 2 after one restart, …):
    /// part of its edits' transaction IDs, so a status said again after a restart ("resumed"
    /// after "interrupted") is a new edit, not one the homeserver deduplicates away.
    #[serde(default)]
    pub runs: u32,
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
    /// The hand-offs counted in `pairs`, so one resumed after a restart is not counted
    /// twice.
    #[serde(default)]
    pub handed: std::collections::BTreeSet<String>,
    /// A broadcast's summary, once posted: after a restart it is extended, not posted
    /// again.
    #[serde(default)]
    pub summary: Option<SummaryRecord>,
    /// The task is over: a replayed request is not run again.
    #[serde(default)]
    pub ended: bool,
    /// When it ended (unix ms): its record is forgotten once the request can no longer be
    /// redelivered (see [`Collab::prune_ended`](super::Collab::prune_ended)).
    #[serde(default)]
    pub ended_ms: u64,
}

/// A broadcast's summary as it stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SummaryRecord {
    pub event: OwnedEventId,
    /// Its text, with the late answers added so far.
    pub text: String,
    /// The agents whose answers it holds.
    pub listed: Vec<AgentId>,
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
            runs: 0,
            steps: BTreeMap::new(),
            turns: 0,
            tokens: 0,
            pairs: BTreeMap::new(),
            handed: Default::default(),
            summary: None,
            ended: false,
            ended_ms: 0,
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

/// See [`Collab::prune_ended`](super::Collab::prune_ended).
pub(crate) async fn prune_ended(tasks: &dyn TaskStore, cutoff_ms: u64) -> usize {
    let records = match tasks.tasks().await {
        Ok(records) => records,
        Err(e) => {
            tracing::warn!(error = %e, "could not list task records to prune");
            return 0;
        }
    };
    let mut pruned = 0;
    for (id, bytes) in records {
        let Some(record) = TaskRecord::decode(&bytes) else {
            continue;
        };
        if record.ended && record.ended_ms < cutoff_ms {
            match tasks.remove_task(&id).await {
                Ok(true) => pruned += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(task = %id, error = %e, "could not prune a task record"),
            }
        }
    }
    pruned
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_tasks_that_ended_before_the_cutoff_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let stores =
            crate::store::Stores::embedded(move || crate::store::FjallBackend::open(&path))
                .unwrap();
        let mut old = TaskRecord::new(1);
        (old.ended, old.ended_ms) = (true, 1_000);
        let mut recent = TaskRecord::new(1);
        (recent.ended, recent.ended_ms) = (true, 5_000);
        let running = TaskRecord::new(1);
        for (id, record) in [
            ("t:old", &old),
            ("t:recent", &recent),
            ("t:running", &running),
        ] {
            stores.tasks.save_task(id, &record.encode()).await.unwrap();
        }
        assert_eq!(prune_ended(stores.tasks.as_ref(), 2_000).await, 1);
        let left: Vec<String> = stores
            .tasks
            .tasks()
            .await
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(left, ["t:recent", "t:running"]);
    }

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
        record.summary = Some(SummaryRecord {
            event: ruma::owned_event_id!("$s"),
            text: "Answers (1 of 2)".into(),
            listed: vec![AgentId::parse("coder").unwrap()],
        });
        let back = TaskRecord::decode(&record.encode()).unwrap();
        assert_eq!(back.summary.unwrap().listed[0].as_str(), "coder");
        assert_eq!(back.mode, Some(TaskMode::Pipeline));
        assert_eq!(back.steps["stage:draft"].text, "v1");
        assert_eq!(back.turns, 1);
        assert!(TaskRecord::decode(b"{not json").is_none());
        // A record written before a field existed still reads.
        let old = TaskRecord::decode(br#"{"started_ms": 3}"#).unwrap();
        assert!(old.summary.is_none() && old.runs == 0);
    }
}
