//! The work queues as an operator sees them: counts per (service, action) and purging.
//!
//! Why it exists: the gateway's `GET /queues` and `DELETE /queues/…` show
//! and clear the work of each action. A queue is not a collection: it is the
//! `delivery: one` messages of one `serviceNameDest` and `action` in the messages
//! collection, plus their dead letters in `dead`.
//!
//! Rules relied on:
//! - A lease is `{owner, at, ms}` and ends at `$dateAdd(at, ms)` (see `work.rs`),
//!   compared with `$$NOW`, the server's clock, as the claim does: a purge must never
//!   take work a worker still holds because this client's clock runs ahead.
//! - `$dateAdd` of a missing `lease.at` is null, and null sorts below every date in
//!   BSON comparison order, so `$gt: [null, $$NOW]` is false: unleased work counts as
//!   waiting.
//! - `updateMany` is not a retryable write: a purge interrupted by a network error may
//!   have purged part of the queue; running it again purges the rest.

use std::collections::BTreeMap;

use bson::{doc, Bson, Document};
use futures::TryStreamExt;

use super::errors::to_error;
use super::work::lease_end;
use super::Inner;
use crate::error::Result;
use crate::medium::QueueStats;
use crate::message::now_nanos;

/// Held by a worker whose lease has not run out by the server's clock.
fn held() -> Document {
    doc! { "$and": [
        { "$ne": ["$lease.owner", "backoff"] },
        { "$gt": [lease_end(), "$$NOW"] },
    ] }
}

fn count(value: Option<&Bson>) -> u64 {
    match value {
        Some(Bson::Int32(n)) => u64::try_from(*n).unwrap_or(0),
        Some(Bson::Int64(n)) => u64::try_from(*n).unwrap_or(0),
        Some(Bson::Double(n)) if *n >= 0.0 => *n as u64,
        _ => 0,
    }
}

/// The (service, action) of a `$group` key, when both are strings.
fn key(row: &Document) -> Option<(String, String)> {
    let id = row.get_document("_id").ok()?;
    Some((
        id.get_str("service").ok()?.to_string(),
        id.get_str("action").ok()?.to_string(),
    ))
}

fn queue(
    rows: &mut BTreeMap<(String, String), QueueStats>,
    (service, action): (String, String),
) -> &mut QueueStats {
    rows.entry((service.clone(), action.clone()))
        .or_insert_with(|| QueueStats::new(service, action))
}

pub(crate) async fn queues(inner: &Inner) -> Result<Vec<QueueStats>> {
    let pending: Vec<Document> = inner
        .messages
        .aggregate(vec![
            doc! { "$match": { "delivery": "one", "state": "pending" } },
            doc! { "$group": {
                "_id": { "service": "$serviceNameDest", "action": "$action" },
                "inFlight": { "$sum": { "$cond": [held(), 1, 0] } },
                "total": { "$sum": 1 },
            } },
        ])
        .await
        .map_err(to_error)?
        .try_collect()
        .await
        .map_err(to_error)?;
    let dead: Vec<Document> = inner
        .dead
        .aggregate(vec![
            doc! { "$match": { "document.delivery": "one" } },
            doc! { "$group": {
                "_id": { "service": "$document.serviceNameDest", "action": "$document.action" },
                "n": { "$sum": 1 },
            } },
        ])
        .await
        .map_err(to_error)?
        .try_collect()
        .await
        .map_err(to_error)?;
    let mut rows: BTreeMap<(String, String), QueueStats> = BTreeMap::new();
    for row in &pending {
        let Some(k) = key(row) else { continue };
        let q = queue(&mut rows, k);
        q.in_flight = count(row.get("inFlight"));
        q.depth = count(row.get("total")).saturating_sub(q.in_flight);
    }
    for row in &dead {
        let Some(k) = key(row) else { continue };
        queue(&mut rows, k).dead = count(row.get("n"));
    }
    Ok(rows.into_values().collect())
}

pub(crate) async fn purge(inner: &Inner, service: &str, action: &str) -> Result<u64> {
    let filter = doc! {
        "serviceNameDest": service,
        "action": action,
        "delivery": "one",
        "state": "pending",
        "$or": [
            { "lease": Bson::Null },
            { "lease.owner": "backoff" },
            { "$expr": { "$lte": [lease_end(), "$$NOW"] } },
        ],
    };
    let update = doc! {
        "$set": {
            "state": "error",
            "response": { "error": "purged", "purged": true },
            "response_ts": now_nanos(),
        },
        "$unset": { "lease": "" },
    };
    let result = inner
        .messages
        .update_many(filter, update)
        .await
        .map_err(to_error)?;
    tracing::info!(
        service,
        action,
        purged = result.modified_count,
        "queue purged"
    );
    Ok(result.modified_count)
}
