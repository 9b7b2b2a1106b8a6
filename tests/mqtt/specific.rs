//! What only the MQTT medium must show: persistent sessions across a consumer's absence
//! and a broker restart, request/reply between buses, the outbox while the broker is
//! down, and the input MQTT refuses.

use futures::StreamExt;
use intracom::bson::doc;
use intracom::{Config, Error, Intracom, Message, PublishStatus, Subscription};

use crate::broker::{self, Broker};
use crate::conformance::{expect_marker_next, next, HANG_GUARD};
use crate::{check, isolated, space, Check};

pub fn checks() -> Vec<Check> {
    vec![
        check!(a_named_subscriber_away_gets_all_100_messages_when_back),
        check!(a_broker_restart_keeps_a_persistent_sessions_queue),
        check!(two_services_on_separate_buses_exchange_a_request),
        check!(broker_down_at_publish_buffers_then_delivers_in_order),
        check!(a_message_over_the_brokers_packet_size_is_refused_before_sending),
        check!(names_mqtt_forbids_are_refused_with_the_rule),
        check!(an_unreadable_payload_is_dead_lettered_and_consumption_goes_on),
        check!(work_without_a_worker_is_refused_not_lost),
        check!(work_for_a_stale_presence_is_refused_not_lost),
        check!(a_late_ack_of_an_earlier_subscription_releases_nothing_of_the_next),
        check!(history_is_refused_not_faked),
        check!(a_worker_that_stops_hands_back_what_the_broker_queued_for_it),
    ]
}

fn catalog(service: &str, instance: &str) -> Config {
    Config::builder()
        .service(service)
        .instance(instance)
        .sender(
            "billing",
            ["reload", "marker", "invoice.get", "invoice.render"],
        )
        .sender("web", ["marker"])
        .build()
        .expect("config")
}

async fn bus_on(url: &str, space: &str, service: &str, instance: &str) -> Intracom {
    Intracom::connect(isolated(catalog(service, instance), url, space))
        .await
        .expect("bus on MQTT")
}

fn shared_url() -> String {
    broker::shared().expect("mosquitto").url()
}

async fn a_named_subscriber_away_gets_all_100_messages_when_back() {
    let (url, space) = (shared_url(), space());
    let consumer = bus_on(&url, &space, "billing", "billing-1").await;
    let producer = bus_on(&url, &space, "billing", "billing-2").await;
    let sub = consumer
        .subscribe(Subscription::named("ledger"))
        .await
        .unwrap();
    // The consumer stops: its session stays on the broker.
    drop(sub);
    consumer.shutdown().await;
    let mut sent = Vec::new();
    for i in 0..100 {
        let p = producer
            .publish(Message::broadcast("reload").body(doc! { "i": i }))
            .await
            .unwrap();
        assert_eq!(p.status, PublishStatus::Stored);
        sent.push(p.id);
    }
    let back = bus_on(&url, &space, "billing", "billing-1").await;
    let mut sub = back.subscribe(Subscription::named("ledger")).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..100 {
        let d = next(&mut sub).await;
        got.push(d.id.clone());
        d.ack().await.unwrap();
    }
    assert_eq!(got, sent, "all 100, in publish order");
    expect_marker_next(&producer, &mut [&mut sub]).await;
}

