//! The memory medium: the whole bus inside one process.
//!
//! Why it exists: a single-instance deployment (the `memory` mode) needs the
//! same API without a server, and the conformance suite needs a medium with the exact
//! semantics of the MongoDB design to hold every other medium to. This is not a mock:
//!
//! - one ordered log shared by every handle built on the same [`MemoryMedium`];
//!   each message gets a stamp from the medium's clock, strictly increasing
//!   (`Timestamp { time: unix seconds, increment }`, as a MongoDB server would write);
//! - retention by age (`common.intracom.timeout_ms`) and by count
//!   (`common.intracom.memory.max_messages`), like a TTL index and a capped collection;
//! - followers pull from the log at their own pace (a cursor each, no per-subscriber
//!   queue), so a slow subscriber neither grows memory nor blocks anyone. One that
//!   falls behind the retained window is told with [`Event::Lost`] how many messages it
//!   missed, then continues with the oldest retained message.
//!
//! Positions carry the log sequence number in their token (`{seq: <i64>}`), so a
//! resumed follower knows exactly what it missed.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bson::{doc, Document, Timestamp};
use tokio::sync::{watch, Notify};
use tokio_util::sync::ReusableBoxFuture;

use super::records::LocalRecords;
use super::{
    Appended, CatalogMap, ClaimRequest, DeadLetter, DeadLetterStore, Event, EventStream,
    Inspection, Medium, ProcessedRecord, QueueStats, Records, Reservation, Settlement, Stats,
    WorkQueue,
};
use crate::config::Config;
use crate::error::Result;
use crate::filter::{Filter, Position, SharedPosition, StartFrom};
use crate::message::{now_nanos, DeliveryMode, Lease, Message, State};

/// How many log entries a follower examines per lock.
const READ_BATCH: usize = 512;

/// Options of the memory medium. Defaults are those of [`Config`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct MemoryOptions {
    /// How long a message is kept (default 300 000 ms, `common.intracom.timeout_ms`).
    pub retention: Duration,
    /// How many messages are kept at most; the oldest go first (default 100 000,
    /// `common.intracom.memory.max_messages`).
    pub max_messages: usize,
    /// Largest encoded message accepted (default 16 MiB, as MongoDB's BSON limit;
    /// `common.intracom.max_message_bytes`).
    pub max_message_bytes: usize,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        Self::from(&Config::default())
    }
}

impl From<&Config> for MemoryOptions {
    fn from(config: &Config) -> Self {
        MemoryOptions {
            retention: Duration::from_millis(config.timeout_ms),
            max_messages: config.memory_max_messages,
            max_message_bytes: config.max_message_bytes,
        }
    }
}

/// The in-process medium. Clone the `Arc` to share it between bus handles.
///
/// ```
/// # tokio_test_block_on(async {
/// use std::sync::Arc;
/// use intracom::{Config, Intracom, medium::memory::MemoryMedium};
/// let medium = Arc::new(MemoryMedium::new(Default::default()));
/// let billing = Intracom::with_medium(Config::builder().service("billing").build()?, medium.clone()).await?;
/// let users = Intracom::with_medium(Config::builder().service("users").build()?, medium).await?;
/// # Ok::<(), intracom::Error>(()) });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Runtime::new().unwrap().block_on(f) }
/// ```
pub struct MemoryMedium {
    shared: Arc<Shared>,
}

struct Shared {
    options: MemoryOptions,
    log: RwLock<Log>,
    /// The stored messages by id (the index shares the messages: no copy of the ids).
    /// Only publishes use it, and hold it through the whole publish: it sits outside
    /// the log's lock, so that its upkeep after an eviction (the oldest message's id,
    /// in memory no cache holds any more) does not keep followers waiting.
    ids: Mutex<HashSet<ById, FastHash>>,
    /// Woken on every append; followers caught up with the log wait on it (one lock
    /// per append, where a `watch` channel's notify takes eight).
    appended: Notify,
    /// The sequence number of the newest entry written (0: none yet), set after the
    /// log's lock and before `appended` wakes anyone: a follower that has read up to it
    /// knows, without the lock, that there is nothing to read.
    written: AtomicU64,
    closed: crate::stop::Stop,
    catalog: Mutex<CatalogMap>,
    checkpoints: Mutex<HashMap<String, Position>>,
    /// Dead letters, oldest first; at most `max_messages` are kept.
    dead: Mutex<VecDeque<DeadLetter>>,
    /// Idempotency records.
    processed: LocalRecords,
    /// Bumped whenever work is settled; request callers wait on it.
    outcomes: watch::Sender<u64>,
}

struct Entry {
    seq: u64,
    expires: Instant,
    message: Arc<Message>,
}

