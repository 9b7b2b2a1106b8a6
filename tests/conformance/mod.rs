//! The conformance suite: the behaviours every medium must show, written once against
//! the public API and run on each medium (Watermill's universal test suite is the
//! model). A medium joins by implementing [`Harness`] and invoking
//! `conformance_tests!(harness_expr)` in its own test file.
//!
//! To prove that a message was *not* delivered without timing anything, tests publish
//! a marker afterwards: the next delivery must be the marker. Waits are bounded only
//! by a generous hang guard that fails the test instead of hanging CI.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use intracom::bson::doc;
use intracom::{
    Config, Delivery, Error, Intracom, Message, MessageType, PublishStatus, Subscriber,
    Subscription,
};

/// How long a test waits for an expected delivery before failing (a hang guard, not a
/// timing assertion).
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// One medium under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A fresh, isolated medium for one test, with this retention.
    async fn world(&self, retention_ms: u64) -> Box<dyn World>;
    /// The retention to use in the retention test (short, within the medium's resolution).
    fn short_retention_ms(&self) -> u64;
    /// What the medium promises (Watermill's `Features`): a case that needs more is
    /// reported as ignored, naming what is missing.
    fn capabilities(&self) -> &'static [Capability] {
        Capability::ALL
    }
    /// Why a case cannot pass on this particular server although the medium is right:
    /// a documented divergence of that server from mongod, paired with a test that
    /// shows the divergence still exists. `None` for every case on a faithful server.
    fn excluded(&self, _case: &str) -> Option<&'static str> {
        None
    }
}

/// What a medium can promise. Each conformance case names the ones it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Capability {
    /// The medium stamps every message (`ts`, `at`) from its own clock; the order of
    /// stamps is the delivery order.
    ServerStamps,
    /// Messages are kept after delivery: a subscription can start from the oldest one
    /// still retained.
    History,
    /// Messages expire after the retention, and a subscriber that comes back after some
    /// of its messages expired is told how many it lost.
    LossReports,
    /// A named subscription's position lives in the medium: another process of the
    /// same service resumes from it.
    SharedCheckpoints,
    /// Work waits in the medium until a worker claims it, highest priority first.
    StoredQueue,
    /// Request outcomes, leases and idempotency records are kept by the medium and seen
    /// alike by every process.
    SharedState,
}

impl Capability {
    /// Everything: what the memory and MongoDB media promise.
    pub const ALL: &'static [Capability] = &[
        Capability::ServerStamps,
        Capability::History,
        Capability::LossReports,
        Capability::SharedCheckpoints,
        Capability::StoredQueue,
        Capability::SharedState,
    ];

    /// A short name for test reports.
    pub fn name(self) -> &'static str {
        match self {
            Capability::ServerStamps => "server-stamps",
            Capability::History => "history",
            Capability::LossReports => "loss-reports",
            Capability::SharedCheckpoints => "shared-checkpoints",
            Capability::StoredQueue => "stored-queue",
            Capability::SharedState => "shared-state",
        }
    }
}

/// A medium shared by the buses of one test, as a shared database is by processes.
#[async_trait]
pub trait World: Send + Sync {
    /// A bus on this world's medium, as another process would open it.
    async fn bus(&self, config: Config) -> Intracom;
    /// Returns once the message is certainly gone by retention (bounded wait).
    async fn wait_expired(&self, id: &str);
}

/// The catalog every test uses.
pub fn config(service: &str, instance: &str, retention_ms: u64) -> Config {
    Config::builder()
        .service(service)
        .instance(instance)
        .timeout_ms(retention_ms)
        .sender(
            "billing",
            [
                "reload",
                "invoice.created",
                "marker",
                "invoice.get",
                "invoice.render",
            ],
        )
        .sender("users", ["user.deleted", "reload", "marker"])
        .sender("audit", ["marker"])
        .build()
        .expect("test config is valid")
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq, Clone)]
pub struct InvoiceQuery {
    pub invoice: i64,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq, Clone)]
pub struct Invoice {
    pub invoice: i64,
    pub total: f64,
    pub served_by: String,
}

/// Work options short enough for tests.
pub fn quick() -> intracom::WorkOptions {
    intracom::WorkOptions::default()
        .lease(Duration::from_millis(600))
        .backoff(Duration::from_millis(20))
        .poll(Duration::from_millis(50))
}

/// The request document (delivery: one) as settled in the medium, seen by a monitor.
async fn settled_request(bus: &Intracom, watch: &mut Subscriber) -> intracom::Message {
    loop {
        let d = next(watch).await;
        if d.delivery == intracom::DeliveryMode::One {
            let settled = bus
                .medium()
                .work()
                .expect("a work queue")
                .await_outcome(&d.id, HANG_GUARD)
                .await
                .unwrap();
            return settled.expect("settled");
        }
    }
}

pub async fn bus(world: &dyn World, service: &str, instance: &str) -> Intracom {
    world.bus(config(service, instance, 300_000)).await
}

/// The next item of a stream, failing the test if the stream ends or hangs.
pub async fn next_item(sub: &mut Subscriber) -> Result<Delivery, Error> {
    match tokio::time::timeout(HANG_GUARD, sub.next()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("subscription ended unexpectedly"),
        Err(_) => panic!("no delivery within the hang guard of {HANG_GUARD:?}"),
    }
}

/// The next delivery, failing the test on an error item.
pub async fn next(sub: &mut Subscriber) -> Delivery {
    next_item(sub).await.expect("a delivery, not an error")
}

/// Publishes a marker from `from` to every service and checks that it is the next
/// delivery of each subscriber: nothing else was waiting for them.
pub async fn expect_marker_next(from: &Intracom, subs: &mut [&mut Subscriber]) {
    let marker = from
        .publish(Message::broadcast("marker"))
        .await
        .expect("marker published");
    for sub in subs.iter_mut() {
        let d = next(sub).await;
        assert_eq!(
            (d.action.as_str(), d.id.as_str()),
            ("marker", marker.id.as_str()),
            "expected the marker next, got {:?}",
            d.message()
        );
    }
}

