//! Answers as Matrix messages: markdown rendered to `org.matrix.custom.html` for
//! `formatted_body`, and long answers split into parts that each fit in one event.
//!
//! See the spec's [rich text section](https://spec.matrix.org/latest/client-server-api/#mroommessage-msgtypes)
//! for the HTML subset clients render.

pub mod mrkdwn;
pub mod telegram;

use std::ops::Range;

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};

/// Most bytes of markdown in one part of an answer (one Matrix message).
///
/// Matrix refuses events over 65,536 bytes, counting the whole signed PDU. An answer that
/// streams in by edits is an `m.replace` event carrying the part four times: `body` and
/// `formatted_body`, and both again in `m.new_content`. 4 × 12 KB = 48 KB leaves ~17 KB for
/// HTML tags, JSON escaping and the event envelope (signatures, hashes, prev/auth events,
/// ~1–2 KB). HTML escaping can inflate markup well beyond its markdown (`&` → `&amp;`), so
/// [`formatted_part`] drops a `formatted_body` over [`MAX_HTML_BYTES`] and keeps the budget.
pub const MAX_PART_BYTES: usize = 12_000;

/// Most bytes of HTML sent as a part's `formatted_body`: 2 × (12 KB + 16 KB) = 56 KB per
/// edit event, still ~9 KB under the limit for escaping and the envelope.
pub const MAX_HTML_BYTES: usize = 16_000;

/// The markdown extensions models use: GitHub tables, `~~strikethrough~~`, `- [x]` task lists.
fn markdown_options() -> Options {
    Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS
}

/// `markdown` as Matrix HTML, or None when it has no markup and the plain `body` shows it
/// exactly (then no `formatted_body` is sent).
///
/// Raw HTML the model wrote is shown as text, never passed through; links keep only web,
/// mail and Matrix schemes; images that are not `mxc://` become links (clients show only
/// `mxc://` images, and fetching others would leak the reader's address); task-list boxes
/// become ☐/☑ since Matrix HTML has no `<input>`.
pub fn markdown_to_html(markdown: &str) -> Option<String> {
    if is_plain(markdown) {
        return None;
    }
    // What became of each open link or image, to end it the same way.
    let mut rewrites: Vec<Rewrite> = Vec::new();
    let events = Parser::new_ext(markdown, markdown_options()).filter_map(|event| {
        Some(match event {
            Event::Html(html) | Event::InlineHtml(html) => Event::Text(html),
            Event::Start(Tag::HtmlBlock) => Event::Start(Tag::Paragraph),
            Event::End(TagEnd::HtmlBlock) => Event::End(TagEnd::Paragraph),
            Event::TaskListMarker(done) => Event::Text(if done { "☑ " } else { "☐ " }.into()),
            Event::Start(Tag::Link {
                link_type,
                dest_url,
                title,
                id,
            }) => {
                if !is_safe_href(&dest_url) {
                    rewrites.push(Rewrite::Dropped);
                    return None;
                }
                rewrites.push(Rewrite::Kept);
                Event::Start(Tag::Link {
                    link_type,
                    dest_url,
                    title,
                    id,
                })
            }
            Event::Start(Tag::Image {
                link_type,
                dest_url,
                title,
                id,
            }) => {
                if dest_url.starts_with("mxc://") {
                    rewrites.push(Rewrite::Kept);
                    Event::Start(Tag::Image {
                        link_type,
                        dest_url,
                        title,
                        id,
                    })
                } else if is_safe_href(&dest_url) {
                    rewrites.push(Rewrite::AsLink);
                    Event::Start(Tag::Link {
                        link_type,
                        dest_url,
                        title,
                        id,
                    })
                } else {
                    rewrites.push(Rewrite::Dropped);
                    return None;
                }
            }
            Event::End(end @ (TagEnd::Link | TagEnd::Image)) => {
                match rewrites.pop().unwrap_or(Rewrite::Kept) {
                    Rewrite::Kept => Event::End(end),
                    Rewrite::AsLink => Event::End(TagEnd::Link),
                    Rewrite::Dropped => return None,
                }
            }
            other => other,
        })
    });
    let mut html = String::with_capacity(markdown.len() * 3 / 2);
    pulldown_cmark::html::push_html(&mut html, events);
    html.truncate(html.trim_end().len());
    Some(html)
}

