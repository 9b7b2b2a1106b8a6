//! The MongoDB medium: the bus is one collection of a database the services share.
//!
//! Why it exists: it is the point of intracom. A message is a document in the
//! messages collection, stamped by the server; subscribers follow the
//! collection's change stream (one per process, see `hub.rs`) from the position they
//! last acknowledged (see `follower.rs`); on a standalone server, where change streams
//! do not exist, they poll by `ts`.
//!
//! Rules relied on, each cited where the code depends on it:
//! - publish is one `update` command with `upsert: true`, filter
//!   `{_id, ts: {$exists: false}}`, the body in `$setOnInsert` and
//!   `$currentDate {ts: {$type: "timestamp"}, at: {$type: "date"}}`: the server
//!   stamps the message; a retry of a publish that already succeeded matches nothing,
//!   tries to insert the same `_id` and fails with 11000, which means "already
//!   published" and never re-stamps (`$currentDate` fires on a matching upsert too).
//! - `hello` tells the topology: `setName` on a replica-set member, `msg: "isdbgrid"`
//!   on mongos; otherwise a standalone, without change streams (40573 if tried).
//! - `maxBsonObjectSize` from `hello` bounds a message.
//!
//! Connection: everything comes from the URI (`common.intracom.db.uri`): TLS
//! (`tls=true`, `tlsCAFile`, `tlsCertificateKeyFile`), credentials and `authSource`,
//! `replicaSet` or `directConnection`, timeouts (`serverSelectionTimeoutMS`).

mod admin;
pub(crate) mod errors;
mod follower;
mod hub;
mod processed;
mod queues;
mod setup;
mod work;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bson::{doc, rawdoc, Bson, Document, RawArrayBuf, RawDocument, RawDocumentBuf};
use futures::TryStreamExt;
use mongodb::options::ClientOptions;
use mongodb::{Client, Collection, Database};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use super::{
    Appended, CatalogMap, ClaimRequest, DeadLetter, DeadLetterStore, EventStream, Inspection,
    Medium, ProcessedRecord, QueueStats, Records, Reservation, Settlement, WorkQueue,
};
use crate::config::{Config, DbConfig, ReadPreference, Retention};
use crate::error::{Error, Result};
use crate::filter::{Filter, Position, StartFrom};
use crate::message::Message;
use errors::{is_transient_code, to_error, DUPLICATE_KEY};
use follower::Follower;
use hub::{Hub, Started};

pub use admin::{Check, Count, Lag, Stats};
pub use setup::message_validator;

/// Counters of this process's MongoDB medium (also exported as metrics), as read at
/// one moment ([`MongoMedium::counters`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counters {
    /// Documents that were not readable messages, copied to `dead`.
    pub dead_lettered: u64,
    /// Times a change stream's history was gone (286/280/260).
    pub history_lost: u64,
    /// Times a subscriber fell back to scanning the collection by `ts`.
    pub fallbacks: u64,
    /// Change events the process's change stream read: what the server selected for
    /// this process (`common.intracom.db.hub.selection`).
    pub hub_events: u64,
    /// Times that stream was reopened from its last token because its selection
    /// changed (a subscription, worker or asker came or went).
    pub hub_selections: u64,
}

/// The live counters behind [`Counters`].
#[derive(Debug, Default)]
pub(crate) struct Tallies {
    dead_lettered: AtomicU64,
    history_lost: AtomicU64,
    fallbacks: AtomicU64,
    pub(crate) hub_events: AtomicU64,
    pub(crate) hub_selections: AtomicU64,
}

impl Tallies {
    fn snapshot(&self) -> Counters {
        Counters {
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            history_lost: self.history_lost.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            hub_events: self.hub_events.load(Ordering::Relaxed),
            hub_selections: self.hub_selections.load(Ordering::Relaxed),
        }
    }
}

/// Whether subscribers follow a change stream or poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Following {
    /// Replica set or sharded cluster: change streams.
    ChangeStreams,
    /// Standalone server: polling by `ts` every `common.intracom.db.poll_interval_ms`.
    Polling,
}