pub async fn broadcast_reaches_every_subscriber(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let b1 = bus(&*w, "billing", "billing-1").await;
    let b2 = bus(&*w, "billing", "billing-2").await;
    let u1 = bus(&*w, "users", "users-1").await;
    let mut s1 = b1.subscribe(Subscription::new()).await.unwrap();
    let mut s2 = b2.subscribe(Subscription::new()).await.unwrap();
    let mut s3 = u1.subscribe(Subscription::new()).await.unwrap();
    let sent = b1
        .publish(Message::broadcast("reload").body(doc! {"tenant": 7}))
        .await
        .unwrap();
    assert_eq!(sent.status, PublishStatus::Stored);
    for sub in [&mut s1, &mut s2, &mut s3] {
        let d = next(sub).await;
        assert_eq!(d.id, sent.id);
        assert_eq!(d.action, "reload");
        assert_eq!(d.source_service, "billing");
        assert_eq!(d.source_instance, "billing-1");
        assert_eq!(d.kind, MessageType::Broadcast);
        assert_eq!(d.query, doc! {"tenant": 7});
        if h.capabilities().contains(&Capability::ServerStamps) {
            assert!(d.ts.is_some(), "the medium stamps every message");
            assert!(d.at.is_some(), "the medium writes the wall time");
        }
    }
}

pub async fn targeted_reaches_only_its_target(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let b1 = bus(&*w, "billing", "billing-1").await;
    let b2 = bus(&*w, "billing", "billing-2").await;
    let u1 = bus(&*w, "users", "users-1").await;
    let mut sb1 = b1.subscribe(Subscription::new()).await.unwrap();
    let mut sb2 = b2.subscribe(Subscription::new()).await.unwrap();
    let mut su1 = u1.subscribe(Subscription::new()).await.unwrap();

    // To a service: every instance of it, no one else.
    let to_users = b1
        .publish(Message::to_service("users", "user.deleted"))
        .await
        .unwrap();
    assert_eq!(next(&mut su1).await.id, to_users.id);
    expect_marker_next(&b1, &mut [&mut sb1, &mut sb2, &mut su1]).await;

    // To an instance: that instance only.
    let to_b2 = u1
        .publish(Message::to_instance("billing", "billing-2", "reload"))
        .await
        .unwrap();
    let d = next(&mut sb2).await;
    assert_eq!(d.id, to_b2.id);
    assert_eq!(d.dest_instance.as_deref(), Some("billing-2"));
    expect_marker_next(&u1, &mut [&mut sb1, &mut sb2, &mut su1]).await;
}

/// Publishes `count` broadcasts from `bus` in a task; returns their ids in publish order.
fn spawn_publisher(bus: Intracom, count: i32) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut ids = Vec::new();
        for i in 0..count {
            let body = doc! {"i": i};
            ids.push(
                bus.publish(Message::broadcast("reload").body(body))
                    .await
                    .unwrap()
                    .id,
            );
        }
        ids
    })
}

pub async fn order_is_the_same_for_every_subscriber(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let b1 = bus(&*w, "billing", "billing-1").await;
    let u1 = bus(&*w, "users", "users-1").await;
    let mut a = b1.subscribe(Subscription::new()).await.unwrap();
    let mut b = u1.subscribe(Subscription::monitor()).await.unwrap();
    // Two publishers at once: the medium's order is the only order, the same for all.
    let p1 = spawn_publisher(b1.clone(), 50);
    let p2 = spawn_publisher(u1.clone(), 50);
    let ids1 = p1.await.unwrap();
    let ids2 = p2.await.unwrap();
    let mut seen_a = Vec::new();
    let mut seen_b = Vec::new();
    for _ in 0..100 {
        seen_a.push(next(&mut a).await);
        seen_b.push(next(&mut b).await);
    }
    let order_a: Vec<&str> = seen_a.iter().map(|d| d.id.as_str()).collect();
    let order_b: Vec<&str> = seen_b.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(order_a, order_b, "every subscriber sees one order");
    // Each publisher's own messages keep their publish order.
    for ids in [&ids1, &ids2] {
        let positions: Vec<usize> = ids
            .iter()
            .map(|id| order_a.iter().position(|x| x == id).unwrap())
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "per-publisher order kept"
        );
    }
    let all: BTreeSet<&str> = order_a.iter().copied().collect();
    assert_eq!(all.len(), 100, "no duplicates, nothing missing");
}

pub async fn filters_select_actions_sources_and_types(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let b1 = bus(&*w, "billing", "billing-1").await;
    let u1 = bus(&*w, "users", "users-1").await;
    let mut only_reload = b1
        .subscribe(Subscription::new().actions(["reload", "marker"]))
        .await
        .unwrap();
    let mut only_users = b1
        .subscribe(Subscription::new().sources(["users"]))
        .await
        .unwrap();
    let mut no_own = b1
        .subscribe(Subscription::new().exclude_own_instance())
        .await
        .unwrap();
    let mut only_ff = b1
        .subscribe(Subscription::new().types([MessageType::FireAndForget]))
        .await
        .unwrap();
    let created = b1
        .publish(Message::broadcast("invoice.created"))
        .await
        .unwrap();
    let reload = u1
        .publish(Message::to_service("billing", "reload"))
        .await
        .unwrap();
    assert_eq!(next(&mut only_reload).await.id, reload.id);
    assert_eq!(next(&mut only_users).await.id, reload.id);
    assert_eq!(next(&mut no_own).await.id, reload.id);
    let d = next(&mut only_ff).await;
    assert_eq!(d.id, reload.id);
    let _ = created;
    // Markers from users pass the source filter; the type filter needs a fire-and-forget.
    expect_marker_next(&u1, &mut [&mut only_reload, &mut only_users, &mut no_own]).await;
    let ff_marker = u1
        .publish(Message::to_service("billing", "marker"))
        .await
        .unwrap();
    assert_eq!(next(&mut only_ff).await.id, ff_marker.id);
}

