//! The MongoDB medium against a scripted wire-protocol peer: the commands it sends
//! and how it handles the server's answers. Runs in every CI run; no server needed.

mod support;

use std::time::Duration;

use futures::StreamExt;
use intracom::bson::{doc, Bson, Document, Timestamp};
use intracom::{Config, Error, Intracom, Message, PublishStatus, Subscription};
use support::peer::{cursor_reply, error, insert_event, ok, stored_message, Peer, Reply};

const GUARD: Duration = Duration::from_secs(30);

fn config(peer: &Peer) -> Config {
    Config::builder()
        .mongodb(peer.uri(), "intracom")
        .service("billing")
        .instance("billing-1")
        .timeout_ms(300_000)
        .set("common.intracom.db.safety_window_ms", "2000")
        .set("common.intracom.db.poll_interval_ms", "50")
        // The scripts answer one shared stream per process and evaluate no `$match`:
        // the stream that selects every insert. The targeted selection, which reopens
        // the stream as subscriptions come and go, is tested on the real servers
        // (tests/mongodb).
        .set("common.intracom.db.hub.selection", "everything")
        .build()
        .expect("config")
}

/// Scripts the catalog: an empty `config` collection and accepted registrations.
fn accept_catalog(peer: &Peer) {
    peer.on("find", |c| {
        (c.get_str("find") == Ok("config")).then(|| {
            Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "intracom.config", "firstBatch": [
                { "_id": "billing", "type": "service", "actions": ["reload", "invoice.created"] }
            ] }, "ok": 1 })
        })
    });
    peer.on("update", |c| {
        (c.get_str("update") == Ok("config"))
            .then(|| Reply::Doc(doc! { "n": 1, "nModified": 0, "ok": 1 }))
    });
}

async fn connect(peer: &Peer) -> Intracom {
    tokio::time::timeout(GUARD, Intracom::connect(config(peer)))
        .await
        .expect("connect within the guard")
        .expect("connect")
}

