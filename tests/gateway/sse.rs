//! A Server-Sent Events reader over a reqwest response, as any SSE client parses the
//! stream (the WHATWG rules: `field: value` lines, a blank line ends an event, lines
//! starting with `:` are comments).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use serde_json::Value;

use super::GUARD;

/// One event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// `message`, `lost`, `lagged`, `error`.
    pub event: String,
    /// The event id (the position), for `message`.
    pub id: Option<String>,
    /// The data, joined.
    pub data: String,
}

impl Event {
    /// The data as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {}", self.data))
    }
}

/// The events of one response.
pub struct Events {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Vec<u8>>> + Send>>,
    buffer: String,
}

impl Events {
    /// Reads the events of `response`.
    pub fn new(response: reqwest::Response) -> Self {
        Events {
            body: Box::pin(response.bytes_stream().map(|r| r.map(|b| b.to_vec()))),
            buffer: String::new(),
        }
    }

    /// The next event, or `None` when the stream ended.
    pub async fn next(&mut self) -> Option<Event> {
        let mut event = Event {
            event: "message".into(),
            id: None,
            data: String::new(),
        };
        let mut has_data = false;
        loop {
            while let Some(end) = self.buffer.find('\n') {
                let mut line: String = self.buffer.drain(..=end).collect();
                line.pop();
                if line.ends_with('\r') {
                    line.pop();
                }
                if line.is_empty() {
                    if has_data {
                        return Some(event);
                    }
                    continue;
                }
                if line.starts_with(':') {
                    continue;
                }
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string()),
                    None => (line.clone(), String::new()),
                };
                match field.as_str() {
                    "event" => event.event = value,
                    "id" => event.id = Some(value),
                    "data" => {
                        if has_data {
                            event.data.push('\n');
                        }
                        event.data.push_str(&value);
                        has_data = true;
                    }
                    _ => {}
                }
            }
            match self.body.next().await {
                Some(Ok(bytes)) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next event within the hang guard; fails if the stream ends first.
    pub async fn expect(&mut self, what: &str) -> Event {
        tokio::time::timeout(GUARD, self.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: no event within the hang guard"))
            .unwrap_or_else(|| panic!("{what}: the stream ended"))
    }

    /// The next `message` event: (its id, the message); any other event fails.
    pub async fn message(&mut self, what: &str) -> (String, Value) {
        let event = self.expect(what).await;
        assert_eq!(event.event, "message", "{what}: {event:?}");
        (
            event.id.clone().expect("a message event has an id"),
            event.json(),
        )
    }
}