/// The `formatted_body` for one part from [`split_answer`]: its HTML, or None when it has
/// no markup or the HTML outgrows [`MAX_HTML_BYTES`] (the part then goes as plain text).
pub fn formatted_part(part: &str) -> Option<String> {
    markdown_to_html(part)
        .map(|html| unwrap_single_paragraph(&html))
        .filter(|html| html.len() <= MAX_HTML_BYTES)
}

/// `<p>text</p>` → `text` when the HTML is that one paragraph, as Element sends a one-line
/// message; anything longer keeps its paragraphs.
fn unwrap_single_paragraph(html: &str) -> String {
    let trimmed = html.trim_end();
    match trimmed
        .strip_prefix("<p>")
        .and_then(|rest| rest.strip_suffix("</p>"))
    {
        Some(inner) if !inner.contains("<p>") && !inner.contains("</p>") => inner.to_owned(),
        _ => html.to_owned(),
    }
}

#[derive(Debug, Clone, Copy)]
enum Rewrite {
    Kept,
    AsLink,
    Dropped,
}

/// Whether a link target is one Matrix clients allow (`http`, `https`, `ftp`, `mailto`,
/// `magnet`, plus `matrix:` URIs). Relative targets mean nothing in a chat and are dropped.
fn is_safe_href(url: &str) -> bool {
    let Some((scheme, _)) = url.split_once(':') else {
        return false;
    };
    ["http", "https", "ftp", "mailto", "magnet", "matrix"]
        .iter()
        .any(|s| scheme.eq_ignore_ascii_case(s))
}

/// Whether the markdown renders as its own text: paragraphs of words whose text, spaces
/// aside, is all of the source (an escape or entity would lose characters). Inline or
/// block HTML counts as plain: we would only show it escaped, which is what the body shows.
fn is_plain(markdown: &str) -> bool {
    let mut rendered = String::with_capacity(markdown.len());
    for event in Parser::new_ext(markdown, markdown_options()) {
        match event {
            Event::Text(text) | Event::Html(text) | Event::InlineHtml(text) => {
                rendered.push_str(&text)
            }
            Event::Start(Tag::Paragraph | Tag::HtmlBlock)
            | Event::End(TagEnd::Paragraph | TagEnd::HtmlBlock)
            | Event::SoftBreak => {}
            _ => return false,
        }
    }
    let visible = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    visible(&rendered) == visible(markdown)
}

/// `text` split into parts of at most `max_bytes` each, for one message per part.
///
/// Cuts fall, in order of preference, between paragraphs (the blank lines are dropped),
/// at a line break, after a space, or at a character boundary — never inside a UTF-8
/// character, and between paragraphs only outside fenced code. A code block that must be
/// cut is closed at the end of one part and reopened with its own fence line at the start
/// of the next, so each part renders on its own. Text that fits is one part, unchanged.
///
/// `max_bytes` below 4 is taken as 4 (one character of any size must fit). Only when a
/// fence line is too long to leave room in a part for the fence to be closed and reopened
/// may a part end inside a code block without closing it.
pub fn split_answer(text: &str, max_bytes: usize) -> Vec<String> {
    let layout = Layout::new(text);
    plan(&layout, max_bytes)
        .into_iter()
        .map(|piece| piece.render(&layout))
        .collect()
}

/// One part of a split: a slice of the text, perhaps wrapped in a reopened and a closing
/// fence.
#[derive(Debug, Clone)]
struct Piece {
    /// The fence this part reopens at its start.
    reopen: Option<usize>,
    content: Range<usize>,
    /// The fence this part closes at its end. What lies between this part's content and
    /// the next one's is the separator the cut dropped.
    close: Option<usize>,
}

impl Piece {
    fn render(&self, layout: &Layout<'_>) -> String {
        let mut part = String::new();
        if let Some(f) = self.reopen {
            part.push_str(layout.fences[f].opener);
            part.push('\n');
        }
        part.push_str(&layout.text[self.content.clone()]);
        if let Some(f) = self.close {
            part.push('\n');
            part.push_str(&layout.fences[f].closer);
        }
        part
    }
}

/// How a line reads in fence terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineKind {
    Outside,
    Opener(usize),
    Body(usize),
    Closer(usize),
}

#[derive(Debug, Clone, Copy)]
struct Line {
    start: usize,
    /// Index of the ending `\n`, or the text's length for a last line without one.
    end: usize,
    kind: LineKind,
    blank: bool,
}

