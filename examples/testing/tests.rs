//! The service's tests. Unit tests run on the memory medium: no server, one process.
//! Integration tests run against MongoDB when `COMMON_INTRACOM_DB_URI` names a replica
//! set (the variable intracom's configuration reads for `common.intracom.db.uri`), and
//! say loudly that they skipped otherwise.

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use intracom::bson::doc;
use intracom::{Config, Error, Intracom, Message};

use crate::service::{self, Price, Quote};

/// The longest any test waits for something to happen: a hang guard, not a timing
/// assertion.
const WAIT: Duration = Duration::from_secs(20);

/// A bus for `service` on the memory medium, whatever the environment says.
async fn memory_bus(service: &str) -> Intracom {
    let config = service::catalog(Config::builder().service(service))
        .build()
        .expect("config");
    Intracom::connect(config).await.expect("bus on memory")
}

#[tokio::test]
async fn quotes_a_price() {
    let bus = memory_bus("billing").await;
    let quotes = service::serve_quotes(&bus).expect("serve");
    let price: Price = bus
        .request("billing", "price.quote", &Quote { items: 3 })
        .await
        .expect("an answer");
    assert_eq!(price, Price { cents: 750 });
    quotes.stop().await;
    bus.shutdown().await;
}

#[tokio::test]
async fn refuses_an_empty_quote() {
    let bus = memory_bus("billing").await;
    let quotes = service::serve_quotes(&bus).expect("serve");
    let refused = bus
        .request::<_, Price>("billing", "price.quote", &Quote { items: 0 })
        .await;
    match refused {
        Err(Error::Remote { message, .. }) => assert!(message.contains("at least one item")),
        other => panic!("expected the handler's error, got {other:?}"),
    }
    quotes.stop().await;
    bus.shutdown().await;
}

#[tokio::test]
async fn charges_an_order_announced_twice_once() {
    let bus = memory_bus("billing").await;
    let (tx, mut charged) = tokio::sync::mpsc::unbounded_channel();
    let orders = service::orders(&bus).await.expect("subscribed");
    let follower = tokio::spawn(service::follow_orders(bus.clone(), orders, tx));
    let shop = bus.as_service("shop", None).expect("shop");
    for _ in 0..2 {
        shop.publish(Message::broadcast("order.placed").body(doc! { "order": 7i64 }))
            .await
            .expect("published");
    }
    let first = tokio::time::timeout(WAIT, charged.recv())
        .await
        .expect("within WAIT");
    let second = tokio::time::timeout(WAIT, charged.recv())
        .await
        .expect("within WAIT");
    assert_eq!(first, Some((700, true)));
    assert_eq!(second, Some((700, false)));
    bus.shutdown().await;
    follower.await.expect("follower task").expect("follower");
}

// ---- Integration tests against MongoDB ------------------------------------------------

/// The environment variable naming the MongoDB replica set of the integration tests.
const URI_ENV: &str = "COMMON_INTRACOM_DB_URI";

/// The MongoDB URI, or `None` after saying loudly that the test is skipped.
fn mongodb_uri(test: &str) -> Option<String> {
    match std::env::var(URI_ENV) {
        Ok(uri) if !uri.is_empty() => Some(uri),
        _ => {
            // Written to stderr directly, past the test harness's capture: a skip that
            // nobody sees looks like a pass.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: {URI_ENV} is not set. Start a replica set \
                 (docker compose up -d --wait mongodb) and set \
                 {URI_ENV}='mongodb://localhost:27017/?directConnection=true'"
            );
            None
        }
    }
}

/// Runs `test` with a database of its own (`billing_test_<ulid>`), and drops that
/// database afterwards, whether the test passed or panicked.
async fn with_database<F, Fut>(uri: &str, test: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let database = format!(
        "billing_test_{}",
        intracom::message::new_id().to_lowercase()
    );
    let outcome = tokio::spawn(test(database.clone())).await;
    let client = mongodb::Client::with_uri_str(uri).await.expect("a client");
    client
        .database(&database)
        .drop()
        .await
        .expect("test database dropped");
    if let Err(failed) = outcome {
        std::panic::resume_unwind(failed.into_panic());
    }
}

/// A bus for `service` on MongoDB, in `database`.
async fn mongodb_bus(uri: &str, database: &str, service: &str) -> Intracom {
    let config = service::catalog(Config::builder().service(service))
        .mongodb(uri, database)
        .build()
        .expect("config");
    Intracom::connect(config).await.expect("bus on MongoDB")
}

#[tokio::test]
async fn mongodb_answers_a_request_from_another_process() {
    let Some(uri) = mongodb_uri("mongodb_answers_a_request_from_another_process") else {
        return;
    };
    let at = uri.clone();
    with_database(&at, move |database| async move {
        // Two buses, as two processes would have: the request goes through MongoDB.
        let billing = mongodb_bus(&uri, &database, "billing").await;
        let shop = mongodb_bus(&uri, &database, "shop").await;
        let quotes = service::serve_quotes(&billing).expect("serve");
        let price: Price = tokio::time::timeout(
            WAIT,
            shop.request("billing", "price.quote", &Quote { items: 2 }),
        )
        .await
        .expect("within WAIT")
        .expect("an answer");
        assert_eq!(price, Price { cents: 500 });
        quotes.stop().await;
        shop.shutdown().await;
        billing.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn mongodb_charges_an_order_announced_twice_once() {
    let Some(uri) = mongodb_uri("mongodb_charges_an_order_announced_twice_once") else {
        return;
    };
    let at = uri.clone();
    with_database(&at, move |database| async move {
        let billing = mongodb_bus(&uri, &database, "billing").await;
        let shop = mongodb_bus(&uri, &database, "shop").await;
        let (tx, mut charged) = tokio::sync::mpsc::unbounded_channel();
        let orders = service::orders(&billing).await.expect("subscribed");
        let follower = tokio::spawn(service::follow_orders(billing.clone(), orders, tx));
        for _ in 0..2 {
            shop.publish(Message::broadcast("order.placed").body(doc! { "order": 100i64 }))
                .await
                .expect("published");
        }
        let first = tokio::time::timeout(WAIT, charged.recv())
            .await
            .expect("within WAIT");
        let second = tokio::time::timeout(WAIT, charged.recv())
            .await
            .expect("within WAIT");
        assert_eq!(first, Some((10_000, true)));
        assert_eq!(second, Some((10_000, false)));
        shop.shutdown().await;
        billing.shutdown().await;
        follower.await.expect("follower task").expect("follower");
    })
    .await;
}

/// The guide's "Testing your service" page shows this example's code as it is: each of
/// its `rust,ignore` blocks is a passage of `service.rs` or `tests.rs`, and its compose
/// file is the repository's.
#[test]
fn the_guide_shows_this_code_as_it_is() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |path: &str| {
        std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let page = read("docs/src/testing.md");
    let code = read("examples/testing/service.rs") + &read("examples/testing/tests.rs");
    let compose = read("docker-compose.yml");
    let mut shown = 0;
    let mut lines = page.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let mut body = String::new();
        for line in lines.by_ref().take_while(|l| !l.starts_with("```")) {
            body.push_str(line);
            body.push('\n');
        }
        let source = match info {
            "rust,ignore" => &code,
            "yaml" if body.contains("image: mongo") => &compose,
            _ => continue,
        };
        assert!(
            source.contains(&body),
            "docs/src/testing.md shows code that is not in the example as written:\n{body}"
        );
        shown += 1;
    }
    assert!(shown >= 6, "only {shown} blocks of the page checked");
}