fn get<'a>(d: &'a Document, path: &str) -> &'a Bson {
    let mut cur = d;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        let v = cur.get(*p).unwrap_or_else(|| panic!("no `{path}` in {d}"));
        if i + 1 == parts.len() {
            return v;
        }
        cur = v
            .as_document()
            .unwrap_or_else(|| panic!("`{p}` is not a document in {d}"));
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_creates_collections_indexes_and_validator() {
    let peer = Peer::replica_set().await;
    peer.accept_setup();
    accept_catalog(&peer);
    let bus = connect(&peer).await;

    let creates = peer.commands_named("create");
    let messages = creates
        .iter()
        .find(|c| c.get_str("create") == Ok("messages"))
        .expect("messages created");
    let schema = get(messages, "validator.$jsonSchema")
        .as_document()
        .unwrap();
    let required: Vec<&str> = schema
        .get_array("required")
        .unwrap()
        .iter()
        .filter_map(|b| b.as_str())
        .collect();
    for field in [
        "_id",
        "ts",
        "at",
        "serviceNameSource",
        "instanceSource",
        "type",
        "action",
        "query",
    ] {
        assert!(
            required.contains(&field),
            "validator requires {field}: {required:?}"
        );
    }
    assert_eq!(
        get(schema, "properties.ts.bsonType"),
        &Bson::String("timestamp".into())
    );
    assert!(
        !messages.contains_key("capped"),
        "TTL retention: not capped"
    );
    for name in ["config", "checkpoints", "processed", "dead"] {
        assert!(
            creates.iter().any(|c| c.get_str("create") == Ok(name)),
            "{name} created"
        );
    }
    let indexes: Vec<Document> = peer
        .commands_named("createIndexes")
        .into_iter()
        .filter(|c| c.get_str("createIndexes") == Ok("messages"))
        .flat_map(|c| c.get_array("indexes").unwrap().clone())
        .filter_map(|b| b.as_document().cloned())
        .collect();
    let ttl = indexes
        .iter()
        .find(|i| i.get_str("name") == Ok("at_ttl"))
        .expect("TTL index");
    assert_eq!(ttl.get_document("key").unwrap(), &doc! { "at": 1 });
    assert_eq!(
        ttl.get_i64("expireAfterSeconds").unwrap(),
        300,
        "from common.intracom.timeout_ms"
    );
    assert!(
        indexes
            .iter()
            .any(|i| i.get_document("key") == Ok(&doc! { "ts": 1, "_id": 1 })),
        "index on (ts, _id), the order of scans"
    );
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_retention_is_applied_with_coll_mod() {
    let peer = Peer::replica_set().await;
    peer.always(
        "listCollections",
        doc! { "cursor": { "id": 0i64, "ns": "intracom.$cmd.listCollections", "firstBatch": [
            { "name": "messages", "type": "collection", "options": {} },
            { "name": "config", "type": "collection", "options": {} },
            { "name": "checkpoints", "type": "collection", "options": {} },
            { "name": "processed", "type": "collection", "options": {} },
            { "name": "dead", "type": "collection", "options": {} },
        ] }, "ok": 1 },
    );
    peer.always("collMod", ok());
    peer.on("createIndexes", |c| {
        let at_ttl = c
            .get_array("indexes")
            .ok()?
            .iter()
            .any(|i| i.as_document().and_then(|d| d.get_str("name").ok()) == Some("at_ttl"));
        (at_ttl && c.get_str("createIndexes") == Ok("messages")).then(|| {
            Reply::Doc(error(
                86,
                "IndexKeySpecsConflict",
                "An existing index has the same name as the requested index",
            ))
        })
    });
    peer.always("createIndexes", ok());
    accept_catalog(&peer);
    let bus = connect(&peer).await;
    assert!(
        peer.commands_named("create").is_empty(),
        "existing collections are left as they are"
    );
    let coll_mods = peer.commands_named("collMod");
    assert!(
        coll_mods.iter().any(|c| c.contains_key("validator")),
        "the validator is kept current"
    );
    let retention = coll_mods
        .iter()
        .find(|c| c.contains_key("index"))
        .expect("collMod on the TTL index");
    assert_eq!(
        get(retention, "index.keyPattern"),
        &Bson::Document(doc! { "at": 1 })
    );
    assert_eq!(
        get(retention, "index.expireAfterSeconds"),
        &Bson::Int64(300)
    );
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_retention_in_place_is_refused_by_name() {
    let peer = Peer::replica_set().await;
    peer.always(
        "listCollections",
        doc! { "cursor": { "id": 0i64, "ns": "intracom.$cmd.listCollections", "firstBatch": [
            { "name": "messages", "type": "collection", "options": { "capped": true, "size": 1_000_000i64 } },
        ] }, "ok": 1 },
    );
    let err = Intracom::connect(config(&peer)).await.unwrap_err();
    assert!(
        matches!(&err, Error::Config { key, .. } if key == "common.intracom.db.retention"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_is_one_server_stamped_upsert() {
    let peer = Peer::replica_set().await;
    peer.accept_setup();
    accept_catalog(&peer);
    peer.on("update", |c| {
        (c.get_str("update") == Ok("messages")).then(|| {
            Reply::Doc(
                doc! { "n": 1, "nModified": 0, "upserted": [{ "index": 0, "_id": "x" }], "ok": 1 },
            )
        })
    });
    let bus = connect(&peer).await;
    let published = bus
        .publish(Message::broadcast("reload").body(doc! { "tenant": 7 }))
        .await
        .unwrap();
    assert_eq!(published.status, PublishStatus::Stored);

    let updates: Vec<Document> = peer
        .commands_named("update")
        .into_iter()
        .filter(|c| c.get_str("update") == Ok("messages"))
        .collect();
    assert_eq!(updates.len(), 1, "one round trip");
    let command = &updates[0];
    assert_eq!(command.get_bool("ordered"), Ok(true));
    let statements = command.get_array("updates").unwrap();
    assert_eq!(statements.len(), 1);
    let statement = statements[0].as_document().unwrap();
    assert_eq!(
        statement.get_document("q").unwrap(),
        &doc! { "_id": &published.id, "ts": { "$exists": false } }
    );
    assert_eq!(statement.get_bool("upsert"), Ok(true));
    assert_eq!(
        get(statement, "u.$currentDate"),
        &Bson::Document(doc! { "ts": { "$type": "timestamp" }, "at": { "$type": "date" } }),
        "the server stamps ts and at"
    );
    let body = get(statement, "u.$setOnInsert").as_document().unwrap();
    assert_eq!(body.get_str("serviceNameSource"), Ok("billing"));
    assert_eq!(body.get_str("instanceSource"), Ok("billing-1"));
    assert_eq!(body.get("serviceNameDest"), Some(&Bson::Null));
    assert_eq!(body.get_document("query").unwrap(), &doc! { "tenant": 7 });
    for stamped in ["_id", "ts", "at"] {
        assert!(
            !body.contains_key(stamped),
            "{stamped} is not in $setOnInsert (same path as the filter or $currentDate)"
        );
    }
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_key_on_a_retried_publish_means_already_published() {
    let peer = Peer::replica_set().await;
    peer.accept_setup();
    accept_catalog(&peer);
    // A batch of three: the second already exists (11000 stops the ordered batch), so
    // the third is sent again on its own.
    peer.queue(
        "update",
        vec![
            Reply::Doc(doc! { "n": 1, "nModified": 0, "upserted": [{ "index": 0, "_id": "a" }],
                "writeErrors": [{ "index": 1, "code": 11000, "errmsg": "E11000 duplicate key error collection: intracom.messages index: _id_" }], "ok": 1 }),
            Reply::Doc(doc! { "n": 1, "nModified": 0, "upserted": [{ "index": 0, "_id": "c" }], "ok": 1 }),
        ],
    );
    let bus = connect(&peer).await;
    let batch = vec![
        Message::broadcast("reload").with_id("a"),
        Message::broadcast("reload").with_id("b"),
        Message::broadcast("reload").with_id("c"),
    ];
    let out = bus.publish_all(batch).await.unwrap();
    let statuses: Vec<(&str, &PublishStatus)> =
        out.iter().map(|p| (p.id.as_str(), &p.status)).collect();
    assert_eq!(
        statuses,
        [
            ("a", &PublishStatus::Stored),
            ("b", &PublishStatus::Duplicate),
            ("c", &PublishStatus::Stored)
        ]
    );
    let sent: Vec<Vec<String>> = peer
        .commands_named("update")
        .into_iter()
        .filter(|c| c.get_str("update") == Ok("messages"))
        .map(|c| {
            c.get_array("updates")
                .unwrap()
                .iter()
                .map(|s| {
                    s.as_document()
                        .unwrap()
                        .get_document("q")
                        .unwrap()
                        .get_str("_id")
                        .unwrap()
                        .to_string()
                })
                .collect()
        })
        .collect();
    assert_eq!(
        sent,
        [vec!["a", "b", "c"], vec!["c"]],
        "only what the failed batch did not reach is sent again"
    );
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_messages_are_refused_before_any_write() {
    let peer = Peer::replica_set().await;
    peer.accept_setup();
    accept_catalog(&peer);
    let bus = connect(&peer).await;
    let blob = "x".repeat(17 * 1024 * 1024);
    let err = bus
        .publish(Message::broadcast("reload").body(doc! { "blob": blob }))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    assert!(
        peer.commands_named("update")
            .iter()
            .all(|c| c.get_str("update") != Ok("messages")),
        "nothing was sent"
    );
    bus.shutdown().await;
}

/// The scripted server's clock in the catch-up cases: three seconds after the stamps
/// they use for what is written before a catch-up ([`ts`]), so the catch-up judges those
/// settled (stamped more than the safety window, 2 s, before the clock). It joins the
/// stream once the clock has moved three seconds on; what is written after it began is
/// stamped later ([`ts_at`] 10 s and on).
const SCRIPT_CLOCK: u32 = 1_800_000_003;

fn ts(increment: u32) -> Timestamp {
    Timestamp {
        time: 1_800_000_000,
        increment,
    }
}

/// Scripts `getMore` on one cursor: these batches in order, then empty batches that
/// wait like an awaiting cursor.
fn script_get_more(peer: &Peer, cursor: i64, batches: Vec<Vec<Document>>, token: &'static str) {
    let mut batches: std::collections::VecDeque<Vec<Document>> = batches.into();
    peer.on("getMore", move |c| {
        if c.get_i64("getMore") != Ok(cursor) {
            return None;
        }
        match batches.pop_front() {
            Some(events) => Some(Reply::Doc(cursor_reply(cursor, "nextBatch", events, token))),
            None => Some(Reply::After(
                Duration::from_millis(100),
                cursor_reply(cursor, "nextBatch", vec![], token),
            )),
        }
    });
}

/// Scripts the checkpoint store: `saved` is what `find` on checkpoints returns.
fn accept_checkpoints(peer: &Peer, saved: Option<Document>) {
    peer.on("find", move |c| {
        (c.get_str("find") == Ok("checkpoints")).then(|| {
            let batch: Vec<Bson> = saved.iter().cloned().map(Bson::Document).collect();
            Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "intracom.checkpoints", "firstBatch": batch }, "ok": 1 })
        })
    });
    peer.on("update", |c| {
        (c.get_str("update") == Ok("checkpoints"))
            .then(|| Reply::Doc(doc! { "n": 1, "nModified": 1, "ok": 1 }))
    });
}

/// The lower `ts` bound of a scan's first page: `{ts: {$gt: …}}`, alone or after the
/// subscriber's filter in an `$and`.
fn scan_lower(find: &Document) -> Option<Timestamp> {
    let filter = find.get_document("filter").ok()?;
    let page = match filter.get_array("$and") {
        Ok(parts) => parts.last()?.as_document()?,
        Err(_) => filter,
    };
    page.get_document("ts").ok()?.get_timestamp("$gt").ok()
}

/// The upper `ts` bound of a catch-up's pass (`$lte`, when it has one): it reads only
/// what is settled by the server's clock.
fn scan_upper(find: &Document) -> Option<Timestamp> {
    let filter = find.get_document("filter").ok()?;
    let page = match filter.get_array("$and") {
        Ok(parts) => parts.last()?.as_document()?,
        Err(_) => filter,
    };
    let range = match page.get_array("$or") {
        Ok(branches) => branches.first()?.as_document()?.get_document("ts").ok()?,
        Err(_) => page.get_document("ts").ok()?,
    };
    range.get_timestamp("$lte").ok()
}

/// Whether a stored message is within a pass's bounds.
fn within(document: &Document, lower: Timestamp, upper: Option<Timestamp>) -> bool {
    let ts = document.get_timestamp("ts").unwrap();
    ts > lower && upper.is_none_or(|u| ts <= u)
}

/// Answers the subscribers' scans of `messages` from `stored` (what lies within each
/// scan's bounds). Returns a flag set once a scan was answered, and each scan's lower
/// bound.
fn serve_scans(
    peer: &Peer,
    stored: Vec<Document>,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::Mutex<Vec<Timestamp>>>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let scanned = Arc::new(AtomicBool::new(false));
    let lowers = Arc::new(Mutex::new(Vec::new()));
    let (flag, seen) = (Arc::clone(&scanned), Arc::clone(&lowers));
    peer.on("find", move |c| {
        (c.get_str("find") == Ok("messages") && c.get_str("comment").is_err()).then(|| {
            flag.store(true, Ordering::SeqCst);
            let lower = scan_lower(c).unwrap_or(ts(0));
            seen.lock().unwrap().push(lower);
            let batch: Vec<Document> = stored
                .iter()
                .filter(|d| within(d, lower, scan_upper(c)))
                .cloned()
                .collect();
            Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "intracom.messages", "firstBatch": batch }, "ok": 1 })
        })
    });
    (scanned, lowers)
}

/// Answers the shared stream's `getMore`s (cursor 101): `event` once `scanned` is set,
/// empty batches (after 100 ms) before and after it.
fn one_event_after_a_scan(
    peer: &Peer,
    scanned: std::sync::Arc<std::sync::atomic::AtomicBool>,
    event: Document,
    token: &'static str,
) {
    let mut event = Some(event);
    peer.on("getMore", move |c| {
        if c.get_i64("getMore") != Ok(101) {
            return None;
        }
        let event = event.take_if(|_| scanned.load(std::sync::atomic::Ordering::SeqCst));
        Some(match event {
            Some(event) => Reply::Doc(cursor_reply(101, "nextBatch", vec![event], token)),
            None => Reply::After(
                Duration::from_millis(100),
                cursor_reply(101, "nextBatch", vec![], token),
            ),
        })
    });
}

fn change_stream_stage(aggregate: &Document) -> Document {
    let pipeline = aggregate.get_array("pipeline").unwrap();
    pipeline[0]
        .as_document()
        .unwrap()
        .get_document("$changeStream")
        .unwrap()
        .clone()
}

async fn next_id(sub: &mut intracom::Subscriber) -> String {
    let item = tokio::time::timeout(GUARD, sub.next())
        .await
        .expect("a delivery within the guard")
        .expect("stream open");
    item.expect("a delivery, not an error").id.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_of_a_process_share_one_change_stream() {
    let peer = Peer::replica_set().await;
    peer.accept_setup();
    accept_catalog(&peer);
    peer.queue(
        "aggregate",
        vec![Reply::Doc(cursor_reply(101, "firstBatch", vec![], "t0"))],
    );
    // m1 comes once all twelve have subscribed (each starts at the stream's tip of
    // that moment: one that subscribed after m1 arrived would not see it).
    let m1_ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ready = std::sync::Arc::clone(&m1_ready);
    let mut m1 = Some(insert_event(
        "t1",
        stored_message("m1", "reload", ts(1)),
        ts(1),
    ));
    peer.on("getMore", move |c| {
        if c.get_i64("getMore") != Ok(101) {
            return None;
        }
        let event = if ready.load(std::sync::atomic::Ordering::SeqCst) {
            m1.take()
        } else {
            None
        };
        Some(match event {
            Some(event) => Reply::Doc(cursor_reply(101, "nextBatch", vec![event], "t1")),
            None => Reply::After(
                Duration::from_millis(100),
                cursor_reply(101, "nextBatch", vec![], "t1"),
            ),
        })
    });
    let bus = connect(&peer).await;
    let mut subs = Vec::new();
    for _ in 0..12 {
        subs.push(bus.subscribe(Subscription::new()).await.unwrap());
    }
    m1_ready.store(true, std::sync::atomic::Ordering::SeqCst);
    for sub in &mut subs {
        assert_eq!(next_id(sub).await, "m1");
    }
    let aggregates = peer.commands_named("aggregate");
    assert_eq!(aggregates.len(), 1, "twelve subscribers, one server cursor");
    let stage = change_stream_stage(&aggregates[0]);
    assert!(
        !stage.contains_key("resumeAfter"),
        "the shared stream starts now: {stage}"
    );
    let pipeline = aggregates[0].get_array("pipeline").unwrap();
    assert_eq!(
        pipeline[1].as_document().unwrap(),
        &doc! { "$match": { "$or": [
            { "operationType": "insert" },
            { "operationType": "update", "updateDescription.updatedFields.state": { "$exists": true } },
            { "operationType": { "$in": ["drop", "rename", "dropDatabase", "invalidate"] } },
        ] } },
        "inserts, the updates that settle requests, and the events that end the stream"
    );
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_subscription_resumes_from_its_saved_token_then_joins_the_shared_stream() {
    let peer = Peer::replica_set().await;
    peer.accept_setup();
    accept_catalog(&peer);
    let saved = doc! {
        "_id": "billing-cache",
        "position": { "ts": ts(1), "token": { "id": "m1", "rt": { "_data": "t1" }, "ct": ts(1) } },
    };
    accept_checkpoints(&peer, Some(saved));
    // First the shared stream (cursor 101), then the subscriber's own resumed stream
    // (102), from a safety window before the saved position: m1 (the checkpoint's
    // message, delivered before), then m2.
    peer.queue(
        "aggregate",
        vec![
            Reply::Doc(cursor_reply(101, "firstBatch", vec![], "t2")),
            Reply::Doc(cursor_reply(
                102,
                "firstBatch",
                vec![
                    insert_event("t1", stored_message("m1", "reload", ts(1)), ts(1)),
                    insert_event("t2", stored_message("m2", "reload", ts(2)), ts(2)),
                ],
                "t2",
            )),
        ],
    );
    // The resumed stream has caught up after m2; the shared stream then sees m3.
    script_get_more(&peer, 102, vec![vec![]], "t2");
    let m3_ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate = m3_ready.clone();
    peer.on("getMore", move |c| {
        (c.get_i64("getMore") == Ok(101) && gate.swap(false, std::sync::atomic::Ordering::SeqCst))
            .then(|| {
                Reply::Doc(cursor_reply(
                    101,
                    "nextBatch",
                    vec![insert_event(
                        "t3",
                        stored_message("m3", "reload", ts(3)),
                        ts(3),
                    )],
                    "t3",
                ))
            })
    });
    script_get_more(&peer, 101, vec![], "t3");
    let bus = connect(&peer).await;
    let mut sub = bus
        .subscribe(Subscription::named("billing-cache").actions(["reload"]))
        .await
        .unwrap();
    assert_eq!(
        next_id(&mut sub).await,
        "m2",
        "the first message after the saved token"
    );

    let aggregates = peer.wait_for("aggregate", 2).await;
    let resumed = change_stream_stage(&aggregates[1]);
    assert_eq!(
        resumed.get_timestamp("startAtOperationTime").unwrap(),
        Timestamp {
            time: ts(1).time - 2,
            increment: 0
        },
        "resumes a safety window before the saved position, to learn what it delivered"
    );
    let stages = aggregates[1].get_array("pipeline").unwrap();
    let matched = stages[1]
        .as_document()
        .and_then(|s| s.get_document("$match").ok())
        .and_then(|m| m.get_array("$or").ok())
        .expect("one $match: the subscriber's inserts, or an ending event");
    let inserts = matched[0].as_document().unwrap();
    assert_eq!(inserts.get_str("operationType"), Ok("insert"));
    assert_eq!(
        inserts
            .get_document("fullDocument.action")
            .expect("the subscriber's filter is pushed into $match"),
        &doc! { "$in": ["reload"] }
    );
    assert_eq!(
        matched[1].as_document().unwrap(),
        &doc! { "operationType": { "$in": ["drop", "rename", "dropDatabase", "invalidate"] } },
        "a drop after the saved token reaches the follower"
    );
    // Once it has caught up, the resumed stream is closed and the shared one delivers.
    m3_ready.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(next_id(&mut sub).await, "m3");
    let kills = peer.wait_for("killCursors", 1).await;
    assert_eq!(
        kills[0].get_array("cursors").unwrap(),
        &vec![Bson::Int64(102)],
        "the resumed stream's cursor is closed"
    );
    assert_eq!(
        peer.commands_named("aggregate").len(),
        2,
        "no further streams"
    );
    bus.shutdown().await;
}

/// A replica-set peer set up for a bus, whose shared change stream is cursor 101 and
/// whose next stream (after the first is lost) is cursor 102.
async fn two_stream_peer() -> Peer {
    let peer = Peer::replica_set().await;
    peer.set_clock(SCRIPT_CLOCK);
    peer.accept_setup();
    accept_catalog(&peer);
    peer.queue(
        "aggregate",
        vec![
            Reply::Doc(cursor_reply(101, "firstBatch", vec![], "t0")),
            Reply::Doc(cursor_reply(102, "firstBatch", vec![], "t5")),
        ],
    );
    peer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_that_starts_now_catches_up_after_a_gap_from_where_it_started() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let peer = two_stream_peer().await;
    let (old, m0, m1) = (
        stored_message("old", "reload", ts(1)),
        stored_message("m0", "reload", ts(2)),
        stored_message("m1", "reload", ts(3)),
    );
    // The shared stream reports m0, then (once `late` has subscribed) loses its history.
    let late_ready = Arc::new(AtomicBool::new(false));
    let ready = Arc::clone(&late_ready);
    let mut step = 0;
    let first = m0.clone();
    peer.on("getMore", move |c| {
        if c.get_i64("getMore") != Ok(101) {
            return None;
        }
        step += 1;
        Some(match step {
            1 => Reply::Doc(cursor_reply(
                101,
                "nextBatch",
                vec![insert_event("t1", first.clone(), ts(2))],
                "t1",
            )),
            _ if ready.load(Ordering::SeqCst) => Reply::Doc(error(
                286,
                "ChangeStreamHistoryLost",
                "Resume of change stream was not possible",
            )),
            _ => Reply::After(
                Duration::from_millis(100),
                cursor_reply(101, "nextBatch", vec![], "t1"),
            ),
        })
    });
    // The catch-up finds `old` and m0 (before `late` subscribed) and m1 (after).
    let (sold, sm0, sm1) = (old.clone(), m0.clone(), m1.clone());
    peer.on("find", move |c| {
        (c.get_str("find") == Ok("messages")).then(|| {
            Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "intracom.messages", "firstBatch": [sold.clone(), sm0.clone(), sm1.clone()] }, "ok": 1 })
        })
    });
    peer.on("getMore", move |c| {
        (c.get_i64("getMore") == Ok(102)).then(|| {
            Reply::After(
                Duration::from_millis(100),
                cursor_reply(102, "nextBatch", vec![], "t5"),
            )
        })
    });
    let bus = connect(&peer).await;
    let mut early = bus.subscribe(Subscription::new()).await.unwrap();
    assert_eq!(next_id(&mut early).await, "m0");
    // Starts now, after m0: its first event is the gap.
    let mut late = bus.subscribe(Subscription::new()).await.unwrap();
    late_ready.store(true, Ordering::SeqCst);
    let mut got = Vec::new();
    while got.last().map(String::as_str) != Some("m1") {
        got.push(next_id(&mut late).await);
    }
    // m0 is stamped as the start is (the newest message before it): it may come (what a
    // follower cannot tell apart it delivers); nothing older does.
    assert!(
        got == ["m1"] || got == ["m0", "m1"],
        "what was published before it subscribed is not delivered, even by a catch-up: {got:?}"
    );
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_catch_up_hands_over_without_delivering_twice_what_came_during_it() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    // Stamps seconds apart (the safety window of this config is 2 s).
    let at = |secs: u32| Timestamp {
        time: 1_800_000_000 + secs,
        increment: 0,
    };
    let peer = two_stream_peer().await;
    peer.set_clock(1_800_000_110);
    let (m1, m2, m3, m9, m10) = (
        stored_message("m1", "reload", at(1)),
        stored_message("m2", "reload", at(2)),
        stored_message("m3", "reload", at(100)),
        stored_message("m9", "reload", at(103)),
        stored_message("m10", "reload", at(120)),
    );
    peer.queue(
        "getMore",
        vec![
            Reply::Doc(cursor_reply(
                101,
                "nextBatch",
                vec![insert_event("t1", m1.clone(), at(1))],
                "t1",
            )),
            Reply::Doc(error(
                286,
                "ChangeStreamHistoryLost",
                "Resume of change stream was not possible",
            )),
        ],
    );
    // The first pass is slow (longer than half the window): m3 and m9 are written while
    // it runs, so the fresh stream reports them and the pass reads them too.
    let scanning = Arc::new(AtomicBool::new(false));
    let marker_ready = Arc::new(AtomicBool::new(false));
    let (flag, first_pass) = (
        Arc::clone(&scanning),
        vec![m1.clone(), m2, m3.clone(), m9.clone()],
    );
    let mut passes = 0;
    peer.on("find", move |c| {
        (c.get_str("find") == Ok("messages") && c.get_str("comment").is_err()).then(|| {
            flag.store(true, Ordering::SeqCst);
            passes += 1;
            let batch = if passes == 1 { first_pass.clone() } else { vec![m9.clone()] };
            let reply = doc! { "cursor": { "id": 0i64, "ns": "intracom.messages", "firstBatch": batch }, "ok": 1 };
            if passes == 1 {
                Reply::After(Duration::from_millis(1500), reply)
            } else {
                Reply::Doc(reply)
            }
        })
    });
    let (seen_scan, marker_gate) = (Arc::clone(&scanning), Arc::clone(&marker_ready));
    let mut during = Some(vec![
        insert_event("t6", m3.clone(), at(100)),
        insert_event("t7", stored_message("m9", "reload", at(103)), at(103)),
    ]);
    let mut marker = Some(insert_event("t8", m10, at(120)));
    peer.on("getMore", move |c| {
        if c.get_i64("getMore") != Ok(102) {
            return None;
        }
        let events = if seen_scan.load(Ordering::SeqCst) {
            during.take()
        } else {
            None
        }
        .or_else(|| {
            marker_gate
                .load(Ordering::SeqCst)
                .then(|| marker.take())
                .flatten()
                .map(|m| vec![m])
        });
        Some(match events {
            Some(events) => Reply::Doc(cursor_reply(102, "nextBatch", events, "t8")),
            None => Reply::After(
                Duration::from_millis(100),
                cursor_reply(102, "nextBatch", vec![], "t8"),
            ),
        })
    });
    let bus = connect(&peer).await;
    let mut sub = bus.subscribe(Subscription::new()).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(next_id(&mut sub).await);
    }
    assert_eq!(got, ["m1", "m2", "m3", "m9"]);
    marker_ready.store(true, Ordering::SeqCst);
    assert_eq!(
        next_id(&mut sub).await,
        "m10",
        "what came during the long pass is not delivered again from the stream"
    );
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lost_catches_up_by_ts_then_follows_a_new_stream_without_gap_or_duplicate() {
    let peer = two_stream_peer().await;
    let (m1, m2, m3) = (
        stored_message("m1", "reload", ts(1)),
        stored_message("m2", "reload", ts(2)),
        stored_message("m3", "reload", ts_at(10, 3)),
    );
    peer.queue(
        "getMore",
        vec![
            Reply::Doc(cursor_reply(101, "nextBatch", vec![insert_event("t1", m1.clone(), ts(1))], "t1")),
            Reply::Doc(error(286, "ChangeStreamHistoryLost", "Resume of change stream was not possible, as the resume point may no longer be in the oplog")),
        ],
    );
    // The catch-up query sees m1 and m2 (m3 is not written yet); the new stream then
    // reports m2 (committed after it was anchored) and m3.
    let scanned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = scanned.clone();
    let (sm1, sm2) = (m1.clone(), m2.clone());
    peer.on("find", move |c| {
        (c.get_str("find") == Ok("messages")).then(|| {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "intracom.messages", "firstBatch": [sm1.clone(), sm2.clone()] }, "ok": 1 })
        })
    });
    let gate = scanned.clone();
    let mut sent = false;
    // A marker, once the test has read m1..m3: whatever comes before it is a duplicate.
    let marker_ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let marker_gate = marker_ready.clone();
    let mut marker = Some(insert_event(
        "t8",
        stored_message("m4", "reload", ts_at(10, 4)),
        ts_at(10, 4),
    ));
    peer.on("getMore", move |c| {
        if c.get_i64("getMore") != Ok(102) {
            return None;
        }
        if sent && marker_gate.load(std::sync::atomic::Ordering::SeqCst) {
            if let Some(event) = marker.take() {
                return Some(Reply::Doc(cursor_reply(
                    102,
                    "nextBatch",
                    vec![event],
                    "t8",
                )));
            }
        }
        if sent || !gate.load(std::sync::atomic::Ordering::SeqCst) {
            return Some(Reply::After(
                Duration::from_millis(100),
                cursor_reply(102, "nextBatch", vec![], "t5"),
            ));
        }
        sent = true;
        Some(Reply::Doc(cursor_reply(
            102,
            "nextBatch",
            vec![
                insert_event("t6", m2.clone(), ts(2)),
                insert_event("t7", m3.clone(), ts_at(10, 3)),
            ],
            "t7",
        )))
    });
    let bus = connect(&peer).await;
    let mut sub = bus.subscribe(Subscription::new()).await.unwrap();
    let got = vec![
        next_id(&mut sub).await,
        next_id(&mut sub).await,
        next_id(&mut sub).await,
    ];
    assert_eq!(got, ["m1", "m2", "m3"], "no gap, no duplicate, in order");

    let aggregates = peer.commands_named("aggregate");
    assert_eq!(aggregates.len(), 2);
    assert!(
        !change_stream_stage(&aggregates[1]).contains_key("resumeAfter"),
        "after 286 the stream starts afresh"
    );
    // (After the query that anchored the subscription: no message seen yet.)
    let scan = peer
        .commands_named("find")
        .into_iter()
        .find(|c| c.get_str("find") == Ok("messages") && c.get_str("comment").is_err())
        .unwrap();
    assert_eq!(
        scan.get_document("sort").unwrap(),
        &doc! { "ts": 1, "_id": 1 }
    );
    let lower = scan_lower(&scan).unwrap();
    assert!(
        lower < ts(1),
        "the scan looks back a safety window before the last message: {lower:?}"
    );
    // Nothing more was waiting: the next delivery is the next new message.
    marker_ready.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        next_id(&mut sub).await,
        "m4",
        "no duplicate after the hand-over"
    );
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_restarts_the_stream_and_catches_up_by_ts() {
    // A stream that lived through a lost connection is not trusted to be gapless (the
    // server may be a new one that lost acknowledged writes and resumes after an
    // unknown token *later*): the hub starts afresh and followers scan by `ts`.
    let peer = Peer::replica_set().await;
    peer.set_clock(SCRIPT_CLOCK);
    peer.accept_setup();
    accept_catalog(&peer);
    // aggregate #2 is the driver's own resume, which fails too; #3 is the hub's fresh
    // stream, from now.
    peer.queue(
        "aggregate",
        vec![
            Reply::Doc(cursor_reply(101, "firstBatch", vec![], "t0")),
            Reply::Drop,
            Reply::Doc(cursor_reply(103, "firstBatch", vec![], "t2")),
        ],
    );
    peer.queue(
        "getMore",
        vec![
            Reply::Doc(cursor_reply(
                101,
                "nextBatch",
                vec![insert_event(
                    "t1",
                    stored_message("m1", "reload", ts(1)),
                    ts(1),
                )],
                "t1",
            )),
            Reply::Drop,
        ],
    );
    // m2 was stored during the outage: only the collection has it. m1 is read again by
    // the look-back window and not delivered twice.
    let scans = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Document>::new()));
    let seen = std::sync::Arc::clone(&scans);
    peer.on("find", move |c| {
        (c.get_str("find") == Ok("messages") && c.get_str("comment").is_err()).then(|| {
            seen.lock().unwrap().push(c.clone());
            let batch = vec![
                stored_message("m1", "reload", ts(1)),
                stored_message("m2", "reload", ts(2)),
            ];
            Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "intracom.messages", "firstBatch": batch }, "ok": 1 })
        })
    });
    // m3 is written after the catch-up read the collection (which does not have it):
    // the fresh stream reports it only then. (Reported before, it would be in the
    // collection the catch-up reads, and this script's scan would be a lie.)
    let scanned = std::sync::Arc::clone(&scans);
    let mut m3 = Some(insert_event(
        "t3",
        stored_message("m3", "reload", ts_at(10, 3)),
        ts_at(10, 3),
    ));
    peer.on("getMore", move |c| {
        if c.get_i64("getMore") != Ok(103) {
            return None;
        }
        let event = if scanned.lock().unwrap().is_empty() {
            None
        } else {
            m3.take()
        };
        Some(match event {
            Some(event) => Reply::Doc(cursor_reply(103, "nextBatch", vec![event], "t3")),
            None => Reply::After(
                Duration::from_millis(100),
                cursor_reply(103, "nextBatch", vec![], "t3"),
            ),
        })
    });
    let bus = connect(&peer).await;
    let mut sub = bus.subscribe(Subscription::new()).await.unwrap();
    assert_eq!(next_id(&mut sub).await, "m1");
    assert_eq!(
        next_id(&mut sub).await,
        "m2",
        "caught up from the collection"
    );
    assert_eq!(
        next_id(&mut sub).await,
        "m3",
        "then the fresh stream, nothing twice"
    );
    let aggregates = peer.commands_named("aggregate");
    assert_eq!(aggregates.len(), 3);
    assert_eq!(
        change_stream_stage(&aggregates[1])
            .get_document("resumeAfter")
            .unwrap(),
        &doc! { "_data": "t1" },
        "the driver's own resume, after the last event seen"
    );
    assert!(
        !change_stream_stage(&aggregates[2]).contains_key("resumeAfter"),
        "the hub's stream starts afresh"
    );
    let scan = scans.lock().unwrap()[0].clone();
    assert!(
        scan_lower(&scan).is_some(),
        "the catch-up reads by ts: {scan}"
    );
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_refused_for_good_is_told_to_the_subscriber_and_tried_again() {
    let peer = Peer::standalone().await;
    peer.accept_setup();
    accept_catalog(&peer);
    let mut scans = 0;
    peer.on("find", move |c| {
        if c.get_str("find") != Ok("messages") {
            return None;
        }
        if c.get_document("sort").ok() == Some(&doc! { "ts": -1 }) {
            return Some(Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "intracom.messages", "firstBatch": [{ "_id": "m1", "ts": ts(1) }] }, "ok": 1 }));
        }
        if c.get_document("sort").ok() != Some(&doc! { "ts": 1, "_id": 1 }) {
            // The safety window's ids, read when the subscription starts.
            return Some(Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "intracom.messages", "firstBatch": [] }, "ok": 1 }));
        }
        scans += 1;
        Some(Reply::Doc(if scans == 1 {
            error(13, "Unauthorized", "not authorized on intracom to execute command { find: \"messages\" }")
        } else {
            doc! { "cursor": { "id": 0i64, "ns": "intracom.messages", "firstBatch": [stored_message("m2", "reload", ts(2))] }, "ok": 1 }
        }))
    });
    let bus = connect(&peer).await;
    let mut sub = bus.subscribe(Subscription::new()).await.unwrap();
    let told = tokio::time::timeout(GUARD, sub.next())
        .await
        .expect("an item within the guard")
        .expect("stream open");
    match told {
        Err(error) => {
            assert!(!error.is_retryable() && !error.is_report(), "{error}");
            assert!(error.to_string().contains("not authorized"), "{error}");
        }
        Ok(delivery) => panic!("expected the refusal, got {}", delivery.id),
    }
    assert_eq!(next_id(&mut sub).await, "m2", "tried again, and read");
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_server_is_followed_by_polling_ts() {
    let peer = Peer::standalone().await;
    peer.accept_setup();
    accept_catalog(&peer);
    // The first query finds the newest stamp (the start point); later scans see m2.
    let mut scans = 0;
    peer.on("find", move |c| {
        if c.get_str("find") != Ok("messages") {
            return None;
        }
        let newest_first = c.get_document("sort").ok() == Some(&doc! { "ts": -1 });
        let batch: Vec<Document> = if newest_first {
            vec![doc! { "_id": "m1", "ts": ts(1) }]
        } else {
            scans += 1;
            // Every scan looks back a safety window, so m2 (and a document that is no
            // message) keep coming back.
            let bad = doc! { "_id": "bad", "ts": ts(2) };
            match scans {
                0..=2 => vec![],
                3..=5 => vec![stored_message("m2", "reload", ts(2)), bad],
                _ => vec![stored_message("m2", "reload", ts(2)), bad, stored_message("m3", "reload", ts(3))],
            }
        };
        Some(Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "intracom.messages", "firstBatch": batch }, "ok": 1 }))
    });
    peer.on("update", |c| {
        (c.get_str("update") == Ok("dead"))
            .then(|| Reply::Doc(doc! { "n": 1, "nModified": 0, "ok": 1 }))
    });
    let bus = connect(&peer).await;
    let mut sub = bus.subscribe(Subscription::new()).await.unwrap();
    assert_eq!(next_id(&mut sub).await, "m2");
    assert_eq!(
        next_id(&mut sub).await,
        "m3",
        "m2, seen again by later scans, is not delivered twice"
    );
    let dead: Vec<Document> = peer
        .commands_named("update")
        .into_iter()
        .filter(|c| c.get_str("update") == Ok("dead"))
        .collect();
    assert_eq!(
        dead.len(),
        1,
        "the document that is no message, read by every scan, is dead-lettered once"
    );
    assert!(
        peer.commands_named("aggregate").is_empty(),
        "no $changeStream on a standalone"
    );
    let scan = peer
        .commands_named("find")
        .into_iter()
        .find(|c| {
            c.get_str("find") == Ok("messages")
                && c.get_document("sort") == Ok(&doc! { "ts": 1, "_id": 1 })
        })
        .unwrap();
    assert!(scan_lower(&scan).is_some(), "polls by ts: {scan}");
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_documents_are_dead_lettered_and_consumption_goes_on() {
    let peer = Peer::replica_set().await;
    peer.accept_setup();
    accept_catalog(&peer);
    peer.queue(
        "aggregate",
        vec![Reply::Doc(cursor_reply(101, "firstBatch", vec![], "t0"))],
    );
    let mut wrong_type = stored_message("bad2", "reload", ts(2));
    wrong_type.insert("query", "not a document");
    script_get_more(
        &peer,
        101,
        vec![vec![
            insert_event("t1", doc! { "_id": "bad1", "hello": "from mongosh" }, ts(1)),
            insert_event("t2", wrong_type, ts(2)),
            insert_event("t3", stored_message("good", "reload", ts(3)), ts(3)),
        ]],
        "t3",
    );
    peer.on("update", |c| {
        (c.get_str("update") == Ok("dead"))
            .then(|| Reply::Doc(doc! { "n": 1, "nModified": 0, "ok": 1 }))
    });
    let bus = connect(&peer).await;
    let mut sub = bus.subscribe(Subscription::new()).await.unwrap();
    assert_eq!(
        next_id(&mut sub).await,
        "good",
        "consumption goes on past bad documents"
    );
    let dead = peer.wait_for("update", 2).await;
    let dead: Vec<&Document> = dead
        .iter()
        .filter(|c| c.get_str("update") == Ok("dead"))
        .collect();
    let ids: Vec<&Bson> = dead
        .iter()
        .map(|c| {
            get(
                c.get_array("updates").unwrap()[0].as_document().unwrap(),
                "q._id",
            )
        })
        .collect();
    assert!(
        ids.contains(&&Bson::String("bad1".into())) && ids.contains(&&Bson::String("bad2".into())),
        "{ids:?}"
    );
    let statement = dead[0].get_array("updates").unwrap()[0]
        .as_document()
        .unwrap()
        .clone();
    assert_eq!(statement.get_bool("upsert"), Ok(true));
    assert!(
        get(&statement, "u.$setOnInsert.reason")
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "the reason is kept"
    );
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_saves_the_resume_token_as_the_checkpoint() {
    let peer = Peer::replica_set().await;
    peer.accept_setup();
    accept_catalog(&peer);
    accept_checkpoints(&peer, None);
    peer.queue(
        "aggregate",
        vec![Reply::Doc(cursor_reply(101, "firstBatch", vec![], "t0"))],
    );
    script_get_more(
        &peer,
        101,
        vec![vec![insert_event(
            "t1",
            stored_message("m1", "reload", ts(1)),
            ts(1),
        )]],
        "t1",
    );
    let bus = connect(&peer).await;
    let mut sub = bus.subscribe(Subscription::named("ledger")).await.unwrap();
    let delivery = tokio::time::timeout(GUARD, sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    delivery.ack().await.unwrap();
    let saves: Vec<Document> = peer
        .commands_named("update")
        .into_iter()
        .filter(|c| c.get_str("update") == Ok("checkpoints"))
        .collect();
    assert_eq!(saves.len(), 1);
    let statement = saves[0].get_array("updates").unwrap()[0]
        .as_document()
        .unwrap()
        .clone();
    assert_eq!(
        statement.get_document("q").unwrap(),
        &doc! { "_id": "ledger" }
    );
    let position = get(&statement, "u.$set.position").as_document().unwrap();
    assert_eq!(
        get(position, "token.rt"),
        &Bson::Document(doc! { "_data": "t1" }),
        "the token is stored as-is"
    );
    assert_eq!(get(position, "token.ct"), &Bson::Timestamp(ts(1)));
    assert_eq!(position.get_timestamp("ts").unwrap(), ts(1));
    bus.shutdown().await;
}

fn work_document(id: &str, owner: &str) -> Document {
    let mut d = stored_message(id, "invoice.render", ts(1));
    d.insert("serviceNameDest", "billing");
    d.insert("type", "fire_and_forget");
    d.insert("delivery", "one");
    d.insert("state", "pending");
    d.insert("priority", 0);
    d.insert("attempts", 1);
    d.insert(
        "lease",
        doc! { "owner": owner, "at": intracom::bson::DateTime::now(), "ms": 600i64 },
    );
    d
}

/// A worker of billing's `invoice.render` that sends the id of each job it runs.
fn recording_worker(
    bus: &Intracom,
    options: intracom::WorkOptions,
) -> (
    intracom::Worker,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let worker = bus
        .work(
            "billing",
            &["invoice.render"],
            options,
            move |m: Message| {
                let tx = tx.clone();
                async move {
                    tx.send(m.id.clone()).ok();
                    Ok::<(), String>(())
                }
            },
        )
        .unwrap();
    (worker, rx)
}

/// The id of the next job a [`recording_worker`] ran.
async fn next_job(ran: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(GUARD, ran.recv())
        .await
        .expect("a job within the guard")
        .expect("the worker runs")
}

fn statements(command: &Document) -> Vec<Document> {
    command
        .get_array("updates")
        .unwrap()
        .iter()
        .filter_map(|s| s.as_document().cloned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_claimed_document_is_set_aside_and_the_next_job_runs() {
    let peer = Peer::replica_set().await;
    peer.accept_setup();
    accept_catalog(&peer);
    peer.queue(
        "aggregate",
        vec![Reply::Doc(cursor_reply(101, "firstBatch", vec![], "t0"))],
    );
    script_get_more(&peer, 101, vec![], "t0");
    // It passed the collection's validator, not the message rules: a space in its id.
    let bad = work_document("bad job", "billing-1");
    peer.queue(
        "findAndModify",
        vec![
            Reply::Doc(doc! { "lastErrorObject": { "n": 1, "updatedExisting": true }, "value": bad, "ok": 1 }),
            Reply::Doc(doc! { "lastErrorObject": { "n": 1, "updatedExisting": true }, "value": work_document("job-2", "billing-1"), "ok": 1 }),
        ],
    );
    peer.always("findAndModify", doc! { "lastErrorObject": { "n": 0, "updatedExisting": false }, "value": Bson::Null, "ok": 1 });
    peer.on("update", |c| {
        (c.get_str("update") == Ok("messages") || c.get_str("update") == Ok("dead"))
            .then(|| Reply::Doc(doc! { "n": 1, "nModified": 1, "ok": 1 }))
    });
    let bus = connect(&peer).await;
    let (_worker, mut ran) = recording_worker(
        &bus,
        intracom::WorkOptions::default().poll(Duration::from_millis(50)),
    );
    assert_eq!(
        next_job(&mut ran).await,
        "job-2",
        "the next job runs; the unreadable one never reaches the handler"
    );
    let updates = peer.commands_named("update");
    let settled = updates
        .iter()
        .filter(|c| c.get_str("update") == Ok("messages"))
        .flat_map(statements)
        .find(|s| get(s, "q._id") == &Bson::String("bad job".into()))
        .expect("the unreadable document is settled where it lies");
    assert_eq!(get(&settled, "u.$set.state"), &Bson::String("error".into()));
    assert_eq!(get(&settled, "u.$set.response.dead"), &Bson::Boolean(true));
    let copied = updates
        .iter()
        .filter(|c| c.get_str("update") == Ok("dead"))
        .flat_map(statements)
        .find(|s| get(s, "q._id") == &Bson::String("bad job".into()))
        .expect("and copied to the dead letters");
    assert_eq!(
        get(&copied, "u.$setOnInsert.document._id"),
        &Bson::String("bad job".into())
    );
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_claims_with_find_and_modify_and_settles_in_place() {
    let peer = Peer::replica_set().await;
    peer.accept_setup();
    accept_catalog(&peer);
    peer.queue(
        "aggregate",
        vec![Reply::Doc(cursor_reply(101, "firstBatch", vec![], "t0"))],
    );
    script_get_more(&peer, 101, vec![], "t0");
    peer.queue(
        "findAndModify",
        vec![Reply::Doc(doc! { "lastErrorObject": { "n": 1, "updatedExisting": true }, "value": work_document("job-1", "billing-1"), "ok": 1 })],
    );
    peer.always("findAndModify", doc! { "lastErrorObject": { "n": 0, "updatedExisting": false }, "value": Bson::Null, "ok": 1 });
    peer.on("update", |c| {
        (c.get_str("update") == Ok("messages"))
            .then(|| Reply::Doc(doc! { "n": 1, "nModified": 1, "ok": 1 }))
    });
    let bus = connect(&peer).await;
    let options = intracom::WorkOptions::default()
        .lease(Duration::from_millis(600))
        .poll(Duration::from_millis(50));
    let (_worker, mut ran) = recording_worker(&bus, options);
    assert_eq!(next_job(&mut ran).await, "job-1");

    let claim = peer.wait_for("findAndModify", 1).await.remove(0);
    assert_eq!(claim.get_str("findAndModify"), Ok("messages"));
    // One conjunction: the claim index's equality, the actions, and a lease that is
    // free or ran out by the server's clock.
    assert_eq!(
        claim.get_document("query").unwrap(),
        &doc! { "$and": [
            { "serviceNameDest": "billing", "delivery": "one", "state": "pending" },
            { "action": { "$in": ["invoice.render"] } },
            { "$or": [
                { "lease": Bson::Null },
                { "$expr": { "$lte": [
                    { "$dateAdd": { "startDate": "$lease.at", "unit": "millisecond", "amount": "$lease.ms" } },
                    "$$NOW",
                ] } },
            ] },
        ] }
    );
    assert_eq!(
        claim.get_document("sort").unwrap(),
        &doc! { "priority": -1, "ts": 1 }
    );
    assert_eq!(claim.get_bool("new"), Ok(true));
    // Classic operators, no pipeline: the server stamps the lease with its clock.
    let update = claim
        .get_document("update")
        .expect("a classic update document");
    // The lease names the worker: its instance, then an id of its own.
    let owner = update
        .get_document("$set")
        .and_then(|set| set.get_str("lease.owner"))
        .expect("a lease owner")
        .to_string();
    assert!(
        owner.starts_with("billing-1/") && owner.len() > "billing-1/".len(),
        "{owner}"
    );
    assert_eq!(
        update,
        &doc! {
            "$set": { "lease.owner": &owner, "lease.ms": 600i64 },
            "$currentDate": { "lease.at": true },
            "$inc": { "attempts": 1 },
        }
    );

    // Settled in place, by the lease holder only.
    let mut settle = None;
    for _ in 0..2400 {
        settle = peer
            .commands_named("update")
            .into_iter()
            .filter(|c| c.get_str("update") == Ok("messages"))
            .flat_map(|c| statements(&c))
            .next();
        if settle.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let settle = settle.expect("the worker settled the job");
    assert_eq!(
        settle.get_document("q").unwrap(),
        &doc! { "_id": "job-1", "state": "pending", "lease.owner": &owner }
    );
    assert_eq!(get(&settle, "u.$set.state"), &Bson::String("done".into()));
    assert!(get(&settle, "u.$set.response_ts").as_i64().is_some());
    assert_eq!(
        get(&settle, "u.$unset"),
        &Bson::Document(doc! { "lease": "" })
    );
    bus.shutdown().await;
}

/// Scripts a remote answer: the request is pending until the shared stream reports the
/// update that settles it, then reads as done.
fn script_remote_answer(peer: &Peer, answer: Option<Document>) {
    use std::sync::{Arc, Mutex};
    let request = Arc::new(Mutex::new(None::<String>));
    let settled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = request.clone();
    peer.on("update", move |c| {
        if c.get_str("update") != Ok("messages") {
            return None;
        }
        let first = statements(c).remove(0);
        let id = get(&first, "q._id").as_str().unwrap().to_string();
        if get(&first, "u")
            .as_document()
            .unwrap()
            .contains_key("$setOnInsert")
        {
            *seen.lock().unwrap() = Some(id.clone());
            return Some(Reply::Doc(
                doc! { "n": 1, "nModified": 0, "upserted": [{ "index": 0, "_id": id }], "ok": 1 },
            ));
        }
        Some(Reply::Doc(doc! { "n": 1, "nModified": 1, "ok": 1 }))
    });
    peer.queue(
        "aggregate",
        vec![Reply::Doc(cursor_reply(101, "firstBatch", vec![], "t0"))],
    );
    let (wanted, flag) = (request.clone(), settled.clone());
    let answered = answer.is_some();
    // As mongod reports the settling update: every field it set, the result included.
    let mut updated = doc! { "state": "done" };
    if let Some(result) = &answer {
        updated.insert("result", result.clone());
    }
    peer.on("getMore", move |_| {
        let id = wanted.lock().unwrap().clone();
        match id {
            Some(id) if answered && !flag.swap(true, std::sync::atomic::Ordering::SeqCst) => Some(Reply::Doc(cursor_reply(
                101,
                "nextBatch",
                vec![doc! {
                    "_id": { "_data": "u1" },
                    "operationType": "update",
                    "clusterTime": ts(9),
                    "ns": { "db": "intracom", "coll": "messages" },
                    "documentKey": { "_id": id },
                    "updateDescription": { "updatedFields": updated.clone(), "removedFields": [] },
                }],
                "u1",
            ))),
            _ => Some(Reply::After(Duration::from_millis(100), cursor_reply(101, "nextBatch", vec![], "t0"))),
        }
    });
    peer.on("find", move |c| {
        if c.get_str("find") != Ok("messages") {
            return None;
        }
        let id = request.lock().unwrap().clone().unwrap_or_default();
        let mut d = stored_message(&id, "invoice.get", ts(5));
        d.insert("serviceNameDest", "billing");
        d.insert("delivery", "one");
        d.insert("type", "sync");
        d.insert("queryId", &id);
        match (&answer, settled.load(std::sync::atomic::Ordering::SeqCst)) {
            (Some(result), true) => {
                d.insert("state", "done");
                d.insert("result", result.clone());
            }
            _ => {
                d.insert("state", "pending");
            }
        }
        Some(Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "intracom.messages", "firstBatch": [d] }, "ok": 1 }))
    });
}

fn requester(peer: &Peer) -> Config {
    let mut config = config(peer);
    config.service = "web".into();
    config.instance = Some("web-1".into());
    config
}

fn accept_requester_catalog(peer: &Peer) {
    peer.on("find", |c| {
        (c.get_str("find") == Ok("config")).then(|| {
            Reply::Doc(
                doc! { "cursor": { "id": 0i64, "ns": "intracom.config", "firstBatch": [
                    { "_id": "web", "type": "service", "actions": [] },
                    { "_id": "billing", "type": "service", "actions": ["invoice.get"] },
                ] }, "ok": 1 },
            )
        })
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_for_its_outcome_written_in_place() {
    let peer = Peer::replica_set().await;
    peer.accept_setup();
    accept_requester_catalog(&peer);
    script_remote_answer(&peer, Some(doc! { "total": 1.5 }));
    let bus = Intracom::connect(requester(&peer)).await.unwrap();
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Total {
        total: f64,
    }
    let answer: Total = bus
        .request("billing", "invoice.get", &doc! { "invoice": 42 })
        .timeout(GUARD)
        .await
        .unwrap();
    assert_eq!(answer, Total { total: 1.5 });

    let publish = peer
        .commands_named("update")
        .into_iter()
        .find(|c| c.get_str("update") == Ok("messages"))
        .unwrap();
    let body = get(&statements(&publish)[0], "u.$setOnInsert")
        .as_document()
        .unwrap()
        .clone();
    assert_eq!(body.get_str("delivery"), Ok("one"));
    assert_eq!(body.get_str("state"), Ok("pending"));
    assert_eq!(body.get_str("type"), Ok("sync"));
    assert_eq!(
        body.get_i64("query_ms"),
        Ok(30_000),
        "the caller's time-out is in the request"
    );
    let id = get(&statements(&publish)[0], "q._id")
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(body.get_str("queryId"), Ok(id.as_str()));
    let reads: Vec<Document> = peer
        .commands_named("find")
        .into_iter()
        .filter(|c| c.get_str("find") == Ok("messages"))
        .collect();
    assert!(
        reads
            .iter()
            .all(|r| r.get_document("filter") == Ok(&doc! { "_id": &id })),
        "reads the request document itself"
    );
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_request_is_marked_in_place() {
    let peer = Peer::replica_set().await;
    peer.accept_setup();
    accept_requester_catalog(&peer);
    script_remote_answer(&peer, None);
    let bus = Intracom::connect(requester(&peer)).await.unwrap();
    let err = bus
        .request::<_, Document>("billing", "invoice.get", &doc! { "invoice": 1 })
        .timeout(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    let updates: Vec<Document> = peer
        .commands_named("update")
        .into_iter()
        .filter(|c| c.get_str("update") == Ok("messages"))
        .flat_map(|c| statements(&c))
        .collect();
    let id = get(&updates[0], "q._id").as_str().unwrap().to_string();
    let mark = updates
        .iter()
        .find(|s| get(s, "u").as_document().unwrap().contains_key("$set"))
        .expect("marked");
    assert_eq!(
        mark.get_document("q").unwrap(),
        &doc! { "_id": &id, "state": "pending" },
        "only if nobody answered meanwhile"
    );
    assert_eq!(get(mark, "u.$set.state"), &Bson::String("error".into()));
    assert_eq!(
        get(mark, "u.$set.response.error"),
        &Bson::String("timed out".into())
    );
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_made_while_the_server_is_unreachable_arrive_once_in_order() {
    let peer = Peer::replica_set().await;
    peer.accept_setup();
    accept_catalog(&peer);
    peer.on("update", |c| {
        (c.get_str("update") == Ok("messages")).then(|| {
            let n = c.get_array("updates").map(|u| u.len()).unwrap_or(0) as i32;
            Reply::Doc(doc! { "n": n, "nModified": 0, "ok": 1 })
        })
    });
    let bus = connect(&peer).await;
    let first = bus.publish(Message::broadcast("reload")).await.unwrap();
    assert_eq!(first.status, PublishStatus::Stored);

    peer.refuse_connections(true);
    let mut ids = vec![first.id.clone()];
    for _ in 0..3 {
        let p = bus.publish(Message::broadcast("reload")).await.unwrap();
        assert_eq!(p.status, PublishStatus::Buffered);
        ids.push(p.id);
    }
    peer.refuse_connections(false);

    let mut sent: Vec<String> = Vec::new();
    for _ in 0..600 {
        sent = peer
            .commands_named("update")
            .into_iter()
            .filter(|c| c.get_str("update") == Ok("messages"))
            .flat_map(|c| statements(&c))
            .map(|s| get(&s, "q._id").as_str().unwrap().to_string())
            .collect();
        if sent.len() >= ids.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sent, ids, "every message once, in publish order");
    // The outbox lets a message go once its write is answered, after the peer logged it.
    for _ in 0..600 {
        if bus.outbox_len() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(bus.outbox_len(), 0);
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_refused_by_a_stepping_down_primary_waits_in_the_outbox() {
    let peer = Peer::replica_set().await;
    peer.accept_setup();
    accept_catalog(&peer);
    // The first write of the messages meets an election (NotWritablePrimary, 10107, as
    // a command error: a raw `update` is not retried by the driver), the second a
    // shutdown (InterruptedAtShutdown, 11600, as a write error); then writes succeed.
    let refusals = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = std::sync::Arc::clone(&refusals);
    peer.on("update", move |c| {
        (c.get_str("update") == Ok("messages")).then(|| {
            let n = c.get_array("updates").map(|u| u.len()).unwrap_or(0) as i32;
            match seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                0 => Reply::Doc(doc! { "ok": 0, "code": 10107, "codeName": "NotWritablePrimary", "errmsg": "not primary" }),
                1 => Reply::Doc(doc! { "n": 0, "writeErrors": [{ "index": 0, "code": 11600, "errmsg": "interrupted at shutdown" }], "ok": 1 }),
                _ => Reply::Doc(doc! { "n": n, "nModified": 0, "ok": 1 }),
            }
        })
    });
    let bus = connect(&peer).await;
    let published = bus.publish(Message::broadcast("reload")).await.unwrap();
    assert_eq!(
        published.status,
        PublishStatus::Buffered,
        "not refused for good: kept to be written when a primary takes it"
    );
    let mut sent = Vec::new();
    for _ in 0..600 {
        sent = peer
            .commands_named("update")
            .into_iter()
            .filter(|c| c.get_str("update") == Ok("messages"))
            .flat_map(|c| statements(&c))
            .map(|s| get(&s, "q._id").as_str().unwrap().to_string())
            .collect();
        if sent.len() >= 3 && bus.outbox_len() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        sent,
        vec![published.id.clone(); 3],
        "written again after each refusal, until it is stored"
    );
    assert_eq!(bus.outbox_len(), 0);
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_without_hello_are_asked_is_master() {
    let peer = Peer::replica_set().await;
    peer.without_hello();
    peer.accept_setup();
    accept_catalog(&peer);
    let bus = connect(&peer).await;
    let asked: Vec<String> = peer
        .commands()
        .iter()
        .map(|c| support::peer::command_name(c).to_string())
        .filter(|n| n == "hello" || n == "isMaster")
        .collect();
    assert_eq!(
        asked,
        ["hello", "isMaster"],
        "hello first, then the legacy name"
    );
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_and_stats_read_what_they_report() {
    use intracom::medium::mongo::MongoMedium;
    let peer = Peer::replica_set().await;
    peer.accept_setup();
    accept_catalog(&peer);
    peer.queue(
        "aggregate",
        vec![Reply::Doc(cursor_reply(101, "firstBatch", vec![], "t0"))],
    );
    peer.always(
        "listIndexes",
        doc! { "cursor": { "id": 0i64, "ns": "intracom.messages", "firstBatch": [
            { "v": 2, "key": { "_id": 1 }, "name": "_id_" },
            { "v": 2, "key": { "ts": 1, "_id": 1 }, "name": "ts_1__id_1" },
            { "v": 2, "key": { "at": 1 }, "name": "at_ttl", "expireAfterSeconds": 60 },
        ] }, "ok": 1 },
    );
    // The oldest entry in natural order, the newest write from hello, the fill from
    // $collStats: first a full oplog, then one that has not filled up yet.
    peer.on("find", |c| {
        (c.get_str("find") == Ok("oplog.rs")
            && c.get_document("sort").ok() == Some(&doc! { "$natural": 1 }))
        .then(|| {
            let ts = Timestamp { time: 1_800_000_000, increment: 1 };
            Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "local.oplog.rs", "firstBatch": [{ "ts": ts }] }, "ok": 1 })
        })
    });
    peer.set_last_write(Timestamp {
        time: 1_800_000_100,
        increment: 1,
    });
    let oplog_size = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(990));
    let size = std::sync::Arc::clone(&oplog_size);
    peer.on("aggregate", move |c| {
        (c.get_str("aggregate") == Ok("oplog.rs")).then(|| {
            let size = size.load(std::sync::atomic::Ordering::SeqCst);
            Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "local.oplog.rs", "firstBatch": [
                { "ns": "local.oplog.rs", "storageStats": { "size": size, "maxSize": 1000i64, "capped": true } },
            ] }, "ok": 1 })
        })
    });
    let medium = MongoMedium::connect(&config(&peer)).await.unwrap();
    let checks = medium.doctor().await;
    let by_name = |n: &str| {
        checks
            .iter()
            .find(|c| c.name == n)
            .unwrap_or_else(|| panic!("no check {n}: {checks:#?}"))
    };
    assert!(by_name("topology").ok);
    assert!(by_name("change streams").ok);
    assert!(by_name("index ts_1__id_1").ok);
    assert!(
        !by_name("index work_claim").ok,
        "a missing index is reported"
    );
    let retention = by_name("retention");
    assert!(
        !retention.ok && retention.detail.contains("60 s") && retention.detail.contains("300 s"),
        "{retention:?}"
    );
    let oplog = by_name("oplog window");
    assert!(
        !oplog.ok && oplog.detail.contains("100 s"),
        "100 s of a full oplog is less than 300 s of retention: {oplog:?}"
    );
    assert!(oplog
        .fix
        .as_deref()
        .is_some_and(|f| f.contains("replSetResizeOplog")));
    // A young deployment: the oplog has not filled up, its window says nothing yet.
    oplog_size.store(100, std::sync::atomic::Ordering::SeqCst);
    let young = medium.doctor().await;
    let oplog = young
        .iter()
        .find(|c| c.name == "oplog window")
        .expect("the oplog check");
    assert!(
        oplog.ok && oplog.detail.contains("not full yet"),
        "an oplog that has not filled up is not too small: {oplog:?}"
    );

    peer.on("aggregate", |c| {
        c.get_array("pipeline")
            .ok()?
            .first()?
            .as_document()?
            .get_document("$facet")
            .ok()?;
        Some(Reply::Doc(
            doc! { "cursor": { "id": 0i64, "ns": "intracom.messages", "firstBatch": [{
                "total": [{ "n": 3 }],
                "byService": [{ "_id": "billing", "n": 3 }],
                "byAction": [{ "_id": "reload", "n": 2 }, { "_id": "invoice.render", "n": 1 }],
                "byType": [{ "_id": "broadcast", "n": 3 }],
                "byState": [{ "_id": "pending", "n": 1 }],
                "queue": [{ "n": 1 }],
                "newest": [{ "_id": "m3", "ts": Timestamp { time: 1_800_000_050, increment: 1 } }],
            }] }, "ok": 1 },
        ))
    });
    peer.always("count", doc! { "n": 0, "ok": 1 });
    peer.on("find", |c| {
        (c.get_str("find") == Ok("checkpoints")).then(|| {
            Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "intracom.checkpoints", "firstBatch": [
                { "_id": "billing-cache", "position": { "ts": Timestamp { time: 1_800_000_020, increment: 1 } } },
            ] }, "ok": 1 })
        })
    });
    peer.on("aggregate", |c| {
        // count_documents is an aggregate with $match and $group.
        let stages = c.get_array("pipeline").ok()?;
        stages.iter().any(|s| s.as_document().is_some_and(|d| d.contains_key("$group"))).then(|| {
            let behind = if c.get_str("aggregate") == Ok("dead") { 4 } else { 2 };
            Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "intracom.x", "firstBatch": [{ "_id": 1, "n": behind }] }, "ok": 1 })
        })
    });
    let stats = medium.admin_stats().await.unwrap();
    assert_eq!(stats.total, 3);
    assert_eq!(
        stats.by_action,
        [
            intracom::medium::Count::new("reload", 2),
            intracom::medium::Count::new("invoice.render", 1)
        ]
    );
    assert_eq!(stats.queue_depth, 1);
    assert_eq!(stats.dead, 4);
    assert_eq!(
        stats.lag,
        [intracom::medium::Lag::new("billing-cache", 2, 30)],
        "2 messages and 30 s behind the newest"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_reserves_with_a_server_stamped_upsert_and_reads_the_holder_on_duplicate_key() {
    use intracom::medium::mongo::MongoMedium;
    use intracom::medium::Records;
    use intracom::medium::Reservation;
    let peer = Peer::replica_set().await;
    peer.accept_setup();
    let now = intracom::bson::DateTime::now().timestamp_millis();
    let (recent, old) = (
        intracom::bson::DateTime::from_millis(now - 1_000),
        intracom::bson::DateTime::from_millis(now - 120_000),
    );
    // The reserving upserts: the first inserts, the others meet the unique index. Other
    // updates (the take-over) match.
    let mut upserts = vec![
        doc! { "n": 1, "nModified": 0, "upserted": [{ "index": 0, "_id": "r1" }], "ok": 1 },
        doc! { "n": 0, "writeErrors": [{ "index": 0, "code": 11000, "errmsg": "E11000 duplicate key" }], "ok": 1 },
        doc! { "n": 0, "writeErrors": [{ "index": 0, "code": 11000, "errmsg": "E11000 duplicate key" }], "ok": 1 },
        doc! { "n": 0, "writeErrors": [{ "index": 0, "code": 11000, "errmsg": "E11000 duplicate key" }], "ok": 1 },
    ]
    .into_iter();
    peer.on("update", move |c| {
        (c.get_str("update") == Ok("processed")).then(|| {
            let upsert = statements(c)
                .first()
                .is_some_and(|s| s.get_bool("upsert") == Ok(true));
            Reply::Doc(match upsert.then(|| upserts.next()).flatten() {
                Some(reply) => reply,
                None => doc! { "n": 1, "nModified": 1, "ok": 1 },
            })
        })
    });
    // A holder stamped a second ago for a minute (live by the server's clock), one
    // stamped two minutes ago for a minute (lapsed), and a done record.
    let holder = |at: intracom::bson::DateTime, state: &str| {
        doc! { "consumer": "ledger", "messageId": "m1", "state": state, "owner": "other/1", "at": at, "ms": 60_000i64, "result": { "n": 3 } }
    };
    let (live, lapsed, done) = (
        holder(recent, "running"),
        holder(old, "running"),
        holder(recent, "done"),
    );
    peer.queue(
        "find",
        vec![
            Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "intracom.processed", "firstBatch": [live] }, "ok": 1 }),
            Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "intracom.processed", "firstBatch": [lapsed] }, "ok": 1 }),
            Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "intracom.processed", "firstBatch": [done] }, "ok": 1 }),
        ],
    );
    let medium = MongoMedium::connect(&config(&peer)).await.unwrap();
    let lease = Duration::from_secs(30);
    assert_eq!(
        medium
            .processed_reserve("ledger", "m1", "me/1", lease)
            .await
            .unwrap(),
        Reservation::Reserved
    );
    assert_eq!(
        medium
            .processed_reserve("ledger", "m1", "me/1", lease)
            .await
            .unwrap(),
        Reservation::Busy,
        "a live holder"
    );
    assert_eq!(
        medium
            .processed_reserve("ledger", "m1", "me/1", lease)
            .await
            .unwrap(),
        Reservation::Reserved,
        "a lapsed lease is taken over"
    );
    assert_eq!(
        medium
            .processed_reserve("ledger", "m1", "me/1", lease)
            .await
            .unwrap(),
        Reservation::Done(Some(doc! { "n": 3 }))
    );

    let updates: Vec<Document> = peer
        .commands_named("update")
        .into_iter()
        .filter(|c| c.get_str("update") == Ok("processed"))
        .flat_map(|c| statements(&c))
        .collect();
    let reserve = &updates[0];
    assert_eq!(reserve.get_bool("upsert"), Ok(true));
    assert_eq!(
        reserve.get_document("q").unwrap(),
        &doc! { "consumer": "ledger", "messageId": "m1", "at": { "$exists": false } },
        "an upsert that only inserts"
    );
    assert_eq!(
        reserve.get_document("u").unwrap(),
        &doc! {
            "$setOnInsert": { "state": "running", "owner": "me/1", "ms": 30_000i64 },
            "$currentDate": { "at": true },
        },
        "stamped by the server's clock"
    );
    let take_over = updates
        .iter()
        .find(|s| s.get_bool("upsert") != Ok(true))
        .expect("a take-over");
    assert_eq!(
        take_over.get_document("q").unwrap(),
        &doc! { "consumer": "ledger", "messageId": "m1", "state": "running", "at": old, "owner": "other/1" },
        "only if the lapsed lease is still the one seen"
    );
    assert_eq!(get(take_over, "u.$set.owner"), &Bson::String("me/1".into()));
    assert_eq!(get(take_over, "u.$currentDate.at"), &Bson::Boolean(true));
    assert!(
        peer.commands_named("hello").len() + peer.commands_named("isMaster").len() > 0,
        "the server's clock is read to judge a holder"
    );
}

