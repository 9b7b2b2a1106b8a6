//! Work (`delivery: one`), request outcomes, dead letters and idempotency records on
//! MongoDB.
//!
//! Rules relied on:
//! - `findAndModify` with a sort is atomic for the one document it picks: two workers
//!   never claim the same work (the standard way to claim with a lease).
//! - Lease times come from the server's clock, never the client's, so skewed workers
//!   agree on when a lease ends (Hangfire.Mongo #356): a lease is `{owner, at, ms}`,
//!   `at` written by `$currentDate` (the server's wall clock at the write), and it has
//!   ended when `$dateAdd(at, ms) <= $$NOW` (`$$NOW` in a query `$expr` is the
//!   server's clock at the query, 4.2+; `$dateAdd` is 5.0+).
//! - Claims, renewals and back-off are classic update operators (`$set`, `$inc`,
//!   `$currentDate`), not update pipelines: they work on every MongoDB and on servers
//!   without pipeline updates, and in a classic `$set` a string starting with `$` is a
//!   value, never a field path. `lease` is either absent or an object (the validator
//!   refuses a null one), so setting `lease.owner` never meets a null parent.
//! - A claim counts the attempt, so a worker that crashes holding a lease still uses one
//!   up; the lease expires and another worker claims the work.

use std::sync::Arc;
use std::time::Duration;

use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use mongodb::options::ReturnDocument;
use tokio::sync::Notify;

use super::errors::{code, to_error, DUPLICATE_KEY};
use super::hub::Hub;
use super::{decode_message, Inner};
use crate::error::Result;
use crate::medium::{ClaimRequest, DeadLetter, Reservation, Settlement};
use crate::message::{now_nanos, DeliveryMode, Message, State};

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// When a lease ends, as a server-side expression: `at` plus `ms` milliseconds.
pub(crate) fn lease_end() -> Document {
    doc! { "$dateAdd": { "startDate": "$lease.at", "unit": "millisecond", "amount": "$lease.ms" } }
}

/// How many unreadable documents one claim sets aside before it gives up for now.
const UNREADABLE_PER_CLAIM: usize = 16;

/// What a worker of `service` may claim: its pending work for `actions`, not held by a
/// live lease. The equality on the claim index's fields is a clause of its own in an
/// `$and`: the same query for mongod, which flattens `$and` into one conjunction, and
/// one that the Rust test server answers from the claim index instead of examining
/// every document of the service. (Measured, not read from that server's `explain`,
/// which shows this form as a collection scan and the same conjunction written at the
/// top level on the claim index: 500 claims and settles took 0.55 s and 0.57 s with 0
/// and 2000 settled requests beside them in this form, 0.56 s and 1.16 s in the other;
/// `scripts/request-probe.py claims`.)
pub(crate) fn claim_filter(service: &str, actions: &[String]) -> Document {
    doc! { "$and": [
        { "serviceNameDest": service, "delivery": "one", "state": "pending" },
        { "action": { "$in": actions } },
        { "$or": [
            { "lease": Bson::Null },
            { "$expr": { "$lte": [lease_end(), "$$NOW"] } },
        ] },
    ] }
}

/// Claims the next work. A claimed document that is not a readable message (it passed
/// the collection's validator but not the message rules, e.g. an action with a space)
/// is settled as an error where it lies, copied to the dead letters and counted, and the
/// claim goes on with the next: claimed again at every lease's end, it would block
/// nothing but come back for ever.
pub(crate) async fn claim(inner: &Inner, request: &ClaimRequest) -> Result<Option<Message>> {
    for _ in 0..UNREADABLE_PER_CLAIM {
        let filter = claim_filter(&request.service, &request.actions);
        let update = doc! {
            "$set": { "lease.owner": &request.owner, "lease.ms": millis(request.lease) },
            "$currentDate": { "lease.at": true },
            "$inc": { "attempts": 1 },
        };
        let Some(document) = inner
            .messages
            .find_one_and_update(filter, update)
            .sort(doc! { "priority": -1, "ts": 1 })
            .return_document(ReturnDocument::After)
            .await
            .map_err(to_error)?
        else {
            return Ok(None);
        };
        match decode_message(&document) {
            Ok(message) => {
                inner.claimed.remember(&message);
                return Ok(Some(message));
            }
            Err(reason) => {
                let reason = format!("claimed work is not a readable message: {reason}");
                set_aside(inner, &document, &request.owner, &reason).await?;
            }
        }
    }
    Ok(None)
}

