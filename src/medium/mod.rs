//! The medium: where messages are stored and how they are followed.
//!
//! Why it exists: the bus and the delivery machinery above it know nothing of MongoDB,
//! MQTT or memory. A medium promises a small set of operations with the semantics of
//! the MongoDB medium, so the same conformance suite runs on each.
//!
//! What every medium does is the [`Medium`] trait:
//!
//! - [`Medium::append`] stamps each message with the medium's clock (`ts`, strictly
//!   increasing in the medium's order; `at`, wall time) and stores it once: appending an
//!   id that is already stored is a no-op reported as a duplicate.
//! - [`Medium::follow`] yields the matching messages after a start point, in the
//!   medium's order, then waits for new ones. If messages the follower needed are gone
//!   (retention), it yields [`Event::Lost`] first, then continues with the oldest one
//!   retained. It never skips silently.
//! - Small keyed stores: the catalog and subscription checkpoints.
//!
//! What only some media do is an ability trait, which a medium exposes through an
//! accessor or not (`None`, known without calling anything):
//!
//! - [`WorkQueue`] ([`Medium::work`]): work (`delivery: one`), an atomic claim with a
//!   lease, renewal, settlement in place, burial in the dead letters; and waiting for a
//!   request's outcome. A medium that pushes work to one consumer instead (MQTT's
//!   shared subscriptions) hands it out through [`WorkQueue::receive_work`]; settlement
//!   and burial are the same calls.
//! - [`DeadLetterStore`] ([`Medium::dead_letter_store`]): what could not be delivered.
//! - [`Records`] ([`Medium::records`]): idempotency records.
//! - [`Inspection`] ([`Medium::inspection`]): views and repairs for operators (counts,
//!   queues, idempotency records), which an MQTT broker cannot give.
//! - [`Diagnosis`] ([`Medium::diagnosis`]): checks of the deployment (MongoDB).
//! - [`BrokerReport`] ([`Medium::broker_report`]): what a broker tells about itself
//!   (MQTT).
//!
//! Beyond the abilities, [`Medium::capabilities`] says which semantic promises a medium
//! keeps (Watermill's `Features`), and a medium never fakes one it lacks.
//!
//! [`Medium`] and the ability traits are sealed: the media are this crate's. A test
//! that needs a medium failing on purpose wraps a real one in [`Faulty`].
//!
//! One module per medium: [`memory`], [`mongo`], `mqtt` (feature `mqtt`) and `http` (a
//! remote gateway, feature `http`); [`connect`] is the one place that picks among them.

mod faulty;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
pub mod memory;
pub mod mongo;
#[cfg(feature = "mqtt")]
#[cfg_attr(docsrs, doc(cfg(feature = "mqtt")))]
pub mod mqtt;
pub(crate) mod records;
#[cfg(any(feature = "gateway", feature = "http"))]
#[cfg_attr(not(all(feature = "gateway", feature = "http")), allow(dead_code))]
pub(crate) mod wire;

pub use faulty::{Call, Faults, Faulty};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bson::{Document, RawDocumentBuf, Timestamp};
use futures::stream::BoxStream;

use crate::config::{Config, MediumKind};
use crate::error::{Error, Result};
use crate::filter::{Filter, Position, SharedPosition, StartFrom};
use crate::message::Message;

/// What [`connect`] says when the configuration asks for MQTT and the build left it out.
#[cfg(not(feature = "mqtt"))]
const MQTT_NOT_BUILT: &str = "connecting: this build does not include the MQTT medium \
     (common.intracom.medium=mqtt); enable the `mqtt` feature: `cargo add intracom \
     --features mqtt`, or `cargo install intracom --features mqtt` for the command";

/// Opens the medium the configuration names (`common.intracom.medium`): the one place
/// that knows every medium, so the bus above it names none.
pub async fn connect(config: &Config) -> Result<Arc<dyn Medium>> {
    let medium = open(config).await?;
    debug_assert_eq!(abilities_agree(&*medium), Ok(()));
    Ok(medium)
}

/// What [`connect`] says when the configuration asks for the HTTP medium and the build
/// left it out.
#[cfg(not(feature = "http"))]
const HTTP_NOT_BUILT: &str = "connecting: this build does not include the HTTP medium \
     (common.intracom.medium=http); enable the `http` feature: `cargo add intracom \
     --features http`, or `cargo install intracom --features http` for the command";