async fn a_broker_restart_keeps_a_persistent_sessions_queue() {
    let mut broker = Broker::start().expect("a broker of this test");
    let (url, space) = (broker.url(), space());
    let consumer = bus_on(&url, &space, "billing", "billing-1").await;
    let producer = bus_on(&url, &space, "billing", "billing-2").await;
    drop(
        consumer
            .subscribe(Subscription::named("ledger"))
            .await
            .unwrap(),
    );
    consumer.shutdown().await;
    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(
            producer
                .publish(Message::broadcast("reload").body(doc! { "i": i }))
                .await
                .unwrap()
                .id,
        );
    }
    producer.shutdown().await;
    // A clean stop writes the persistence file; the start reads it.
    broker.restart().expect("broker restarted");
    let back = bus_on(&url, &space, "billing", "billing-1").await;
    let mut sub = back.subscribe(Subscription::named("ledger")).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..20 {
        let d = next(&mut sub).await;
        got.push(d.id.clone());
        d.ack().await.unwrap();
    }
    assert_eq!(got, sent, "none of the queued messages lost");
    back.shutdown().await;
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Query {
    invoice: i64,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Invoice {
    invoice: i64,
    served_by: String,
}

async fn two_services_on_separate_buses_exchange_a_request() {
    let (url, space) = (shared_url(), space());
    let billing = bus_on(&url, &space, "billing", "billing-1").await;
    let web = bus_on(&url, &space, "web", "web-1").await;
    let _server = billing
        .serve("billing", "invoice.get", |q: Query| async move {
            Ok::<_, String>(Invoice {
                invoice: q.invoice,
                served_by: "billing-1".into(),
            })
        })
        .unwrap();
    let answer: Invoice = web
        .request("billing", "invoice.get", &Query { invoice: 42 })
        .timeout(HANG_GUARD)
        .await
        .unwrap();
    assert_eq!(
        answer,
        Invoice {
            invoice: 42,
            served_by: "billing-1".into()
        }
    );
    billing.shutdown().await;
    web.shutdown().await;
}

async fn broker_down_at_publish_buffers_then_delivers_in_order() {
    let mut broker = Broker::start().expect("a broker of this test");
    let (url, space) = (broker.url(), space());
    let consumer = bus_on(&url, &space, "billing", "billing-1").await;
    let producer = bus_on(&url, &space, "billing", "billing-2").await;
    let mut sub = consumer
        .subscribe(Subscription::named("ledger"))
        .await
        .unwrap();
    broker.stop();
    let mut sent = Vec::new();
    for i in 0..10 {
        let p = producer
            .publish(Message::broadcast("reload").body(doc! { "i": i }))
            .await
            .unwrap();
        assert_eq!(
            p.status,
            PublishStatus::Buffered,
            "kept while the broker is down"
        );
        sent.push(p.id);
    }
    assert_eq!(producer.outbox_len(), 10);
    broker.restart().expect("broker restarted");
    let mut got = Vec::new();
    for _ in 0..10 {
        let d = next(&mut sub).await;
        got.push(d.id.clone());
        d.ack().await.unwrap();
    }
    assert_eq!(
        got, sent,
        "delivered in publish order once the broker is back"
    );
    // The outbox forgets what it sent once the broker's acks are in (bounded wait).
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    while producer.outbox_len() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "outbox not emptied");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    producer.shutdown().await;
    consumer.shutdown().await;
}

async fn a_message_over_the_brokers_packet_size_is_refused_before_sending() {
    let (url, space) = (shared_url(), space());
    let bus = bus_on(&url, &space, "billing", "billing-1").await;
    let mut watch = bus.subscribe(Subscription::monitor()).await.unwrap();
    let big = "x".repeat(broker::MAX_PACKET + 10);
    let e = bus
        .publish(Message::broadcast("reload").body(doc! { "blob": big }))
        .await
        .unwrap_err();
    match &e {
        Error::PacketTooLarge { size, limit, .. } => {
            assert_eq!(
                *limit,
                broker::MAX_PACKET,
                "the broker's maximum, from its CONNACK"
            );
            assert!(*size > broker::MAX_PACKET);
            let text = e.to_string();
            assert!(
                text.contains(&size.to_string()) && text.contains(&limit.to_string()),
                "both sizes named: {text}"
            );
        }
        other => panic!("expected PacketTooLarge, got {other}"),
    }
    assert!(!e.is_retryable(), "not kept in the outbox");
    assert_eq!(bus.outbox_len(), 0);
    expect_marker_next(&bus, &mut [&mut watch]).await;
    bus.shutdown().await;
}

