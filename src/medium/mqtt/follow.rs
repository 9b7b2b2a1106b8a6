//! Followers: one MQTT connection each, subscribed to the topics of a filter.
//!
//! Why it exists: a subscription is a session on the broker. An unnamed one is a clean
//! session that acknowledges each message as it is handed out; a named one is a
//! persistent session (`<client_id_prefix>sub-<name>`) that acknowledges a message only
//! when the consumer acked it and every message received before it (MQTT 5 §4.6:
//! PUBACKs go in the order the PUBLISHes came), so the broker keeps, and sends again
//! after a restart, exactly what the consumer has not finished. Messages the filter
//! drops, and payloads that are not messages (dead-lettered), count as finished.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};

use bson::{doc, Timestamp};
use futures::StreamExt;
use tokio::sync::mpsc::UnboundedReceiver;

use super::connection::{Conn, Inbound, Session};
use super::{lock, Inner, FOLLOW_WINDOW};
use crate::error::{Error, Result};
use crate::filter::{Filter, Position, SharedPosition, StartFrom};
use crate::medium::{Event, EventStream};
use crate::message::Message;

/// A message received by a named subscription and not yet acknowledged.
struct Entry {
    rank: u64,
    id: Option<String>,
    inbound: Inbound,
    done: bool,
}

/// The acknowledgement state of a named subscription.
pub(crate) struct Named {
    conn: Arc<Conn>,
    window: Mutex<VecDeque<Entry>>,
    /// Which subscription of the name this is: its positions carry it, so that a late
    /// ack of an earlier subscription with the same name (ranks restart at 0) does not
    /// release this one's deliveries.
    session: i64,
}

/// The next [`Named::session`].
static SESSIONS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);

impl Named {
    /// Acknowledges, in order, the finished messages at the front of the window.
    async fn flush(&self) {
        let ready: Vec<Inbound> = {
            let mut window = lock(&self.window);
            let mut ready = Vec::new();
            while window.front().is_some_and(|e| e.done) {
                if let Some(entry) = window.pop_front() {
                    ready.push(entry.inbound);
                }
            }
            ready
        };
        for inbound in &ready {
            self.conn.ack(inbound).await;
        }
    }

    /// The consumer's checkpoint passed `position`: everything up to it is finished
    /// (nothing, if the position is another subscription's).
    pub(crate) async fn acked_through(&self, position: &Position) {
        let token = position.token.as_ref();
        if token.and_then(|t| t.get_i64("session").ok()) != Some(self.session) {
            return;
        }
        let Some(rank) = token
            .and_then(|t| t.get_i64("mqtt").ok())
            .and_then(|r| u64::try_from(r).ok())
        else {
            return;
        };
        for entry in lock(&self.window).iter_mut() {
            if entry.rank <= rank {
                entry.done = true;
            }
        }
        self.flush().await;
    }

    /// A message was dead-lettered above the medium: finished.
    pub(crate) async fn release(&self, id: &str) {
        for entry in lock(&self.window).iter_mut() {
            if entry.id.as_deref() == Some(id) {
                entry.done = true;
            }
        }
        self.flush().await;
    }

    fn push(&self, entry: Entry) {
        let mut window = lock(&self.window);
        // Messages of an earlier connection cannot be acknowledged any more: the broker
        // sends them again on this one.
        let epoch = entry.inbound.epoch();
        window.retain(|e| e.inbound.epoch() == epoch);
        window.push_back(entry);
    }
}

fn position(rank: u64, session: Option<i64>) -> Position {
    // A broker stamps nothing: the position is the delivery's rank in its session.
    Position::new(
        Timestamp {
            time: 0,
            increment: 0,
        },
        Some(match session {
            Some(session) => {
                doc! { "mqtt": i64::try_from(rank).unwrap_or(i64::MAX), "session": session }
            }
            None => doc! { "mqtt": i64::try_from(rank).unwrap_or(i64::MAX) },
        }),
    )
}

struct Follower {
    inner: Weak<Inner>,
    conn: Arc<Conn>,
    rx: UnboundedReceiver<Inbound>,
    filter: Filter,
    named: Option<(String, Arc<Named>)>,
    rank: u64,
    closed: tokio_util::sync::CancellationToken,
}

impl Drop for Follower {
    fn drop(&mut self) {
        let conn = Arc::clone(&self.conn);
        let name = self.named.take().map(|(name, named)| {
            if let Some(inner) = self.inner.upgrade() {
                let mut map = lock(&inner.named);
                if map.get(&name).is_some_and(|n| Arc::ptr_eq(n, &named)) {
                    map.remove(&name);
                }
                lock(&inner.closing).insert(name.clone(), Arc::clone(&conn));
            }
            name
        });
        let inner = self.inner.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                conn.close().await;
                if let (Some(name), Some(inner)) = (name, inner.upgrade()) {
                    let mut closing = lock(&inner.closing);
                    if closing.get(&name).is_some_and(|c| Arc::ptr_eq(c, &conn)) {
                        closing.remove(&name);
                    }
                }
            });
        }
    }
}

