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
//!   falls behind the retained window is told with [`Event::Lost`](super::Event::Lost) how many messages it
//!   missed, then continues with the oldest retained message.
//!
//! Positions carry the log sequence number in their token (`{seq: <i64>}`), so a
//! resumed follower knows exactly what it missed.
//!
//! One file per concept: `log` (the retained messages, their stamps and the append),
//! `follow` (the followers), `work` (claims, leases, settlement), `dead` (the dead
//! letters), `processed` (idempotency records) and `inspection` (counts and repairs).

mod dead;
mod follow;
mod inspection;
mod log;
mod processed;
#[cfg(test)]
mod tests;
mod work;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::error::Result;
use crate::filter::{Filter, Position, StartFrom};
use crate::message::Message;

use super::records::LocalRecords;
use super::{
    Appended, CatalogMap, DeadLetter, DeadLetterStore, EventStream, Inspection, Medium,
    NotAppended, Records, WorkQueue,
};
use follow::{Follower, Following};
use log::{ById, FastHash, Log};

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

    fn dead_letter_store(&self) -> Option<&dyn DeadLetterStore> {
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
    ) -> std::result::Result<Vec<Appended>, NotAppended> {
        if self.shared.closed.is_stopped() {
            return Err(NotAppended {
                error: crate::Error::Shutdown,
                messages,
            });
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

    /// The sequence number of the last entry written: where a follower from now
    /// starts (see `follow`).
    async fn anchor(&self, internal: crate::medium::sealed::Internal) -> Result<Option<Position>> {
        let _ = internal;
        if self.shared.closed.is_stopped() {
            return Err(crate::Error::Shutdown);
        }
        let log = read(&self.shared.log);
        let last = log.next_seq - 1;
        let ts = last
            .checked_sub(log.first_seq)
            .and_then(|i| log.entries.get(i as usize))
            .and_then(|entry| entry.message.ts)
            .unwrap_or(bson::Timestamp {
                time: 0,
                increment: 0,
            });
        Ok(Some(log::position_at(ts, last)))
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