pub(crate) struct Inner {
    pub(crate) db: Database,
    pub(crate) messages: Collection<Document>,
    /// The messages collection on the change-stream client (see [`MongoMedium::connect`]).
    pub(crate) stream_messages: Collection<Document>,
    stream_client: Client,
    catalog: Collection<Document>,
    checkpoints: Collection<Document>,
    pub(crate) dead: Collection<Document>,
    pub(crate) processed: Collection<Document>,
    pub(crate) waiters: work::Waiters,
    pub(crate) claimed: work::Claimed,
    pub(crate) db_config: DbConfig,
    pub(crate) timeout_ms: u64,
    pub(crate) closed: CancellationToken,
    /// The driver operations under way (see [`Inner::op`]).
    ops: Arc<Operations>,
    pub(crate) stats: Tallies,
    /// How many times the change-stream client lost its connections (pool cleared:
    /// a network error, or the server going away). See [`Inner::stream_interruptions`].
    interruptions: Arc<AtomicU64>,
    max_bson: usize,
}

/// The driver operations under way, so that closing waits for them before it shuts the
/// driver down: the driver panics (an `unwrap` in its connection pool) when an
/// operation asks for a connection after its client was shut down.
#[derive(Default)]
struct Operations {
    /// Set before `closed` is cancelled; read after an operation is counted.
    closing: std::sync::atomic::AtomicBool,
    running: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One driver operation (or change stream) under way; see [`Inner::op`].
pub(crate) struct Op(Arc<Operations>);

impl Drop for Op {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// How long closing waits for the operations under way before shutting the driver down.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

impl Inner {
    /// Counts a driver operation (or a change stream, which the driver kills when it is
    /// dropped) for as long as the guard lives; refused with [`Error::Shutdown`] once
    /// the medium is closing.
    pub(crate) fn op(&self) -> Result<Op> {
        self.ops.running.fetch_add(1, Ordering::SeqCst);
        let op = Op(Arc::clone(&self.ops));
        if self.ops.closing.load(Ordering::SeqCst) {
            return Err(Error::Shutdown);
        }
        Ok(op)
    }

    /// Refuses new driver operations, then waits (until `deadline`) for the ones under
    /// way: each ends soon, on `closed` or at the end of its round trip.
    async fn quiesce(&self, deadline: tokio::time::Instant) {
        self.ops.closing.store(true, Ordering::SeqCst);
        self.closed.cancel();
        loop {
            let idle = self.ops.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.ops.running.load(Ordering::SeqCst) == 0 {
                return;
            }
            tokio::select! {
                _ = &mut idle => {}
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(running = self.ops.running.load(Ordering::SeqCst), "closing: driver operations still under way after the grace; shutting the driver down");
                    return;
                }
            }
        }
    }
}

impl Inner {
    /// A counter that moves each time the change-stream client's connection pool is
    /// cleared: the server went away or a connection broke.
    ///
    /// Why it matters: the driver resumes a change stream once by itself after such an
    /// error, from its cached token, and says nothing. mongod either resumes exactly
    /// there or fails the resume (a token it does not have); a server that lost writes
    /// it had acknowledged (a crash without a journal) may instead resume *later* and
    /// skip events silently. A stream that lived through an interruption is therefore
    /// not trusted to be gapless: the hub starts afresh and every follower catches up
    /// from the collection by `ts`, which is right on mongod too (one indexed query per
    /// subscriber after an outage).
    pub(crate) fn stream_interruptions(&self) -> u64 {
        self.interruptions.load(Ordering::SeqCst)
    }

    /// The retention in seconds, when messages expire by age (TTL).
    pub(crate) fn retention_secs(&self) -> Option<u64> {
        (self.db_config.retention == Retention::Ttl).then(|| self.timeout_ms.div_ceil(1000))
    }