/// The medium of [`connect`], opened.
async fn open(config: &Config) -> Result<Arc<dyn Medium>> {
    match config.medium {
        MediumKind::Memory => Ok(Arc::new(memory::MemoryMedium::new(config.into()))),
        MediumKind::Db => Ok(Arc::new(mongo::MongoMedium::connect(config).await?)),
        #[cfg(feature = "mqtt")]
        MediumKind::Mqtt => Ok(Arc::new(mqtt::MqttMedium::connect(config).await?)),
        #[cfg(not(feature = "mqtt"))]
        MediumKind::Mqtt => Err(Error::Unsupported {
            medium: "mqtt".into(),
            what: MQTT_NOT_BUILT.into(),
        }),
        #[cfg(feature = "http")]
        MediumKind::Http => Ok(Arc::new(http::HttpMedium::connect(config).await?)),
        #[cfg(not(feature = "http"))]
        MediumKind::Http => Err(Error::Unsupported {
            medium: "http".into(),
            what: HTTP_NOT_BUILT.into(),
        }),
    }
}

/// What a medium promises beyond what every medium does (publish, follow from now,
/// targeting, filters, acks, catalog, dead letters, requests, work with retries).
/// Each flag is a promise the conformance suite holds the medium to; a medium that
/// cannot keep one says `false` and does not fake it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Every message is stamped from the medium's own clock (`ts`, `at`) and the order
    /// of stamps is the delivery order. Without it, `ts` and `at` stay `None`.
    pub server_stamps: bool,
    /// Messages are kept after delivery: a subscription can start from the oldest one
    /// still retained, or after a position ([`StartFrom::Beginning`], [`StartFrom::After`]).
    pub history: bool,
    /// A subscriber that comes back after some of its messages expired is told how many
    /// it lost ([`Event::Lost`]).
    pub loss_reports: bool,
    /// A named subscription's position lives in the medium: another process resumes it.
    pub shared_checkpoints: bool,
    /// Work waits in the medium until a worker claims it, highest priority first, and a
    /// lease that runs out hands it to another worker.
    pub stored_queue: bool,
    /// Request outcomes, leases and idempotency records are kept by the medium and seen
    /// alike by every process.
    pub shared_state: bool,
}

impl Capabilities {
    /// Every promise: the memory and MongoDB media.
    pub const ALL: Capabilities = Capabilities {
        server_stamps: true,
        history: true,
        loss_reports: true,
        shared_checkpoints: true,
        stored_queue: true,
        shared_state: true,
    };
}

/// Work pushed to one worker ([`WorkQueue::receive_work`]): each item is a message as
/// claimed (its `attempts` counts this delivery). The stream ends when the medium closes.
pub type WorkStream = BoxStream<'static, Result<Message>>;

/// Counts over the retained messages, the dead letters and each named subscription's
/// lag ([`Inspection::stats`]). The MongoDB medium's `intracom stats` figures, shared by
/// every medium.
pub use mongo::{Count, Lag, Stats};

/// One check of [`Diagnosis::checks`] (`intracom doctor`).
pub use mongo::Check;

/// The outcome of appending one message.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Appended {
    /// The message id.
    pub id: String,
    /// The stamp the medium gave it (for a duplicate: when the medium knows it, the
    /// stamp of the copy already stored).
    pub ts: Option<Timestamp>,
    /// True when a message with this id was already stored; nothing new was written.
    pub duplicate: bool,
}

/// What a follower receives.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Event {
    /// A message, with the position just after which a follower resumes to get the next
    /// (a medium that has it at hand shares it; one that numbers its messages defers
    /// building it until someone reads it: see [`SharedPosition`]).
    Message(Arc<Message>, SharedPosition),
    /// Messages after the start point were removed before they were read.
    Lost {
        /// How many, as far as the medium can tell (0 when it cannot count them).
        count: u64,
    },
}

/// A follower's stream of events; it ends when the medium is closed.
pub type EventStream = BoxStream<'static, Result<Event>>;

/// The sender catalog: service name → the actions it declares.
pub type CatalogMap = BTreeMap<String, BTreeSet<String>>;