impl Follower {
    async fn next(mut self) -> Option<(Result<Event>, Self)> {
        loop {
            let inbound = tokio::select! {
                _ = self.closed.cancelled() => return None,
                inbound = self.rx.recv() => inbound,
            };
            let Some(inbound) = inbound else {
                // The connection ended: closed, or its session was taken over.
                if self.closed.is_cancelled() {
                    return None;
                }
                let reason = match &self.named {
                    Some((name, _)) => format!("named subscription `{name}` was taken over by another consumer with the same name"),
                    None => "the subscription's connection was closed".to_string(),
                };
                self.closed.cancel();
                return Some((Err(Error::unavailable("mqtt", reason)), self));
            };
            self.rank += 1;
            let rank = self.rank;
            let decoded = bson::from_slice::<Message>(&inbound.publish.payload);
            let message = match decoded {
                Ok(message) => Some(message),
                Err(error) => {
                    if let Some(inner) = self.inner.upgrade() {
                        // Acknowledged below either way: a payload that is not a message
                        // would come again forever.
                        let _ = inner.dead_letter_unreadable(&inbound.publish, &error).await;
                    }
                    None
                }
            };
            let wanted = message.filter(|m| self.filter.matches(m));
            match &self.named {
                Some((_, named)) => {
                    named.push(Entry {
                        rank,
                        id: wanted.as_ref().map(|m| m.id.clone()),
                        inbound,
                        done: wanted.is_none(),
                    });
                    named.flush().await;
                }
                // No place to resume: acknowledged when handed out.
                None => self.conn.ack(&inbound).await,
            }
            if let Some(message) = wanted {
                let session = self.named.as_ref().map(|(_, named)| named.session);
                let at = position(rank, session);
                return Some((
                    Ok(Event::Message(Arc::new(message), SharedPosition::new(at))),
                    self,
                ));
            }
        }
    }
}

/// Opens a follower: a clean session, or the persistent session of `name`.
pub(crate) async fn open(
    inner: &Arc<Inner>,
    name: Option<&str>,
    from: StartFrom,
    filter: Filter,
) -> Result<EventStream> {
    match from {
        StartFrom::Now => {}
        StartFrom::Beginning => {
            return Err(Error::Unsupported {
                medium: "mqtt".into(),
                what: "starting from the oldest message: a broker keeps no history".into(),
            })
        }
        StartFrom::After(_) => {
            return Err(Error::Unsupported {
                medium: "mqtt".into(),
                what: "starting after a position: a broker keeps no history".into(),
            })
        }
    }
    let topics = inner.topics.for_filter(&filter)?;
    let session = match name {
        Some(name) => {
            // One consumer per session: an earlier subscription of this name in this
            // process lets go first (its acks are sent before the next one connects).
            let earlier = lock(&inner.named).remove(name).map(|n| Arc::clone(&n.conn));
            let closing = lock(&inner.closing).remove(name);
            for conn in earlier.into_iter().chain(closing) {
                conn.close().await;
            }
            Session {
                client_id: format!("{}sub-{name}", inner.config.mqtt.client_id_prefix),
                persistent: true,
                expiry_secs: inner.expiry_secs(inner.config.mqtt.session_expiry_ms),
                receive_maximum: FOLLOW_WINDOW,
                will: None,
            }
        }
        None => Session {
            client_id: inner.client_id("f"),
            persistent: false,
            expiry_secs: 0,
            receive_maximum: FOLLOW_WINDOW,
            will: None,
        },
    };
    let (conn, rx) = inner.open(session).await?;
    // The start is anchored when the broker acknowledged the subscription.
    if let Err(error) = conn.subscribe(topics, true).await {
        conn.close().await;
        return Err(error);
    }
    let named = name.map(|name| {
        let named = Arc::new(Named {
            conn: Arc::clone(&conn),
            window: Mutex::new(VecDeque::new()),
            session: SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        });
        lock(&inner.named).insert(name.to_string(), Arc::clone(&named));
        (name.to_string(), named)
    });
    tracing::debug!(client_id = %conn.client_id(), named = ?name, "mqtt follower subscribed");
    let follower = Follower {
        inner: Arc::downgrade(inner),
        conn,
        rx,
        filter,
        named,
        rank: 0,
        closed: inner.closed.child_token(),
    };
    Ok(futures::stream::unfold(follower, Follower::next).boxed())
}
