//! HTML reduced to the text a reader (or a model) would see.

/// Elements whose content is not readable text.
const SKIPPED_ELEMENTS: &[&str] = &["script", "style", "noscript", "template", "svg", "head"];
/// Elements that start a new line.
const BLOCK_ELEMENTS: &[&str] = &[
    "address",
    "article",
    "aside",
    "blockquote",
    "br",
    "dd",
    "div",
    "dl",
    "dt",
    "figcaption",
    "figure",
    "footer",
    "form",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "header",
    "hr",
    "li",
    "main",
    "nav",
    "ol",
    "p",
    "pre",
    "section",
    "table",
    "tr",
    "ul",
];

/// The readable text of an HTML page: the title, then the text without tags, scripts,
/// styles or comments, one line per block, entities decoded, whitespace collapsed.
pub fn html_to_text(html: &str) -> String {
    // ASCII lower-casing keeps byte offsets, so positions found in `lower` index `html`.
    let lower = html.to_ascii_lowercase();
    let mut out = String::new();
    let mut title = None;
    let mut i = 0;
    while i < html.len() {
        let Some(lt) = html[i..].find('<') else {
            push_text(&mut out, &html[i..]);
            break;
        };
        push_text(&mut out, &html[i..i + lt]);
        i += lt;
        let rest = &lower[i..];
        if rest.starts_with("<!--") {
            i = rest.find("-->").map_or(html.len(), |end| i + end + 3);
            continue;
        }
        let closing = rest[1..].starts_with('/');
        let name_start = if closing { 2 } else { 1 };
        let name_len = rest[name_start..]
            .bytes()
            .take_while(u8::is_ascii_alphanumeric)
            .count();
        let name = &rest[name_start..name_start + name_len];
        if name.is_empty() && !rest.starts_with("<!") && !rest.starts_with("<?") {
            // A bare `<` in text.
            out.push('<');
            i += 1;
            continue;
        }
        let after_tag = tag_end(html.as_bytes(), i + 1);
        if !closing && SKIPPED_ELEMENTS.contains(&name) {
            let content_end = lower[after_tag..]
                .find(&format!("</{name}"))
                .map_or(html.len(), |end| after_tag + end);
            if name == "head" {
                title = title_of(&html[after_tag..content_end]);
            }
            i = tag_end(html.as_bytes(), content_end);
            continue;
        }
        if name == "li" && !closing {
            out.push_str("\n- ");
        } else if name == "td" || name == "th" {
            out.push(' ');
        } else if BLOCK_ELEMENTS.contains(&name) {
            out.push('\n');
        }
        i = after_tag;
    }
    match title {
        Some(title) => format!("Title: {title}\n\n{}", tidy_lines(&out)),
        None => tidy_lines(&out),
    }
}

/// The text of the `<title>` in a page's head.
fn title_of(head: &str) -> Option<String> {
    let lower = head.to_ascii_lowercase();
    let start = tag_end(head.as_bytes(), lower.find("<title")? + 1);
    let end = lower[start..]
        .find("</title")
        .map_or(head.len(), |e| start + e);
    let mut title = String::new();
    push_text(&mut title, &head[start..end]);
    let title = title.split_whitespace().collect::<Vec<_>>().join(" ");
    (!title.is_empty()).then_some(title)
}

/// Index just past the `>` ending the tag that starts before `from`; a `>` inside a
/// quoted attribute value does not end it.
fn tag_end(html: &[u8], from: usize) -> usize {
    let mut quote = None;
    let mut after_equals = false;
    for (k, &b) in html.iter().enumerate().skip(from) {
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'>' => return k + 1,
            None if (b == b'"' || b == b'\'') && after_equals => quote = Some(b),
            None => {}
        }
        if !b.is_ascii_whitespace() {
            after_equals = b == b'=';
        }
    }
    html.len()
}

/// Appends text from between tags: entities decoded, source line breaks as spaces (only
/// tags break lines in HTML).
fn push_text(out: &mut String, text: &str) {
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        push_spaced(out, &rest[..amp]);
        rest = &rest[amp..];
        match decode_entity(rest) {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    push_spaced(out, rest);
}

fn push_spaced(out: &mut String, text: &str) {
    out.extend(
        text.chars()
            .map(|c| if c.is_whitespace() { ' ' } else { c }),
    );
}

/// The character an entity at the start of `text` stands for, and the entity's length.
fn decode_entity(text: &str) -> Option<(char, usize)> {
    // `;` is ASCII, so its index is a character boundary.
    let end = text.bytes().take(12).position(|b| b == b';')?;
    let entity = &text[1..end];
    let c = if let Some(number) = entity.strip_prefix('#') {
        let code = match number.strip_prefix(['x', 'X']) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => number.parse().ok()?,
        };
        char::from_u32(code).unwrap_or('\u{FFFD}')
    } else {
        match entity {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" | "#39" => '\'',
            "nbsp" => ' ',
            "ndash" => '–',
            "mdash" => '—',
            "hellip" => '…',
            "lsquo" => '‘',
            "rsquo" => '’',
            "ldquo" => '“',
            "rdquo" => '”',
            "laquo" => '«',
            "raquo" => '»',
            "bull" => '•',
            "middot" => '·',
            "copy" => '©',
            "reg" => '®',
            "trade" => '™',
            "deg" => '°',
            "times" => '×',
            "euro" => '€',
            "pound" => '£',
            _ => return None,
        }
    };
    Some((c, end + 1))
}

/// Collapses spaces within lines, trims them, and drops blank lines.
fn tidy_lines(text: &str) -> String {
    text.lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_reads_as_its_title_and_block_lines() {
        let page = "<!doctype html><html><head><title>Stub &amp; Co</title><style>body{color:red}</style>\
            <script>alert('x')</script></head><body><h1>Hello</h1><p>First&nbsp;para with <b>bold</b>\n text.</p>\
            <!-- hidden --><ul><li>one</li><li>two</li></ul><p>5 &lt; 6</p></body></html>";
        assert_eq!(
            html_to_text(page),
            "Title: Stub & Co\n\nHello\nFirst para with bold text.\n- one\n- two\n5 < 6"
        );
    }

    #[test]
    fn html_to_text_handles_entities_quotes_and_bare_brackets() {
        assert_eq!(
            html_to_text("&漢字漢字漢字; &#1114112; &#xZZ;"),
            "&漢字漢字漢字; \u{FFFD} &#xZZ;"
        );
        assert_eq!(
            html_to_text(r#"<p title="a > b">x &#x41;&#66; &unknown; a < b</p><pre>one</pre>"#),
            "x AB &unknown; a < b\none"
        );
    }
}
