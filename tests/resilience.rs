//! The outbox and the idempotency fall-back through the public API: a medium that goes
//! down and comes back, on top of the memory medium.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use intracom::bson::Document;
use intracom::filter::{Filter, StartFrom};
use intracom::medium::memory::MemoryMedium;
use intracom::medium::{Call, DeadLetterStore, Faults, Faulty, Records, Reservation};
use intracom::{Config, Error, Intracom, Medium, Message, PublishStatus, Subscription};

/// The memory medium behind a switch: while `down`, appends fail as a lost network would.
struct Flaky {
    down: AtomicBool,
    /// While set, the idempotency store is unreachable.
    store_down: AtomicBool,
    /// A batch holding a message with this action is refused for good, as a whole.
    refused_action: std::sync::Mutex<Option<String>>,
    /// Calls of `append`, whatever their outcome.
    appends: AtomicUsize,
    /// While set, the next wait for a request's outcome sees it settled and still ends
    /// as a time-out: the handler's answer lands just as the caller's wait ends.
    outcome_late: AtomicBool,
}

impl Flaky {
    fn store(&self) -> intracom::Result<()> {
        if self.store_down.load(Ordering::SeqCst) {
            return Err(Error::unavailable("flaky", "no primary"));
        }
        Ok(())
    }

