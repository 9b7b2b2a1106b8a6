//! MongoDB-specific behaviours on real servers: TTL, validator, dead letters, a token
//! from a dropped collection, one change stream for many subscribers.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use intracom::bson::{doc, Document};
use intracom::medium::mongo::MongoMedium;
use intracom::{Config, Intracom, Message, Subscription};

use crate::conformance::{expect_marker_next, next};
use crate::servers::Target;
use crate::{catalog, check, database_name, eventually, on_server, raw_client, Check};

pub fn checks() -> Vec<Check> {
    vec![
        check!(ttl_index_deletes_expired_messages),
        check!(a_token_from_a_dropped_collection_falls_back_to_the_collection),
        check!(dropping_the_collection_under_live_subscribers_loses_nothing_after),
        check!(a_position_with_a_token_the_server_refuses_reads_the_collection),
        check!(twenty_subscribers_do_not_need_twenty_connections),
        check!(a_subscriber_overrun_by_the_event_buffer_catches_up_without_gap_or_duplicate),
        check!(capped_a_subscriber_overrun_by_the_event_buffer_catches_up_without_gap_or_duplicate),
        check!(hand_written_documents_are_validated_or_dead_lettered),
        check!(a_request_settled_by_hand_is_answered_with_what_is_stored),
        check!(a_billing_process_reads_no_event_for_users),
        check!(the_selection_follows_subscriptions_without_gap_or_duplicate),
        check!(streams_read_from_secondaries_when_preferred),
    ]
}

/// The catalog of the selection tests: billing and users.
fn two_services(service: &str, instance: &str) -> Config {
    Config::builder()
        .service(service)
        .instance(instance)
        .sender("billing", ["reload", "marker"])
        .sender("users", ["reload"])
        .build()
        .expect("config")
}

/// How many change events a medium's hub read.
fn hub_events(medium: &MongoMedium) -> u64 {
    medium.counters().hub_events
}

/// A process whose only subscription is for `billing` reads, on its change stream, the
/// messages to billing and the broadcasts, and no event of the messages to `users`:
/// the server selects them out (counted as the events the hub reads, not as
/// deliveries, which the in-memory filter would cut anyway). The same process with
/// `hub.selection=everything` reads them all.
async fn a_billing_process_reads_no_event_for_users(t: &Target) {
    let uri = t.uri().expect("server");
    let database = database_name();
    let sender = Intracom::connect(on_server(two_services("users", "users-1"), &uri, &database))
        .await
        .unwrap();
    let mut processes = Vec::new();
    for selection in ["targeted", "everything"] {
        let mut config = on_server(two_services("billing", "billing-1"), &uri, &database);
        config
            .set("common.intracom.db.hub.selection", selection)
            .unwrap();
        let medium = Arc::new(MongoMedium::connect(&config).await.unwrap());
        let bus = Intracom::with_medium(config, medium.clone()).await.unwrap();
        let sub = bus.subscribe(Subscription::new()).await.unwrap();
        let before = hub_events(&medium);
        processes.push((selection, medium, bus, sub, before));
    }
    let to_users = 20;
    sender
        .publish_all(
            (0..to_users)
                .map(|_| Message::to_service("users", "reload"))
                .collect(),
        )
        .await
        .unwrap();
    let to_billing = sender
        .publish(Message::to_service("billing", "reload"))
        .await
        .unwrap();
    let broadcast = sender.publish(Message::broadcast("reload")).await.unwrap();
    for (selection, medium, _bus, sub, before) in &mut processes {
        assert_eq!(next(sub).await.id, to_billing.id, "{selection}");
        assert_eq!(next(sub).await.id, broadcast.id, "{selection}");
        let read = hub_events(medium) - *before;
        match *selection {
            "targeted" => assert_eq!(
                read, 2,
                "targeted: the message to billing and the broadcast, no event for users"
            ),
            _ => assert_eq!(read, to_users + 2, "everything: every insert"),
        }
    }
    for (_, _, bus, _, _) in processes {
        bus.shutdown().await;
    }
    sender.shutdown().await;
    drop_database(&uri, &database).await;
}