/// Settles an unreadable claimed document as an error (still held by `owner`) and
/// copies it to the dead letters ([`Inner::dead_letter`] logs and counts it).
async fn set_aside(inner: &Inner, document: &Document, owner: &str, reason: &str) -> Result<()> {
    let id = document.get("_id").cloned().unwrap_or(Bson::Null);
    let mut set = doc! { "state": "error", "response": { "error": reason, "dead": true }, "response_ts": now_nanos() };
    if let (Ok(_), Ok(asker)) = (
        document.get_str("queryId"),
        document.get_str("instanceSource"),
    ) {
        set.insert(ASKER, asker);
    }
    inner
        .messages
        .update_one(
            doc! { "_id": &id, "state": "pending", "lease.owner": owner },
            doc! { "$set": set, "$unset": { "lease": "" } },
        )
        .await
        .map_err(to_error)?;
    // Settled either way; a failed copy is logged there.
    drop(
        inner
            .dead_letter(document.clone(), reason.to_string())
            .await,
    );
    Ok(())
}

pub(crate) async fn renew(inner: &Inner, id: &str, owner: &str, lease: Duration) -> Result<bool> {
    let updated = inner
        .messages
        .update_one(
            doc! { "_id": id, "state": "pending", "lease.owner": owner },
            doc! { "$set": { "lease.ms": millis(lease) }, "$currentDate": { "lease.at": true } },
        )
        .await
        .map_err(to_error)?;
    Ok(updated.matched_count == 1)
}

pub(crate) async fn settle(
    inner: &Inner,
    id: &str,
    owner: Option<&str>,
    settlement: Settlement,
) -> Result<bool> {
    let mut filter = doc! { "_id": id, "state": "pending" };
    if let Some(owner) = owner {
        filter.insert("lease.owner", owner);
    }
    let result = match settlement {
        Settlement::Done(result) => {
            let mut set = doc! { "state": "done", "response_ts": now_nanos() };
            if let Some(result) = result {
                set.insert("result", result);
            }
            if let Some(asker) = asker(inner, id).await {
                set.insert(ASKER, asker);
            }
            inner
                .messages
                .update_one(filter, doc! { "$set": set, "$unset": { "lease": "" } })
                .await
        }
        Settlement::Failed(error) => {
            let mut set = doc! { "state": "error", "response": error, "response_ts": now_nanos() };
            if let Some(asker) = asker(inner, id).await {
                set.insert(ASKER, asker);
            }
            inner
                .messages
                .update_one(filter, doc! { "$set": set, "$unset": { "lease": "" } })
                .await
        }
        Settlement::Retry { error, after } => {
            let update = doc! {
                "$set": { "lastError": error, "lease.owner": "backoff", "lease.ms": millis(after) },
                "$currentDate": { "lease.at": true },
            };
            inner.messages.update_one(filter, update).await
        }
    };
    Ok(result.map_err(to_error)?.matched_count == 1)
}

pub(crate) async fn bury(inner: &Inner, id: &str, owner: &str, reason: &str) -> Result<bool> {
    let mut set = doc! { "state": "error", "response": { "error": reason, "dead": true }, "response_ts": now_nanos() };
    if let Some(asker) = asker(inner, id).await {
        set.insert(ASKER, asker);
    }
    let buried = inner
        .messages
        .find_one_and_update(
            doc! { "_id": id, "state": "pending", "lease.owner": owner },
            doc! { "$set": set, "$unset": { "lease": "" } },
        )
        .return_document(ReturnDocument::After)
        .await
        .map_err(to_error)?;
    match buried {
        Some(document) => {
            // The work is settled as dead either way; the copy's failure is logged.
            drop(inner.dead_letter(document, reason.to_string()).await);
            Ok(true)
        }
        None => Ok(false),
    }
}

/// The field a settle of a request writes beside `state`: the instance that asked
/// (the request's `instanceSource`). A change event of an update carries only what the
/// update wrote (`updateDescription.updatedFields`), so this is what lets the asking
/// process's change stream select the settles of its own requests on the server (see
/// `hub::hub_pipeline`), without looking the document up.
pub(crate) const ASKER: &str = "asker";