/// Whether an `aggregate` opens a named subscriber's own stream (its `$match` carries
/// the subscriber's filter), not the process's shared one.
fn is_subscriber_stream(aggregate: &Document) -> bool {
    format!("{aggregate}").contains("fullDocument.action")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_named_subscription_caught_up_by_ts_delivers_nothing_acked_before_its_checkpoint(
) {
    // The checkpoint came from a change stream: its resume token and cluster time.
    restarted_then_caught_up_by_ts(doc! { "id": "m5", "rt": { "_data": "t5" }, "ct": ts(5) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_named_subscription_whose_checkpoint_came_from_a_catch_up_delivers_nothing_acked_before_it(
) {
    // The checkpoint was saved while the subscription caught up by `ts`: only its id.
    restarted_then_caught_up_by_ts(doc! { "id": "m5" }).await;
}

/// The previous run of the process was delivered m3, m4 and m5 (in that order) and
/// acked them: its checkpoint is m5 (`token`). This run resumes, and then a lost
/// connection makes it catch up from the collection by `ts`, whose look-back window
/// reads m3..m5 again (with m6, written during the outage). Only m6 is new.
async fn restarted_then_caught_up_by_ts(token: Document) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let peer = Peer::replica_set().await;
    peer.set_clock(SCRIPT_CLOCK);
    peer.accept_setup();
    accept_catalog(&peer);
    let saved = doc! {
        "_id": "billing-cache",
        "position": { "ts": ts(5), "token": token },
    };
    accept_checkpoints(&peer, Some(saved));
    let (m3, m4, m5, m6) = (
        stored_message("m3", "reload", ts(3)),
        stored_message("m4", "reload", ts(4)),
        stored_message("m5", "reload", ts(5)),
        stored_message("m6", "reload", ts(6)),
    );
    // The streams answer as mongod would: the subscriber's stream after t5 has nothing
    // yet; from an operation time, it has m3..m5 first. The shared stream is cursor 101,
    // and 104 once it is restarted; the driver's own resume of 101 fails.
    let before = vec![
        insert_event("t3", m3.clone(), ts(3)),
        insert_event("t4", m4.clone(), ts(4)),
        insert_event("t5", m5.clone(), ts(5)),
    ];
    let mut shared_streams = 0;
    peer.on("aggregate", move |c| {
        let stage = change_stream_stage(c);
        if is_subscriber_stream(c) {
            let events = if stage.contains_key("startAtOperationTime") {
                before.clone()
            } else {
                vec![]
            };
            return Some(Reply::Doc(cursor_reply(102, "firstBatch", events, "t5")));
        }
        if stage.contains_key("resumeAfter") {
            return Some(Reply::Drop);
        }
        shared_streams += 1;
        let cursor = if shared_streams == 1 { 101 } else { 104 };
        Some(Reply::Doc(cursor_reply(cursor, "firstBatch", vec![], "t5")))
    });
    script_get_more(&peer, 102, vec![], "t5");
    // The shared stream's connection is lost once the subscriber has handed over to it
    // (its own stream closed).
    let closed = Arc::new(AtomicBool::new(false));
    let closing = Arc::clone(&closed);
    peer.on("killCursors", move |c| {
        if c.get_array("cursors")
            .is_ok_and(|k| k.contains(&Bson::Int64(102)))
        {
            closing.store(true, Ordering::SeqCst);
        }
        None
    });
    let mut dropped = false;
    peer.on("getMore", move |c| {
        if c.get_i64("getMore") != Ok(101) {
            return None;
        }
        if !dropped && closed.load(Ordering::SeqCst) {
            dropped = true;
            return Some(Reply::Drop);
        }
        Some(Reply::After(
            Duration::from_millis(100),
            cursor_reply(101, "nextBatch", vec![], "t5"),
        ))
    });
    let scanned = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&scanned);
    peer.on("find", move |c| {
        (c.get_str("find") == Ok("messages") && c.get_str("comment").is_err()).then(|| {
            flag.store(true, Ordering::SeqCst);
            let batch = vec![m3.clone(), m4.clone(), m5.clone(), m6.clone()];
            Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "intracom.messages", "firstBatch": batch }, "ok": 1 })
        })
    });
    // m7 comes on the restarted shared stream after the catch-up.
    let mut m7 = Some(insert_event(
        "t7",
        stored_message("m7", "reload", ts_at(10, 7)),
        ts_at(10, 7),
    ));
    peer.on("getMore", move |c| {
        if c.get_i64("getMore") != Ok(104) {
            return None;
        }
        let event = if scanned.load(Ordering::SeqCst) {
            m7.take()
        } else {
            None
        };
        Some(match event {
            Some(event) => Reply::Doc(cursor_reply(104, "nextBatch", vec![event], "t7")),
            None => Reply::After(
                Duration::from_millis(100),
                cursor_reply(104, "nextBatch", vec![], "t7"),
            ),
        })
    });
    let bus = connect(&peer).await;
    let mut sub = bus
        .subscribe(Subscription::named("billing-cache").actions(["reload"]))
        .await
        .unwrap();
    let got = vec![next_id(&mut sub).await, next_id(&mut sub).await];
    assert_eq!(
        got,
        ["m6", "m7"],
        "what was acked before the restart is not delivered again"
    );
    let resumed = peer
        .commands_named("aggregate")
        .into_iter()
        .find(is_subscriber_stream)
        .unwrap();
    assert_eq!(
        change_stream_stage(&resumed)
            .get_timestamp("startAtOperationTime")
            .unwrap(),
        Timestamp {
            time: ts(5).time - 2,
            increment: 0
        },
        "the subscriber's stream starts a safety window before its checkpoint"
    );
    bus.shutdown().await;
}

