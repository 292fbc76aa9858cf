//! The words a task is made of: the prompts its steps are asked, the hand-offs a
//! coordinator's plan names, a pipeline stage's template, and the summary of a broadcast.
//! Pure functions, so every rule here is tested without a room.

use std::collections::BTreeMap;

use crate::config::{AgentId, Condition, RuleConfig, TaskMode};

/// One hand-off of a plan: who, and what they are asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    pub agent: AgentId,
    pub task: String,
}

/// The hand-offs in a plan: lines `@agent: what to do` (also `@agent:server: …`, a
/// full-width colon, or a list bullet before it) naming one of `allowed`. Other lines are
/// the coordinator's own words. An agent named twice gets both parts, joined.
pub fn handoffs(plan: &str, allowed: &[AgentId]) -> Vec<Handoff> {
    let mut found: Vec<Handoff> = Vec::new();
    for line in plan.lines() {
        let line = line.trim().trim_start_matches(['-', '*', '•']).trim_start();
        let Some(rest) = line.strip_prefix('@') else {
            continue;
        };
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || "._=/-".contains(c)))
            .unwrap_or(rest.len());
        let (name, mut rest) = rest.split_at(end);
        // `@coder:example.org: …`: a server name before the colon that ends the name.
        if let Some(after) = rest.strip_prefix(':')
            && let Some(colon) = after.find([':', '：'])
            && !after[..colon].contains(char::is_whitespace)
            && !after[..colon].is_empty()
        {
            rest = &after[colon..];
        }
        let Some(task) = rest
            .trim_start()
            .strip_prefix(':')
            .or_else(|| rest.trim_start().strip_prefix('：'))
        else {
            continue;
        };
        let task = task.trim();
        let Some(agent) = allowed.iter().find(|a| a.as_str() == name) else {
            continue;
        };
        if task.is_empty() {
            continue;
        }
        match found.iter_mut().find(|h| h.agent == *agent) {
            Some(h) => {
                h.task.push('\n');
                h.task.push_str(task);
            }
            None => found.push(Handoff {
                agent: agent.clone(),
                task: task.to_owned(),
            }),
        }
    }
    found
}

/// What the coordinator is asked to plan.
pub fn plan_prompt(
    asker: &str,
    team: &str,
    request: &str,
    workers: &[(AgentId, String)],
    fanout: usize,
) -> String {
    let mut roster = String::new();
    for (id, name) in workers {
        roster.push_str(&format!("\n- @{id} ({name})"));
    }
    let mut form = String::new();
    for (id, name) in workers {
        form.push_str(&format!("\n@{id}: the part for {name}"));
    }
    format!(
        "{asker} asked the team {team}:\n\n{request}\n\nYou coordinate it. Your team:{roster}\n\n\
         Hand off parts of the work with one line per hand-off (at most {fanout}, only to who \
         is needed), written as{form}\n\n\
         If nobody's help is needed, answer the request yourself, with no hand-off lines."
    )
}

/// What a worker is asked by whoever handed the part off.
pub fn worker_prompt(from: &str, asker: &str, task: &str, request: &str) -> String {
    format!(
        "{from} hands you a part of {asker}'s request.\n\nYour part: {task}\n\nThe whole request: {request}"
    )
}

/// A worker's answer as the coordinator reads it for the synthesis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub agent: AgentId,
    /// The answer; `Err` says why there is none.
    pub answer: Result<String, String>,
}

/// What the coordinator is asked to integrate.
pub fn synthesis_prompt(asker: &str, request: &str, reports: &[Report]) -> String {
    let mut text = format!("{asker} asked the team:\n\n{request}\n\nYour team's answers:");
    for report in reports {
        match &report.answer {
            Ok(answer) => text.push_str(&format!("\n\n@{} answered:\n{answer}", report.agent)),
            Err(why) => text.push_str(&format!("\n\n@{} did not answer: {why}", report.agent)),
        }
    }
    text.push_str(&format!(
        "\n\nWrite the team's answer for {asker}, integrating these. Say which part is missing, if one is."
    ));
    text
}

/// A pipeline stage's prompt: `{{request}}`, `{{input}}` and `{{stages.NAME}}` filled in
/// (an unknown name is left as written).
pub fn render_stage(
    template: &str,
    request: &str,
    input: &str,
    stages: &BTreeMap<String, String>,
) -> String {
    let mut out = String::with_capacity(template.len() + input.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            out.push_str(&rest[open..]);
            return out;
        };
        let name = after[..close].trim();
        match name {
            "request" => out.push_str(request),
            "input" => out.push_str(input),
            _ => match name.strip_prefix("stages.").and_then(|s| stages.get(s)) {
                Some(text) => out.push_str(text),
                None => out.push_str(&rest[open..open + 2 + close + 2]),
            },
        }
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    out
}

