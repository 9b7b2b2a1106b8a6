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
use super::{decode_message, Inner};
use crate::error::Result;
use crate::medium::{ClaimRequest, DeadLetter, Reservation, Settlement};
use crate::message::{now_nanos, Message};

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// When a lease ends, as a server-side expression: `at` plus `ms` milliseconds.
pub(crate) fn lease_end() -> Document {
    doc! { "$dateAdd": { "startDate": "$lease.at", "unit": "millisecond", "amount": "$lease.ms" } }
}

fn decode_claimed(document: Document) -> Result<Message> {
    decode_message(&document).map_err(|reason| crate::Error::Medium {
        medium: "db",
        reason: format!("claimed work is not a readable message: {reason}"),
    })
}

/// What a worker of `service` may claim: its pending work for `actions`, not held by a
/// live lease. The equality on the claim index's fields is a clause of its own in an
/// `$and`: the same query for mongod, which flattens `$and` into one conjunction, and
/// one that the Rust test server answers from the claim index instead of examining
/// every document of the service.
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

pub(crate) async fn claim(inner: &Inner, request: &ClaimRequest) -> Result<Option<Message>> {
    let filter = claim_filter(&request.service, &request.actions);
    let update = doc! {
        "$set": { "lease.owner": &request.owner, "lease.ms": millis(request.lease) },
        "$currentDate": { "lease.at": true },
        "$inc": { "attempts": 1 },
    };
    let claimed = inner
        .messages
        .find_one_and_update(filter, update)
        .sort(doc! { "priority": -1, "ts": 1 })
        .return_document(ReturnDocument::After)
        .await
        .map_err(to_error)?;
    claimed.map(decode_claimed).transpose()
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
            inner
                .messages
                .update_one(filter, doc! { "$set": set, "$unset": { "lease": "" } })
                .await
        }
        Settlement::Failed(error) => {
            let set = doc! { "state": "error", "response": error, "response_ts": now_nanos() };
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
    let buried = inner
        .messages
        .find_one_and_update(
            doc! { "_id": id, "state": "pending", "lease.owner": owner },
            doc! {
                "$set": { "state": "error", "response": { "error": reason, "dead": true }, "response_ts": now_nanos() },
                "$unset": { "lease": "" },
            },
        )
        .return_document(ReturnDocument::After)
        .await
        .map_err(to_error)?;
    match buried {
        Some(document) => {
            inner.dead_letter(document, reason.to_string()).await;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Outcome waiters of this process, woken by `update` events of the shared stream.
#[derive(Default)]
pub(crate) struct Waiters {
    by_id: std::sync::Mutex<std::collections::HashMap<String, Arc<Notify>>>,
}

impl Waiters {
    fn register(&self, id: &str) -> Arc<Notify> {
        let mut map = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(id.to_string()).or_default())
    }

    fn unregister(&self, id: &str) {
        self.by_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    pub(crate) fn wake(&self, id: &str) {
        if let Some(notify) = self.by_id.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            notify.notify_waiters();
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
) -> Result<Option<Message>> {
    let notify = inner.waiters.register(id);
    let outcome = wait(inner, id, timeout, &notify).await;
    inner.waiters.unregister(id);
    outcome
}

async fn wait(
    inner: &Inner,
    id: &str,
    timeout: Duration,
    notify: &Notify,
) -> Result<Option<Message>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // Listen before reading, so an update between the read and the wait wakes us.
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(document) = inner
            .messages
            .find_one(doc! { "_id": id })
            .await
            .map_err(to_error)?
        {
            if document.get_str("state").is_ok_and(|s| s != "pending") {
                return decode_message(&document).map(Some).map_err(|reason| {
                    crate::Error::Medium {
                        medium: "db",
                        reason: format!("request {id} is unreadable: {reason}"),
                    }
                });
            }
        }
        let recheck = tokio::time::Instant::now() + OUTCOME_RECHECK;
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Ok(None),
            _ = inner.closed.cancelled() => return Err(crate::Error::Shutdown),
            _ = tokio::time::sleep_until(recheck.min(deadline)) => {}
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

/// Reserves (consumer, message id): an insert, so two instances racing for the same
/// message get one winner (the unique index on {consumer, messageId} answers 11000 to
/// the other). The loser reads the record: done → its result; a live lease → busy; a
/// lapsed lease (the holder died) → a conditional take-over. Lease times come from this
/// client's clock (an insert cannot use `$$NOW`): keep leases well above clock skew.
pub(crate) async fn processed_reserve(
    inner: &Inner,
    consumer: &str,
    id: &str,
    owner: &str,
    lease: Duration,
) -> Result<Reservation> {
    let now = bson::DateTime::now();
    let until = bson::DateTime::from_millis(now.timestamp_millis().saturating_add(millis(lease)));
    let record = doc! { "consumer": consumer, "messageId": id, "state": "running", "owner": owner, "until": until, "at": now };
    match inner.processed.insert_one(record).await {
        Ok(_) => return Ok(Reservation::Reserved),
        Err(e) if code(&e) == Some(DUPLICATE_KEY) => {}
        Err(e) => return Err(to_error(e)),
    }
    let key = doc! { "consumer": consumer, "messageId": id };
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
    let held_until = existing.get_datetime("until").ok().copied();
    if existing.get_str("owner") == Ok(owner) || held_until.is_none_or(|u| u <= now) {
        let mut filter = key;
        filter.insert("state", "running");
        if let Some(u) = held_until {
            filter.insert("until", u);
        }
        let taken = inner
            .processed
            .update_one(filter, doc! { "$set": { "owner": owner, "until": until } })
            .await
            .map_err(to_error)?;
        if taken.matched_count == 1 {
            return Ok(Reservation::Reserved);
        }
    }
    Ok(Reservation::Busy)
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
    inner
        .processed
        .update_one(
            doc! { "consumer": consumer, "messageId": id, "owner": owner, "state": "running" },
            doc! { "$set": set, "$unset": { "until": "" }, "$currentDate": { "at": true } },
        )
        .await
        .map_err(to_error)?;
    Ok(())
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