/// A stamp `secs` seconds after [`ts`]'s.
fn ts_at(secs: u32, increment: u32) -> Timestamp {
    Timestamp {
        time: ts(0).time + secs,
        increment,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_from_a_stream_that_lived_through_a_lost_connection_is_not_delivered_again() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    // A subscriber from the beginning reads e and m (5 s apart: more than the safety
    // window of 2 s) from the collection. Meanwhile the shared stream loses its
    // connection, and the driver's own resume of it reports e, which the catch-up
    // already delivered (and, more than a window older than m, no longer remembers by
    // id). The stream lived through a lost connection: it is restarted, and what it
    // said after the loss is read from the collection, not from it.
    let peer = Peer::replica_set().await;
    // Both settled when the catch-up begins.
    peer.set_clock(ts_at(5, 0).time + 3);
    peer.accept_setup();
    accept_catalog(&peer);
    let (e, m) = (
        stored_message("e", "reload", ts_at(0, 1)),
        stored_message("m", "reload", ts_at(5, 1)),
    );
    let mut fresh = 0;
    let resumed_event = insert_event("te", e.clone(), ts_at(0, 1));
    peer.on("aggregate", move |c| {
        if change_stream_stage(c).contains_key("resumeAfter") {
            return Some(Reply::Doc(cursor_reply(
                102,
                "firstBatch",
                vec![resumed_event.clone()],
                "te",
            )));
        }
        fresh += 1;
        let cursor = if fresh == 1 { 101 } else { 103 };
        Some(Reply::Doc(cursor_reply(cursor, "firstBatch", vec![], "t0")))
    });
    // The collection, read by `ts` within a pass's bounds: n too once it is written.
    let scanned = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&scanned);
    let n_written = Arc::new(AtomicBool::new(false));
    let written = Arc::clone(&n_written);
    let n_stored = stored_message("n", "reload", ts_at(9, 1));
    let (se, sm, sn) = (e.clone(), m.clone(), n_stored.clone());
    peer.on("find", move |c| {
        (c.get_str("find") == Ok("messages") && c.get_str("comment").is_err()).then(|| {
            flag.store(true, Ordering::SeqCst);
            let lower = scan_lower(c).unwrap_or(ts(0));
            let mut all = vec![se.clone(), sm.clone()];
            if written.load(Ordering::SeqCst) {
                all.push(sn.clone());
            }
            let batch: Vec<Document> = all
                .into_iter()
                .filter(|d| within(d, lower, scan_upper(c)))
                .collect();
            Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "intracom.messages", "firstBatch": batch }, "ok": 1 })
        })
    });
    // The shared stream's connection is lost once the catch-up has read the collection.
    let gate = Arc::clone(&scanned);
    let mut dropped = false;
    peer.on("getMore", move |c| {
        if c.get_i64("getMore") != Ok(101) {
            return None;
        }
        if !dropped && gate.load(Ordering::SeqCst) {
            dropped = true;
            return Some(Reply::Drop);
        }
        Some(Reply::After(
            Duration::from_millis(100),
            cursor_reply(101, "nextBatch", vec![], "t0"),
        ))
    });
    script_get_more(&peer, 102, vec![], "te");
    // The restarted stream reports n once it has been asked for twice (after the
    // catch-up that follows the restart).
    let mut asked = 0;
    let mut n = Some(insert_event("tn", n_stored, ts_at(9, 1)));
    peer.on("getMore", move |c| {
        if c.get_i64("getMore") != Ok(103) {
            return None;
        }
        asked += 1;
        let event = n.take_if(|_| asked > 2);
        if event.is_some() {
            n_written.store(true, Ordering::SeqCst);
        }
        Some(match event {
            Some(event) => Reply::Doc(cursor_reply(103, "nextBatch", vec![event], "tn")),
            None => Reply::After(
                Duration::from_millis(100),
                cursor_reply(103, "nextBatch", vec![], "tn"),
            ),
        })
    });
    let bus = connect(&peer).await;
    let mut sub = bus
        .subscribe(Subscription::new().from_beginning())
        .await
        .unwrap();
    let got = vec![
        next_id(&mut sub).await,
        next_id(&mut sub).await,
        next_id(&mut sub).await,
    ];
    assert_eq!(got, ["e", "m", "n"], "each once, in order");
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_committed_behind_a_catch_up_comes_once_in_stamp_order() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    // Stamps of whole seconds, as both test servers write them: "a" is stamped in the
    // same second as "b" with a lower id, and commits after the catch-up's first read
    // (within the safety window of its stamp). A catch-up reads only what is settled
    // by the server's clock: it delivers a before b, in stamp order, once; the stream
    // reports a again after the hand-over, and a later catch-up reads it again: neither
    // delivers it twice.
    let peer = Peer::replica_set().await;
    peer.set_clock(ts_at(1, 0).time);
    peer.accept_setup();
    accept_catalog(&peer);
    let (a, b, d) = (
        stored_message("a", "reload", ts_at(0, 0)),
        stored_message("b", "reload", ts_at(0, 0)),
        stored_message("d", "reload", ts_at(1, 0)),
    );
    let mut fresh = 0;
    peer.on("aggregate", move |_| {
        fresh += 1;
        let cursor = if fresh == 1 { 101 } else { 103 };
        Some(Reply::Doc(cursor_reply(cursor, "firstBatch", vec![], "t0")))
    });
    // The collection: b and d at the first read, a too afterwards; answered within the
    // pass's bounds, in (ts, _id) order.
    let finds = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&finds);
    let m_stored = stored_message("m", "reload", ts_at(3, 0));
    let m_written = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let written = Arc::clone(&m_written);
    let (sa, sb, sd, sm) = (a.clone(), b.clone(), d.clone(), m_stored.clone());
    peer.on("find", move |c| {
        (c.get_str("find") == Ok("messages") && c.get_str("comment").is_err()).then(|| {
            let lower = scan_lower(c).unwrap_or(ts(0));
            let mut batch = vec![sb.clone(), sd.clone()];
            if count.fetch_add(1, Ordering::SeqCst) > 0 {
                batch.insert(0, sa.clone());
            }
            if written.load(Ordering::SeqCst) {
                batch.push(sm.clone());
            }
            batch.retain(|d| within(d, lower, scan_upper(c)));
            Reply::Doc(doc! { "cursor": { "id": 0i64, "ns": "intracom.messages", "firstBatch": batch }, "ok": 1 })
        })
    });
    // Once the catch-up has read, the stream reports a, then loses its history (a new
    // catch-up, which reads a again).
    let read = Arc::clone(&finds);
    let mut step = 0;
    peer.on("getMore", move |c| {
        if c.get_i64("getMore") != Ok(101) {
            return None;
        }
        if read.load(Ordering::SeqCst) == 0 {
            return Some(Reply::After(
                Duration::from_millis(100),
                cursor_reply(101, "nextBatch", vec![], "t0"),
            ));
        }
        step += 1;
        Some(match step {
            1 => Reply::Doc(cursor_reply(
                101,
                "nextBatch",
                vec![insert_event("ta", a.clone(), ts_at(1, 7))],
                "ta",
            )),
            2..=40 => Reply::After(
                Duration::from_millis(100),
                cursor_reply(101, "nextBatch", vec![], "ta"),
            ),
            _ => Reply::Doc(error(
                286,
                "ChangeStreamHistoryLost",
                "Resume of change stream was not possible",
            )),
        })
    });
    // m is written later: the restarted stream reports it.
    let mut asked = 0;
    let mut m = Some(insert_event("tm", m_stored, ts_at(3, 1)));
    peer.on("getMore", move |c| {
        if c.get_i64("getMore") != Ok(103) {
            return None;
        }
        asked += 1;
        let event = m.take_if(|_| asked > 2);
        if event.is_some() {
            m_written.store(true, Ordering::SeqCst);
        }
        Some(match event {
            Some(event) => Reply::Doc(cursor_reply(103, "nextBatch", vec![event], "tm")),
            None => Reply::After(
                Duration::from_millis(100),
                cursor_reply(103, "nextBatch", vec![], "tm"),
            ),
        })
    });
    let bus = connect(&peer).await;
    let mut sub = bus
        .subscribe(Subscription::new().from_beginning())
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(next_id(&mut sub).await);
    }
    assert_eq!(
        got,
        ["a", "b", "d", "m"],
        "each once, in stamp order, none lost"
    );
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_from_a_settled_catch_up_position_delivers_nothing_it_covers() {
    // The previous run caught up by `ts` and was acked up to m5, which a settled pass
    // delivered: every message up to (ts(5), "m5") was handled, and above it m8 (which
    // its ring had delivered before the catch-up). m2 sorts below the checkpoint but
    // committed after it (it is in the collection now): handled too.
    let peer = Peer::replica_set().await;
    peer.set_clock(SCRIPT_CLOCK);
    peer.accept_setup();
    accept_catalog(&peer);
    let saved = doc! {
        "_id": "billing-cache",
        "position": { "ts": ts(5), "token": { "id": "m5", "s": true, "a": ["m8"], "at": ts(8) } },
    };
    accept_checkpoints(&peer, Some(saved));
    let stored: Vec<Document> = [
        (2, "m2"),
        (4, "m4"),
        (5, "m5"),
        (6, "m6"),
        (8, "m8"),
        (9, "m9"),
    ]
    .into_iter()
    .map(|(i, id)| stored_message(id, "reload", ts(i)))
    .collect();
    peer.on("aggregate", move |c| {
        assert!(
            !change_stream_stage(c).contains_key("startAtOperationTime"),
            "a settled position is resumed from the collection, not the oplog"
        );
        Some(Reply::Doc(cursor_reply(101, "firstBatch", vec![], "t0")))
    });
    let (scanned, lowers) = serve_scans(&peer, stored);
    // A later message on the shared stream, once the catch-up has read.
    let m10 = insert_event(
        "t10",
        stored_message("m10", "reload", ts_at(10, 0)),
        ts_at(10, 1),
    );
    one_event_after_a_scan(&peer, scanned, m10, "t10");
    let bus = connect(&peer).await;
    let mut sub = bus
        .subscribe(Subscription::named("billing-cache").actions(["reload"]))
        .await
        .unwrap();
    let got = vec![
        next_id(&mut sub).await,
        next_id(&mut sub).await,
        next_id(&mut sub).await,
    ];
    assert_eq!(
        got,
        ["m6", "m9", "m10"],
        "nothing at or below the checkpoint, nor what it names, comes again"
    );
    assert!(
        lowers.lock().unwrap()[0] < ts(5),
        "the collection is read from a safety window before the checkpoint"
    );
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_whose_window_left_the_oplog_skips_what_its_checkpoint_names() {
    // The previous run followed the stream and was acked up to m5 (its event's token and
    // cluster time); its position names m3 and m4, delivered within the safety window
    // before it. The oplog no longer holds that window: the restart reads the collection
    // from a window before the checkpoint. m4b, stamped before m5, committed after it
    // and was never delivered.
    let peer = Peer::replica_set().await;
    peer.set_clock(SCRIPT_CLOCK);
    peer.accept_setup();
    accept_catalog(&peer);
    let saved = doc! {
        "_id": "billing-cache",
        "position": { "ts": ts(5), "token": {
            "id": "m5", "rt": { "_data": "t5" }, "ct": ts(5), "a": ["m3", "m4"], "at": ts(4),
        } },
    };
    accept_checkpoints(&peer, Some(saved));
    let stored: Vec<Document> = [(3, "m3"), (4, "m4"), (4, "m4b"), (5, "m5"), (6, "m6")]
        .into_iter()
        .map(|(i, id)| stored_message(id, "reload", ts(i)))
        .collect();
    peer.on("aggregate", move |c| {
        let stage = change_stream_stage(c);
        if is_subscriber_stream(c)
            && (stage.contains_key("startAtOperationTime") || stage.contains_key("resumeAfter"))
        {
            return Some(Reply::Doc(error(
                286,
                "ChangeStreamHistoryLost",
                "Resume of change stream was not possible, as the resume point may no longer be in the oplog",
            )));
        }
        Some(Reply::Doc(cursor_reply(101, "firstBatch", vec![], "t0")))
    });
    let (scanned, _) = serve_scans(&peer, stored);
    let m7 = insert_event(
        "t7",
        stored_message("m7", "reload", ts_at(10, 0)),
        ts_at(10, 1),
    );
    one_event_after_a_scan(&peer, scanned, m7, "t7");
    let bus = connect(&peer).await;
    let mut sub = bus
        .subscribe(Subscription::named("billing-cache").actions(["reload"]))
        .await
        .unwrap();
    let got = vec![
        next_id(&mut sub).await,
        next_id(&mut sub).await,
        next_id(&mut sub).await,
    ];
    assert_eq!(
        got,
        ["m4b", "m6", "m7"],
        "what the checkpoint names is not delivered again; what committed after it is"
    );
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_from_the_stream_names_what_was_delivered_within_the_window_before_it() {
    let peer = Peer::replica_set().await;
    peer.accept_setup();
    accept_catalog(&peer);
    accept_checkpoints(&peer, None);
    peer.queue(
        "aggregate",
        vec![Reply::Doc(cursor_reply(101, "firstBatch", vec![], "t0"))],
    );
    // m1 and m2 in one second; m3 more than the safety window (2 s) later.
    script_get_more(
        &peer,
        101,
        vec![vec![
            insert_event("t1", stored_message("m1", "reload", ts(1)), ts(1)),
            insert_event("t2", stored_message("m2", "reload", ts(2)), ts(2)),
            insert_event(
                "t3",
                stored_message("m3", "reload", ts_at(10, 0)),
                ts_at(10, 1),
            ),
        ]],
        "t3",
    );
    let bus = connect(&peer).await;
    let mut sub = bus.subscribe(Subscription::named("ledger")).await.unwrap();
    let mut saved = Vec::new();
    for _ in 0..3 {
        let delivery = tokio::time::timeout(GUARD, sub.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        delivery.ack().await.unwrap();
        let saves: Vec<Document> = peer
            .commands_named("update")
            .into_iter()
            .filter(|c| c.get_str("update") == Ok("checkpoints"))
            .collect();
        let statement = saves.last().unwrap().get_array("updates").unwrap()[0]
            .as_document()
            .unwrap()
            .clone();
        saved.push(
            get(&statement, "u.$set.position.token")
                .as_document()
                .unwrap()
                .clone(),
        );
    }
    let named = |token: &Document| -> Vec<String> {
        token
            .get_array("a")
            .map(|a| {
                a.iter()
                    .filter_map(|b| b.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(named(&saved[0]), Vec::<String>::new(), "nothing before m1");
    assert_eq!(named(&saved[1]), ["m1"], "m1, within the window before m2");
    assert_eq!(
        named(&saved[2]),
        Vec::<String>::new(),
        "m1 and m2 are more than a window before m3"
    );
    bus.shutdown().await;
}
