//! `teams:` — agents that work on one request together. A team is a virtual Matrix user
//! like an agent (`@devteam:server`); mentioning it, DMing it or writing in a room whose
//! `groups:` entry names it (`team: devteam`) gives it a task, which it runs in one of four
//! modes (see the `collab` module): `star` (a coordinator delegates to workers and
//! integrates their answers), `pipeline` (ordered stages, each given the last one's
//! output), `broadcast` (every worker answers, a merger sums up) and `hybrid` (rules pick
//! one of those per message).
//!
//! Hybrid rules are small conditions, tried in order:
//! `contains_keyword(['项目', '系统']) AND length > 100`, `length < 50`, `always`;
//! conditions join with `AND` and `OR` (`AND` binds tighter), keywords match
//! case-insensitively, and `length` counts characters.

use std::time::Duration;

use serde::Deserialize;

use super::ids::AgentId;

/// One team.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamConfig {
    /// Matrix localpart of the team's user.
    pub id: AgentId,
    #[serde(default)]
    pub display_name: Option<String>,
    /// Other names people write to address the team.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// `mxc://` URI of the team's avatar.
    #[serde(default)]
    pub avatar: Option<String>,
    pub mode: TeamMode,
    /// The agent that plans, delegates and integrates (star), merges (broadcast with
    /// `ranked_merge`), answers directly and classifies (hybrid).
    #[serde(default)]
    pub coordinator: Option<AgentId>,
    /// The agents the coordinator delegates to (star) or that all answer (broadcast).
    #[serde(default)]
    pub workers: Vec<AgentId>,
    /// `pipeline`: the stages, in order.
    #[serde(default)]
    pub stages: Vec<StageConfig>,
    /// `broadcast`: who answers and how the answers are summed up.
    #[serde(default)]
    pub broadcast: TeamBroadcastConfig,
    /// `hybrid`: the rules that pick a mode, tried in order.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// `hybrid`: when no rule matches, ask the coordinator's model to pick the mode, as
    /// structured output (`{"mode", "reason"}`, a mode the team can run); else, or when it
    /// picks none, `default_mode` is used.
    #[serde(default)]
    pub classifier: bool,
    /// `hybrid`: the mode when no rule matches (and the classifier is off or unsure).
    #[serde(default = "default_hybrid_mode")]
    pub default_mode: TaskMode,
    #[serde(default)]
    pub limits: TeamLimits,
}

fn default_hybrid_mode() -> TaskMode {
    TaskMode::Direct
}

impl TeamConfig {
    pub fn display_name(&self) -> &str {
        self.display_name.as_deref().unwrap_or(&self.id)
    }

    /// Whether the team has the agents `mode` needs.
    pub fn can_run(&self, mode: TaskMode) -> bool {
        match mode {
            TaskMode::Star => self.coordinator.is_some() && !self.workers.is_empty(),
            TaskMode::Pipeline => !self.stages.is_empty(),
            TaskMode::Broadcast => !self.workers.is_empty(),
            TaskMode::Direct => self.coordinator.is_some(),
        }
    }

    /// Every agent of the team: the coordinator, the workers and the stages' agents, each
    /// once, in that order.
    pub fn members(&self) -> Vec<AgentId> {
        let mut members: Vec<AgentId> = Vec::new();
        let all = self
            .coordinator
            .iter()
            .chain(&self.workers)
            .chain(self.stages.iter().map(|s| &s.agent));
        for agent in all {
            if !members.contains(agent) {
                members.push(agent.clone());
            }
        }
        members
    }
}

/// `teams[].mode`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeamMode {
    Star,
    Pipeline,
    Broadcast,
    Hybrid,
}

/// How one task runs: a team's mode, or what a hybrid rule picked (`direct`: the
/// coordinator answers alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskMode {
    Star,
    Pipeline,
    Broadcast,
    Direct,
}

impl TaskMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskMode::Star => "star",
            TaskMode::Pipeline => "pipeline",
            TaskMode::Broadcast => "broadcast",
            TaskMode::Direct => "direct",
        }
    }

    pub fn parse(word: &str) -> Option<TaskMode> {
        match word.trim().to_lowercase().as_str() {
            "star" => Some(TaskMode::Star),
            "pipeline" => Some(TaskMode::Pipeline),
            "broadcast" => Some(TaskMode::Broadcast),
            "direct" => Some(TaskMode::Direct),
            _ => None,
        }
    }
}