    /// Whether a message is past its retention (the TTL monitor may not have deleted it yet).
    pub(crate) fn is_expired(&self, message: &Message) -> bool {
        if self.db_config.retention != Retention::Ttl {
            return false;
        }
        let Some(at) = message.at else { return false };
        let age_ms = bson::DateTime::now().timestamp_millis() - at.timestamp_millis();
        // The TTL index expires on whole seconds; use the same bound.
        age_ms > setup::ttl_seconds(self.timeout_ms).saturating_mul(1000)
    }

    /// Counts a document that is not a readable message (then dead-lettered).
    pub(crate) fn count_unreadable(&self) {
        metrics::counter!(crate::metrics::DEAD_LETTERED, "reason" => "unreadable").increment(1);
    }

    /// Counts a subscriber falling back to a `ts` scan.
    pub(crate) fn count_fallback(&self) {
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::FALLBACK, "kind" => "scan").increment(1);
    }

    /// Counts a change event read by the hub.
    pub(crate) fn count_hub_event(&self) {
        self.stats.hub_events.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::HUB_EVENTS).increment(1);
    }

    /// Counts the hub's stream reopened for a changed selection.
    pub(crate) fn count_selection(&self) {
        self.stats.hub_selections.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::HUB_SELECTIONS).increment(1);
    }

    /// Counts a change stream whose history was gone.
    pub(crate) fn count_history_lost(&self) {
        self.stats.history_lost.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::FALLBACK, "kind" => "history_lost").increment(1);
    }

    /// [`Inner::dead_letter`] for a document as the server sent it.
    pub(crate) async fn dead_letter_raw(&self, raw: &RawDocument, reason: String) {
        match Document::try_from(raw) {
            // Logged there: a consumer keeps consuming whatever happens.
            Ok(document) => drop(self.dead_letter(document, reason).await),
            Err(error) => {
                tracing::warn!(%error, %reason, "unreadable document not dead-lettered: not valid BSON")
            }
        }
    }

    /// Copies a document to `dead` with the reason, and counts it. A failure is logged
    /// and returned: a consumer that found the document keeps consuming whatever
    /// happens, the outbox keeps a message it could not dead-letter.
    pub(crate) async fn dead_letter(&self, document: Document, reason: String) -> Result<()> {
        let id = document.get("_id").cloned().unwrap_or(Bson::Null);
        let _op = match self.op() {
            Ok(op) => op,
            Err(error) => {
                tracing::warn!(message_id = %id, %reason, "document not dead-lettered: the medium is closed");
                return Err(error);
            }
        };
        tracing::warn!(message_id = %id, %reason, "unreadable document in the messages collection: dead-lettered");
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        let update = doc! {
            "$setOnInsert": { "document": document, "reason": reason, "origin": "follow" },
            "$currentDate": { "at": true },
        };
        if let Err(error) = self
            .dead
            .update_one(doc! { "_id": id }, update)
            .upsert(true)
            .await
        {
            tracing::warn!(%error, "dead letter not written");
            return Err(to_error(error));
        }
        Ok(())
    }
}

/// The driver's read preference for `common.intracom.db.read_preference`; `None` for
/// the default (`primary`), which leaves the URI's.
fn read_preference(preference: ReadPreference) -> Option<mongodb::options::ReadPreference> {
    use mongodb::options::ReadPreference as Driver;
    Some(match preference {
        ReadPreference::Primary => return None,
        ReadPreference::PrimaryPreferred => Driver::PrimaryPreferred { options: None },
        ReadPreference::Secondary => Driver::Secondary { options: None },
        ReadPreference::SecondaryPreferred => Driver::SecondaryPreferred { options: None },
        ReadPreference::Nearest => Driver::Nearest { options: None },
    })
}

/// Decodes a stored document into a message, or says why it is not one.
pub(crate) fn decode_message(document: &Document) -> std::result::Result<Message, String> {
    readable(bson::from_document(document.clone()))
}

/// Decodes a stored document as the server sent it (one pass over its bytes, no
/// intermediate `Document`), or says why it is not a message.
pub(crate) fn decode_raw(raw: &RawDocument) -> std::result::Result<Message, String> {
    readable(bson::from_slice(raw.as_bytes()))
}