/// What a worker asks the medium for: the next work for a service.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClaimRequest {
    /// The service whose work is claimed (`serviceNameDest`).
    pub service: String,
    /// Only these actions.
    pub actions: Vec<String>,
    /// The claiming worker, written into the lease (intracom's workers use their
    /// instance, a `/`, and an id of the worker's own).
    pub owner: String,
    /// How long the lease lasts unless renewed.
    pub lease: Duration,
}

impl ClaimRequest {
    /// A claim for `service`'s `actions` by `owner` with a lease of `lease`.
    pub fn new(
        service: impl Into<String>,
        actions: Vec<String>,
        owner: impl Into<String>,
        lease: Duration,
    ) -> Self {
        ClaimRequest {
            service: service.into(),
            actions,
            owner: owner.into(),
            lease,
        }
    }
}

/// How claimed work ends.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Settlement {
    /// Done: `state: done`, the result in `result`.
    Done(Option<Document>),
    /// Failed for good: `state: error`, the error in `response`.
    Failed(Document),
    /// Failed, to be tried again after a pause: `state` stays `pending`, the lease
    /// becomes a back-off marker (`owner: "backoff"`) until then, `lastError` is set.
    Retry {
        /// The error of this attempt.
        error: String,
        /// The pause before the next claim.
        after: Duration,
    },
}

/// The state of an idempotency record after [`Records::processed_reserve`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Reservation {
    /// The caller holds the record now: it runs the handler, then completes or releases.
    Reserved,
    /// The handler already ran for this message; the result recorded then.
    Done(Option<Document>),
    /// Another holder is running the handler now, and its lease has not lapsed.
    Busy,
}

/// Messages a medium did not append ([`Medium::append_owned`]), handed back with the
/// error, so that the caller can keep them (the bus puts them in its outbox when the
/// error is retryable).
#[derive(Debug)]
#[non_exhaustive]
pub struct NotAppended {
    /// Why they were not appended.
    pub error: Error,
    /// The messages, handed back.
    pub messages: Vec<Message>,
}

/// A message that could not be delivered, as kept in the dead letters.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The id of the original message.
    pub id: String,
    /// The original document.
    pub document: Document,
    /// Why it is here.
    pub reason: String,
    /// When it was dead-lettered (medium clock).
    pub at: Option<bson::DateTime>,
}

/// The work of one action of one service (`delivery: one` messages to `service` with
/// `action`): a queue, as [`Inspection::queues`] counts it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// The service that does the work (`serviceNameDest`).
    pub service: String,
    /// The action.
    pub action: String,
    /// Pending and not held by a live worker: waiting to be claimed, or waiting out a
    /// retry's back-off.
    pub depth: u64,
    /// Pending and held by a worker whose lease has not run out.
    pub in_flight: u64,
    /// Dead letters of this service and action.
    pub dead: u64,
}

impl QueueStats {
    /// The queue of `service`'s `action`, with every count at zero.
    pub fn new(service: impl Into<String>, action: impl Into<String>) -> Self {
        QueueStats {
            service: service.into(),
            action: action.into(),
            ..QueueStats::default()
        }
    }
}

/// An idempotency record, as [`Inspection::processed_get`] reads it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ProcessedRecord {
    /// The consumer that handled (or handles) the message.
    pub consumer: String,
    /// The message id.
    pub id: String,
    /// True once the handler succeeded; false while a holder runs it.
    pub done: bool,
    /// The handler's result, when done and it returned one.
    pub result: Option<Document>,
    /// When it was reserved, or done (medium clock).
    pub at: Option<bson::DateTime>,
}

/// The error of an ability a medium does not have (`what` names it as the user sees it:
/// "stats", "queue counts", …): the same [`Error::Unsupported`] whichever caller asks.
pub(crate) fn unsupported(medium: &str, what: &str) -> Error {
    Error::Unsupported {
        medium: medium.to_string(),
        what: what.to_string(),
    }
}

