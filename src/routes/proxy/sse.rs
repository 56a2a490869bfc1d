//! Server-sent events as the providers send them: framing (`\n\n` or `\r\n\r\n`) and the
//! `event:` / `data:` fields of one event.
//!
//! An upstream is whatever a tenant configured, so framing is bounded: [`Framer`] looks at
//! each byte once however the stream is cut into chunks (linear time), and holds at most
//! one event, of at most [`MAX_EVENT_BYTES`].

use axum::body::Bytes;

/// The largest event an upstream may send (a provider's largest, a tool call's arguments
/// in one delta, is far smaller).
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// An upstream event larger than the framer accepts: the stream is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTooLarge;

/// Splits a byte stream into events, in time linear in its length.
#[derive(Debug)]
pub struct Framer {
    buffer: Vec<u8>,
    /// Where the first event not yet returned starts.
    start: usize,
    /// Every `\n` before this has been looked at: the search for the event's end resumes here.
    scanned: usize,
    max_event: usize,
}

impl Framer {
    pub fn new(max_event: usize) -> Self {
        Self { buffer: Vec::new(), start: 0, scanned: 0, max_event }
    }

    /// Adds the next chunk of the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.start > 0 {
            // What is left is the one event in progress: each byte is moved at most once
            // (it is moved again only after its own event has been returned).
            self.buffer.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete event, as (its bytes including the blank line that closes it, the
    /// length of its text without that blank line); none until more arrives. An event that
    /// is (or, still incomplete, already is) longer than the limit is an error.
    pub fn next_event(&mut self) -> Result<Option<(Bytes, usize)>, EventTooLarge> {
        let from = self.scanned.max(self.start);
        let found = self.buffer[from..].iter().enumerate().filter(|(_, b)| **b == b'\n').find_map(|(i, _)| {
            let i = from + i;
            if i > self.start && self.buffer[i - 1] == b'\n' {
                Some((i - 1, i + 1))
            } else if i >= self.start + 3 && &self.buffer[i - 3..i] == b"\r\n\r" {
                Some((i - 3, i + 1))
            } else {
                None
            }
        });
        let Some((text_end, end)) = found else {
            self.scanned = self.buffer.len();
            if self.buffer.len() - self.start > self.max_event {
                return Err(EventTooLarge);
            }
            return Ok(None);
        };
        if end - self.start > self.max_event {
            return Err(EventTooLarge);
        }
        let event = Bytes::copy_from_slice(&self.buffer[self.start..end]);
        let text_len = text_end - self.start;
        self.start = end;
        self.scanned = end;
        Ok(Some((event, text_len)))
    }

    /// The bytes after the last complete event (an unterminated last event).
    pub fn rest(&mut self) -> Bytes {
        let rest = Bytes::copy_from_slice(&self.buffer[self.start..]);
        self.buffer.clear();
        self.start = 0;
        self.scanned = 0;
        rest
    }
}

/// One event's fields (comments and unknown fields ignored).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// The `event:` name, if any (Anthropic and the Responses API name their events).
    pub name: Option<String>,
    /// The `data:` lines joined by `\n`.
    pub data: String,
}

impl Event {
    pub fn parse(text: &[u8]) -> Self {
        let text = String::from_utf8_lossy(text);
        let mut event = Event::default();
        let mut lines = Vec::new();
        for line in text.lines() {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event.name = Some(value.to_owned()),
                "data" => lines.push(value),
                _ => {}
            }
        }
        event.data = lines.join("\n");
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event of `stream` cut into chunks of `size` bytes, as (text, whole event).
    fn frame(stream: &[u8], size: usize) -> (Vec<(String, String)>, Vec<u8>) {
        let mut framer = Framer::new(MAX_EVENT_BYTES);
        let mut events = Vec::new();
        for chunk in stream.chunks(size) {
            framer.push(chunk);
            while let Some((raw, text_len)) = framer.next_event().unwrap() {
                let text = String::from_utf8_lossy(&raw[..text_len]).into_owned();
                events.push((text, String::from_utf8_lossy(&raw).into_owned()));
            }
        }
        (events, framer.rest().to_vec())
    }

    #[test]
    fn frames_and_fields() {
        let stream = b"event: message_start\ndata: {\"a\":1}\n\ndata: [DONE]\r\n\r\ndata: partial";
        for size in [1, 2, 3, 5, 7, stream.len()] {
            let (events, rest) = frame(stream, size);
            assert_eq!(events.len(), 2, "chunks of {size}");
            assert_eq!(events[0].0, "event: message_start\ndata: {\"a\":1}");
            assert_eq!(events[0].1, "event: message_start\ndata: {\"a\":1}\n\n");
            assert_eq!(events[1], ("data: [DONE]".to_owned(), "data: [DONE]\r\n\r\n".to_owned()));
            assert_eq!(rest, b"data: partial");
            let event = Event::parse(events[0].0.as_bytes());
            assert_eq!(event, Event { name: Some("message_start".into()), data: "{\"a\":1}".into() });
        }
        assert_eq!(Event::parse(b": comment\ndata:x\ndata: y").data, "x\ny");
        // A line break alone is no boundary; `\n\r\n\r\n` closes at its `\r\n\r\n`.
        let (events, _) = frame(b"data: a\r\ndata: b\n\r\n\r\nnext", 1);
        assert_eq!(events[0].0, "data: a\r\ndata: b\n");
    }

    #[test]
    fn an_event_over_the_limit_is_refused_complete_or_not() {
        let mut framer = Framer::new(10);
        framer.push(b"data: 0123456789");
        assert_eq!(framer.next_event(), Err(EventTooLarge));
        let mut framer = Framer::new(10);
        framer.push(b"data: 012345\n\n");
        assert_eq!(framer.next_event(), Err(EventTooLarge));
        let mut framer = Framer::new(10);
        framer.push(b"data: 01\n\n");
        assert!(matches!(framer.next_event(), Ok(Some(_))));
    }

    #[test]
    fn framing_is_linear_in_the_stream() {
        // One 1 MB event in 1-byte chunks: each byte looked at once (quadratic would be 5e11).
        let mut framer = Framer::new(MAX_EVENT_BYTES);
        let started = std::time::Instant::now();
        for _ in 0..MAX_EVENT_BYTES - 2 {
            framer.push(b"a");
            assert_eq!(framer.next_event(), Ok(None));
        }
        framer.push(b"\n\n");
        assert!(matches!(framer.next_event(), Ok(Some(_))));
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "{:?}", started.elapsed());
    }
}