fn readable(decoded: bson::de::Result<Message>) -> std::result::Result<Message, String> {
    let message = decoded.map_err(|e| format!("not a message: {e}"))?;
    message.validate().map_err(|e| e.to_string())?;
    if message.ts.is_none() || message.at.is_none() {
        return Err("missing the server stamps ts/at".into());
    }
    Ok(message)
}

/// The MongoDB medium (`common.intracom.medium=db`).
pub struct MongoMedium {
    inner: Arc<Inner>,
    following: Following,
    hub: OnceCell<Option<Arc<Hub>>>,
}

impl MongoMedium {
    /// Connects, reads the topology, and creates what is missing (collections,
    /// indexes, validator, retention). A bad URI is a config error naming
    /// `common.intracom.db.uri`; an unreachable server is [`Error::Unavailable`].
    pub async fn connect(config: &Config) -> Result<Self> {
        let db_config = config.db.clone();
        let mut options = ClientOptions::parse(&db_config.uri)
            .await
            .map_err(|e| Error::config("common.intracom.db.uri", &db_config.uri, e))?;
        if options.app_name.is_none() {
            options.app_name = Some(format!("intracom/{}", config.service));
        }
        // Change streams get a client of their own, for two reasons:
        // - an awaiting getMore holds its connection for up to maxAwaitTimeMS; on a pool
        //   of their own they never starve publishes (SERVER-32946);
        // - retryable reads are off there. In driver 3.9 the resume aggregate takes the
        //   cached token when its command is built, and the executor's retry of a failed
        //   resume rebuilds the command without it: the retried stream would start at
        //   "now" and skip what happened meanwhile. Without the retry, the failure comes
        //   to the hub, which reopens from its own copy of the token.
        let mut stream_options = options.clone();
        stream_options.retry_reads = Some(false);
        // Where the change streams read (`common.intracom.db.read_preference`); the
        // default leaves the URI's `readPreference` (the primary unless it says).
        if let Some(preference) = read_preference(db_config.read_preference) {
            stream_options.selection_criteria = Some(
                mongodb::options::SelectionCriteria::ReadPreference(preference),
            );
        }
        let interruptions = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&interruptions);
        stream_options.cmap_event_handler =
            Some(mongodb::event::EventHandler::callback(move |event| {
                if let mongodb::event::cmap::CmapEvent::PoolCleared(_) = event {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            }));
        let bad_uri =
            |e: mongodb::error::Error| Error::config("common.intracom.db.uri", &db_config.uri, e);
        let client = Client::with_options(options).map_err(bad_uri)?;
        let stream_client = Client::with_options(stream_options).map_err(bad_uri)?;
        let db = client.database(&db_config.database);
        // `hello` exists from 4.4.2 (and 5.0); older servers answer CommandNotFound (59)
        // and know the same reply as `isMaster`.
        let hello = match db.run_command(doc! { "hello": 1 }).await {
            Err(e) if errors::code(&e) == Some(errors::COMMAND_NOT_FOUND) => db
                .run_command(doc! { "isMaster": 1 })
                .await
                .map_err(to_error)?,
            other => other.map_err(to_error)?,
        };
        let following = if hello.contains_key("setName") || hello.get_str("msg") == Ok("isdbgrid") {
            Following::ChangeStreams
        } else {
            tracing::warn!(
                poll_interval_ms = db_config.poll_interval_ms,
                "standalone MongoDB server: no change streams, subscribers poll by ts (use a replica set for push delivery)"
            );
            Following::Polling
        };
        let max_bson = hello
            .get_i32("maxBsonObjectSize")
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(16 * 1024 * 1024);
        let inner = Arc::new(Inner {
            messages: db.collection(&db_config.messages),
            stream_messages: stream_client
                .database(&db_config.database)
                .collection(&db_config.messages),
            stream_client,
            catalog: db.collection(&db_config.config),
            checkpoints: db.collection(&db_config.checkpoints),
            dead: db.collection(&db_config.dead),
            processed: db.collection(&db_config.processed),
            waiters: work::Waiters::default(),
            claimed: work::Claimed::default(),
            db,
            db_config,
            timeout_ms: config.timeout_ms,
            closed: CancellationToken::new(),
            ops: Arc::default(),
            stats: Tallies::default(),
            interruptions,
            max_bson,
        });
        setup::ensure(&inner).await?;
        Ok(MongoMedium {
            inner,
            following,
            hub: OnceCell::new(),
        })
    }

