//! `pipeline`: the stages in order, each posted in the thread and given the previous
//! stage's output. A stage that fails or takes longer than its `timeout` stops the
//! pipeline, naming the stage. After a restart, finished stages come from the task's
//! record: the one that was running runs again, the ones before it do not.

use std::collections::BTreeMap;

use super::{Collab, End, Step, Task, plan};

pub(super) async fn run(collab: &Collab, task: &Task) -> End {
    let stages = &task.team.stages;
    let mut outputs: BTreeMap<String, String> = BTreeMap::new();
    let mut input = task.request.body.clone();
    for (i, stage) in stages.iter().enumerate() {
        collab
            .set_status(
                task,
                &format!(
                    "pipeline — stage {}/{} {} (@{})",
                    i + 1,
                    stages.len(),
                    stage.name,
                    stage.agent
                ),
            )
            .await;
        let prompt = plan::render_stage(&stage.prompt, &task.request.body, &input, &outputs);
        let step = Step {
            name: format!("stage:{}", stage.name),
            agent: stage.agent.clone(),
            prompt,
            posted: true,
            timeout: stage.timeout,
        };
        let done = match collab.step(task, step).await {
            Ok(done) => done,
            Err(end) => return end,
        };
        if done.replayed {
            tracing::info!(task = %task.id, stage = %stage.name, "stage finished before the restart; not run again");
        }
        if let Some(why) = done.failure {
            return End::Failed(format!(
                "stage {} ({}/{}): {why}",
                stage.name,
                i + 1,
                stages.len()
            ));
        }
        outputs.insert(stage.name.clone(), done.text.clone());
        input = done.text;
    }
    End::Done
}