/// Which mode a hybrid team picks for `text`, and why (the rule's number and source).
pub fn classify<'r>(rules: &'r [RuleConfig], text: &str) -> Option<(TaskMode, usize, &'r str)> {
    rules.iter().enumerate().find_map(|(i, rule)| {
        let condition = Condition::parse(&rule.when).ok()?;
        condition
            .matches(text)
            .then_some((rule.mode, i, rule.when.as_str()))
    })
}

/// What the coordinator's model is asked when no rule picked a mode: one of `modes` (the
/// ones the team can run), as JSON of [`classifier_schema`].
pub fn classifier_prompt(request: &str, modes: &[TaskMode]) -> String {
    let mut offered = String::new();
    for mode in modes {
        let what = match mode {
            TaskMode::Star => "you delegate parts to your workers and integrate their answers",
            TaskMode::Broadcast => "every worker answers on its own",
            TaskMode::Pipeline => "the stages run in order, each given the last one's output",
            TaskMode::Direct => "you answer alone",
        };
        offered.push_str(&format!("\n- {}: {what}", mode.as_str()));
    }
    format!(
        "Pick how a team of agents should handle this request. The modes:{offered}\n\n\
         Answer with a JSON object: \"mode\", one of those, and \"reason\", one short sentence \
         saying why.\n\nThe request: {request}"
    )
}

/// The JSON Schema of the classifier's answer: `{"mode": one of modes, "reason": text}`.
pub fn classifier_schema(modes: &[TaskMode]) -> serde_json::Value {
    let names: Vec<&str> = modes.iter().map(|m| m.as_str()).collect();
    serde_json::json!({
        "type": "object",
        "properties": {
            "mode": {"type": "string", "enum": names},
            "reason": {"type": "string", "description": "one short sentence: why this mode"},
        },
        "required": ["mode", "reason"],
        "additionalProperties": false,
    })
}

/// What a classifier's answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// JSON of the schema: the mode and the model's reason.
    Chose { mode: TaskMode, reason: String },
    /// Not JSON (a provider that ignored the schema): the first mode word in the text.
    Named(TaskMode),
    /// No mode it may pick, and why not (for the log).
    Nothing(String),
}

/// Reads a classifier's answer: JSON of [`classifier_schema`] (alone, or in one code
/// fence, as models told in words often write it), strictly — a JSON answer with another
/// shape, or a mode not in `modes`, picks nothing. Only an answer that is not JSON at all
/// is scanned for a mode's name.
pub fn classifier_answer(answer: &str, modes: &[TaskMode]) -> Classified {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Answer {
        mode: String,
        reason: String,
    }
    let trimmed = answer.trim();
    let json = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|rest| rest.strip_suffix("```"))
        .map_or(trimmed, str::trim);
    match serde_json::from_str::<serde_json::Value>(json) {
        Ok(value) => {
            let parsed: Answer = match serde_json::from_value(value) {
                Ok(parsed) => parsed,
                Err(e) => return Classified::Nothing(format!("JSON of another shape: {e}")),
            };
            match TaskMode::parse(&parsed.mode).filter(|m| modes.contains(m)) {
                Some(mode) => Classified::Chose {
                    mode,
                    reason: opening(&parsed.reason, 200),
                },
                None => Classified::Nothing(format!("{:?} is not a mode offered", parsed.mode)),
            }
        }
        Err(_) => match answer
            .split(|c: char| !c.is_alphanumeric())
            .find_map(TaskMode::parse)
        {
            Some(mode) if modes.contains(&mode) => Classified::Named(mode),
            Some(mode) => Classified::Nothing(format!("{} is not a mode offered", mode.as_str())),
            None => Classified::Nothing("not JSON, and it names no mode".into()),
        },
    }
}

/// One answer of a broadcast, as the summary shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub agent: AgentId,
    pub name: String,
    /// Where it is: a matrix.to permalink.
    pub link: Option<String>,
    pub text: String,
    /// It came after the summary's timeout.
    pub late: bool,
}

/// The `matrix.to` permalink of an event.
pub fn permalink(room: &str, event: &str) -> String {
    let escape = |s: &str| {
        s.replace('%', "%25")
            .replace('#', "%23")
            .replace('/', "%2F")
            .replace('?', "%3F")
    };
    format!("https://matrix.to/#/{}/{}", escape(room), escape(event))
}

/// The opening of `text`: its first `max` characters on one line.
pub fn opening(text: &str, max: usize) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max).collect();
    cut.push('…');
    cut
}