    /// Change streams or polling, as found at connect (or on the first refused stream).
    pub fn following(&self) -> Following {
        match self.hub.get() {
            Some(None) => Following::Polling,
            _ => self.following,
        }
    }

    /// The medium's counters, as they are now.
    pub fn counters(&self) -> Counters {
        self.inner.stats.snapshot()
    }

    /// The shared change stream, opened on first use; `None` in poll mode.
    async fn hub(&self) -> Result<Option<Arc<Hub>>> {
        if self.following == Following::Polling {
            return Ok(None);
        }
        let hub = self
            .hub
            .get_or_try_init(|| async {
                match hub::start(Arc::clone(&self.inner)).await? {
                    Started::Hub(hub) => Ok::<_, Error>(Some(hub)),
                    Started::NoChangeStreams => {
                        tracing::warn!(
                            "the server refused $changeStream (40573): subscribers poll by ts"
                        );
                        Ok(None)
                    }
                }
            })
            .await?;
        Ok(hub.clone())
    }

    /// The `update` statement that publishes one message, built from the message's BSON
    /// as the bus encoded it: its elements are copied, not encoded again. An upsert that
    /// can only insert (filter `{_id, ts: {$exists: false}}`, see the module docs), the
    /// body in `$setOnInsert`, the stamps from the server's clock by `$currentDate`.
    fn upsert_statement(message: &Message, encoded: &RawDocument) -> Result<RawDocumentBuf> {
        let unreadable = |e: bson::raw::Error| {
            Error::refused("db", format!("message {} encoded wrongly: {e}", message.id))
        };
        let mut body = RawDocumentBuf::new();
        for element in encoded {
            let (key, value) = element.map_err(unreadable)?;
            // `_id` is the filter's; the stamps are the server's.
            if !matches!(key, "_id" | "ts" | "at") {
                body.append_ref(key, value);
            }
        }
        Ok(rawdoc! {
            "q": { "_id": message.id.as_str(), "ts": { "$exists": false } },
            "u": {
                "$setOnInsert": body,
                "$currentDate": { "ts": { "$type": "timestamp" }, "at": { "$type": "date" } },
            },
            "upsert": true,
        })
    }

    /// Sends `update` commands of the statements (`statements[i]` publishes
    /// `messages[i]`), in order, each within the server's batch limits, and reads which
    /// messages were stored and which were already.
    async fn upsert(
        &self,
        messages: &[Message],
        statements: &[RawDocumentBuf],
    ) -> Result<Vec<Appended>> {
        let mut out = Vec::with_capacity(messages.len());
        let mut next = 0;
        while next < statements.len() {
            let mut end = next;
            let mut bytes = 0;
            while end < statements.len() && end - next < PUBLISH_BATCH {
                let size = statements[end].as_bytes().len();
                if end > next && bytes + size > PUBLISH_BATCH_BYTES {
                    break;
                }
                bytes += size;
                end += 1;
            }
            let batch = &messages[next..end];
            // The statements' bytes are copied into the command, not encoded again.
            let updates: RawArrayBuf = statements[next..end].iter().cloned().collect();
            // ordered: statements run in publish order, so stamps follow it; the first
            // failure stops the batch and the rest is sent again.
            let command = rawdoc! {
                "update": self.inner.db_config.messages.as_str(),
                "updates": updates,
                "ordered": true,
            };
            let reply = self
                .inner
                .db
                .run_raw_command(command)
                .await
                .map_err(to_error)?;
            if let Ok(wce) = reply.get_document("writeConcernError") {
                return Err(Error::unavailable(
                    "db",
                    format!("write concern not satisfied: {wce}"),
                ));
            }
            let first_error = reply
                .get_array("writeErrors")
                .ok()
                .and_then(|errors| errors.first())
                .and_then(|e| e.as_document());
            let stopped_at = match first_error {
                None => batch.len(),
                Some(error) => {
                    let index = error
                        .get_i32("index")
                        .ok()
                        .and_then(|i| usize::try_from(i).ok())
                        .unwrap_or(0);
                    let code = error.get_i32("code").unwrap_or(0);
                    let transient = is_transient_code(code);
                    if transient || code != DUPLICATE_KEY || index >= batch.len() {
                        // Earlier statements were stored; publishing the batch again is
                        // safe: later (a primary stepping down, a shutdown), or never.
                        let id = batch.get(index).map(|m| m.id.as_str()).unwrap_or("?");
                        let why = error.get_str("errmsg").unwrap_or("write error");
                        return Err(if transient {
                            Error::unavailable("db", format!("message {id} not written now: {why}"))
                        } else {
                            Error::refused("db", format!("message {id} refused: {why}"))
                        });
                    }
                    index
                }
            };
            for message in &batch[..stopped_at] {
                out.push(Appended {
                    id: message.id.clone(),
                    ts: None,
                    duplicate: false,
                });
            }
            if stopped_at < batch.len() {
                // 11000: the message exists already (a retry of a publish that succeeded).
                out.push(Appended {
                    id: batch[stopped_at].id.clone(),
                    ts: None,
                    duplicate: true,
                });
                next += stopped_at + 1;
            } else {
                next = end;
            }
        }
        Ok(out)
    }
}