#[derive(Debug)]
struct Fence<'a> {
    /// The whole opening line (indentation, fence, info string), repeated to reopen.
    opener: &'a str,
    /// Indentation and fence characters, to close it.
    closer: String,
    mark: u8,
    len: usize,
}

/// A place the text may be cut: `start..end` is dropped; `fence` is set when the cut is
/// inside that fenced block (the part before closes it, the part after reopens it).
#[derive(Debug, Clone, Copy)]
struct Cut {
    start: usize,
    end: usize,
    fence: Option<usize>,
}

/// The text's lines, fenced blocks and the cuts between paragraphs and lines.
struct Layout<'a> {
    text: &'a str,
    lines: Vec<Line>,
    fences: Vec<Fence<'a>>,
    paragraph_cuts: Vec<Cut>,
    line_cuts: Vec<Cut>,
}

/// The fence run opening a line: indentation (bytes), fence character, run length, rest.
/// Any indentation counts, so fences inside list items count too.
fn fence_run(line: &str) -> Option<(usize, u8, usize, &str)> {
    let trimmed = line.trim_start_matches([' ', '\t']);
    let mark = *trimmed.as_bytes().first()?;
    if mark != b'`' && mark != b'~' {
        return None;
    }
    let len = trimmed.bytes().take_while(|&b| b == mark).count();
    (len >= 3).then(|| (line.len() - trimmed.len(), mark, len, &trimmed[len..]))
}

/// A line that opens a fenced block (a backtick fence's info string has no backtick).
fn opens_fence(line: &str) -> Option<(usize, u8, usize)> {
    let (indent, mark, len, rest) = fence_run(line)?;
    (mark == b'~' || !rest.contains('`')).then_some((indent, mark, len))
}

/// A line that closes a block opened by `len` × `mark`.
fn closes_fence(line: &str, mark: u8, len: usize) -> bool {
    fence_run(line).is_some_and(|(_, c, n, rest)| c == mark && n >= len && rest.trim().is_empty())
}

impl<'a> Layout<'a> {
    fn new(text: &'a str) -> Self {
        let mut lines = Vec::new();
        let mut fences: Vec<Fence<'a>> = Vec::new();
        let mut open: Option<usize> = None;
        let mut start = 0;
        while start < text.len() {
            let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
            let line = &text[start..end];
            let kind = match open {
                Some(f) if closes_fence(line, fences[f].mark, fences[f].len) => {
                    open = None;
                    LineKind::Closer(f)
                }
                Some(f) => LineKind::Body(f),
                None => match opens_fence(line) {
                    Some((indent, mark, len)) => {
                        fences.push(Fence {
                            opener: line,
                            closer: format!(
                                "{}{}",
                                &line[..indent],
                                char::from(mark).to_string().repeat(len)
                            ),
                            mark,
                            len,
                        });
                        open = Some(fences.len() - 1);
                        LineKind::Opener(fences.len() - 1)
                    }
                    None => LineKind::Outside,
                },
            };
            let blank = line.trim().is_empty();
            lines.push(Line {
                start,
                end,
                kind,
                blank,
            });
            start = end + 1;
        }

        // Between paragraphs: a run of blank lines outside code, with text on both sides.
        let mut paragraph_cuts = Vec::new();
        let mut last_text: Option<usize> = None;
        for (i, line) in lines.iter().enumerate() {
            if line.blank && line.kind == LineKind::Outside {
                continue;
            }
            if let Some(p) = last_text
                && p + 1 < i
                && matches!(line.kind, LineKind::Outside | LineKind::Opener(_))
            {
                paragraph_cuts.push(Cut {
                    start: lines[p].end,
                    end: line.start,
                    fence: None,
                });
            }
            last_text = Some(i);
        }

        // At a line break: between two lines of text, or two lines inside one code block
        // (not right after its opening line, nor right before its closing one).
        let line_cuts = lines
            .windows(2)
            .filter_map(|pair| {
                let (a, b) = (pair[0], pair[1]);
                let fence = match (a.kind, b.kind) {
                    (
                        LineKind::Outside | LineKind::Closer(_),
                        LineKind::Outside | LineKind::Opener(_),
                    ) if !a.blank && !b.blank => None,
                    (LineKind::Body(f), LineKind::Body(g)) if f == g => Some(f),
                    _ => return None,
                };
                Some(Cut {
                    start: a.end,
                    end: b.start,
                    fence,
                })
            })
            .collect();

        Self {
            text,
            lines,
            fences,
            paragraph_cuts,
            line_cuts,
        }
    }

