//! Exactly-once effect on top of at-least-once delivery.
//!
//! Why it exists: the bus delivers at least once (a restart re-delivers the in-flight
//! messages, a crashed worker's job runs again, every instance of a service receives a
//! broadcast). A consumer whose effect must happen once asks the bus to run its handler
//! at most once per message id. Records are kept per (consumer, message id): two
//! consumers of one message each run once (MassTransit #3543). They live in the
//! medium's store (`processed` on MongoDB, expiring after `common.intracom.timeout_ms`,
//! so a record outlives any re-delivery of its message), or, with
//! `common.intracom.stores.idempotency=http` (feature `http`), in a gateway's
//! `/idempotency` store, whatever the medium: so the instances of a service on MQTT
//! share their records too.
//!
//! A record is **reserved** before the handler runs, so two instances handling the same
//! message at the same moment do not both run it: the second waits for the first's
//! outcome. The reservation has a lease: if its holder dies, the lease lapses and a
//! waiting instance takes over. A handler that fails releases the record, so a later
//! delivery runs it again.
//!
//! When the store cannot be reached, records go to a bounded in-memory store instead:
//! the fall-back is logged once and counted, and when the store answers again the
//! records made meanwhile are written to it and the bus goes back to it. While on the
//! fall-back, de-duplication covers this process only.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;

use crate::bus::Intracom;
use crate::delivery::processed::Fallback;
use crate::error::{Error, Result};
use crate::medium::{Records, Reservation};
use crate::message::new_id;

/// The store that keeps the records: the medium's, or a gateway's.
#[derive(Clone, Copy)]
enum Store<'a> {
    Medium(&'a dyn Records),
    #[cfg(feature = "http")]
    Http(&'a crate::stores::HttpStores),
}

impl Store<'_> {
    async fn reserve(
        self,
        consumer: &str,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Reservation> {
        match self {
            Store::Medium(records) => records.processed_reserve(consumer, id, owner, lease).await,
            #[cfg(feature = "http")]
            Store::Http(http) => http.reserve(consumer, id, owner, lease).await,
        }
    }

    async fn complete(
        self,
        consumer: &str,
        id: &str,
        owner: &str,
        result: Option<bson::Document>,
    ) -> Result<()> {
        match self {
            Store::Medium(records) => {
                records
                    .processed_complete(consumer, id, owner, result)
                    .await
            }
            #[cfg(feature = "http")]
            Store::Http(http) => http.complete(consumer, id, owner, result).await,
        }
    }

    async fn release(self, consumer: &str, id: &str, owner: &str) -> Result<()> {
        match self {
            Store::Medium(records) => records.processed_release(consumer, id, owner).await,
            #[cfg(feature = "http")]
            Store::Http(http) => http.release(consumer, id, owner).await,
        }
    }
}

pub use crate::delivery::processed::FALLBACK_CAPACITY;

/// What [`Idempotent::run_once`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum Once<R> {
    /// The handler ran now; its result.
    Ran(R),
    /// The handler had already run for this message (here or in another instance); the
    /// result recorded then.
    AlreadyDone(Option<bson::Document>),
}

/// Where a reservation is held.
#[derive(Clone, Copy, PartialEq)]
enum Place {
    Store,
    Memory,
}

/// Runs handlers at most once per message for one consumer; from
/// [`Intracom::idempotent`].
#[derive(Clone, Debug)]
pub struct Idempotent {
    bus: Intracom,
    consumer: String,
    lease: Duration,
}

impl Idempotent {
    /// How long a reservation holds while the handler runs (default 60 s). Another
    /// instance waiting for the same message takes over only after it lapses, so keep it
    /// above the handler's longest run and any clock skew between instances.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Runs `handler` unless this consumer already processed message `id`. If another
    /// instance is running it right now, waits for its outcome (or for its lease to
    /// lapse, then runs it here). The record is kept only when the handler succeeds, so
    /// a failed attempt runs again on the next delivery; the result, if any, is returned
    /// to later calls.
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
    pub async fn run_once<R, E, F, Fut>(
        &self,
        id: &str,
        handler: F,
    ) -> std::result::Result<Once<R>, E>
    where
        R: Serialize,
        E: From<Error>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<R, E>>,
    {
        let owner = format!("{}/{}", self.bus.instance(), new_id());
        let mut pause = crate::backoff::IDEMPOTENCY_WAIT.start();
        let place = loop {
            match self.reserve(id, &owner).await.map_err(E::from)? {
                (Reservation::Reserved, place) => break place,
                (Reservation::Done(result), _) => {
                    tracing::debug!(consumer = %self.consumer, message_id = %id, "already processed: skipped");
                    return Ok(Once::AlreadyDone(result));
                }
                // Another instance runs it now: wait for its outcome or its lease.
                _ => {
                    tokio::time::sleep(pause.take()).await;
                }
            }
        };
        match handler().await {
            Ok(value) => {
                let result = match bson::to_bson(&value) {
                    Ok(bson::Bson::Document(d)) => Some(d),
                    Ok(bson::Bson::Null) | Err(_) => None,
                    Ok(other) => Some(bson::doc! { "value": other }),
                };
                self.complete(id, &owner, place, result)
                    .await
                    .map_err(E::from)?;
                Ok(Once::Ran(value))
            }
            Err(error) => {
                self.release(id, &owner, place).await;
                Err(error)
            }
        }
    }

    fn fallback(&self) -> &Fallback {
        &self.bus.shared().fallback
    }