/// How many statements one `update` command carries at most (the server's
/// `maxWriteBatchSize` is 100 000; the command must also stay under 48 MB).
const PUBLISH_BATCH: usize = 1000;
const PUBLISH_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// What a message leaves of the server's document limit ([`Medium::max_message_bytes`]).
const MESSAGE_MARGIN: usize = 16 * 1024;

#[async_trait]
impl Medium for MongoMedium {
    fn name(&self) -> &'static str {
        "db"
    }

    fn max_message_bytes(&self) -> usize {
        // Room for the stamps the server adds (`ts`, `at`: about 30 bytes) and for the
        // change event that carries the message to followers (its resume token,
        // namespace, key and times: a few hundred bytes). An event over the server's
        // limit fails the stream (BSONObjectTooLarge, 10334) for every follower.
        self.inner.max_bson.saturating_sub(MESSAGE_MARGIN)
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

    fn diagnosis(&self) -> Option<&dyn super::Diagnosis> {
        Some(self)
    }

    async fn append(&self, messages: &[Message]) -> Result<Vec<Appended>> {
        let encoded = messages
            .iter()
            .map(bson::to_raw_document_buf)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(crate::error::PayloadError::from)?;
        self.append_encoded(messages, &encoded).await
    }

    fn sends_encoded(&self) -> bool {
        true
    }

    async fn append_encoded(
        &self,
        messages: &[Message],
        encoded: &[RawDocumentBuf],
    ) -> Result<Vec<Appended>> {
        if encoded.len() != messages.len() {
            return self.append(messages).await;
        }
        let _op = self.inner.op()?;
        let statements = messages
            .iter()
            .zip(encoded)
            .map(|(message, encoded)| Self::upsert_statement(message, encoded))
            .collect::<Result<Vec<_>>>()?;
        // A request's caller waits for its outcome: with the shared stream running, its
        // waiter is set now, so that no read is needed (see `work::wait`).
        // With a targeted selection, the stream selects the requests' settles once it
        // selects their asking instance: waited for before the publish, so that neither
        // their insert nor their settle passes by.
        let requests: Vec<&str> = match self.hub.get() {
            Some(Some(hub)) => {
                let mut widened = None;
                let requests = messages
                    .iter()
                    .filter(|m| work::is_request(m))
                    .map(|m| {
                        self.inner.waiters.expect(m);
                        widened = widened.max(hub.ask(&m.source_instance));
                        m.id.as_str()
                    })
                    .collect();
                if let Some(generation) = widened {
                    hub.applied(&self.inner, generation).await;
                }
                requests
            }
            _ => Vec::new(),
        };
        let appended = self.upsert(messages, &statements).await;
        if appended.as_ref().is_err_and(|e| !e.is_retryable()) {
            // Not published: nobody will wait for these.
            for id in requests {
                self.inner.waiters.forget(id);
            }
        }
        appended
    }

    async fn follow(&self, from: StartFrom, filter: Filter) -> Result<EventStream> {
        let _op = self.inner.op()?;
        // "Now" is the moment of this call: the ring's tip before anything is awaited, or
        // its very beginning when this call opens the shared stream (its anchor is then
        // part of this call).
        let now = self
            .hub
            .get()
            .and_then(|h| h.as_ref().map(|h| h.ring().tip()))
            .unwrap_or(0);
        let hub = self.hub().await?;
        let follower = Follower::start(Arc::clone(&self.inner), hub, from, filter, now).await?;
        Ok(Box::pin(futures::stream::unfold(follower, Follower::next)))
    }

    async fn anchor(&self, internal: crate::medium::sealed::Internal) -> Result<Option<Position>> {
        let _ = internal;
        Follower::anchor(&self.inner).await
    }

    async fn catalog_load(&self) -> Result<CatalogMap> {
        let _op = self.inner.op()?;
        let mut cursor = self
            .inner
            .catalog
            .find(doc! { "type": "service" })
            .await
            .map_err(to_error)?;
        let mut map = CatalogMap::new();
        while let Some(document) = cursor.try_next().await.map_err(to_error)? {
            let Ok(service) = document.get_str("_id") else {
                continue;
            };
            let actions = document
                .get_array("actions")
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            map.insert(service.to_string(), actions);
        }
        Ok(map)
    }

    async fn catalog_add(&self, service: &str, actions: &[String]) -> Result<()> {
        let _op = self.inner.op()?;
        // Idempotent: $addToSet with $each adds only what is missing; the upsert creates
        // the array, so it is never null ($addToSet on null fails).
        self.inner
            .catalog
            .update_one(
                doc! { "_id": service },
                doc! {
                    "$set": { "type": "service" },
                    "$addToSet": { "actions": { "$each": actions } },
                    "$currentDate": { "updatedAt": true },
                },
            )
            .upsert(true)
            .await
            .map_err(to_error)?;
        Ok(())
    }

    async fn checkpoint_load(&self, name: &str) -> Result<Option<Position>> {
        let _op = self.inner.op()?;
        let found = self
            .inner
            .checkpoints
            .find_one(doc! { "_id": name })
            .await
            .map_err(to_error)?;
        match found.and_then(|d| d.get_document("position").ok().cloned()) {
            Some(position) => bson::from_document(position).map(Some).map_err(|e| {
                Error::refused("db", format!("checkpoint `{name}` is unreadable: {e}"))
            }),
            None => Ok(None),
        }
    }

    async fn checkpoint_save(&self, name: &str, position: &Position) -> Result<()> {
        let _op = self.inner.op()?;
        // The resume token is stored as-is: tokens are opaque (mongo-rust-driver #1288).
        let position = bson::to_document(position).map_err(crate::error::PayloadError::from)?;
        self.inner
            .checkpoints
            .update_one(
                doc! { "_id": name },
                doc! { "$set": { "position": position }, "$currentDate": { "updatedAt": true } },
            )
            .upsert(true)
            .await
            .map_err(to_error)?;
        Ok(())
    }

    async fn close(&self) {
        let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
        self.inner.quiesce(deadline).await;
        // Stop the drivers' pool workers and monitors now, rather than when the runtime
        // drops them under requests still waiting for a connection. The driver first
        // runs the clean-up of the cursors dropped (their `killCursors`): one that began
        // while its pool was shutting down would find no pool. A cursor still held (a
        // subscription stream the application keeps) would hold this up for ever, hence
        // the deadline, after which the driver is shut down at once.
        for client in [self.inner.db.client(), &self.inner.stream_client] {
            let orderly = tokio::time::timeout_at(deadline, client.clone().shutdown()).await;
            if orderly.is_err() {
                tracing::warn!(
                    "closing: cursors still open after the grace; shutting the driver down at once"
                );
                client.clone().shutdown().immediate(true).await;
            }
        }
    }
}