/// The `_id` of a stored document as text (message ids are strings; a hand-written
/// document may have another type).
pub(crate) fn id_of(document: &Document) -> String {
    match document.get("_id") {
        Some(bson::Bson::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// Keeps [`Medium`] and its ability traits implemented inside this crate only, so a
/// method can be added to them without breaking anyone. A test that needs a medium
/// that fails on purpose wraps a real one in [`Faulty`].
mod sealed {
    pub trait Sealed {}

    /// The argument of [`super::Medium::anchor`]: only this crate can make one, so
    /// only this crate calls it.
    #[derive(Clone, Copy, Debug)]
    pub struct Internal(pub(in crate::medium) ());
}

impl sealed::Sealed for memory::MemoryMedium {}
impl sealed::Sealed for mongo::MongoMedium {}
#[cfg(feature = "mqtt")]
impl sealed::Sealed for mqtt::MqttMedium {}
#[cfg(feature = "http")]
impl sealed::Sealed for http::HttpMedium {}
impl<M: Medium, F: Faults> sealed::Sealed for Faulty<M, F> {}

/// What every medium does: append, follow, the catalog, checkpoints, close. See the
/// module docs for the promises.
///
/// What only some media do is an ability of its own, reached through an accessor
/// that answers `None` when the medium lacks it: [`Medium::work`],
/// [`Medium::dead_letter_store`], [`Medium::records`], [`Medium::inspection`].
///
/// The trait is sealed: the media are the ones of this crate ([`connect`] picks
/// among them). [`Faulty`] wraps one of them to inject faults in tests.
#[async_trait]
pub trait Medium: sealed::Sealed + Send + Sync + 'static {
    /// The medium's name as it appears in config and errors (`memory`, `db`, `mqtt`).
    fn name(&self) -> &'static str;

    /// The largest encoded message the medium accepts, in bytes.
    fn max_message_bytes(&self) -> usize;

    /// What this medium promises (default: everything, as memory and MongoDB do).
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    /// Work (`delivery: one`): claims and leases, or work pushed to one worker;
    /// settlement, burial, waiting for a request's outcome. `None`: the medium carries
    /// no work, and a worker or a request on it fails as unsupported.
    fn work(&self) -> Option<&dyn WorkQueue> {
        None
    }

    /// The dead letters: kept, listed, read, removed. `None`: the medium keeps none.
    fn dead_letter_store(&self) -> Option<&dyn DeadLetterStore> {
        None
    }

    /// Idempotency records (reserve, complete, release), kept by the medium.
    fn records(&self) -> Option<&dyn Records> {
        None
    }

    /// What an operator reads and repairs (counts, queues, idempotency records).
    /// `None`: the medium cannot tell (an MQTT broker keeps no history to count).
    fn inspection(&self) -> Option<&dyn Inspection> {
        None
    }

    /// Checks of the deployment under the medium (`intracom doctor`). `None`: the
    /// medium has none to run (only MongoDB does).
    fn diagnosis(&self) -> Option<&dyn Diagnosis> {
        None
    }

    /// What the broker under the medium tells about itself (`intracom stats` on MQTT).
    /// `None`: the medium is not a broker's.
    fn broker_report(&self) -> Option<&dyn BrokerReport> {
        None
    }

    /// Stamps and stores messages, in order. Ids already stored are reported as
    /// duplicates and not written again.
    async fn append(&self, messages: &[Message]) -> Result<Vec<Appended>>;

    /// Whether the medium sends messages as BSON, and so takes the encoding the bus
    /// makes for the size check (see [`Medium::append_encoded`]). When it does not (the
    /// default; memory keeps messages as they are), the bus counts a message's size
    /// without encoding it and hands over no encodings.
    fn sends_encoded(&self) -> bool {
        false
    }

    /// Whether the medium keeps messages decoded, as the bus hands them over (memory):
    /// then the size held to the message size limit is what the message takes in memory
    /// (several times its encoding for a payload of many small values), so what the
    /// medium keeps for a message stays within the limit. Default: no (the medium
    /// stores or sends the encoding).
    fn keeps_decoded(&self) -> bool {
        false
    }

    /// [`Medium::append`] for messages the bus has already encoded (to check their
    /// size): `encoded[i]` is `messages[i]` as `bson::to_raw_document_buf` writes it, or
    /// `encoded` is empty when the bus did not encode them ([`Medium::sends_encoded`]).
    /// A medium that sends BSON sends these bytes rather than encoding the message
    /// again. The default ignores them.
    async fn append_encoded(
        &self,
        messages: &[Message],
        encoded: &[RawDocumentBuf],
    ) -> Result<Vec<Appended>> {
        let _ = encoded;
        self.append(messages).await
    }

    /// [`Medium::append_encoded`] taking the messages over, so that a medium that keeps
    /// them (memory) does not copy them. On an error the messages come back with it
    /// (the bus keeps them in its outbox when the error is retryable). The default lends
    /// them to [`Medium::append_encoded`].
    async fn append_owned(
        &self,
        messages: Vec<Message>,
        encoded: &[RawDocumentBuf],
    ) -> std::result::Result<Vec<Appended>, NotAppended> {
        match self.append_encoded(&messages, encoded).await {
            Ok(appended) => Ok(appended),
            Err(error) => Err(NotAppended { error, messages }),
        }
    }

    /// Follows the messages matching `filter` from `from`.
    ///
    /// For [`StartFrom::Now`] the start is anchored before this returns: a message
    /// appended after the call returns is delivered.
    async fn follow(&self, from: StartFrom, filter: Filter) -> Result<EventStream>;

    /// Crate-internal (callable only from this crate): a position after every message
    /// the medium holds now, for a follower started from [`StartFrom::Now`] that must
    /// be opened again before it has read anything (the HTTP medium's stream broke:
    /// the gateway sends it this first). Taken before the follower is opened, following
    /// [`StartFrom::After`] it yields every message appended after this call, once;
    /// it may also yield one appended between this call and the follower's own anchor,
    /// which a follower from now does not see.
    ///
    /// `None` (the default): the medium cannot name such a place (MQTT keeps no
    /// history; the HTTP medium does not pass its gateway's on), or the MongoDB
    /// medium holds more messages within its safety window than a position can name.
    #[doc(hidden)]
    async fn anchor(&self, internal: sealed::Internal) -> Result<Option<Position>> {
        let _ = internal;
        Ok(None)
    }

    /// Follows for a named (durable) subscription: like [`Medium::follow`], for a
    /// consumer that acknowledges through [`Medium::checkpoint_save`] under `name`. A
    /// medium whose broker keeps the consumer's place itself (MQTT's persistent
    /// sessions) needs the name here; the default is [`Medium::follow`].
    async fn follow_durable(
        &self,
        name: &str,
        from: StartFrom,
        filter: Filter,
    ) -> Result<EventStream> {
        let _ = name;
        self.follow(from, filter).await
    }

    /// The whole catalog.
    async fn catalog_load(&self) -> Result<CatalogMap>;

    /// Adds a service and actions to the catalog (a union with what is there).
    async fn catalog_add(&self, service: &str, actions: &[String]) -> Result<()>;

    /// The last saved position of a named subscription.
    async fn checkpoint_load(&self, name: &str) -> Result<Option<Position>>;

    /// Saves the position of a named subscription. Callers never save an older
    /// position after a newer one for the same name.
    async fn checkpoint_save(&self, name: &str, position: &Position) -> Result<()>;

    /// Ends every follower's stream and releases the medium's resources.
    async fn close(&self);
}

impl dyn Medium {
    /// [`Medium::anchor`], for the gateway.
    #[cfg_attr(not(feature = "gateway"), allow(dead_code))]
    pub(crate) async fn anchor_now(&self) -> Result<Option<Position>> {
        self.anchor(sealed::Internal(())).await
    }

    /// [`Medium::work`], or the error a caller shows when the medium has none.
    pub(crate) fn work_or_unsupported(&self) -> Result<&dyn WorkQueue> {
        self.work()
            .ok_or_else(|| unsupported(self.name(), "work (`delivery: one`)"))
    }

    /// [`Medium::dead_letter_store`], or the error a caller shows when the medium has none.
    pub(crate) fn dead_letter_store_or_unsupported(&self) -> Result<&dyn DeadLetterStore> {
        self.dead_letter_store()
            .ok_or_else(|| unsupported(self.name(), "dead letters"))
    }

    /// [`Medium::records`], or the error a caller shows when the medium has none.
    pub(crate) fn records_or_unsupported(&self) -> Result<&dyn Records> {
        self.records()
            .ok_or_else(|| unsupported(self.name(), "idempotency records"))
    }

    /// [`Medium::inspection`], or the error a caller shows when the medium has none:
    /// `what` names the operation ("stats", "queue counts", …).
    pub(crate) fn inspection_or_unsupported(&self, what: &str) -> Result<&dyn Inspection> {
        self.inspection()
            .ok_or_else(|| unsupported(self.name(), what))
    }
}

/// Work (`delivery: one`), the ability of [`Medium::work`]: an atomic claim with a
/// lease, renewal, settlement in place, burial in the dead letters, and waiting for a
/// request's outcome. A medium that pushes work to one consumer instead (MQTT's shared
/// subscriptions) hands it out through [`WorkQueue::receive_work`]; settlement and
/// burial are the same calls.
#[async_trait]
pub trait WorkQueue: sealed::Sealed + Send + Sync {
    /// Claims the next available work of a service, atomically: `delivery: one`,
    /// `state: pending`, an action in the list, no live lease; highest `priority` first,
    /// then oldest `ts`. The claim sets the lease and counts the attempt; the message is
    /// returned as claimed. A medium that pushes work ([`WorkQueue::receive_work`])
    /// finds nothing to claim.
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Message>>;

    /// For a medium that pushes work instead of storing it for claims: subscribes one
    /// worker to the work of `request.service` for `request.actions`, each item going to
    /// exactly one worker of the service. Items are settled, renewed and buried with the
    /// same calls as claimed work. `None` (the default) means: claim with
    /// [`WorkQueue::claim`].
    async fn receive_work(&self, request: &ClaimRequest) -> Result<Option<WorkStream>> {
        let _ = request;
        Ok(None)
    }

    /// Extends a lease the owner still holds. False when it lost the lease.
    async fn renew(&self, id: &str, owner: &str, lease: Duration) -> Result<bool>;

    /// Ends claimed work. With an owner, only while that owner holds the lease; with
    /// `None`, only while the work is still pending (a caller's time-out). False when the
    /// condition did not hold and nothing changed.
    async fn settle(&self, id: &str, owner: Option<&str>, settlement: Settlement) -> Result<bool>;

    /// Moves work that used up its attempts to the dead letters, and marks it
    /// `state: error` where it is. False when the owner no longer holds it.
    async fn bury(&self, id: &str, owner: &str, reason: &str) -> Result<bool>;

    /// Waits until a request is settled (`state` done or error) and returns it as
    /// stored; `None` when `timeout` passes first.
    async fn await_outcome(&self, id: &str, timeout: Duration) -> Result<Option<Message>>;

    /// The sending service and the destination service of a stored work message,
    /// whatever its state (a gateway checks with it who may end someone else's work).
    /// `None` when no such message is stored, or when the medium cannot read one back
    /// (the default).
    async fn work_services(&self, id: &str) -> Result<Option<(String, Option<String>)>> {
        let _ = id;
        Ok(None)
    }
}

/// The dead letters, the ability of [`Medium::dead_letter_store`] (the `dead` collection on
/// MongoDB).
#[async_trait]
pub trait DeadLetterStore: sealed::Sealed + Send + Sync {
    /// Keeps a document that reached a consumer but cannot be delivered (unreadable, or
    /// an action the catalog does not declare), with the reason. Writing the same
    /// document twice keeps one.
    async fn dead_letter(&self, document: Document, reason: String) -> Result<()>;

    /// The dead letters, oldest first, at most `limit`.
    async fn dead_list(&self, limit: usize) -> Result<Vec<DeadLetter>>;

    /// One dead letter.
    async fn dead_get(&self, id: &str) -> Result<Option<DeadLetter>>;

    /// Removes dead letters: one id, or all of them with `None`. Returns how many.
    async fn dead_remove(&self, id: Option<&str>) -> Result<u64>;
}

/// Idempotency records, the ability of [`Medium::records`]: one record per (consumer,
/// message id), reserved while a handler runs and kept once it succeeded.
#[async_trait]
pub trait Records: sealed::Sealed + Send + Sync {
    /// Reserves the idempotency record of (`consumer`, message `id`) for `owner`, for
    /// `lease`: the caller may run its handler only when this returns
    /// [`Reservation::Reserved`]. A record whose lease lapsed (its holder died) can be
    /// taken over.
    async fn processed_reserve(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Reservation>;

    /// Marks a reserved record done, with the handler's result.
    async fn processed_complete(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        result: Option<Document>,
    ) -> Result<()>;

    /// Drops a reservation whose handler failed, so a later delivery runs it again.
    async fn processed_release(&self, consumer: &str, id: &str, owner: &str) -> Result<()>;
}

/// What an operator reads and repairs, the ability of [`Medium::inspection`]: counts
/// over what the medium keeps, its work queues, its idempotency records. A medium that
/// keeps no history to count (MQTT) has none.
#[async_trait]
pub trait Inspection: sealed::Sealed + Send + Sync {
    /// Counts over the retained messages (by service, action, type, state), the queue
    /// depth, the dead letters, and each named subscription's lag.
    async fn stats(&self) -> Result<Stats>;

    /// The work queues: one entry per (service, action) that has pending work or dead
    /// letters, with its depth, in-flight and dead counts.
    async fn queues(&self) -> Result<Vec<QueueStats>>;

    /// Ends the pending work of `service`'s `action` that no live worker holds: each item
    /// is settled in place as `state: error` with `response: {error: "purged"}` (a record
    /// stays; no worker claims it). Returns how many.
    async fn queue_purge(&self, service: &str, action: &str) -> Result<u64>;

    /// The idempotency record of (`consumer`, message `id`), if there is one.
    async fn processed_get(&self, consumer: &str, id: &str) -> Result<Option<ProcessedRecord>>;

    /// Removes the idempotency record of (`consumer`, message `id`), whatever its state,
    /// so the message would be handled again. Returns how many were removed (0 or 1).
    async fn processed_remove(&self, consumer: &str, id: &str) -> Result<u64>;
}

/// Checks of the deployment under a medium, the ability of [`Medium::diagnosis`]
/// (MongoDB: its version, replica set, indexes, validator…).
#[async_trait]
pub trait Diagnosis: sealed::Sealed + Send + Sync {
    /// Checks the deployment against what intracom needs, each with a fix when it fails.
    async fn checks(&self) -> Vec<Check>;
}

/// One value an MQTT broker publishes about itself ([`BrokerReport::broker_stats`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BrokerStat {
    /// The topic under `$SYS/broker/` (`clients/connected`).
    pub topic: String,
    /// Its retained value, as text.
    pub value: String,
}

/// The worker connections of one service present on the broker ([`BrokerReport::workers`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceWorkers {
    /// The service.
    pub service: String,
    /// Its worker connections.
    pub connections: usize,
}

/// What a broker tells about itself, the ability of [`Medium::broker_report`] (MQTT,
/// whose broker keeps no history to count: see [`Inspection`] for the media that do).
#[async_trait]
pub trait BrokerReport: sealed::Sealed + Send + Sync {
    /// The workers present on the broker: service and number of worker connections.
    fn workers(&self) -> Vec<ServiceWorkers>;

    /// The broker's maximum packet size (`None`: it set none).
    fn max_packet_size(&self) -> Option<u32>;

    /// What the broker publishes about itself (Mosquitto's `$SYS/broker/`): topic →
    /// value, empty when it publishes nothing there.
    async fn broker_stats(&self) -> Result<Vec<BrokerStat>>;
}

/// Whether `medium`'s [`Capabilities`] agree with the abilities it exposes: a stored
/// queue needs work, shared state needs records. `Err` names the first disagreement.
pub(crate) fn abilities_agree(medium: &dyn Medium) -> std::result::Result<(), String> {
    let capabilities = medium.capabilities();
    let name = medium.name();
    if capabilities.stored_queue && medium.work().is_none() {
        return Err(format!(
            "{name} promises a stored queue and has no work queue"
        ));
    }
    if capabilities.shared_state && medium.records().is_none() {
        return Err(format!("{name} promises shared state and keeps no records"));
    }
    Ok(())
}

#[cfg(test)]
mod ability_tests {
    use super::*;

    /// Ability of a medium, by name, as its accessors tell it.
    fn abilities(medium: &dyn Medium) -> [bool; 4] {
        [
            medium.work().is_some(),
            medium.dead_letter_store().is_some(),
            medium.records().is_some(),
            medium.inspection().is_some(),
        ]
    }

    /// Faults that inject nothing.
    struct NoFaults;
    impl Faults for NoFaults {}

    /// The memory medium has every ability, as its capabilities promise everything.
    #[test]
    fn memory_has_every_ability_its_capabilities_promise() {
        let memory = memory::MemoryMedium::new(Default::default());
        assert_eq!(memory.capabilities(), Capabilities::ALL);
        assert_eq!(abilities(&memory), [true; 4]);
        assert_eq!(abilities_agree(&memory), Ok(()));
    }

    /// A faulty wrapper has the abilities and capabilities of the medium underneath.
    #[test]
    fn a_faulty_medium_has_the_abilities_of_the_one_underneath() {
        let memory = memory::MemoryMedium::new(Default::default());
        let faulty = Faulty::new(memory::MemoryMedium::new(Default::default()), NoFaults);
        assert_eq!(abilities(&faulty), abilities(&memory));
        assert_eq!(faulty.capabilities(), memory.capabilities());
        assert_eq!(faulty.name(), memory.name());
        assert_eq!(abilities_agree(&faulty), Ok(()));
    }

    /// A medium that promises a stored queue and has no work queue is caught.
    #[tokio::test]
    async fn a_promise_without_its_ability_is_caught() {
        struct Promising(memory::MemoryMedium);
        impl sealed::Sealed for Promising {}
        #[async_trait]
        impl Medium for Promising {
            fn name(&self) -> &'static str {
                "promising"
            }
            fn max_message_bytes(&self) -> usize {
                self.0.max_message_bytes()
            }
            async fn append(&self, messages: &[Message]) -> Result<Vec<Appended>> {
                self.0.append(messages).await
            }
            async fn follow(&self, from: StartFrom, filter: Filter) -> Result<EventStream> {
                self.0.follow(from, filter).await
            }
            async fn catalog_load(&self) -> Result<CatalogMap> {
                self.0.catalog_load().await
            }
            async fn catalog_add(&self, service: &str, actions: &[String]) -> Result<()> {
                self.0.catalog_add(service, actions).await
            }
            async fn checkpoint_load(&self, name: &str) -> Result<Option<Position>> {
                self.0.checkpoint_load(name).await
            }
            async fn checkpoint_save(&self, name: &str, position: &Position) -> Result<()> {
                self.0.checkpoint_save(name, position).await
            }
            async fn close(&self) {
                self.0.close().await
            }
        }
        let medium = Promising(memory::MemoryMedium::new(Default::default()));
        let error = abilities_agree(&medium).expect_err("a stored queue without work");
        assert!(error.contains("stored queue"), "{error}");
        let dyn_medium: &dyn Medium = &medium;
        let Err(Error::Unsupported { medium, what }) = dyn_medium.work_or_unsupported() else {
            panic!("no work queue is unsupported");
        };
        assert_eq!(
            (medium.as_str(), what.as_str()),
            ("promising", "work (`delivery: one`)")
        );
    }
}

#[cfg(all(test, not(feature = "mqtt")))]
mod tests {
    use super::*;

    /// A build without MQTT asked for it says which feature to build with.
    #[tokio::test]
    async fn mqtt_without_the_feature_names_it() {
        let config = Config {
            medium: MediumKind::Mqtt,
            ..Config::default()
        };
        let Err(error) = connect(&config).await else {
            panic!("a build without the mqtt feature connected to MQTT");
        };
        let text = error.to_string();
        assert!(text.contains("`mqtt` feature"), "{text}");
        assert!(
            text.contains("cargo add intracom --features mqtt"),
            "{text}"
        );
    }
}

#[cfg(all(test, not(feature = "http")))]
mod http_tests {
    use super::*;

    /// A build without the HTTP medium asked for it says which feature to build with.
    #[tokio::test]
    async fn http_without_the_feature_names_it() {
        let config = Config {
            medium: MediumKind::Http,
            ..Config::default()
        };
        let Err(error) = connect(&config).await else {
            panic!("a build without the http feature connected to a gateway");
        };
        let text = error.to_string();
        assert!(text.contains("`http` feature"), "{text}");
        assert!(
            text.contains("cargo add intracom --features http"),
            "{text}"
        );
    }
}
