//! Server-Sent Events read from a byte stream: what a follower of the HTTP medium
//! receives from a gateway's `POST /medium/follow`.

use bytes::Bytes;
use futures::stream::{BoxStream, Stream, StreamExt};

/// One event: its type (`message` when the stream names none) and its data (the
/// `data:` lines joined by newlines). Ids and comments are not kept: the data carries
/// the position.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Event {
    pub(super) kind: String,
    pub(super) data: String,
}

/// The events of `bytes`, in order; the stream ends with the bytes, or with an error
/// after a transport error (an event not complete then is dropped).
pub(super) fn events<S>(bytes: S) -> BoxStream<'static, Result<Event, String>>
where
    S: Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
{
    let state = (Box::pin(bytes), Parser::default(), false);
    futures::stream::unfold(state, |(mut bytes, mut parser, mut failed)| async move {
        loop {
            if failed {
                return None;
            }
            if let Some(event) = parser.next_event() {
                return Some((Ok(event), (bytes, parser, failed)));
            }
            match bytes.next().await {
                Some(Ok(chunk)) => parser.push(&chunk),
                Some(Err(error)) => {
                    failed = true;
                    return Some((Err(error.to_string()), (bytes, parser, failed)));
                }
                None => return None,
            }
        }
    })
    .boxed()
}

/// What has arrived and is not an event yet.
#[derive(Default)]
struct Parser {
    buffer: String,
    /// Bytes of a character split between two chunks.
    partial: Vec<u8>,
}

impl Parser {
    fn push(&mut self, chunk: &[u8]) {
        self.partial.extend_from_slice(chunk);
        let valid = match std::str::from_utf8(&self.partial) {
            Ok(text) => text.len(),
            Err(e) => e.valid_up_to(),
        };
        let text = String::from_utf8_lossy(&self.partial[..valid]).replace('\r', "");
        self.buffer.push_str(&text);
        self.partial.drain(..valid);
    }

    /// The next complete event (a block ending with an empty line) that has data.
    fn next_event(&mut self) -> Option<Event> {
        loop {
            let end = self.buffer.find("\n\n")?;
            let block: String = self.buffer.drain(..end + 2).collect();
            let mut event = Event::default();
            let mut data = Vec::new();
            for line in block.lines() {
                let (field, value) = match line.split_once(':') {
                    Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                    None => (line, ""),
                };
                match field {
                    "event" => event.kind = value.to_string(),
                    "data" => data.push(value),
                    _ => {}
                }
            }
            if data.is_empty() {
                continue;
            }
            event.data = data.join("\n");
            if event.kind.is_empty() {
                event.kind = "message".into();
            }
            return Some(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events split anywhere between chunks, comments and CRLF line ends are read as
    /// the events they are.
    #[test]
    fn events_are_read_across_chunks() {
        let text = ": keep-alive\r\n\r\nevent: message\r\nid: 1\r\ndata: {\"a\":\"é\"}\r\n\r\nevent: lost\ndata: {\"count\":2}\n\n";
        let bytes = text.as_bytes();
        for cut in 0..bytes.len() {
            let mut parser = Parser::default();
            let mut got = Vec::new();
            parser.push(&bytes[..cut]);
            while let Some(event) = parser.next_event() {
                got.push(event);
            }
            parser.push(&bytes[cut..]);
            while let Some(event) = parser.next_event() {
                got.push(event);
            }
            assert_eq!(
                got,
                vec![
                    Event {
                        kind: "message".into(),
                        data: "{\"a\":\"é\"}".into()
                    },
                    Event {
                        kind: "lost".into(),
                        data: "{\"count\":2}".into()
                    },
                ],
                "cut at {cut}"
            );
        }
    }
}