#[async_trait]
impl WorkQueue for MongoMedium {
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Message>> {
        let _op = self.inner.op()?;
        work::claim(&self.inner, request).await
    }

    async fn renew(&self, id: &str, owner: &str, lease: Duration) -> Result<bool> {
        let _op = self.inner.op()?;
        work::renew(&self.inner, id, owner, lease).await
    }

    async fn settle(&self, id: &str, owner: Option<&str>, settlement: Settlement) -> Result<bool> {
        let _op = self.inner.op()?;
        work::settle(&self.inner, id, owner, settlement).await
    }

    async fn bury(&self, id: &str, owner: &str, reason: &str) -> Result<bool> {
        let _op = self.inner.op()?;
        work::bury(&self.inner, id, owner, reason).await
    }

    async fn await_outcome(&self, id: &str, timeout: Duration) -> Result<Option<Message>> {
        let _op = self.inner.op()?;
        // The shared stream carries the update events that wake the waiter.
        let hub = self.hub().await?;
        work::await_outcome(&self.inner, id, timeout, hub.as_deref()).await
    }

    async fn work_services(&self, id: &str) -> Result<Option<(String, Option<String>)>> {
        let _op = self.inner.op()?;
        work::services(&self.inner, id).await
    }
}

#[async_trait]
impl DeadLetterStore for MongoMedium {
    async fn dead_letter(&self, document: Document, reason: String) -> Result<()> {
        let _op = self.inner.op()?;
        self.inner.dead_letter(document, reason).await
    }

