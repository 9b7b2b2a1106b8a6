//! Server-Sent Events read from a byte stream: what a follower of the HTTP medium
//! receives from a gateway's `POST /medium/follow`.

use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, Stream, StreamExt};

/// How long a stream may stay silent before it is taken as broken: three of the
/// gateways' keep-alive intervals (15 s by default, `GatewayOptions::keep_alive`). A
/// gateway whose host vanished without closing the connection sends nothing more; the
/// follower then opens its stream again, on this gateway or the next.
pub(super) const IDLE: Duration = Duration::from_secs(45);

/// The most that may wait undecoded for the end of an event, as a multiple of the
/// medium's message limit: an event carries one message as extended JSON, which can be
/// several times its BSON size (a string of control characters escaped as `\u0001`,
/// six bytes for one), plus this slack for the position and the event's lines.
const BUFFER_FACTOR: usize = 8;
const BUFFER_SLACK: usize = 64 * 1024;

/// What may wait for the end of an event when one message is at most
/// `max_message_bytes`.
pub(super) fn max_buffer(max_message_bytes: usize) -> usize {
    max_message_bytes
        .saturating_mul(BUFFER_FACTOR)
        .saturating_add(BUFFER_SLACK)
}

/// One event: its type (`message` when the stream names none) and its data (the
/// `data:` lines joined by newlines). Ids and comments are not kept: the data carries
/// the position.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Event {
    pub(super) kind: String,
    pub(super) data: String,
}

/// The events of `bytes`, in order; the stream ends with the bytes, or with an error
/// after a transport error, after `idle` without a byte, or when more than
/// `max_buffer` bytes wait for the end of an event (an event not complete then is
/// dropped).
pub(super) fn events<S>(
    bytes: S,
    max_buffer: usize,
    idle: Duration,
) -> BoxStream<'static, Result<Event, String>>
where
    S: Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
{
    let parser = Parser {
        max_buffer,
        ..Parser::default()
    };
    let state = (Box::pin(bytes), parser, false);
    futures::stream::unfold(
        state,
        move |(mut bytes, mut parser, mut failed)| async move {
            loop {
                if failed {
                    return None;
                }
                if let Some(event) = parser.next_event() {
                    return Some((Ok(event), (bytes, parser, failed)));
                }
                let error = match tokio::time::timeout(idle, bytes.next()).await {
                    Ok(Some(Ok(chunk))) => match parser.push(&chunk) {
                        Ok(()) => continue,
                        Err(error) => error,
                    },
                    Ok(Some(Err(error))) => error.to_string(),
                    Ok(None) => return None,
                    Err(_) => format!("nothing received for {} s", idle.as_secs_f64()),
                };
                failed = true;
                return Some((Err(error), (bytes, parser, failed)));
            }
        },
    )
    .boxed()
}

/// What has arrived and is not an event yet.
#[derive(Default)]
struct Parser {
    buffer: String,
    /// Bytes of a character split between two chunks.
    partial: Vec<u8>,
    /// The most `buffer` may hold (0: no limit).
    max_buffer: usize,
}

impl Parser {
    /// Decodes `chunk` after what arrived before it. A byte sequence that is not UTF-8
    /// becomes U+FFFD and decoding goes on after it; an error when more than
    /// `max_buffer` bytes wait for the end of an event.
    fn push(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.partial.extend_from_slice(chunk);
        loop {
            let (valid, invalid) = match std::str::from_utf8(&self.partial) {
                Ok(text) => (text.len(), None),
                Err(e) => (e.valid_up_to(), e.error_len()),
            };
            let text = String::from_utf8_lossy(&self.partial[..valid]).replace('\r', "");
            self.buffer.push_str(&text);
            match invalid {
                Some(bad) => {
                    self.buffer.push(char::REPLACEMENT_CHARACTER);
                    self.partial.drain(..valid + bad);
                }
                // What is left, if anything, is the start of a character the next
                // chunk ends.
                None => {
                    self.partial.drain(..valid);
                    break;
                }
            }
        }
        if self.max_buffer > 0 && self.buffer.len() + self.partial.len() > self.max_buffer {
            return Err(format!(
                "more than {} bytes without the end of an event",
                self.max_buffer
            ));
        }
        Ok(())
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
            parser.push(&bytes[..cut]).expect("within the limit");
            while let Some(event) = parser.next_event() {
                got.push(event);
            }
            parser.push(&bytes[cut..]).expect("within the limit");
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

    /// A byte that is not UTF-8 becomes U+FFFD and the events after it are read.
    #[test]
    fn an_invalid_byte_does_not_stop_the_decoding() {
        let mut parser = Parser::default();
        parser
            .push(b"data: a\xffb\n\nevent: lost\ndata: {}\n\n")
            .expect("within the limit");
        assert_eq!(
            parser.next_event(),
            Some(Event {
                kind: "message".into(),
                data: "a\u{fffd}b".into()
            })
        );
        assert_eq!(
            parser.next_event(),
            Some(Event {
                kind: "lost".into(),
                data: "{}".into()
            })
        );
        assert!(parser.partial.is_empty() && parser.buffer.is_empty());
    }

    /// More than the limit without the end of an event ends the stream with an error.
    #[tokio::test]
    async fn an_endless_event_ends_the_stream() {
        let chunks = std::iter::repeat_with(|| Ok(Bytes::from_static(b"data: "))).take(100);
        let mut events = events(futures::stream::iter(chunks), 64, IDLE);
        assert!(matches!(events.next().await, Some(Err(_))));
        assert!(events.next().await.is_none());
    }

    /// A stream that stays silent longer than `idle` ends with an error.
    #[tokio::test]
    async fn a_silent_stream_ends_with_an_error() {
        let silent = futures::stream::pending::<reqwest::Result<Bytes>>();
        let mut events = events(silent, 1024, Duration::from_millis(10));
        assert!(matches!(events.next().await, Some(Err(_))));
        assert!(events.next().await.is_none());
    }
}