async fn names_mqtt_forbids_are_refused_with_the_rule() {
    let (url, space) = (shared_url(), space());
    let bus = bus_on(&url, &space, "billing", "billing-1").await;
    let mut watch = bus.subscribe(Subscription::monitor()).await.unwrap();
    for (instance, rule) in [
        ("billing+1", "wildcards"),
        ("billing#1", "wildcards"),
        ("billing/1", "separates MQTT topic levels"),
    ] {
        let e = bus
            .publish(Message::to_instance("billing", instance, "reload"))
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidMessage { .. }) && e.to_string().contains(rule),
            "{instance}: {e}"
        );
    }
    let e = bus
        .catalog()
        .register("billing", ["invoice.#"])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("wildcards"), "{e}");
    let e = bus
        .publish(Message::broadcast("re\0load"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidMessage { .. }), "{e}");
    expect_marker_next(&bus, &mut [&mut watch]).await;
    bus.shutdown().await;
}

/// Publishes one QoS 1 message with a client of its own (not intracom), waits for the
/// broker's PUBACK, then keeps the client's connection driven; abort the task to end it.
async fn publish_raw(
    url: &str,
    client_id: String,
    topic: &str,
    retain: bool,
    payload: &'static str,
) -> (rumqttc::v5::AsyncClient, tokio::task::JoinHandle<()>) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let (client, mut eventloop) =
        AsyncClient::new(MqttOptions::new(client_id, "127.0.0.1", port), 10);
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload)
        .await
        .unwrap();
    tokio::time::timeout(HANG_GUARD, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("raw client: {e}"),
            }
        }
    })
    .await
    .expect("the broker acknowledged the raw publish");
    let driver = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    (client, driver)
}

async fn an_unreadable_payload_is_dead_lettered_and_consumption_goes_on() {
    let (url, space) = (shared_url(), space());
    let bus = bus_on(&url, &space, "billing", "billing-1").await;
    let mut named = bus.subscribe(Subscription::named("strict")).await.unwrap();
    let mut plain = bus.subscribe(Subscription::new()).await.unwrap();
    let before = crate::counter("intracom_dead_lettered_total", ("reason", "unreadable"));

    // Someone else's client writes bytes that are not a message on an intracom topic;
    // once the broker took it, what intracom publishes next comes after it.
    let (_rogue, driver) = publish_raw(
        &url,
        format!("{space}-rogue"),
        &format!("test/{space}/all/reload"),
        false,
        "not bson at all",
    )
    .await;
    let good = bus.publish(Message::broadcast("reload")).await.unwrap();
    assert_eq!(next(&mut plain).await.id, good.id, "consumption goes on");
    let d = next(&mut named).await;
    assert_eq!(d.id, good.id, "consumption goes on");
    d.ack().await.unwrap();
    let letters = bus.dead_letters().list(10).await.unwrap();
    assert_eq!(
        letters.len(),
        1,
        "one dead letter, however many consumers saw it"
    );
    assert!(
        letters[0].reason.contains("not a readable message"),
        "{}",
        letters[0].reason
    );
    assert_eq!(
        letters[0].document.get_str("topic").unwrap(),
        format!("test/{space}/all/reload")
    );
    let after = crate::counter("intracom_dead_lettered_total", ("reason", "unreadable"));
    assert!(after > before, "counted ({before} → {after})");
    // The named subscription acknowledged the bad payload too: nothing comes again.
    drop(named);
    let mut again = bus.subscribe(Subscription::named("strict")).await.unwrap();
    expect_marker_next(&bus, &mut [&mut again]).await;
    driver.abort();
    bus.shutdown().await;
}

async fn work_without_a_worker_is_refused_not_lost() {
    let (url, space) = (shared_url(), space());
    let mut config = isolated(catalog("web", "web-1"), &url, &space);
    config.request_timeout_ms = 300;
    let bus = Intracom::connect(config).await.unwrap();
    let e = bus
        .publish(Message::to_service("billing", "invoice.render").work())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::NoWorker { service, .. } if service == "billing"),
        "{e}"
    );
    assert_eq!(bus.outbox_len(), 0);
    bus.shutdown().await;
}