/// Under a steady flow of messages to billing, subscriptions for `users`, for one
/// instance and a monitor come and go in the same process: each change reopens the
/// process's stream from its last token with a new selection. The billing subscriber
/// receives every message once, in order; each newcomer receives what is published
/// after it subscribed.
async fn the_selection_follows_subscriptions_without_gap_or_duplicate(t: &Target) {
    let uri = t.uri().expect("server");
    let database = database_name();
    let config = on_server(two_services("billing", "billing-1"), &uri, &database);
    let medium = Arc::new(MongoMedium::connect(&config).await.unwrap());
    let bus = Intracom::with_medium(config, medium.clone()).await.unwrap();
    let users = Intracom::with_medium(
        on_server(two_services("users", "users-1"), &uri, &database),
        medium.clone(),
    )
    .await
    .unwrap();
    let mut billing = bus.subscribe(Subscription::new()).await.unwrap();
    let sender = Intracom::connect(on_server(two_services("users", "users-9"), &uri, &database))
        .await
        .unwrap();
    let flow = {
        let sender = sender.clone();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for _ in 0..60 {
                for p in sender
                    .publish_all(
                        (0..5)
                            .map(|_| Message::to_service("billing", "reload"))
                            .collect(),
                    )
                    .await
                    .unwrap()
                {
                    sent.push(p.id);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        })
    };
    let selections = medium.counters().hub_selections;
    for round in 0..3 {
        let mut newcomer = match round {
            0 => users.subscribe(Subscription::new()).await.unwrap(),
            1 => users
                .subscribe(Subscription::new().from_beginning())
                .await
                .unwrap(),
            _ => users.subscribe(Subscription::monitor()).await.unwrap(),
        };
        let to_users = sender
            .publish(Message::to_service("users", "reload"))
            .await
            .unwrap();
        loop {
            let d = next(&mut newcomer).await;
            if d.id == to_users.id {
                break;
            }
            assert!(
                round > 0,
                "a subscription from now receives only what came after it: {:?}",
                d.id
            );
        }
        drop(newcomer);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sent = flow.await.unwrap();
    for id in &sent {
        assert_eq!(
            &next(&mut billing).await.id,
            id,
            "in order, once, nothing missing"
        );
    }
    expect_marker_next(&bus, &mut [&mut billing]).await;
    assert!(
        medium.counters().hub_selections >= selections + 3,
        "the stream was reopened as the selection changed"
    );
    users.shutdown().await;
    bus.shutdown().await;
    sender.shutdown().await;
    drop_database(&uri, &database).await;
}

/// `common.intracom.db.read_preference=secondaryPreferred`: the change streams go to a
/// secondary when the replica set has one, to the primary otherwise (a single-node set,
/// as the test servers are): delivery and request outcomes work as with the primary.
async fn streams_read_from_secondaries_when_preferred(t: &Target) {
    let uri = t.uri().expect("server");
    let database = database_name();
    let mut config = on_server(two_services("billing", "billing-1"), &uri, &database);
    config
        .set("common.intracom.db.read_preference", "secondaryPreferred")
        .unwrap();
    let bus = Intracom::connect(config).await.unwrap();
    let mut sub = bus.subscribe(Subscription::new()).await.unwrap();
    let sent = bus
        .publish(Message::to_service("billing", "reload"))
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await.id, sent.id);
    bus.shutdown().await;
    drop_database(&uri, &database).await;
}

async fn drop_database(uri: &str, name: &str) {
    raw_client(uri).await.database(name).drop().await.ok();
}

async fn ttl_index_deletes_expired_messages(t: &Target) {
    let uri = t.uri().expect("server");
    let database = database_name();
    let config = Config::builder()
        .service("billing")
        .instance("billing-1")
        .sender("billing", ["reload"])
        .timeout_ms(2_000)
        .build()
        .unwrap();
    let bus = Intracom::connect(on_server(config, &uri, &database))
        .await
        .unwrap();
    let published = bus.publish(Message::broadcast("reload")).await.unwrap();
    let db = raw_client(&uri).await.database(&database);
    let indexes: Vec<Document> = db
        .run_command(doc! { "listIndexes": "messages" })
        .await
        .unwrap()
        .get_document("cursor")
        .unwrap()
        .get_array("firstBatch")
        .unwrap()
        .iter()
        .filter_map(|b| b.as_document().cloned())
        .collect();
    let ttl = indexes
        .iter()
        .find(|i| i.get_document("key") == Ok(&doc! { "at": 1 }))
        .expect("TTL index on at");
    assert_eq!(
        ttl.get_i32("expireAfterSeconds")
            .map(i64::from)
            .or_else(|_| ttl.get_i64("expireAfterSeconds")),
        Ok(2)
    );
    let messages = db.collection::<Document>("messages");
    let stored = messages
        .find_one(doc! { "_id": &published.id })
        .await
        .unwrap()
        .expect("stored");
    assert!(
        stored.get_timestamp("ts").is_ok(),
        "ts is a server Timestamp: {stored}"
    );
    assert!(
        stored.get_datetime("at").is_ok(),
        "at is a server Date: {stored}"
    );
    eventually(
        "the TTL monitor deletes the message",
        Duration::from_secs(180),
        || async {
            messages
                .count_documents(doc! { "_id": &published.id })
                .await
                .unwrap()
                == 0
        },
    )
    .await;
    bus.shutdown().await;
    drop_database(&uri, &database).await;
}

