//! Keyword rules compiled once: every keyword of every rule goes into one Aho-Corasick
//! automaton and every regex into one `RegexSet`, so a message is scanned once however
//! many rules there are.

use aho_corasick::{AhoCorasick, MatchKind};
use regex::RegexSet;

use crate::config::{AgentId, KeywordRule};

/// One compiled rule: the agent it routes to (index into the router's candidates).
#[derive(Debug, Clone)]
struct Rule {
    agent: usize,
    priority: i32,
}

/// The best rule that matched: which agent, and what matched (for the reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KeywordHit {
    pub agent: usize,
    pub rule: usize,
    pub matched: String,
}

/// All keyword rules, ready to match.
#[derive(Debug, Clone)]
pub(super) struct KeywordMatcher {
    rules: Vec<Rule>,
    automaton: Option<AhoCorasick>,
    /// Per automaton pattern: its rule, and whether it needs Latin word boundaries.
    patterns: Vec<(usize, bool)>,
    regexes: Option<RegexSet>,
    /// Per regex in the set: its rule and the regex as written.
    regex_rules: Vec<(usize, String)>,
}

impl KeywordMatcher {
    /// Compiles `rules`; `agent_index` maps an agent id to its candidate index. Rules
    /// naming an unknown agent are skipped (config validation reports them).
    pub fn new(rules: &[KeywordRule], agent_index: impl Fn(&AgentId) -> Option<usize>) -> Self {
        let mut compiled = Vec::new();
        let mut keywords = Vec::new();
        let mut patterns = Vec::new();
        let mut regexes = Vec::new();
        let mut regex_rules = Vec::new();
        for rule in rules {
            let Some(agent) = agent_index(&rule.agent) else {
                continue;
            };
            let index = compiled.len();
            compiled.push(Rule {
                agent,
                priority: rule.priority,
            });
            for keyword in &rule.keywords {
                let keyword = keyword.trim().to_lowercase();
                if keyword.is_empty() {
                    continue;
                }
                let latin_edges = keyword.chars().next().is_some_and(is_latin_word)
                    || keyword.chars().next_back().is_some_and(is_latin_word);
                patterns.push((index, latin_edges));
                keywords.push(keyword);
            }
            if let Some(regex) = &rule.regex {
                regexes.push(format!("(?i:{regex})"));
                regex_rules.push((index, regex.clone()));
            }
        }
        let automaton = (!keywords.is_empty()).then(|| {
            AhoCorasick::builder()
                .match_kind(MatchKind::Standard)
                .build(&keywords)
                .expect("keyword automaton builds")
        });
        let regexes = (!regexes.is_empty())
            .then(|| RegexSet::new(&regexes).expect("config validation checked the regexes"));
        Self {
            rules: compiled,
            automaton,
            patterns,
            regexes,
            regex_rules,
        }
    }

    /// The best rule matching `lowered` (the message, lower-cased) or `original`, among
    /// rules whose agent passes `allowed`: highest priority, then the first written.
    pub fn best(
        &self,
        lowered: &str,
        original: &str,
        allowed: impl Fn(usize) -> bool,
    ) -> Option<KeywordHit> {
        let mut best: Option<KeywordHit> = None;
        let mut consider = |rule: usize, matched: &str| {
            let candidate = &self.rules[rule];
            if !allowed(candidate.agent) {
                return;
            }
            let better = match &best {
                None => true,
                Some(current) => {
                    let current_priority = self.rules[current.rule].priority;
                    candidate.priority > current_priority
                        || (candidate.priority == current_priority && rule < current.rule)
                }
            };
            if better {
                best = Some(KeywordHit {
                    agent: candidate.agent,
                    rule,
                    matched: matched.to_owned(),
                });
            }
        };
        if let Some(automaton) = &self.automaton {
            for found in automaton.find_overlapping_iter(lowered) {
                let (rule, latin_edges) = self.patterns[found.pattern().as_usize()];
                if latin_edges && !on_word_boundaries(lowered, found.start(), found.end()) {
                    continue;
                }
                consider(rule, &lowered[found.start()..found.end()]);
            }
        }
        if let Some(regexes) = &self.regexes {
            for index in regexes.matches(original).iter() {
                let (rule, source) = &self.regex_rules[index];
                consider(*rule, source);
            }
        }
        best
    }
}

