//! `broadcast`: every worker (whose topics the request touches) answers on its own, in
//! the thread; after `broadcast.timeout` the team posts one summary linking each answer
//! (`concat`, `vote`, or the coordinator's `ranked_merge`), marking who is still missing
//! as late. A late answer still appears, and is added to the summary when it comes.

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use std::time::Duration;

use super::plan::{self, Entry};
use super::record::SummaryRecord;
use super::{Collab, Done, End, Step, Task};
use crate::config::{AgentId, Merger};

pub(super) async fn run(collab: &Collab, task: &Task) -> End {
    let team = &task.team;
    let lowered = task.request.body.to_lowercase();
    let answering: Vec<AgentId> = team
        .workers
        .iter()
        .filter(|w| {
            team.broadcast.topics.get(*w).is_none_or(|topics| {
                topics.is_empty() || topics.iter().any(|t| lowered.contains(&t.to_lowercase()))
            })
        })
        .cloned()
        .collect();
    if answering.is_empty() {
        return End::Failed("the request touches none of the workers' topics".into());
    }
    let names: Vec<String> = answering.iter().map(|a| format!("@{a}")).collect();
    collab
        .set_status(task, &format!("broadcast — asking {}", names.join(", ")))
        .await;
    let mut runs: FuturesUnordered<_> = answering
        .iter()
        .map(|agent| {
            let step = Step {
                name: format!("answer:{agent}"),
                agent: agent.clone(),
                prompt: task.request.body.clone(),
                posted: true,
                timeout: None,
            };
            let agent = agent.clone();
            async move { (agent, collab.step(task, step).await) }
        })
        .collect();
    // After a restart: the summary posted before it (extended from here, never posted
    // again), and the timeout counted from the task's start, not the restart's.
    let (mut summary, elapsed) = {
        let record = task.record.lock().await;
        let elapsed = crate::unix_ms().saturating_sub(record.started_ms);
        (record.summary.clone(), Duration::from_millis(elapsed))
    };
    let deadline = tokio::time::sleep(team.broadcast.timeout.saturating_sub(elapsed));
    tokio::pin!(deadline);
    let mut entries: Vec<Entry> = Vec::new();
    loop {
        let next = tokio::select! {
            next = runs.next() => next,
            _ = &mut deadline, if summary.is_none() => {
                summary = post_summary(collab, task, &entries, &answering).await;
                continue;
            }
        };
        let Some((agent, result)) = next else { break };
        let done = match result {
            Ok(done) => done,
            Err(end) => return end,
        };
        let late = summary.as_ref().is_some_and(|s| !s.listed.contains(&agent));
        entries.push(entry(collab, task, &agent, &done, late));
        let Some(posted) = summary.as_mut().filter(|_| late) else {
            continue;
        };
        // Late: added to the summary as it stands.
        let waiting = waiting(collab, &entries, &answering);
        let mut lines: Vec<&str> = posted
            .text
            .lines()
            .filter(|l| !l.starts_with("⏳ "))
            .collect();
        let added = format!(
            "+ {}",
            plan::entry_line(entries.last().expect("just pushed"))
        );
        lines.push(&added);
        let mut updated = lines.join("\n");
        for name in &waiting {
            updated.push('\n');
            updated.push_str(&plan::waiting_line(name));
        }
        collab
            .edit(task, &task.team.id, &posted.event, &updated)
            .await;
        posted.text = updated;
        posted.listed.push(agent);
        let mut record = task.record.lock().await;
        record.summary = Some(posted.clone());
        collab.save(task, &record).await;
    }
    if summary.is_none() {
        post_summary(collab, task, &entries, &answering).await;
    }
    End::Done
}

fn entry(collab: &Collab, task: &Task, agent: &AgentId, done: &Done, late: bool) -> Entry {
    Entry {
        agent: agent.clone(),
        name: collab.name_of(agent),
        link: done
            .events
            .first()
            .map(|e| plan::permalink(task.room.as_str(), e.as_str())),
        text: match &done.failure {
            None => done.text.clone(),
            Some(why) => format!("(no answer: {why})"),
        },
        late,
    }
}

fn waiting(collab: &Collab, entries: &[Entry], answering: &[AgentId]) -> Vec<String> {
    answering
        .iter()
        .filter(|a| !entries.iter().any(|e| e.agent == **a))
        .map(|a| collab.name_of(a))
        .collect()
}

/// Posts the summary of what came so far, and keeps it in the task's record to be
/// extended (also after a restart).
async fn post_summary(
    collab: &Collab,
    task: &Task,
    entries: &[Entry],
    answering: &[AgentId],
) -> Option<SummaryRecord> {
    let team = &task.team;
    let waiting = waiting(collab, entries, answering);
    let max = team.broadcast.max_results;
    let text = match team.broadcast.merger {
        Merger::Concat => plan::concat_summary(entries, &waiting, max),
        Merger::Vote => plan::vote_summary(entries, &waiting, max),
        Merger::RankedMerge => {
            let listed = plan::concat_summary(entries, &waiting, max);
            match &team.coordinator {
                Some(coordinator) if !entries.is_empty() => {
                    let step = Step {
                        name: "merge".into(),
                        agent: coordinator.clone(),
                        prompt: plan::merge_prompt(&task.request.body, entries),
                        posted: false,
                        timeout: None,
                    };
                    match collab.step(task, step).await {
                        Ok(done) if done.failure.is_none() => format!("{}\n\n{listed}", done.text),
                        _ => listed,
                    }
                }
                _ => listed,
            }
        }
    };
    collab
        .set_status(
            task,
            &format!(
                "broadcast — {} of {} answered in time",
                entries.len(),
                answering.len()
            ),
        )
        .await;
    match collab
        .post(task, &team.id, "summary", &text, &[], false)
        .await
    {
        Ok(event) => {
            let posted = SummaryRecord {
                event,
                text,
                listed: entries.iter().map(|e| e.agent.clone()).collect(),
            };
            let mut record = task.record.lock().await;
            record.summary = Some(posted.clone());
            collab.save(task, &record).await;
            Some(posted)
        }
        Err(e) => {
            tracing::warn!(task = %task.id, error = %e, "could not post the summary");
            None
        }
    }
}