async fn a_token_from_a_dropped_collection_falls_back_to_the_collection(t: &Target) {
    let uri = t.uri().expect("server");
    let database = database_name();
    let first = Intracom::connect(on_server(catalog("billing", "billing-1"), &uri, &database))
        .await
        .unwrap();
    let mut sub = first
        .subscribe(Subscription::named("ledger"))
        .await
        .unwrap();
    first.publish(Message::broadcast("reload")).await.unwrap();
    next(&mut sub).await.ack().await.unwrap();
    first.shutdown().await;
    // The saved resume token now names a collection that no longer exists.
    raw_client(&uri)
        .await
        .database(&database)
        .collection::<Document>("messages")
        .drop()
        .await
        .unwrap();

    let second = Intracom::connect(on_server(catalog("billing", "billing-2"), &uri, &database))
        .await
        .unwrap();
    let after = second.publish(Message::broadcast("reload")).await.unwrap();
    let mut resumed = second
        .subscribe(Subscription::named("ledger"))
        .await
        .unwrap();
    let d = next(&mut resumed).await;
    assert_eq!(d.id, after.id, "caught up from the collection by ts");
    second.shutdown().await;
    drop_database(&uri, &database).await;
}

async fn twenty_subscribers_do_not_need_twenty_connections(t: &Target) {
    let uri = t.uri().expect("server");
    // With a stream per subscriber, 20 awaiting getMores on a pool of 3 would stall.
    let database = database_name();
    let mut config = on_server(catalog("billing", "billing-1"), &uri, &database);
    let sep = if config.db.uri.contains('?') {
        '&'
    } else {
        '?'
    };
    config.db.uri = format!("{}{sep}maxPoolSize=3", config.db.uri);
    let bus = Intracom::connect(config).await.unwrap();
    let mut subs = Vec::new();
    for _ in 0..20 {
        subs.push(bus.subscribe(Subscription::new()).await.unwrap());
    }
    let sent = bus.publish(Message::broadcast("reload")).await.unwrap();
    for sub in &mut subs {
        assert_eq!(next(sub).await.id, sent.id);
    }
    bus.shutdown().await;
    drop_database(&uri, &database).await;
}

/// A subscriber that falls behind the process's buffer of change events (8 here) while
/// it does not read: it catches up from the collection by `ts`, in order, and what it
/// had delivered before (stamped within the safety window that the catch-up reads
/// again) does not come twice.
async fn a_subscriber_overrun_by_the_event_buffer_catches_up_without_gap_or_duplicate(t: &Target) {
    overrun_catches_up(t, false).await;
}

/// The same on a capped messages collection (`common.intracom.db.retention=capped`).
async fn capped_a_subscriber_overrun_by_the_event_buffer_catches_up_without_gap_or_duplicate(
    t: &Target,
) {
    overrun_catches_up(t, true).await;
}

