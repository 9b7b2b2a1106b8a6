//! Followers: each pulls from the log at its own pace, with a cursor of its own.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::ReusableBoxFuture;

use crate::error::Result;
use crate::filter::Filter;
use crate::medium::Event;

use super::log::shared_position_of;
use super::{read, Shared};

/// How many log entries a follower examines per lock.
const READ_BATCH: usize = 512;

/// One follower: a cursor in the log and a small buffer of events ready to hand out.
pub(super) struct Follower {
    pub(super) shared: Arc<Shared>,
    /// Sequence number of the last entry examined.
    pub(super) cursor: u64,
    pub(super) filter: Filter,
    pub(super) ready: VecDeque<Event>,
    /// The medium's close signal, checked per read without a lock.
    pub(super) closed: crate::stop::Stop,
}

impl Follower {
    /// Reads the log from the cursor ([`read_log`]); true if anything happened.
    pub(super) fn fill(&mut self) -> bool {
        read_log(
            &self.shared,
            &mut self.cursor,
            &self.filter,
            &mut self.ready,
        )
    }

    /// Waits until the log has something for this follower (registered for the next
    /// append before reading, so that an append after the read wakes it), or the
    /// medium closes (`None`). The follower travels boxed: only a pointer moves, and
    /// the wait borrows the medium from it (no reference count that every follower's
    /// wait would change).
    ///
    /// Before it registers, it lets the tasks that are ready to run go first (on a
    /// busy bus, the publisher among them), then reads once more: under load a
    /// follower that keeps up then reads a few messages per wake-up instead of being
    /// woken for each one (a registration and a wake-up cost more than a read); on a
    /// quiet bus it is one more poll before the wait.
    pub(super) async fn wait(mut self: Box<Self>) -> Option<Box<Self>> {
        tokio::task::yield_now().await;
        if !self.closed.is_stopped() && self.fill() {
            return Some(self);
        }
        'wait: loop {
            let this = &mut *self;
            let mut appended = std::pin::pin!(this.shared.appended.notified());
            // Registered before the checks: an append or a close after them wakes it
            // (`close` stops the medium, then notifies). Once woken, it reads at once,
            // without registering again (a registration, then its removal, take the
            // lock that every follower and the publisher share).
            appended.as_mut().enable();
            for woken in [false, true] {
                if woken {
                    appended.as_mut().await;
                }
                if this.closed.is_stopped() {
                    return None;
                }
                if read_log(
                    &this.shared,
                    &mut this.cursor,
                    &this.filter,
                    &mut this.ready,
                ) {
                    break 'wait;
                }
            }
        }
        Some(self)
    }
}

/// Moves a follower's cursor over up to [`READ_BATCH`] entries of the log, its events
/// into `ready`; true if anything happened.
/// Under the log's lock only a reference count moves: messages are shared with the
/// log, and an event's position is a deferred one (a few numbers: no count that
/// every follower of a message changes, no allocation).
pub(super) fn read_log(
    shared: &Shared,
    cursor: &mut u64,
    filter: &Filter,
    ready: &mut VecDeque<Event>,
) -> bool {
    // Nothing written after the cursor: nothing to read, and nothing it has not
    // read can have expired. (Entries up to `written` are in the log, or expired.)
    if *cursor >= shared.written.load(Ordering::Acquire) {
        return false;
    }
    let mut progressed = false;
    let log = read(&shared.log);
    let next = *cursor + 1;
    let live_first = match next
        .checked_sub(log.first_seq)
        .map(|i| log.entries.get(i as usize))
    {
        // The next entry to read is live, or not written yet: nothing before it
        // expired unread (entries expire in sequence order), no search needed. The
        // clock is read only when there is an entry to judge.
        Some(Some(entry)) => {
            let now = Instant::now();
            if entry.expires > now {
                next
            } else {
                log.live_first_seq(now)
            }
        }
        Some(None) => next,
        None => log.live_first_seq(Instant::now()),
    };
    if next < live_first {
        ready.push_back(Event::Lost {
            count: live_first - *cursor - 1,
        });
        *cursor = live_first - 1;
        progressed = true;
    }
    let start = (*cursor + 1 - log.first_seq) as usize;
    for entry in log.entries.range(start..).take(READ_BATCH) {
        *cursor = entry.seq;
        progressed = true;
        if filter.matches(&entry.message) {
            ready.push_back(Event::Message(
                Arc::clone(&entry.message),
                shared_position_of(&entry.message, entry.seq),
            ));
        }
    }
    progressed
}

/// A follower as a stream: an event already read is handed out straight from the
/// follower's buffer, and a read runs in place; only a follower that has caught up
/// waits in a future, whose allocation is reused from one wait to the next (an
/// `unfold` would build a future per event: a hundred instructions per delivery).
pub(super) struct Following {
    /// The follower, while it is not waiting.
    pub(super) follower: Option<Box<Follower>>,
    /// The wait of a follower that has caught up (`follower` is then `None`).
    pub(super) waiting: ReusableBoxFuture<'static, Option<Box<Follower>>>,
    /// Whether `waiting` holds a wait not yet finished.
    pub(super) is_waiting: bool,
}

impl Following {
    pub(super) fn new(follower: Box<Follower>) -> Self {
        Following {
            follower: Some(follower),
            waiting: ReusableBoxFuture::new(std::future::ready(None)),
            is_waiting: false,
        }
    }
}

impl futures::Stream for Following {
    type Item = Result<Event>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            if this.is_waiting {
                let Poll::Ready(woken) = this.waiting.poll(cx) else {
                    return Poll::Pending;
                };
                this.is_waiting = false;
                this.follower = woken;
            }
            let Some(follower) = this.follower.as_mut() else {
                return Poll::Ready(None);
            };
            if let Some(event) = follower.ready.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            if follower.closed.is_stopped() {
                this.follower = None;
                return Poll::Ready(None);
            }
            // A read without registering for wake-ups first: what a follower that lags
            // behind does at every refill. One that finds nothing waits, and its wait
            // registers, then reads once more (an append in between would be missed).
            if follower.fill() {
                continue;
            }
            if let Some(follower) = this.follower.take() {
                this.waiting.set(follower.wait());
                this.is_waiting = true;
            }
        }
    }
}
