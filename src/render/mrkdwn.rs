//! Markdown as Slack's `mrkdwn`, the markup `chat.postMessage` renders in `text`
//! ([Formatting text for app surfaces](https://api.slack.com/reference/surfaces/formatting)):
//! `*bold*`, `_italic_`, `~strike~`, `` `code` ``, ```` ``` ```` blocks, `<url|text>`
//! links and `>` quotes. Slack has no headings, tables or nested emphasis of one kind, so
//! headings become bold lines, tables rows of `a | b`, and list items `•` or `1.` lines.
//! `&`, `<` and `>` in text are escaped as the page asks, so a model's text never becomes
//! a link, a mention or `@channel`.

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};

/// `markdown` as Slack mrkdwn.
pub fn markdown_to_mrkdwn(markdown: &str) -> String {
    let options =
        Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS;
    let mut writer = Writer::default();
    for event in Parser::new_ext(markdown, options) {
        writer.event(event);
    }
    writer.out
}

/// The text of a link being written, and where it goes.
struct Link {
    url: String,
    label: String,
}

#[derive(Default)]
struct Writer {
    out: String,
    /// Line breaks owed before the next text (1: a new line, 2: a blank line); paid only
    /// when text follows, so nothing ends in empty lines.
    breaks: usize,
    /// How many `>` quotes the current line is in.
    quotes: usize,
    /// The open lists, innermost last: the next number of an ordered one.
    lists: Vec<Option<u64>>,
    /// A list item's marker was just written: its first paragraph stays on its line.
    fresh_item: bool,
    /// Bold spans open (a heading counts as one): Slack does not nest `*`.
    bold: usize,
    links: Vec<Link>,
    /// The cell of the current table row, for the ` | ` between cells.
    cell: usize,
    in_table_head: bool,
}

impl Writer {
    fn event(&mut self, event: Event<'_>) {
        match event {
            Event::Start(tag) => self.start(tag),
            Event::End(tag) => self.end(tag),
            Event::Text(text) | Event::Html(text) | Event::InlineHtml(text) => self.text(&text),
            Event::Code(code) => {
                self.raw("`");
                self.text(&code);
                self.raw("`");
            }
            Event::SoftBreak | Event::HardBreak => self.line_break(1),
            Event::Rule => {
                self.line_break(2);
                self.raw("———");
                self.line_break(2);
            }
            Event::TaskListMarker(done) => self.raw(if done { "☑ " } else { "☐ " }),
            Event::FootnoteReference(name) => self.text(&format!("[{name}]")),
            Event::InlineMath(math) | Event::DisplayMath(math) => self.text(&math),
        }
    }

    fn start(&mut self, tag: Tag<'_>) {
        match tag {
            // A list item's first paragraph stays on the marker's line.
            Tag::Paragraph if !self.fresh_item => self.block(2),
            Tag::Heading { .. } => {
                self.block(2);
                self.open_bold();
            }
            Tag::BlockQuote(_) => {
                self.block(2);
                self.quotes += 1;
            }
            Tag::CodeBlock(_) => {
                // Without the language: Slack would show it as the code's first line.
                self.block(2);
                self.raw("```");
                self.line_break(1);
            }
            Tag::List(first) => {
                self.block(if self.lists.is_empty() { 2 } else { 1 });
                self.lists.push(first);
            }
            Tag::Item => {
                self.block(1);
                let depth = self.lists.len().saturating_sub(1);
                let marker = match self.lists.last_mut() {
                    Some(Some(n)) => {
                        *n += 1;
                        format!("{}. ", *n - 1)
                    }
                    _ => "• ".to_owned(),
                };
                self.raw(&format!("{}{marker}", "    ".repeat(depth)));
                self.fresh_item = true;
            }
            Tag::Table(_) => self.block(2),
            Tag::TableHead => {
                self.in_table_head = true;
                self.cell = 0;
            }
            Tag::TableRow => {
                self.block(1);
                self.cell = 0;
            }
            Tag::TableCell => {
                if self.cell > 0 {
                    self.raw(" | ");
                }
                self.cell += 1;
                if self.in_table_head {
                    self.open_bold();
                }
            }
            Tag::Emphasis => self.raw("_"),
            Tag::Strong => self.open_bold(),
            Tag::Strikethrough => self.raw("~"),
            Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. } => self.links.push(Link {
                url: dest_url.into_string(),
                label: String::new(),
            }),
            _ => {}
        }
    }

    fn end(&mut self, tag: TagEnd) {
        match tag {
            TagEnd::Heading(_) => self.close_bold(),
            TagEnd::BlockQuote(_) => {
                self.quotes = self.quotes.saturating_sub(1);
                self.line_break(2);
            }
            TagEnd::CodeBlock => {
                self.line_break(1);
                self.raw("```");
            }
            TagEnd::List(_) => {
                self.lists.pop();
            }
            TagEnd::Item => self.fresh_item = false,
            TagEnd::TableHead => {
                self.in_table_head = false;
                self.block(1);
            }
            TagEnd::TableCell if self.in_table_head => self.close_bold(),
            TagEnd::Emphasis => self.raw("_"),
            TagEnd::Strong => self.close_bold(),
            TagEnd::Strikethrough => self.raw("~"),
            TagEnd::Link | TagEnd::Image => {
                if let Some(link) = self.links.pop() {
                    let url = link_target(&link.url);
                    let label = link.label.trim();
                    if label.is_empty() || label == escape(&link.url) {
                        self.raw(&format!("<{url}>"));
                    } else {
                        self.raw(&format!("<{url}|{}>", label.replace('|', "¦")));
                    }
                }
            }
            _ => {}
        }
    }

    fn open_bold(&mut self) {
        if self.bold == 0 {
            self.raw("*");
        }
        self.bold += 1;
    }

    fn close_bold(&mut self) {
        self.bold = self.bold.saturating_sub(1);
        if self.bold == 0 {
            self.raw("*");
        }
    }

    /// A new block: at least `breaks` line breaks before its text, unless it opens the
    /// message.
    fn block(&mut self, breaks: usize) {
        self.fresh_item = false;
        self.line_break(breaks);
    }

    fn line_break(&mut self, breaks: usize) {
        if !self.out.is_empty() && self.links.is_empty() {
            self.breaks = self.breaks.max(breaks);
        } else if let Some(link) = self.links.last_mut() {
            link.label.push(' ');
        }
    }

    /// Text of the message, escaped; its own line breaks keep the quote prefix.
    fn text(&mut self, text: &str) {
        for (n, line) in text.split('\n').enumerate() {
            if n > 0 {
                // Counted, not merged: a code block keeps its blank lines.
                if self.out.is_empty() || !self.links.is_empty() {
                    self.line_break(1);
                } else {
                    self.breaks += 1;
                }
            }
            if !line.is_empty() {
                self.raw(&escape(line));
            }
        }
    }

    /// Markup (or escaped text) as it is, after the line breaks owed.
    fn raw(&mut self, markup: &str) {
        if let Some(link) = self.links.last_mut() {
            // A label is plain text: Slack shows markup inside `<url|…>` literally.
            if !matches!(markup, "*" | "_" | "~" | "`") {
                link.label.push_str(markup);
            }
            return;
        }
        self.fresh_item = false;
        if self.breaks > 0 {
            let prefix = "> ".repeat(self.quotes);
            for _ in 0..self.breaks {
                self.out.truncate(self.out.trim_end_matches(' ').len());
                self.out.push('\n');
                self.out.push_str(&prefix);
            }
            self.breaks = 0;
        } else if self.out.is_empty() {
            self.out.push_str(&"> ".repeat(self.quotes));
        }
        self.out.push_str(markup);
    }
}

