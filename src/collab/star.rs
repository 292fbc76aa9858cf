//! `star`: the coordinator plans, hands parts off in the open, the workers answer in
//! parallel in the thread (handing off further up to `max_depth`), and the coordinator
//! posts the integrated answer. A worker that fails is reported to the coordinator,
//! which says so in the synthesis.

use futures::future::{BoxFuture, join_all};

use super::plan::{self, Handoff, Report};
use super::{Collab, End, Step, Task};
use crate::config::AgentId;

pub(super) async fn run(collab: &Collab, task: &Task) -> End {
    let team = &task.team;
    let Some(coordinator) = team.coordinator.clone() else {
        return End::Failed("a star team needs a coordinator".into());
    };
    collab
        .set_status(task, &format!("star — @{coordinator} is planning"))
        .await;
    let roster: Vec<(AgentId, String)> = team
        .workers
        .iter()
        .map(|w| (w.clone(), collab.name_of(w)))
        .collect();
    let prompt = plan::plan_prompt(
        &task.asker(),
        team.display_name(),
        &task.request.body,
        &roster,
        team.limits.max_fanout,
    );
    let step = Step {
        name: "plan".into(),
        agent: coordinator.clone(),
        prompt,
        posted: false,
        timeout: None,
    };
    let planned = match collab.step(task, step).await {
        Ok(done) => done,
        Err(end) => return end,
    };
    if let Some(why) = planned.failure {
        return End::Failed(format!("@{coordinator} could not plan: {why}"));
    }
    let handoffs = plan::handoffs(&planned.text, &team.workers);
    if handoffs.is_empty() {
        // Nobody's help needed: the plan is the coordinator's answer.
        collab
            .set_status(
                task,
                &format!("star — @{coordinator} answered without help"),
            )
            .await;
        return match collab
            .post(task, &coordinator, "answer", &planned.text, &[], false)
            .await
        {
            Ok(_) => End::Done,
            Err(e) => End::Failed(format!("the answer could not be posted: {e}")),
        };
    }
    let reports = match delegate(
        collab,
        task,
        coordinator.clone(),
        handoffs,
        1,
        coordinator.to_string(),
    )
    .await
    {
        Ok(reports) => reports,
        Err(end) => return end,
    };
    collab
        .set_status(
            task,
            &format!("star — @{coordinator} integrates the answers"),
        )
        .await;
    let step = Step {
        name: "synthesis".into(),
        agent: coordinator.clone(),
        prompt: plan::synthesis_prompt(&task.asker(), &task.request.body, &reports),
        posted: true,
        timeout: None,
    };
    match collab.step(task, step).await {
        Ok(done) => match done.failure {
            None => End::Done,
            Some(why) => End::Failed(format!("@{coordinator} could not integrate: {why}")),
        },
        Err(end) => end,
    }
}

/// Hands `handoffs` off from `from` at `depth` (1: the coordinator's), each posted as a
/// message from `from` mentioning the worker, and runs them in parallel.
fn delegate<'a>(
    collab: &'a Collab,
    task: &'a Task,
    from: AgentId,
    handoffs: Vec<Handoff>,
    depth: u32,
    path: String,
) -> BoxFuture<'a, Result<Vec<Report>, End>> {
    Box::pin(async move {
        let limits = &task.team.limits;
        if handoffs.len() > limits.max_fanout {
            let end = End::Limit(format!(
                "@{from} handed off {} parts at once; limits.max_fanout is {}",
                handoffs.len(),
                limits.max_fanout
            ));
            task.end(end.clone());
            return Err(end);
        }
        {
            let mut record = task.record.lock().await;
            for handoff in &handoffs {
                if !record.handed.insert(handoff_purpose(&path, &handoff.agent)) {
                    continue;
                }
                let mut pair = [from.as_str(), handoff.agent.as_str()];
                pair.sort_unstable();
                let count = record.pairs.entry(pair.join(" ")).or_insert(0);
                *count += 1;
                if *count > limits.ping_pong {
                    let end = End::Limit(format!(
                        "@{} and @{} handed work to each other {} times (limits.ping_pong)",
                        pair[0], pair[1], limits.ping_pong
                    ));
                    drop(record);
                    task.end(end.clone());
                    return Err(end);
                }
            }
        }
        for handoff in &handoffs {
            let text = format!(
                "@{} could you {}",
                collab.name_of(&handoff.agent),
                handoff.task
            );
            let purpose = handoff_purpose(&path, &handoff.agent);
            if let Err(e) = collab
                .post(
                    task,
                    &from,
                    &purpose,
                    &text,
                    &[collab.user_of(&handoff.agent)],
                    false,
                )
                .await
            {
                tracing::warn!(task = %task.id, agent = %handoff.agent, error = %e, "could not post a hand-off");
            }
        }
        let names: Vec<String> = handoffs.iter().map(|h| format!("@{}", h.agent)).collect();
        collab
            .set_status(task, &format!("star — running: {}", names.join(", ")))
            .await;
        let runs = handoffs
            .into_iter()
            .map(|handoff| work(collab, task, from.clone(), handoff, depth, &path));
        let mut reports = Vec::new();
        for result in join_all(runs).await {
            reports.extend(result?);
        }
        Ok(reports)
    })
}

/// One worker's part: its answer in the thread, then the parts it handed off in turn.
async fn work(
    collab: &Collab,
    task: &Task,
    from: AgentId,
    handoff: Handoff,
    depth: u32,
    path: &str,
) -> Result<Vec<Report>, End> {
    let team = &task.team;
    let step = Step {
        name: format!("work:{path}>{}", handoff.agent),
        agent: handoff.agent.clone(),
        prompt: plan::worker_prompt(
            &collab.name_of(&from),
            &task.asker(),
            &handoff.task,
            &task.request.body,
        ),
        posted: true,
        timeout: None,
    };
    let done = collab.step(task, step).await?;
    let mut reports = vec![Report {
        agent: handoff.agent.clone(),
        answer: match &done.failure {
            None => Ok(done.text.clone()),
            Some(why) => Err(why.clone()),
        },
    }];
    if done.failure.is_some() {
        return Ok(reports);
    }
    let others: Vec<AgentId> = team
        .members()
        .into_iter()
        .filter(|m| *m != handoff.agent)
        .collect();
    let further = plan::handoffs(&done.text, &others);
    if further.is_empty() {
        return Ok(reports);
    }
    if depth >= team.limits.max_depth {
        let end = End::Limit(format!(
            "@{} handed work on at depth {depth}; limits.max_depth is {}",
            handoff.agent, team.limits.max_depth
        ));
        task.end(end.clone());
        return Err(end);
    }
    let path = format!("{path}>{}", handoff.agent);
    reports.extend(delegate(collab, task, handoff.agent, further, depth + 1, path).await?);
    Ok(reports)
}

/// Names a hand-off by the chain of agents that led to it (`damon>coder` handing to
/// `researcher`: `handoff:damon>coder>researcher`), unique in the task: its post's
/// transaction ID, its count for `ping_pong`.
fn handoff_purpose(path: &str, to: &AgentId) -> String {
    format!("handoff:{path}>{to}")
}
