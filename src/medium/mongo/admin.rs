//! What the admin tool reads from a MongoDB deployment: counts and lag (`intracom stats`)
//! and the health checks of `intracom doctor`.

use bson::{doc, Bson, Document, Timestamp};
use futures::TryStreamExt;

use super::errors::{code, to_error};
use super::setup::{message_validator, ttl_seconds};
use super::{hub, Following, MongoMedium};
use crate::config::Retention;
use crate::error::Result;

/// Counts over the messages collection and the lag of each named subscription.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Messages retained.
    pub total: u64,
    /// By sending service, largest first.
    pub by_service: Vec<(String, u64)>,
    /// By action, largest first.
    pub by_action: Vec<(String, u64)>,
    /// By type.
    pub by_type: Vec<(String, u64)>,
    /// By request/work state.
    pub by_state: Vec<(String, u64)>,
    /// Pending work (`delivery: one`, `state: pending`).
    pub queue_depth: u64,
    /// Dead letters.
    pub dead: u64,
    /// Named subscriptions: name, messages behind, seconds behind the newest message.
    pub lag: Vec<(String, u64, u64)>,
}

/// One check of `intracom doctor`.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it is as intracom needs it.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do about it, when not ok.
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &str, detail: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

fn counts(facet: &Document, name: &str) -> Vec<(String, u64)> {
    facet
        .get_array(name)
        .map(|rows| {
            rows.iter()
                .filter_map(Bson::as_document)
                .map(|row| {
                    let key = match row.get("_id") {
                        Some(Bson::String(s)) => s.clone(),
                        Some(Bson::Null) | None => "(none)".into(),
                        Some(other) => other.to_string(),
                    };
                    (key, number(row.get("n")))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn number(value: Option<&Bson>) -> u64 {
    match value {
        Some(Bson::Int32(n)) => u64::try_from(*n).unwrap_or(0),
        Some(Bson::Int64(n)) => u64::try_from(*n).unwrap_or(0),
        Some(Bson::Double(n)) => *n as u64,
        _ => 0,
    }
}

/// The messages after a checkpoint, in the bus's `(ts, _id)` order: a stamp is not
/// unique to one message (the shards of a cluster each tick their own clock, and some
/// servers stamp every write of a second alike), so the messages that share the
/// checkpoint's stamp count by their id. A checkpoint without the message's id (made by
/// hand) counts by its stamp alone.
fn after_position(ts: Timestamp, id: Option<&Bson>) -> Document {
    match id {
        Some(id) => doc! { "$or": [
            { "ts": { "$gt": ts } },
            { "ts": ts, "_id": { "$gt": id.clone() } },
        ] },
        None => doc! { "ts": { "$gt": ts } },
    }
}

impl MongoMedium {
    /// Counts by service, action, type and state, the queue depth, the dead letters, and
    /// each named subscription's lag. The lag in messages counts every message after
    /// the checkpoint in `(ts, _id)` order, whatever the subscription's filter.
    pub async fn admin_stats(&self) -> Result<Stats> {
        let inner = &self.inner;
        let pipeline = vec![doc! { "$facet": {
            "total": [{ "$count": "n" }],
            "byService": [{ "$group": { "_id": "$serviceNameSource", "n": { "$sum": 1 } } }, { "$sort": { "n": -1 } }],
            "byAction": [{ "$group": { "_id": "$action", "n": { "$sum": 1 } } }, { "$sort": { "n": -1 } }],
            "byType": [{ "$group": { "_id": "$type", "n": { "$sum": 1 } } }, { "$sort": { "n": -1 } }],
            "byState": [{ "$match": { "state": { "$exists": true } } }, { "$group": { "_id": "$state", "n": { "$sum": 1 } } }],
            "queue": [{ "$match": { "delivery": "one", "state": "pending" } }, { "$count": "n" }],
            "newest": [{ "$sort": { "ts": -1 } }, { "$limit": 1 }, { "$project": { "ts": 1 } }],
        } }];
        let facet: Document = inner
            .messages
            .aggregate(pipeline)
            .await
            .map_err(to_error)?
            .try_next()
            .await
            .map_err(to_error)?
            .unwrap_or_default();
        let first = |name: &str| {
            facet
                .get_array(name)
                .ok()
                .and_then(|a| a.first())
                .and_then(Bson::as_document)
                .cloned()
                .unwrap_or_default()
        };
        let newest = first("newest").get_timestamp("ts").ok();
        let mut stats = Stats {
            total: number(first("total").get("n")),
            by_service: counts(&facet, "byService"),
            by_action: counts(&facet, "byAction"),
            by_type: counts(&facet, "byType"),
            by_state: counts(&facet, "byState"),
            queue_depth: number(first("queue").get("n")),
            dead: inner
                .dead
                .count_documents(doc! {})
                .await
                .map_err(to_error)?,
            lag: Vec::new(),
        };
        let checkpoints: Vec<Document> = inner
            .checkpoints
            .find(doc! {})
            .await
            .map_err(to_error)?
            .try_collect()
            .await
            .map_err(to_error)?;
        for checkpoint in checkpoints {
            let name = checkpoint.get_str("_id").unwrap_or("?").to_string();
            let Ok(position) = checkpoint.get_document("position") else {
                continue;
            };
            let Ok(ts) = position.get_timestamp("ts") else {
                continue;
            };
            let id = position
                .get_document("token")
                .ok()
                .and_then(|token| token.get("id"));
            let behind = inner
                .messages
                .count_documents(after_position(ts, id))
                .await
                .map_err(to_error)?;
            let seconds = newest
                .map(|n: Timestamp| u64::from(n.time.saturating_sub(ts.time)))
                .unwrap_or(0);
            stats.lag.push((name, behind, seconds));
        }
        Ok(stats)
    }

    /// Checks a deployment against what intracom needs, each with a fix when it fails.
    pub async fn doctor(&self) -> Vec<Check> {
        let inner = &self.inner;
        let cfg = &inner.db_config;
        let mut checks = Vec::new();

        checks.push(match self.following {
            Following::ChangeStreams => Check::pass("topology", "replica set or sharded cluster: change streams available"),
            _ => Check::fail(
                "topology",
                "standalone server: subscribers poll by ts",
                "run MongoDB as a replica set (one node is enough: --replSet rs0 then rs.initiate())",
            ),
        });

        if self.following == Following::ChangeStreams {
            checks.push(match hub::open(
                inner,
                hub::hub_pipeline(&hub::Selection::probe(cfg.hub_selection)),
                None,
            ).await {
                Ok(stream) => {
                    drop(stream);
                    Check::pass("change streams", "a change stream opens on the messages collection")
                }
                Err(e) => Check::fail(
                    "change streams",
                    format!("cannot open a change stream: {e}"),
                    "grant the `changeStream` and `find` actions on the database to the connecting user",
                ),
            });
        }

        match inner
            .db
            .run_command(doc! { "listIndexes": &cfg.messages })
            .await
        {
            Ok(reply) => {
                let indexes: Vec<Document> = reply
                    .get_document("cursor")
                    .and_then(|c| c.get_array("firstBatch"))
                    .map(|b| b.iter().filter_map(Bson::as_document).cloned().collect())
                    .unwrap_or_default();
                let named = |n: &str| indexes.iter().find(|i| i.get_str("name") == Ok(n)).cloned();
                for name in ["ts_1__id_1", "work_claim"] {
                    checks.push(match named(name) {
                        Some(_) => Check::pass(&format!("index {name}"), "present"),
                        None => Check::fail(
                            &format!("index {name}"),
                            "missing",
                            "start any intracom service once: it creates missing indexes",
                        ),
                    });
                }
                if cfg.retention == Retention::Ttl {
                    let wanted = ttl_seconds(inner.timeout_ms);
                    let found = named("at_ttl")
                        .and_then(|i| i.get("expireAfterSeconds").map(|v| number(Some(v)) as i64));
                    checks.push(match found {
                        Some(s) if s == wanted => Check::pass("retention", format!("TTL index on `at`: {s} s, as common.intracom.timeout_ms says")),
                        Some(s) => Check::fail(
                            "retention",
                            format!("TTL index expires after {s} s, config says {wanted} s"),
                            "start a service with the new common.intracom.timeout_ms: it applies it with collMod",
                        ),
                        None => Check::fail("retention", "no TTL index on `at`", "start any intracom service once: it creates it"),
                    });
                }
            }
            Err(e) => checks.push(Check::fail(
                "indexes",
                format!("cannot list indexes: {e}"),
                "check the URI, database name and the user's rights",
            )),
        }

        match inner
            .db
            .run_command(doc! { "listCollections": 1, "filter": { "name": &cfg.messages } })
            .await
        {
            Ok(reply) => {
                let options = reply
                    .get_document("cursor")
                    .and_then(|c| c.get_array("firstBatch"))
                    .ok()
                    .and_then(|b| b.first())
                    .and_then(Bson::as_document)
                    .and_then(|c| c.get_document("options").ok())
                    .cloned()
                    .unwrap_or_default();
                let capped = options.get_bool("capped").unwrap_or(false);
                if cfg.retention == Retention::Capped {
                    checks.push(if capped {
                        Check::pass("retention", "capped collection, as configured")
                    } else {
                        Check::fail(
                            "retention",
                            "configured capped, the collection is not",
                            "use a new collection name (common.intracom.db.collection.messages)",
                        )
                    });
                }
                let wanted = message_validator();
                checks.push(match options.get_document("validator") {
                    Ok(found) if *found == wanted => {
                        Check::pass("validator", "the $jsonSchema of this version")
                    }
                    Ok(_) => Check::fail(
                        "validator",
                        "a different validator",
                        "start a service of this version: it updates the validator with collMod",
                    ),
                    Err(_) => Check::fail(
                        "validator",
                        "none",
                        "start any intracom service once: it sets the validator",
                    ),
                });
            }
            Err(e) => checks.push(Check::fail(
                "validator",
                format!("cannot read collection options: {e}"),
                "check the user's rights",
            )),
        }

        if self.following == Following::ChangeStreams {
            checks.push(oplog_window(self, inner.timeout_ms).await);
        }
        checks
    }
}

/// The oplog window against the retention: a subscriber stopped longer than the window
/// cannot resume from its token and catches up by scanning the collection instead.
///
/// The window is judged only when it means something: an oplog that has not filled up
/// yet holds everything since the deployment began, so its span says nothing about how
/// much it can hold. Rules relied on:
/// - the oldest entry is the first in natural order (`sort({$natural: 1})`);
/// - the newest write is `hello.lastWrite.opTime` on a replica-set member (cheap, and
///   answered alike by every server; a `$natural: -1` read is not);
/// - a capped oplog reports its `size` and `maxSize` in `$collStats.storageStats`.
async fn oplog_window(medium: &MongoMedium, timeout_ms: u64) -> Check {
    const NAME: &str = "oplog window";
    let client = medium.inner.db.client();
    let oplog = client.database("local").collection::<Document>("oplog.rs");
    let first = match oplog
        .find_one(doc! {})
        .sort(doc! { "$natural": 1 })
        .projection(doc! { "ts": 1 })
        .await
    {
        Ok(Some(first)) => first,
        Ok(None) => return Check::fail(NAME, "empty oplog", "is this a replica set member?"),
        Err(e) if code(&e) == Some(13) => {
            return Check::fail(
                NAME,
                "not allowed to read local.oplog.rs",
                "grant the clusterMonitor role to check it",
            )
        }
        Err(e) => {
            return Check::fail(
                NAME,
                format!("cannot read the oplog: {e}"),
                "check the user's rights",
            )
        }
    };
    let newest = match client
        .database("admin")
        .run_command(doc! { "hello": 1 })
        .await
    {
        Ok(hello) => hello
            .get_document("lastWrite")
            .and_then(|w| w.get_document("opTime"))
            .and_then(|t| t.get_timestamp("ts"))
            .ok(),
        Err(_) => None,
    };
    let (Ok(oldest), Some(newest)) = (first.get_timestamp("ts"), newest) else {
        return Check::fail(
            NAME,
            "no oplog time found (oldest entry's ts, hello.lastWrite.opTime)",
            "check that this is a replica set member",
        );
    };
    let window = u64::from(newest.time.saturating_sub(oldest.time));
    let retention = timeout_ms / 1000;
    if window >= retention {
        return Check::pass(
            NAME,
            format!("{window} s of history, retention {retention} s"),
        );
    }
    match oplog_fill(&oplog).await {
        Some((size, max)) if size.saturating_mul(10) >= max.saturating_mul(9) => Check::fail(
            NAME,
            format!("{window} s of history in a full oplog ({size} of {max} bytes), shorter than the retention of {retention} s: a subscriber stopped longer than the window catches up by scanning"),
            "raise the oplog size (replSetResizeOplog) or its minimum retention (oplogMinRetentionHours)",
        ),
        Some((size, max)) => Check::pass(
            NAME,
            format!("{window} s of history so far; the oplog is not full yet ({size} of {max} bytes), so it holds everything since it began"),
        ),
        None => Check::pass(
            NAME,
            format!("{window} s of history so far; the server does not report the oplog's capacity, so whether it holds the retention of {retention} s cannot be judged yet"),
        ),
    }
}

/// The oplog's size and maximum size in bytes, when the server reports them.
async fn oplog_fill(oplog: &mongodb::Collection<Document>) -> Option<(u64, u64)> {
    let mut cursor = oplog
        .aggregate(vec![doc! { "$collStats": { "storageStats": {} } }])
        .await
        .ok()?;
    let stats = cursor.try_next().await.ok()??;
    let storage = stats.get_document("storageStats").ok()?;
    let number = |key: &str| match storage.get(key) {
        Some(Bson::Int32(n)) => u64::try_from(*n).ok(),
        Some(Bson::Int64(n)) => u64::try_from(*n).ok(),
        Some(Bson::Double(n)) if *n >= 0.0 => Some(*n as u64),
        _ => None,
    };
    let max = number("maxSize").filter(|m| *m > 0)?;
    Some((number("size")?, max))
}