pub async fn named_subscription_resumes_without_gap(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let b1 = bus(&*w, "billing", "billing-1").await;
    let mut sub = b1
        .subscribe(Subscription::named("billing-cache"))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            b1.publish(Message::broadcast("reload").body(doc! {"i": i}))
                .await
                .unwrap()
                .id,
        );
    }
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(next(&mut sub).await);
    }
    assert_eq!(got.iter().map(|d| d.id.clone()).collect::<Vec<_>>(), ids);
    // Ack out of order, leaving #3 unacked: the checkpoint may only pass #0..#2.
    let mut got = got.into_iter();
    let d0 = got.next().unwrap();
    let d1 = got.next().unwrap();
    let d2 = got.next().unwrap();
    let _unacked = got.next().unwrap();
    let d4 = got.next().unwrap();
    let d5 = got.next().unwrap();
    d1.ack().await.unwrap();
    d4.ack().await.unwrap();
    d0.ack().await.unwrap();
    d2.ack().await.unwrap();
    d5.ack().await.unwrap();
    drop(sub);

    let later = b1
        .publish(Message::broadcast("reload").body(doc! {"i": 6}))
        .await
        .unwrap();
    let mut again = b1
        .subscribe(Subscription::named("billing-cache"))
        .await
        .unwrap();
    let resumed: Vec<String> = [
        next(&mut again).await,
        next(&mut again).await,
        next(&mut again).await,
        next(&mut again).await,
    ]
    .iter()
    .map(|d| d.id.clone())
    .collect();
    // #3 (unacked) comes again, #4 and #5 (acked after it) at most twice, then the new one.
    assert_eq!(
        resumed,
        [ids[3].clone(), ids[4].clone(), ids[5].clone(), later.id]
    );
}

pub async fn checkpoint_is_shared_through_the_medium(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let first = bus(&*w, "billing", "billing-1").await;
    let mut sub = first
        .subscribe(Subscription::named("ledger"))
        .await
        .unwrap();
    let a = first.publish(Message::broadcast("reload")).await.unwrap();
    next(&mut sub).await.ack().await.unwrap();
    first.shutdown().await;
    assert!(sub.next().await.is_none(), "shutdown ends the stream");

    // Another process of the same service takes over where the first stopped.
    let second = bus(&*w, "billing", "billing-2").await;
    let b = second.publish(Message::broadcast("reload")).await.unwrap();
    let mut resumed = second
        .subscribe(Subscription::named("ledger"))
        .await
        .unwrap();
    let d = next(&mut resumed).await;
    assert_ne!(d.id, a.id, "the acked message is not delivered again");
    assert_eq!(d.id, b.id);
}

pub async fn new_subscription_starts_now_or_from_beginning(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let b1 = bus(&*w, "billing", "billing-1").await;
    let old = b1.publish(Message::broadcast("reload")).await.unwrap();
    let mut now = b1.subscribe(Subscription::named("fresh")).await.unwrap();
    let mut all = b1
        .subscribe(Subscription::new().from_beginning())
        .await
        .unwrap();
    let new = b1.publish(Message::broadcast("reload")).await.unwrap();
    assert_eq!(
        next(&mut now).await.id,
        new.id,
        "a new subscription starts after what exists"
    );
    assert_eq!(next(&mut all).await.id, old.id);
    assert_eq!(next(&mut all).await.id, new.id);
}

pub async fn retention_expires_and_reports_loss(h: &dyn Harness) {
    let retention = h.short_retention_ms();
    let w = h.world(retention).await;
    let b1 = w.bus(config("billing", "billing-1", retention)).await;
    let mut sub = b1.subscribe(Subscription::named("slow")).await.unwrap();
    let first = b1.publish(Message::broadcast("reload")).await.unwrap();
    next(&mut sub).await.ack().await.unwrap();
    drop(sub);
    let expiring = b1.publish(Message::broadcast("reload")).await.unwrap();
    w.wait_expired(&expiring.id).await;
    let fresh = b1.publish(Message::broadcast("reload")).await.unwrap();

    let mut resumed = b1.subscribe(Subscription::named("slow")).await.unwrap();
    match next_item(&mut resumed).await {
        Err(Error::Lost { subscription, .. }) => assert_eq!(subscription, "slow"),
        other => panic!("expected a Lost report first, got {other:?}"),
    }
    let d = next(&mut resumed).await;
    assert_ne!(d.id, expiring.id, "an expired message is never delivered");
    assert_ne!(d.id, first.id);
    assert_eq!(d.id, fresh.id);

    // A subscription from the beginning sees only what is retained, without a report.
    let mut all = b1
        .subscribe(Subscription::new().from_beginning())
        .await
        .unwrap();
    assert_eq!(next(&mut all).await.id, fresh.id);
}

pub async fn catalog_errors_write_nothing(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let b1 = bus(&*w, "billing", "billing-1").await;
    let stranger = bus(&*w, "stranger", "stranger-1").await;
    let mut watch = b1.subscribe(Subscription::monitor()).await.unwrap();

    let e = stranger
        .publish(Message::broadcast("marker"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::UnknownSender { service } if service == "stranger"),
        "{e}"
    );
    assert!(!e.is_retryable());
    let e = b1
        .publish(Message::to_service("users", "invoice.created"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::UnknownAction { service, action, .. } if service == "users" && action == "invoice.created"),
        "{e}"
    );
    assert!(
        e.to_string().contains("user.deleted"),
        "the error lists what is declared: {e}"
    );
    let e = b1
        .publish(Message::to_service("nobody", "reload"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::UnknownAction { .. }), "{e}");
    let e = b1
        .publish(Message::broadcast("user.deleted"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::UnknownAction { .. }),
        "a broadcast's action is the sender's: {e}"
    );
    // One bad message in a batch: none of the batch is written.
    let e = b1
        .publish_all(vec![
            Message::broadcast("reload"),
            Message::broadcast("nope"),
        ])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::UnknownAction { .. }), "{e}");
    expect_marker_next(&b1, &mut [&mut watch]).await;

    // Registered at run time by another process: accepted without a restart.
    stranger
        .catalog()
        .register("stranger", ["hello"])
        .await
        .unwrap();
    let ok = stranger.publish(Message::broadcast("hello")).await.unwrap();
    assert_eq!(next(&mut watch).await.id, ok.id);
    b1.catalog().refresh().await.unwrap();
    assert!(b1.catalog().actions("stranger").unwrap().contains("hello"));
}