    /// The store of the records: a gateway's when configured, else the medium's (an
    /// error for a medium without one).
    fn store(&self) -> Result<Store<'_>> {
        #[cfg(feature = "http")]
        if let Some(http) = self.bus.http_stores().filter(|s| s.keeps_idempotency()) {
            return Ok(Store::Http(http));
        }
        self.bus
            .medium()
            .records_or_unsupported()
            .map(Store::Medium)
    }

    async fn reserve(&self, id: &str, owner: &str) -> Result<(Reservation, Place)> {
        let fallback = self.fallback();
        if fallback.skip_store() {
            return Ok((
                fallback
                    .records
                    .reserve(&self.consumer, id, owner, self.lease),
                Place::Memory,
            ));
        }
        let medium = self.store()?;
        match medium.reserve(&self.consumer, id, owner, self.lease).await {
            Ok(reservation) => {
                if fallback.active() {
                    // Done in memory during the outage: done, whatever the store says.
                    if let Some(result) = fallback.records.done(&self.consumer, id) {
                        if reservation == Reservation::Reserved {
                            medium
                                .complete(&self.consumer, id, owner, result.clone())
                                .await?;
                        }
                        self.recover().await;
                        return Ok((Reservation::Done(result), Place::Store));
                    }
                    self.recover().await;
                }
                Ok((reservation, Place::Store))
            }
            Err(error) if error.is_retryable() => {
                fallback.fall_back(&error);
                Ok((
                    fallback
                        .records
                        .reserve(&self.consumer, id, owner, self.lease),
                    Place::Memory,
                ))
            }
            Err(error) => Err(error),
        }
    }

    async fn complete(
        &self,
        id: &str,
        owner: &str,
        place: Place,
        result: Option<bson::Document>,
    ) -> Result<()> {
        let fallback = self.fallback();
        if place == Place::Memory {
            fallback.records.complete(&self.consumer, id, owner, result);
            return Ok(());
        }
        match self
            .store()?
            .complete(&self.consumer, id, owner, result.clone())
            .await
        {
            Ok(()) => Ok(()),
            Err(error) if error.is_retryable() => {
                // Remember it here; it is written back when the store returns.
                fallback.fall_back(&error);
                if fallback
                    .records
                    .reserve(&self.consumer, id, owner, self.lease)
                    == Reservation::Reserved
                {
                    fallback.records.complete(&self.consumer, id, owner, result);
                }
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    async fn release(&self, id: &str, owner: &str, place: Place) {
        if place == Place::Memory {
            self.fallback().records.release(&self.consumer, id, owner);
            return;
        }
        let released = match self.store() {
            Ok(store) => store.release(&self.consumer, id, owner).await,
            Err(unsupported) => Err(unsupported),
        };
        if let Err(error) = released {
            // The reservation lapses with its lease anyway.
            tracing::warn!(consumer = %self.consumer, message_id = %id, %error, "reservation not released");
        }
    }

    /// The store answers again: write what was done meanwhile, and go back to it once
    /// all of it is written. A record leaves memory only when the store has it: until
    /// then a caller that the store lets reserve the message finds it done in memory
    /// ([`Idempotent::reserve`]), so that its handler does not run a second time while
    /// the write-back is under way.
    async fn recover(&self) {
        let fallback = self.fallback();
        let owner = format!("{}/write-back", self.bus.instance());
        // Only a medium that keeps records has a store to fall back from.
        let Ok(medium) = self.store() else {
            return;
        };
        let (mut written, mut held) = (0usize, 0usize);
        let mut failed = None;
        for (consumer, id, result) in fallback.records.done_records() {
            let stored = match medium.reserve(&consumer, &id, &owner, self.lease).await {
                Ok(Reservation::Reserved) => medium
                    .complete(&consumer, &id, &owner, result)
                    .await
                    .map(|()| true),
                Ok(Reservation::Done(_)) => Ok(true),
                // Someone holds it in the store now; it finds the record in memory.
                Ok(Reservation::Busy) => Ok(false),
                Err(error) => Err(error),
            };
            match stored {
                Ok(true) => {
                    fallback.records.remove(&consumer, &id);
                    written += 1;
                }
                Ok(false) => held += 1,
                Err(error) => {
                    failed = Some(error);
                    break;
                }
            }
        }
        match failed {
            Some(error) => {
                tracing::warn!(%error, written_back = written, "idempotency store failed again: staying on memory");
                fallback.fall_back(&error);
            }
            None if held > 0 => {
                tracing::debug!(written_back = written, held, "idempotency store reachable again; records held by running handlers are written back later");
            }
            None => {
                fallback.active.store(false, Ordering::SeqCst);
                tracing::info!(written_back = written, "idempotency store reachable again");
            }
        }
    }
}

impl Intracom {
    /// Runs handlers at most once per message id for `consumer` (a name that stays the
    /// same across restarts and instances, like a subscription name).
    pub fn idempotent(&self, consumer: &str) -> Idempotent {
        Idempotent {
            bus: self.clone(),
            consumer: consumer.to_string(),
            lease: Duration::from_secs(60),
        }
    }

    /// How many times the idempotency store fell back to memory.
    pub fn idempotency_fallbacks(&self) -> u64 {
        self.shared().fallback.fallbacks.load(Ordering::Relaxed)
    }

    /// How many times the message store (`common.intracom.stores.messages=http`) could
    /// not be reached and publishes were kept in this process's outbox instead (once
    /// per outage); 0 without one.
    #[cfg(feature = "http")]
    #[cfg_attr(docsrs, doc(cfg(feature = "http")))]
    pub fn message_store_fallbacks(&self) -> u64 {
        self.http_stores()
            .map_or(0, |s| s.messages_fallbacks.load(Ordering::Relaxed))
    }
}
