//! Exactly-once effect on top of at-least-once delivery (seed 003's IdempotencyStore).
//!
//! Why it exists: the bus delivers at least once (a restart re-delivers the in-flight
//! messages, a crashed worker's job runs again). A consumer whose effect must happen
//! once asks the bus to run its handler at most once per message id. Records are kept
//! per (consumer, message id): two consumers of one message each run once
//! (MassTransit #3543). They live in the medium's store (`processed` on MongoDB, with a
//! TTL of `common.intracom.timeout_ms`, so a record outlives any re-delivery of its
//! message).
//!
//! When the store cannot be reached, records go to a bounded in-memory store instead:
//! the fall-back is logged once and counted, and when the store answers again the
//! records made meanwhile are written to it and the bus goes back to it. While on the
//! fall-back, de-duplication covers this process only.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use bson::Document;
use serde::Serialize;

use crate::bus::Intracom;
use crate::error::Error;

/// How many records the in-memory fall-back keeps (the oldest go first).
pub const FALLBACK_CAPACITY: usize = 10_000;

/// What [`Idempotent::run_once`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum Once<R> {
    /// The handler ran now; its result.
    Ran(R),
    /// The handler had already run for this message; the result recorded then.
    AlreadyDone(Option<Document>),
}

type Key = (String, String);

/// Records by key, and the keys oldest first (to drop the oldest past the capacity).
type Records = (HashMap<Key, Option<Document>>, VecDeque<Key>);

/// The in-memory fall-back and its state, shared by the handles of one bus.
#[derive(Default)]
pub(crate) struct Fallback {
    records: Mutex<Records>,
    active: AtomicBool,
    /// Times the bus fell back to memory.
    pub(crate) fallbacks: AtomicU64,
}

impl Fallback {
    fn get(&self, key: &Key) -> Option<Option<Document>> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .get(key)
            .cloned()
    }

    fn put(&self, key: Key, result: Option<Document>) {
        let mut guard = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *guard;
        if map.insert(key.clone(), result).is_none() {
            order.push_back(key);
        }
        while order.len() > FALLBACK_CAPACITY {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    fn take_all(&self) -> Vec<(Key, Option<Document>)> {
        let mut guard = self.records.lock().unwrap_or_else(|p| p.into_inner());
        guard.1.clear();
        guard.0.drain().collect()
    }

    fn fall_back(&self, error: &Error) {
        if !self.active.swap(true, Ordering::SeqCst) {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::FALLBACK, "kind" => "idempotency").increment(1);
            tracing::warn!(%error, "idempotency store unreachable: falling back to memory (this process only)");
        }
    }
}

/// Runs handlers at most once per message for one consumer; from
/// [`Intracom::idempotent`].
#[derive(Clone, Debug)]
pub struct Idempotent {
    bus: Intracom,
    consumer: String,
}

impl Idempotent {
    /// Runs `handler` unless this consumer already processed message `id`. The record
    /// is written only when the handler succeeds, so a failed attempt runs again on the
    /// next delivery. The result, if any, is kept and returned to later calls.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use intracom::idempotency::Once;
    /// let bus = intracom::Intracom::connect(intracom::Config::default()).await?;
    /// let billing = bus.idempotent("billing-ledger");
    /// let first = billing.run_once("msg-1", || async { Ok::<_, intracom::Error>(42) }).await?;
    /// let again = billing.run_once("msg-1", || async { Ok::<_, intracom::Error>(43) }).await?;
    /// assert_eq!(first, Once::Ran(42));
    /// assert!(matches!(again, Once::AlreadyDone(Some(_))));
    /// # Ok::<(), intracom::Error>(()) }).unwrap();
    /// ```
    pub async fn run_once<R, E, F, Fut>(&self, id: &str, handler: F) -> Result<Once<R>, E>
    where
        R: Serialize,
        E: From<Error>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<R, E>>,
    {
        if let Some(result) = self.lookup(id).await.map_err(E::from)? {
            tracing::debug!(consumer = %self.consumer, message_id = %id, "already processed: skipped");
            return Ok(Once::AlreadyDone(result));
        }
        let value = handler().await?;
        let result = match bson::to_bson(&value) {
            Ok(bson::Bson::Document(d)) => Some(d),
            Ok(bson::Bson::Null) | Err(_) => None,
            Ok(other) => Some(bson::doc! { "value": other }),
        };
        self.record(id, result).await.map_err(E::from)?;
        Ok(Once::Ran(value))
    }

    /// Whether this consumer processed message `id`: `Some(result)` if it did.
    pub async fn lookup(&self, id: &str) -> Result<Option<Option<Document>>, Error> {
        let fallback = &self.bus.shared().fallback;
        let key = (self.consumer.clone(), id.to_string());
        match self.bus.medium().processed_get(&self.consumer, id).await {
            Ok(found) => {
                // Read the memory record before the write-back empties it.
                let local = fallback.get(&key);
                if fallback.active.load(Ordering::SeqCst) {
                    self.recover().await;
                }
                Ok(found.or(local))
            }
            Err(error) if error.is_retryable() => {
                fallback.fall_back(&error);
                Ok(fallback.get(&key))
            }
            Err(error) => Err(error),
        }
    }

    async fn record(&self, id: &str, result: Option<Document>) -> Result<(), Error> {
        let fallback = &self.bus.shared().fallback;
        match self
            .bus
            .medium()
            .processed_put(&self.consumer, id, result.clone())
            .await
        {
            Ok(()) => Ok(()),
            Err(error) if error.is_retryable() => {
                fallback.fall_back(&error);
                fallback.put((self.consumer.clone(), id.to_string()), result);
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// The store answers again: write what was recorded meanwhile, and go back to it.
    async fn recover(&self) {
        let fallback = &self.bus.shared().fallback;
        let pending = fallback.take_all();
        let count = pending.len();
        for ((consumer, id), result) in pending {
            if let Err(error) = self
                .bus
                .medium()
                .processed_put(&consumer, &id, result.clone())
                .await
            {
                tracing::warn!(%error, "idempotency store failed again: staying on memory");
                fallback.put((consumer, id), result);
                return;
            }
        }
        fallback.active.store(false, Ordering::SeqCst);
        tracing::info!(written_back = count, "idempotency store reachable again");
    }
}

impl Intracom {
    /// Runs handlers at most once per message id for `consumer` (a name that stays the
    /// same across restarts, like a subscription name).
    pub fn idempotent(&self, consumer: &str) -> Idempotent {
        Idempotent {
            bus: self.clone(),
            consumer: consumer.to_string(),
        }
    }

    /// How many times the idempotency store fell back to memory.
    pub fn idempotency_fallbacks(&self) -> u64 {
        self.shared().fallback.fallbacks.load(Ordering::Relaxed)
    }
}