/// The asking instance of the requests this process claimed and has not settled yet,
/// so that a settle writes it without reading the request first.
#[derive(Default)]
pub(crate) struct Claimed {
    askers: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

/// How many claimed requests' askers are kept at most (work claimed and never settled
/// here, its lease lost, would stay otherwise): past it they are forgotten, and a
/// settle reads the asker instead.
const CLAIMED_MAX: usize = 16_384;

impl Claimed {
    fn remember(&self, message: &Message) {
        if message.query_id.is_none() {
            return;
        }
        let mut askers = lock(&self.askers);
        if askers.len() >= CLAIMED_MAX {
            askers.clear();
        }
        askers.insert(message.id.clone(), message.source_instance.clone());
    }

    fn take(&self, id: &str) -> Option<Option<String>> {
        lock(&self.askers).remove(id).map(Some)
    }
}

/// The instance that asked request `id` (none for work that is not a request): known
/// from its claim, or read.
/// The sending and the destination service of a stored message.
pub(crate) async fn services(inner: &Inner, id: &str) -> Result<Option<(String, Option<String>)>> {
    let found = inner
        .messages
        .find_one(doc! { "_id": id })
        .projection(doc! { "serviceNameSource": 1, "serviceNameDest": 1 })
        .await
        .map_err(to_error)?;
    Ok(found.map(|document| {
        (
            document
                .get_str("serviceNameSource")
                .unwrap_or_default()
                .to_string(),
            document.get_str("serviceNameDest").ok().map(str::to_string),
        )
    }))
}

async fn asker(inner: &Inner, id: &str) -> Option<String> {
    if let Some(known) = inner.claimed.take(id) {
        return known;
    }
    let found = inner
        .messages
        .find_one(doc! { "_id": id })
        .projection(doc! { "instanceSource": 1, "queryId": 1 })
        .await;
    match found {
        Ok(Some(document)) if document.get_str("queryId").is_ok() => {
            document.get_str("instanceSource").ok().map(str::to_string)
        }
        Ok(_) => None,
        Err(error) => {
            // The settle goes on; its caller reads the outcome within a recheck.
            tracing::debug!(%error, message_id = id, "the asker of a request was not read");
            None
        }
    }
}

/// Whether a message is a request whose caller waits for its outcome (what
/// `Intracom::request` publishes).
pub(crate) fn is_request(message: &Message) -> bool {
    message.delivery == DeliveryMode::One
        && message.state.unwrap_or(State::Pending) == State::Pending
        && message.query_id.is_some()
}

/// Outcome waiters of this process, woken by `update` events of the shared stream.
#[derive(Default)]
pub(crate) struct Waiters {
    book: std::sync::Mutex<Book>,
}

#[derive(Default)]
struct Book {
    by_id: std::collections::HashMap<String, Arc<Waiter>>,
    /// The size at which expired expected waiters are next swept (amortised: twice the
    /// size left by the last sweep, at least [`EXPECTED_SWEEP`]).
    sweep_at: usize,
}

/// One caller waiting for a request's outcome.
#[derive(Default)]
pub(crate) struct Waiter {
    notify: Notify,
    /// Set before the request was published, while the shared change stream ran (see
    /// [`Waiters::expect`]): its insert event then comes after the waiter exists, and
    /// the caller does not read the request first. An event missed all the same (the
    /// stream's history lost and caught up by a scan) costs a read: see [`wait`].
    expected: bool,
    /// Until when an expected waiter is kept if nobody waits on it.
    expires: Option<std::time::Instant>,
    /// The request as stored: from its insert event, or read.
    request: std::sync::Mutex<Option<Document>>,
    /// The last settling update seen for it (the hub's stream passes only updates that
    /// write `state`).
    settled: std::sync::Mutex<Option<Settled>>,
}

/// What a settling update's change event says.
pub(crate) enum Settled {
    /// The fields it set (`updateDescription.updatedFields`) and the ones it removed.
    Fields(Document, Vec<String>),
    /// Something the event does not describe exactly (truncated arrays): read.
    Read,
}

/// How many waiters are kept before the expired expected ones are swept.
const EXPECTED_SWEEP: usize = 1024;

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Waiters {
    /// Sets the waiter of a request about to be published while the shared change
    /// stream runs: its insert and settling update then cannot come before the waiter
    /// exists, and the caller reads nothing unless an event is missed (see [`wait`]).
    pub(crate) fn expect(&self, request: &Message) {
        let ttl = Duration::from_millis(u64::try_from(request.query_ms.unwrap_or(0)).unwrap_or(0))
            + Duration::from_secs(60);
        let waiter = Waiter {
            expected: true,
            expires: Some(crate::deadline::std_after(ttl)),
            ..Waiter::default()
        };
        let mut book = lock(&self.book);
        if book.by_id.len() >= book.sweep_at.max(EXPECTED_SWEEP) {
            let now = std::time::Instant::now();
            book.by_id.retain(|_, w| w.expires.is_none_or(|e| e > now));
            book.sweep_at = book.by_id.len() * 2;
        }
        // A caller may wait already (a request sent again from the outbox): keep its waiter.
        book.by_id
            .entry(request.id.clone())
            .or_insert_with(|| Arc::new(waiter));
    }

    /// Forgets a request's waiter (the outcome came, or the request was not published).
    pub(crate) fn forget(&self, id: &str) {
        lock(&self.book).by_id.remove(id);
    }

    fn register(&self, id: &str) -> Arc<Waiter> {
        Arc::clone(lock(&self.book).by_id.entry(id.to_string()).or_default())
    }

    fn get(&self, id: &str) -> Option<Arc<Waiter>> {
        let book = lock(&self.book);
        if book.by_id.is_empty() {
            return None;
        }
        book.by_id.get(id).cloned()
    }

    /// A message was stored: if it is a request of this process, its waiter keeps it.
    pub(crate) fn stored(&self, message: &Message) {
        if let Some(waiter) = self.get(&message.id) {
            if let Ok(document) = bson::to_document(message) {
                *lock(&waiter.request) = Some(document);
            }
        }
    }

    /// An update wrote the `state` of request `id`: hands what it wrote to its waiter,
    /// if this process has one.
    pub(crate) fn settled(&self, id: &str, settled: Settled) {
        if let Some(waiter) = self.get(id) {
            *lock(&waiter.settled) = Some(settled);
            waiter.notify.notify_waiters();
        }
    }
}

/// How often a waiting caller re-reads the request even without an event (covers poll
/// mode and an event missed while the stream was being resumed).
const OUTCOME_RECHECK: Duration = Duration::from_millis(1000);

pub(crate) async fn await_outcome(
    inner: &Inner,
    id: &str,
    timeout: Duration,
    hub: Option<&Hub>,
) -> Result<Option<Message>> {
    let waiter = inner.waiters.register(id);
    let outcome = wait(inner, id, timeout, &waiter, hub).await;
    inner.waiters.forget(id);
    outcome
}

/// The outcome a request as stored holds, once it is no longer pending.
fn outcome_in(id: &str, document: &Document) -> Option<Result<Message>> {
    document
        .get_str("state")
        .is_ok_and(|s| s != "pending")
        .then(|| {
            decode_message(document).map_err(|reason| {
                crate::Error::refused("db", format!("request {id} is unreadable: {reason}"))
            })
        })
}

/// Waits for the outcome. The outcome comes from the settling update's change event
/// applied to the request as stored: a change event's `updateDescription.updatedFields`
/// holds the new value of every field the update set, and `removedFields` the fields it
/// unset (change events spec); only that update's fields are applied (`attempts` stays
/// as stored or read). The request as stored comes from its insert event when the
/// waiter was set before the publish ([`Waiters::expect`]); otherwise it is read once,
/// after the waiter is set, so a settle before the read is seen in it and one after it
/// sends an event. Without an event (poll mode, a stream being reopened) the request is
/// read again every [`OUTCOME_RECHECK`].
///
/// With a targeted selection, the hub's stream selects the settles of the instances
/// that asked requests this process waits for: a request read here names its asker,
/// which is added to the selection (and the request read again once the stream selects
/// it, so that a settle in between is not missed).
async fn wait(
    inner: &Inner,
    id: &str,
    timeout: Duration,
    waiter: &Waiter,
    hub: Option<&Hub>,
) -> Result<Option<Message>> {
    let deadline = crate::deadline::after(timeout);
    let mut reread = !waiter.expected;
    loop {
        // Listen before reading, so an update between the read and the wait wakes us.
        let notified = waiter.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let event = lock(&waiter.settled).take();
        let request = lock(&waiter.request).clone();
        match (event, request) {
            // Top-level fields only (what a settle writes); anything else is read.
            (Some(Settled::Fields(set, removed)), Some(mut document))
                if set.keys().all(|k| !k.contains('.'))
                    && removed.iter().all(|k| !k.contains('.')) =>
            {
                for field in &removed {
                    document.remove(field);
                }
                document.extend(set);
                if let Some(outcome) = outcome_in(id, &document) {
                    return outcome.map(Some);
                }
                *lock(&waiter.request) = Some(document);
            }
            // An event that cannot be applied (the request's insert was missed, a
            // nested path, truncated arrays): the request is read now.
            (Some(_), _) => reread = true,
            (None, _) => {}
        }
        if reread {
            reread = false;
            if let Some(document) = inner
                .messages
                .find_one(doc! { "_id": id })
                .await
                .map_err(to_error)?
            {
                if let Some(outcome) = outcome_in(id, &document) {
                    return outcome.map(Some);
                }
                let widened = match (hub, document.get_str("instanceSource")) {
                    (Some(hub), Ok(asker)) => hub.ask(asker),
                    _ => None,
                };
                *lock(&waiter.request) = Some(document);
                if let (Some(hub), Some(generation)) = (hub, widened) {
                    hub.applied(inner, generation).await;
                    reread = true;
                    continue;
                }
            }
        }
        let recheck = tokio::time::Instant::now() + OUTCOME_RECHECK;
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Ok(None),
            _ = inner.closed.cancelled() => return Err(crate::Error::Shutdown),
            _ = tokio::time::sleep_until(recheck.min(deadline)) => reread = true,
            _ = &mut notified => {}
        }
    }
}