async fn overrun_catches_up(t: &Target, capped: bool) {
    let uri = t.uri().expect("server");
    let database = database_name();
    let mut config = if capped {
        crate::capped(catalog("billing", "billing-1"), &uri, &database)
    } else {
        on_server(catalog("billing", "billing-1"), &uri, &database)
    };
    config.db.stream_buffer = 8;
    let medium = Arc::new(MongoMedium::connect(&config).await.unwrap());
    let bus = Intracom::with_medium(config, medium.clone()).await.unwrap();
    let mut slow = bus.subscribe(Subscription::new()).await.unwrap();
    let mut witness = bus.subscribe(Subscription::new()).await.unwrap();
    let first: Vec<String> = bus
        .publish_all((0..5).map(|_| Message::broadcast("reload")).collect())
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    for id in &first {
        assert_eq!(&next(&mut slow).await.id, id);
        assert_eq!(&next(&mut witness).await.id, id);
    }
    let behind: Vec<String> = bus
        .publish_all((0..100).map(|_| Message::broadcast("reload")).collect())
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    // The witness has them all: the process's buffer went past the slow subscriber.
    for id in &behind {
        assert_eq!(&next(&mut witness).await.id, id);
    }
    let fallbacks = medium.counters().fallbacks;
    for id in &behind {
        assert_eq!(&next(&mut slow).await.id, id, "in order, nothing missing");
    }
    assert!(
        medium.counters().fallbacks > fallbacks,
        "the slow subscriber was overrun and caught up from the collection"
    );
    expect_marker_next(&bus, &mut [&mut slow]).await;
    bus.shutdown().await;
    drop_database(&uri, &database).await;
}

