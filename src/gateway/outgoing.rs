//! What waits to be written to one SSE client: a queue bounded in events and in bytes.
//!
//! Why it exists: a client that reads slowly, or not at all, must cost the gateway a
//! bounded amount of memory, whatever the size of the messages (up to
//! `common.intracom.max_message_bytes` each). The subscription's pump queues events here
//! and waits for room; the HTTP response takes them out as the connection can write.
//! When the client leaves the queue without room for the stall time (without draining it
//! to half in between: taking one event now and then does not reset the clock), or when
//! the gateway's budget for all queues is spent and this queue holds more than its
//! share, the pump ends the stream:
//! what is queued is dropped at once (not kept until the client reads), the notice
//! (`lagged`) is queued alone, and the response ends after it. The bytes queued by
//! every stream are counted ([`super::AppState::sse_buffered_bytes`]): `/stats` shows
//! them as `sseBufferedBytes`, and `/metrics` as `intracom_gateway_sse_buffered_bytes`.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::sse::Event;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::AppState;

/// One event on its way to the client.
pub(crate) struct Queued {
    /// The event.
    pub(crate) event: Event,
    /// Its size as written (data, id, event name), roughly: what it costs here.
    pub(crate) bytes: usize,
    /// For a live delivery, the medium's stamp: its latency is recorded when the event
    /// is handed to the response.
    pub(crate) stamp: Option<bson::DateTime>,
}

impl Queued {
    /// An event with `data` (one line: JSON), and an id.
    pub(crate) fn new(name: &str, id: Option<String>, data: String) -> Self {
        let bytes = name.len() + data.len() + id.as_ref().map_or(0, String::len) + 24;
        let mut event = Event::default().event(name).data(data);
        if let Some(id) = id {
            event = event.id(id);
        }
        Queued {
            event,
            bytes,
            stamp: None,
        }
    }
}

#[derive(Default)]
struct Pending {
    events: VecDeque<Queued>,
    bytes: usize,
    /// No event comes after the queued ones.
    ended: bool,
    /// Since when the queue has had no room for the next event without having drained
    /// to half since: the stall time runs from here, so a client that takes one event
    /// now and then, but never catches up, still falls behind.
    full_since: Option<tokio::time::Instant>,
    /// This queue found the budget spent and woke the streams waiting for room (once
    /// per wait: woken streams that cannot go on either do not wake the others again,
    /// or they would wake each other for ever).
    asked_for_room: bool,
}

/// The queue between a subscription's pump and the HTTP response of one client.
pub(crate) struct Outgoing {
    state: AppState,
    pending: Mutex<Pending>,
    max_events: usize,
    max_bytes: usize,
    /// An event was queued, or the stream ended: the response has something to do.
    readable: Notify,
    /// The response took an event: the pump may find room.
    writable: Notify,
    /// The response is gone (the client disconnected).
    gone: CancellationToken,
}

/// Why an event could not be queued.
pub(crate) enum Refused {
    /// The queue stayed full for the stall time.
    Full,
    /// The client went away.
    Gone,
}