fn dead_letter_from(document: Document) -> DeadLetter {
    DeadLetter {
        id: crate::medium::id_of(&document),
        reason: document.get_str("reason").unwrap_or_default().to_string(),
        at: document.get_datetime("at").ok().copied(),
        document: document
            .get_document("document")
            .cloned()
            .unwrap_or_default(),
    }
}

pub(crate) async fn dead_list(inner: &Inner, limit: usize) -> Result<Vec<DeadLetter>> {
    if limit == 0 {
        return Ok(Vec::new()); // .limit(0) would mean no limit
    }
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let found: Vec<Document> = inner
        .dead
        .find(doc! {})
        .sort(doc! { "at": 1 })
        .limit(limit)
        .await
        .map_err(to_error)?
        .try_collect()
        .await
        .map_err(to_error)?;
    Ok(found.into_iter().map(dead_letter_from).collect())
}

pub(crate) async fn dead_get(inner: &Inner, id: &str) -> Result<Option<DeadLetter>> {
    let found = inner
        .dead
        .find_one(doc! { "_id": id })
        .await
        .map_err(to_error)?;
    Ok(found.map(dead_letter_from))
}

pub(crate) async fn dead_remove(inner: &Inner, id: Option<&str>) -> Result<u64> {
    let removed = match id {
        Some(id) => inner.dead.delete_one(doc! { "_id": id }).await,
        None => inner.dead.delete_many(doc! {}).await,
    };
    Ok(removed.map_err(to_error)?.deleted_count)
}