    fn reopen_len(&self, fence: Option<usize>) -> usize {
        fence.map_or(0, |f| self.fences[f].opener.len() + 1)
    }

    fn close_len(&self, fence: Option<usize>) -> usize {
        fence.map_or(0, |f| self.fences[f].closer.len() + 1)
    }

    /// The farthest cut after `pos` whose part, with `budget` bytes for content and closing
    /// fence, fits; trying paragraph breaks, then line breaks, then spaces, then characters.
    fn best_cut(&self, pos: usize, budget: usize) -> Option<Cut> {
        let fits = |c: &Cut| c.start > pos && c.start - pos + self.close_len(c.fence) <= budget;
        for cuts in [&self.paragraph_cuts, &self.line_cuts] {
            let end = cuts.partition_point(|c| c.start <= pos + budget);
            if let Some(cut) = cuts[..end]
                .iter()
                .rev()
                .take_while(|c| c.start > pos)
                .find(|c| fits(c))
            {
                return Some(*cut);
            }
        }
        self.inline_cut(pos, budget, true)
            .or_else(|| self.inline_cut(pos, budget, false))
    }

    /// The farthest cut inside a line after `pos`: at a space (dropped) when `at_space`,
    /// else at any character boundary. Spaces only outside code, where dropping one at the
    /// cut changes nothing; never where either side of the cut would read as a fence line.
    fn inline_cut(&self, pos: usize, budget: usize, at_space: bool) -> Option<Cut> {
        let text = self.text;
        let limit = pos + budget;
        let first = self.lines.partition_point(|l| l.end <= pos);
        let candidates = self.lines[first..]
            .iter()
            .take_while(|l| l.start < limit)
            .collect::<Vec<_>>();
        for line in candidates.into_iter().rev() {
            let fence = match line.kind {
                LineKind::Outside => None,
                LineKind::Body(f) if !at_space => Some(f),
                _ => continue,
            };
            let Some(hi) = limit.checked_sub(self.close_len(fence)) else {
                continue;
            };
            let lo = pos.max(line.start);
            let hi = hi.min(line.end.saturating_sub(1));
            for p in (lo + 1..=hi).rev() {
                if !text.is_char_boundary(p) {
                    continue;
                }
                let end = if at_space {
                    if text.as_bytes()[p] != b' ' || p + 1 >= line.end {
                        continue;
                    }
                    p + 1
                } else {
                    p
                };
                let (before, after) = (&text[line.start..p], &text[end..line.end]);
                let breaks_fence = match fence {
                    None => opens_fence(before).is_some() || opens_fence(after).is_some(),
                    Some(f) => {
                        let (mark, len) = (self.fences[f].mark, self.fences[f].len);
                        closes_fence(before, mark, len) || closes_fence(after, mark, len)
                    }
                };
                if !breaks_fence {
                    return Some(Cut {
                        start: p,
                        end,
                        fence,
                    });
                }
            }
        }
        None
    }
}