async fn work_for_a_stale_presence_is_refused_not_lost() {
    let (url, space) = (shared_url(), space());
    // A presence nobody deletes (a worker whose Will did not reach this bus): the
    // broker has no subscription behind it.
    let presence = format!("test/{space}/workers/billing/ghost");
    let (client, driver) = publish_raw(
        &url,
        format!("{space}-ghost"),
        &presence,
        true,
        "invoice.render",
    )
    .await;

    let mut config = isolated(catalog("web", "web-1"), &url, &space);
    // Long: this test is about the presence that is seen, not about waiting for one.
    config.request_timeout_ms = 30_000;
    let bus = Intracom::connect(config).await.unwrap();
    // The broker answers "no matching subscribers": the work was not taken by anyone.
    // (Refused without waiting: the stale presence was seen and the broker said so, not
    // the wait for a worker that ran out.)
    let e = bus
        .publish(Message::to_service("billing", "invoice.render").work())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::NoWorker { service, waited, .. } if service == "billing" && waited.is_zero()),
        "{e}"
    );
    bus.shutdown().await;
    client
        .publish(
            &presence,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            true,
            "",
        )
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    driver.abort();
}

async fn a_late_ack_of_an_earlier_subscription_releases_nothing_of_the_next() {
    let (url, space) = (shared_url(), space());
    let bus = bus_on(&url, &space, "billing", "billing-1").await;
    let mut first = bus.subscribe(Subscription::named("books")).await.unwrap();
    let sent = bus.publish(Message::broadcast("reload")).await.unwrap();
    let early = next(&mut first).await;
    assert_eq!(early.id, sent.id);
    // The subscription goes away unacked; the next one with the name gets it again.
    drop(first);
    let mut second = bus.subscribe(Subscription::named("books")).await.unwrap();
    let again = next(&mut second).await;
    assert_eq!(again.id, sent.id, "unacked: sent again");
    // The first subscription's delivery is acked late: it is not the second's to ack.
    early.ack().await.unwrap();
    drop(again);
    drop(second);
    let mut third = bus.subscribe(Subscription::named("books")).await.unwrap();
    assert_eq!(
        next(&mut third).await.id,
        sent.id,
        "still unacked: a late ack of an earlier subscription released nothing"
    );
    bus.shutdown().await;
}

async fn history_is_refused_not_faked() {
    let (url, space) = (shared_url(), space());
    let bus = bus_on(&url, &space, "billing", "billing-1").await;
    let caps = bus.medium().capabilities();
    assert!(!caps.history && !caps.server_stamps && !caps.stored_queue);
    assert!(caps.shared_checkpoints);
    let e = bus
        .subscribe(Subscription::new().from_beginning())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let mut sub = bus.subscribe(Subscription::new()).await.unwrap();
    bus.publish(Message::broadcast("reload")).await.unwrap();
    let d = next(&mut sub).await;
    assert!(
        d.ts.is_none() && d.at.is_none(),
        "no stamps a broker did not give"
    );
    bus.shutdown().await;
    assert!(sub.next().await.is_none());
}