/// Reserves (consumer, message id): an upsert that only inserts, so two instances racing
/// for the same message get one winner (the unique index on {consumer, messageId}
/// answers 11000 to the other: a stamped record does not match `at: {$exists: false}`).
/// The loser reads the record: done → its result; a live lease → busy; a lapsed lease
/// (the holder died) → a conditional take-over. Lease times come from the server's
/// clock, as a work lease's do: `at` is written by `$currentDate`, the lease lasts `ms`,
/// and it has lapsed when `at + ms` is at or before the server's `localTime` (read with
/// `hello` only when a holder is found). Records of earlier versions, with an `until`
/// of the writer's clock, are judged by it.
pub(crate) async fn processed_reserve(
    inner: &Inner,
    consumer: &str,
    id: &str,
    owner: &str,
    lease: Duration,
) -> Result<Reservation> {
    let key = doc! { "consumer": consumer, "messageId": id };
    let mut unstamped = key.clone();
    unstamped.insert("at", doc! { "$exists": false });
    let inserted = inner
        .processed
        .update_one(
            unstamped,
            doc! {
                "$setOnInsert": { "state": "running", "owner": owner, "ms": millis(lease) },
                "$currentDate": { "at": true },
            },
        )
        .upsert(true)
        .await;
    match inserted {
        Ok(outcome) if outcome.upserted_id.is_some() => return Ok(Reservation::Reserved),
        Ok(_) => {}
        Err(e) if code(&e) == Some(DUPLICATE_KEY) => {}
        Err(e) => return Err(to_error(e)),
    }
    let Some(existing) = inner
        .processed
        .find_one(key.clone())
        .await
        .map_err(to_error)?
    else {
        // Released between our insert and our read: the caller tries again.
        return Ok(Reservation::Busy);
    };
    if existing.get_str("state") != Ok("running") {
        return Ok(Reservation::Done(
            existing.get_document("result").ok().cloned(),
        ));
    }
    let at = existing.get_datetime("at").ok().copied();
    let ends = match (at, lease_ms(&existing)) {
        (Some(at), Some(ms)) => Some(bson::DateTime::from_millis(
            at.timestamp_millis().saturating_add(ms),
        )),
        _ => existing.get_datetime("until").ok().copied(),
    };
    let lapsed = existing.get_str("owner") == Ok(owner)
        || match ends {
            None => true,
            Some(ends) => ends <= server_now(inner).await?,
        };
    if !lapsed {
        return Ok(Reservation::Busy);
    }
    // Taken over only if the record is still the one judged.
    let mut filter = key;
    filter.insert("state", "running");
    if let Some(at) = at {
        filter.insert("at", at);
    }
    if let Ok(holder) = existing.get_str("owner") {
        filter.insert("owner", holder);
    }
    let taken = inner
        .processed
        .update_one(
            filter,
            doc! {
                "$set": { "owner": owner, "ms": millis(lease) },
                "$currentDate": { "at": true },
                "$unset": { "until": "" },
            },
        )
        .await
        .map_err(to_error)?;
    Ok(if taken.matched_count == 1 {
        Reservation::Reserved
    } else {
        Reservation::Busy
    })
}