pub async fn bad_input_is_refused_and_writes_nothing(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let b1 = w
        .bus(
            Config::builder()
                .service("billing")
                .instance("billing-1")
                .sender("billing", ["reload", "marker"])
                .max_message_bytes(4096)
                .build()
                .unwrap(),
        )
        .await;
    let mut watch = b1.subscribe(Subscription::monitor()).await.unwrap();
    let e = b1.publish(Message::broadcast("")).await.unwrap_err();
    assert!(matches!(e, Error::InvalidMessage { .. }), "{e}");
    let big = "x".repeat(8192);
    let e = b1
        .publish(Message::broadcast("reload").body(doc! {"blob": big}))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { limit: 4096, .. }), "{e}");
    let e = b1
        .publish(Message::to_instance("billing", "has space", "reload"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidMessage { .. }), "{e}");
    expect_marker_next(&b1, &mut [&mut watch]).await;
}

pub async fn republishing_an_id_stores_it_once(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let b1 = bus(&*w, "billing", "billing-1").await;
    let mut watch = b1.subscribe(Subscription::monitor()).await.unwrap();
    let m = Message::broadcast("reload").with_id("invoice-42-created");
    let first = b1.publish(m.clone()).await.unwrap();
    let again = b1.publish(m).await.unwrap();
    assert_eq!(first.status, PublishStatus::Stored);
    assert_eq!(again.status, PublishStatus::Duplicate);
    assert_eq!(next(&mut watch).await.id, "invoice-42-created");
    expect_marker_next(&b1, &mut [&mut watch]).await;
}

pub async fn typed_payloads_round_trip(h: &dyn Harness) {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Invoice {
        number: i64,
        customer: String,
        lines: Vec<String>,
    }
    let w = h.world(300_000).await;
    let b1 = bus(&*w, "billing", "billing-1").await;
    let mut sub = b1.subscribe(Subscription::new()).await.unwrap();
    let invoice = Invoice {
        number: 42,
        customer: "acme".into(),
        lines: vec!["a".into(), "b".into()],
    };
    b1.publish(
        Message::broadcast("invoice.created")
            .payload(&invoice)
            .unwrap(),
    )
    .await
    .unwrap();
    let d = next(&mut sub).await;
    assert_eq!(d.decode::<Invoice>().unwrap(), invoice);
    assert!(matches!(d.decode::<Vec<i32>>(), Err(Error::Payload(_))));
}

pub async fn a_slow_subscriber_does_not_hold_back_others(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let b1 = bus(&*w, "billing", "billing-1").await;
    let _never_reads = b1.subscribe(Subscription::named("stalled")).await.unwrap();
    let mut reader = b1.subscribe(Subscription::new()).await.unwrap();
    let batch: Vec<Message> = (0..500)
        .map(|i| Message::broadcast("reload").body(doc! {"i": i}))
        .collect();
    b1.publish_all(batch).await.unwrap();
    for i in 0..500 {
        assert_eq!(next(&mut reader).await.query.get_i32("i").unwrap(), i);
    }
}

pub async fn shutdown_ends_streams_and_refuses_work(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let b1 = bus(&*w, "billing", "billing-1").await;
    let users = b1.as_service("users", Some("users-9")).unwrap();
    let mut s1 = b1.subscribe(Subscription::new()).await.unwrap();
    let mut s2 = users.subscribe(Subscription::named("u")).await.unwrap();
    let waiting = tokio::spawn(async move { s1.next().await.is_none() });
    b1.shutdown().await;
    assert!(
        tokio::time::timeout(HANG_GUARD, waiting)
            .await
            .unwrap()
            .unwrap(),
        "a waiting stream ends"
    );
    assert!(s2.next().await.is_none(), "handles of the same bus end too");
    assert!(matches!(
        b1.publish(Message::broadcast("reload")).await,
        Err(Error::Shutdown)
    ));
    assert!(matches!(
        users.subscribe(Subscription::new()).await,
        Err(Error::Shutdown)
    ));
}

pub async fn handler_acks_on_ok_only(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let b1 = bus(&*w, "billing", "billing-1").await;
    let sub = b1.subscribe(Subscription::named("worker")).await.unwrap();
    let ok = b1
        .publish(Message::broadcast("reload").body(doc! {"fail": false}))
        .await
        .unwrap();
    let bad = b1
        .publish(Message::broadcast("reload").body(doc! {"fail": true}))
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(sub.handle(move |m: Message| {
        let tx = tx.clone();
        async move {
            let fail = m.query.get_bool("fail").unwrap_or(false);
            tx.send(m.id).ok();
            if fail {
                Err("refused")
            } else {
                Ok(())
            }
        }
    }));
    assert_eq!(rx.recv().await.unwrap(), ok.id);
    assert_eq!(rx.recv().await.unwrap(), bad.id);
    // Stop the handler loop: shut down a separate handle? Shutdown is bus-wide, so use
    // a second bus for the rest of the test.
    b1.shutdown().await;
    task.await.unwrap().unwrap();
    let b2 = bus(&*w, "billing", "billing-2").await;
    let mut again = b2.subscribe(Subscription::named("worker")).await.unwrap();
    assert_eq!(
        next(&mut again).await.id,
        bad.id,
        "the failed message comes again, the acked one does not"
    );
}