/// `teams[].stages[]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Names the stage in the thread and in `{{stages.NAME}}`.
    pub name: String,
    pub agent: AgentId,
    /// What the stage's agent is asked: `{{request}}` (the person's message), `{{input}}`
    /// (the previous stage's output; the request for the first stage) and
    /// `{{stages.NAME}}` (an earlier stage's output).
    #[serde(default = "default_stage_prompt")]
    pub prompt: String,
    /// How long the stage may take; a stage that takes longer stops the pipeline.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

fn default_stage_prompt() -> String {
    "{{input}}".to_owned()
}

/// `teams[].broadcast`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamBroadcastConfig {
    /// Per worker, keywords one of which the message must contain for it to answer; a
    /// worker without topics always answers.
    #[serde(default)]
    pub topics: std::collections::BTreeMap<AgentId, Vec<String>>,
    #[serde(default)]
    pub merger: Merger,
    /// How many answers the summary lists.
    #[serde(default = "default_max_results")]
    pub max_results: usize,
    /// How long the summary waits for answers; later ones are marked late.
    #[serde(default = "default_broadcast_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for TeamBroadcastConfig {
    fn default() -> Self {
        Self {
            topics: Default::default(),
            merger: Merger::default(),
            max_results: default_max_results(),
            timeout: default_broadcast_timeout(),
        }
    }
}

fn default_max_results() -> usize {
    10
}

fn default_broadcast_timeout() -> Duration {
    Duration::from_secs(120)
}

/// How a broadcast's answers are summed up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Merger {
    /// Each answer's opening, linked, in the order they came.
    #[default]
    Concat,
    /// The coordinator's model merges the answers, best first; each one linked.
    RankedMerge,
    /// The answer most workers gave (their first lines compared), with the count.
    Vote,
}

/// `teams[].rules[]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The condition (see the module docs).
    pub when: String,
    pub mode: TaskMode,
}

/// `teams[].limits`: what ends a task, whatever its agents say.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamLimits {
    /// Model runs in one task, every agent's counted.
    #[serde(default = "default_max_agent_turns")]
    pub max_agent_turns: u32,
    /// Hand-offs in one plan.
    #[serde(default = "default_max_fanout")]
    pub max_fanout: usize,
    /// How deep delegation goes: 1 = only the coordinator delegates.
    #[serde(default = "default_max_depth")]
    pub max_depth: u32,
    /// Wall-clock time of the whole task.
    #[serde(default = "default_task_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Tokens (prompt + completion, as the providers report them) of the whole task.
    #[serde(default = "default_token_budget")]
    pub token_budget: u64,
    /// Hand-offs between the same two agents (either way) in one task.
    #[serde(default = "default_ping_pong")]
    pub ping_pong: u32,
}

impl Default for TeamLimits {
    fn default() -> Self {
        Self {
            max_agent_turns: default_max_agent_turns(),
            max_fanout: default_max_fanout(),
            max_depth: default_max_depth(),
            timeout: default_task_timeout(),
            token_budget: default_token_budget(),
            ping_pong: default_ping_pong(),
        }
    }
}

fn default_max_agent_turns() -> u32 {
    12
}
fn default_max_fanout() -> usize {
    4
}
fn default_max_depth() -> u32 {
    2
}
fn default_task_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_token_budget() -> u64 {
    200_000
}
fn default_ping_pong() -> u32 {
    4
}

/// A compiled hybrid condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Always,
    /// Any of these (lowercased) keywords.
    ContainsKeyword(Vec<String>),
    /// `length OP n`, in characters.
    Length(Comparison, usize),
    And(Vec<Condition>),
    Or(Vec<Condition>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
    Equal,
}

impl Condition {
    /// Whether `text` meets the condition.
    pub fn matches(&self, text: &str) -> bool {
        match self {
            Condition::Always => true,
            Condition::ContainsKeyword(words) => {
                let lowered = text.to_lowercase();
                words.iter().any(|w| lowered.contains(w.as_str()))
            }
            Condition::Length(op, n) => {
                let len = text.trim().chars().count();
                match op {
                    Comparison::Less => len < *n,
                    Comparison::LessOrEqual => len <= *n,
                    Comparison::Greater => len > *n,
                    Comparison::GreaterOrEqual => len >= *n,
                    Comparison::Equal => len == *n,
                }
            }
            Condition::And(all) => all.iter().all(|c| c.matches(text)),
            Condition::Or(any) => any.iter().any(|c| c.matches(text)),
        }
    }