/// A reservation's lease in milliseconds (`ms`, an int64 or an int32).
fn lease_ms(record: &Document) -> Option<i64> {
    match record.get("ms")? {
        Bson::Int64(ms) => Some(*ms),
        Bson::Int32(ms) => Some(i64::from(*ms)),
        _ => None,
    }
}

/// The server's clock now (`hello`'s `localTime`); this client's for a server that does
/// not say.
async fn server_now(inner: &Inner) -> Result<bson::DateTime> {
    let hello = inner
        .db
        .run_command(doc! { "hello": 1 })
        .await
        .map_err(to_error)?;
    Ok(hello
        .get_datetime("localTime")
        .ok()
        .copied()
        .unwrap_or_else(bson::DateTime::now))
}

pub(crate) async fn processed_complete(
    inner: &Inner,
    consumer: &str,
    id: &str,
    owner: &str,
    result: Option<Document>,
) -> Result<()> {
    let mut set = doc! { "state": "done" };
    if let Some(result) = result {
        set.insert("result", result);
    }
    let updated = inner
        .processed
        .update_one(
            doc! { "consumer": consumer, "messageId": id, "owner": owner, "state": "running" },
            doc! { "$set": set, "$unset": { "until": "", "ms": "" }, "$currentDate": { "at": true } },
        )
        .await
        .map_err(to_error)?;
    if updated.matched_count == 1 {
        return Ok(());
    }
    // Not this owner's running reservation: done by this owner already (a retried
    // completion whose first answer was lost), or taken over after its lease lapsed.
    let mine = inner
        .processed
        .count_documents(
            doc! { "consumer": consumer, "messageId": id, "owner": owner, "state": "done" },
        )
        .await
        .map_err(to_error)?;
    if mine == 1 {
        return Ok(());
    }
    Err(crate::Error::ReservationLost {
        consumer: consumer.to_string(),
        id: id.to_string(),
    })
}

pub(crate) async fn processed_release(
    inner: &Inner,
    consumer: &str,
    id: &str,
    owner: &str,
) -> Result<()> {
    inner
        .processed
        .delete_one(
            doc! { "consumer": consumer, "messageId": id, "owner": owner, "state": "running" },
        )
        .await
        .map_err(to_error)?;
    Ok(())
}
