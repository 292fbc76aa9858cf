//! Framing of streamed bodies: bytes into lines (NDJSON) and lines into Server-Sent Events
//! ([HTML Living Standard §9.2](https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation)).
//!
//! Hand-written rather than taken from `eventsource-stream`: Ollama's NDJSON needs the same
//! byte-to-line splitter anyway, the SSE part is forty lines, and that crate (last release
//! 2022) would add `nom` for what a `split_once` does.

use super::LlmError;

/// Most bytes one line may hold: a body that never ends its line is broken, not slow, and
/// must not grow our memory without bound.
const MAX_LINE: usize = 8 << 20;

/// Cuts a body that arrives in arbitrary chunks into complete lines. A line ends at `\n`,
/// `\r\n` or `\r`; bytes are buffered until their line is complete, so a chunk boundary in
/// the middle of a line or of a UTF-8 character is harmless.
#[derive(Debug, Default)]
pub(super) struct LineSplitter {
    partial: Vec<u8>,
    /// The last chunk ended in `\r`: a `\n` at the start of the next belongs to it.
    after_cr: bool,
}

impl LineSplitter {
    /// Takes the next chunk of the body and returns the lines it completed.
    pub(super) fn push(&mut self, mut chunk: &[u8]) -> Result<Vec<String>, LlmError> {
        if self.after_cr && !chunk.is_empty() {
            if chunk[0] == b'\n' {
                chunk = &chunk[1..];
            }
            self.after_cr = false;
        }
        let mut lines = Vec::new();
        while let Some(end) = chunk.iter().position(|b| matches!(b, b'\n' | b'\r')) {
            self.partial.extend_from_slice(&chunk[..end]);
            lines.push(self.take_line()?);
            let was_cr = chunk[end] == b'\r';
            chunk = &chunk[end + 1..];
            if was_cr {
                match chunk.first() {
                    Some(b'\n') => chunk = &chunk[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        self.partial.extend_from_slice(chunk);
        if self.partial.len() > MAX_LINE {
            return Err(LlmError::BadResponse(format!(
                "a line of the stream is longer than {} MiB",
                MAX_LINE >> 20
            )));
        }
        Ok(lines)
    }

    /// The last line, when the body ended without a line break after it.
    pub(super) fn finish(&mut self) -> Result<Option<String>, LlmError> {
        if self.partial.is_empty() {
            Ok(None)
        } else {
            self.take_line().map(Some)
        }
    }

    fn take_line(&mut self) -> Result<String, LlmError> {
        String::from_utf8(std::mem::take(&mut self.partial))
            .map_err(|_| LlmError::BadResponse("a line of the stream is not valid UTF-8".into()))
    }
}

/// One dispatched Server-Sent Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SseEvent {
    /// The `event:` field, `message` when there was none.
    pub(super) name: String,
    /// The `data:` lines, joined with `\n`.
    pub(super) data: String,
}

/// Collects `event:` and `data:` fields line by line and hands out an event at each blank
/// line. Comments (`: keep-alive`) are skipped; `id:` and `retry:` are ignored because we
/// never reconnect a model stream (a retry is a new request).
#[derive(Debug, Default)]
pub(super) struct SseParser {
    event: String,
    data: String,
    has_data: bool,
}

impl SseParser {
    /// Reads one line (without its line break); returns an event when the line ended one.
    pub(super) fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => value.clone_into(&mut self.event),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }

    /// The event still open when the body ended. The standard drops it; we hand it out,
    /// because servers that end on `data: [DONE]` without the blank line mean it.
    pub(super) fn finish(&mut self) -> Option<SseEvent> {
        self.dispatch()
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let name = std::mem::take(&mut self.event);
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        Some(SseEvent {
            name: if name.is_empty() {
                "message".to_owned()
            } else {
                name
            },
            data: std::mem::take(&mut self.data),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line of `body`, fed as two chunks split at `at`.
    fn lines_split_at(body: &[u8], at: usize) -> Vec<String> {
        let mut splitter = LineSplitter::default();
        let mut lines = splitter.push(&body[..at]).unwrap();
        lines.extend(splitter.push(&body[at..]).unwrap());
        lines.extend(splitter.finish().unwrap());
        lines
    }

    #[test]
    fn lines_survive_a_chunk_boundary_anywhere() {
        let body = "data: 你好\r\n\r\n: keep-alive\rdata: é\n\nlast".as_bytes();
        let expected = vec!["data: 你好", "", ": keep-alive", "data: é", "", "last"];
        for at in 0..=body.len() {
            assert_eq!(lines_split_at(body, at), expected, "split at byte {at}");
        }
    }

    #[test]
    fn byte_by_byte_feeding_gives_the_same_lines() {
        let body = "a\r\nb\rc\n\n".as_bytes();
        let mut splitter = LineSplitter::default();
        let mut lines = Vec::new();
        for byte in body {
            lines.extend(splitter.push(std::slice::from_ref(byte)).unwrap());
        }
        assert_eq!(lines, vec!["a", "b", "c", ""]);
        assert_eq!(splitter.finish().unwrap(), None);
    }

    #[test]
    fn invalid_utf8_is_a_bad_response() {
        let mut splitter = LineSplitter::default();
        assert!(matches!(
            splitter.push(b"\xff\xfe\n"),
            Err(LlmError::BadResponse(_))
        ));
    }

    #[test]
    fn an_endless_line_is_refused() {
        let mut splitter = LineSplitter::default();
        let chunk = vec![b'x'; 1 << 20];
        let mut result = Ok(Vec::new());
        for _ in 0..9 {
            result = splitter.push(&chunk);
        }
        assert!(matches!(result, Err(LlmError::BadResponse(_))));
    }

    fn events(text: &str) -> Vec<SseEvent> {
        let mut parser = SseParser::default();
        let mut events: Vec<SseEvent> = text.split('\n').filter_map(|l| parser.line(l)).collect();
        events.extend(parser.finish());
        events
    }

    #[test]
    fn events_carry_their_name_and_joined_data() {
        let got = events(
            ": comment\nevent: ping\ndata: {}\n\ndata:one\ndata: two\nid: 7\nretry: 10\n\ndata\n\n",
        );
        assert_eq!(
            got,
            vec![
                SseEvent {
                    name: "ping".into(),
                    data: "{}".into()
                },
                SseEvent {
                    name: "message".into(),
                    data: "one\ntwo".into()
                },
                SseEvent {
                    name: "message".into(),
                    data: String::new()
                },
            ]
        );
    }

    #[test]
    fn blank_lines_without_data_dispatch_nothing_and_an_open_event_is_flushed() {
        let got = events("\n\nevent: x\n\ndata: [DONE]");
        assert_eq!(
            got,
            vec![SseEvent {
                name: "message".into(),
                data: "[DONE]".into()
            }]
        );
    }
}
