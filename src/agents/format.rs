//! Placeholder until the formatting module lands.

pub const MAX_PART_BYTES: usize = 12_000;

pub fn markdown_to_html(markdown: &str) -> Option<String> {
    let _ = markdown;
    None
}

pub fn split_answer(text: &str, max_bytes: usize) -> Vec<String> {
    let _ = max_bytes;
    vec![text.to_owned()]
}
