//! The metrics an operator scrapes are emitted where the design says (one global
//! recorder per test binary, so this file holds one test).

use std::time::Duration;

use futures::StreamExt;
use intracom::{Config, Intracom, Message, Subscription, WorkOptions};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;

fn counter(
    snapshot: &[(metrics_util::CompositeKey, DebugValue)],
    name: &str,
    label: Option<(&str, &str)>,
) -> u64 {
    snapshot
        .iter()
        .filter(|(key, _)| key.kind() == MetricKind::Counter && key.key().name() == name)
        .filter(|(key, _)| {
            label.is_none_or(|(k, v)| key.key().labels().any(|l| l.key() == k && l.value() == v))
        })
        .map(|(_, value)| match value {
            DebugValue::Counter(n) => *n,
            _ => 0,
        })
        .sum()
}

fn histogram_count(snapshot: &[(metrics_util::CompositeKey, DebugValue)], name: &str) -> usize {
    snapshot
        .iter()
        .filter(|(key, _)| key.key().name() == name)
        .map(|(_, value)| match value {
            DebugValue::Histogram(values) => values.len(),
            _ => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_can_scrape_what_the_bus_does() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let config = Config::builder()
        .service("billing")
        .instance("billing-1")
        .sender("billing", ["reload", "invoice.get", "invoice.render"])
        .build()
        .unwrap();
    let bus = Intracom::connect(config).await.unwrap();
    let mut sub = bus.subscribe(Subscription::named("cache")).await.unwrap();
    bus.publish(Message::broadcast("reload")).await.unwrap();
    sub.next().await.unwrap().unwrap().ack().await.unwrap();
    // A run of deliveries ready back to back: the latency is sampled, every delivery
    // counted once the stream waits again.
    let mut burst = bus.subscribe(Subscription::named("burst")).await.unwrap();
    for _ in 0..40 {
        bus.publish(Message::broadcast("reload")).await.unwrap();
    }
    for _ in 0..40 {
        burst.next().await.unwrap().unwrap();
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(100), burst.next())
            .await
            .is_err(),
        "nothing more was published"
    );

    let _server = bus
        .serve(
            "billing",
            "invoice.get",
            |n: intracom::bson::Document| async move { Ok::<_, String>(n) },
        )
        .unwrap();
    let _: intracom::bson::Document = bus
        .request("billing", "invoice.get", &intracom::bson::doc! { "n": 1 })
        .await
        .unwrap();

    let options = WorkOptions::default()
        .max_attempts(2)
        .backoff(Duration::from_millis(10))
        .poll(Duration::from_millis(20));
    let _worker = bus
        .work(
            "billing",
            &["invoice.render"],
            options,
            |_m: Message| async { Err::<(), _>("broken") },
        )
        .unwrap();
    let job = bus
        .publish(Message::to_service("billing", "invoice.render").work())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while bus.dead_letters().get(&job.id).await.unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failing job was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let snapshot: Vec<_> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(k, _, _, v)| (k, v))
        .collect();
    assert_eq!(
        counter(
            &snapshot,
            intracom::metrics::PUBLISHED,
            Some(("status", "stored"))
        ),
        43,
        "41 broadcasts, the request's record, the job"
    );
    assert_eq!(
        counter(
            &snapshot,
            intracom::metrics::DELIVERED,
            Some(("subscription", "cache"))
        ),
        1
    );
    assert_eq!(
        counter(
            &snapshot,
            intracom::metrics::ACKED,
            Some(("subscription", "cache"))
        ),
        1
    );
    assert_eq!(
        counter(
            &snapshot,
            intracom::metrics::DELIVERED,
            Some(("subscription", "burst"))
        ),
        40
    );
    assert_eq!(
        histogram_count(&snapshot, intracom::metrics::DELIVERY_LATENCY),
        41,
        "one per delivery, the run's included"
    );
    assert_eq!(
        histogram_count(&snapshot, intracom::metrics::REQUEST_SECONDS),
        1
    );
    assert_eq!(
        counter(&snapshot, intracom::metrics::RETRIED, None),
        1,
        "attempt 1 failed and was retried"
    );
    assert_eq!(
        counter(
            &snapshot,
            intracom::metrics::DEAD_LETTERED,
            Some(("reason", "attempts"))
        ),
        1
    );
    assert_eq!(counter(&snapshot, intracom::metrics::CLAIMED, None), 2);
    bus.shutdown().await;
}