/// A letter or digit of a script that separates words with spaces (Latin, Cyrillic,
/// Greek, …), as opposed to CJK, whose keywords match anywhere.
pub(super) fn is_latin_word(c: char) -> bool {
    c == '_' || (c.is_alphanumeric() && (c as u32) < 0x2E80)
}

/// Whether `text[start..end]` is not glued to a Latin word on either side.
fn on_word_boundaries(text: &str, start: usize, end: usize) -> bool {
    let before = text[..start].chars().next_back();
    let after = text[end..].chars().next();
    let first = text[start..end].chars().next();
    let last = text[start..end].chars().next_back();
    let glued_before = first.is_some_and(is_latin_word) && before.is_some_and(is_latin_word);
    let glued_after = last.is_some_and(is_latin_word) && after.is_some_and(is_latin_word);
    !glued_before && !glued_after
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(keywords: &[&str], regex: Option<&str>, agent: &str, priority: i32) -> KeywordRule {
        KeywordRule {
            keywords: keywords.iter().map(|k| k.to_string()).collect(),
            regex: regex.map(str::to_owned),
            agent: AgentId::parse(agent).unwrap(),
            priority,
        }
    }

    fn matcher(rules: &[KeywordRule]) -> KeywordMatcher {
        let agents = ["damon", "coder", "researcher"];
        KeywordMatcher::new(rules, |id| agents.iter().position(|a| a == id))
    }

    fn best_agent(m: &KeywordMatcher, text: &str) -> Option<usize> {
        m.best(&text.to_lowercase(), text, |_| true)
            .map(|h| h.agent)
    }

    #[test]
    fn keywords_match_latin_on_word_boundaries_and_cjk_anywhere() {
        let m = matcher(&[
            rule(&["代码", "编程", "debug"], None, "coder", 0),
            rule(&["搜索", "调研"], None, "researcher", 0),
        ]);
        let cases: &[(&str, Option<usize>)] = &[
            ("帮我看看这段代码", Some(1)),
            ("Can you DEBUG this?", Some(1)),
            ("debug这个函数", Some(1)),
            ("please debugger attach", None),
            ("the antidebug flag", None),
            ("帮我调研一下", Some(2)),
            ("nothing relevant", None),
            ("", None),
        ];
        for (text, expected) in cases {
            assert_eq!(best_agent(&m, text), *expected, "text {text:?}");
        }
    }

    #[test]
    fn priority_wins_then_the_first_rule_written() {
        let m = matcher(&[
            rule(&["report"], None, "researcher", 0),
            rule(&["bug"], None, "coder", 5),
            rule(&["report"], None, "damon", 0),
        ]);
        assert_eq!(best_agent(&m, "bug report"), Some(1));
        assert_eq!(best_agent(&m, "a report"), Some(2));
    }

    #[test]
    fn regex_rules_are_case_insensitive_and_report_what_matched() {
        let m = matcher(&[rule(&[], Some(r"^fix\s+#\d+"), "coder", 0)]);
        let hit = m
            .best("fix #12 please", "FIX #12 please", |_| true)
            .unwrap();
        assert_eq!(hit.agent, 1);
        assert_eq!(hit.matched, r"^fix\s+#\d+");
        assert_eq!(best_agent(&m, "please fix #12"), None);
    }

    #[test]
    fn disallowed_agents_are_skipped_for_the_next_best() {
        let m = matcher(&[
            rule(&["deploy"], None, "coder", 9),
            rule(&["deploy"], None, "damon", 0),
        ]);
        let hit = m
            .best("deploy it", "deploy it", |agent| agent != 1)
            .unwrap();
        assert_eq!(hit.agent, 0);
    }
}