    /// Compiles a rule's `when:`; the error says what was expected where.
    pub fn parse(source: &str) -> Result<Condition, String> {
        let mut any = Vec::new();
        for alternative in split_keyword(source, "OR")? {
            let mut all = Vec::new();
            for term in split_keyword(&alternative, "AND")? {
                all.push(parse_term(term.trim())?);
            }
            any.push(if all.len() == 1 {
                all.remove(0)
            } else {
                Condition::And(all)
            });
        }
        Ok(if any.len() == 1 {
            any.remove(0)
        } else {
            Condition::Or(any)
        })
    }
}

/// Splits at ` WORD ` outside quotes and brackets.
fn split_keyword(source: &str, word: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut quote: Option<char> = None;
    let mut depth = 0usize;
    let chars: Vec<char> = source.chars().collect();
    let needle: Vec<char> = format!(" {word} ").chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '[' || c == '(' => depth += 1,
            None if c == ']' || c == ')' => depth = depth.saturating_sub(1),
            None if depth == 0 && chars[i..].starts_with(&needle) => {
                parts.push(std::mem::take(&mut current));
                i += needle.len();
                continue;
            }
            None => {}
        }
        current.push(c);
        i += 1;
    }
    if quote.is_some() {
        return Err("a quoted keyword is not closed".into());
    }
    parts.push(current);
    if parts.iter().any(|p| p.trim().is_empty()) {
        return Err(format!("{word} needs a condition on each side"));
    }
    Ok(parts)
}

fn parse_term(term: &str) -> Result<Condition, String> {
    if term == "always" {
        return Ok(Condition::Always);
    }
    if let Some(rest) = term.strip_prefix("contains_keyword") {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .map(str::trim)
            .and_then(|r| r.strip_prefix('['))
            .and_then(|r| r.strip_suffix(']'))
            .ok_or_else(|| format!("{term:?}: write contains_keyword(['word', 'other word'])"))?;
        let mut words = Vec::new();
        for word in inner.split(',') {
            let word = word.trim();
            let unquoted = word
                .strip_prefix('\'')
                .and_then(|w| w.strip_suffix('\''))
                .or_else(|| word.strip_prefix('"').and_then(|w| w.strip_suffix('"')))
                .ok_or_else(|| format!("{word:?} in {term:?}: keywords are quoted"))?;
            if unquoted.trim().is_empty() {
                return Err(format!("{term:?}: an empty keyword matches everything"));
            }
            words.push(unquoted.to_lowercase());
        }
        return Ok(Condition::ContainsKeyword(words));
    }
    if let Some(rest) = term.strip_prefix("length") {
        let rest = rest.trim();
        let (op, number) = [
            ("<=", Comparison::LessOrEqual),
            (">=", Comparison::GreaterOrEqual),
            ("==", Comparison::Equal),
            ("<", Comparison::Less),
            (">", Comparison::Greater),
        ]
        .into_iter()
        .find_map(|(sym, op)| rest.strip_prefix(sym).map(|n| (op, n.trim())))
        .ok_or_else(|| format!("{term:?}: write length < N, length > N, <=, >= or =="))?;
        let n = number
            .parse::<usize>()
            .map_err(|_| format!("{term:?}: {number:?} is not a whole number"))?;
        return Ok(Condition::Length(op, n));
    }
    Err(format!(
        "{term:?}: expected contains_keyword([...]), length < N, length > N or always"
    ))
}