struct Log {
    /// Contiguous in `seq`, oldest first, `expires` non-decreasing.
    entries: VecDeque<Entry>,
    /// Sequence number of `entries[0]`, or of the next message when empty.
    first_seq: u64,
    next_seq: u64,
    last_ts: Timestamp,
    /// State of work (`delivery: one`) by message id.
    work: HashMap<String, Work, FastHash>,
    /// Pending work by service, in claim order: priority (highest first), then sequence.
    queues: HashMap<String, BTreeSet<WorkKey>>,
}

type WorkKey = (Reverse<i32>, u64, String);

/// A stored message as a key of the id index: hashed and compared by its id, and
/// looked up by a `&str` (the same hash as the id's own, as `Borrow` requires).
struct ById(Arc<Message>);

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for ById {}

impl std::hash::Hash for ById {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.id.as_str().hash(state);
    }
}

impl std::borrow::Borrow<str> for ById {
    fn borrow(&self) -> &str {
        &self.0.id
    }
}

/// The hasher of the maps keyed by message id, touched on every publish and expiry
/// (randomly seeded per process, like std's, and several times faster on short keys).
type FastHash = foldhash::fast::RandomState;

/// The mutable part of a work message (the stored message itself never changes).
struct Work {
    message: Arc<Message>,
    seq: u64,
    state: State,
    attempts: i32,
    lease: Option<Lease>,
    last_error: Option<String>,
    result: Option<Document>,
    response: Option<Document>,
    response_ts: Option<i64>,
}

impl Work {
    /// The message as it stands now, as a database would return the document.
    fn current(&self) -> Message {
        let mut m = (*self.message).clone();
        m.state = Some(self.state);
        m.attempts = self.attempts;
        m.lease.clone_from(&self.lease);
        m.last_error.clone_from(&self.last_error);
        m.result.clone_from(&self.result);
        m.response.clone_from(&self.response);
        m.response_ts = self.response_ts;
        m
    }

    /// Whether `owner` holds the lease of this work.
    fn held_by(&self, owner: &str) -> bool {
        self.lease.as_ref().is_some_and(|l| l.owner == owner)
    }

    fn key(&self) -> WorkKey {
        (
            Reverse(self.message.priority),
            self.seq,
            self.message.id.clone(),
        )
    }
}

impl Log {
    fn new() -> Self {
        Log {
            entries: VecDeque::new(),
            first_seq: 1,
            next_seq: 1,
            last_ts: Timestamp {
                time: 0,
                increment: 0,
            },
            work: HashMap::default(),
            queues: HashMap::new(),
        }
    }

    /// Takes work out of its service's pending queue (it is settled or buried).
    fn dequeue(&mut self, id: &str) {
        if let Some(work) = self.work.get(id) {
            let key = work.key();
            if let Some(service) = &work.message.dest_service {
                if let Some(queue) = self.queues.get_mut(service) {
                    queue.remove(&key);
                }
            }
        }
    }

    /// Drops what retention removes: expired entries and those over the count limit.
    ///
    /// The entries taken out go to `evicted`: the caller takes their ids out of the
    /// index and drops them (and with them, messages nobody else holds) after releasing
    /// the log's lock, which followers wait for meanwhile.
    fn prune(&mut self, now: Instant, max_messages: usize, evicted: &mut Vec<Entry>) {
        while let Some(front) = self.entries.front() {
            if front.expires > now && self.entries.len() <= max_messages {
                break;
            }
            if let Some(entry) = self.entries.pop_front() {
                if entry.message.delivery == DeliveryMode::One {
                    self.dequeue(&entry.message.id);
                    self.work.remove(&entry.message.id);
                }
                self.first_seq = entry.seq + 1;
                evicted.push(entry);
            }
        }
    }

    /// The next stamp at wall-clock time `wall`: its seconds, and an increment that
    /// makes it strictly greater than the previous one even when the clock stalls or
    /// steps back.
    fn next_ts_at(&mut self, wall: SystemTime) -> Timestamp {
        let secs = wall
            .duration_since(UNIX_EPOCH)
            .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
            .unwrap_or(0);
        let last = self.last_ts;
        let ts = if secs > last.time {
            Timestamp {
                time: secs,
                increment: 1,
            }
        } else if last.increment < u32::MAX {
            Timestamp {
                time: last.time,
                increment: last.increment + 1,
            }
        } else {
            Timestamp {
                time: last.time.saturating_add(1),
                increment: 1,
            }
        };
        self.last_ts = ts;
        ts
    }

    /// The first sequence number that has not expired at `now`.
    fn live_first_seq(&self, now: Instant) -> u64 {
        self.first_seq + self.entries.partition_point(|e| e.expires <= now) as u64
    }