    fn check_append(&self, messages: &[Message]) -> intracom::Result<()> {
        self.appends.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::unavailable("flaky", "connection refused"));
        }
        let refused = self.refused_action.lock().unwrap().clone();
        if let Some(bad) = messages
            .iter()
            .find(|m| Some(&m.action) == refused.as_ref())
        {
            return Err(Error::refused(
                "flaky",
                format!("message {} refused", bad.id),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Faults for Flaky {
    async fn before(&self, call: Call<'_>) -> intracom::Result<()> {
        match call {
            Call::Append(messages) => self.check_append(messages),
            Call::ProcessedReserve | Call::ProcessedComplete | Call::ProcessedRelease => {
                self.store()
            }
            _ => Ok(()),
        }
    }

    async fn outcome(
        &self,
        _id: &str,
        outcome: Option<Message>,
    ) -> intracom::Result<Option<Message>> {
        if self.outcome_late.swap(false, Ordering::SeqCst) {
            assert!(outcome.is_some(), "the handler settles the request");
            return Ok(None);
        }
        Ok(outcome)
    }
}

fn flaky() -> Arc<Faulty<MemoryMedium, Flaky>> {
    Arc::new(Faulty::new(
        MemoryMedium::new(Default::default()),
        Flaky {
            down: AtomicBool::new(false),
            store_down: AtomicBool::new(false),
            refused_action: std::sync::Mutex::new(None),
            appends: AtomicUsize::new(0),
            outcome_late: AtomicBool::new(false),
        },
    ))
}

fn config() -> intracom::ConfigBuilder {
    Config::builder()
        .service("billing")
        .instance("billing-1")
        .sender("billing", ["reload"])
}

/// Waits for the outbox to let go of what it sent: the flusher takes a batch out after
/// the medium took it, so a delivery can be seen a moment before.
async fn outbox_empties(bus: &Intracom) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while bus.outbox_len() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox still holds {} messages that were delivered",
            bus.outbox_len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn next_id(sub: &mut intracom::Subscriber) -> String {
    let item = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .expect("a delivery");
    item.expect("open").expect("no error").id.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_dropped_without_shutdown_sends_what_waits_then_lets_its_medium_go() {
    let medium = flaky();
    let bus = Intracom::with_medium(config().build().unwrap(), medium.clone())
        .await
        .unwrap();
    // Watched on the medium itself: the bus is gone when the message arrives.
    let mut stored = medium
        .inner()
        .follow(StartFrom::Now, Filter::monitor())
        .await
        .unwrap();
    medium.down.store(true, Ordering::SeqCst);
    let kept = bus.publish(Message::broadcast("reload")).await.unwrap();
    assert_eq!(kept.status, PublishStatus::Buffered);
    drop(bus);
    medium.down.store(false, Ordering::SeqCst);
    // What waited is still sent...
    match tokio::time::timeout(Duration::from_secs(30), stored.next())
        .await
        .expect("the buffered message is sent after the bus was dropped")
    {
        Some(Ok(intracom::medium::Event::Message(message, _))) => assert_eq!(message.id, kept.id),
        other => panic!("expected the buffered message, got {other:?}"),
    }
    // ...then the flusher ends, and the medium is let go (no task keeps it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while Arc::strong_count(&medium) > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} holders of the medium are left",
            Arc::strong_count(&medium) - 1
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_wait_in_order_while_the_medium_is_down() {
    let medium = flaky();
    let bus = Intracom::with_medium(config().build().unwrap(), medium.clone())
        .await
        .unwrap();
    let mut sub = bus.subscribe(Subscription::new()).await.unwrap();
    let first = bus.publish(Message::broadcast("reload")).await.unwrap();
    assert_eq!(first.status, PublishStatus::Stored);

    medium.down.store(true, Ordering::SeqCst);
    let mut buffered = Vec::new();
    for _ in 0..5 {
        let p = bus.publish(Message::broadcast("reload")).await.unwrap();
        assert_eq!(
            p.status,
            PublishStatus::Buffered,
            "the caller can tell it was buffered"
        );
        buffered.push(p.id);
    }
    assert_eq!(bus.outbox_len(), 5);
    // Bad input is still refused at once, never buffered.
    assert!(matches!(
        bus.publish(Message::broadcast("nope")).await,
        Err(Error::UnknownAction { .. })
    ));

    medium.down.store(false, Ordering::SeqCst);
    // A publish now queues behind the outbox, so order is kept.
    let last = bus.publish(Message::broadcast("reload")).await.unwrap();
    let mut expected = vec![first.id];
    expected.extend(buffered);
    expected.push(last.id);
    let mut got = Vec::new();
    for _ in 0..expected.len() {
        got.push(next_id(&mut sub).await);
    }
    assert_eq!(got, expected, "every message once, in publish order");
    outbox_empties(&bus).await;
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_in_the_outbox_is_dead_lettered_alone() {
    let medium = flaky();
    let config = Config::builder()
        .service("billing")
        .instance("billing-1")
        .sender("billing", ["reload", "poison"])
        .build()
        .unwrap();
    let bus = Intracom::with_medium(config, medium.clone()).await.unwrap();
    let mut sub = bus.subscribe(Subscription::new()).await.unwrap();
    medium.down.store(true, Ordering::SeqCst);
    let mut good = Vec::new();
    let mut poison = None;
    for i in 0..5 {
        let action = if i == 2 { "poison" } else { "reload" };
        let p = bus.publish(Message::broadcast(action)).await.unwrap();
        assert_eq!(p.status, PublishStatus::Buffered);
        if i == 2 {
            poison = Some(p.id);
        } else {
            good.push(p.id);
        }
    }
    // Back up, but the medium refuses any batch that holds the poison message.
    *medium.refused_action.lock().unwrap() = Some("poison".into());
    medium.down.store(false, Ordering::SeqCst);
    let mut got = Vec::new();
    for _ in 0..good.len() {
        got.push(next_id(&mut sub).await);
    }
    assert_eq!(got, good, "every other message once, in order");
    let dead = medium.dead_list(10).await.unwrap();
    let dead: Vec<&str> = dead.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        dead,
        [poison.unwrap().as_str()],
        "only the refused one is dead"
    );
    outbox_empties(&bus).await;
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_is_an_error_the_caller_sees() {
    let medium = flaky();
    let config = config()
        .set("common.intracom.outbox.max_messages", "2")
        .build()
        .unwrap();
    let bus = Intracom::with_medium(config, medium.clone()).await.unwrap();
    medium.down.store(true, Ordering::SeqCst);
    bus.publish(Message::broadcast("reload")).await.unwrap();
    bus.publish(Message::broadcast("reload")).await.unwrap();
    let err = bus.publish(Message::broadcast("reload")).await.unwrap_err();
    assert!(matches!(err, Error::OutboxFull { capacity: 2 }), "{err}");
    assert!(err.is_retryable());
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_medium_closed_under_the_outbox_refuses_nothing_for_good() {
    let medium = flaky();
    let bus = Intracom::with_medium(config().build().unwrap(), medium.clone())
        .await
        .unwrap();
    medium.down.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let p = bus.publish(Message::broadcast("reload")).await.unwrap();
        assert_eq!(p.status, PublishStatus::Buffered);
    }
    // The medium closes (a shut-down under way) while the flusher still retries.
    medium.inner().close().await;
    let tried = medium.appends.load(Ordering::SeqCst);
    medium.down.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while medium.appends.load(Ordering::SeqCst) < tried + 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the flusher did not retry"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        medium.dead_list(10).await.unwrap().is_empty(),
        "a closed medium is no reason to dead-letter a message"
    );
    assert_eq!(bus.outbox_len(), 3, "the messages are kept");
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_file_is_replayed_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.bson");
    let down = flaky();
    down.down.store(true, Ordering::SeqCst);
    let bus = Intracom::with_medium(config().outbox_file(&path).build().unwrap(), down)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(bus.publish(Message::broadcast("reload")).await.unwrap().id);
    }
    bus.shutdown().await; // the process stops with the medium still down

    let up = flaky();
    let mut watch = {
        // Subscribe first on a bus without the file, to see what the replay sends.
        let observer =
            Intracom::with_medium(config().instance("observer").build().unwrap(), up.clone())
                .await
                .unwrap();
        observer.subscribe(Subscription::monitor()).await.unwrap()
    };
    let restarted = Intracom::with_medium(config().outbox_file(&path).build().unwrap(), up)
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_id(&mut watch).await);
    }
    assert_eq!(got, ids, "replayed in order after the restart");
    outbox_empties(&restarted).await;
    restarted.shutdown().await;
}

/// Whether the memory medium's own store (behind the switch) has `id` done for `consumer`.
async fn stored_done(medium: &Faulty<MemoryMedium, Flaky>, consumer: &str, id: &str) -> bool {
    matches!(
        medium
            .inner()
            .processed_reserve(consumer, id, "probe", Duration::from_millis(1))
            .await
            .unwrap(),
        Reservation::Done(_)
    )
}

/// The write-back after an outage meets a message someone else holds in the store: its
/// record stays in memory (and the bus on it) until the store has it, so that whoever
/// reserves it next finds it done instead of running its handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_write_back_cannot_take_yet_stays_done_in_memory() {
    use intracom::Once;
    let medium = flaky();
    let bus = Intracom::with_medium(config().build().unwrap(), medium.clone())
        .await
        .unwrap();
    let ledger = bus.idempotent("ledger");
    let ran = Arc::new(AtomicUsize::new(0));
    let count = |n: i32| {
        let ran = Arc::clone(&ran);
        move || async move {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(n)
        }
    };
    medium.store_down.store(true, Ordering::SeqCst);
    assert_eq!(ledger.run_once("y", count(1)).await.unwrap(), Once::Ran(1));
    medium.store_down.store(false, Ordering::SeqCst);
    // Another holder has `y` in the store while the write-back runs.
    assert_eq!(
        medium
            .inner()
            .processed_reserve("ledger", "y", "elsewhere", Duration::from_secs(60))
            .await
            .unwrap(),
        Reservation::Reserved
    );
    // The store answers again (after the fall-back's pause): other messages use it,
    // and the write-back of `y` waits.
    let mut probes = 0;
    loop {
        probes += 1;
        ledger
            .run_once(&format!("probe-{probes}"), count(0))
            .await
            .unwrap();
        if stored_done(&medium, "ledger", &format!("probe-{probes}")).await {
            break;
        }
        assert!(probes < 600, "the store is used again once it answers");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    medium
        .inner()
        .processed_release("ledger", "y", "elsewhere")
        .await
        .unwrap();
    let before = ran.load(Ordering::SeqCst);
    assert!(
        matches!(
            ledger.run_once("y", count(2)).await.unwrap(),
            Once::AlreadyDone(_)
        ),
        "done during the outage: not run again"
    );
    assert_eq!(ran.load(Ordering::SeqCst), before);
    assert!(stored_done(&medium, "ledger", "y").await, "written back");
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_falls_back_to_memory_and_goes_back() {
    use intracom::Once;
    let medium = flaky();
    let bus = Intracom::with_medium(config().build().unwrap(), medium.clone())
        .await
        .unwrap();
    let ledger = bus.idempotent("ledger");
    let run = |n: i32| async move { Ok::<_, Error>(n) };

    medium.store_down.store(true, Ordering::SeqCst);
    assert_eq!(
        ledger.run_once("m1", || run(1)).await.unwrap(),
        Once::Ran(1)
    );
    assert!(
        matches!(
            ledger.run_once("m1", || run(2)).await.unwrap(),
            Once::AlreadyDone(_)
        ),
        "de-duplicated in memory"
    );
    ledger.run_once("m2", || run(3)).await.unwrap();
    assert_eq!(bus.idempotency_fallbacks(), 1, "counted once per outage");

    medium.store_down.store(false, Ordering::SeqCst);
    // The store is tried again after a short pause; until then memory answers.
    let mut back = false;
    for _ in 0..600 {
        ledger.run_once("probe-1", || run(0)).await.unwrap();
        if stored_done(&medium, "ledger", "probe-1").await {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "the store is used again once it answers");
    // Done during the outage stays done, and was written back.
    assert!(matches!(
        ledger.run_once("m1", || run(4)).await.unwrap(),
        Once::AlreadyDone(_)
    ));
    assert!(stored_done(&medium, "ledger", "m2").await, "written back");
    assert_eq!(
        ledger.run_once("m3", || run(5)).await.unwrap(),
        Once::Ran(5)
    );
    assert!(stored_done(&medium, "ledger", "m3").await);
    assert_eq!(bus.idempotency_fallbacks(), 1);
    bus.shutdown().await;
}

/// A request settled by its handler just as the caller's wait ends: the caller's mark
/// "timed out" is refused (the request is no longer pending), and the caller gets the
/// stored answer, not a time-out that the stored `done` would contradict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_settled_as_its_wait_ends_gets_its_answer_not_a_time_out() {
    use intracom::bson::doc;
    let medium = flaky();
    let server = Intracom::with_medium(
        config().sender("billing", ["invoice.get"]).build().unwrap(),
        medium.clone(),
    )
    .await
    .unwrap();
    let _serving = server
        .serve("billing", "invoice.get", |_q: Document| async move {
            Ok::<_, String>(doc! { "total": 7 })
        })
        .unwrap();
    let caller = Intracom::with_medium(
        Config::builder()
            .service("users")
            .instance("users-1")
            .sender("billing", ["invoice.get"])
            .sender("users", Vec::<String>::new())
            .build()
            .unwrap(),
        medium.clone(),
    )
    .await
    .unwrap();
    medium.outcome_late.store(true, Ordering::SeqCst);
    let answer: Document = caller
        .request("billing", "invoice.get", &doc! {})
        .timeout(Duration::from_secs(30))
        .await
        .expect("the stored answer, not a time-out");
    assert_eq!(answer.get_i32("total").unwrap(), 7);
    caller.shutdown().await;
    server.shutdown().await;
}