/// The parts `text` splits into; see [`split_answer`].
fn plan(layout: &Layout<'_>, max_bytes: usize) -> Vec<Piece> {
    let text = layout.text;
    let max = max_bytes.max(4);
    let mut pieces = Vec::new();
    let (mut pos, mut reopen) = (0, None);
    loop {
        if pos == text.len() && !pieces.is_empty() {
            // A forced cut took the rest.
            return pieces;
        }
        let reopen_len = layout.reopen_len(reopen);
        if reopen_len + text.len() - pos <= max {
            pieces.push(Piece {
                reopen,
                content: pos..text.len(),
                close: None,
            });
            return pieces;
        }
        let cut = max
            .checked_sub(reopen_len)
            .and_then(|budget| layout.best_cut(pos, budget));
        let (piece_reopen, cut) = match cut {
            Some(cut) => (reopen, cut),
            // Nothing fits around the fences (a fence line too long for the part size): cut
            // at the last character that fits, reopening the fence only if one fits after it.
            // `max` ≥ 4 bytes, so at least one character always fits.
            None => {
                let after_reopen = text.floor_char_boundary(pos + max.saturating_sub(reopen_len));
                let (kept, p) = if reopen.is_some() && after_reopen > pos {
                    (reopen, after_reopen)
                } else {
                    (None, text.floor_char_boundary(pos + max))
                };
                let cut = Cut {
                    start: p,
                    end: p,
                    fence: None,
                };
                (kept, cut)
            }
        };
        pieces.push(Piece {
            reopen: piece_reopen,
            content: pos..cut.start,
            close: cut.fence,
        });
        pos = cut.end;
        reopen = cut.fence;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use pulldown_cmark::CodeBlockKind;

    use super::*;

    /// The parts, checking that their contents plus the dropped separators (whitespace
    /// only) are the text again, in order.
    fn split_checked(text: &str, max: usize) -> Vec<String> {
        let layout = Layout::new(text);
        let pieces = plan(&layout, max);
        let mut rebuilt = String::new();
        let mut end = 0;
        for piece in &pieces {
            let separator = &text[end..piece.content.start];
            assert!(separator.trim().is_empty(), "dropped {separator:?}");
            assert!(
                !piece.content.is_empty() || text.is_empty(),
                "an empty part"
            );
            rebuilt.push_str(separator);
            rebuilt.push_str(&text[piece.content.clone()]);
            end = piece.content.end;
        }
        assert_eq!(rebuilt, text, "the parts must rebuild the text");
        let parts: Vec<String> = pieces.iter().map(|p| p.render(&layout)).collect();
        assert_eq!(parts, split_answer(text, max));
        parts
    }

    /// Fenced code blocks that run to the end of `markdown` unclosed, as pulldown-cmark
    /// (an independent parser) sees them.
    fn unclosed_fences(markdown: &str) -> usize {
        Parser::new(markdown)
            .into_offset_iter()
            .filter(|(event, range)| {
                let Event::Start(Tag::CodeBlock(CodeBlockKind::Fenced(_))) = event else {
                    return false;
                };
                let block = markdown[range.clone()].trim_end();
                let mut lines = block.lines();
                let opener = lines.next().unwrap_or_default();
                let (_, mark, len, _) =
                    fence_run(opener).expect("a fenced block opens with a fence");
                !lines
                    .next_back()
                    .is_some_and(|last| closes_fence(last, mark, len))
            })
            .count()
    }

    #[test]
    fn the_oracle_sees_unclosed_fences() {
        assert_eq!(unclosed_fences("```rust\nfn main() {}\n```"), 0);
        assert_eq!(unclosed_fences("```rust\nfn main() {}\n"), 1);
        assert_eq!(unclosed_fences("````\n```\n"), 1);
        assert_eq!(unclosed_fences("~~~\n```\n~~~\n"), 0);
    }

    #[test]
    fn plain_text_needs_no_formatted_body() {
        assert_eq!(markdown_to_html("Hello there, how are you?"), None);
        assert_eq!(
            markdown_to_html("One line.\nAnother line.\n\nA paragraph."),
            None
        );
        assert_eq!(markdown_to_html("Prices rose 5% * 2 today"), None);
        assert_eq!(markdown_to_html("see https://example.org/a_b_c"), None);
        assert!(markdown_to_html("a **bold** claim").is_some());
        // An escape or an entity renders differently from the body, so it is markup.
        assert!(markdown_to_html(r"not \*emphasis\*").is_some());
        assert!(markdown_to_html("fish &amp; chips").is_some());
    }

    #[test]
    fn renders_tables_strikethrough_and_task_lists() {
        let html = markdown_to_html(
            "| agent | model |\n|---|:-:|\n| damon | gpt-4o |\n\n~~old~~ new\n\n- [x] done\n- [ ] todo",
        )
        .unwrap();
        assert!(html.contains("<table>"), "{html}");
        assert!(html.contains("<th>agent</th>"), "{html}");
        assert!(html.contains("<td>damon</td>"), "{html}");
        assert!(html.contains("<del>old</del>"), "{html}");
        assert!(html.contains("<li>☑ done</li>"), "{html}");
        assert!(html.contains("<li>☐ todo</li>"), "{html}");
        assert!(!html.contains("<input"), "{html}");
    }

    #[test]
    fn code_blocks_keep_their_language() {
        let html = markdown_to_html("Try:\n\n```rust\nlet x = 1 < 2;\n```").unwrap();
        assert!(
            html.contains(r#"<pre><code class="language-rust">let x = 1 &lt; 2;"#),
            "{html}"
        );
    }

    #[test]
    fn raw_html_is_shown_escaped_not_passed_through() {
        let html = markdown_to_html("**hi** <script>alert(1)</script> <b>x</b>").unwrap();
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<b>"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );

        let block = markdown_to_html("# Title\n\n<div onclick=\"x()\">\nhello\n</div>").unwrap();
        assert!(!block.contains("<div"), "{block}");
        assert!(block.contains("&lt;div onclick=\"x()\"&gt;"), "{block}");
    }

    #[test]
    fn only_safe_links_and_mxc_images_survive() {
        let html = markdown_to_html(
            "[ok](https://example.org) [bad](javascript:alert(1)) ![cat](https://e.org/c.png) ![pic](mxc://hs/abc)",
        )
        .unwrap();
        assert!(
            html.contains(r#"<a href="https://example.org">ok</a>"#),
            "{html}"
        );
        assert!(!html.contains("javascript"), "{html}");
        assert!(
            html.contains("bad"),
            "the text of a dropped link stays: {html}"
        );
        assert!(
            html.contains(r#"<a href="https://e.org/c.png">cat</a>"#),
            "{html}"
        );
        assert!(
            html.contains(r#"<img src="mxc://hs/abc" alt="pic""#),
            "{html}"
        );
    }

    #[test]
    fn html_over_the_budget_is_not_sent() {
        let part = format!("**many** {}", "&".repeat(MAX_PART_BYTES / 5 * 4));
        assert!(markdown_to_html(&part).is_some());
        assert_eq!(formatted_part(&part), None);
    }

    #[test]
    fn short_text_is_one_unchanged_part() {
        let text = "# Hi\n\n```\ncode\n```\n\n";
        assert_eq!(split_checked(text, 100), vec![text.to_owned()]);
        assert_eq!(split_checked("", 10), vec![String::new()]);
    }

    #[test]
    fn cuts_between_paragraphs_first() {
        let text = "first paragraph here\n\nsecond one\nstill second\n\n\nthird";
        assert_eq!(
            split_checked(text, 25),
            vec!["first paragraph here", "second one\nstill second", "third"]
        );
        // Paragraphs that fit together stay together.
        assert_eq!(
            split_checked(text, 40),
            vec![
                "first paragraph here",
                "second one\nstill second\n\n\nthird"
            ]
        );
    }

    #[test]
    fn a_long_paragraph_is_cut_at_lines_then_spaces_then_characters() {
        assert_eq!(
            split_checked("aaaa bbbb\ncccc dddd\neeee", 12),
            vec!["aaaa bbbb", "cccc dddd", "eeee"]
        );
        assert_eq!(
            split_checked("aaaa bbbb cccc", 10),
            vec!["aaaa bbbb", "cccc"]
        );
        assert_eq!(split_checked("abcdefghij", 4), vec!["abcd", "efgh", "ij"]);
    }

    #[test]
    fn cjk_text_is_never_cut_inside_a_character() {
        let text = "漢字のテキストです。".repeat(50);
        let parts = split_checked(&text, 100);
        assert!(parts.len() > 1);
        for part in &parts {
            assert!(part.len() <= 100);
        }
        assert_eq!(parts.concat(), text);
    }

    #[test]
    fn a_code_block_straddling_the_limit_moves_to_the_next_part_whole() {
        let intro = "x".repeat(80);
        let code = format!("```python\n{}```", "print('hello')\n".repeat(4));
        let text = format!("{intro}\n\n{code}\n\nbye");
        let parts = split_checked(&text, 100);
        assert_eq!(parts, vec![intro, format!("{code}\n\nbye")]);
    }

    #[test]
    fn a_code_block_longer_than_a_part_is_closed_and_reopened() {
        let line = "let value = compute();\n";
        let text = format!(
            "Here:\n\n~~~~rust title=\"a\"\n{}~~~~\n\nDone.",
            line.repeat(20)
        );
        let parts = split_checked(&text, 150);
        assert!(parts.len() > 2, "{parts:#?}");
        for (i, part) in parts.iter().enumerate() {
            assert!(part.len() <= 150, "{part}");
            assert_eq!(unclosed_fences(part), 0, "part {i}: {part}");
            if i > 1 {
                assert!(
                    part.starts_with("~~~~rust title=\"a\"\n"),
                    "part {i}: {part}"
                );
            }
        }
        assert_eq!(parts[0], "Here:");
        assert!(parts[1].ends_with("\n~~~~"));
        assert!(parts.last().unwrap().ends_with("~~~~\n\nDone."));
    }

    #[test]
    fn a_huge_code_line_is_cut_inside_the_fence() {
        let text = format!("```\n{}\n```", "é".repeat(100));
        let parts = split_checked(&text, 60);
        for part in &parts {
            assert!(part.len() <= 60, "{part}");
            assert_eq!(unclosed_fences(part), 0, "{part}");
        }
    }

    #[test]
    fn a_cut_never_makes_text_read_as_a_fence() {
        // Cutting at the space would start the next part with "```rust", a fence.
        let text = format!("{} ```rust", "word".repeat(5));
        for part in split_checked(&text, 24) {
            assert_eq!(opens_fence(&part), None, "{part}");
        }
    }

    #[test]
    fn fence_lines_longer_than_a_part_still_respect_the_limit() {
        // Found by proptest: a fence reopened with no room for a character after it, and a
        // cut that took the rest of the text.
        let cases = [
            ("~~~~\naaa  aa~\n \naaa~\n~漢😀😀", 7),
            (
                "~~~😀😀😀漢\n漢漢漢😀漢~a ~ 漢😀😀\n a漢😀 a😀漢漢~漢漢漢😀\naaa~\n a漢 a~aaa",
                8,
            ),
        ];
        for (text, max) in cases {
            for part in split_checked(text, max) {
                assert!(part.len() <= max, "{part:?}");
            }
        }
    }

    /// Documents of paragraphs (ASCII, CJK, emoji, stray backticks) and fenced blocks with
    /// either fence character, fences of 3–5, info strings and inner fence-like lines.
    fn document() -> impl Strategy<Value = String> {
        let word = prop::sample::select(vec![
            "alpha",
            "beta",
            "漢字テキスト",
            "😀",
            "`code`",
            "**bold**",
            "a```b",
            "~~x~~",
            "ünïcødé",
            "``",
            "https://example.org/x",
        ]);
        let line = prop::collection::vec(word, 1..12).prop_map(|w| w.join(" "));
        let paragraph = prop::collection::vec(line, 1..5).prop_map(|l| l.join("\n"));
        let code_line = prop::sample::select(vec![
            "fn main() {}",
            "    let x = \"漢字\";",
            "",
            "``",
            "~~~",
            "```",
            "a".repeat(70).leak(),
        ]);
        let code = (
            prop::sample::select(vec![b'`', b'~']),
            3usize..6,
            prop::sample::select(vec!["", "rust", "python title=\"x\""]),
            prop::collection::vec(code_line, 0..25),
        )
            .prop_map(|(mark, len, info, body)| {
                let fence = char::from(mark).to_string().repeat(len);
                // A body line that would close the block is not a body line.
                let body: Vec<&str> = body
                    .into_iter()
                    .filter(|l| !closes_fence(l, mark, len))
                    .collect();
                let mut block = format!("{fence}{info}\n");
                for line in body {
                    block.push_str(line);
                    block.push('\n');
                }
                block.push_str(&fence);
                block
            });
        let block = prop_oneof![3 => paragraph, 2 => code];
        let separator = prop::sample::select(vec!["\n\n", "\n\n\n", "\n  \n", "\n"]);
        prop::collection::vec((block, separator), 1..12).prop_map(|blocks| {
            blocks
                .into_iter()
                .map(|(b, s)| format!("{b}{s}"))
                .collect::<String>()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn every_part_fits_and_renders_on_its_own(text in document(), max in 64usize..600) {
            let parts = split_checked(&text, max);
            prop_assert!(!parts.is_empty());
            if text.len() <= max {
                prop_assert_eq!(&parts, &vec![text.clone()]);
            }
            prop_assert_eq!(unclosed_fences(&text), 0);
            for part in &parts {
                prop_assert!(part.len() <= max, "{} bytes > {}: {:?}", part.len(), max, part);
                prop_assert_eq!(unclosed_fences(part), 0, "unclosed fence in {:?}", part);
            }
        }

        #[test]
        fn any_text_splits_within_the_limit(text in "[a-z `~\\n漢😀]{0,300}", max in 4usize..40) {
            for part in split_checked(&text, max) {
                prop_assert!(part.len() <= max, "{} bytes > {}: {:?}", part.len(), max, part);
            }
        }
    }
}