    /// The sequence number of the last entry stamped at or before `ts`.
    fn seq_at_or_before(&self, ts: Timestamp) -> Option<u64> {
        let idx = self
            .entries
            .partition_point(|e| e.message.ts.is_some_and(|t| t <= ts));
        idx.checked_sub(1).map(|i| self.first_seq + i as u64)
    }
}

/// The position after entry `seq` stamped `ts`: the token carries the sequence number.
fn position_at(ts: Timestamp, seq: u64) -> Position {
    Position::new(ts, Some(doc! { "seq": seq as i64 }))
}

/// The shared position of an entry, its token deferred ([`SharedPosition::deferred`]).
fn shared_position_of(message: &Message, seq: u64) -> SharedPosition {
    let ts = message.ts.unwrap_or(Timestamp {
        time: 0,
        increment: 0,
    });
    SharedPosition::deferred(ts, seq, position_at)
}

impl MemoryMedium {
    /// A new, empty medium.
    pub fn new(options: MemoryOptions) -> Self {
        let processed = LocalRecords::new(options.max_messages, options.retention);
        MemoryMedium {
            shared: Arc::new(Shared {
                options,
                log: RwLock::new(Log::new()),
                appended: Notify::new(),
                written: AtomicU64::new(0),
                ids: Mutex::new(HashSet::default()),
                closed: crate::stop::Stop::new(),
                catalog: Mutex::new(CatalogMap::new()),
                checkpoints: Mutex::new(HashMap::new()),
                dead: Mutex::new(VecDeque::new()),
                processed,
                outcomes: watch::channel(0).0,
            }),
        }
    }

    /// How many messages are retained right now (expired ones excluded).
    pub fn len(&self) -> usize {
        let log = read(&self.shared.log);
        let live = log.live_first_seq(Instant::now());
        (log.next_seq - live) as usize
    }

