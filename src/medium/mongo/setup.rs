//! Start-up: create what is missing, leave what exists, apply retention changes.
//!
//! Rules relied on (MongoDB manual):
//! - `create` fails with 48 (NamespaceExists) when the collection exists: not an error
//!   here, two processes may start at once.
//! - A TTL index needs a Date field (`at`); the TTL monitor deletes about every 60 s.
//!   `collMod` with `index: {keyPattern, expireAfterSeconds}` changes the expiry in
//!   place (converting a non-TTL index needs 5.1+).
//! - A capped collection cannot take a TTL index, and a collection cannot switch
//!   between capped and TTL in place: a mismatch is reported, not "fixed".
//! - `collMod` with `validator` replaces the validator of an existing collection.

use bson::{doc, Bson, Document};

use super::errors::{
    code, to_error, INDEX_KEY_SPECS_CONFLICT, INDEX_OPTIONS_CONFLICT, NAMESPACE_EXISTS,
};
use super::Inner;
use crate::config::Retention;
use crate::error::{Error, Result};

/// The `$jsonSchema` validator of the messages collection: what a consumer needs to
/// read a message. A hand-written insert missing these fields is refused by the server.
pub fn message_validator() -> Document {
    doc! {
        "$jsonSchema": {
            "bsonType": "object",
            "required": ["_id", "ts", "at", "serviceNameSource", "instanceSource", "type", "action", "query", "query_ts"],
            "properties": {
                "_id": { "bsonType": "string", "minLength": 1 },
                "ts": { "bsonType": "timestamp" },
                "at": { "bsonType": "date" },
                "serviceNameSource": { "bsonType": "string", "minLength": 1 },
                "instanceSource": { "bsonType": "string", "minLength": 1 },
                "serviceNameDest": { "bsonType": ["string", "null"] },
                "instanceDest": { "bsonType": "string" },
                "type": { "enum": ["broadcast", "fire_and_forget", "async", "sync", "response"] },
                "delivery": { "enum": ["all", "one"] },
                "action": { "bsonType": "string", "minLength": 1 },
                "query": { "bsonType": "object" },
                "queryId": { "bsonType": "string" },
                "state": { "enum": ["pending", "done", "error"] },
                "query_ts": { "bsonType": ["long", "int"] },
                "priority": { "bsonType": "int" },
                "attempts": { "bsonType": "int" },
                "lease": {
                    "bsonType": "object",
                    "required": ["owner", "at", "ms"],
                    "properties": {
                        "owner": { "bsonType": "string" },
                        "at": { "bsonType": "date" },
                        "ms": { "bsonType": ["long", "int"] },
                    },
                },
                // The publisher's W3C trace context (crate::trace).
                "trace": {
                    "bsonType": "object",
                    "required": ["traceparent"],
                    "properties": {
                        "traceparent": { "bsonType": "string", "minLength": 55 },
                        "tracestate": { "bsonType": "string" },
                    },
                },
            }
        }
    }
}

/// The TTL in whole seconds for a retention in milliseconds (rounded up, at least 1).
pub(crate) fn ttl_seconds(timeout_ms: u64) -> i64 {
    i64::try_from(timeout_ms.div_ceil(1000).max(1)).unwrap_or(i64::MAX)
}

