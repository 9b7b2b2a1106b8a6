//! The conformance suite, and MongoDB-specific cases, against a real MongoDB.
//!
//! Runs when `INTRACOM_TEST_MONGODB_URI` is set at build time (for example by
//! `scripts/test-mongodb.sh`, which starts a one-node replica set with docker compose).
//! Without it, every test here is reported as *ignored*, with the reason, in the test
//! summary: never as passed. Each test works in a database of its own
//! (`intracom_test_<ulid>`), dropped at the end when the test passes.

mod conformance;

use std::time::Duration;

use async_trait::async_trait;
use conformance::{next, Harness, World};
use futures::StreamExt;
use intracom::bson::{doc, Document};
use intracom::{Config, Intracom, MediumKind, Message, Subscription};

const URI_ENV: &str = "INTRACOM_TEST_MONGODB_URI";

fn uri() -> String {
    std::env::var(URI_ENV)
        .unwrap_or_else(|_| panic!("{URI_ENV} is not set at run time (it was at build time)"))
}

async fn raw_client() -> mongodb::Client {
    mongodb::Client::with_uri_str(uri())
        .await
        .expect("raw client")
}

fn database_name() -> String {
    format!(
        "intracom_test_{}",
        intracom::message::new_id().to_lowercase()
    )
}

/// Points a config at the test server and database.
fn on_server(mut config: Config, database: &str) -> Config {
    config.medium = MediumKind::Db;
    config.db.uri = uri();
    config.db.database = database.to_string();
    config
}

struct Mongo;

struct MongoWorld {
    database: String,
    client: mongodb::Client,
}

#[async_trait]
impl Harness for Mongo {
    async fn world(&self, _retention_ms: u64) -> Box<dyn World> {
        Box::new(MongoWorld {
            database: database_name(),
            client: raw_client().await,
        })
    }

    fn short_retention_ms(&self) -> u64 {
        // The TTL index counts whole seconds; five leave room to read a fresh message
        // before it counts as expired on a busy machine.
        5_000
    }
}

#[async_trait]
impl World for MongoWorld {
    async fn bus(&self, config: Config) -> Intracom {
        Intracom::connect(on_server(config, &self.database))
            .await
            .expect("bus on MongoDB")
    }

    async fn wait_expired(&self, id: &str) {
        // The TTL monitor runs about every 60 s: wait for the deletion, bounded.
        let messages = self
            .client
            .database(&self.database)
            .collection::<Document>("messages");
        for _ in 0..360 {
            if messages
                .count_documents(doc! { "_id": id })
                .await
                .expect("count")
                == 0
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("message {id} was not deleted by the TTL monitor within 180 s");
    }
}

conformance_tests!(
    Mongo,
    ignore_unless = intracom_mongodb_tests,
    "set INTRACOM_TEST_MONGODB_URI (see scripts/test-mongodb.sh) to run against MongoDB"
);

fn catalog(service: &str, instance: &str) -> Config {
    Config::builder()
        .service(service)
        .instance(instance)
        .sender("billing", ["reload", "marker"])
        .build()
        .expect("config")
}

async fn drop_database(name: &str) {
    raw_client().await.database(name).drop().await.ok();
}

#[cfg_attr(
    not(intracom_mongodb_tests),
    ignore = "set INTRACOM_TEST_MONGODB_URI to run against MongoDB"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_index_deletes_expired_messages() {
    let database = database_name();
    let config = Config::builder()
        .service("billing")
        .instance("billing-1")
        .sender("billing", ["reload"])
        .timeout_ms(2_000)
        .build()
        .unwrap();
    let bus = Intracom::connect(on_server(config, &database))
        .await
        .unwrap();
    let published = bus.publish(Message::broadcast("reload")).await.unwrap();
    let db = raw_client().await.database(&database);
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
    let mut gone = false;
    for _ in 0..360 {
        if messages
            .count_documents(doc! { "_id": &published.id })
            .await
            .unwrap()
            == 0
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        gone,
        "the TTL monitor deletes the message (bounded wait of 180 s)"
    );
    bus.shutdown().await;
    drop_database(&database).await;
}

#[cfg_attr(
    not(intracom_mongodb_tests),
    ignore = "set INTRACOM_TEST_MONGODB_URI to run against MongoDB"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_a_dropped_collection_falls_back_to_the_collection() {
    let database = database_name();
    let first = Intracom::connect(on_server(catalog("billing", "billing-1"), &database))
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
    raw_client()
        .await
        .database(&database)
        .collection::<Document>("messages")
        .drop()
        .await
        .unwrap();

    let second = Intracom::connect(on_server(catalog("billing", "billing-2"), &database))
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
    drop_database(&database).await;
}

#[cfg_attr(
    not(intracom_mongodb_tests),
    ignore = "set INTRACOM_TEST_MONGODB_URI to run against MongoDB"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_subscribers_do_not_need_twenty_connections() {
    // With a stream per subscriber, 20 awaiting getMores on a pool of 3 would stall.
    let database = database_name();
    let mut config = on_server(catalog("billing", "billing-1"), &database);
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
    drop_database(&database).await;
}

#[cfg_attr(
    not(intracom_mongodb_tests),
    ignore = "set INTRACOM_TEST_MONGODB_URI to run against MongoDB"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_written_documents_are_validated_or_dead_lettered() {
    let database = database_name();
    let bus = Intracom::connect(on_server(catalog("billing", "billing-1"), &database))
        .await
        .unwrap();
    let mut sub = bus.subscribe(Subscription::new()).await.unwrap();
    let db = raw_client().await.database(&database);
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
    for _ in 0..100 {
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
    let _ = sub.next().await;
    drop_database(&database).await;
}
