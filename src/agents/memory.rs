//! Conversation memory: which session a message belongs to, how many tokens text costs
//! (approximately, CJK-aware), which stored lines the readers of a turn's answer may read
//! ([`readable`], by [`super::audience`]), and which of those fit the turn's budget.
//!
//! A group room's session is shared: one agent's memory of everything said to it there,
//! by everyone. That is why a line is shown again only to an answer all of whose readers
//! may read the line in the room itself.

use crate::config::{MemoryConfig, ModelConfig};
use crate::llm::{ChatMessage, Role};
use crate::store::{SessionEntry, SessionRole};

/// Roughly how many tokens `text` costs: a CJK character is about one token, other text
/// about four characters per token. Tokenizers differ; this errs on the generous side for
/// Chinese and Japanese, which a plain `chars / 4` undercounts about fourfold.
pub fn estimate_tokens(text: &str) -> usize {
    let (mut cjk, mut other) = (0usize, 0usize);
    for c in text.chars() {
        if is_cjk(c) {
            cjk += 1;
        } else {
            other += 1;
        }
    }
    cjk + other.div_ceil(4)
}

/// Per-message overhead of chat formats (role markers, separators).
pub const MESSAGE_OVERHEAD: usize = 4;
/// What an image is counted as: vision models bill one at a few hundred to a thousand
/// tokens.
pub const IMAGE_TOKENS: usize = 1000;

/// The cost of one message in a prompt.
pub fn message_tokens(message: &ChatMessage) -> usize {
    MESSAGE_OVERHEAD + estimate_tokens(&message.content) + message.images.len() * IMAGE_TOKENS
}

/// Whether `c` is costed as a whole token: CJK scripts and full-width forms.
pub(super) fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x1100..=0x11FF      // Hangul Jamo
        | 0x2E80..=0x2FDF    // CJK radicals
        | 0x3000..=0x30FF    // CJK punctuation, Hiragana, Katakana
        | 0x3100..=0x31FF    // Bopomofo, Hangul compatibility, Katakana ext.
        | 0x3400..=0x4DBF    // CJK ext. A
        | 0x4E00..=0x9FFF    // CJK unified ideographs
        | 0xAC00..=0xD7AF    // Hangul syllables
        | 0xF900..=0xFAFF    // CJK compatibility ideographs
        | 0xFF00..=0xFFEF    // full-width forms
        | 0x20000..=0x3134F) // CJK ext. B–G
}

/// Tokens of history a turn may carry: the agent's `memory.max_tokens`, and never more
/// than the model's context window leaves after its answer and the `fixed` part of the
/// prompt (system prompt, this turn's message).
pub fn history_budget(memory: &MemoryConfig, model: &ModelConfig, fixed: usize) -> usize {
    let window = (model.context_window as usize)
        .saturating_sub(model.max_tokens as usize)
        .saturating_sub(fixed);
    memory.max_tokens.min(window)
}

/// The prompt for one turn: the `system` prompt (when not empty), the newest remembered
/// lines that fit the budget left by the system prompt, the `current` messages, the
/// `reserved` tokens (tool definitions) and the model's answer, then `current`.
pub fn assemble(
    system: &str,
    stored: &[SessionEntry],
    current: Vec<ChatMessage>,
    reserved: usize,
    memory: &MemoryConfig,
    model: &ModelConfig,
) -> Vec<ChatMessage> {
    let mut messages = Vec::new();
    if !system.is_empty() {
        messages.push(ChatMessage::new(Role::System, system));
    }
    let fixed: usize = reserved
        + messages
            .iter()
            .chain(&current)
            .map(message_tokens)
            .sum::<usize>();
    messages.extend(fit_history(stored, history_budget(memory, model, fixed)));
    messages.extend(current);
    messages
}

/// The lines of `stored` whose time `may_read` allows. An answer is kept only with every
/// question it answers (the lines since the previous answer): it may quote them.
pub fn readable(stored: Vec<SessionEntry>, may_read: impl Fn(u64) -> bool) -> Vec<SessionEntry> {
    let mut kept = Vec::with_capacity(stored.len());
    let mut questions_kept = true;
    for entry in stored {
        let readable = may_read(entry.ts);
        match entry.role {
            SessionRole::User => {
                questions_kept &= readable;
                if readable {
                    kept.push(entry);
                }
            }
            SessionRole::Assistant => {
                if readable && questions_kept {
                    kept.push(entry);
                }
                questions_kept = true;
            }
        }
    }
    kept
}

