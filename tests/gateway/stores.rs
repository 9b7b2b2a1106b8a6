//! The external stores (`common.intracom.stores.*`, feature `http`): buses that keep
//! their run-once records and their messages not routed yet in a gateway, with the
//! gateway stopped and started again on the same port under them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use intracom::bson::{doc, Document};
use intracom::gateway::{Gateway, GatewayOptions};
use intracom::idempotency::Once;
use intracom::medium::memory::{MemoryMedium, MemoryOptions};
use intracom::{Config, Intracom, Message, PublishStatus, Subscription};
use libtest_mimic::Trial;
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::flaky::Flaky;
use super::{block_on, config, event_keys, eventually, tokens, ADMIN, BILLING, GUARD};

pub fn trials() -> Vec<Trial> {
    vec![
        Trial::test(
            "memory::stores_http_run_once_survives_a_gateway_restart",
            || block_on(run_once_survives_a_gateway_restart()),
        ),
        Trial::test(
            "memory::stores_http_messages_survive_a_gateway_restart",
            || block_on(messages_survive_a_gateway_restart()),
        ),
        Trial::test(
            "memory::stores_http_a_refusal_is_an_error_not_a_fallback",
            || block_on(a_refusal_is_an_error_not_a_fallback()),
        ),
    ]
}

/// A gateway over a memory medium that outlives it, on a port it keeps across restarts.
struct Restartable {
    medium: Arc<MemoryMedium>,
    address: std::net::SocketAddr,
    running: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<intracom::Result<()>>,
        Intracom,
    )>,
    http: reqwest::Client,
}