/// A `concat` summary: each answer's opening and link in the order they came (at most
/// `max`), then who is still missing.
pub fn concat_summary(entries: &[Entry], waiting: &[String], max: usize) -> String {
    let mut text = format!(
        "Answers ({} of {}):",
        entries.len(),
        entries.len() + waiting.len()
    );
    for (i, entry) in entries.iter().take(max).enumerate() {
        text.push_str(&format!("\n{}. {}", i + 1, entry_line(entry)));
    }
    if entries.len() > max {
        text.push_str(&format!("\n… and {} more", entries.len() - max));
    }
    for name in waiting {
        text.push_str(&format!("\n{}", waiting_line(name)));
    }
    text
}

/// A summary's line for a worker that has not answered yet.
pub fn waiting_line(name: &str) -> String {
    format!("⏳ {name}: no answer yet (late)")
}

/// One answer's line in a summary: who, whether late, its opening and its link.
pub fn entry_line(entry: &Entry) -> String {
    let late = if entry.late { " (late)" } else { "" };
    let link = entry
        .link
        .as_ref()
        .map(|l| format!(" — {l}"))
        .unwrap_or_default();
    format!("{}{late}: {}{link}", entry.name, opening(&entry.text, 200))
}

/// A `vote` summary: the answer given most often (first lines compared, ignoring case and
/// punctuation), with its count, then every answer's link.
pub fn vote_summary(entries: &[Entry], waiting: &[String], max: usize) -> String {
    let mut counts: Vec<(String, usize, &Entry)> = Vec::new();
    for entry in entries {
        let key = normalized_first_line(&entry.text);
        match counts.iter_mut().find(|(k, _, _)| *k == key) {
            Some((_, n, _)) => *n += 1,
            None => counts.push((key, 1, entry)),
        }
    }
    let total = entries.len() + waiting.len();
    let mut text = match counts.iter().max_by_key(|(_, n, _)| *n) {
        Some((_, n, first)) => format!(
            "Vote: {n} of {total} answered \"{}\"",
            opening(first.text.lines().next().unwrap_or_default(), 120)
        ),
        None => format!("Vote: none of {total} answered yet"),
    };
    for (i, entry) in entries.iter().take(max).enumerate() {
        text.push_str(&format!("\n{}. {}", i + 1, entry_line(entry)));
    }
    for name in waiting {
        text.push_str(&format!("\n{}", waiting_line(name)));
    }
    text
}