impl Outgoing {
    /// A queue of at most `max_events` events and `max_bytes` bytes (an event larger
    /// than that goes alone).
    pub(crate) fn new(state: AppState, max_events: usize, max_bytes: usize) -> Arc<Self> {
        Arc::new(Outgoing {
            state,
            pending: Mutex::new(Pending::default()),
            max_events: max_events.max(1),
            max_bytes: max_bytes.max(1),
            readable: Notify::new(),
            writable: Notify::new(),
            gone: CancellationToken::new(),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `bytes` more (or fewer) queued bytes in the gateway's total; a release
    /// wakes the streams waiting for room in the budget.
    fn account(&self, bytes: usize, added: bool) {
        let total = self.state.sse_buffered_bytes();
        if added {
            total.fetch_add(bytes as u64, Ordering::Relaxed);
            metrics::gauge!(crate::metrics::GATEWAY_SSE_BUFFERED_BYTES).increment(bytes as f64);
        } else {
            let before = total.fetch_sub(bytes as u64, Ordering::Relaxed);
            metrics::gauge!(crate::metrics::GATEWAY_SSE_BUFFERED_BYTES).decrement(bytes as f64);
            if before > self.state.options().sse_budget_bytes as u64 / 2 {
                self.state.sse_pressure().notify_waiters();
            }
        }
    }

    /// Adds `bytes` to the gateway's total if `admit` takes the total before it, in one
    /// step (concurrent streams cannot all pass the same check).
    fn reserve(&self, bytes: usize, admit: impl Fn(u64) -> bool) -> bool {
        let total = self.state.sse_buffered_bytes();
        let mut current = total.load(Ordering::Relaxed);
        loop {
            if !admit(current) {
                return false;
            }
            match total.compare_exchange_weak(
                current,
                current + bytes as u64,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    metrics::gauge!(crate::metrics::GATEWAY_SSE_BUFFERED_BYTES)
                        .increment(bytes as f64);
                    return true;
                }
                Err(now) => current = now,
            }
        }
    }

    /// Cancelled when the client went away.
    pub(crate) fn gone(&self) -> &CancellationToken {
        &self.gone
    }

    /// Queues an event once there is room for it, in this queue and in the gateway's
    /// budget for all SSE queues. Refused with [`Refused::Full`] when the queue has had
    /// no room for `stall` without draining to half in between, or at once when the
    /// budget is spent and this queue holds more than its share of it (the budget over
    /// the streams open).
    pub(crate) async fn push(&self, queued: Queued, stall: Duration) -> Result<(), Refused> {
        let budget = self.state.options().sse_budget_bytes as u64;
        loop {
            let room = self.writable.notified();
            let pressure = self.state.sse_pressure().notified();
            tokio::pin!(room, pressure);
            room.as_mut().enable();
            pressure.as_mut().enable();
            if self.gone.is_cancelled() {
                return Err(Refused::Gone);
            }
            let deadline = {
                let mut pending = self.pending();
                let bytes = queued.bytes as u64;
                let fits = pending.events.len() < self.max_events
                    && pending.bytes + queued.bytes <= self.max_bytes;
                // An event larger than the queue goes alone, while the budget has room.
                let admitted = if pending.events.is_empty() {
                    self.reserve(queued.bytes, |total| total < budget)
                } else {
                    fits && self.reserve(queued.bytes, |total| total + bytes <= budget)
                };
                if admitted {
                    pending.asked_for_room = false;
                    pending.bytes += queued.bytes;
                    pending.events.push_back(queued);
                    drop(pending);
                    self.readable.notify_one();
                    return Ok(());
                }
                let total = self.state.sse_buffered_bytes().load(Ordering::Relaxed);
                if total + bytes > budget {
                    let streams = self.state.sse_clients().load(Ordering::Relaxed).max(1) as u64;
                    if pending.bytes as u64 > budget / streams {
                        return Err(Refused::Full);
                    }
                    if !pending.asked_for_room {
                        // The others waiting for room check their share.
                        pending.asked_for_room = true;
                        self.state.sse_pressure().notify_waiters();
                    }
                }
                *pending
                    .full_since
                    .get_or_insert_with(tokio::time::Instant::now)
                    + stall
            };
            tokio::select! {
                _ = room => {}
                _ = pressure => {}
                _ = self.gone.cancelled() => return Err(Refused::Gone),
                _ = tokio::time::sleep_until(deadline) => return Err(Refused::Full),
            }
        }
    }

    /// Ends the stream: after what is queued, or instead of it with `discard`, then
    /// `last` if given.
    pub(crate) fn end(&self, last: Option<Queued>, discard: bool) {
        let mut pending = self.pending();
        if discard {
            let dropped = std::mem::take(&mut pending.bytes);
            pending.events.clear();
            self.account(dropped, false);
        }
        if let Some(last) = last {
            pending.bytes += last.bytes;
            self.account(last.bytes, true);
            pending.events.push_back(last);
        }
        pending.ended = true;
        drop(pending);
        self.readable.notify_one();
    }

    /// The next event for the response, or `None` once the stream ended.
    async fn next(&self) -> Option<Queued> {
        loop {
            let readable = self.readable.notified();
            tokio::pin!(readable);
            readable.as_mut().enable();
            {
                let mut pending = self.pending();
                if let Some(queued) = pending.events.pop_front() {
                    pending.bytes -= queued.bytes;
                    self.account(queued.bytes, false);
                    if pending.events.len() <= self.max_events / 2
                        && pending.bytes <= self.max_bytes / 2
                    {
                        pending.full_since = None;
                    }
                    drop(pending);
                    self.writable.notify_one();
                    return Some(queued);
                }
                if pending.ended {
                    return None;
                }
            }
            readable.await;
        }
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        let bytes = self.pending().bytes;
        self.account(bytes, false);
    }
}

/// The response's end of the queue: the events as a stream. Dropping it (the client
/// disconnected) tells the pump, and frees what was queued.
pub(crate) struct Response {
    outgoing: Arc<Outgoing>,
}

impl Response {
    pub(crate) fn new(outgoing: Arc<Outgoing>) -> Self {
        Response { outgoing }
    }

    /// The events, in order; each live delivery's latency is recorded as it is taken.
    pub(crate) fn into_stream(
        self,
    ) -> impl futures::Stream<Item = Result<Event, std::convert::Infallible>> {
        futures::stream::unfold(self, |response| async move {
            let queued = response.outgoing.next().await?;
            if let Some(stamp) = queued.stamp {
                response.outgoing.state.latency().record(stamp);
            }
            Some((Ok(queued.event), response))
        })
    }
}

impl Drop for Response {
    fn drop(&mut self) {
        self.outgoing.gone.cancel();
        let mut pending = self.outgoing.pending();
        let dropped = std::mem::take(&mut pending.bytes);
        pending.events.clear();
        drop(pending);
        self.outgoing.account(dropped, false);
    }
}