impl Restartable {
    async fn start() -> Restartable {
        let medium = Arc::new(MemoryMedium::new(MemoryOptions::from(&config("gateway"))));
        let address = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let mut gateway = Restartable {
            medium,
            address,
            running: None,
            http: reqwest::Client::new(),
        };
        gateway.resume().await;
        gateway
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Serves again on the same port, over the same medium.
    async fn resume(&mut self) {
        let bus = Intracom::with_medium(config("gateway"), self.medium.clone())
            .await
            .expect("the gateway's bus");
        // The port was just freed by the stop: bound again (std sets SO_REUSEADDR).
        let listener = std::net::TcpListener::bind(self.address).expect("the same port");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let gateway = Gateway::new(bus.clone(), tokens())
            .options(GatewayOptions::default().event_keys(event_keys()));
        let task = tokio::spawn(gateway.serve(listener, None, async move {
            let _ = stopped.await;
        }));
        self.running = Some((stop, task, bus));
    }

    /// Stops serving: the port refuses connections until [`Restartable::resume`].
    async fn stop(&mut self) {
        if let Some((stop, task, bus)) = self.running.take() {
            let _ = stop.send(());
            match tokio::time::timeout(GUARD, task).await {
                Ok(Ok(Ok(()))) => {}
                other => panic!("the gateway did not stop cleanly: {other:?}"),
            }
            bus.shutdown().await;
        }
    }

    /// A GET with the admin token: status and JSON body.
    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = tokio::time::timeout(
            GUARD,
            self.http
                .get(format!("{}{path}", self.url()))
                .bearer_auth(ADMIN)
                .send(),
        )
        .await
        .expect("hang guard")
        .expect("an answer");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `intracom_fallback_total` of `kind`, as the gateway's `/metrics` shows it (the
    /// process's recorder: the buses of this test binary count there too).
    async fn fallbacks_scraped(&self, kind: &str) -> u64 {
        let text = tokio::time::timeout(
            GUARD,
            self.http.get(format!("{}/metrics", self.url())).send(),
        )
        .await
        .expect("hang guard")
        .expect("an answer")
        .text()
        .await
        .expect("the metrics");
        let series = format!("intracom_fallback_total{{kind=\"{kind}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&series))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The record of `billing.ledger` for `id`, through `GET /idempotency`.
    async fn record(&self, id: &str) -> (StatusCode, Value) {
        self.get(&format!("/idempotency/{id}?consumer=billing.ledger"))
            .await
    }
}

/// `config` with both stores kept by the gateway at `url`, as `billing`.
fn with_stores(mut config: Config, url: &str) -> Config {
    for (key, value) in [
        ("common.intracom.stores.idempotency", "http"),
        ("common.intracom.stores.messages", "http"),
        ("common.intracom.stores.url", url),
        ("common.intracom.stores.token", BILLING),
        ("common.intracom.stores.timeout_ms", "2000"),
    ] {
        config.set(key, value).expect("a stores key");
    }
    config
}

/// A handler that counts its runs and returns `{ "n": n }`.
async fn counted(runs: &AtomicUsize, n: i32) -> Result<Document, intracom::Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(doc! { "n": n })
}

async fn run_once_survives_a_gateway_restart() {
    let mut gateway = Restartable::start().await;
    let url = gateway.url();
    // Two buses on memory media of their own: only the gateway is shared.
    let bus = Intracom::connect(with_stores(config("billing"), &url))
        .await
        .expect("bus");
    let other = Intracom::connect(with_stores(config("billing"), &url))
        .await
        .expect("other bus");
    // A short lease: a reservation left by the outage lapses soon after.
    let ledger = bus
        .idempotent("billing.ledger")
        .lease(std::time::Duration::from_secs(2));
    let runs = AtomicUsize::new(0);

    // Kept by the gateway: the other bus finds it done, with its result.
    let first = ledger
        .run_once("m-1", || counted(&runs, 1))
        .await
        .expect("run_once");
    assert_eq!(first, Once::Ran(doc! { "n": 1 }));
    let (status, record) = gateway.record("m-1").await;
    assert_eq!(
        (status, &record["state"]),
        (StatusCode::OK, &json!("done")),
        "{record}"
    );
    let again = other
        .idempotent("billing.ledger")
        .run_once("m-1", || counted(&runs, 9))
        .await
        .expect("run_once on the other bus");
    assert_eq!(again, Once::AlreadyDone(Some(doc! { "n": 1 })));
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // The gateway stops while a handler runs: its reservation is in the gateway, its
    // completion cannot be: the bus falls back to memory (counted once).
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let (finish, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let running = {
        let ledger = ledger.clone();
        tokio::spawn(async move {
            ledger
                .run_once("m-2", || async move {
                    let _ = started_tx.send(());
                    let _ = finish_rx.await;
                    Ok::<_, intracom::Error>(doc! { "n": 2 })
                })
                .await
        })
    };
    started.await.expect("the handler started");
    gateway.stop().await;
    let _ = finish.send(());
    let ran = tokio::time::timeout(GUARD, running)
        .await
        .expect("hang guard")
        .expect("the task")
        .expect("run_once completes on the fall-back");
    assert_eq!(ran, Once::Ran(doc! { "n": 2 }));
    assert_eq!(bus.idempotency_fallbacks(), 1, "the fall-back is counted");

    // Run-once still holds on the fall-back, and new records are made there.
    let held = ledger
        .run_once("m-2", || counted(&runs, 20))
        .await
        .expect("run_once on the fall-back");
    assert_eq!(held, Once::AlreadyDone(Some(doc! { "n": 2 })));
    let third = ledger
        .run_once("m-3", || counted(&runs, 3))
        .await
        .expect("run_once on the fall-back");
    assert_eq!(third, Once::Ran(doc! { "n": 3 }));
    assert_eq!(runs.load(Ordering::SeqCst), 2, "m-2 did not run again");

    // The gateway is back: the records made meanwhile are written to it (m-2 once the
    // lease of the reservation the outage left lapses), while run-once keeps holding.
    gateway.resume().await;
    eventually("the fall-back's records are written back", || async {
        let held = ledger
            .run_once("m-2", || counted(&runs, 21))
            .await
            .expect("run_once");
        assert_eq!(held, Once::AlreadyDone(Some(doc! { "n": 2 })));
        let (two, record_two) = gateway.record("m-2").await;
        let (three, record_three) = gateway.record("m-3").await;
        two == StatusCode::OK
            && record_two["state"] == "done"
            && three == StatusCode::OK
            && record_three["state"] == "done"
    })
    .await;
    assert_eq!(gateway.record("m-2").await.1["result"], json!({ "n": 2 }));
    assert_eq!(gateway.record("m-3").await.1["result"], json!({ "n": 3 }));
    // The other bus, which never fell back, sees them in the gateway.
    let seen = other
        .idempotent("billing.ledger")
        .run_once("m-3", || counted(&runs, 30))
        .await
        .expect("run_once on the other bus");
    assert_eq!(seen, Once::AlreadyDone(Some(doc! { "n": 3 })));
    assert_eq!(runs.load(Ordering::SeqCst), 2, "each message ran once");
    assert_eq!(bus.idempotency_fallbacks(), 1, "one outage, one fall-back");
    assert!(
        gateway.fallbacks_scraped("idempotency").await >= 1,
        "an operator scrapes the fall-back"
    );
    assert_eq!(other.idempotency_fallbacks(), 0);

    bus.shutdown().await;
    other.shutdown().await;
    gateway.stop().await;
}

async fn messages_survive_a_gateway_restart() {
    let mut gateway = Restartable::start().await;
    let url = gateway.url();
    // A reader on the gateway's medium.
    let reader = Intracom::with_medium(config("users"), gateway.medium.clone())
        .await
        .expect("reader");
    let mut received = reader
        .subscribe(Subscription::new().actions(["reload"]))
        .await
        .expect("subscribe");
    // The bus's own medium is away for the whole test: what it publishes goes to the
    // gateway's message store, which sends it on the gateway's medium.
    let flaky = Arc::new(Flaky::new());
    let bus = Intracom::with_medium(with_stores(config("billing"), &url), flaky.clone())
        .await
        .expect("bus");
    flaky.set_down(true);

    let publish = |n: i32| {
        let bus = bus.clone();
        async move {
            bus.publish(Message::broadcast("reload").body(doc! { "n": n, "wide": 1_i64 }))
                .await
                .expect("publish")
        }
    };
    // The first carries a trace context: the gateway keeps it.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut traced = Message::broadcast("reload").body(doc! { "n": 1, "wide": 1_i64 });
    traced.trace = intracom::trace::TraceContext::new(traceparent, Some("vendor=1".into()));
    assert!(traced.trace.is_some(), "a valid trace context");
    let first = bus.publish(traced).await.expect("publish");
    assert_eq!(first.status, PublishStatus::Buffered);
    assert_eq!(bus.outbox_len(), 0, "kept by the gateway, not here");
    let delivery = tokio::time::timeout(GUARD, received.next())
        .await
        .expect("a delivery within the hang guard")
        .expect("a delivery")
        .expect("no error");
    assert_eq!(delivery.message().id, first.id);
    let trace = delivery.message().trace.clone().expect("the trace context");
    assert_eq!(
        (trace.traceparent.as_str(), trace.tracestate.as_deref()),
        (traceparent, Some("vendor=1"))
    );
    assert_eq!(bus.message_store_fallbacks(), 0);

    // The gateway stops: the outbox keeps what it cannot take (counted once).
    gateway.stop().await;
    let second = publish(2).await;
    let third = publish(3).await;
    assert_eq!(
        (second.status.clone(), third.status.clone()),
        (PublishStatus::Buffered, PublishStatus::Buffered)
    );
    assert_eq!(bus.outbox_len(), 2, "kept here while the gateway is away");
    assert_eq!(
        bus.message_store_fallbacks(),
        1,
        "the fall-back is counted once"
    );

    // The gateway is back: the outbox hands them over, in order, with their ids.
    gateway.resume().await;
    assert_eq!(next(&mut received).await, (second.id.clone(), 2));
    assert_eq!(next(&mut received).await, (third.id.clone(), 3));
    eventually("the outbox empties", || async { bus.outbox_len() == 0 }).await;
    eventually("the gateway's store empties", || async {
        gateway.get("/messages").await == (StatusCode::OK, json!([]))
    })
    .await;
    assert_eq!(bus.message_store_fallbacks(), 1);
    assert!(
        gateway.fallbacks_scraped("messages").await >= 1,
        "an operator scrapes the fall-back"
    );

    bus.shutdown().await;
    reader.shutdown().await;
    gateway.stop().await;
}

/// The next delivery's message id and `n`.
async fn next(received: &mut intracom::Subscriber) -> (String, i32) {
    let delivery = tokio::time::timeout(GUARD, received.next())
        .await
        .expect("a delivery within the hang guard")
        .expect("a delivery")
        .expect("no error");
    let n = delivery.query.get_i32("n").expect("n");
    assert_eq!(
        delivery.query.get_i64("wide"),
        Ok(1),
        "the store keeps the payload's types"
    );
    (delivery.message().id.clone(), n)
}

async fn a_refusal_is_an_error_not_a_fallback() {
    let mut gateway = Restartable::start().await;
    let url = gateway.url();
    let mut stranger = with_stores(config("billing"), &url);
    stranger
        .set("common.intracom.stores.token", "not-a-known-token")
        .expect("a token");
    let stranger = Intracom::connect(stranger).await.expect("bus");
    let bus = Intracom::connect(with_stores(config("billing"), &url))
        .await
        .expect("bus");
    let runs = AtomicUsize::new(0);
    let unknown = stranger
        .idempotent("billing.ledger")
        .run_once("m-1", || counted(&runs, 1))
        .await;
    assert!(
        matches!(
            unknown,
            Err(intracom::Error::StoreRefused { status: 401, .. })
        ),
        "{unknown:?}"
    );
    // A service token, for a consumer that is not its service's.
    let foreign = bus
        .idempotent("users.ledger")
        .run_once("m-1", || counted(&runs, 1))
        .await;
    match foreign {
        Err(error @ intracom::Error::StoreRefused { status: 403, .. }) => {
            assert!(!error.is_retryable(), "{error}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0, "no handler ran");
    assert_eq!(
        (
            stranger.idempotency_fallbacks(),
            bus.idempotency_fallbacks()
        ),
        (0, 0),
        "a refusal is not an outage"
    );
    stranger.shutdown().await;
    bus.shutdown().await;
    gateway.stop().await;
}
