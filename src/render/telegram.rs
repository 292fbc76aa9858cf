//! Markdown as Telegram's HTML subset, for `sendMessage` with `parse_mode: HTML`
//! ([formatting options](https://core.telegram.org/bots/api#formatting-options)): `b`, `i`,
//! `s`, `code`, `pre`, `a`, `blockquote`, with `<`, `>` and `&` escaped everywhere else.
//! Telegram has no lists, headings or tables, so those become text: bullets, bold lines,
//! cells apart by `|`.

use pulldown_cmark::{CodeBlockKind, Event, Options, Parser, Tag, TagEnd};

/// `text` with the three characters Telegram's HTML parser reads escaped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            other => out.push(other),
        }
    }
    out
}

/// Ends the line, unless it just ended.
fn line_end(out: &mut String) {
    if !out.ends_with('\n') {
        out.push('\n');
    }
}

/// Whether Telegram opens a link of this target: web, mail and `tg:` links.
fn is_safe_href(url: &str) -> bool {
    let Some((scheme, _)) = url.split_once(':') else {
        return false;
    };
    ["http", "https", "mailto", "tg"]
        .iter()
        .any(|s| scheme.eq_ignore_ascii_case(s))
}

/// `markdown` as Telegram HTML. Raw HTML the model wrote is shown as text; links to
/// other schemes keep only their text; images become links to them.
pub fn markdown_to_html(markdown: &str) -> String {
    let options =
        Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS;
    let mut out = String::with_capacity(markdown.len() + markdown.len() / 4);
    // Per open list: the next number, or None for bullets.
    let mut lists: Vec<Option<u64>> = Vec::new();
    // Per open link or image: whether its `<a>` was written.
    let mut links: Vec<bool> = Vec::new();
    let mut cell = 0usize;
    let block_end = |out: &mut String| {
        if !out.is_empty() && !out.ends_with("\n\n") {
            out.push_str(if out.ends_with('\n') { "\n" } else { "\n\n" });
        }
    };
    for event in Parser::new_ext(markdown, options) {
        match event {
            Event::Text(text) => out.push_str(&escape(&text)),
            Event::Code(code) => {
                out.push_str("<code>");
                out.push_str(&escape(&code));
                out.push_str("</code>");
            }
            Event::Html(html) | Event::InlineHtml(html) => out.push_str(&escape(&html)),
            Event::SoftBreak | Event::HardBreak => out.push('\n'),
            Event::Rule => {
                block_end(&mut out);
                out.push_str("———\n\n");
            }
            Event::TaskListMarker(done) => out.push_str(if done { "☑ " } else { "☐ " }),
            Event::FootnoteReference(name) => out.push_str(&escape(&format!("[{name}]"))),
            Event::InlineMath(m) | Event::DisplayMath(m) => out.push_str(&escape(&m)),
            Event::Start(tag) => match tag {
                Tag::Paragraph | Tag::HtmlBlock => {}
                Tag::Heading { .. } => {
                    block_end(&mut out);
                    out.push_str("<b>");
                }
                Tag::BlockQuote(_) => {
                    block_end(&mut out);
                    out.push_str("<blockquote>");
                }
                Tag::CodeBlock(kind) => {
                    block_end(&mut out);
                    match kind {
                        CodeBlockKind::Fenced(lang) if !lang.trim().is_empty() => {
                            let lang = lang.split_whitespace().next().unwrap_or_default();
                            out.push_str(&format!(
                                "<pre><code class=\"language-{}\">",
                                escape(lang)
                            ));
                        }
                        _ => out.push_str("<pre><code>"),
                    }
                }
                Tag::List(start) => {
                    if lists.is_empty() {
                        block_end(&mut out);
                    } else if !out.ends_with('\n') {
                        out.push('\n');
                    }
                    lists.push(start);
                }
                Tag::Item => {
                    let depth = lists.len().saturating_sub(1);
                    out.push_str(&"  ".repeat(depth));
                    match lists.last_mut() {
                        Some(Some(n)) => {
                            out.push_str(&format!("{n}. "));
                            *n += 1;
                        }
                        _ => out.push_str("• "),
                    }
                }
                Tag::Emphasis => out.push_str("<i>"),
                Tag::Strong => out.push_str("<b>"),
                Tag::Strikethrough => out.push_str("<s>"),
                Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. } => {
                    let safe = is_safe_href(&dest_url);
                    if safe {
                        out.push_str(&format!("<a href=\"{}\">", escape(&dest_url)));
                    }
                    links.push(safe);
                }
                Tag::Table(_) => {
                    block_end(&mut out);
                }
                Tag::TableHead | Tag::TableRow => cell = 0,
                Tag::TableCell => {
                    if cell > 0 {
                        out.push_str(" | ");
                    }
                    cell += 1;
                }
                _ => {}
            },
            Event::End(end) => match end {
                TagEnd::Paragraph | TagEnd::HtmlBlock => {
                    if lists.is_empty() {
                        block_end(&mut out);
                    } else if !out.ends_with('\n') {
                        out.push('\n');
                    }
                }
                TagEnd::Heading(_) => {
                    out.push_str("</b>");
                    block_end(&mut out);
                }
                TagEnd::BlockQuote(_) => {
                    while out.ends_with('\n') {
                        out.pop();
                    }
                    out.push_str("</blockquote>");
                    block_end(&mut out);
                }
                TagEnd::CodeBlock => {
                    if out.ends_with('\n') {
                        out.pop();
                    }
                    out.push_str("</code></pre>");
                    block_end(&mut out);
                }
                TagEnd::List(_) => {
                    lists.pop();
                    if lists.is_empty() {
                        block_end(&mut out);
                    }
                }
                TagEnd::Item => line_end(&mut out),
                TagEnd::Emphasis => out.push_str("</i>"),
                TagEnd::Strong => out.push_str("</b>"),
                TagEnd::Strikethrough => out.push_str("</s>"),
                TagEnd::Link | TagEnd::Image => {
                    let opened = links.pop().unwrap_or(false);
                    out.push_str(if opened { "</a>" } else { "" });
                }
                TagEnd::TableHead | TagEnd::TableRow => out.push('\n'),
                TagEnd::Table => block_end(&mut out),
                _ => {}
            },
        }
    }
    out.truncate(out.trim_end().len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_markup_becomes_telegrams_tags_and_the_rest_is_escaped() {
        assert_eq!(
            markdown_to_html("Here is **bold**, *it*, ~~gone~~ & `a<b>` <script>"),
            "Here is <b>bold</b>, <i>it</i>, <s>gone</s> &amp; <code>a&lt;b&gt;</code> \
             &lt;script&gt;"
        );
        assert_eq!(markdown_to_html("plain words"), "plain words");
        assert_eq!(markdown_to_html("1 < 2 > 0"), "1 &lt; 2 &gt; 0");
    }

    #[test]
    fn code_blocks_are_pre_with_their_language() {
        assert_eq!(
            markdown_to_html("Look:\n\n```rust\nlet a = 1 < 2;\n```\n\nDone."),
            "Look:\n\n<pre><code class=\"language-rust\">let a = 1 &lt; 2;</code></pre>\n\nDone."
        );
        assert_eq!(
            markdown_to_html("    indented & code\n"),
            "<pre><code>indented &amp; code</code></pre>"
        );
    }

    #[test]
    fn links_keep_safe_targets_only() {
        assert_eq!(
            markdown_to_html("[docs](https://example.org/?a=1&b=\"2\")"),
            "<a href=\"https://example.org/?a=1&amp;b=&quot;2&quot;\">docs</a>"
        );
        assert_eq!(markdown_to_html("[x](javascript:alert(1))"), "x");
        assert_eq!(
            markdown_to_html("![cat](https://example.org/cat.png)"),
            "<a href=\"https://example.org/cat.png\">cat</a>"
        );
    }

    #[test]
    fn blocks_without_a_tag_become_text() {
        assert_eq!(
            markdown_to_html("# Title\n\n- one\n- two\n  1. a\n  2. b\n\nafter"),
            "<b>Title</b>\n\n• one\n• two\n  1. a\n  2. b\n\nafter"
        );
        assert_eq!(
            markdown_to_html("> quoted\n\nnext"),
            "<blockquote>quoted</blockquote>\n\nnext"
        );
        assert_eq!(
            markdown_to_html("| a | b |\n|---|---|\n| 1 | 2 |"),
            "a | b\n1 | 2"
        );
        assert_eq!(
            markdown_to_html("- [x] done\n- [ ] todo"),
            "• ☑ done\n• ☐ todo"
        );
    }
}