    /// Whether no message is retained.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// A poisoned lock means a panic while holding it; the log is still consistent because
// every mutation completes before anything can panic, so keep going with it.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// One follower: a cursor in the log and a small buffer of events ready to hand out.
struct Follower {
    shared: Arc<Shared>,
    /// Sequence number of the last entry examined.
    cursor: u64,
    filter: Filter,
    ready: VecDeque<Event>,
    /// The medium's close signal, checked per read without a lock.
    closed: crate::stop::Stop,
}

impl Follower {
    /// Reads the log from the cursor ([`read_log`]); true if anything happened.
    fn fill(&mut self) -> bool {
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
    async fn wait(mut self: Box<Self>) -> Option<Box<Self>> {
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
fn read_log(
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
struct Following {
    /// The follower, while it is not waiting.
    follower: Option<Box<Follower>>,
    /// The wait of a follower that has caught up (`follower` is then `None`).
    waiting: ReusableBoxFuture<'static, Option<Box<Follower>>>,
    /// Whether `waiting` holds a wait not yet finished.
    is_waiting: bool,
}

impl Following {
    fn new(follower: Box<Follower>) -> Self {
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

impl MemoryMedium {
    /// Stamps and stores `messages`, taken over (the log keeps them).
    fn store(&self, messages: Vec<Message>) -> Vec<Appended> {
        let options = &self.shared.options;
        // Outside the log's lock, which followers wait for while a publish holds it: the
        // messages' allocations and moves, the receipts' copies of the ids, and the wall
        // clock's reading (one for the stamps of the whole call: `next_ts_at` keeps
        // stamps increasing whatever it reads). The messages go into the log as they
        // are: the publisher keeps no reference to them to drop later.
        let mut out: Vec<Appended> = messages
            .iter()
            .map(|message| Appended {
                id: message.id.clone(),
                ts: None,
                duplicate: false,
            })
            .collect();
        let messages: Vec<Arc<Message>> = messages.into_iter().map(Arc::new).collect();
        let wall = SystemTime::now();
        let at = bson::DateTime::from_system_time(wall);
        let mut evicted = Vec::new();
        // Publishes take the index first, then the log: a duplicate check and the
        // insertion that follows are one step for concurrent publishers.
        let mut ids = lock(&self.shared.ids);
        let appended = {
            let mut log = write(&self.shared.log);
            let before = log.next_seq;
            // Read under the lock: entries expire in sequence order.
            let now = Instant::now();
            log.prune(now, options.max_messages, &mut evicted);
            for (mut message, receipt) in messages.into_iter().zip(&mut out) {
                if let Some(stored) = ids.get(message.id.as_str()) {
                    // (An id whose message this publish just evicted is free again.)
                    if !evicted.iter().any(|e| Arc::ptr_eq(&e.message, &stored.0)) {
                        receipt.ts = stored.0.ts;
                        receipt.duplicate = true;
                        continue;
                    }
                }
                let ts = log.next_ts_at(wall);
                // Not shared yet: stamped in place (`make_mut` copies a shared one only).
                let stamped = Arc::make_mut(&mut message);
                stamped.ts = Some(ts);
                stamped.at = Some(at);
                receipt.ts = Some(ts);
                let seq = log.next_seq;
                log.next_seq += 1;
                ids.replace(ById(Arc::clone(&message)));
                if message.delivery == DeliveryMode::One {
                    let state = message.state.unwrap_or(State::Pending);
                    let work = Work {
                        message: Arc::clone(&message),
                        seq,
                        state,
                        attempts: message.attempts,
                        lease: None,
                        last_error: None,
                        result: message.result.clone(),
                        response: message.response.clone(),
                        response_ts: message.response_ts,
                    };
                    if let (State::Pending, Some(service)) = (state, &message.dest_service) {
                        log.queues
                            .entry(service.clone())
                            .or_default()
                            .insert(work.key());
                    }
                    log.work.insert(message.id.clone(), work);
                }
                log.entries.push_back(Entry {
                    seq,
                    expires: crate::deadline::later(now, options.retention),
                    message,
                });
            }
            log.prune(now, options.max_messages, &mut evicted);
            (log.next_seq != before).then_some(log.next_seq - 1)
        };
        if let Some(newest) = appended {
            self.shared.written.store(newest, Ordering::Release);
            self.shared.appended.notify_waiters();
        }
        // Outside the log's lock: the evicted messages' ids leave the index (unless the
        // id names a message stored since), then the messages are dropped, which frees
        // their fields and bodies.
        for entry in &evicted {
            if let Some(stored) = ids.take(entry.message.id.as_str()) {
                if !Arc::ptr_eq(&stored.0, &entry.message) {
                    ids.insert(stored);
                }
            }
        }
        drop(ids);
        drop(evicted);
        out
    }
}

#[async_trait]
impl Medium for MemoryMedium {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn max_message_bytes(&self) -> usize {
        self.shared.options.max_message_bytes
    }

    fn work(&self) -> Option<&dyn WorkQueue> {
        Some(self)
    }

    fn dead_letters(&self) -> Option<&dyn DeadLetterStore> {
        Some(self)
    }

    fn records(&self) -> Option<&dyn Records> {
        Some(self)
    }

    fn inspection(&self) -> Option<&dyn Inspection> {
        Some(self)
    }

    fn keeps_decoded(&self) -> bool {
        true
    }

    async fn append(&self, messages: &[Message]) -> Result<Vec<Appended>> {
        if self.shared.closed.is_stopped() {
            return Err(crate::Error::Shutdown);
        }
        Ok(self.store(messages.to_vec()))
    }

    async fn append_owned(
        &self,
        messages: Vec<Message>,
        _encoded: &[bson::RawDocumentBuf],
    ) -> std::result::Result<Vec<Appended>, (crate::Error, Vec<Message>)> {
        if self.shared.closed.is_stopped() {
            return Err((crate::Error::Shutdown, messages));
        }
        Ok(self.store(messages))
    }

    async fn follow(&self, from: StartFrom, filter: Filter) -> Result<EventStream> {
        if self.shared.closed.is_stopped() {
            return Err(crate::Error::Shutdown);
        }
        let cursor = {
            let log = read(&self.shared.log);
            let last = log.next_seq - 1;
            match from {
                StartFrom::Now => last,
                StartFrom::Beginning => log.live_first_seq(Instant::now()) - 1,
                StartFrom::After(position) => {
                    let seq = position
                        .token
                        .as_ref()
                        .and_then(|t| t.get_i64("seq").ok())
                        .and_then(|s| u64::try_from(s).ok());
                    match seq {
                        // A sequence from this medium: exact, and tells what was lost.
                        Some(seq) => seq.min(last),
                        // A position without our token: place it by its stamp.
                        None => log
                            .seq_at_or_before(position.ts)
                            .unwrap_or(log.first_seq.saturating_sub(1)),
                    }
                }
            }
        };
        let follower = Box::new(Follower {
            shared: Arc::clone(&self.shared),
            cursor,
            filter,
            ready: VecDeque::new(),
            closed: self.shared.closed.clone(),
        });
        Ok(Box::pin(Following::new(follower)))
    }

    async fn catalog_load(&self) -> Result<CatalogMap> {
        Ok(lock(&self.shared.catalog).clone())
    }

    async fn catalog_add(&self, service: &str, actions: &[String]) -> Result<()> {
        lock(&self.shared.catalog)
            .entry(service.to_string())
            .or_default()
            .extend(actions.iter().cloned());
        Ok(())
    }

    async fn checkpoint_load(&self, name: &str) -> Result<Option<Position>> {
        Ok(lock(&self.shared.checkpoints).get(name).cloned())
    }

    async fn checkpoint_save(&self, name: &str, position: &Position) -> Result<()> {
        lock(&self.shared.checkpoints).insert(name.to_string(), position.clone());
        Ok(())
    }

    async fn close(&self) {
        self.shared.closed.stop();
        // Followers that caught up wait for an append: this one wakes them to end.
        self.shared.appended.notify_waiters();
    }
}

#[async_trait]
impl WorkQueue for MemoryMedium {
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Message>> {
        if self.shared.closed.is_stopped() {
            return Err(crate::Error::Shutdown);
        }
        let now = bson::DateTime::now();
        let mut guard = write(&self.shared.log);
        let log = &mut *guard;
        let Some(queue) = log.queues.get(&request.service) else {
            return Ok(None);
        };
        let picked = queue.iter().find_map(|(_, _, id)| {
            let work = log.work.get(id)?;
            let free = work.lease.as_ref().is_none_or(|l| l.until() <= now);
            (free && request.actions.contains(&work.message.action)).then(|| id.clone())
        });
        let Some(work) = picked.and_then(|id| log.work.get_mut(&id)) else {
            return Ok(None);
        };
        work.attempts += 1;
        work.lease = Some(lease(&request.owner, now, request.lease));
        Ok(Some(work.current()))
    }

    async fn renew(&self, id: &str, owner: &str, duration: Duration) -> Result<bool> {
        let mut log = write(&self.shared.log);
        match log.work.get_mut(id) {
            Some(work) if work.state == State::Pending && work.held_by(owner) => {
                work.lease = Some(lease(owner, bson::DateTime::now(), duration));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn settle(&self, id: &str, owner: Option<&str>, settlement: Settlement) -> Result<bool> {
        let finished = {
            let mut guard = write(&self.shared.log);
            let log = &mut *guard;
            let Some(work) = log.work.get_mut(id) else {
                return Ok(false);
            };
            let holds = owner.is_none_or(|o| work.held_by(o));
            if work.state != State::Pending || !holds {
                return Ok(false);
            }
            let finished = !matches!(settlement, Settlement::Retry { .. });
            match settlement {
                Settlement::Done(result) => {
                    work.state = State::Done;
                    work.result = result;
                }
                Settlement::Failed(error) => {
                    work.state = State::Error;
                    work.response = Some(error);
                }
                Settlement::Retry { error, after } => {
                    work.last_error = Some(error);
                    work.lease = Some(lease("backoff", bson::DateTime::now(), after));
                }
            }
            if finished {
                work.lease = None;
                work.response_ts = Some(now_nanos());
                log.dequeue(id);
            }
            finished
        };
        if finished {
            self.shared.outcomes.send_modify(|n| *n += 1);
        }
        Ok(true)
    }

    async fn bury(&self, id: &str, owner: &str, reason: &str) -> Result<bool> {
        let document = {
            let mut guard = write(&self.shared.log);
            let log = &mut *guard;
            let Some(work) = log.work.get_mut(id) else {
                return Ok(false);
            };
            if work.state != State::Pending || !work.held_by(owner) {
                return Ok(false);
            }
            work.state = State::Error;
            work.lease = None;
            work.response = Some(doc! { "error": reason, "dead": true });
            work.response_ts = Some(now_nanos());
            let document =
                bson::to_document(&work.current()).map_err(crate::error::PayloadError::from)?;
            log.dequeue(id);
            document
        };
        self.shared.outcomes.send_modify(|n| *n += 1);
        self.dead_letter(document, reason.to_string()).await?;
        Ok(true)
    }

    async fn await_outcome(&self, id: &str, timeout: Duration) -> Result<Option<Message>> {
        let deadline = crate::deadline::after(timeout);
        let mut outcomes = self.shared.outcomes.subscribe();
        loop {
            outcomes.borrow_and_update();
            {
                let log = read(&self.shared.log);
                if let Some(work) = log.work.get(id) {
                    if work.state != State::Pending {
                        return Ok(Some(work.current()));
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
                _ = self.shared.closed.token().cancelled() => return Err(crate::Error::Shutdown),
                changed = outcomes.changed() => if changed.is_err() { return Ok(None) },
            }
        }
    }
}

#[async_trait]
impl DeadLetterStore for MemoryMedium {
    async fn dead_letter(&self, document: Document, reason: String) -> Result<()> {
        let id = super::id_of(&document);
        let mut dead = lock(&self.shared.dead);
        if !dead.iter().any(|d| d.id == id) {
            dead.push_back(DeadLetter {
                id,
                document,
                reason,
                at: Some(bson::DateTime::now()),
            });
            while dead.len() > self.shared.options.max_messages {
                dead.pop_front();
            }
        }
        Ok(())
    }

    async fn dead_list(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        Ok(lock(&self.shared.dead)
            .iter()
            .take(limit)
            .cloned()
            .collect())
    }

    async fn dead_get(&self, id: &str) -> Result<Option<DeadLetter>> {
        Ok(lock(&self.shared.dead).iter().find(|d| d.id == id).cloned())
    }

    async fn dead_remove(&self, id: Option<&str>) -> Result<u64> {
        let mut dead = lock(&self.shared.dead);
        let before = dead.len();
        match id {
            Some(id) => dead.retain(|d| d.id != id),
            None => dead.clear(),
        }
        Ok((before - dead.len()) as u64)
    }
}

#[async_trait]
impl Records for MemoryMedium {
    async fn processed_reserve(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Reservation> {
        Ok(self.shared.processed.reserve(consumer, id, owner, lease))
    }

    async fn processed_complete(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        result: Option<Document>,
    ) -> Result<()> {
        self.shared.processed.complete(consumer, id, owner, result);
        Ok(())
    }

    async fn processed_release(&self, consumer: &str, id: &str, owner: &str) -> Result<()> {
        self.shared.processed.release(consumer, id, owner);
        Ok(())
    }
}

#[async_trait]
impl Inspection for MemoryMedium {
    async fn stats(&self) -> Result<Stats> {
        let mut stats = Stats::default();
        let checkpoints = lock(&self.shared.checkpoints).clone();
        stats.dead = lock(&self.shared.dead).len() as u64;
        let log = read(&self.shared.log);
        let live_first = log.live_first_seq(Instant::now());
        let live = log
            .entries
            .range((live_first - log.first_seq) as usize..)
            .collect::<Vec<_>>();
        let mut by_service: HashMap<&str, u64> = HashMap::new();
        let mut by_action: HashMap<&str, u64> = HashMap::new();
        let mut by_type: HashMap<&str, u64> = HashMap::new();
        let mut by_state: HashMap<&str, u64> = HashMap::new();
        for entry in &live {
            let m = &entry.message;
            *by_service.entry(&m.source_service).or_default() += 1;
            *by_action.entry(&m.action).or_default() += 1;
            *by_type.entry(m.kind.as_str()).or_default() += 1;
            let state = log.work.get(&m.id).map(|w| w.state).or(m.state);
            if let Some(state) = state {
                *by_state.entry(state.as_str()).or_default() += 1;
            }
        }
        stats.total = live.len() as u64;
        stats.by_service = largest_first(by_service);
        stats.by_action = largest_first(by_action);
        stats.by_type = largest_first(by_type);
        stats.by_state = largest_first(by_state);
        stats.queue_depth = log.queues.values().map(|q| q.len() as u64).sum();
        let newest = live.last().and_then(|e| e.message.ts);
        let mut names: Vec<_> = checkpoints.into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, position) in names {
            let after = position
                .token
                .as_ref()
                .and_then(|t| t.get_i64("seq").ok())
                .and_then(|s| u64::try_from(s).ok())
                .or_else(|| log.seq_at_or_before(position.ts))
                .unwrap_or(0);
            let behind = (log.next_seq - 1).saturating_sub(after.max(live_first - 1));
            let seconds = newest.map_or(0, |n| u64::from(n.time.saturating_sub(position.ts.time)));
            stats.lag.push((name, behind, seconds));
        }
        Ok(stats)
    }

    async fn queues(&self) -> Result<Vec<QueueStats>> {
        let now = bson::DateTime::now();
        let mut queues: std::collections::BTreeMap<(String, String), QueueStats> =
            Default::default();
        let mut count = |service: &str, action: &str, add: fn(&mut QueueStats)| {
            add(queues
                .entry((service.to_string(), action.to_string()))
                .or_insert_with(|| QueueStats::new(service, action)))
        };
        {
            let log = read(&self.shared.log);
            for work in log.work.values() {
                let Some(service) = &work.message.dest_service else {
                    continue;
                };
                if work.state != State::Pending {
                    continue;
                }
                let held = work
                    .lease
                    .as_ref()
                    .is_some_and(|l| l.owner != "backoff" && l.until() > now);
                if held {
                    count(service, &work.message.action, |q| q.in_flight += 1);
                } else {
                    count(service, &work.message.action, |q| q.depth += 1);
                }
            }
        }
        for letter in lock(&self.shared.dead).iter() {
            let d = &letter.document;
            if let (Ok("one"), Ok(service), Ok(action)) = (
                d.get_str("delivery"),
                d.get_str("serviceNameDest"),
                d.get_str("action"),
            ) {
                count(service, action, |q| q.dead += 1);
            }
        }
        Ok(queues.into_values().collect())
    }

    async fn queue_purge(&self, service: &str, action: &str) -> Result<u64> {
        let now = bson::DateTime::now();
        let purged = {
            let mut guard = write(&self.shared.log);
            let log = &mut *guard;
            let ids: Vec<String> = log
                .queues
                .get(service)
                .map(|queue| queue.iter().map(|(_, _, id)| id.clone()).collect())
                .unwrap_or_default();
            let mut purged = Vec::new();
            for id in ids {
                let Some(work) = log.work.get_mut(&id) else {
                    continue;
                };
                let held = work
                    .lease
                    .as_ref()
                    .is_some_and(|l| l.owner != "backoff" && l.until() > now);
                if work.message.action != action || work.state != State::Pending || held {
                    continue;
                }
                work.state = State::Error;
                work.lease = None;
                work.response = Some(doc! { "error": "purged", "purged": true });
                work.response_ts = Some(now_nanos());
                purged.push(id);
            }
            for id in &purged {
                log.dequeue(id);
            }
            purged.len() as u64
        };
        if purged > 0 {
            self.shared.outcomes.send_modify(|n| *n += 1);
        }
        Ok(purged)
    }

    async fn processed_get(&self, consumer: &str, id: &str) -> Result<Option<ProcessedRecord>> {
        Ok(self.shared.processed.get(consumer, id))
    }

    async fn processed_remove(&self, consumer: &str, id: &str) -> Result<u64> {
        Ok(u64::from(self.shared.processed.remove(consumer, id)))
    }
}

fn largest_first(counts: HashMap<&str, u64>) -> Vec<(String, u64)> {
    let mut rows: Vec<(String, u64)> = counts
        .into_iter()
        .map(|(k, n)| (k.to_string(), n))
        .collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    rows
}

impl MemoryMedium {
    /// The dead letters kept: (document, reason), oldest first.
    pub fn dead_letters(&self) -> Vec<(Document, String)> {
        lock(&self.shared.dead)
            .iter()
            .map(|d| (d.document.clone(), d.reason.clone()))
            .collect()
    }
}

/// A lease for `owner` taken at `at` (the medium's clock) for `d`.
fn lease(owner: &str, at: bson::DateTime, d: Duration) -> Lease {
    Lease {
        owner: owner.to_string(),
        at,
        ms: i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn msg(action: &str) -> Message {
        let mut m = Message::broadcast(action);
        m.source_service = "s".into();
        m.source_instance = "s-1".into();
        m
    }

    fn medium(retention_ms: u64, max: usize) -> MemoryMedium {
        MemoryMedium::new(MemoryOptions {
            retention: Duration::from_millis(retention_ms),
            max_messages: max,
            max_message_bytes: 1 << 20,
        })
    }

    #[test]
    fn stamps_strictly_increase_even_when_the_clock_does_not_move() {
        let mut log = Log::new();
        // One wall-clock reading for many stamps (as for a batch), then a clock that
        // steps back a minute.
        let wall = SystemTime::now();
        let mut last = log.next_ts_at(wall);
        for i in 0..10_000 {
            let at = if i < 5_000 {
                wall
            } else {
                wall - Duration::from_secs(60)
            };
            let ts = log.next_ts_at(at);
            assert!(ts > last, "{ts:?} after {last:?}");
            last = ts;
        }
        log.last_ts = Timestamp {
            time: u32::MAX - 1,
            increment: u32::MAX,
        };
        assert!(
            log.next_ts_at(SystemTime::now())
                > Timestamp {
                    time: u32::MAX - 1,
                    increment: u32::MAX
                }
        );
    }

    #[tokio::test]
    async fn count_limit_reports_exactly_what_was_lost() {
        let m = medium(60_000, 3);
        let mut from_start = m
            .follow(StartFrom::Beginning, Filter::monitor())
            .await
            .unwrap();
        m.append(&(0..5).map(|i| msg(&format!("a{i}"))).collect::<Vec<_>>())
            .await
            .unwrap();
        match from_start.next().await.unwrap().unwrap() {
            Event::Lost { count } => assert_eq!(count, 2),
            other => panic!("expected Lost, got {other:?}"),
        }
        let mut actions = Vec::new();
        for _ in 0..3 {
            if let Event::Message(message, _) = from_start.next().await.unwrap().unwrap() {
                actions.push(message.action.clone());
            }
        }
        assert_eq!(actions, ["a2", "a3", "a4"]);
        assert_eq!(m.len(), 3);
    }

    #[tokio::test]
    async fn duplicate_ids_are_stored_once() {
        let m = medium(60_000, 10);
        let one = msg("a");
        let first = m.append(std::slice::from_ref(&one)).await.unwrap();
        let again = m.append(&[one]).await.unwrap();
        assert!(!first[0].duplicate);
        assert!(again[0].duplicate);
        assert_eq!(first[0].ts, again[0].ts);
        assert_eq!(m.len(), 1);
    }

    #[tokio::test]
    async fn an_id_whose_message_the_same_append_evicts_is_stored_again_and_stays_indexed() {
        // A retention of a second: the third append below must come within it of the
        // second, even on a loaded machine.
        let m = medium(1000, 10);
        let one = msg("a");
        let first = m.append(std::slice::from_ref(&one)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // This append's prune evicts the expired first copy, then stores this one.
        let again = m.append(std::slice::from_ref(&one)).await.unwrap();
        assert!(!again[0].duplicate);
        assert!(again[0].ts > first[0].ts);
        assert_eq!(m.len(), 1);
        // The index names the new copy (the eviction did not take its id out).
        let third = m.append(std::slice::from_ref(&one)).await.unwrap();
        assert!(third[0].duplicate);
        assert_eq!(third[0].ts, again[0].ts);
    }

    #[tokio::test]
    async fn an_id_twice_in_one_append_is_stored_once_and_again_after_it_expired() {
        let m = medium(60_000, 2);
        let one = msg("a");
        let appended = m.append(&[one.clone(), one.clone()]).await.unwrap();
        assert!(!appended[0].duplicate);
        assert!(appended[1].duplicate);
        assert_eq!(appended[0].ts, appended[1].ts);
        assert_eq!(appended[1].id, one.id);
        // Pushed out by the count limit: gone from the id index too.
        m.append(&[msg("b"), msg("c")]).await.unwrap();
        let again = m.append(std::slice::from_ref(&one)).await.unwrap();
        assert!(!again[0].duplicate);
        assert!(again[0].ts > appended[0].ts);
    }

    #[tokio::test]
    async fn a_follower_that_caught_up_wakes_on_each_append_and_ends_when_closed() {
        use futures::FutureExt;
        let m = Arc::new(medium(60_000, 100));
        let mut s = m.follow(StartFrom::Now, Filter::monitor()).await.unwrap();
        for round in 0..3 {
            // Caught up: nothing to hand out, so the follower waits.
            assert!(s.next().now_or_never().is_none(), "round {round}");
            let batch: Vec<_> = (0..2).map(|i| msg(&format!("r{round}-{i}"))).collect();
            m.append(&batch).await.unwrap();
            for i in 0..2 {
                match s.next().await.unwrap().unwrap() {
                    Event::Message(message, _) => {
                        assert_eq!(message.action, format!("r{round}-{i}"))
                    }
                    other => panic!("expected a message, got {other:?}"),
                }
            }
        }
        // An append from another task wakes the follower waiting for it.
        let writer = Arc::clone(&m);
        let append = tokio::spawn(async move {
            tokio::task::yield_now().await;
            writer.append(&[msg("late")]).await.unwrap();
        });
        match s.next().await.unwrap().unwrap() {
            Event::Message(message, _) => assert_eq!(message.action, "late"),
            other => panic!("expected a message, got {other:?}"),
        }
        append.await.unwrap();
        // Closed while the follower waits: the stream ends, and stays ended.
        assert!(s.next().now_or_never().is_none());
        m.close().await;
        assert!(s.next().await.is_none());
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn messages_that_expired_unread_are_reported_lost_before_any_new_append() {
        // A retention of a second: `d` below must be read within it, even on a loaded
        // machine.
        let m = medium(1000, 100);
        let mut s = m.follow(StartFrom::Now, Filter::monitor()).await.unwrap();
        m.append(&[msg("a"), msg("b"), msg("c")]).await.unwrap();
        // Expired while nobody read them, and no append since to prune them.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        match s.next().await.unwrap().unwrap() {
            Event::Lost { count } => assert_eq!(count, 3),
            other => panic!("expected Lost, got {other:?}"),
        }
        m.append(&[msg("d")]).await.unwrap();
        match s.next().await.unwrap().unwrap() {
            Event::Message(message, _) => assert_eq!(message.action, "d"),
            other => panic!("expected a message, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn close_ends_followers() {
        let m = medium(60_000, 10);
        let mut s = m.follow(StartFrom::Now, Filter::monitor()).await.unwrap();
        m.close().await;
        assert!(s.next().await.is_none());
        assert!(m.append(&[msg("a")]).await.is_err());
    }
}