pub async fn undeclared_messages_are_dead_lettered_not_delivered(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let b1 = bus(&*w, "billing", "billing-1").await;
    let mut sub = b1.subscribe(Subscription::named("strict")).await.unwrap();
    let mut watch = b1.subscribe(Subscription::monitor()).await.unwrap();
    // Written past the publish checks, as a hand-made document or an older peer would be.
    let mut rogue = Message::to_service("billing", "not.declared");
    rogue.source_service = "billing".into();
    rogue.source_instance = "elsewhere-1".into();
    b1.medium().append(&[rogue.clone()]).await.unwrap();
    assert_eq!(
        next(&mut watch).await.id,
        rogue.id,
        "a monitor sees everything"
    );
    expect_marker_next(&b1, &mut [&mut sub]).await;
}

pub async fn request_reply_returns_the_typed_answer(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let server = bus(&*w, "billing", "billing-1").await;
    let client = bus(&*w, "users", "users-1").await;
    let mut watch = client.subscribe(Subscription::monitor()).await.unwrap();
    let _worker = server
        .serve("billing", "invoice.get", |q: InvoiceQuery| async move {
            Ok::<_, String>(Invoice {
                invoice: q.invoice,
                total: 99.5,
                served_by: "billing-1".into(),
            })
        })
        .unwrap();
    let answer: Invoice = client
        .request("billing", "invoice.get", &InvoiceQuery { invoice: 42 })
        .timeout(HANG_GUARD)
        .await
        .unwrap();
    assert_eq!(
        answer,
        Invoice {
            invoice: 42,
            total: 99.5,
            served_by: "billing-1".into()
        }
    );
    // The outcome is written into the request document itself.
    let record = settled_request(&client, &mut watch).await;
    assert_eq!(record.state, Some(intracom::State::Done));
    assert_eq!(record.kind, MessageType::Sync);
    assert_eq!(record.query_id.as_deref(), Some(record.id.as_str()));
    assert_eq!(
        record.result.as_ref().unwrap().get_i64("invoice").unwrap(),
        42
    );
    assert!(record.response_ts.is_some() && record.query_ms.is_some());
    server.shutdown().await;
}

pub async fn a_handler_error_reaches_the_caller(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let server = bus(&*w, "billing", "billing-1").await;
    let client = bus(&*w, "users", "users-1").await;
    let mut watch = client.subscribe(Subscription::monitor()).await.unwrap();
    let _worker = server
        .serve("billing", "invoice.get", |q: InvoiceQuery| async move {
            Err::<Invoice, _>(format!("no invoice {}", q.invoice))
        })
        .unwrap();
    let err = client
        .request::<_, Invoice>("billing", "invoice.get", &InvoiceQuery { invoice: 7 })
        .timeout(HANG_GUARD)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Remote { message, .. } if message == "no invoice 7"),
        "{err}"
    );
    let record = settled_request(&client, &mut watch).await;
    assert_eq!(record.state, Some(intracom::State::Error));
    assert_eq!(
        record.response.unwrap().get_str("error").unwrap(),
        "no invoice 7"
    );
    server.shutdown().await;
}

pub async fn an_unanswered_request_times_out_and_says_so(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let client = bus(&*w, "users", "users-1").await;
    let mut watch = client.subscribe(Subscription::monitor()).await.unwrap();
    let err = client
        .request::<_, Invoice>("billing", "invoice.get", &InvoiceQuery { invoice: 1 })
        .timeout(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    let record = settled_request(&client, &mut watch).await;
    assert_eq!(record.state, Some(intracom::State::Error));
    assert_eq!(
        record.response.unwrap().get_str("error").unwrap(),
        "timed out"
    );
}

pub async fn exactly_one_instance_answers_each_request(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let served = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, i64)>::new()));
    let mut servers = Vec::new();
    let mut workers = Vec::new();
    for instance in ["billing-1", "billing-2", "billing-3"] {
        let server = bus(&*w, "billing", instance).await;
        let log = served.clone();
        let name = instance.to_string();
        workers.push(
            server
                .serve("billing", "invoice.get", move |q: InvoiceQuery| {
                    let (log, name) = (log.clone(), name.clone());
                    async move {
                        log.lock().unwrap().push((name.clone(), q.invoice));
                        Ok::<_, String>(Invoice {
                            invoice: q.invoice,
                            total: 1.0,
                            served_by: name,
                        })
                    }
                })
                .unwrap(),
        );
        servers.push(server);
    }
    let client = bus(&*w, "users", "users-1").await;
    let calls = (0..12).map(|i| {
        let client = client.clone();
        async move {
            client
                .request::<_, Invoice>("billing", "invoice.get", &InvoiceQuery { invoice: i })
                .timeout(HANG_GUARD)
                .await
                .unwrap()
        }
    });
    let answers = futures::future::join_all(calls).await;
    assert_eq!(
        answers.iter().map(|a| a.invoice).collect::<Vec<_>>(),
        (0..12).collect::<Vec<_>>()
    );
    let mut handled: Vec<i64> = served.lock().unwrap().iter().map(|(_, n)| *n).collect();
    handled.sort();
    assert_eq!(
        handled,
        (0..12).collect::<Vec<_>>(),
        "each request handled exactly once"
    );
    for s in servers {
        s.shutdown().await;
    }
}

pub async fn a_local_handler_is_called_directly_and_recorded(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let web = bus(&*w, "users", "users-1").await;
    let billing = web.as_service("billing", Some("billing-local")).unwrap();
    let mut watch = web.subscribe(Subscription::monitor()).await.unwrap();
    let _worker = billing
        .serve("billing", "invoice.get", |q: InvoiceQuery| async move {
            Ok::<_, String>(Invoice {
                invoice: q.invoice,
                total: 3.0,
                served_by: "local".into(),
            })
        })
        .unwrap();
    let answer: Invoice = web
        .request("billing", "invoice.get", &InvoiceQuery { invoice: 5 })
        .await
        .unwrap();
    assert_eq!(answer.served_by, "local");
    // The record is on the bus, already settled (so no worker claims it).
    let d = next(&mut watch).await;
    assert_eq!(d.state, Some(intracom::State::Done));
    assert_eq!(
        d.result.as_ref().unwrap().get_str("served_by").unwrap(),
        "local"
    );
    web.shutdown().await;
}

