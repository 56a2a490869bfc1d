//! Server-sent events as the providers send them: framing (`\n\n` or `\r\n\r\n`) and the
//! `event:` / `data:` fields of one event.

/// The end of the first complete event in `buffer`: (end of its text, end including the
/// blank line that closes it).
pub fn event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, i + 2));
    let crlf = buffer.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, i + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
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

    #[test]
    fn frames_and_fields() {
        let buffer = b"event: message_start\ndata: {\"a\":1}\n\ndata: [DONE]\r\n\r\n";
        let (text_end, end) = event_end(buffer).unwrap();
        assert_eq!(end, text_end + 2);
        let event = Event::parse(&buffer[..text_end]);
        assert_eq!(event, Event { name: Some("message_start".into()), data: "{\"a\":1}".into() });
        let rest = &buffer[end..];
        let (text_end, end) = event_end(rest).unwrap();
        assert_eq!((text_end, end), (rest.len() - 4, rest.len()));
        assert_eq!(Event::parse(&rest[..text_end]).data, "[DONE]");
        assert_eq!(event_end(b"data: partial"), None);
        assert_eq!(Event::parse(b": comment\ndata:x\ndata: y").data, "x\ny");
    }
}
