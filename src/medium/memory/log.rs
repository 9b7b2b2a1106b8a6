//! The log: the ordered, retained messages of the memory medium, their stamps, the
//! index by id, and the append that fills them.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bson::{doc, Timestamp};

use crate::filter::{Position, SharedPosition};
use crate::medium::Appended;
use crate::message::{DeliveryMode, Message, State};

use super::work::{Work, WorkKey};
use super::{lock, write, MemoryMedium};

pub(super) struct Entry {
    pub(super) seq: u64,
    pub(super) expires: Instant,
    pub(super) message: Arc<Message>,
}

pub(super) struct Log {
    /// Contiguous in `seq`, oldest first, `expires` non-decreasing.
    pub(super) entries: VecDeque<Entry>,
    /// Sequence number of `entries[0]`, or of the next message when empty.
    pub(super) first_seq: u64,
    pub(super) next_seq: u64,
    pub(super) last_ts: Timestamp,
    /// State of work (`delivery: one`) by message id.
    pub(super) work: HashMap<String, Work, FastHash>,
    /// Pending work by service, in claim order: priority (highest first), then sequence.
    pub(super) queues: HashMap<String, BTreeSet<WorkKey>>,
}

/// A stored message as a key of the id index: hashed and compared by its id, and
/// looked up by a `&str` (the same hash as the id's own, as `Borrow` requires).
pub(super) struct ById(pub(super) Arc<Message>);

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
pub(super) type FastHash = foldhash::fast::RandomState;

impl Log {
    pub(super) fn new() -> Self {
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
    pub(super) fn dequeue(&mut self, id: &str) {
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
    pub(super) fn prune(&mut self, now: Instant, max_messages: usize, evicted: &mut Vec<Entry>) {
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
    pub(super) fn next_ts_at(&mut self, wall: SystemTime) -> Timestamp {
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
    pub(super) fn live_first_seq(&self, now: Instant) -> u64 {
        self.first_seq + self.entries.partition_point(|e| e.expires <= now) as u64
    }

    /// The sequence number of the last entry stamped at or before `ts`.
    pub(super) fn seq_at_or_before(&self, ts: Timestamp) -> Option<u64> {
        let idx = self
            .entries
            .partition_point(|e| e.message.ts.is_some_and(|t| t <= ts));
        idx.checked_sub(1).map(|i| self.first_seq + i as u64)
    }
}

/// The position after entry `seq` stamped `ts`: the token carries the sequence number.
pub(super) fn position_at(ts: Timestamp, seq: u64) -> Position {
    Position::new(ts, Some(doc! { "seq": seq as i64 }))
}

/// The shared position of an entry, its token deferred ([`SharedPosition::deferred`]).
pub(super) fn shared_position_of(message: &Message, seq: u64) -> SharedPosition {
    let ts = message.ts.unwrap_or(Timestamp {
        time: 0,
        increment: 0,
    });
    SharedPosition::deferred(ts, seq, position_at)
}

impl MemoryMedium {
    /// Stamps and stores `messages`, taken over (the log keeps them).
    pub(super) fn store(&self, messages: Vec<Message>) -> Vec<Appended> {
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