async fn hand_written_documents_are_validated_or_dead_lettered(t: &Target) {
    let uri = t.uri().expect("server");
    let database = database_name();
    let bus = Intracom::connect(on_server(catalog("billing", "billing-1"), &uri, &database))
        .await
        .unwrap();
    let mut sub = bus.subscribe(Subscription::new()).await.unwrap();
    let db = raw_client(&uri).await.database(&database);
    let messages = db.collection::<Document>("messages");
    // The validator refuses what consumers could not read (121 DocumentValidationFailure).
    let refused = messages
        .insert_one(doc! { "_id": "by-hand", "hello": "mongosh" })
        .await;
    assert!(
        refused.is_err(),
        "the $jsonSchema validator refuses a document without the message fields"
    );
    // Forced in anyway: it is dead-lettered and consumption goes on.
    messages
        .insert_one(doc! { "_id": "forced", "hello": "mongosh" })
        .bypass_document_validation(true)
        .await
        .unwrap();
    let good = bus.publish(Message::broadcast("reload")).await.unwrap();
    assert_eq!(next(&mut sub).await.id, good.id);
    let dead = db.collection::<Document>("dead");
    let mut found = None;
    for _ in 0..600 {
        found = dead.find_one(doc! { "_id": "forced" }).await.unwrap();
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let found = found.expect("dead-lettered");
    assert!(found.get_str("reason").is_ok_and(|r| !r.is_empty()));
    assert_eq!(
        found.get_document("document").unwrap().get_str("hello"),
        Ok("mongosh")
    );
    bus.shutdown().await;
    assert!(
        sub.next().await.is_none(),
        "the subscription ends with its bus"
    );
    drop_database(&uri, &database).await;
}

/// An operator drops the messages collection while subscribers follow it: the shared
/// stream sees `drop` and `invalidate` (its end, not silence), restarts, sets the
/// collection up again, and what is published after reaches every subscriber.
async fn dropping_the_collection_under_live_subscribers_loses_nothing_after(t: &Target) {
    let uri = t.uri().expect("server");
    let database = database_name();
    let bus = Intracom::connect(on_server(catalog("billing", "billing-1"), &uri, &database))
        .await
        .unwrap();
    let mut live = bus.subscribe(Subscription::new()).await.unwrap();
    let mut named = bus.subscribe(Subscription::named("ledger")).await.unwrap();
    let before = bus.publish(Message::broadcast("reload")).await.unwrap();
    assert_eq!(next(&mut live).await.id, before.id);
    next(&mut named).await.ack().await.unwrap();

    let db = raw_client(&uri).await.database(&database);
    db.collection::<Document>("messages").drop().await.unwrap();
    // The set-up runs again once the hub has seen the drop: the validator and the
    // indexes are back, so later documents are checked as before.
    eventually(
        "the messages collection is set up again",
        Duration::from_secs(60),
        || async {
            let Ok(reply) = db.run_command(doc! { "listIndexes": "messages" }).await else {
                return false;
            };
            reply
                .get_document("cursor")
                .and_then(|c| c.get_array("firstBatch"))
                .is_ok_and(|b| {
                    b.iter().any(|i| {
                        i.as_document()
                            .is_some_and(|i| i.get_str("name") == Ok("ts_1__id_1"))
                    })
                })
        },
    )
    .await;
    let after = bus.publish(Message::broadcast("reload")).await.unwrap();
    assert_eq!(
        next(&mut live).await.id,
        after.id,
        "the live subscriber goes on"
    );
    assert_eq!(next(&mut named).await.id, after.id, "so does the named one");
    bus.shutdown().await;
    drop_database(&uri, &database).await;
}

/// A position can come from outside (an HTTP client's `Last-Event-ID`, a checkpoint
/// copied from another deployment): a resume token the server refuses, for whatever
/// reason, still leaves the position's `ts` to read the collection from.
async fn a_position_with_a_token_the_server_refuses_reads_the_collection(t: &Target) {
    use intracom::bson::{Bson, Timestamp};
    use intracom::{Position, StartFrom};
    let uri = t.uri().expect("server");
    let database = database_name();
    let bus = Intracom::connect(on_server(catalog("billing", "billing-1"), &uri, &database))
        .await
        .unwrap();
    // The shared stream exists before the forged resume.
    let mut live = bus.subscribe(Subscription::new()).await.unwrap();
    let first = bus.publish(Message::broadcast("reload")).await.unwrap();
    assert_eq!(next(&mut live).await.id, first.id);
    // A little before the first message, well within the retention.
    let before = Timestamp {
        time: u32::try_from(chrono::Utc::now().timestamp() - 60).expect("a 32-bit time"),
        increment: 0,
    };
    let forged = Position::new(
        before,
        Some(doc! {
            "rt": { "_data": Bson::String("not a resume token".into()) },
            "ct": before,
            "id": "nothing",
        }),
    );
    let mut resumed = bus
        .subscribe(Subscription::new().start(StartFrom::After(forged)))
        .await
        .expect("a refused token is not an error for the subscriber");
    assert_eq!(
        next(&mut resumed).await.id,
        first.id,
        "read from the collection"
    );
    let second = bus.publish(Message::broadcast("reload")).await.unwrap();
    assert_eq!(
        next(&mut resumed).await.id,
        second.id,
        "then the live stream"
    );
    bus.shutdown().await;
    drop_database(&uri, &database).await;
}

/// A caller takes its request's outcome from the settling update's change event when
/// the event says all of it, and reads the request when it does not (a nested path):
/// either way the answer is what is stored. The first request goes out before the
/// process's change stream runs (its caller reads the request), the others after.
async fn a_request_settled_by_hand_is_answered_with_what_is_stored(t: &Target) {
    let uri = t.uri().expect("server");
    let database = database_name();
    let bus = Intracom::connect(on_server(catalog("billing", "billing-1"), &uri, &database))
        .await
        .unwrap();
    let messages = raw_client(&uri)
        .await
        .database(&database)
        .collection::<Document>("messages");
    let settles = [
        (
            doc! { "$set": { "state": "done", "result": { "total": 1 } } },
            Ok(1),
        ),
        (
            doc! { "$set": { "state": "done", "result": { "total": 2 } } },
            Ok(2),
        ),
        // A nested path: the event does not say what `result` is; the caller reads it.
        (
            doc! { "$set": { "state": "done", "result.total": 3 } },
            Ok(3),
        ),
        (
            doc! { "$set": { "state": "done", "result": { "total": 4 } }, "$unset": { "lease": "" } },
            Ok(4),
        ),
        (
            doc! { "$set": { "state": "error", "response": { "error": "no such invoice" } } },
            Err("no such invoice"),
        ),
    ];
    for (n, (settle, expected)) in settles.into_iter().enumerate() {
        let caller = bus.clone();
        let asked = tokio::spawn(async move {
            caller
                .request::<_, Document>("billing", "invoice.render", &doc! { "n": n as i64 })
                .timeout(Duration::from_secs(30))
                .await
        });
        let pending = doc! { "action": "invoice.render", "query.n": n as i64, "state": "pending" };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let id = loop {
            if let Some(request) = messages.find_one(pending.clone()).await.unwrap() {
                break request.get_str("_id").unwrap().to_string();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "request {n} not stored"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let updated = messages
            .update_one(doc! { "_id": &id }, settle)
            .await
            .unwrap();
        assert_eq!(updated.modified_count, 1);
        let answer = asked.await.unwrap();
        match (answer, expected) {
            (Ok(answer), Ok(total)) => assert_eq!(answer, doc! { "total": total }, "request {n}"),
            (Err(intracom::Error::Remote { message, .. }), Err(error)) => {
                assert_eq!(message, error, "request {n}")
            }
            (answer, expected) => panic!("request {n}: {answer:?}, expected {expected:?}"),
        }
    }
    bus.shutdown().await;
    drop_database(&uri, &database).await;
}
