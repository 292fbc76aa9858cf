//! Finding mentions: `m.mentions`, matrix.to pills, typed `@name`s (CJK-aware) and
//! per-agent patterns; reply fallbacks are never counted.

use std::collections::BTreeSet;

use aho_corasick::{AhoCorasick, MatchKind};
use ruma::{OwnedUserId, UserId};

/// Whether `text` (lower-cased) contains `@name` as a mention: not glued to a preceding
/// Latin word (so `bob@damon.org` does not count), and — for a name ending in a Latin letter or
/// digit — not followed by another one (so `@damon` does not match `@damonx`). CJK names
/// have no word boundaries and match wherever they appear.
pub(super) fn contains_at_name(text: &str, name: &str) -> bool {
    let mut from = 0;
    while let Some(pos) = text[from..].find('@') {
        let at = from + pos;
        from = at + 1;
        if text[at + 1..].starts_with(name) && is_mention_at(text, at, at + 1 + name.len()) {
            return true;
        }
    }
    false
}

/// Whether `text[at..end]` (an `@` and a name) stands as a mention: see [`contains_at_name`].
fn is_mention_at(text: &str, at: usize, end: usize) -> bool {
    // Only a Latin word glued to the `@` (an e-mail address) disqualifies it; CJK text
    // runs straight into mentions.
    let before_ok = text[..at]
        .chars()
        .next_back()
        .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
    let after_ok = match (
        text[at..end].chars().next_back(),
        text[end..].chars().next(),
    ) {
        (Some(last), Some(next)) if is_word_char(last) && last.is_ascii() => !is_word_char(next),
        _ => true,
    };
    before_ok && after_ok
}

/// Every typed `@name` of every agent in one Aho-Corasick automaton, so a message is scanned
/// once however many agents there are.
#[derive(Debug, Clone)]
pub(super) struct TypedNames {
    automaton: Option<AhoCorasick>,
    /// Per pattern: the candidate it names.
    owners: Vec<usize>,
}

impl TypedNames {
    /// `names[i]` are the lower-cased names of candidate `i`.
    pub fn new<'a>(names: impl IntoIterator<Item = &'a [String]>) -> Self {
        let mut patterns = Vec::new();
        let mut owners = Vec::new();
        for (candidate, names) in names.into_iter().enumerate() {
            for name in names {
                patterns.push(format!("@{name}"));
                owners.push(candidate);
            }
        }
        let automaton = (!patterns.is_empty()).then(|| {
            AhoCorasick::builder()
                .match_kind(MatchKind::Standard)
                .build(&patterns)
                .expect("name automaton builds")
        });
        Self { automaton, owners }
    }

    /// Sets `found[i]` for every candidate `i` that `lowered` mentions by a typed name.
    pub fn find(&self, lowered: &str, found: &mut [bool]) {
        let Some(automaton) = &self.automaton else {
            return;
        };
        if !lowered.contains('@') {
            return;
        }
        for m in automaton.find_overlapping_iter(lowered) {
            if is_mention_at(lowered, m.start(), m.end()) {
                found[self.owners[m.pattern().as_usize()]] = true;
            }
        }
    }
}

pub(super) fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// User IDs linked with `https://matrix.to/#/@user:server` pills.
pub(super) fn pill_targets(html: &str) -> BTreeSet<OwnedUserId> {
    const PREFIX: &str = "matrix.to/#/";
    let mut found = BTreeSet::new();
    let mut rest = html;
    while let Some(pos) = rest.find(PREFIX) {
        rest = &rest[pos + PREFIX.len()..];
        let end = rest.find(['"', '\'', '?', '>', ' ']).unwrap_or(rest.len());
        let raw = &rest[..end];
        let decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
        if let Ok(user) = UserId::parse(decoded.as_ref()) {
            found.insert(user);
        }
    }
    found
}

/// Drops the `<mx-reply>…</mx-reply>` quote older clients prepend to replies, so quoting
/// an agent's message is not a mention of it.
pub(super) fn strip_reply_html(html: &str) -> String {
    match (html.find("<mx-reply>"), html.find("</mx-reply>")) {
        (Some(start), Some(end)) if end > start => {
            format!("{}{}", &html[..start], &html[end + "</mx-reply>".len()..])
        }
        _ => html.to_owned(),
    }
}

/// Drops leading `> ` quote lines of a plain-text reply fallback.
pub(super) fn strip_reply_fallback(body: &str) -> &str {
    if !body.starts_with("> ") {
        return body;
    }
    let mut rest = body;
    while rest.starts_with('>') {
        rest = rest.split_once('\n').map_or("", |(_, tail)| tail);
    }
    rest.trim_start_matches('\n')
}