pub async fn work_is_claimed_by_priority_then_age(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let producer = bus(&*w, "users", "users-1").await;
    let worker_bus = bus(&*w, "billing", "billing-1").await;
    for (n, priority) in [(1, 0), (2, 9), (3, 5), (4, 9)] {
        producer
            .publish(
                Message::to_service("billing", "invoice.render")
                    .work()
                    .priority(priority)
                    .body(doc! {"n": n}),
            )
            .await
            .unwrap();
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _worker = worker_bus
        .work(
            "billing",
            &["invoice.render"],
            quick(),
            move |m: Message| {
                let tx = tx.clone();
                async move {
                    tx.send(m.query.get_i32("n").unwrap()).ok();
                    Ok::<(), String>(())
                }
            },
        )
        .unwrap();
    let mut order = Vec::new();
    for _ in 0..4 {
        order.push(
            tokio::time::timeout(HANG_GUARD, rx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(order, [2, 4, 3, 1], "priority first, then publish order");
    worker_bus.shutdown().await;
}

/// The dead letter of a message, once it is there (within 30 s).
async fn wait_dead_letter(dead: &intracom::DeadLetters, id: &str) -> Option<intracom::DeadLetter> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        if let Some(letter) = dead.get(id).await.unwrap() {
            return Some(letter);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

pub async fn failing_work_is_retried_then_dead_lettered(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let worker_bus = bus(&*w, "billing", "billing-1").await;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    let _worker = worker_bus
        .work(
            "billing",
            &["invoice.render"],
            quick().max_attempts(3),
            move |_m: Message| {
                let seen = seen.clone();
                async move {
                    let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    Err::<(), String>(format!("printer on fire ({n})"))
                }
            },
        )
        .unwrap();
    let job = worker_bus
        .publish(Message::to_service("billing", "invoice.render").work())
        .await
        .unwrap();
    let dead = worker_bus.dead_letters();
    let letter = wait_dead_letter(&dead, &job.id)
        .await
        .expect("the job reached the dead letters");
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "max_attempts attempts, no more"
    );
    assert!(
        letter.reason.contains("printer on fire (3)"),
        "the last error is kept: {}",
        letter.reason
    );
    assert_eq!(letter.document.get_i32("attempts").unwrap(), 3);
    assert_eq!(dead.list(10).await.unwrap().len(), 1);

    // Sent again with a link to the original; then purged.
    let again = dead.retry(&job.id).await.unwrap();
    assert_ne!(again.id, job.id);
    assert!(dead.get(&job.id).await.unwrap().is_none());
    let relisted = wait_dead_letter(&dead, &again.id)
        .await
        .expect("the retried job failed again");
    assert_eq!(relisted.document.get_str("retryOf").unwrap(), job.id);
    assert_eq!(dead.purge(None).await.unwrap(), 1);
    assert!(dead.list(10).await.unwrap().is_empty());
    worker_bus.shutdown().await;
}

pub async fn work_held_by_a_crashed_worker_is_done_by_another(h: &dyn Harness) {
    let w = h.world(300_000).await;
    let doomed_bus = bus(&*w, "billing", "billing-doomed").await;
    let healthy_bus = bus(&*w, "billing", "billing-healthy").await;
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let doomed = doomed_bus
        .work(
            "billing",
            &["invoice.render"],
            quick(),
            move |_m: Message| {
                let started_tx = started_tx.clone();
                async move {
                    started_tx.send(()).ok();
                    std::future::pending::<()>().await;
                    Ok::<(), String>(())
                }
            },
        )
        .unwrap();
    let job = doomed_bus
        .publish(Message::to_service("billing", "invoice.render").work())
        .await
        .unwrap();
    tokio::time::timeout(HANG_GUARD, started.recv())
        .await
        .unwrap();
    doomed.abort(); // the worker dies holding the lease

    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    let _healthy = healthy_bus
        .work(
            "billing",
            &["invoice.render"],
            quick(),
            move |m: Message| {
                let done_tx = done_tx.clone();
                async move {
                    done_tx.send((m.id.clone(), m.attempts)).ok();
                    Ok::<(), String>(())
                }
            },
        )
        .unwrap();
    let (id, attempts) = tokio::time::timeout(HANG_GUARD, done.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id, job.id);
    assert_eq!(attempts, 2, "the crashed attempt counts");
    let settled = healthy_bus
        .medium()
        .work()
        .expect("a work queue")
        .await_outcome(&job.id, HANG_GUARD)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(settled.state, Some(intracom::State::Done));
    healthy_bus.shutdown().await;
    doomed_bus.shutdown().await;
}

/// Two workers of one process (one bus, one instance): the first one's handler holds
/// its task past the lease (its heartbeat cannot run), the second worker claims the
/// work; the first one's late failure must not settle the second one's claim (the lease
/// names the worker, not only the instance: with the instance alone the failure put the
/// work back to pending, and it ran a third time).
pub async fn a_lapsed_workers_late_outcome_leaves_its_neighbours_claim_alone(h: &dyn Harness) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let w = h.world(300_000).await;
    let worker_bus = bus(&*w, "billing", "billing-1").await;
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    // The second run tells the first (blocked on a thread) that it started.
    let (second_started_tx, second_started) = std::sync::mpsc::channel::<()>();
    let second_started = std::sync::Arc::new(std::sync::Mutex::new(second_started));
    let (first_done_tx, mut first_done) = tokio::sync::mpsc::unbounded_channel();
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let handler = {
        let runs = runs.clone();
        move |_m: Message| {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            let second_started = second_started.clone();
            let second_started_tx = second_started_tx.clone();
            let first_done_tx = first_done_tx.clone();
            let mut release = release.clone();
            async move {
                match n {
                    1 => {
                        // Blocks this worker's task, its heartbeat with it, until the
                        // lease has lapsed and the other worker has the work.
                        let started = tokio::task::block_in_place(|| {
                            let started = second_started.lock().unwrap_or_else(|p| p.into_inner());
                            started.recv_timeout(HANG_GUARD)
                        });
                        first_done_tx.send(started.is_ok()).ok();
                        Err("the first run failed, after its lease".to_string())
                    }
                    2 => {
                        second_started_tx.send(()).ok();
                        let _ = release.wait_for(|go| *go).await;
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
        }
    };
    let _first = worker_bus
        .work("billing", &["invoice.render"], quick(), handler.clone())
        .unwrap();
    let job = worker_bus
        .publish(Message::to_service("billing", "invoice.render").work())
        .await
        .unwrap();
    tokio::time::timeout(HANG_GUARD, async {
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the first worker runs the job");
    let _second = worker_bus
        .work("billing", &["invoice.render"], quick(), handler)
        .unwrap();
    let second_ran = tokio::time::timeout(HANG_GUARD, first_done.recv())
        .await
        .expect("the first run ends")
        .unwrap();
    assert!(second_ran, "the second worker claimed the lapsed work");
    // The first worker settles (or is refused) now; the second finishes after it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    release_tx.send_replace(true);
    let settled = worker_bus
        .medium()
        .work()
        .expect("a work queue")
        .await_outcome(&job.id, HANG_GUARD)
        .await
        .unwrap()
        .expect("the job settles");
    assert_eq!(settled.state, Some(intracom::State::Done), "{settled:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the late failure did not put the second worker's claim back: {settled:?}"
    );
    worker_bus.shutdown().await;
}

pub async fn idempotent_handlers_run_once_per_consumer(h: &dyn Harness) {
    use intracom::Once;
    let w = h.world(300_000).await;
    let b1 = bus(&*w, "billing", "billing-1").await;
    let b2 = bus(&*w, "billing", "billing-2").await;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let run = |n: i64| {
        let calls = calls.clone();
        move || async move {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, Error>(Invoice {
                invoice: n,
                total: 1.0,
                served_by: "x".into(),
            })
        }
    };
    // Re-delivered to another instance of the same consumer: runs once.
    assert!(matches!(
        b1.idempotent("ledger")
            .run_once("m1", run(1))
            .await
            .unwrap(),
        Once::Ran(_)
    ));
    match b2
        .idempotent("ledger")
        .run_once("m1", run(2))
        .await
        .unwrap()
    {
        Once::AlreadyDone(Some(result)) => assert_eq!(
            result.get_i64("invoice").unwrap(),
            1,
            "the first result is kept"
        ),
        other => panic!("expected AlreadyDone, got {other:?}"),
    }
    // Another consumer of the same message runs its own handler.
    assert!(matches!(
        b2.idempotent("audit").run_once("m1", run(3)).await.unwrap(),
        Once::Ran(_)
    ));
    // A failed handler is not recorded: the next delivery runs it again.
    let failed = b1
        .idempotent("ledger")
        .run_once("m2", || async { Err::<i32, _>(Error::Shutdown) })
        .await;
    assert!(failed.is_err());
    assert!(matches!(
        b1.idempotent("ledger")
            .run_once("m2", run(4))
            .await
            .unwrap(),
        Once::Ran(_)
    ));
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
}

pub async fn concurrent_instances_run_an_effect_once(h: &dyn Harness) {
    use intracom::Once;
    let w = h.world(300_000).await;
    let b1 = bus(&*w, "billing", "billing-1").await;
    let b2 = bus(&*w, "billing", "billing-2").await;
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Both instances got the same broadcast and handle it at the same moment.
    let attempt = |b: Intracom| {
        let runs = runs.clone();
        async move {
            b.idempotent("ledger")
                .run_once("m-broadcast", || async move {
                    runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, Error>(7)
                })
                .await
                .unwrap()
        }
    };
    let (a, b) = tokio::join!(attempt(b1.clone()), attempt(b2.clone()));
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the effect happened once"
    );
    let outcomes = [a, b];
    assert!(outcomes.contains(&Once::Ran(7)), "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .any(|o| matches!(o, Once::AlreadyDone(Some(r)) if r.get_i32("value") == Ok(7))),
        "{outcomes:?}"
    );
}

pub async fn a_dead_holders_reservation_is_taken_over(h: &dyn Harness) {
    use intracom::Once;
    let w = h.world(300_000).await;
    let b1 = bus(&*w, "billing", "billing-1").await;
    // An instance reserved the message, then died without finishing.
    let outcome =
        run_once_past_a_lapsed_holder(&b1, "m-crash", "billing-dead/1", "done here").await;
    assert_eq!(
        outcome,
        Once::Ran("done here"),
        "run once the dead holder's lease lapsed"
    );
}

/// Reserves `id` for the consumer `ledger` as `holder`, with a lease of 300 ms that
/// `holder` never ends (it died or is paused), then runs `run_once` for `id` on `bus`:
/// what it returns once it took the lapsed reservation over (bounded well below the
/// record's retention, 300 s, so only a take-over passes).
async fn run_once_past_a_lapsed_holder(
    bus: &Intracom,
    id: &str,
    holder: &str,
    value: &'static str,
) -> intracom::Once<&'static str> {
    let reserved = bus
        .medium()
        .records()
        .expect("idempotency records")
        .processed_reserve("ledger", id, holder, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(reserved, intracom::medium::Reservation::Reserved);
    tokio::time::timeout(
        HANG_GUARD,
        bus.idempotent("ledger")
            .run_once(id, || async move { Ok::<_, Error>(value) }),
    )
    .await
    .expect("taken over after the lease, not after the retention")
    .unwrap()
}

/// A holder whose reservation lapsed (a process paused past its lease) and was taken
/// over cannot complete it afterwards: its late completion is refused, so its run is
/// not the one recorded, and `run_once` tells its caller so.
pub async fn a_lapsed_holders_late_completion_is_refused(h: &dyn Harness) {
    use intracom::Once;
    let w = h.world(300_000).await;
    let b1 = bus(&*w, "billing", "billing-1").await;
    let outcome =
        run_once_past_a_lapsed_holder(&b1, "m-late", "billing-paused/1", "taken over").await;
    assert_eq!(outcome, Once::Ran("taken over"));
    let records = b1.medium().records().expect("idempotency records");
    // The paused holder wakes up and completes.
    let late = records
        .processed_complete("ledger", "m-late", "billing-paused/1", None)
        .await;
    assert!(
        matches!(&late, Err(Error::ReservationLost { consumer, id }) if consumer == "ledger" && id == "m-late"),
        "a lapsed holder's completion is refused: {late:?}"
    );
    // The recorded outcome is the one that took over.
    let again = b1
        .idempotent("ledger")
        .run_once("m-late", || async { Ok::<_, Error>("a third run") })
        .await
        .unwrap();
    assert!(
        matches!(again, Once::AlreadyDone(_)),
        "done once: {again:?}"
    );
}

/// One case of the suite: its name, what it needs, how to run it.
pub struct Case {
    /// The function name, used as the test name.
    pub name: &'static str,
    /// The capabilities the case relies on.
    pub needs: &'static [Capability],
    /// Runs the case against a harness.
    pub run: for<'a> fn(&'a dyn Harness) -> futures::future::BoxFuture<'a, ()>,
}

macro_rules! case {
    ($name:ident $(, $need:ident)*) => {
        Case {
            name: stringify!($name),
            needs: &[$(Capability::$need),*],
            run: |h| Box::pin($name(h)),
        }
    };
}

/// Every case of the suite.
pub fn cases() -> Vec<Case> {
    vec![
        case!(broadcast_reaches_every_subscriber),
        case!(targeted_reaches_only_its_target),
        case!(order_is_the_same_for_every_subscriber),
        case!(filters_select_actions_sources_and_types),
        case!(named_subscription_resumes_without_gap),
        case!(checkpoint_is_shared_through_the_medium, SharedCheckpoints),
        case!(new_subscription_starts_now_or_from_beginning, History),
        case!(retention_expires_and_reports_loss, History, LossReports),
        case!(catalog_errors_write_nothing),
        case!(bad_input_is_refused_and_writes_nothing),
        case!(republishing_an_id_stores_it_once),
        case!(typed_payloads_round_trip),
        case!(a_slow_subscriber_does_not_hold_back_others),
        case!(shutdown_ends_streams_and_refuses_work),
        case!(handler_acks_on_ok_only),
        case!(undeclared_messages_are_dead_lettered_not_delivered),
        case!(request_reply_returns_the_typed_answer),
        case!(a_handler_error_reaches_the_caller),
        case!(an_unanswered_request_times_out_and_says_so),
        case!(exactly_one_instance_answers_each_request),
        case!(a_local_handler_is_called_directly_and_recorded),
        case!(work_is_claimed_by_priority_then_age, StoredQueue),
        case!(failing_work_is_retried_then_dead_lettered),
        case!(
            work_held_by_a_crashed_worker_is_done_by_another,
            StoredQueue
        ),
        case!(
            a_lapsed_workers_late_outcome_leaves_its_neighbours_claim_alone,
            StoredQueue
        ),
        case!(idempotent_handlers_run_once_per_consumer, SharedState),
        case!(concurrent_instances_run_an_effect_once, SharedState),
        case!(a_dead_holders_reservation_is_taken_over, SharedState),
        case!(a_lapsed_holders_late_completion_is_refused, SharedState),
    ]
}

/// Runs an async test body on a runtime of its own, as `#[tokio::test(flavor =
/// "multi_thread", worker_threads = 2)]` does.
pub fn block_on<F: std::future::Future<Output = ()>>(body: F) -> Result<(), libtest_mimic::Failed> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| libtest_mimic::Failed::from(format!("cannot build a runtime: {e}")))?;
    runtime.block_on(body);
    // Whatever a test left running (a worker, a stream) must not keep the trial alive.
    runtime.shutdown_timeout(Duration::from_secs(5));
    Ok(())
}

/// The suite's trials for one medium: `<prefix>::<case>`. A case is ignored, with the
/// reason as its kind, when the medium cannot be had (`unavailable`), lacks a
/// capability the case needs, or is a server with a listed divergence for the case.
pub fn trials(
    prefix: &str,
    harness: std::sync::Arc<dyn Harness>,
    unavailable: Option<&str>,
) -> Vec<libtest_mimic::Trial> {
    cases()
        .into_iter()
        .map(|case| {
            let missing: Vec<&str> = case
                .needs
                .iter()
                .filter(|need| !harness.capabilities().contains(need))
                .map(|need| need.name())
                .collect();
            let skip = if let Some(reason) = unavailable {
                Some(reason.to_string())
            } else if !missing.is_empty() {
                Some(format!("{prefix} lacks {}", missing.join(", ")))
            } else {
                harness.excluded(case.name).map(str::to_string)
            };
            let name = format!("{prefix}::{}", case.name);
            let harness = std::sync::Arc::clone(&harness);
            let run = case.run;
            let trial = libtest_mimic::Trial::test(name, move || block_on(run(&*harness)));
            match skip {
                Some(reason) => trial.with_ignored_flag(true).with_kind(reason),
                None => trial,
            }
        })
        .collect()
}

/// Runs trials like `cargo test` does, with `--test-threads` defaulting to `threads`
/// (the cases mostly wait on I/O), then calls `teardown` and exits with the result.
pub fn run_main(trials: Vec<libtest_mimic::Trial>, threads: usize, teardown: impl FnOnce()) -> ! {
    let mut args = libtest_mimic::Arguments::from_args();
    if args.test_threads.is_none() {
        args.test_threads = Some(threads);
    }
    let conclusion = libtest_mimic::run(&args, trials);
    teardown();
    conclusion.exit()
}