fn normalized_first_line(text: &str) -> String {
    text.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_alphanumeric() || c.is_whitespace())
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// What the coordinator is asked to merge, best first.
pub fn merge_prompt(request: &str, entries: &[Entry]) -> String {
    let mut text = format!("Several agents answered this request on their own:\n\n{request}\n");
    for entry in entries {
        text.push_str(&format!("\n@{} answered:\n{}\n", entry.agent, entry.text));
    }
    text.push_str("\nMerge them into one answer, the best points first; say where they disagree.");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<AgentId> {
        names.iter().map(|n| AgentId::parse(n).unwrap()).collect()
    }

    #[test]
    fn a_plan_hands_off_to_the_named_workers_only() {
        let team = ids(&["coder", "researcher"]);
        let plan = "Let's split this.\n@coder: write the parser\n- @researcher:example.org: find prior art\n\
                    @writer: the docs\n@coder：and its tests\n@researcher:\nsee @coder: not a hand-off";
        assert_eq!(
            handoffs(plan, &team),
            vec![
                Handoff {
                    agent: team[0].clone(),
                    task: "write the parser\nand its tests".into()
                },
                Handoff {
                    agent: team[1].clone(),
                    task: "find prior art".into()
                },
            ]
        );
        assert!(handoffs("I can answer this myself: 42.", &team).is_empty());
    }

    #[test]
    fn a_stage_template_fills_in_request_input_and_earlier_stages() {
        let mut stages = BTreeMap::new();
        stages.insert("draft".to_owned(), "the draft".to_owned());
        assert_eq!(
            render_stage(
                "Review {{ input }} for {{request}}; draft was {{stages.draft}}, {{stages.nope}} {{",
                "the ask",
                "v2",
                &stages
            ),
            "Review v2 for the ask; draft was the draft, {{stages.nope}} {{"
        );
    }

    #[test]
    fn rules_pick_in_order_and_say_which() {
        let rules: Vec<RuleConfig> = serde_yaml::from_str(
            "- { when: \"contains_keyword(['项目','系统']) AND length > 20\", mode: star }\n\
             - { when: \"contains_keyword(['怎么选','对比'])\", mode: broadcast }\n\
             - { when: \"length < 50\", mode: direct }",
        )
        .unwrap();
        let long = "我们的项目需要一个新的系统来处理用户的订单和支付，还要支持退款和对账功能";
        assert_eq!(
            classify(&rules, long).map(|(m, i, _)| (m, i)),
            Some((TaskMode::Star, 0))
        );
        assert_eq!(
            classify(&rules, "数据库怎么选？").map(|(m, i, _)| (m, i)),
            Some((TaskMode::Broadcast, 1))
        );
        assert_eq!(
            classify(&rules, "hi").map(|(m, i, _)| (m, i)),
            Some((TaskMode::Direct, 2))
        );
        assert_eq!(classify(&rules, &"x".repeat(60)), None);
    }

    const OFFERED: [TaskMode; 3] = [TaskMode::Star, TaskMode::Broadcast, TaskMode::Direct];

    #[test]
    fn the_classifier_is_asked_for_json_of_the_modes_the_team_can_run() {
        let schema = classifier_schema(&OFFERED);
        assert_eq!(
            schema,
            serde_json::json!({
                "type": "object",
                "properties": {
                    "mode": {"type": "string", "enum": ["star", "broadcast", "direct"]},
                    "reason": {"type": "string", "description": "one short sentence: why this mode"},
                },
                "required": ["mode", "reason"],
                "additionalProperties": false,
            })
        );
        let prompt = classifier_prompt("compare them", &OFFERED);
        assert!(prompt.starts_with("Pick how a team of agents"), "{prompt}");
        assert!(prompt.contains("\n- broadcast: every worker answers on its own"));
        assert!(
            !prompt.contains("pipeline"),
            "a mode the team cannot run is not offered"
        );
        assert!(prompt.ends_with("The request: compare them"));
    }

    #[test]
    fn a_classifier_answer_is_read_strictly_as_json() {
        let chose = |mode, reason: &str| Classified::Chose {
            mode,
            reason: reason.into(),
        };
        assert_eq!(
            classifier_answer(
                r#"{"mode":"broadcast","reason":"Several views help."}"#,
                &OFFERED
            ),
            chose(TaskMode::Broadcast, "Several views help.")
        );
        // In a code fence, as a model told in words may write it; the reason on one line.
        assert_eq!(
            classifier_answer(
                "```json\n{\"mode\": \"Star\", \"reason\": \"big\\nwork\"}\n```",
                &OFFERED
            ),
            chose(TaskMode::Star, "big work")
        );
        // JSON, but not of the schema, or a mode not offered: nothing, not a guess.
        for answer in [
            r#"{"mode":"star"}"#,
            r#"{"mode":"star","reason":"x","extra":1}"#,
            r#"{"mode":"pipeline","reason":"stages"}"#,
            r#"{"mode":"ring","reason":"?"}"#,
            r#""star""#,
            "[]",
        ] {
            assert!(
                matches!(classifier_answer(answer, &OFFERED), Classified::Nothing(_)),
                "{answer}"
            );
        }
        // Not JSON at all: the first mode word it names.
        assert_eq!(
            classifier_answer("**Broadcast** — because", &OFFERED),
            Classified::Named(TaskMode::Broadcast)
        );
        assert!(matches!(
            classifier_answer("no idea", &OFFERED),
            Classified::Nothing(_)
        ));
        assert!(matches!(
            classifier_answer("a pipeline", &OFFERED),
            Classified::Nothing(_)
        ));
    }

    #[test]
    fn summaries_link_each_answer_and_mark_the_late_ones() {
        let entry = |agent: &str, text: &str, late: bool| Entry {
            agent: AgentId::parse(agent).unwrap(),
            name: agent.to_owned(),
            link: Some(permalink("!room:hs", &format!("${agent}"))),
            text: text.to_owned(),
            late,
        };
        let entries = vec![
            entry("coder", "Use Postgres.\nIt scales.", false),
            entry("writer", "use postgres!", true),
        ];
        let concat = concat_summary(&entries, &["slow".to_owned()], 10);
        assert_eq!(
            concat,
            "Answers (2 of 3):\n1. coder: Use Postgres. It scales. — https://matrix.to/#/!room:hs/$coder\n\
             2. writer (late): use postgres! — https://matrix.to/#/!room:hs/$writer\n⏳ slow: no answer yet (late)"
        );
        let vote = vote_summary(&entries, &[], 10);
        assert!(
            vote.starts_with("Vote: 2 of 2 answered \"Use Postgres.\""),
            "{vote}"
        );
        assert_eq!(
            permalink("!a/b:hs", "$c#d"),
            "https://matrix.to/#/!a%2Fb:hs/$c%23d"
        );
    }
}