/// Checks `teams:` against the agents; `problem(key, what)` collects each finding.
pub(super) fn validate(
    teams: &[TeamConfig],
    is_agent: &dyn Fn(&AgentId) -> bool,
    problem: &mut dyn FnMut(String, String),
) {
    for (i, team) in teams.iter().enumerate() {
        let at = format!("teams[{i}]");
        let mut agent = |key: String, id: &AgentId| {
            if !is_agent(id) {
                problem(key, format!("unknown agent {id:?}"));
            }
        };
        if let Some(c) = &team.coordinator {
            agent(format!("{at}.coordinator"), c);
        }
        for (j, w) in team.workers.iter().enumerate() {
            agent(format!("{at}.workers[{j}]"), w);
        }
        for (j, s) in team.stages.iter().enumerate() {
            agent(format!("{at}.stages[{j}].agent"), &s.agent);
        }
        for w in team.broadcast.topics.keys() {
            if !team.workers.contains(w) {
                problem(
                    format!("{at}.broadcast.topics.{w}"),
                    "is not one of the team's workers".into(),
                );
            }
        }
        let needs = |mode: TaskMode, problem: &mut dyn FnMut(String, String), why: &str| {
            let what = (!team.can_run(mode)).then_some(match mode {
                TaskMode::Star => (
                    "coordinator",
                    "star needs a coordinator and at least one worker",
                ),
                TaskMode::Direct => ("coordinator", "direct needs a coordinator"),
                TaskMode::Pipeline => ("stages", "pipeline needs at least one stage"),
                TaskMode::Broadcast => ("workers", "broadcast needs at least one worker"),
            });
            if let Some((key, what)) = what {
                problem(format!("{at}.{key}"), format!("{what}{why}"));
            }
        };
        match team.mode {
            TeamMode::Star => needs(TaskMode::Star, problem, ""),
            TeamMode::Pipeline => needs(TaskMode::Pipeline, problem, ""),
            TeamMode::Broadcast => needs(TaskMode::Broadcast, problem, ""),
            TeamMode::Hybrid => {
                if team.rules.is_empty() && !team.classifier {
                    problem(
                        format!("{at}.rules"),
                        "hybrid needs at least one rule, or classifier: true".into(),
                    );
                }
                for (j, rule) in team.rules.iter().enumerate() {
                    if let Err(e) = Condition::parse(&rule.when) {
                        problem(format!("{at}.rules[{j}].when"), e);
                    }
                    needs(rule.mode, problem, &format!(" (rules[{j}] picks it)"));
                }
                needs(team.default_mode, problem, " (the default_mode)");
                if team.classifier && team.coordinator.is_none() {
                    problem(
                        format!("{at}.classifier"),
                        "the classifier is the coordinator's model: set a coordinator".into(),
                    );
                }
            }
        }
        if team.broadcast.merger == Merger::RankedMerge && team.coordinator.is_none() {
            problem(
                format!("{at}.broadcast.merger"),
                "ranked_merge is the coordinator's: set a coordinator".into(),
            );
        }
        let mut names = std::collections::HashSet::new();
        for (j, stage) in team.stages.iter().enumerate() {
            if stage.name.trim().is_empty() || !names.insert(stage.name.as_str()) {
                problem(
                    format!("{at}.stages[{j}].name"),
                    "stage names must be non-empty and unique".into(),
                );
            }
        }
        let limits = &team.limits;
        for (key, zero) in [
            ("max_agent_turns", limits.max_agent_turns == 0),
            ("max_fanout", limits.max_fanout == 0),
            ("max_depth", limits.max_depth == 0),
            ("timeout", limits.timeout.is_zero()),
            ("token_budget", limits.token_budget == 0),
            ("ping_pong", limits.ping_pong == 0),
        ] {
            if zero {
                problem(format!("{at}.limits.{key}"), "must be more than 0".into());
            }
        }
        if team.broadcast.timeout.is_zero() || team.broadcast.max_results == 0 {
            problem(
                format!("{at}.broadcast"),
                "timeout and max_results must be more than 0".into(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_match_as_written() {
        let rule = Condition::parse("contains_keyword(['项目','系统']) AND length > 10").unwrap();
        assert!(rule.matches("这个项目的系统架构需要重新设计一下吧"));
        assert!(!rule.matches("项目"), "too short");
        assert!(!rule.matches("a long message about nothing in particular"));
        let either = Condition::parse("length < 5 OR contains_keyword([\"Compare\"])").unwrap();
        assert!(either.matches("hi"));
        assert!(either.matches("please compare these two libraries"));
        assert!(!either.matches("a longer message"));
        assert_eq!(Condition::parse("always").unwrap(), Condition::Always);
        let quoted = Condition::parse("contains_keyword(['a AND b'])").unwrap();
        assert_eq!(quoted, Condition::ContainsKeyword(vec!["a and b".into()]));
    }

    #[test]
    fn a_broken_rule_says_what_was_expected() {
        for (source, expected) in [
            ("length >> 3", "is not a whole number"),
            (
                "contains_keyword(project)",
                "write contains_keyword(['word'",
            ),
            ("contains_keyword([project])", "keywords are quoted"),
            ("size > 3", "expected contains_keyword"),
            (
                "always AND  AND always",
                "AND needs a condition on each side",
            ),
            ("contains_keyword(['x)", "not closed"),
        ] {
            let error = Condition::parse(source).unwrap_err();
            assert!(error.contains(expected), "{source:?}: {error}");
        }
    }
}