/// `&`, `<` and `>` as the entities Slack reads them as.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// A URL as the target of `<url|label>`: what would end or split the link is
/// percent-encoded.
fn link_target(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    for c in url.chars() {
        match c {
            '<' => out.push_str("%3C"),
            '>' => out.push_str("%3E"),
            '|' => out.push_str("%7C"),
            ' ' => out.push_str("%20"),
            '&' => out.push_str("&amp;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::markdown_to_mrkdwn as md;

    #[test]
    fn inline_markup_becomes_slacks() {
        assert_eq!(md("**bold** and *italic*"), "*bold* and _italic_");
        assert_eq!(md("__bold__ and _italic_"), "*bold* and _italic_");
        assert_eq!(md("~~gone~~ `x + 1`"), "~gone~ `x + 1`");
        assert_eq!(md("***both***"), "_*both*_");
        assert_eq!(
            md("**bold with *italic* inside**"),
            "*bold with _italic_ inside*"
        );
        assert_eq!(md("plain text"), "plain text");
    }

    #[test]
    fn links_take_slacks_angle_brackets() {
        assert_eq!(
            md("see [the docs](https://api.slack.com/methods) now"),
            "see <https://api.slack.com/methods|the docs> now"
        );
        assert_eq!(md("<https://example.org>"), "<https://example.org>");
        assert_eq!(
            md("[**bold** label](https://x.org/?a=1&b=2)"),
            "<https://x.org/?a=1&amp;b=2|bold label>",
            "markup is dropped from a label, & is escaped"
        );
        assert_eq!(
            md("![a cat](https://x.org/cat.png)"),
            "<https://x.org/cat.png|a cat>"
        );
    }

    #[test]
    fn text_is_escaped_so_it_cannot_mention_or_link() {
        assert_eq!(md("a < b && c > d"), "a &lt; b &amp;&amp; c &gt; d");
        assert_eq!(md("<!channel> hi"), "&lt;!channel&gt; hi");
        assert_eq!(md("`<@U123>`"), "`&lt;@U123&gt;`");
    }

    #[test]
    fn code_blocks_keep_their_lines_without_the_language() {
        assert_eq!(md("```\na\n\n\nb\n```"), "```\na\n\n\nb\n```");
        assert_eq!(
            md("Run:\n\n```rust\nlet a = 1 < 2;\nprintln!(\"{a}\");\n```\n\ndone"),
            "Run:\n\n```\nlet a = 1 &lt; 2;\nprintln!(\"{a}\");\n```\n\ndone"
        );
    }

    #[test]
    fn blocks_are_lines_slack_shows() {
        assert_eq!(
            md("# Title\n\nSome text\nmore\n\n- one\n- two\n  - nested\n\n1. first\n2. second"),
            "*Title*\n\nSome text\nmore\n\n• one\n• two\n    • nested\n\n1. first\n2. second"
        );
        assert_eq!(md("## A **bold** heading"), "*A bold heading*");
        assert_eq!(
            md("> quoted\n> twice\n\nafter"),
            "> quoted\n> twice\n\nafter"
        );
        assert_eq!(md("- [x] done\n- [ ] todo"), "• ☑ done\n• ☐ todo");
        assert_eq!(md("| a | b |\n|---|---|\n| 1 | 2 |"), "*a* | *b*\n1 | 2");
        assert_eq!(md("3. three\n4. four"), "3. three\n4. four");
    }
}