async fn a_worker_that_stops_hands_back_what_the_broker_queued_for_it() {
    use std::sync::{Arc, Mutex};
    let (url, space) = (shared_url(), space());
    let first = bus_on(&url, &space, "billing", "billing-1").await;
    let second = bus_on(&url, &space, "billing", "billing-2").await;
    let done = Arc::new(Mutex::new(Vec::<(String, i32)>::new()));
    let gate = Arc::new(tokio::sync::Notify::new());
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let record = |who: &'static str, hold: bool| {
        let (done, gate, started_tx) = (done.clone(), gate.clone(), started_tx.clone());
        move |m: Message| {
            let (done, gate, started_tx) = (done.clone(), gate.clone(), started_tx.clone());
            async move {
                if hold {
                    started_tx.send(()).ok();
                    gate.notified().await;
                }
                done.lock()
                    .unwrap()
                    .push((who.to_string(), m.query.get_i32("n").unwrap()));
                Ok::<(), String>(())
            }
        }
    };
    let busy = first
        .work(
            "billing",
            &["invoice.render"],
            intracom::WorkOptions::default(),
            record("first", true),
        )
        .unwrap();
    let _idle = second
        .work(
            "billing",
            &["invoice.render"],
            intracom::WorkOptions::default(),
            record("second", false),
        )
        .unwrap();
    // Both workers present before any job goes out (a publish waits for one worker only).
    let watcher = intracom::medium::mqtt::MqttMedium::connect(&isolated(
        catalog("web", "watch"),
        &url,
        &space,
    ))
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    let billing_twice = intracom::medium::mqtt::ServiceWorkers {
        service: "billing".to_string(),
        connections: 2,
    };
    while watcher.workers() != [billing_twice.clone()] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            watcher.workers()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for n in 0..10 {
        first
            .publish(
                Message::to_service("billing", "invoice.render")
                    .work()
                    .body(doc! { "n": n }),
            )
            .await
            .unwrap();
    }
    // The first worker holds one job; the broker queues its round-robin share behind it.
    tokio::time::timeout(HANG_GUARD, started.recv())
        .await
        .unwrap();
    // The stop takes effect at its first poll (it cancels, then waits for the job in
    // hand); only then is the held job let go, or the worker could take the next job
    // before it is told to stop.
    let mut stopping = Box::pin(busy.stop());
    assert!(futures::poll!(stopping.as_mut()).is_pending());
    gate.notify_one();
    tokio::time::timeout(HANG_GUARD, stopping)
        .await
        .expect("the stopping worker finishes the job in hand and stops");
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    loop {
        let mut handled: Vec<i32> = done.lock().unwrap().iter().map(|(_, n)| *n).collect();
        handled.sort();
        handled.dedup();
        if handled == (0..10).collect::<Vec<_>>() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "jobs lost when a worker stopped: done {:?}",
            done.lock().unwrap()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let by_first = done
        .lock()
        .unwrap()
        .iter()
        .filter(|(w, _)| w == "first")
        .count();
    assert_eq!(
        by_first, 1,
        "the stopping worker finished the job in hand only"
    );
    for bus in [first, second] {
        tokio::time::timeout(HANG_GUARD, bus.shutdown())
            .await
            .expect("shutdown ends");
    }
}

pub async fn mqtts_with_a_ca_file_works_and_a_stranger_ca_is_refused() {
    let certs = broker::certificates().expect("test certificates");
    let broker = Broker::start_tls(&certs.cert(), &certs.key()).expect("a TLS broker");
    let (url, space) = (broker.url(), space());
    assert!(url.starts_with("mqtts://"), "{url}");
    let mut config = isolated(catalog("billing", "billing-1"), &url, &space);
    config.mqtt.ca_file = Some(certs.ca());
    let bus = Intracom::connect(config)
        .await
        .expect("TLS with the CA that signed the broker");
    let mut sub = bus.subscribe(Subscription::new()).await.unwrap();
    let sent = bus.publish(Message::broadcast("reload")).await.unwrap();
    assert_eq!(next(&mut sub).await.id, sent.id);
    bus.shutdown().await;

    let mut config = isolated(catalog("billing", "billing-2"), &url, &space);
    config.mqtt.ca_file = Some(certs.stranger_ca());
    let e = Intracom::connect(config).await.unwrap_err();
    assert!(matches!(e, Error::Medium { .. }), "{e}");
    assert!(
        !e.is_retryable(),
        "a certificate the CA did not sign: fix the config"
    );
    assert!(e.to_string().contains("TLS"), "{e}");
}