    async fn dead_list(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let _op = self.inner.op()?;
        work::dead_list(&self.inner, limit).await
    }

    async fn dead_get(&self, id: &str) -> Result<Option<DeadLetter>> {
        let _op = self.inner.op()?;
        work::dead_get(&self.inner, id).await
    }

    async fn dead_remove(&self, id: Option<&str>) -> Result<u64> {
        let _op = self.inner.op()?;
        work::dead_remove(&self.inner, id).await
    }
}

#[async_trait]
impl Records for MongoMedium {
    async fn processed_reserve(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Reservation> {
        let _op = self.inner.op()?;
        work::processed_reserve(&self.inner, consumer, id, owner, lease).await
    }

    async fn processed_complete(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        result: Option<Document>,
    ) -> Result<()> {
        let _op = self.inner.op()?;
        work::processed_complete(&self.inner, consumer, id, owner, result).await
    }

    async fn processed_release(&self, consumer: &str, id: &str, owner: &str) -> Result<()> {
        let _op = self.inner.op()?;
        work::processed_release(&self.inner, consumer, id, owner).await
    }
}

#[async_trait]
impl super::Diagnosis for MongoMedium {
    async fn checks(&self) -> Vec<Check> {
        self.doctor().await
    }
}

#[async_trait]
impl Inspection for MongoMedium {
    async fn stats(&self) -> Result<Stats> {
        let _op = self.inner.op()?;
        self.admin_stats().await
    }

    async fn queues(&self) -> Result<Vec<QueueStats>> {
        let _op = self.inner.op()?;
        queues::queues(&self.inner).await
    }

    async fn queue_purge(&self, service: &str, action: &str) -> Result<u64> {
        let _op = self.inner.op()?;
        queues::purge(&self.inner, service, action).await
    }

    async fn processed_get(&self, consumer: &str, id: &str) -> Result<Option<ProcessedRecord>> {
        let _op = self.inner.op()?;
        processed::get(&self.inner, consumer, id).await
    }

    async fn processed_remove(&self, consumer: &str, id: &str) -> Result<u64> {
        let _op = self.inner.op()?;
        processed::remove(&self.inner, consumer, id).await
    }
}

impl Drop for MongoMedium {
    fn drop(&mut self) {
        self.inner.closed.cancel();
    }
}