pub(crate) async fn ensure(inner: &Inner) -> Result<()> {
    let cfg = &inner.db_config;
    let existing = list_collections(inner).await?;
    let messages_spec = existing
        .iter()
        .find(|c| c.get_str("name") == Ok(cfg.messages.as_str()));

    let capped_now = messages_spec
        .and_then(|c| c.get_document("options").ok())
        .map(|o| o.get_bool("capped").unwrap_or(false));
    match (capped_now, inner.db_config.retention) {
        (None, Retention::Ttl) => {
            create(inner, doc! { "create": &cfg.messages, "validator": message_validator(), "validationLevel": "strict" }).await?;
        }
        (None, Retention::Capped) => {
            create(
                inner,
                doc! {
                    "create": &cfg.messages,
                    "capped": true,
                    "size": i64::try_from(cfg.capped_bytes).unwrap_or(i64::MAX),
                    "validator": message_validator(),
                    "validationLevel": "strict",
                },
            )
            .await?;
        }
        (Some(capped), wanted) => {
            if capped != (wanted == Retention::Capped) {
                return Err(Error::config(
                    "common.intracom.db.retention",
                    if wanted == Retention::Capped { "capped" } else { "ttl" },
                    format!(
                        "collection `{}` is {}; retention cannot switch in place: use a new collection (common.intracom.db.collection.messages)",
                        cfg.messages,
                        if capped { "capped" } else { "not capped" }
                    ),
                ));
            }
            // Keep the validator in step with this version of intracom.
            command(inner, doc! { "collMod": &cfg.messages, "validator": message_validator(), "validationLevel": "strict" }).await?;
        }
    }

    let mut indexes = vec![
        // Scans read by `(ts, _id)`: `ts` is unique per node, not across shards.
        doc! { "key": { "ts": 1, "_id": 1 }, "name": "ts_1__id_1" },
        // The claim: a service's pending work, highest priority first, then oldest.
        doc! {
            "key": { "serviceNameDest": 1, "state": 1, "priority": -1, "ts": 1 },
            "name": "work_claim",
            "partialFilterExpression": { "delivery": "one" },
        },
    ];
    if inner.db_config.retention == Retention::Ttl {
        indexes.push(doc! { "key": { "at": 1 }, "name": "at_ttl", "expireAfterSeconds": ttl_seconds(inner.timeout_ms) });
    }
    create_indexes(inner, &cfg.messages, indexes).await?;

    for name in [&cfg.config, &cfg.checkpoints, &cfg.processed, &cfg.dead] {
        if !existing
            .iter()
            .any(|c| c.get_str("name") == Ok(name.as_str()))
        {
            create(inner, doc! { "create": name }).await?;
        }
    }
    create_indexes(
        inner,
        &cfg.config,
        vec![doc! { "key": { "type": 1 }, "name": "type_1" }],
    )
    .await?;
    create_indexes(
        inner,
        &cfg.processed,
        vec![
            doc! { "key": { "consumer": 1, "messageId": 1 }, "name": "consumer_message", "unique": true },
            doc! { "key": { "at": 1 }, "name": "at_ttl", "expireAfterSeconds": ttl_seconds(inner.timeout_ms) },
        ],
    )
    .await?;
    create_indexes(
        inner,
        &cfg.dead,
        vec![doc! { "key": { "at": 1 }, "name": "at_1" }],
    )
    .await?;
    Ok(())
}

async fn list_collections(inner: &Inner) -> Result<Vec<Document>> {
    let reply = command(inner, doc! { "listCollections": 1, "cursor": {} }).await?;
    let batch = reply
        .get_document("cursor")
        .and_then(|c| c.get_array("firstBatch"))
        .map_err(|e| {
            Error::refused(
                "db",
                format!("listCollections reply without cursor.firstBatch: {e}"),
            )
        })?;
    Ok(batch
        .iter()
        .filter_map(|b| match b {
            Bson::Document(d) => Some(d.clone()),
            _ => None,
        })
        .collect())
}

async fn create(inner: &Inner, cmd: Document) -> Result<()> {
    match inner.db.run_command(cmd).await {
        Ok(_) => Ok(()),
        Err(e) if code(&e) == Some(NAMESPACE_EXISTS) => Ok(()),
        Err(e) => Err(to_error(e)),
    }
}

/// Creates each index (a no-op when it exists as specified). A TTL index that exists
/// with another expiry is changed in place with `collMod`.
async fn create_indexes(inner: &Inner, collection: &str, indexes: Vec<Document>) -> Result<()> {
    for index in indexes {
        let cmd = doc! { "createIndexes": collection, "indexes": [index.clone()] };
        match inner.db.run_command(cmd).await {
            Ok(_) => {}
            Err(e)
                if matches!(
                    code(&e),
                    Some(INDEX_OPTIONS_CONFLICT | INDEX_KEY_SPECS_CONFLICT)
                ) =>
            {
                let (Ok(seconds), Ok(key)) = (
                    index.get_i64("expireAfterSeconds"),
                    index.get_document("key"),
                ) else {
                    return Err(to_error(e));
                };
                tracing::info!(
                    collection,
                    expire_after_seconds = seconds,
                    "retention changed: collMod on the TTL index"
                );
                command(inner, doc! { "collMod": collection, "index": { "keyPattern": key.clone(), "expireAfterSeconds": seconds } }).await?;
            }
            Err(e) => return Err(to_error(e)),
        }
    }
    Ok(())
}

pub(crate) async fn command(inner: &Inner, cmd: Document) -> Result<Document> {
    inner.db.run_command(cmd).await.map_err(to_error)
}