/// The newest lines of `history` that fit `budget`, as chat messages, oldest first. The
/// kept part never starts with an answer whose question was cut off.
pub fn fit_history(history: &[SessionEntry], budget: usize) -> Vec<ChatMessage> {
    let mut spent = 0;
    let mut start = history.len();
    for (i, entry) in history.iter().enumerate().rev() {
        let cost = MESSAGE_OVERHEAD + estimate_tokens(&entry.content);
        if spent + cost > budget {
            break;
        }
        spent += cost;
        start = i;
    }
    history[start..]
        .iter()
        .skip_while(|e| e.role == SessionRole::Assistant)
        .map(|e| {
            let role = match e.role {
                SessionRole::User => Role::User,
                SessionRole::Assistant => Role::Assistant,
            };
            ChatMessage::new(role, e.content.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use ruma::{owned_event_id, owned_room_id};

    use super::*;

    fn entry(role: SessionRole, content: &str) -> SessionEntry {
        SessionEntry {
            role,
            content: content.into(),
            ts: 0,
        }
    }

    use crate::config::AgentId;
    use crate::store::SessionKey;

    #[test]
    fn sessions_are_per_agent_room_and_thread() {
        let (room, root) = (owned_room_id!("!r"), owned_event_id!("$root"));
        let key = |agent, thread| {
            SessionKey::new(&AgentId::parse(agent).unwrap(), &room, thread).storage_key()
        };
        let main = key("damon", None);
        let thread = key("damon", Some(&root));
        assert_ne!(main, thread);
        assert_ne!(main, key("coder", None));
        assert!(!thread.starts_with(&format!("{main}\u{ff}")));
    }

    #[test]
    fn chinese_costs_about_a_token_per_character_and_english_a_quarter() {
        assert_eq!(estimate_tokens("帮我看看这段代码"), 8);
        assert_eq!(estimate_tokens("hello world!"), 3);
        assert_eq!(estimate_tokens("用 Rust 写"), 2 + 2);
        assert_eq!(estimate_tokens("こんにちは"), 5);
        assert_eq!(estimate_tokens(""), 0);
    }

    #[test]
    fn the_budget_is_the_smaller_of_memory_and_what_the_window_leaves() {
        let memory = MemoryConfig {
            max_messages: 40,
            max_tokens: 4000,
            ..MemoryConfig::default()
        };
        let mut model = ModelConfig::unlisted("m");
        model.context_window = 2048;
        model.max_tokens = 256;
        assert_eq!(history_budget(&memory, &model, 100), 2048 - 256 - 100);
        model.context_window = 128_000;
        assert_eq!(history_budget(&memory, &model, 100), 4000);
        model.context_window = 300;
        assert_eq!(history_budget(&memory, &model, 100), 0);
    }

    #[test]
    fn a_small_context_window_keeps_the_system_prompt_the_question_and_what_fits() {
        let stored: Vec<SessionEntry> = (0..20)
            .flat_map(|i| {
                [
                    entry(SessionRole::User, &format!("question {i} about the build")),
                    entry(
                        SessionRole::Assistant,
                        &format!("answer {i} about the build"),
                    ),
                ]
            })
            .collect();
        let memory = MemoryConfig {
            max_messages: 40,
            max_tokens: 4000,
            ..MemoryConfig::default()
        };
        let mut model = ModelConfig::unlisted("m");
        let current = || ChatMessage::new(Role::User, "and now?");
        // Roomy: all 40 lines between the system prompt and the question.
        let roomy = assemble("Be brief.", &stored, vec![current()], 0, &memory, &model);
        assert_eq!(roomy.len(), 42);
        // 100 tokens of window after a 40-token answer: system (7) + question (6) leave 47,
        // which holds four lines of 11 tokens, starting with a question.
        model.context_window = 100;
        model.max_tokens = 40;
        let tight = assemble("Be brief.", &stored, vec![current()], 0, &memory, &model);
        let texts: Vec<&str> = tight.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(
            texts,
            [
                "Be brief.",
                "question 18 about the build",
                "answer 18 about the build",
                "question 19 about the build",
                "answer 19 about the build",
                "and now?"
            ]
        );
        // No system prompt: no empty system message.
        assert_eq!(
            assemble("", &[], vec![current()], 0, &memory, &model),
            vec![current()]
        );
    }

    #[test]
    fn only_readable_lines_are_kept_and_an_answer_only_with_its_questions() {
        let at = |role, content: &str, ts| SessionEntry {
            role,
            content: content.into(),
            ts,
        };
        use SessionRole::{Assistant, User};
        let stored = vec![
            at(User, "alice: the secret word is tangerine", 10),
            // Posted after Bob joined, but it answers a line he may not read.
            at(Assistant, "tangerine, noted", 25),
            at(User, "alice: and the colour?", 15),
            at(User, "bob: hello", 30),
            at(Assistant, "orange; hi Bob", 31),
            at(User, "bob: what is the word?", 40),
            at(Assistant, "I cannot say", 41),
        ];
        let kept = readable(stored.clone(), |ts| ts >= 20);
        let texts: Vec<&str> = kept.iter().map(|e| e.content.as_str()).collect();
        assert_eq!(
            texts,
            ["bob: hello", "bob: what is the word?", "I cannot say"]
        );
        assert_eq!(readable(stored.clone(), |_| true), stored);
        assert!(readable(stored, |_| false).is_empty());
    }

    #[test]
    fn history_keeps_the_newest_lines_that_fit_and_starts_with_a_question() {
        let history = vec![
            entry(SessionRole::User, "一二三四五六七八九十"),
            entry(SessionRole::Assistant, "ok"),
            entry(SessionRole::User, "second question"),
            entry(SessionRole::Assistant, "second answer"),
        ];
        // Everything fits.
        assert_eq!(fit_history(&history, 1000).len(), 4);
        // The Chinese line (10 + 4) does not fit; "ok" would lead, so it goes too.
        let kept = fit_history(&history, 20);
        assert_eq!(
            kept,
            vec![
                ChatMessage::new(Role::User, "second question"),
                ChatMessage::new(Role::Assistant, "second answer"),
            ]
        );
        assert!(fit_history(&history, 0).is_empty());
    }
}
